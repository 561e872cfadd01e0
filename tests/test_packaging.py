"""The project installs as the `jaxlm` namespace and never shadows another package."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.helpers import ROOT

FOLDERS = sorted(p.parent.name for p in ROOT.glob("*/*.py")
                 if p.parent.name not in {"tests", "benchmarks"})


def _python(code: str, cwd: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    if extra_path is not None:  # after the script's directory (cwd for `-c`), as site-packages is
        env["PYTHONPATH"] = str(extra_path)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_every_package_folder_is_installed_under_jaxlm():
    """pyproject's package list names every folder of library code, as jaxlm.<folder>."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setup["package-dir"] == {"jaxlm": "."}
    listed = set(setup["packages"])
    assert {f"jaxlm.{name}" for name in FOLDERS} <= listed
    assert "jaxlm.data.corpora" in listed and len(FOLDERS) >= 10


@pytest.mark.parametrize("name", FOLDERS)
def test_a_folder_never_shadows_an_installed_package_of_its_name(name, tmp_path):
    """From the repository root (first on sys.path for `python train.py`, `python -m`), an
    installed package named like one of the folders is the one `import name` finds."""
    site = tmp_path / "site"
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text("THIRD_PARTY = True\n")
    r = _python(f"import {name}; print({name}.THIRD_PARTY)", cwd=ROOT, extra_path=site)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr


@pytest.mark.parametrize("where", ["repo", "elsewhere"])
def test_imports_beside_transformers_integrations_from_any_directory(where, tmp_path):
    """transformers imports Hugging Face's `kernels`; ours is `jaxlm.kernels`, from anywhere."""
    pytest.importorskip("transformers")
    pytest.importorskip("torch", reason="transformers' model classes need torch (.[hf])")
    code = ("import transformers.integrations.hub_kernels\n"
            "from transformers import LlamaForCausalLM\n"
            "from jaxlm.kernels.flash_attention import flash_attention\n"
            "from jaxlm.models.model import create_model\n"
            "from jaxlm.checkpoints import hf_export, hf_import\n"
            "import jaxlm.data.prepare, jaxlm.training.trainer\n"
            "print('ok')")
    r = _python(code, cwd=ROOT if where == "repo" else tmp_path)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
