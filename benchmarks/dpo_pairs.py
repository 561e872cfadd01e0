"""Write a small preference set of 2-digit additions: the right sum chosen, a wrong one
rejected (JSON lines of {prompt, chosen, rejected}), for trying DPO on a CPU.

  python benchmarks/dpo_pairs.py --output=/tmp/pairs.jsonl [--pairs=2000] [--seed=0]

The rejected sum is off by 1 to 10 either way; prompts are "a+b=". docs/alignment.md uses
it with `python -m jaxlm.data.prepare --format=preference` and `train.py`.
"""

import argparse
import json
import random


def pairs(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        wrong = a + b + rng.choice([d for d in range(-10, 11) if d and a + b + d >= 0])
        out.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(wrong)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", required=True)
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with open(args.output, "w", encoding="utf-8") as f:
        for record in pairs(args.pairs, args.seed):
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
