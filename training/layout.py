"""The checks that need the devices or the data: one step, before anything compiles.

`configs/sections.py` checks each config on its own; this module checks it against the
mesh it will run on, the data it will read and the teacher it will distil from:
mesh sizes vs devices, the attention kernel vs the platform, batch sizes vs the
data-parallel size and the processes, the pipeline schedule, the sequence split (context
parallelism) vs the sequence length, the attention and the MoE groups, MoE capacity groups
vs each device's tokens, every sharded dimension vs its mesh axes, sequence length and
packing vs the data, vocabularies. The first problem raises
ConfigError naming the key to change.
"""

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Config, Mesh as MeshSection
from jaxlm.data.mixture import Mixture
from jaxlm.data.packing import resolve_packing
from jaxlm.data.pipeline import TokenData
from jaxlm.models.config import ModelConfig, first_model_difference
from jaxlm.models.attention import IMPL_PLATFORMS
from jaxlm.parallel.context import BLOCK_IMPLS
from jaxlm.parallel.sharding import (Rules, indivisible_dims, logical_to_spec, mesh_axes_of,
                                     mesh_axes_size)


def resolve_mesh_shape(mesh: MeshSection, num_devices: int) -> dict[str, int]:
    """Sizes per mesh axis for `num_devices`, the one -1 (if any) taking the devices left.
    The section holds no 0 and at most one -1 (configs/sections.py `Mesh`)."""
    sizes = mesh.sizes()
    wild = [n for n, s in sizes.items() if s == -1]
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if wild:
        if num_devices % fixed:
            raise ConfigError(f"mesh.{wild[0]}",
                              f"-1 cannot fill the mesh: {num_devices} devices are not "
                              f"divisible by the other axes' product {fixed}")
        sizes[wild[0]] = num_devices // fixed
    product = math.prod(sizes.values())
    if product != num_devices:
        shape = " x ".join(f"{n}={s}" for n, s in sizes.items() if s != 1) or "all 1"
        raise ConfigError("mesh", f"mesh product {product} ({shape}) != device count "
                                  f"{num_devices}")
    return sizes


def pipeline_fields(config: Config, mesh: Mesh) -> dict[str, int]:
    """ModelConfig fields for the pipeline schedule on `mesh` (empty without a pipeline)."""
    stages = mesh.shape["pipeline"]
    if stages == 1:
        return {}
    return {"pipeline_stages": stages,
            "pipeline_microbatches": config.pipeline.microbatches or stages,
            "pipeline_repeats": config.pipeline.repeats}


def check_layout(config: Config, mesh: Mesh, data: Mixture, model_cfg: ModelConfig,
                 params: Any, param_axes: Any, teacher: Any = None,
                 process_count: int | None = None) -> None:
    """Raise ConfigError for the first way `config` does not fit the mesh, data or teacher.

    `params`/`param_axes`: the model's abstract parameters and their logical axes;
    `teacher`: a `training.teacher.Teacher` when the objective distils from one or
    compares with a reference run (a LoRA run's own base, `from_state`, needs no check).
    """
    rules = config.sharding.rules
    teacher = None if getattr(teacher, "from_state", False) else teacher
    _check_context(config, mesh, rules, teacher)
    _check_platform(config, mesh)
    _check_batch(config, mesh, rules, jax.process_count() if process_count is None
                 else process_count)
    _check_pipeline(config, mesh, rules, model_cfg)
    _check_moe_groups(config, mesh, rules)
    _check_data(config, data)
    _check_model_split(config, mesh, rules)
    _check_divisible(params, param_axes, mesh, rules, "parameter")
    if teacher is not None:
        _check_teacher(config, data, model_cfg, teacher, mesh)


def _check_platform(config: Config, mesh: Mesh) -> None:
    impl = config.model.attention_impl
    platform = mesh.devices.flat[0].platform
    allowed, hint = IMPL_PLATFORMS.get(impl, ((platform,), ""))
    if platform not in allowed:
        raise ConfigError("model.attention_impl",
                          f"{impl!r} cannot run on {platform} devices: {hint}")


def _check_batch(config: Config, mesh: Mesh, rules: Rules, process_count: int) -> None:
    train = config.train
    dp = mesh_axes_size(mesh, "act_batch", rules)
    micro = train.batch_size // train.grad_accum_steps
    if micro % dp:
        what = "batch_size" if train.grad_accum_steps == 1 else \
            f"batch_size / grad_accum_steps = {micro}"
        axes = " x ".join(mesh_axes_of("act_batch", rules))
        raise ConfigError("batch_size", f"{what} is not divisible by the data-parallel size "
                                        f"{dp} (mesh {axes}, the axes of act_batch)")
    if train.eval_batch_size % dp:
        raise ConfigError("eval_batch_size", f"{train.eval_batch_size} is not divisible by "
                                             f"the data-parallel size {dp}")
    for key, batch in (("batch_size", train.batch_size),
                       ("eval_batch_size", train.eval_batch_size)):
        if batch % process_count:
            raise ConfigError(key, f"{batch} is not divisible by the {process_count} processes")


def _check_pipeline(config: Config, mesh: Mesh, rules: Rules, model_cfg: ModelConfig) -> None:
    stages = mesh.shape["pipeline"]
    if stages == 1:
        return
    repeats = config.pipeline.repeats
    micro = config.pipeline.microbatches or stages
    if not config.model.scan_layers:
        raise ConfigError("model.scan_layers", "pipeline parallelism needs scanned layers "
                                               "(model.scan_layers=True)")
    units = model_cfg.num_units  # the pipeline splits scanned units (of `moe.every` layers)
    if units % (stages * repeats):
        raise ConfigError("model.num_layers", f"{units} scanned layers are not divisible "
                                              f"by pipeline stages x repeats = {stages} x "
                                              f"{repeats}")
    if repeats > 1 and micro < stages:
        raise ConfigError("pipeline_microbatches", f"the circular schedule needs at least "
                                                   f"as many micro-batches as stages "
                                                   f"({micro} < {stages})")
    dp = mesh_axes_size(mesh, "act_batch", rules)
    train = config.train
    for key, batch in (("batch_size", train.batch_size // train.grad_accum_steps),
                       ("eval_batch_size", train.eval_batch_size)):
        if batch % micro or (batch // micro) % dp:
            raise ConfigError("pipeline_microbatches",
                              f"{micro} micro-batches do not split {key} {batch} into "
                              f"micro-batches divisible by the data-parallel size {dp}")
    for name in ("feature", "reward"):
        if getattr(config.loss.weights, name) > 0:
            raise ConfigError(f"loss.weights.{name}", "needs the model's hidden states, which "
                                                      "pipelined layers do not return; use "
                                                      "mesh.pipeline=1")


def sequence_split(mesh: Mesh, rules: Rules) -> tuple[tuple[str, ...], int]:
    """(mesh axes, devices) that split each sequence: the length of a [B, L] batch array."""
    axes = logical_to_spec(("act_batch", "act_len"), rules)[1]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return axes, math.prod(mesh.shape[a] for a in axes)


def _check_context(config: Config, mesh: Mesh, rules: Rules, teacher: Any) -> None:
    """A split sequence: 2 zig-zag chunks per device, attention that works block by block,
    MoE capacity groups inside one chunk; a context axis that some rule uses."""
    used = {a for _, axes in rules for a in ((axes,) if isinstance(axes, str) else axes or ())}
    if mesh.shape["context"] > 1 and "context" not in used:
        raise ConfigError("mesh.context", f"{mesh.shape['context']} devices would split "
                                          "nothing: no sharding rule maps a logical axis to "
                                          "'context' (the default is ('act_len', 'context'))")
    axes, n = sequence_split(mesh, rules)
    if n == 1:
        return
    split = f"{n} devices ({' x '.join(f'{a}={mesh.shape[a]}' for a in axes)})"
    length = config.train.seq_len
    if length % (2 * n):
        raise ConfigError("seq_len", f"{length} is not divisible by 2 x {n} = {2 * n}: the "
                                     f"sequence is split over {split}, two chunks each")
    impls = [("model.attention_impl", "", config.model.attention_impl)]
    if teacher is not None:
        impls.append((teacher.key, f"the {teacher.role}'s attention_impl ",
                      teacher.config.model.attention_impl))
    for key, whose, impl in impls:
        if impl not in BLOCK_IMPLS:
            raise ConfigError(key, f"{whose}{impl!r} cannot attend across a sequence split "
                                   f"over {split}; use one of {list(BLOCK_IMPLS)}")
    moe, chunk = config.model.moe, length // (2 * n)
    if moe.num_experts and moe.capacity_factor > 0 and (not moe.group_size
                                                        or chunk % moe.group_size):
        groups = f"{moe.group_size} tokens" if moe.group_size else "one sequence (0)"
        raise ConfigError("model.moe.group_size",
                          f"capacity groups of {groups} straddle devices: the sequence is "
                          f"split over {split} in chunks of {chunk} tokens; use a divisor "
                          f"of {chunk}")


def _check_moe_groups(config: Config, mesh: Mesh, rules: Rules) -> None:
    """A capacity group of several sequences must not straddle devices or micro-batches:
    each device's rows of a micro-batch hold a whole number of groups."""
    moe, train = config.model.moe, config.train
    if not moe.num_experts or moe.capacity_factor <= 0 or moe.group_size <= train.seq_len:
        return  # groups within one sequence (seq_len % group_size == 0 is checked statically)
    dp = mesh_axes_size(mesh, "act_batch", rules)
    micro = (config.pipeline.microbatches or mesh.shape["pipeline"]) \
        if mesh.shape["pipeline"] > 1 else 1
    for key, batch in (("batch_size", train.batch_size // train.grad_accum_steps),
                       ("eval_batch_size", train.eval_batch_size)):
        rows = batch // (micro * dp)
        tokens = rows * train.seq_len
        if tokens % moe.group_size:
            raise ConfigError("model.moe.group_size",
                              f"{moe.group_size} tokens do not divide the {tokens} tokens a "
                              f"device holds per micro-batch of {key} ({rows} "
                              f"row{'s' if rows != 1 else ''} x seq_len {train.seq_len}): a "
                              f"group would straddle devices")


def _check_data(config: Config, data: Mixture) -> None:
    """Windows need seq_len + 1 tokens in each split they read; packed documents need a
    document of 2 or more tokens there (a target), and SFT examples must fit in seq_len.
    Every source has a validation split."""
    seq_len, packing = config.train.seq_len, resolve_packing(config.data.packing, data)
    check_examples_fit(data, seq_len)
    for _, source, weight in data.named():
        for split in ("train", "val") if weight > 0 else ("val",):
            tokens = source.tokens(split)
            if packing == "windows" and len(tokens) < seq_len + 1:
                raise ConfigError("seq_len", f"seq_len {seq_len} is longer than the {split} "
                                             f"split ({len(tokens)} tokens) of {source.path}")
            if packing == "documents":
                check_documents(source, split, data.key)
    _check_preference(config, data)
    vocab = config.model.vocab_size
    if vocab and vocab < data.vocab_size:
        raise ConfigError("model.vocab_size", f"{vocab} is smaller than the data's vocabulary "
                                              f"{data.vocab_size}")


def _check_preference(config: Config, data: Mixture) -> None:
    """A preference objective reads one preference set, and a preference set is read by
    one: its rows are pairs."""
    preference = [source.is_preference for source in data.sources]
    pair = config.loss.weights.pair_term
    if pair is not None and not (preference == [True]):
        raise ConfigError(data.key, f"loss.weights.{pair} trains on (chosen, rejected) pairs "
                                    "of one preference set: prepare it with python -m "
                                    "jaxlm.data.prepare --format=preference")
    if any(preference) and pair is None:
        raise ConfigError("loss.weights.dpo", f"{data.key} holds preference pairs: train on "
                                              "them with --config.loss.weights.dpo=1 (or "
                                              "reward=1) --config.loss.weights.ce=0")


def check_documents(source: TokenData, split: str, key: str) -> None:
    """ConfigError naming `key` when `split` of `source` has no document of 2 or more
    tokens: packed documents would have no target."""
    if not np.any(np.diff(source.docs(split)) >= 2):
        raise ConfigError(key, f"the {split} split of {source.path} has no document of 2 or "
                               f"more tokens")


def check_examples_fit(data: Mixture, seq_len: int,
                       splits: tuple[str, ...] = ("train", "val")) -> None:
    """ConfigError when an SFT example has more than seq_len targets: examples are packed
    whole, never cut into pieces."""
    for source in data.sources:
        if not source.is_sft:
            continue
        for split in splits:
            lengths = np.diff(source.docs(split))
            longest = int(lengths.max()) - 1 if len(lengths) else 0
            if longest > seq_len:
                raise ConfigError("seq_len", f"{seq_len} is shorter than the longest "
                                             f"example of {source.path} ({split} split: "
                                             f"{longest} targets); examples are never "
                                             f"split: use seq_len >= {longest}, or prepare "
                                             f"the set again with --seq_len={seq_len}")


def _check_model_split(config: Config, mesh: Mesh, rules: Rules) -> None:
    """Tensor-parallel sizes must divide heads, KV heads and d_ff (KV heads are not
    replicated: with fewer KV heads than tensor shards, the config is rejected), and the
    expert-parallel size must divide the number of experts."""
    m = config.model
    checks = [("model.num_heads", m.num_heads, "heads"),
              ("model.num_kv_heads", m.num_kv_heads, "kv_heads"),
              ("model.d_ff", m.d_ff, "mlp")]
    if m.moe.num_experts:
        checks.append(("model.moe.num_experts", m.moe.num_experts, "experts"))
    for key, value, axis in checks:
        shards = mesh_axes_size(mesh, axis, rules)
        if value % shards:
            raise ConfigError(key, f"{value} is not divisible by the {shards} shards of "
                                   f"logical axis {axis!r} (mesh tensor={mesh.shape['tensor']}, "
                                   f"expert={mesh.shape['expert']})")


def _check_divisible(params: Any, param_axes: Any, mesh: Mesh, rules: Rules,
                     what: str) -> None:
    for where, dim, name, size, axes, shards in indivisible_dims(params, param_axes, mesh,
                                                                 rules):
        raise ConfigError("mesh", f"{what} {where} dimension {dim} ({name}={size}) is not "
                                  f"divisible by mesh axes {'x'.join(axes)}={shards}")


def _check_teacher(config: Config, data: Mixture, model_cfg: ModelConfig, teacher: Any,
                   mesh: Mesh) -> None:
    key, role = teacher.key, teacher.role
    s_tok, t_tok = data.tokenizer.to_dict(), teacher.tokenizer.to_dict()
    student = "student" if role == "teacher" else "policy"
    if s_tok != t_tok or teacher.model_cfg.vocab_size != model_cfg.vocab_size:
        raise ConfigError(key, f"vocabulary mismatch: the {role} has "
                               f"{teacher.model_cfg.vocab_size} tokens ({t_tok['kind']} "
                               f"tokenizer), the {student} {model_cfg.vocab_size} "
                               f"({s_tok['kind']} tokenizer); they must be the same")
    if role == "reference":
        diff = first_model_difference(config.model, teacher.config.model)
        if diff is not None:
            name, ours, theirs = diff
            raise ConfigError(key, f"model.{name} is {ours!r} here but {theirs!r} in the "
                                   f"reference {teacher.workdir}; DPO compares one model "
                                   "with its own frozen copy")
    _check_divisible(teacher.abstract_params, teacher.param_axes, mesh, teacher.rules,
                     f"{role} parameter")
    if config.loss.weights.feature > 0:
        config.loss.feature.layer_pairs(config.model.num_layers,
                                        teacher.model_cfg.model.num_layers)

