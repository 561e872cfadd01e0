"""The supported Hugging Face architectures: their config.json <-> the `model` section, and
the table of parameter names between their checkpoints and this codebase's parameters.

Llama, Mistral, Qwen2 and Qwen3 share one layout (`model.layers.{i}.self_attn.q_proj`,
torch `Linear` weights stored [out, in]); GPT-2 has its own (`transformer.h.{i}.attn.c_attn`,
`Conv1D` weights stored [in, out], q/k/v fused in one matrix). Our kernels are
[in..., out...] (e.g. q: [d_model, heads, head_dim]) and stacked over layers.
"""

import dataclasses
import math
from typing import Any

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Model

KEY = "from_hf"
LLAMA, MISTRAL, QWEN2, QWEN3, GPT2 = ("LlamaForCausalLM", "MistralForCausalLM",
                                      "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GPT2LMHeadModel")
ARCHITECTURES = (LLAMA, MISTRAL, QWEN2, QWEN3, GPT2)
MODEL_TYPES = {LLAMA: "llama", MISTRAL: "mistral", QWEN2: "qwen2", QWEN3: "qwen3", GPT2: "gpt2"}

# Each class's defaults, for keys a config.json may leave out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    LLAMA: {"max_position_embeddings": 2048, "tie_word_embeddings": False,
            "attention_bias": False, "mlp_bias": False},
    MISTRAL: {"max_position_embeddings": 4096 * 32, "tie_word_embeddings": False,
              "sliding_window": 4096},
    QWEN2: {"max_position_embeddings": 32768, "tie_word_embeddings": False,
            "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28},
    QWEN3: {"max_position_embeddings": 32768, "tie_word_embeddings": False,
            "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28,
            "attention_bias": False, "head_dim": 128},
    GPT2: {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12,
           "n_head": 12, "n_inner": None, "activation_function": "gelu_new",
           "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
           "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False},
}
_LLAMA_COMMON = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0}
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One of our parameters and where it lives in a Hugging Face checkpoint.

    `name`: the HF tensor, `{i}` the layer; `linear`: stored [out, in] (torch Linear)
    rather than [in, out]; `in_ndim`: our leading input axes of a kernel (0: a vector);
    `part`: (k, n) = the k-th of n equal column blocks of a fused HF tensor;
    `vocab_axis`: our axis that is the (padded) vocabulary.
    """
    path: tuple[str, ...]
    name: str
    linear: bool = False
    in_ndim: int = 0
    part: tuple[int, int] | None = None
    vocab_axis: int | None = None

    @property
    def stacked(self) -> bool:
        return "{i}" in self.name


def _llama_table() -> list[Tensor]:
    layer = "model.layers.{i}."
    out = [Tensor(("embed", "embedding"), "model.embed_tokens.weight", in_ndim=1,
                  vocab_axis=0),
           Tensor(("blocks", "attn_norm", "scale"), layer + "input_layernorm.weight"),
           Tensor(("blocks", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight"),
           Tensor(("blocks", "attn", "q_norm", "scale"), layer + "self_attn.q_norm.weight"),
           Tensor(("blocks", "attn", "k_norm", "scale"), layer + "self_attn.k_norm.weight"),
           Tensor(("final_norm", "scale"), "model.norm.weight"),
           Tensor(("lm_head", "kernel"), "lm_head.weight", linear=True, in_ndim=1,
                  vocab_axis=1)]
    for ours, theirs, in_ndim in (("q", "q_proj", 1), ("k", "k_proj", 1), ("v", "v_proj", 1),
                                  ("o", "o_proj", 2)):
        name = f"{layer}self_attn.{theirs}"
        out += [Tensor(("blocks", "attn", ours, "kernel"), name + ".weight", linear=True,
                       in_ndim=in_ndim),
                Tensor(("blocks", "attn", ours, "bias"), name + ".bias")]
    for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
        name = f"{layer}mlp.{theirs}"
        out += [Tensor(("blocks", "mlp", ours, "kernel"), name + ".weight", linear=True,
                       in_ndim=1),
                Tensor(("blocks", "mlp", ours, "bias"), name + ".bias")]
    return out


def _gpt2_table() -> list[Tensor]:
    layer = "transformer.h.{i}."
    out = [Tensor(("embed", "embedding"), "transformer.wte.weight", in_ndim=1,
                  vocab_axis=0),
           Tensor(("pos_embed", "embedding"), "transformer.wpe.weight", in_ndim=1),
           Tensor(("final_norm", "scale"), "transformer.ln_f.weight"),
           Tensor(("final_norm", "bias"), "transformer.ln_f.bias"),
           Tensor(("lm_head", "kernel"), "lm_head.weight", linear=True, in_ndim=1,
                  vocab_axis=1)]
    for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
        out += [Tensor(("blocks", ours, "scale"), f"{layer}{theirs}.weight"),
                Tensor(("blocks", ours, "bias"), f"{layer}{theirs}.bias")]
    for k, ours in enumerate(("q", "k", "v")):
        out += [Tensor(("blocks", "attn", ours, "kernel"), layer + "attn.c_attn.weight",
                       in_ndim=1, part=(k, 3)),
                Tensor(("blocks", "attn", ours, "bias"), layer + "attn.c_attn.bias",
                       part=(k, 3))]
    for module, ours, theirs, in_ndim in (("attn", "o", "attn.c_proj", 2),
                                          ("mlp", "up", "mlp.c_fc", 1),
                                          ("mlp", "down", "mlp.c_proj", 1)):
        out += [Tensor(("blocks", module, ours, "kernel"), f"{layer}{theirs}.weight",
                       in_ndim=in_ndim),
                Tensor(("blocks", module, ours, "bias"), f"{layer}{theirs}.bias")]
    return out


def tensor_table(architecture: str) -> list[Tensor]:
    """Every parameter an architecture can have; a model uses those it has."""
    return _gpt2_table() if architecture == GPT2 else _llama_table()


# ----------------------------------------------------------------------------------------
# config.json -> model section.

def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope_theta, our rope_scaling section) from `rope_parameters` or the older
    `rope_theta` + `rope_scaling` keys."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", _LLAMA_COMMON["rope_theta"])))
    kind = params.get("rope_type", params.get("type")) or "default"
    if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ConfigError(KEY, "partial_rotary_factor != 1 (RoPE on part of each head) is not "
                               "supported")
    if kind == "default":
        return theta, {"type": "none"}
    if kind != "llama3":
        raise ConfigError(KEY, f"rope_scaling type {kind!r} is not supported; supported: "
                               "'llama3' (or none)")
    return theta, {"type": "llama3", "factor": float(params["factor"]),
                   "low_freq_factor": float(params["low_freq_factor"]),
                   "high_freq_factor": float(params["high_freq_factor"]),
                   "original_max_positions": int(params["original_max_position_embeddings"])}


def _window(arch: str, hf: dict[str, Any], layers: int) -> int:
    """One sliding window for every layer (0 = none); per-layer mixes are refused."""
    if arch == MISTRAL:
        return int(hf.get("sliding_window") or 0)
    if arch not in (QWEN2, QWEN3):
        return 0
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    kinds = hf.get("layer_types") or [
        "sliding_attention" if window and i >= hf.get("max_window_layers", 0)
        else "full_attention" for i in range(layers)]
    if set(kinds) == {"full_attention"}:
        return 0
    if set(kinds) != {"sliding_attention"} or not window:
        raise ConfigError(KEY, f"sliding-window attention in some layers only (layer_types "
                               f"{sorted(set(kinds))}) is not supported: model.sliding_window "
                               "applies to every layer")
    return int(window)


def _gpt2_section(hf: dict[str, Any]) -> dict[str, Any]:
    if hf["activation_function"] not in _TANH_GELUS:
        raise ConfigError(KEY, f"activation_function {hf['activation_function']!r} is not "
                               f"supported; supported: {list(_TANH_GELUS)}")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise ConfigError(KEY, "GPT-2 attention scaled other than by 1/sqrt(head_dim) "
                               "(scale_attn_by_inverse_layer_idx, scale_attn_weights) is "
                               "not supported")
    d, heads = hf["n_embd"], hf["n_head"]
    return {"num_layers": hf["n_layer"], "d_model": d, "num_heads": heads,
            "num_kv_heads": heads, "head_dim": d // heads, "d_ff": hf["n_inner"] or 4 * d,
            "mlp": "gelu", "norm": "layernorm", "position": "learned",
            "max_positions": hf["n_positions"], "norm_eps": hf["layer_norm_epsilon"],
            "attention_bias": "all", "mlp_bias": True, "vocab_size": hf["vocab_size"],
            "tie_embeddings": bool(hf["tie_word_embeddings"])}


def _llama_section(arch: str, hf: dict[str, Any]) -> dict[str, Any]:
    if hf["hidden_act"] != "silu":
        raise ConfigError(KEY, f"hidden_act {hf['hidden_act']!r} is not supported; the gated "
                               "MLP of this architecture is supported with 'silu' (SwiGLU)")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    theta, scaling = _rope(hf)
    bias = "qkv" if arch == QWEN2 else "all" if hf.get("attention_bias") else "none"
    return {"num_layers": hf["num_hidden_layers"], "d_model": d, "num_heads": heads,
            "num_kv_heads": hf.get("num_key_value_heads") or heads,
            "head_dim": hf.get("head_dim") or d // heads, "d_ff": hf["intermediate_size"],
            "mlp": "swiglu", "norm": "rmsnorm", "position": "rope", "rope_theta": theta,
            "rope_scaling": scaling, "max_positions": hf.get("max_position_embeddings") or 0,
            "norm_eps": hf["rms_norm_eps"], "attention_bias": bias,
            "mlp_bias": bool(hf.get("mlp_bias", False)), "qk_norm": arch == QWEN3,
            "sliding_window": _window(arch, hf, hf["num_hidden_layers"]),
            "vocab_size": hf["vocab_size"], "tie_embeddings": bool(hf["tie_word_embeddings"])}


def architecture_of(hf: dict[str, Any]) -> str:
    """The one supported class named by config.json's `architectures`."""
    names = hf.get("architectures") or []
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise ConfigError(KEY, f"architecture {names or hf.get('model_type')!r} is not "
                               f"supported; supported: {list(ARCHITECTURES)}")
    return names[0]


def model_section(hf: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(architecture, the `model` keys it sets) from a config.json's contents."""
    arch = architecture_of(hf)
    hf = {**_LLAMA_COMMON, **_DEFAULTS[arch], **hf}
    if hf.get("num_experts") or hf.get("num_local_experts"):
        raise ConfigError(KEY, "Mixture-of-Experts checkpoints are not supported")
    section = _gpt2_section(hf) if arch == GPT2 else _llama_section(arch, hf)
    return arch, section


# ----------------------------------------------------------------------------------------
# model section -> architecture and config.json.

def _require(ok: bool, key: str, arch: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"model.{key}", f"{why}: no supported Hugging Face architecture "
                                          f"expresses this model (closest: {arch})")


def architecture_for(m: Model) -> str:
    """The Hugging Face class that expresses model `m` exactly; ConfigError otherwise."""
    _require(not m.moe.num_experts, "moe.num_experts", LLAMA, "Mixture-of-Experts layers")
    if m.position == "learned":
        for key, value, want in (("norm", m.norm, "layernorm"), ("mlp", m.mlp, "gelu"),
                                 ("attention_bias", m.attention_bias, "all"),
                                 ("mlp_bias", m.mlp_bias, True), ("qk_norm", m.qk_norm, False),
                                 ("sliding_window", m.sliding_window, 0),
                                 ("num_kv_heads", m.num_kv_heads, m.num_heads),
                                 ("head_dim", m.resolved_head_dim, m.d_model // m.num_heads)):
            _require(value == want, key, GPT2, f"{value!r} where GPT-2 has {want!r}")
        return GPT2
    _require(m.norm == "rmsnorm", "norm", LLAMA, f"{m.norm!r} with RoPE")
    _require(m.mlp == "swiglu", "mlp", LLAMA, f"{m.mlp!r} (an ungated MLP) with RoPE")
    if m.qk_norm:
        _require(m.attention_bias != "qkv", "attention_bias", QWEN3, "'qkv' with q/k norm")
        _require(not m.mlp_bias, "mlp_bias", QWEN3, "MLP biases with q/k norm")
        return QWEN3
    if m.attention_bias == "qkv":
        _require(not m.mlp_bias, "mlp_bias", QWEN2, "MLP biases with q/k/v biases")
        return QWEN2
    if m.sliding_window:
        _require(m.attention_bias == "none" and not m.mlp_bias, "attention_bias", MISTRAL,
                 "biases with a sliding window")
        return MISTRAL
    return LLAMA


def _rope_keys(m: Model) -> dict[str, Any]:
    """RoPE in the `rope_theta` + `rope_scaling` form every transformers release reads."""
    out: dict[str, Any] = {"rope_theta": m.rope_theta}
    s = m.rope_scaling
    if s.type == "llama3":
        out["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor,
                               "low_freq_factor": s.low_freq_factor,
                               "high_freq_factor": s.high_freq_factor,
                               "original_max_position_embeddings": s.original_max_positions}
    return out


def hf_config(m: Model, vocab_size: int, context: int) -> dict[str, Any]:
    """config.json for model `m` (vocabulary unpadded; `context` = train.seq_len, the
    position limit written when the model does not say)."""
    arch = architecture_for(m)
    base = {"architectures": [arch], "model_type": MODEL_TYPES[arch], "vocab_size": vocab_size,
            "tie_word_embeddings": m.tie_embeddings, "torch_dtype": "float32"}
    if arch == GPT2:
        return {**base, "n_layer": m.num_layers, "n_embd": m.d_model, "n_head": m.num_heads,
                "n_inner": m.d_ff, "n_positions": m.max_positions, "n_ctx": m.max_positions,
                "activation_function": "gelu_new", "layer_norm_epsilon": m.norm_eps,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False, "attn_pdrop": 0.0, "embd_pdrop": 0.0,
                "resid_pdrop": 0.0}
    out = {**base, "num_hidden_layers": m.num_layers, "hidden_size": m.d_model,
           "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
           "head_dim": m.resolved_head_dim, "intermediate_size": m.d_ff, "hidden_act": "silu",
           "rms_norm_eps": m.norm_eps, "max_position_embeddings": m.max_positions or context,
           "attention_dropout": 0.0, **_rope_keys(m)}
    if arch in (LLAMA, QWEN3):
        out["attention_bias"] = m.attention_bias == "all"
    if arch == LLAMA:
        out["mlp_bias"] = m.mlp_bias
    if arch == MISTRAL:
        out["sliding_window"] = m.sliding_window
    if arch in (QWEN2, QWEN3):
        window = m.sliding_window
        out.update(use_sliding_window=bool(window), sliding_window=window or None,
                   max_window_layers=0 if window else m.num_layers,
                   layer_types=["sliding_attention" if window else "full_attention"]
                   * m.num_layers)
    return out


def hf_shape(t: Tensor, ours: tuple[int, ...], vocab_size: int) -> tuple[int, ...]:
    """The shape of HF tensor `t.name` (one layer) for our per-layer shape `ours`."""
    shape = list(ours)
    if t.vocab_axis is not None:
        shape[t.vocab_axis] = vocab_size
    if t.in_ndim == 0:
        flat = (math.prod(shape),)
    else:
        flat = (math.prod(shape[:t.in_ndim]), math.prod(shape[t.in_ndim:]))
        if t.linear:
            flat = flat[::-1]
    if t.part is not None:
        flat = (*flat[:-1], flat[-1] * t.part[1])
    return flat
