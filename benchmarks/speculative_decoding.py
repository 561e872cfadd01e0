"""Speculative decoding vs plain KV-cache decoding of the same target run.

  python benchmarks/speculative_decoding.py --workdir=runs/big --draft_workdir=runs/small \
      --draft_tokens=2,4,6 --temperature=0.8 --length=500

Both decoders are compiled first; then plain and speculative decoding alternate
`--repeats` times (so drifts in machine speed hit both) and the median decode tokens/s
of each is reported, with the acceptance rate and tokens per target forward pass.
Prints one table and one JSON line per K.
"""

import json
import statistics

from absl import app, flags, logging


_WORKDIR = flags.DEFINE_string("workdir", None, "The target run.", required=True)
_DRAFT_WORKDIR = flags.DEFINE_string("draft_workdir", None, "The draft run.", required=True)
_DRAFT_TOKENS = flags.DEFINE_list("draft_tokens", ["4"], "K values to measure.")
_PROMPT = flags.DEFINE_string("prompt", "ROMEO:", "Prompt.")
_LENGTH = flags.DEFINE_integer("length", 500, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k filter (0 = off).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Alternating timed repeats.")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.ERROR)
    from jaxlm.configs.sections import Sampling
    from jaxlm.evaluation.restore import restore_run
    from jaxlm.evaluation.sampling import encode_prompts
    from jaxlm.inference.generate import Generator
    from jaxlm.inference.speculative import SpeculativeGenerator

    exp, state, step = restore_run(_WORKDIR.value)
    dexp, dstate, dstep = restore_run(_DRAFT_WORKDIR.value)
    ids = encode_prompts(exp, [_PROMPT.value])
    sp = Sampling(temperature=_TEMPERATURE.value, top_k=_TOP_K.value)
    plain = Generator(exp.graphdef, exp.model_cfg, exp.config.train.seq_len)
    print(f"target {_WORKDIR.value} (step {step}), draft {_DRAFT_WORKDIR.value} (step {dstep}); "
          f"{_LENGTH.value} tokens, temperature {sp.temperature}, top_k {sp.top_k}")
    print(f"{'K':>3} {'accept':>7} {'tok/pass':>8} {'spec tok/s':>11} {'plain tok/s':>11} "
          f"{'speed-up':>8}")
    for k in map(int, _DRAFT_TOKENS.value):
        spec = SpeculativeGenerator((exp.graphdef, exp.model_cfg, exp.config.train.seq_len),
                                    (dexp.graphdef, dexp.model_cfg, dexp.config.train.seq_len), k)
        spec.generate(state.params, dstate.params, ids, 8, sp)  # compile
        plain.generate(state.params, ids, 8, sp)
        spec_tps, plain_tps, accept, per_pass = [], [], [], []
        for r in range(_REPEATS.value):
            _, s = spec.generate(state.params, dstate.params, ids, _LENGTH.value, sp, seed=r)
            _, p = plain.generate(state.params, ids, _LENGTH.value, sp, seed=r)
            spec_tps.append(s["decode_tokens_per_sec"])
            plain_tps.append(p["decode_tokens_per_sec"])
            accept.append(s["acceptance_rate"])
            per_pass.append(s["tokens_per_round"])
        row = {"draft_tokens": k, "acceptance_rate": statistics.mean(accept),
               "tokens_per_target_pass": statistics.mean(per_pass),
               "spec_tokens_per_sec": statistics.median(spec_tps),
               "plain_tokens_per_sec": statistics.median(plain_tps)}
        row["speedup"] = row["spec_tokens_per_sec"] / row["plain_tokens_per_sec"]
        print(f"{k:>3} {row['acceptance_rate']:>7.1%} {row['tokens_per_target_pass']:>8.2f} "
              f"{row['spec_tokens_per_sec']:>11,.0f} {row['plain_tokens_per_sec']:>11,.0f} "
              f"{row['speedup']:>7.2f}x")
        print(json.dumps({k2: round(v, 4) for k2, v in row.items()}))


if __name__ == "__main__":
    app.run(main)
