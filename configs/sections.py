"""Typed config sections: every key, its default and its limits, declared in one place.

The command line and config files speak `ml_collections.ConfigDict` (`--config.model.d_model=256`);
the library speaks these frozen sections. `Config.from_dict(config_dict)` resolves a
ConfigDict once, at the entry: each section validates its own keys where they are declared
(as MaxText's `types.py` does), then `Config` checks what spans sections. The first bad
key raises `ConfigError` naming it, e.g. `model.num_kv_heads: num_heads 4 is not
divisible by num_kv_heads 3`. Checks that need the devices or the data are in
`training/layout.py` (`check_layout`).

A section maps onto the ConfigDict under its `KEY` prefix ("" = top-level keys); a field
may name its ConfigDict key with an alias (`pipeline_repeats` -> `Pipeline.repeats`).
`configs/base.py` builds the default ConfigDict from these defaults, so a key exists on
the command line exactly when it is declared here.
"""

import sys
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict as PydanticConfig, Field, ValidationError, \
    field_serializer, field_validator, model_validator

from jaxlm.configs import keys
from jaxlm.configs.errors import ConfigError, require
from jaxlm.configs.migrate import upgrade
from jaxlm.configs.specs import BpeVocabSize, MixtureSpec, TokenizerSpec, ValFraction
from jaxlm.configs.wording import config_error
# Also importable from here: the helpers section code uses with them.
from jaxlm.configs.specs import parse_mixture  # noqa: F401
from jaxlm.configs.wording import choices  # noqa: F401

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
UnitInterval = Annotated[float, Field(ge=0, lt=1)]  # [0, 1)

# Outermost to innermost: tensor parallelism talks most, so its devices are adjacent;
# context parallelism passes key/value blocks to a ring neighbour N-1 times in every
# attention layer, so its devices come next.
MESH_AXES = ("pipeline", "data", "fsdp", "expert", "context", "tensor")

# Logical axis -> mesh axes: the one place where the model's axis names meet the mesh
# (`parallel/sharding.py` applies them). The first rule naming a logical axis wins, and a
# mesh axis already used by an earlier dimension of the same array is dropped.
DEFAULT_RULES = (
    # Parameters.
    ("layers", "pipeline"),  # contiguous blocks of layers per pipeline stage
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("experts", "expert"),
    ("router", None),
    ("lora_rank", None),  # LoRA adapters' rank axis: small, never split
    # Activations.
    ("act_stages", "pipeline"),
    ("act_batch", ("data", "fsdp", "expert")),  # the expert axis is data-parallel outside MoE
    ("act_len", "context"),  # context parallelism: the sequence split between devices
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)
LOGICAL_AXES = tuple(name for name, _ in DEFAULT_RULES)

DType = Literal["float32", "bfloat16", "float16"]
AttentionImpl = Literal["xla", "pallas", "pallas_interpret", "cudnn"]
ContextAttention = Literal["ring", "allgather"]
RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]
MlpKind = Literal["gelu", "swiglu"]
NormKind = Literal["rmsnorm", "layernorm"]
PositionKind = Literal["rope", "learned"]
AttentionBias = Literal["none", "qkv", "all"]
RopeScalingKind = Literal["none", "llama3"]
RouterOrder = Literal["softmax_topk", "topk_softmax"]
GroupedMatmul = Literal["auto", "ragged_dot", "blocks"]
Packing = Literal["windows", "documents"]
KlKind = Literal["forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl"]
FeatureKind = Literal["mse", "cosine"]
ScheduleKind = Literal["constant", "linear", "cosine"]
# sigmoid: DPO (with conservative label smoothing) | robust: rDPO | ipo: IPO |
# simpo: SimPO (reference-free, length-normalised)
PreferenceLoss = Literal["sigmoid", "robust", "ipo", "simpo"]
LearningRateSchedule = Literal["cosine", "wsd", "linear", "constant", "rsqrt"]
OptimizerName = Literal["adamw", "lion", "adafactor", "muon", "sgd"]
PER_CHANNEL, PER_TENSOR = "per_channel", "per_tensor"
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the projections, by name
MLP_TARGETS = ("gate", "up", "down")


class Section(BaseModel):
    """Base of every section: frozen, strict types, no unknown keys, no NaN or inf."""

    model_config = PydanticConfig(frozen=True, extra="forbid", strict=True,
                                  allow_inf_nan=False, populate_by_name=True)
    KEY: ClassVar[str] = ""  # prefix of this section's keys in the ConfigDict

    @classmethod
    def parse(cls, values: Mapping[str, Any], prefix: str | None = None) -> "Section":
        """Validate `values` (this section's keys); raise ConfigError for the first bad one."""
        prefix = cls.KEY if prefix is None else prefix
        try:
            return cls.model_validate(dict(values))
        except ValidationError as e:
            raise _config_error(cls, prefix, e) from None

    @classmethod
    def config_keys(cls) -> list[str]:
        """This section's own keys as they appear in the ConfigDict (aliases applied)."""
        return [f.alias or name for name, f in cls.model_fields.items()]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True)


# ----------------------------------------------------------------------------------------
# The sections.

class Train(Section):
    """What one run trains on: steps, batch, sequence length, seed; what a divergence does."""
    steps: PositiveInt = 2000
    batch_size: PositiveInt = 12  # global, in sequences
    seq_len: PositiveInt = 64
    seed: int = 0
    grad_accum_steps: PositiveInt = 1
    eval_batch_size: PositiveInt = 256  # global, in windows of seq_len tokens
    eval_max_batches: NonNegativeInt = 0  # 0 = the whole validation split
    # A non-finite loss or gradient norm: `stop` ends the run with an error (nothing
    # non-finite is saved); `skip` drops that update and stops after `max_skipped` in a row.
    nan_policy: Literal["stop", "skip"] = "stop"
    max_skipped: PositiveInt = 10

    @model_validator(mode="after")
    def _accumulation_divides_batch(self) -> "Train":
        require(self.batch_size % self.grad_accum_steps == 0, "grad_accum_steps",
               f"batch_size {self.batch_size} is not divisible by grad_accum_steps "
               f"{self.grad_accum_steps}")
        return self


class Updates(Section):
    """The learning-rate schedule and the keys every optimizer shares, plus AdamW's own
    (beta1, beta2, adam_eps; Muon's AdamW for its non-matrix parameters uses them too).
    Weight decay is decoupled (scaled by the learning rate) and on matrices only."""
    learning_rate: NonNegativeFloat = 1e-3  # the peak, after warm-up
    min_learning_rate: NonNegativeFloat = 1e-4  # the end of the decay (cosine, linear, wsd)
    warmup_steps: NonNegativeInt = 100  # linear from 0 to learning_rate
    # After warm-up: cosine | linear decay to min_learning_rate at the last step; constant;
    # rsqrt: learning_rate * sqrt(warmup_steps / step), not below min_learning_rate;
    # wsd: constant, then a linear decay to min_learning_rate over the last decay_fraction
    # of the steps.
    schedule: LearningRateSchedule = "cosine"
    decay_fraction: Annotated[float, Field(gt=0, le=1)] = 0.2  # wsd's decay phase
    weight_decay: NonNegativeFloat = 0.1
    grad_clip: NonNegativeFloat = 1.0  # global-norm clipping; 0 = off
    beta1: UnitInterval = 0.9
    beta2: UnitInterval = 0.99
    adam_eps: NonNegativeFloat = 1e-8

    @model_validator(mode="after")
    def _floor_below_peak(self) -> "Updates":
        require(self.min_learning_rate <= self.learning_rate, "min_learning_rate",
               f"{self.min_learning_rate} is above learning_rate {self.learning_rate}")
        return self


class Lion(Section):
    """Lion (Chen et al. 2023): sign of an interpolated momentum. Its authors use a
    learning rate 3-10x below AdamW's and a weight decay 3-10x above."""
    beta1: UnitInterval = 0.9
    beta2: UnitInterval = 0.99


class Adafactor(Section):
    """Adafactor (Shazeer & Stern 2018): second moments of a matrix as row and column
    factors. Without parameter scaling, learning_rate is an absolute step as in AdamW."""
    decay_rate: PositiveFloat = 0.8  # beta2 at step t is 1 - t^-decay_rate
    min_dim_size_to_factor: PositiveInt = 128  # factor only if the two largest dims are >= this
    clipping_threshold: NonNegativeFloat = 1.0  # update RMS clipping per parameter; 0 = off
    multiply_by_parameter_scale: bool = False  # steps relative to the parameter's RMS
    momentum: UnitInterval = 0.0  # first-moment decay; 0 = none (no first-moment state)
    eps: PositiveFloat = 1e-30


class Muon(Section):
    """Muon (Jordan et al. 2024, optax.contrib.muon): momentum orthogonalised by
    Newton-Schulz iterations, for the hidden matrices; the embedding, the output
    projection, norms and biases use AdamW (beta1, beta2, adam_eps) as its authors
    recommend, at `adam_learning_rate`."""
    beta: UnitInterval = 0.95  # momentum
    ns_steps: PositiveInt = 5  # Newton-Schulz iterations
    nesterov: bool = True
    adam_learning_rate: NonNegativeFloat = 1e-3  # AdamW's peak; the same schedule shape


class Sgd(Section):
    """SGD with (optionally Nesterov) momentum."""
    momentum: UnitInterval = 0.9  # 0 = plain SGD
    nesterov: bool = False


class Optimizer(Section):
    """Which optimizer, and its own keys (the shared ones are top-level: learning_rate, ...)."""
    KEY: ClassVar[str] = "optimizer"
    name: OptimizerName = "adamw"
    lion: Lion = Lion()
    adafactor: Adafactor = Adafactor()
    muon: Muon = Muon()
    sgd: Sgd = Sgd()


class Intervals(Section):
    """Cadences of the loop's hooks, in optimizer steps (0 disables)."""
    log_every: NonNegativeInt = 50
    eval_every: NonNegativeInt = 500
    checkpoint_every: NonNegativeInt = 500
    # Also save when this many minutes of wall time have passed since the last save
    # (whichever comes first); 0 = off.
    checkpoint_every_minutes: NonNegativeFloat = 0.0
    keep_checkpoints: NonNegativeInt = 3  # 0 = keep all


class Log(Section):
    """Where the metrics go besides metrics.jsonl and TensorBoard, and what MFU divides by."""
    KEY: ClassVar[str] = "log"
    wandb_project: str = ""  # "" = no wandb; needs the .[wandb] extra (WANDB_MODE=offline works)
    wandb_entity: str = ""  # "" = wandb's default entity
    # Peak FLOP/s of one device for MFU; 0 = the table in training/flops.py by device kind
    # (no MFU where the device is not in it, e.g. CPU).
    peak_flops_per_device: NonNegativeFloat = 0.0


class Profile(Section):
    """A jax.profiler trace of steps start_step .. start_step + num_steps - 1 (as numbered
    in metrics.jsonl) into WORKDIR/profile/; num_steps = 0: no trace."""
    KEY: ClassVar[str] = "profile"
    start_step: PositiveInt = 10  # after the first step's compilation
    num_steps: NonNegativeInt = 0


class Pipeline(Section):
    """Pipeline schedule, used when mesh.pipeline > 1."""
    # The batch (after gradient accumulation) is cut into this many micro-batches
    # (0 = one per stage); each stage holds `repeats` chunks of layers (> 1: circular).
    microbatches: NonNegativeInt = Field(0, alias="pipeline_microbatches")
    repeats: PositiveInt = Field(1, alias="pipeline_repeats")


class Mesh(Section):
    """Device mesh sizes per axis; one axis may be -1 (the devices left over)."""
    KEY: ClassVar[str] = "mesh"
    data: Annotated[int, Field(ge=-1)] = -1
    fsdp: Annotated[int, Field(ge=-1)] = 1
    tensor: Annotated[int, Field(ge=-1)] = 1
    pipeline: Annotated[int, Field(ge=-1)] = 1
    expert: Annotated[int, Field(ge=-1)] = 1
    context: Annotated[int, Field(ge=-1)] = 1  # the sequence split (rule act_len -> context)

    @model_validator(mode="after")
    def _sizes(self) -> "Mesh":
        for name in MESH_AXES:
            require(getattr(self, name) != 0, name,
                   f"must be a positive size or -1, got {getattr(self, name)}")
        wild = [n for n in MESH_AXES if getattr(self, n) == -1]
        require(len(wild) <= 1, wild[-1] if wild else "", "only one mesh axis may be -1")
        return self

    def sizes(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MESH_AXES}


Rule = tuple[str, str | tuple[str, ...] | None]


class Sharding(Section):
    """Logical axis -> mesh axes rules (see DEFAULT_RULES)."""
    KEY: ClassVar[str] = "sharding"
    rules: tuple[Rule, ...] = DEFAULT_RULES

    @field_validator("rules", mode="before")
    @classmethod
    def _as_tuples(cls, rules: Any) -> Any:
        """config.json stores the rules as lists."""
        def tup(x):
            return tuple(tup(v) for v in x) if isinstance(x, (list, tuple)) else x
        return tup(rules)

    @model_validator(mode="after")
    def _complete(self) -> "Sharding":
        named = {name for name, _ in self.rules}
        for name in LOGICAL_AXES:
            require(name in named, "rules", f"no rule for logical axis {name!r}")
        for name, axes in self.rules:
            for axis in (axes,) if isinstance(axes, str) else axes or ():
                require(axis in MESH_AXES, "rules", f"logical axis {name!r} maps to unknown "
                                                   f"mesh axis {axis!r}; mesh axes: {MESH_AXES}")
        return self


class MoE(Section):
    """Mixture of experts; num_experts = 0 is a dense model."""
    num_experts: NonNegativeInt = 0
    top_k: PositiveInt = 2
    every: PositiveInt = 1  # MoE in every k-th layer (the others dense)
    num_shared_experts: NonNegativeInt = 0  # always-on experts, added to the routed ones
    d_ff: NonNegativeInt = 0  # per expert; 0 = model.d_ff
    capacity_factor: float = 0.0  # > 0: token dropping at this capacity; <= 0: dropless
    # Tokens per capacity group (capacity_factor > 0): each group's experts take
    # ceil(group_size * top_k / num_experts * capacity_factor) assignments. 0 = one sequence;
    # else a divisor of seq_len (runs of positions) or a multiple (whole sequences). A
    # model property: every layout forms the same groups and drops the same tokens.
    group_size: NonNegativeInt = 0
    router_order: RouterOrder = "softmax_topk"
    renormalize: bool = True  # top-k weights sum to 1 (softmax_topk)
    jitter: UnitInterval = 0.0  # multiplicative router-input noise in training
    # Dropless grouped matmul: ragged_dot, or padded blocks (auto: blocks on CPU only).
    grouped_matmul: GroupedMatmul = "auto"
    load_balance_weight: NonNegativeFloat = 0.01  # Switch Transformer's E * sum_e f_e P_e
    z_loss_weight: NonNegativeFloat = 0.001  # ST-MoE's mean logsumexp(router logits)^2

    @model_validator(mode="after")
    def _top_k_fits(self) -> "MoE":
        if self.num_experts:
            require(self.top_k <= self.num_experts, "top_k",
                   f"top_k {self.top_k} > num_experts {self.num_experts}")
        return self


class RopeScaling(Section):
    """RoPE frequency scaling. `llama3` is Llama 3.1's: wavelengths longer than
    original_max_positions / low_freq_factor are divided by `factor`, those shorter than
    original_max_positions / high_freq_factor are kept, and the band between is blended."""
    type: RopeScalingKind = "none"
    factor: PositiveFloat = 8.0
    low_freq_factor: PositiveFloat = 1.0
    high_freq_factor: PositiveFloat = 4.0
    original_max_positions: PositiveInt = 8192

    @model_validator(mode="after")
    def _band(self) -> "RopeScaling":
        if self.type == "llama3":
            require(self.high_freq_factor > self.low_freq_factor, "high_freq_factor",
                   f"must be above low_freq_factor {self.low_freq_factor}, got "
                   f"{self.high_freq_factor}")
        return self


class Model(Section):
    """The Transformer's shape and numerics."""
    KEY: ClassVar[str] = "model"
    num_layers: PositiveInt = 4
    d_model: PositiveInt = 128
    num_heads: PositiveInt = 4
    num_kv_heads: PositiveInt = 4
    head_dim: NonNegativeInt = 0  # 0 = d_model // num_heads
    d_ff: PositiveInt = 512
    mlp: MlpKind = "gelu"
    dropout: UnitInterval = 0.0
    tie_embeddings: bool = True
    rope_theta: PositiveFloat = 10_000.0
    norm_eps: PositiveFloat = 1e-5
    init_std: NonNegativeFloat = 0.02
    dtype: DType = "float32"  # compute dtype; parameters are always float32
    attention_impl: AttentionImpl = "xla"
    # With the sequence split (mesh.context > 1): `ring` passes key/value blocks around
    # the devices (no device holds all of them); `allgather` gathers them in every layer.
    context_attention: ContextAttention = "ring"
    scan_layers: bool = True
    # Rematerialise each block in the backward pass: with scanned layers this is also
    # the fastest choice on CPU (no stacked per-layer residual buffers).
    remat: RematPolicy = "full"
    vocab_size: NonNegativeInt = 0  # 0 = the data's vocabulary
    vocab_multiple: PositiveInt = 128  # pad the vocabulary so every layout divides it
    norm: NormKind = "rmsnorm"  # layernorm: with a bias (GPT-2)
    position: PositionKind = "rope"  # learned: absolute position embeddings (GPT-2)
    # Rows of the learned position table (required with position="learned"); with RoPE,
    # the context the model was made for (0 = unknown), written out on export.
    max_positions: NonNegativeInt = 0
    rope_scaling: RopeScaling = RopeScaling()
    attention_bias: AttentionBias = "none"  # qkv: q, k, v projections (Qwen2); all: + output
    mlp_bias: bool = False  # biases in the MLP projections (GPT-2)
    qk_norm: bool = False  # RMSNorm of each query and key head before RoPE (Qwen3)
    sliding_window: NonNegativeInt = 0  # a query sees the last w positions (itself included); 0 = all
    moe: MoE = MoE()

    # Keys that change how the model runs or starts, not the function its parameters
    # compute: a run may start from another run's parameters with these different.
    EXECUTION_KEYS: ClassVar[tuple[str, ...]] = (
        "dropout", "init_std", "dtype", "attention_impl", "context_attention", "scan_layers",
        "remat", "moe.jitter", "moe.grouped_matmul", "moe.load_balance_weight", "moe.z_loss_weight")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @model_validator(mode="after")
    def _shapes(self) -> "Model":
        require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
               f"num_heads {self.num_heads} is not divisible by num_kv_heads "
               f"{self.num_kv_heads}")
        require(bool(self.head_dim) or self.d_model % self.num_heads == 0, "num_heads",
               f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}; "
               "set model.head_dim")
        head_dim = self.resolved_head_dim
        if self.position == "rope":
            require(head_dim % 2 == 0, "head_dim", f"RoPE needs an even head_dim, got {head_dim}")
        else:
            require(self.max_positions > 0, "max_positions",
                   "required by position='learned' (the rows of the position table)")
            require(self.rope_scaling.type == "none", "rope_scaling.type",
                   "scales RoPE; position='learned' has none")
        if self.attention_impl == "cudnn":
            require(self.dtype in ("bfloat16", "float16"), "attention_impl",
                   f"'cudnn' runs in bfloat16 or float16 only; model.dtype is {self.dtype!r}")
            require(head_dim % 8 == 0 and head_dim <= 256, "attention_impl",
                   f"'cudnn' needs head_dim a multiple of 8 and <= 256, got {head_dim}")
        if self.moe.num_experts:
            require(self.num_layers % self.moe.every == 0, "moe.every",
                   f"num_layers {self.num_layers} is not divisible by every={self.moe.every}")
            require(not self.mlp_bias, "mlp_bias", "experts have no biases; use a dense model")
        return self


# A loss term's weight. A field of LossWeights is a term (losses/objectives.py registers
# its builder under the same name); TeacherTermWeight marks a term that distils from a
# teacher run, read by the registry and by the teacher check below.
TermWeight = NonNegativeFloat
TeacherTermWeight = Annotated[NonNegativeFloat, Field(json_schema_extra={"needs_teacher": True})]


class LossWeights(Section):
    """Weight of each loss term (losses/objectives.py); 0 = not computed."""
    UNKNOWN_KEY: ClassVar[str] = ""  # set below, from the fields
    ce: TermWeight = 1.0  # next-token cross-entropy
    distill: TeacherTermWeight = 0.0  # logit distillation from loss.distill.teacher_workdir
    feature: TeacherTermWeight = 0.0  # hidden-state distillation (loss.feature)
    dpo: TermWeight = 0.0  # preference optimisation on (chosen, rejected) pairs (loss.dpo)
    reward: TermWeight = 0.0  # a reward model: Bradley-Terry loss of a scalar value head

    PAIR_TERMS: ClassVar[tuple[str, ...]] = ("dpo", "reward")  # means over preference pairs

    @property
    def pair_term(self) -> str | None:
        """The weighted term that trains on preference pairs, if any."""
        return next((n for n in self.PAIR_TERMS if getattr(self, n) > 0), None)

    @classmethod
    def teacher_terms(cls) -> tuple[str, ...]:
        """The terms that need a teacher run."""
        return tuple(name for name, field in cls.model_fields.items()
                     if (field.json_schema_extra or {}).get("needs_teacher"))


LossWeights.UNKNOWN_KEY = f"unknown loss term; loss terms: {list(LossWeights.model_fields)}"


class Distill(Section):
    """Logit distillation from a finished run of this codebase."""
    teacher_workdir: str = ""
    teacher_step: NonNegativeInt = 0  # checkpoint step of the teacher; 0 = its latest
    # forward_kl KL(teacher||student) | reverse_kl | skew_forward_kl | skew_reverse_kl
    kind: KlKind = "forward_kl"
    skew: UnitInterval = 0.1  # skew KL mixing weight
    temperature: PositiveFloat = 1.0  # the loss is T^2 * KL at temperature T
    temperature_schedule: ScheduleKind = "constant"
    temperature_final: PositiveFloat = 1.0  # T at the last step (linear / cosine)
    weight_schedule: ScheduleKind = "constant"
    weight_final: NonNegativeFloat = 0.0  # distill weight at the last step (linear / cosine)


class Feature(Section):
    """Hidden-state distillation: student block -> teacher block distances."""
    kind: FeatureKind = "mse"
    layer_map: str = ""  # "S:T,S:T" student -> teacher block; "" = last:last

    @field_validator("layer_map")
    @classmethod
    def _syntax(cls, text: str) -> str:
        for item in filter(None, (s.strip() for s in text.split(","))):
            parts = item.split(":")
            ok = len(parts) == 2 and all(p.strip().lstrip("-").isdigit() for p in parts)
            require(ok, "", f"{item!r} is not STUDENT_LAYER:TEACHER_LAYER")
        return text

    def layer_pairs(self, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
        """[(student block, teacher block)], negatives counted from the end."""
        if not self.layer_map.strip():
            return [(student_layers - 1, teacher_layers - 1)]
        pairs = []
        for item in filter(None, (s.strip() for s in self.layer_map.split(","))):
            s, t = (int(v) for v in item.split(":"))
            for idx, n, who in ((s, student_layers, "student"), (t, teacher_layers, "teacher")):
                require(-n <= idx < n, "loss.feature.layer_map",
                       f"{who} layer {idx} is out of range: the {who} has {n} layers")
            pairs.append((s % student_layers, t % teacher_layers))
        return pairs


class Dpo(Section):
    """Direct preference optimisation on (chosen, rejected) row pairs (docs/alignment.md)."""
    loss_type: PreferenceLoss = "sigmoid"
    beta: PositiveFloat = 0.1  # the KL strength (IPO: tau; SimPO: the reward scale)
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = 0.0  # sigmoid, robust, simpo
    simpo_gamma: NonNegativeFloat = 0.5  # SimPO's target reward margin
    # The frozen reference run; "" = init.from_workdir (a LoRA run: its base, adapters off).
    reference_workdir: str = ""
    reference_step: NonNegativeInt = 0  # its checkpoint step; 0 = its latest

    @property
    def needs_reference(self) -> bool:
        return self.loss_type != "simpo"


class RewardModel(Section):
    """A reward model's Bradley-Terry loss (loss.weights.reward, docs/alignment.md)."""
    # Adds c * (r_chosen + r_rejected)^2 per pair, keeping rewards centred on 0 (TRL's
    # RewardConfig.center_rewards_coefficient); 0 = off.
    center_coefficient: NonNegativeFloat = 0.0


class Loss(Section):
    """The objective: a weighted sum of registered terms."""
    KEY: ClassVar[str] = "loss"
    weights: LossWeights = LossWeights()
    distill: Distill = Distill()
    feature: Feature = Feature()
    dpo: Dpo = Dpo()
    reward: RewardModel = RewardModel()

    @property
    def needs_teacher(self) -> bool:
        return any(getattr(self.weights, name) > 0 for name in LossWeights.teacher_terms())

    @model_validator(mode="after")
    def _teacher_given(self) -> "Loss":
        if self.needs_teacher:
            name = next(n for n in LossWeights.teacher_terms() if getattr(self.weights, n) > 0)
            require(bool(self.distill.teacher_workdir), "distill.teacher_workdir",
                   f"required by loss.weights.{name} > 0")
        return self

    @model_validator(mode="after")
    def _pairs_alone(self) -> "Loss":
        pair = self.weights.pair_term
        if pair is not None:
            for name in ("ce", *LossWeights.teacher_terms(), *LossWeights.PAIR_TERMS):
                require(name == pair or getattr(self.weights, name) == 0, f"weights.{name}",
                       f"loss.weights.{pair} is a mean over preference pairs and does not mix "
                       f"with other terms; set --config.loss.weights.{name}=0")
        return self


class Quant(Section):
    """Integer quantization: fake-quantized weights (and activations) in training with a
    straight-through estimator (QAT); real integers for evaluation (PTQ). 0 bits = float."""
    KEY: ClassVar[str] = "quant"
    # The keys that say how stored integer weights read back (a QLoRA base, a quantized run).
    FORMAT_KEYS: ClassVar[tuple[str, ...]] = ("weight_bits", "weight_format", "granularity",
                                              "symmetric")
    weight_bits: Literal[0, 3, 4, 8] = 0  # 0 = float weights; 3 and 4 bits are stored in nibbles
    activation_bits: Literal[0, 8] = 0  # per token, dynamic range; 0 = float activations
    granularity: str = PER_CHANNEL  # per_channel | per_tensor | group size, e.g. "32"
    symmetric: bool = True
    # int: integers on a uniform grid; nf4: indices of the 16 NormalFloat-4 levels with
    # absmax scales that are themselves quantized to 8 bits (QLoRA); a stored format only.
    weight_format: Literal["int", "nf4"] = "int"
    # A quantized run (written by eval.py --quantize --save): its checkpoint holds these
    # weights as integers (or NF4 indices) plus scales; they are evaluated, drafted and
    # LoRA-tuned as stored, and never trained.
    ptq: bool = False

    @model_validator(mode="after")
    def _supported(self) -> "Quant":
        g = self.granularity
        require(not self.ptq or bool(self.weight_bits), "ptq",
               "marks a run whose weights are stored quantized; it needs quant.weight_bits "
               "(a quantized run is written by eval.py --quantize=... --save=NEW_RUN)")
        if self.weight_format == "nf4":
            require(self.weight_bits == 4, "weight_bits",
                   f"nf4 is a 4-bit format (got {self.weight_bits}): set quant.weight_bits=4")
            require(not self.activation_bits, "activation_bits",
                   "nf4 stores weights only; activation quantization needs an int weight "
                   "format (quant.weight_format=int, eval.py --quantize=int8|int4|int3)")
            require(self.symmetric, "symmetric",
                   "nf4 scales each block by its absmax and has no zero point: set "
                   "quant.symmetric=true (eval.py: drop --noquant_symmetric)")
        if g not in (PER_CHANNEL, PER_TENSOR):
            require(g.isdigit() and int(g) > 0, "granularity",
                   f"{g!r} is not per_channel, per_tensor or a positive group size")
            require(self.weight_bits not in (3, 4) or int(g) % 2 == 0, "granularity",
                   f"int{self.weight_bits} packs pairs of rows: group size {g} must be even")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.weight_bits or self.activation_bits)

    @property
    def group_size(self) -> int:
        """Inputs per scale: 0 = per channel (all of I), -1 = per tensor, else g."""
        if self.granularity == PER_CHANNEL:
            return 0
        if self.granularity == PER_TENSOR:
            return -1
        return int(self.granularity)

    def check_divides(self, model: Model) -> None:
        """A group size must divide the input features of every quantized matrix."""
        if self.group_size <= 0:
            return
        inputs = {"embed": model.d_model, "attn.o": model.num_heads * model.resolved_head_dim,
                  "mlp.down": model.d_ff}
        for name, size in inputs.items():
            require(size % self.group_size == 0, "quant.granularity",
                   f"group size {self.group_size} does not divide the {size} input features "
                   f"of {name}")


class Lora(Section):
    """Low-rank adapters (LoRA, Hu et al. 2021) on the named projections of every block:
    y = x W + (alpha / rank) * dropout(x) A B, A [in, rank] random, B [rank, out] zero. The
    base weights are frozen (no gradient, no optimizer state); with quant.weight_bits the
    frozen base is stored as integers (QLoRA-style). See docs/finetuning.md."""
    KEY: ClassVar[str] = "lora"
    rank: NonNegativeInt = 0  # 0 = off (every parameter trains)
    alpha: PositiveFloat = 16.0  # the adapters' output is scaled by alpha / rank
    dropout: UnitInterval = 0.0  # on the adapters' input, in training only
    # A subset of q, k, v, o (attention), gate, up, down (MLP); written "q,k,v,o" in
    # config files, on the command line and in config.json.
    targets: tuple[str, ...] = ("q", "k", "v", "o")

    @field_validator("targets", mode="before")
    @classmethod
    def _known_targets(cls, value: Any) -> tuple[str, ...]:
        text = value if isinstance(value, str) else ",".join(map(str, value))
        names = [t.strip() for t in text.split(",") if t.strip()]
        require(bool(names), "", f"no projection named; choose from {list(LORA_TARGETS)}")
        for name in names:
            require(name in LORA_TARGETS, "", f"unknown target {name!r}; choose from "
                                             f"{list(LORA_TARGETS)}")
        require(len(set(names)) == len(names), "", f"a target is named twice in {text!r}")
        return tuple(names)

    @field_serializer("targets")
    def _as_text(self, targets: tuple[str, ...]) -> str:
        return ",".join(targets)

    @property
    def scale(self) -> float:
        """The factor of the adapters' output."""
        return self.alpha / self.rank

    def check_model(self, model: "Model") -> None:
        """Every target must exist in `model`; experts have no adapters."""
        if not self.rank:
            return
        mlp = [t for t in self.targets if t in MLP_TARGETS]
        require(not (mlp and model.moe.num_experts), "lora.targets",
               f"{','.join(mlp)}: adapters on MoE expert projections are not supported; "
               "target the attention projections (q,k,v,o) of an MoE model")
        require("gate" not in mlp or model.mlp == "swiglu", "lora.targets",
               f"'gate' is not in this model: model.mlp={model.mlp!r} has no gate projection")


def parse_pattern(text: str) -> tuple[int, int] | None:
    """`unstructured` -> None; `N:M` -> (N, M) with 0 < N < M; ConfigError otherwise."""
    if text == "unstructured":
        return None
    n, sep, m = text.partition(":")
    require(bool(sep) and n.isdigit() and m.isdigit(), "",
           f"{text!r} is not unstructured or N:M (e.g. 2:4)")
    require(0 < int(n) < int(m), "", f"{text}: N:M keeps N of every M inputs and needs "
                                    f"0 < N < M")
    return int(n), int(m)


class Prune(Section):
    """Magnitude pruning of the Transformer's linear weights (attention q, k, v, o, the MLP,
    MoE experts; not embeddings, norms or biases; the untied output head with
    include_head). Masks are part of the train state: a pruned weight stays exactly zero
    through every update and resume. Pruning at step t happens before update t + 1, on
    the parameters after t updates. See docs/pruning.md."""
    KEY: ClassVar[str] = "prune"
    sparsity: UnitInterval = 0.0  # final fraction of zeros, in [0, 1); 0 = off
    # unstructured: the smallest |w| of each matrix (scope=layer) or of all of them
    # (scope=global); N:M: of every M consecutive inputs of an output, the N largest stay
    # (sparsity must be 1 - N/M).
    pattern: str = "unstructured"
    scope: Literal["layer", "global"] = "layer"
    # oneshot: prune once at start_step; cubic: Zhu & Gupta 2017, every `every` steps from
    # start_step to end_step, s_t = s + (s_i - s)(1 - (t - start_step) / (end_step -
    # start_step))^3.
    schedule: Literal["oneshot", "cubic"] = "oneshot"
    initial_sparsity: UnitInterval = 0.0  # cubic: s_i, at most sparsity
    start_step: NonNegativeInt = 0
    end_step: NonNegativeInt = 0  # cubic: the last pruning step, after start_step
    every: PositiveInt = 100  # cubic: steps between pruning steps
    include_head: bool = False  # also prune an untied lm_head

    @field_validator("pattern")
    @classmethod
    def _known_pattern(cls, value: str) -> str:
        parse_pattern(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Prune":
        nm = self.nm
        if nm is not None and self.enabled:
            require(abs(self.sparsity - (1 - nm[0] / nm[1])) < 1e-6, "sparsity",
                   f"{self.pattern} sets {1 - nm[0] / nm[1]:g} of each matrix to zero: set the "
                   f"sparsity to {1 - nm[0] / nm[1]:g}")
            require(self.scope == "layer", "scope",
                   f"{self.pattern} keeps N of every M inputs inside each matrix: global "
                   "is for unstructured pruning; set the scope to layer")
            require(self.schedule == "oneshot", "schedule",
                   f"{self.pattern} has the one sparsity 1 - N/M; a cubic schedule ramps "
                   "unstructured sparsity: set prune.schedule=oneshot")
        if self.schedule == "cubic" and self.enabled:
            require(self.end_step > self.start_step, "end_step",
                   f"{self.end_step} must be after start_step {self.start_step}")
            require(self.initial_sparsity <= self.sparsity, "initial_sparsity",
                   f"{self.initial_sparsity} is above the final sparsity {self.sparsity}")
        return self

    @property
    def enabled(self) -> bool:
        return self.sparsity > 0

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) of an N:M pattern; None for unstructured."""
        return parse_pattern(self.pattern)

    def check_model(self, model: "Model", expert_d_ff: int, key: str = "prune.pattern"
                    ) -> None:
        """M must divide the input features of every pruned matrix (`key`: the key or
        flag an error names)."""
        nm = self.nm
        if not self.enabled or nm is None:
            return
        inputs = {"attn.q/k/v, mlp.gate/up": model.d_model,
                  "attn.o": model.num_heads * model.resolved_head_dim, "mlp.down": model.d_ff}
        if model.moe.num_experts:
            inputs["experts' down"] = expert_d_ff
        for name, size in inputs.items():
            require(size % nm[1] == 0, key,
                   f"{self.pattern} groups {nm[1]} inputs, which does not divide the {size} "
                   f"input features of {name}")


class Data(Section):
    """The corpus, its tokenizer, and how training rows are cut from it (docs/data.md)."""
    KEY: ClassVar[str] = "data"
    # A text file, a directory of text files (concatenated) or a directory prepared by
    # `python -m jaxlm.data.prepare`; "" = the embedded tiny-Shakespeare corpus.
    path: str = ""
    # char | byte | bpe | hf:PATH (a tokenizer.json, or a directory holding one) |
    # sentencepiece:PATH (a .model file) | from:DIR (exactly the tokenizer of a run directory
    # or a prepared directory; text it lacks a character of is refused). A prepared
    # data.path must have been made with it.
    tokenizer: TokenizerSpec = "char"
    vocab_size: BpeVocabSize = 4096  # bpe: ids of the BPE trained on path
    # windows: random windows of the token stream; documents: whole documents packed into
    # rows, with no attention and no loss across documents.
    packing: Packing = "windows"
    # "DIR:WEIGHT,DIR:WEIGHT,...": prepared directories sampled by weight, instead of path.
    mixture: MixtureSpec = ""
    val_fraction: ValFraction = 0.1
    prefetch: NonNegativeInt = 2

    @model_validator(mode="after")
    def _one_corpus(self) -> "Data":
        require(not (self.mixture.strip() and self.path), "mixture",
               "set data.path or data.mixture, not both")
        return self


class Init(Section):
    """Where a new run's parameters start: a fresh random init, or another run's checkpoint
    (any mesh; resharded onto this run's) with a fresh optimizer at step 0. Once the run
    has checkpoints of its own, it resumes from those."""
    KEY: ClassVar[str] = "init"
    from_workdir: str = ""  # a run directory (trained here, or imported with convert.py)
    step: NonNegativeInt = 0  # its checkpoint step; 0 = its latest


class Sampling(Section):
    """How generation picks each token (the same rules for plain and speculative decoding)."""
    temperature: NonNegativeFloat = 0.0  # 0 = greedy
    top_k: NonNegativeInt = 0  # keep the k most likely tokens; 0 = all
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0  # nucleus mass; 1 = off

    def check_prompts(self, prompts: list[list[int]], context: int) -> None:
        """Every prompt has at least one token and fits the model's context."""
        require(bool(prompts) and all(len(p) for p in prompts), "prompt",
               "every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        require(longest <= context, "prompt", f"a prompt of {longest} tokens is longer than the "
                                             f"model's context of {context} tokens (seq_len)")


class Grpo(Section):
    """Online RL with verifiable rewards: GRPO on prompts sampled by the policy itself
    (docs/alignment.md#grpo). Each step samples `group_size` completions of
    batch_size / group_size prompts: train.batch_size is the completions per step."""
    KEY: ClassVar[str] = "grpo"
    prompts: str = ""  # JSON lines {"prompt", "answer"}; "" = no GRPO
    group_size: Annotated[int, Field(ge=2)] = 4  # completions per prompt (G)
    max_new_tokens: PositiveInt = 8  # completion length limit (END stops one earlier)
    temperature: PositiveFloat = 1.0  # sampling, and the log-probabilities of the loss
    top_k: NonNegativeInt = 0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    epsilon: Annotated[float, Field(gt=0, lt=1)] = 0.2  # ratio clip: [1 - eps, 1 + eps]
    beta: NonNegativeFloat = 0.04  # k3 KL penalty to the reference; 0 = no reference
    # "NAME[:WEIGHT],...": reward functions of training/rewards.py, summed with weights.
    rewards: str = "exact_match"

    @field_validator("rewards")
    @classmethod
    def _reward_syntax(cls, text: str) -> str:
        items = [s.strip() for s in text.split(",") if s.strip()]
        require(bool(items), "", "name at least one reward function, e.g. exact_match")
        for item in items:
            name, _, weight = item.partition(":")
            ok = bool(name.strip()) and (not weight or _is_float(weight))
            require(ok, "", f"{item!r} is not NAME or NAME:WEIGHT")
        return text

    @property
    def reward_weights(self) -> dict[str, float]:
        """{reward function name: weight}, in the order given."""
        out = {}
        for item in filter(None, (s.strip() for s in self.rewards.split(","))):
            name, _, weight = item.partition(":")
            out[name.strip()] = float(weight) if weight else 1.0
        return out

    @property
    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------------------
# The whole config.

SECTIONS: dict[str, type[Section]] = {
    "train": Train, "updates": Updates, "intervals": Intervals, "pipeline": Pipeline,
    "mesh": Mesh, "sharding": Sharding, "model": Model, "loss": Loss, "quant": Quant,
    "data": Data, "init": Init, "optimizer": Optimizer, "log": Log, "profile": Profile,
    "lora": Lora, "prune": Prune, "grpo": Grpo,
}


_NOTICES_SHOWN: set[str] = set()


def _scale_default_warmup(values: dict[str, Any]) -> dict[str, Any]:
    """A run shorter than the default warm-up warms up for a tenth of its steps instead
    (with one notice); a warm-up the user set longer than the run stays an error."""
    default = Updates.model_fields["warmup_steps"].default
    steps, warmup = values.get("steps"), values.get("warmup_steps", default)
    if not (isinstance(steps, int) and not isinstance(steps, bool) and warmup == default
            and 0 < steps < default):
        return values
    scaled = steps // 10
    notice = (f"warmup_steps: the default {default} warm-up steps are more than steps "
              f"{steps}; warming up for {scaled} steps")
    if notice not in _NOTICES_SHOWN:
        _NOTICES_SHOWN.add(notice)
        print(notice, file=sys.stderr)
    return {**values, "warmup_steps": scaled}


class Config(BaseModel):
    """A run's resolved, validated config: one frozen section per concern."""

    model_config = PydanticConfig(frozen=True, extra="forbid")
    name: str = "base"
    train: Train = Train()
    updates: Updates = Updates()
    intervals: Intervals = Intervals()
    pipeline: Pipeline = Pipeline()
    mesh: Mesh = Mesh()
    sharding: Sharding = Sharding()
    model: Model = Model()
    loss: Loss = Loss()
    quant: Quant = Quant()
    data: Data = Data()
    init: Init = Init()
    optimizer: Optimizer = Optimizer()
    log: Log = Log()
    profile: Profile = Profile()
    lora: Lora = Lora()
    prune: Prune = Prune()
    grpo: Grpo = Grpo()

    @classmethod
    def from_dict(cls, config: Any) -> "Config":
        """Resolve a ConfigDict (or a nested dict, e.g. a run's config.json)."""
        if isinstance(config, Config):
            return config
        values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        values = _scale_default_warmup(upgrade(values))
        top_level = {"name"}
        sections = {}
        for attr, section in SECTIONS.items():
            if section.KEY:
                node = values.get(section.KEY, {})
                if not isinstance(node, Mapping):
                    raise ConfigError(section.KEY, "is a section, not a value")
                sections[attr] = section.parse(node)
                top_level.add(section.KEY)
            else:
                own = section.config_keys()
                sections[attr] = section.parse({k: values[k] for k in own if k in values})
                top_level.update(own)
        for key in values:
            if key not in top_level:
                raise keys.unknown_key(_defaults_tree(), key)
        name = values.get("name", "base")
        if not isinstance(name, str):
            raise ConfigError("name", f"must be a string, got {name!r}")
        try:
            return cls(name=name, **sections)
        except ValidationError as e:
            raise _config_error(cls, "", e) from None

    def to_dict(self) -> dict[str, Any]:
        """The ConfigDict layout (what `config.json` holds)."""
        out: dict[str, Any] = {"name": self.name}
        for attr, section in SECTIONS.items():
            values = getattr(self, attr).to_dict()
            if section.KEY:
                out[section.KEY] = values
            else:
                out.update(values)
        return out

    @model_validator(mode="after")
    def _across_sections(self) -> "Config":
        require(self.updates.warmup_steps <= self.train.steps, "warmup_steps",
               f"{self.updates.warmup_steps} warm-up steps are more than steps "
               f"{self.train.steps}")
        self.quant.check_divides(self.model)
        self.lora.check_model(self.model)
        self._check_prune()
        if self.lora.rank:
            require(self.mesh.pipeline == 1, "lora.rank",
                   "LoRA is not supported with pipeline parallelism (mesh.pipeline > 1)")
            require(not self.quant.activation_bits, "lora.rank",
                   "LoRA trains float adapters on a frozen base; quant.activation_bits "
                   "(quantization-aware training) does not apply")
            require(not self.quant.ptq, "quant.ptq",
                   "marks a quantized run written by eval.py --save; a LoRA run takes such a "
                   "run's integers as its frozen base through init.from_workdir: drop "
                   "quant.ptq")
        else:
            require(self.quant.weight_format == "int" or self.quant.ptq, "quant.weight_format",
                   "nf4 is the stored format of a QLoRA base (lora.rank > 0) or of eval.py "
                   "--quantize=nf4; quantization-aware training fake-quantizes integers: "
                   "set quant.weight_format=int")
        if self.profile.num_steps:
            require(self.profile.start_step <= self.train.steps, "profile.start_step",
                   f"{self.profile.start_step} is beyond steps {self.train.steps}: nothing "
                   "would be traced")
        if self.model.position == "learned":
            require(self.train.seq_len <= self.model.max_positions, "seq_len",
                   f"{self.train.seq_len} is longer than the {self.model.max_positions} "
                   "learned positions (model.max_positions)")
        require(self.data.packing == "windows" or self.train.seq_len >= 2, "seq_len",
               f"packing=documents needs seq_len >= 2, got {self.train.seq_len}: a row of one "
               f"token has no context inside a document")
        moe = self.model.moe
        weights = list(self.loss.weights.to_dict().values())
        if moe.num_experts:
            weights += [moe.load_balance_weight, moe.z_loss_weight]
        require(any(w > 0 for w in weights) or bool(self.grpo.prompts), "loss.weights",
               "every term has weight 0: nothing to optimize")
        self._check_pairs()
        self._check_grpo()
        if moe.num_experts and moe.group_size:
            g, length = moe.group_size, self.train.seq_len
            require(length % g == 0 or g % length == 0, "model.moe.group_size",
                   f"{g} tokens neither divide seq_len {length} nor are a multiple of it")
        return self

    def _check_prune(self) -> None:
        """Pruning fits the model and the run: its steps happen, and LoRA's merged
        weights would not keep the zeros."""
        prune = self.prune
        if not prune.enabled:
            return
        moe = self.model.moe
        prune.check_model(self.model, moe.d_ff or self.model.d_ff)
        require(not self.lora.rank, "prune.sparsity",
               "prunes the trained weights; with lora.rank > 0 they are a frozen base and "
               "the merged adapters are dense: prune without LoRA")
        require(prune.start_step < self.train.steps, "prune.start_step",
               f"{prune.start_step} is not before steps {self.train.steps}: nothing would "
               "be pruned")
        if prune.schedule == "cubic":
            require(prune.end_step < self.train.steps, "prune.end_step",
                   f"{prune.end_step} is not before steps {self.train.steps}: the final "
                   "sparsity would not be reached")

    def _check_pairs(self) -> None:
        """A preference run: whole pairs in every micro-batch and a reference to compare
        with (SimPO needs none; a LoRA run's is its own base)."""
        if self.loss.weights.pair_term is None:
            return
        rows = 2 * self.train.grad_accum_steps
        require(self.train.batch_size % rows == 0, "batch_size",
               f"{self.train.batch_size} rows do not split into (chosen, rejected) pairs in "
               f"each of {self.train.grad_accum_steps} micro-batches: use a multiple of {rows}")
        require(self.train.eval_batch_size % 2 == 0, "eval_batch_size",
               f"{self.train.eval_batch_size} rows do not split into (chosen, rejected) pairs")
        dpo = self.loss.dpo
        if self.loss.weights.dpo and dpo.needs_reference and not self.lora.rank:
            require(bool(dpo.reference_workdir or self.init.from_workdir),
                   "loss.dpo.reference_workdir", f"loss_type={dpo.loss_type!r} compares with a "
                   "frozen reference run: set it, or init.from_workdir (its default)")

    def _check_grpo(self) -> None:
        """A GRPO run: whole groups per step, its loss alone, a reference for the KL."""
        g = self.grpo
        if not g.prompts:
            return
        require(self.train.batch_size % g.group_size == 0, "grpo.group_size",
               f"{g.group_size} completions per prompt do not divide batch_size "
               f"{self.train.batch_size} (the completions sampled per step)")
        for name, weight in self.loss.weights.to_dict().items():
            require(weight == 0, f"loss.weights.{name}",
                   f"grpo.prompts trains on GRPO's policy-gradient loss alone; set "
                   f"--config.loss.weights.{name}=0")
        if g.beta > 0 and not self.lora.rank:
            require(bool(self.loss.dpo.reference_workdir or self.init.from_workdir),
                   "grpo.beta", "the KL penalty compares with a frozen reference run: set "
                   "init.from_workdir (the default reference) or loss.dpo.reference_workdir, "
                   "or grpo.beta=0")

    def replace(self, **overrides: Any) -> "Config":
        """A copy with dotted ConfigDict keys overridden, validated again."""
        values = self.to_dict()
        for key, value in overrides.items():
            keys.set_value(values, key, value)
        return Config.from_dict(values)


def _defaults_tree() -> dict[str, Any]:
    """Every default key (for "did you mean")."""
    return Config().to_dict()


def _config_error(section: type[BaseModel], prefix: str, error: ValidationError) -> ConfigError:
    """The first error of validating `section` as one ConfigError naming its key."""
    return config_error(section, prefix, error.errors()[0],
                        lambda key: keys.unknown_key(_defaults_tree(), key))
