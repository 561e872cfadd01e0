"""GRPO on 2-digit addition with the exact-match reward, after SFT, on a CPU: writes the
SFT records and the prompts (benchmarks/dpo_pairs.py's additions), prepares the SFT set,
fine-tunes, runs GRPO, and prints the mean reward per block of steps (and plots it).

  python benchmarks/grpo_addition.py --dir=/tmp/grpo_demo [--plot=docs/grpo_reward.png]

The commands it runs are printed; docs/alignment.md#grpo shows them with the figures.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.dpo_pairs import pairs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--config=" + str(ROOT / "configs" / "shakespeare_char.py") + ":tiny",
         "--config.model.d_model=64", "--config.model.d_ff=256", "--config.seq_len=16",
         "--config.data.path=sft", "--config.data.tokenizer=byte"]


def write_records(out: Path) -> None:
    """sft.jsonl: {prompt, completion} (the right sum); prompts.jsonl: {prompt, answer}."""
    with open(out / "sft.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n"
                     for r in pairs(2000, 0))
    with open(out / "prompts.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"prompt": r["prompt"], "answer": r["chosen"]}) + "\n"
                     for r in pairs(500, 1))


def run(args: list[str], cwd: Path) -> None:
    print("$ python " + " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def blocks(path: Path, size: int) -> list[dict[str, float]]:
    """Means of the GRPO metrics over blocks of `size` steps."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if '"grpo/reward"' in line]
    keys = ("grpo/reward", "grpo/reward_std", "grpo/kl", "grpo/completion_length",
            "grpo/frac_reward_zero_std")
    out = []
    for i in range(0, len(rows), size):
        part = rows[i:i + size]
        out.append({"steps": f"{part[0]['step']}-{part[-1]['step']}",
                    **{k: sum(r[k] for r in part) / len(part) for k in keys}})
    return out


def plot(path: Path, out: Path, window: int) -> None:
    import matplotlib  # Deferred: only --plot needs matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # Deferred: as above
    rows = [json.loads(line) for line in path.read_text().splitlines() if '"grpo/reward"' in line]
    steps, reward = [r["step"] for r in rows], [r["grpo/reward"] for r in rows]
    smooth = [sum(reward[max(0, i - window + 1):i + 1]) / len(reward[max(0, i - window + 1):i + 1])
              for i in range(len(reward))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, reward, alpha=0.3, label="mean reward of the step's 64 completions")
    ax.plot(steps, smooth, label=f"mean of the last {window} steps")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("exact-match reward")
    ax.set_title("GRPO on 2-digit addition (2 layers, d_model 64, CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--plot", default="")
    ap.add_argument("--sft_steps", type=int, default=1500)
    ap.add_argument("--grpo_steps", type=int, default=200)
    ap.add_argument("--learning_rate", default="1e-4")
    args = ap.parse_args()
    out = Path(args.dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    write_records(out)
    train = str(ROOT / "train.py")
    run(["-m", "jaxlm.data.prepare", "--format=sft", "--input=sft.jsonl", "--output=sft",
         "--tokenizer=byte", "--seq_len=16"], out)
    run([train, *MODEL, "--workdir=sft64", "--config.batch_size=64",
         f"--config.steps={args.sft_steps}", "--config.learning_rate=3e-3"], out)
    run([train, *MODEL, "--workdir=grpo", "--config.init.from_workdir=sft64",
         "--config.loss.weights.ce=0", "--config.grpo.prompts=prompts.jsonl",
         "--config.grpo.group_size=8", "--config.grpo.max_new_tokens=5",
         "--config.batch_size=64", f"--config.steps={args.grpo_steps}",
         f"--config.learning_rate={args.learning_rate}",
         f"--config.min_learning_rate={float(args.learning_rate) / 10}",
         "--config.log_every=1"], out)
    for row in blocks(out / "grpo" / "metrics.jsonl", 25):
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                          for k, v in row.items()}))
    if args.plot:
        plot(out / "grpo" / "metrics.jsonl", Path(args.plot).absolute(), 25)


if __name__ == "__main__":
    main()
