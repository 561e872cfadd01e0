"""The training objective: a weighted sum of registered loss terms.

    loss = sum_name  loss.weights.<name> * term_<name>(model outputs, batch, teacher outputs)

Every term is registered here, in one place, with `@register_term(name)`. Its builder
reads its own (already validated) config section and returns a `Term`: a
function that returns the *sum over tokens* of its per-token loss, weighted by the
batch's token weights. The train step divides the weighted sum of all terms by the
total token weight, so gradient accumulation over micro-batches stays exact. A term
defined per batch rather than per token (e.g. a router load-balancing loss) returns its
value times `inputs.token_count`. A term over preference pairs (`unit="pair"`, DPO)
returns the sum of its per-pair loss instead, and the objective then counts pairs: such
terms do not mix with per-token ones (configs/sections.py refuses the mix). A term may
also return `(sum, {metric: sum})`: its metrics are logged as given, divided like the
loss.

A term weight of 0 (the default for all but `ce`) means the term is not built and not
computed. Each computed term is reported as `loss/<name>` (unweighted, per token), next
to `loss`, the weighted total that is optimized. A term may also own parameters (e.g.
the feature-distillation projection): they live in the train state under
`params["objective"][<name>]`, are trained with the model and saved in its checkpoints.

To add a term: declare `loss.weights.<name>` (a `TeacherTermWeight` when it distils from a
teacher; any options with their limits) in `configs/sections.py` and register a builder below (or in a module imported here). A term
may take its weight from another key: the MoE router losses are the terms
`moe_load_balance` and `moe_z_loss`, weighted by `model.moe.load_balance_weight` and
`model.moe.z_loss_weight`, computed for MoE models only.
"""

from collections.abc import Callable
import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxlm.configs.sections import Config, LossWeights
from jaxlm.losses.cross_entropy import cross_entropy
from jaxlm.losses.distill import distill_loss, feature_loss
from jaxlm.losses.grpo import temperature_logps, token_losses as grpo_token_losses
from jaxlm.losses.preference import (pair_losses, pairs, reward_values,
                                     token_kl, token_logps)

OBJECTIVE_PARAMS = "objective"  # key of the objective's own parameters in the params dict


class TermInputs(NamedTuple):
    outputs: Any  # the student's models.Output (logits [B, L, V], hidden [layers, B, L, D])
    batch: dict[str, jax.Array]  # inputs, targets, optional weights and segment_ids
    teacher: Any  # the teacher's Output (gradient-free), or None
    params: Any  # this term's parameters, or None
    step: jax.Array  # int32: the optimizer update being computed
    weights: jax.Array | None  # [B, L] token weights (None = all tokens count)
    token_count: jax.Array  # sum of the token weights


@dataclasses.dataclass(frozen=True)
class Term:
    loss: Callable[[TermInputs], jax.Array]  # -> weighted sum over tokens
    weight: Callable[[jax.Array], jax.Array] | None = None  # schedule; None = config weight
    needs_hidden: bool = False  # student (and teacher) block outputs
    init_params: Callable[[jax.Array], Any] | None = None  # rng key -> parameters
    param_axes: Any = None  # logical PartitionSpecs, like init_params' output
    scalars: Callable[[jax.Array], dict[str, jax.Array]] | None = None  # extra metrics
    unit: str = "token"  # what the loss sums over: "token", or "pair" (rows 2i, 2i+1)


@dataclasses.dataclass(frozen=True)
class BuildContext:
    config: Config  # the run's config
    model_cfg: Any  # the student's ModelConfig
    teacher_cfg: Any = None  # the teacher's ModelConfig, for terms that need a teacher


@dataclasses.dataclass(frozen=True)
class TermSpec:
    build: Callable[[BuildContext], Term]
    needs_teacher: bool
    weight: Callable[[Config], float]  # the term's weight in a config
    applies: Callable[[Config], bool]  # whether the term exists for this model
    reference: Callable[[Config], bool]  # whether it compares with a frozen reference model


TERMS: dict[str, TermSpec] = {}


def register_term(name: str, *, weight: Callable[[Config], float] | None = None,
                  applies: Callable[[Config], bool] = lambda config: True,
                  reference: Callable[[Config], bool] = lambda config: False):
    """Register a term's builder. Its weight is `loss.weights.<name>` (whose type says
    whether it needs a teacher) unless `weight` reads another key (e.g. a model option);
    `applies` can limit it to some models; `reference` says when it needs the outputs of a
    frozen reference model (training/teacher.py) as its teacher."""
    if weight is None and name not in LossWeights.model_fields:
        raise ValueError(f"loss term {name!r}: declare loss.weights.{name} in "
                         f"configs/sections.py, or pass `weight`")

    def deco(build: Callable[[BuildContext], Term]) -> Callable[[BuildContext], Term]:
        TERMS[name] = TermSpec(build, name in LossWeights.teacher_terms(),
                               weight or (lambda c: getattr(c.loss.weights, name)), applies,
                               reference)
        return build
    return deco


def active_weights(config: Config) -> dict[str, float]:
    """name -> weight of every term that is computed (weight > 0 and it applies)."""
    return {name: float(spec.weight(config)) for name, spec in TERMS.items()
            if spec.applies(config) and spec.weight(config) > 0}


def needs_teacher(config: Config) -> bool:
    return any(TERMS[name].needs_teacher for name in active_weights(config))


def needs_reference(config: Config) -> bool:
    """Whether a computed term compares with a frozen reference model."""
    return any(TERMS[name].reference(config) for name in active_weights(config))


class Objective:
    """The weighted sum of the built terms."""

    def __init__(self, terms: dict[str, tuple[float, Term]]):
        self.terms = terms

    @property
    def needs_hidden(self) -> bool:
        return any(t.needs_hidden for _, t in self.terms.values())

    @property
    def per_pair(self) -> bool:
        """Whether the loss is a mean over (chosen, rejected) row pairs."""
        return any(t.unit == "pair" for _, t in self.terms.values())

    @property
    def row_block(self) -> int:
        """Rows that must stay together in a micro-batch (2: a preference pair)."""
        return 2 if self.per_pair else 1

    def init_params(self, key: jax.Array) -> dict[str, Any] | None:
        out = {name: t.init_params(jax.random.fold_in(key, i))
               for i, (name, (_, t)) in enumerate(sorted(self.terms.items()))
               if t.init_params is not None}
        return out or None

    def param_axes(self) -> dict[str, Any] | None:
        out = {name: t.param_axes for name, (_, t) in self.terms.items()
               if t.init_params is not None}
        return out or None

    def weight(self, name: str, step: jax.Array) -> jax.Array:
        w, term = self.terms[name]
        return jnp.asarray(w if term.weight is None else term.weight(step), jnp.float32)

    def __call__(self, outputs: Any, batch: dict[str, jax.Array], teacher: Any,
                 params: dict[str, Any] | None, step: jax.Array
                 ) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array],
                                             dict[str, jax.Array]]]:
        """(weighted sum over terms of their sums, (count, {name: sum}, {metric: sum})).

        The count is the token weight sum, or the number of pairs of a per-pair objective."""
        weights = batch.get("weights")
        count = (jnp.asarray(batch["targets"].size, jnp.float32) if weights is None
                 else jnp.sum(weights.astype(jnp.float32)))
        if self.per_pair:
            count = jnp.sum(pairs(jnp.zeros(batch["targets"].shape), weights).valid)
        total = jnp.zeros((), jnp.float32)
        sums, metrics = {}, {}
        for name, (_, term) in self.terms.items():
            inputs = TermInputs(outputs, batch, teacher, (params or {}).get(name), step,
                                weights, count)
            out = term.loss(inputs)
            if isinstance(out, tuple):
                out, extra = out
                metrics.update({k: v.astype(jnp.float32) for k, v in extra.items()})
            sums[name] = out.astype(jnp.float32)
            total = total + self.weight(name, step) * sums[name]
        return total, (count, sums, metrics)

    def scalars(self, step: jax.Array) -> dict[str, jax.Array]:
        out = {}
        for name, (_, term) in self.terms.items():
            if term.weight is not None:
                out[f"weight/{name}"] = self.weight(name, step)
            if term.scalars is not None:
                out.update(term.scalars(step))
        return out


def build_objective(config: Any, model_cfg: Any, teacher_cfg: Any = None) -> Objective:
    ctx = BuildContext(config, model_cfg, teacher_cfg)
    return Objective({name: (w, TERMS[name].build(ctx))
                      for name, w in active_weights(config).items()})


def cross_entropy_objective(model_cfg: Any) -> Objective:
    """Token cross-entropy alone: evaluation, and runs that set no other term."""
    return Objective({"ce": (1.0, _ce(BuildContext(None, model_cfg)))})


def split_objective_params(params: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """(the model's parameters, the objective's parameters or None)."""
    if OBJECTIVE_PARAMS not in params:
        return params, None
    return {k: v for k, v in params.items() if k != OBJECTIVE_PARAMS}, params[OBJECTIVE_PARAMS]


def make_schedule(kind: str, start: float, end: float, steps: int
                  ) -> Callable[[jax.Array], jax.Array]:
    """start -> end over `steps` updates: constant (start), linear, or cosine."""
    def schedule(step):
        frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(steps, 1), 0.0, 1.0)
        if kind == "linear":
            return start + (end - start) * frac
        if kind == "cosine":
            return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return jnp.asarray(start, jnp.float32)
    return schedule


# ----------------------------------------------------------------------------------------
# The terms.

@register_term("ce")
def _ce(ctx: BuildContext) -> Term:
    """Token cross-entropy with the data's next tokens."""
    vocab = ctx.model_cfg.vocab_size

    def loss(x: TermInputs) -> jax.Array:
        return cross_entropy(x.outputs.logits, x.batch["targets"], x.weights, vocab)[0]
    return Term(loss)


@register_term("distill")
def _distill(ctx: BuildContext) -> Term:
    """T^2 * KL between teacher and student next-token distributions (loss.distill.*)."""
    d, steps = ctx.config.loss.distill, ctx.config.train.steps
    temperature = make_schedule(d.temperature_schedule, d.temperature, d.temperature_final,
                                steps)
    weight = None
    if d.weight_schedule != "constant":
        weight = make_schedule(d.weight_schedule, float(ctx.config.loss.weights.distill),
                               d.weight_final, steps)
    kind, skew, vocab = d.kind, float(d.skew), ctx.model_cfg.vocab_size

    def loss(x: TermInputs) -> jax.Array:
        return distill_loss(x.outputs.logits, x.teacher.logits, x.weights, kind=kind,
                            temperature=temperature(x.step), skew=skew, vocab_size=vocab)

    scalars = None
    if d.temperature_schedule != "constant":
        scalars = lambda step: {"distill/temperature": temperature(step)}  # noqa: E731
    return Term(loss, weight=weight, scalars=scalars)


@register_term("feature")
def _feature(ctx: BuildContext) -> Term:
    """Distance between chosen student and teacher block outputs (loss.feature.*), with a
    learned linear projection when the widths differ."""
    f = ctx.config.loss.feature
    s_cfg, t_cfg = ctx.model_cfg, ctx.teacher_cfg
    pairs = f.layer_pairs(s_cfg.model.num_layers, t_cfg.model.num_layers)
    s_idx, t_idx = [s for s, _ in pairs], [t for _, t in pairs]
    kind, ds, dt = f.kind, s_cfg.model.d_model, t_cfg.model.d_model
    project = ds != dt

    def init(key):
        return {"projection": jax.random.normal(key, (len(pairs), ds, dt), jnp.float32)
                / math.sqrt(ds)}

    def loss(x: TermInputs) -> jax.Array:
        s_h = [x.outputs.hidden[i] for i in s_idx]
        t_h = [x.teacher.hidden[i] for i in t_idx]
        proj = x.params["projection"] if project else None
        return feature_loss(s_h, t_h, x.weights, kind=kind, projection=proj)

    return Term(loss, needs_hidden=True, init_params=init if project else None,
                param_axes={"projection": P(None, "embed", None)} if project else None)


def _is_moe(config: Config) -> bool:
    return bool(config.model.moe.num_experts)


def _moe_aux_term(name: str) -> Callable[[BuildContext], Term]:
    def build(ctx: BuildContext) -> Term:
        def loss(x: TermInputs) -> jax.Array:
            # A per-batch mean over the MoE layers, scaled to a token sum.
            return x.outputs.aux[name] * x.token_count
        return Term(loss)
    build.__doc__ = f"The MoE router's {name} (models/moe.py), weighted by model.moe."
    return build


register_term("moe_load_balance", weight=lambda c: c.model.moe.load_balance_weight,
              applies=_is_moe)(_moe_aux_term("load_balance"))
register_term("moe_z_loss", weight=lambda c: c.model.moe.z_loss_weight,
              applies=_is_moe)(_moe_aux_term("z_loss"))


def _dpo_reference(config: Config) -> bool:
    """A reference model is needed except by SimPO."""
    return config.loss.dpo.needs_reference


@register_term("dpo", reference=_dpo_reference)
def _dpo(ctx: BuildContext) -> Term:
    """A preference loss (loss.dpo.loss_type) on row pairs (chosen 2i, rejected 2i+1):
    the sum over pairs, with rewards, log-probabilities, margins and KL as metrics."""
    d, vocab = ctx.config.loss.dpo, ctx.model_cfg.vocab_size
    options = dict(loss_type=d.loss_type, beta=float(d.beta),
                   label_smoothing=float(d.label_smoothing), simpo_gamma=float(d.simpo_gamma))

    def loss(x: TermInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        targets = x.batch["targets"]
        policy = pairs(token_logps(x.outputs.logits, targets, vocab), x.weights)
        reference = None
        if d.needs_reference:
            reference = pairs(token_logps(x.teacher.logits, targets, vocab), x.weights)
        per_pair, chosen, rejected = pair_losses(policy, reference, **options)
        sg, valid = jax.lax.stop_gradient, policy.valid
        chosen, rejected = sg(chosen), sg(rejected)
        metrics = {"dpo/rewards/chosen": chosen, "dpo/rewards/rejected": rejected,
                   "dpo/rewards/accuracy": (chosen > rejected).astype(jnp.float32),
                   "dpo/rewards/margin": chosen - rejected,
                   "dpo/logps/chosen": sg(policy.chosen),
                   "dpo/logps/rejected": sg(policy.rejected)}
        if reference is not None:
            kl = token_kl(sg(x.outputs.logits), x.teacher.logits, vocab)
            kl_B = jnp.sum(kl * (1.0 if x.weights is None else x.weights), axis=-1)
            metrics["dpo/kl"] = 0.5 * (kl_B[0::2] + kl_B[1::2])
        metrics = {k: jnp.sum(v * valid) for k, v in metrics.items()}
        return jnp.sum(per_pair * valid), metrics

    return Term(loss, unit="pair")


@register_term("reward")
def _reward(ctx: BuildContext) -> Term:
    """A reward model: a scalar value head on the last block's output at each row's last
    response position, trained with the Bradley-Terry loss -log s(r_chosen - r_rejected)
    (plus loss.reward.center_coefficient * (r_chosen + r_rejected)^2)."""
    d, center = ctx.model_cfg.model.d_model, float(ctx.config.loss.reward.center_coefficient)

    def init(key):
        return {"w": jax.random.normal(key, (d,), jnp.float32) / math.sqrt(d),
                "b": jnp.zeros((), jnp.float32)}

    def loss(x: TermInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        r_B = reward_values(x.params, x.outputs.hidden[-1], x.weights)
        chosen, rejected = r_B[0::2], r_B[1::2]
        valid = pairs(jnp.zeros(x.batch["targets"].shape), x.weights).valid
        sg = jax.lax.stop_gradient
        metrics = {"reward/chosen": sg(chosen), "reward/rejected": sg(rejected),
                   "reward/accuracy": (chosen > rejected).astype(jnp.float32),
                   "reward/margin": sg(chosen - rejected)}
        per_pair = -jax.nn.log_sigmoid(chosen - rejected)
        if center:
            per_pair = per_pair + center * (chosen + rejected) ** 2
        return (jnp.sum(per_pair * valid),
                {k: jnp.sum(v * valid) for k, v in metrics.items()})

    return Term(loss, needs_hidden=True, init_params=init, unit="pair",
                param_axes={"w": P("embed"), "b": P()})


def _grpo_on(config: Config) -> float:
    """GRPO's term is computed exactly when grpo.prompts names its prompts."""
    return 1.0 if config.grpo.prompts else 0.0


@register_term("grpo", weight=_grpo_on, reference=lambda c: c.grpo.beta > 0)
def _grpo(ctx: BuildContext) -> Term:
    """GRPO's clipped per-token policy-gradient loss with the k3 KL to the reference
    (losses/grpo.py), summed over the completion tokens (the step divides by their count:
    TRL's `dapo` aggregation). The batch carries per-token `advantages` [B, L]; the old
    policy is the current one (one update per sampled batch)."""
    g, vocab = ctx.config.grpo, ctx.model_cfg.vocab_size
    options = dict(epsilon=float(g.epsilon), beta=float(g.beta))

    def loss(x: TermInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        targets = x.batch["targets"]
        logps = temperature_logps(x.outputs.logits, targets, g.temperature, vocab)
        ref = None
        if g.beta > 0:
            ref = temperature_logps(x.teacher.logits, targets, g.temperature, vocab)
        per_token, kl, clipped = grpo_token_losses(
            logps, jax.lax.stop_gradient(logps), ref, x.batch["advantages"], **options)
        w = x.weights
        return jnp.sum(per_token * w), {"grpo/kl": jnp.sum(jax.lax.stop_gradient(kl) * w),
                                        "grpo/clip_fraction": jnp.sum(clipped * w)}

    return Term(loss)
