"""The README's Quick tour runs as written: every command, shortened where a step count
allows, in one temporary directory, in order (later commands use earlier runs)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

# Commands that take minutes to hours here; what they exercise is tested elsewhere.
SKIPPED = {"shakespeare_char.py:large": "22-27 s a step on 2 CPU cores",
           "gpt_1b.py": "plans a 64-device mesh (60 s); tests/test_flops.py plans smaller ones"}
SHORT = ["--config.steps=3", "--config.eval_every=0", "--config.eval_max_batches=2"]


def quick_tour_commands(readme: Path = ROOT / "README.md") -> list[str]:
    """The shell commands of the README's Quick tour block, continuation lines joined."""
    text = readme.read_text()
    block = text[text.index("## Quick tour"):]
    block = block[block.index("```bash") + len("```bash"):]
    block = block[:block.index("```")].replace("\\\n", " ")
    commands = [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines()]
    return [c for c in commands if c.startswith("python ")]


def _argv(command: str) -> list[str] | None:
    """The command to run here (shortened, optional arguments dropped), or None to skip."""
    if any(key in command for key in SKIPPED):
        return None
    command = re.sub(r"\s*\[[^\]]*\]", "", command)
    args = command.split()[1:]
    args = [a.replace("configs/", f"{ROOT}/configs/").strip('"') for a in args]
    args = [re.sub(r'^--prompt="?([^"]*)"?$', r"--prompt=\1", a) for a in args]
    args = ["--length=20" if a.startswith("--length=") else a for a in args]
    script = args[0]
    if script in ("train.py", "sweep.py") and "--dry_run" not in args:
        args += SHORT
    if script.endswith(".py"):
        args[0] = str(ROOT / script)
    return [sys.executable, *args]


def _inputs(cwd: Path) -> None:
    """What the tour names but does not make: a Hugging Face model, a text, SFT pairs."""
    from tests.test_hf_convert import _gpt2_with_tokenizer
    _gpt2_with_tokenizer(cwd / "models" / "gpt2")
    (cwd / "corpus.txt").write_text("Before we proceed any further, hear me speak.\n" * 300)
    with open(cwd / "pairs.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"prompt": f"Say {i}:", "completion": f" {i} said."}) + "\n")


def test_the_quick_tour_extracts_every_command():
    commands = quick_tour_commands()
    assert len(commands) >= 12
    assert all(c.split()[1] in ("train.py", "eval.py", "sweep.py", "convert.py", "-m")
               for c in commands)


@pytest.mark.slow
def test_every_quick_tour_command_runs(tmp_path):
    _inputs(tmp_path)
    for command in quick_tour_commands():
        argv = _argv(command.replace("/models/gpt2", str(tmp_path / "models" / "gpt2")))
        if argv is None:
            continue
        r = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and "Traceback" not in r.stderr, \
            f"{command}\n{r.stderr[-3000:]}"
        if argv[1].endswith("train.py") and "--dry_run" not in argv:
            out = r.stdout + r.stderr
            assert "Checkpoints: " in out and "nothing to train" not in out, command
