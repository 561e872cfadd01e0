"""Sequence-level vs logit distillation on the embedded text, at the same token budget.

  python benchmarks/seq_distill.py --workdir=runs/seq_distill   # 21 min on 2 shared cores

1. The teacher: the default recipe (`python train.py`, 4 layers, d_model 128, 2000 steps).
2. Teacher data: `python -m jaxlm.evaluation.distill_data --prefixes=N --prefix_len=16`
   cuts N evenly spaced 16-character prefixes from the training split and samples a
   49-character continuation of each (temperature 1, no END: `--end_text=`), so that
   prefix + completion is one row of 65 tokens (seq_len 64 + 1); prepared with
   `python -m jaxlm.data.prepare --format=sft --tokenizer=TEACHER --seq_len=64`.
3. Three students with d_model halved (4 layers, d_model 64), the same recipe and steps
   (batch 12 x 64 tokens a step: the same tokens through the model): on the raw text; on
   the teacher's text (completion tokens are the targets, the prefixes weigh 0); and with
   logit distillation (`ce + 1.0 * forward KL`, T = 1) on the raw text.
4. Prints one markdown table: each student's loss on the raw validation split
   (`eval.py --data=TEACHER/data`) and the tokens that carried a loss.

Every step is the command a user would type; finished steps are reused, so a second call
only prints.
"""

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.finetune_example import last_json, run  # noqa: E402

SEQ_LEN, BATCH = 64, 12
PREFIX, NEW = 16, 49  # one SFT example = one row of SEQ_LEN + 1 tokens
STUDENT = ["--config.model.d_model=64"]




def train(run_dir: Path, steps: int, flags: list[str]) -> None:
    if not (run_dir / "checkpoints" / str(steps)).exists():
        run(["train.py", f"--workdir={run_dir}", f"--config.steps={steps}",
             f"--config.eval_every={steps}", f"--config.checkpoint_every={steps}", *flags])


def raw_loss(run_dir: Path, teacher: Path) -> float:
    """The loss on the raw validation split (the teacher's prepared text)."""
    return last_json(run(["eval.py", f"--workdir={run_dir}", f"--data={teacher / 'data'}"]))[
        "eval_loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="runs/seq_distill")
    ap.add_argument("--teacher_steps", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=2000, help="training steps per student")
    ap.add_argument("--prefixes", type=int, default=24576, help="teacher generations")
    ap.add_argument("--temperature", type=float, default=1.0)
    args = ap.parse_args()
    workdir = Path(args.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)

    teacher = workdir / "teacher"
    train(teacher, args.teacher_steps, [])
    gen = workdir / "teacher_text.jsonl"
    summary = last_json(run([
        "-m", "jaxlm.evaluation.distill_data", f"--workdir={teacher}", f"--output={gen}",
        f"--prefixes={args.prefixes}", f"--prefix_len={PREFIX}", "--split=train",
        f"--max_new_tokens={NEW}", f"--temperature={args.temperature}", "--end_text=",
        "--batch_size=512"]))
    sft = workdir / "teacher_text"
    if not (sft / "meta.json").exists():
        run(["-m", "jaxlm.data.prepare", "--format=sft", f"--input={gen}", f"--output={sft}",
             f"--tokenizer={teacher}", f"--seq_len={SEQ_LEN}", "--end_text=", "--quiet"])
    meta = json.loads((sft / "meta.json").read_text())

    students = {
        "raw text": (workdir / "raw", []),
        "teacher text (sequence-level KD)": (
            workdir / "seq_kd", [f"--config.data.path={sft}",
                                 f"--config.data.tokenizer=from:{teacher}"]),
        "raw text, logit KD (ce + forward KL)": (
            workdir / "logit_kd", ["--config.loss.weights.distill=1.0",
                                   f"--config.loss.distill.teacher_workdir={teacher}"]),
    }
    rows = {}
    for name, (run_dir, flags) in students.items():
        train(run_dir, args.steps, STUDENT + flags)
        rows[name] = raw_loss(run_dir, teacher)
    teacher_loss = raw_loss(teacher, teacher)

    rows_seen = args.steps * BATCH
    completion_share = meta["completion_tokens"]["train"] / meta["counts"]["train"]
    print(f"\nteacher ({args.teacher_steps} steps): {teacher_loss:.4f}; {summary['records']:,} "
          f"teacher generations at temperature {args.temperature} "
          f"({meta['examples']['train']:,} train examples); students: 4 layers, d_model 64, "
          f"{args.steps} steps of {BATCH} x {SEQ_LEN} tokens ({rows_seen * SEQ_LEN:,} tokens)\n")
    print("| student | loss on the raw validation split | tokens with a loss |")
    print("| --- | --- | --- |")
    for name, loss in rows.items():
        share = completion_share if "sequence" in name else 1.0
        print(f"| {name} | {loss:.4f} | {rows_seen * SEQ_LEN * share:,.0f} |")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
