"""Held-out evaluation sets from the last 10% of the embedded Shakespeare (the default
run's validation split), for the figures of docs/evaluation.md.

  python benchmarks/heldout_eval_sets.py --output=/tmp/heldout

writes OUTPUT/heldout.jsonl (50 prompt/reference pairs: a line of 16-38 characters and
the line after it, for --generation_set) and OUTPUT/tasks/ (lm-eval task YAML files and
their data: heldout_next_line, the true next line among 4 held-out lines by
log-likelihood, 100 examples; heldout_text, rolling log-likelihood of 40 paragraphs).
"""

import argparse
import json
import random
from pathlib import Path

from jaxlm.data.prepare import EMBEDDED_CORPUS


def line_pairs(text: str) -> list[tuple[str, str]]:
    lines = text.split("\n")
    return [(a, b) for a, b in zip(lines, lines[1:])
            if 16 <= len(a) <= 38 and len(b) > 10 and not a.endswith(":")
            and not b.endswith(":")]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def task_yaml(name: str, data: Path, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {data}\ntest_split: test\n{body}")


def main(out: Path) -> None:
    text = EMBEDDED_CORPUS.read_text()
    held = text[int(len(text) * 0.9):]
    pairs = line_pairs(held)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "heldout.jsonl", [{"prompt": a + "\n", "reference": b}
                                        for a, b in pairs[:50]])
    rng = random.Random(0)
    pool = [b for _, b in pairs]
    mc = []
    for a, b in pairs[50:150]:
        choices = [b] + rng.sample([p for p in pool if p != b], 3)
        rng.shuffle(choices)
        mc.append({"question": a + "\n", "choices": choices, "answer": choices.index(b)})
    tasks = out / "tasks"
    tasks.mkdir(exist_ok=True)
    write_jsonl(tasks / "mc.jsonl", mc)
    write_jsonl(tasks / "text.jsonl",
                [{"text": p} for p in held.split("\n\n") if len(p) > 100][:40])
    (tasks / "heldout_next_line.yaml").write_text(task_yaml(
        "heldout_next_line", tasks / "mc.jsonl",
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"))
    (tasks / "heldout_text.yaml").write_text(task_yaml(
        "heldout_text", tasks / "text.jsonl",
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    main(parser.parse_args().output)
