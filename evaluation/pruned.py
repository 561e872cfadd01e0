"""One-shot magnitude pruning of a run's checkpoint, evaluated: `eval.py --prune`.

The run's linear weights (models/prune.py `prune_targets`) are pruned once by magnitude
(unstructured per matrix or global, or N:M), then the validation split is evaluated with
the zeros in place. The result adds the sparsity of the pruned matrices, a row per matrix
(`matrices`) and bytes: each pruned matrix stored sparse (N:M: kept float32 values and
ceil(log2 M)-bit indices; unstructured: a bitmask and the kept values), everything else
dense float32.
"""

from typing import Any

import jax

from jaxlm.configs.sections import Prune
from jaxlm.losses.objectives import split_objective_params
from jaxlm.models.model import abstract_model
from jaxlm.models.prune import apply_masks, magnitude_masks, prune_targets, sparsity_rows
from jaxlm.models.quant import tree_bytes
from jaxlm.training.evaluate import evaluate
from jaxlm.training.experiment import Experiment


def prune_run_params(exp: Experiment, params: Any, cfg: Prune
                     ) -> tuple[Any, list[dict[str, Any]]]:
    """(params with the pruned weights zero, one sparsity row per pruned matrix); other
    parameters (norms, embeddings, an objective's own) are unchanged."""
    cfg.check_model(exp.config.model, exp.model_cfg.expert_d_ff, key="prune_pattern")
    targets = prune_targets(abstract_model(exp.model_cfg), cfg.include_head)

    def prune(p: Any) -> Any:
        return apply_masks(p, magnitude_masks(p, targets, cfg))
    pruned = jax.jit(prune)(params)
    return pruned, sparsity_rows(pruned, targets, cfg.nm)


def evaluate_pruned(exp: Experiment, params: Any, cfg: Prune) -> dict[str, Any]:
    """Eval loss of `params` pruned as `cfg` says, with the sparsity and bytes."""
    pruned, rows = prune_run_params(exp, params, cfg)  # objective parameters untouched
    result = evaluate(exp, pruned)
    model_params, _ = split_objective_params(params)
    dense = sum(r["dense_bytes"] for r in rows)
    sparse = sum(r["sparse_bytes"] for r in rows)
    total = tree_bytes(model_params)
    weights = sum(r["shape"][0] * r["shape"][1] for r in rows)
    return {**result, "prune": cfg.sparsity, "prune_pattern": cfg.pattern,
            "prune_scope": cfg.scope,
            "sparsity": round(sum(r["zeros"] for r in rows) / weights, 6),
            "pruned_dense_bytes": dense, "pruned_sparse_bytes": sparse,
            "weight_bytes": total - dense + sparse, "float_weight_bytes": total,
            "matrices": rows}


def matrices_table(rows: list[dict[str, Any]]) -> str:
    """The per-matrix rows as a text table."""
    lines = [f"{'matrix':<32} {'shape':>11} {'sparsity':>9} {'dense B':>10} {'sparse B':>10}"]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"{r['matrix']:<32} {shape:>11} {r['sparsity']:>9.4f} "
                     f"{r['dense_bytes']:>10,} {r['sparse_bytes']:>10,}")
    return "\n".join(lines)
