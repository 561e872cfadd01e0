"""Fine-tuning worked example on the embedded text: full fine-tuning vs LoRA vs QLoRA.

  python benchmarks/finetune_example.py --workdir=runs/finetune_example   # ~10 min, 2 cores

1. Trains the default character-level base model (`python train.py`, 2000 steps) on the
   first 90% of tiny Shakespeare.
2. Builds a prompt/completion set from the last 10%, which the base never trains on:
   "continue this line of <character>" pairs, prompt `NAME:\\n<first half of a line>`,
   completion `<rest of the line>` (the char tokenizer has no EOS, so preparation ends
   each completion with a newline).
3. Prepares it with the base run's tokenizer (`python -m jaxlm.data.prepare --format=sft`),
   10% of the pairs held out.
4. Fine-tunes the base on it four ways with the same steps and data: every parameter,
   LoRA rank 4 and rank 16 (targets q,k,v,o,up,down), and LoRA rank 16 on an int4 base.
5. Prints one markdown table: completion-only loss on the held-out pairs before (the
   base, `eval.py --data`) and after, trainable parameters, parameter and optimizer bytes
   (the dry-run planner) and the median train-step time.

Every step is the command a user would type; the script only runs them and reads their
JSON output. Runs that already finished are reused, so a second call only prints.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from jaxlm.data.prepare import EMBEDDED_CORPUS  # noqa: E402
from jaxlm.training.metrics import read_metrics  # noqa: E402

SEQ_LEN = 64  # the base's; eval.py --data evaluates at the base run's seq_len
TARGETS = "q,k,v,o,up,down"
RUNS = {  # name: (extra train.py flags, learning rate)
    "full fine-tuning": ([], 3e-4),
    "LoRA rank 4": (["--config.lora.rank=4", f"--config.lora.targets={TARGETS}"], 3e-3),
    "LoRA rank 16": (["--config.lora.rank=16", f"--config.lora.targets={TARGETS}"], 3e-3),
    "QLoRA int4, rank 16": (["--config.lora.rank=16", f"--config.lora.targets={TARGETS}",
                             "--config.quant.weight_bits=4"], 3e-3),
}


def line_pairs(text: str) -> list[dict[str, str]]:
    """One pair per speech line of >= 24 characters: the speaker and the line's first half
    (cut at the space nearest the middle) prompt its second half."""
    pairs = []
    for speech in text.split("\n\n"):
        name, _, body = speech.strip().partition(":\n")
        if not body or "\n" in name:
            continue
        for line in body.split("\n"):
            if len(line) < 24 or " " not in line:
                continue
            spaces = [i for i, ch in enumerate(line) if ch == " "]
            cut = min(spaces, key=lambda i: abs(i - len(line) // 2))
            prompt, completion = f"{name}:\n{line[:cut]}", line[cut:]
            if len(prompt) + len(completion) + 1 <= SEQ_LEN:  # + the newline that ends it
                pairs.append({"prompt": prompt, "completion": completion})
    return pairs


def run(args: list[str]) -> str:
    print("$", " ".join(args), flush=True)
    return subprocess.run([sys.executable, *args], cwd=ROOT, check=True, text=True,
                          stdout=subprocess.PIPE).stdout


def last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def finetune(workdir: Path, base: Path, data: Path, name: str, steps: int) -> dict:
    flags, lr = RUNS[name]
    run_dir = workdir / name.replace(" ", "_").replace(",", "")
    config = [f"--config=configs/finetune.py:{base}", f"--workdir={run_dir}",
              f"--config.data.path={data}", f"--config.steps={steps}",
              f"--config.learning_rate={lr}", f"--config.min_learning_rate={lr / 10:g}",
              "--config.warmup_steps=20", f"--config.eval_every={steps}",
              f"--config.checkpoint_every={steps}", *flags]
    plan_file = run_dir.with_suffix(".plan.json")
    if not plan_file.exists():
        run(["train.py", *config, "--dry_run", f"--dry_run_json={plan_file}"])
    if not (run_dir / "checkpoints" / str(steps)).exists():
        run(["train.py", *config])
    plan = json.loads(plan_file.read_text())
    records, _ = read_metrics(run_dir)
    tokens_per_s = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r]
    evaluated = last_json(run(["eval.py", f"--workdir={run_dir}"]))
    return {"loss": evaluated["eval_loss"], "trainable": plan["trainable_params"],
            "params": plan["per_device_bytes"]["parameters"],
            "optimizer": plan["per_device_bytes"]["optimizer"],
            "step_ms": 1e3 * plan["tokens_per_step"] / statistics.median(tokens_per_s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="runs/finetune_example")
    ap.add_argument("--base_steps", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning steps per run")
    args = ap.parse_args()
    workdir = Path(args.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)

    base = workdir / "base"
    if not (base / "checkpoints" / str(args.base_steps)).exists():
        run(["train.py", f"--workdir={base}", f"--config.steps={args.base_steps}"])

    text = EMBEDDED_CORPUS.read_text(encoding="utf-8")
    held_out = text[text.index("\n\n", int(0.9 * len(text))) + 2:]
    pairs = line_pairs(held_out)
    data = workdir / "sft"
    if not (data / "meta.json").exists():
        source = workdir / "lines.jsonl"
        source.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        run(["-m", "jaxlm.data.prepare", "--format=sft", f"--input={source}", f"--output={data}",
             f"--tokenizer={base}", f"--seq_len={SEQ_LEN}"])
    meta = json.loads((data / "meta.json").read_text())
    before = last_json(run(["eval.py", f"--workdir={base}", f"--data={data}"]))

    rows = {name: finetune(workdir, base, data, name, args.steps) for name in RUNS}
    print(f"\n{len(pairs):,} pairs ({meta['examples']['train']:,} train, "
          f"{meta['examples']['val']:,} held out); completion-only loss on the held-out "
          f"pairs before fine-tuning (the base): {before['eval_loss']:.4f}; "
          f"{args.steps} steps each\n")
    print("| run | completion loss | trainable params | parameter bytes | optimizer bytes "
          "| step time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['loss']:.4f} | {r['trainable']:,} | {r['params'] / 2**10:,.1f} KiB"
              f" | {r['optimizer'] / 2**10:,.1f} KiB | {r['step_ms']:.1f} ms |")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
