"""Beam search: tokens equal `transformers`' `generate(num_beams=K, do_sample=False)` on
imported tiny models; bad settings are one-line errors."""

import jax
import pytest

from jaxlm.checkpoints.hf_import import import_hf
from jaxlm.configs.base import get_base_config
from jaxlm.configs.errors import ConfigError
from jaxlm.evaluation.restore import restore_run
from jaxlm.inference.beam import BeamSearch
from jaxlm.models.model import create_model, split_params
from tests.helpers import call_cli, model_config, step0_run
from tests.test_hf_convert import VOCAB, build_hf

PROMPTS = [[11, 52, 7, 93, 30, 4, 66, 18, 2], [41, 8, 77, 25]]  # left-padded by 5
NEW = 12


def hf_beam(model, prompts, num_beams, eos, length_penalty, early_stopping):
    """`transformers`' beam search on the left-padded batch, cut after each row's EOS."""
    import torch
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                             do_sample=False, num_beams=num_beams,
                             length_penalty=length_penalty, early_stopping=early_stopping)
    rows = out[:, width:].tolist()
    return [r[:r.index(eos) + 1] if eos in r else r for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("variant, num_beams, length_penalty, early_stopping", [
    ("llama", 4, 1.0, False), ("qwen2", 3, 0.5, True), ("gpt2", 3, 2.0, "never")])
def test_beam_search_equals_transformers(variant, num_beams, length_penalty, early_stopping,
                                         tmp_path):
    model = build_hf(variant, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run", get_base_config(), jax.devices()[:1])
    exp, state, _ = restore_run(tmp_path / "run", devices=jax.devices()[:1])
    beam = BeamSearch(exp.graphdef, exp.model_cfg, 32)

    ours, _ = beam.generate(state.params, PROMPTS, NEW, num_beams=3)
    assert ours == hf_beam(model, PROMPTS, 3, None, 1.0, False)
    assert all(len(o) == NEW for o in ours)

    # An EOS that the unconstrained search emits ends hypotheses early.
    eos = ours[0][NEW // 4]
    with_eos, _ = beam.generate(state.params, PROMPTS, NEW, num_beams=num_beams, eos_id=eos,
                                length_penalty=length_penalty, early_stopping=early_stopping)
    assert with_eos == hf_beam(model, PROMPTS, num_beams, eos, length_penalty, early_stopping)
    assert with_eos != ours
    if length_penalty <= 1.0:  # a penalty above 1 favours long hypotheses
        assert any(o[-1] == eos and len(o) < NEW for o in with_eos)
    assert max(max(o) for o in with_eos + ours) < VOCAB  # never a padded vocabulary id


def test_beam_settings_the_cache_cannot_hold_are_one_line_errors():
    cfg = model_config(num_layers=1, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16,
                       d_ff=64)
    graphdef, params = split_params(create_model(cfg, 0))
    beam = BeamSearch(graphdef, cfg, 16)
    with pytest.raises(ConfigError, match="num_beams: must be at least 1"):
        beam.generate(params, [[1, 2]], 4, num_beams=0)
    with pytest.raises(ConfigError, match="length: .* exceeds the context of 16"):
        beam.generate(params, [[1, 2, 3]], 14, num_beams=2)


@pytest.mark.slow
def test_eval_cli_beam_search_prints_the_searched_text(tiny_config, tmp_path):
    from jaxlm.evaluation.sampling import beam_search
    run = step0_run(tiny_config, tmp_path / "run")
    res = call_cli(["eval.py", f"--workdir={run}", "--noeval", "--sample", "--prompt=ROMEO:",
                    "--length=6", "--num_beams=3", "--length_penalty=0.5"])
    assert res.returncode == 0, res.stderr
    exp, state, _ = restore_run(run, devices=jax.devices()[:1])
    texts, _ = beam_search(exp, state.params, ["ROMEO:"], 6, 3, 0.5)
    assert res.stdout == f"--- prompt 'ROMEO:'\nROMEO:{texts[0]}\n"
    assert '"num_beams": 3' in res.stderr


@pytest.mark.parametrize("flags, message", [
    (["--num_beams=0"], "error: num_beams: "),
    (["--num_beams=2", "--draft_workdir=elsewhere"], "error: num_beams: beam search does not"),
    (["--num_beams=2", "--early_stopping=sometimes"], "error: early_stopping: "),
])
def test_eval_cli_beam_errors_are_one_line(flags, message, tmp_path):
    res = call_cli(["eval.py", f"--workdir={tmp_path}", "--noeval", "--sample", *flags])
    assert res.returncode == 1 and res.stderr.startswith(message), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
