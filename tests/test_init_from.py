"""Starting a run from another run's parameters (`init.from_workdir`): checks before any
compilation, resharding onto another mesh, a fresh optimizer, and resume precedence."""

import shutil

import jax
import numpy as np
import pytest

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.finetune import get_config as finetune_config
from jaxlm.configs.sections import Config
from jaxlm.data.tokenizers import vocabulary
from jaxlm.evaluation.restore import restore_run
from tests.helpers import assert_trees_close, no_compilation, step0_run
from jaxlm.training import rundir, trainer
from jaxlm.training.experiment import Experiment
from jaxlm.training.init_from import check_source, first_model_difference, restore_initial_state


def _fast(c):
    c.steps, c.batch_size, c.eval_every, c.checkpoint_every, c.log_every = 2, 8, 0, 0, 1
    c.eval_batch_size, c.eval_max_batches = 8, 1
    return c


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A run with one step-0 checkpoint of a random init (written without training)."""
    from jaxlm.configs.shakespeare_char import get_config
    return step0_run(_fast(get_config("tiny")), tmp_path_factory.mktemp("source"))


def test_the_first_differing_model_key_is_named(tiny_config, source_run, tmp_path):
    c = _fast(tiny_config)
    c.init.from_workdir = str(source_run)
    c.model.d_ff, c.model.remat = 96, "none"  # remat is how it runs, not what it computes
    config = Config.from_dict(c)
    exp = Experiment.build(config, tmp_path, jax.devices()[:1])
    with no_compilation() as compiled, pytest.raises(ConfigError) as err:
        check_source(config, exp.model_cfg)
    assert str(err.value) == (f"init.from_workdir: model.d_ff is 96 here but 64 in "
                              f"{source_run}; the model must match")
    assert not compiled
    assert first_model_difference(config.model, config.model) is None


@pytest.mark.parametrize("what, message", [
    ("missing", "init.from_workdir: no such directory"),
    ("step", "init.step: no checkpoint for step 7 in"),
    ("vocab", "init.from_workdir: model.vocab_size is 80 here but 0 in"),
])
def test_bad_sources_are_one_line_errors(tiny_config, source_run, tmp_path, what, message):
    c = _fast(tiny_config)
    c.init.from_workdir = str(tmp_path / "nowhere" if what == "missing" else source_run)
    if what == "step":
        c.init.step = 7
    if what == "vocab":
        c.model.vocab_size = 80
    with pytest.raises(ConfigError, match=message):
        trainer.train(c, tmp_path / "run", jax.devices()[:1])
    assert not (tmp_path / "run" / "config.json").exists()  # checked before the run starts


def test_finetune_config_copies_the_model_and_names_the_source(source_run):
    c = finetune_config(str(source_run))
    config = Config.from_dict(c)
    assert config.model == rundir.load_config(source_run).model
    assert config.init.from_workdir == str(source_run)
    assert config.train == Config().train  # everything else is the base config's


@pytest.mark.slow
def test_start_from_a_run_on_another_mesh_then_resume_from_own_checkpoints(tiny_config,
                                                                          tmp_path):
    a = _fast(tiny_config.copy_and_resolve_references())
    a.steps, a.mesh.data, a.mesh.fsdp = 3, 2, 4
    trainer.train(a, tmp_path / "a", jax.devices())
    a_params = restore_run(tmp_path / "a", devices=jax.devices()[:1])[1].params

    b = _fast(tiny_config.copy_and_resolve_references())
    b.init.from_workdir = str(tmp_path / "a")
    b.mesh.data, b.mesh.tensor = 4, 2
    b.steps, b.checkpoint_every = 2, 1
    config = Config.from_dict(b)
    exp = Experiment.build(config, tmp_path / "b", jax.devices())
    source = check_source(config, exp.model_cfg)
    assert source.step is None  # the newest that restores
    state, step = restore_initial_state(exp, source)
    assert step == 3
    assert int(state.step) == 0
    assert_trees_close(jax.device_get(state.params), a_params, rtol=0, atol=0)
    assert all(float(np.abs(x).max()) == 0.0 for x in jax.tree.leaves(state.opt_state)
               if np.ndim(x) > 0)  # fresh AdamW moments
    q = state.params["blocks"]["attn"]["q"]["kernel"]
    assert q.sharding.spec == exp.state_shardings.params["blocks"]["attn"]["q"]["kernel"].spec

    summary = trainer.train(config, tmp_path / "b", jax.devices())
    assert summary["step"] == 2
    b.steps = 3  # resume: the run's own checkpoint at step 2 wins over the source
    shutil.rmtree(tmp_path / "a")
    resumed = trainer.train(Config.from_dict(b), tmp_path / "b", jax.devices(),
                            allow_schedule_change=True)
    assert resumed["step"] == 3


def _write_text(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _tokenizer_of(workdir):
    return rundir.load_data(rundir.load_config(workdir), workdir).tokenizer


def test_a_finetune_encodes_new_text_with_the_base_vocabulary(source_run, tmp_path):
    """configs/finetune.py:RUN keeps RUN's tokenizer: new text with fewer characters is
    encoded with the base's ids, not with a vocabulary fitted to it."""
    text = "ROMEO: a few words of new text, in characters the base knows.\n" * 40
    c = _fast(finetune_config(str(source_run)))
    c.warmup_steps = 1
    c.data.path = _write_text(tmp_path / "new.txt", text)
    trainer.train(c, tmp_path / "ft", jax.devices()[:1])
    base, tuned = _tokenizer_of(source_run), _tokenizer_of(tmp_path / "ft")
    assert vocabulary(tuned) == vocabulary(base)
    assert len(set(text)) < base.vocab_size == tuned.vocab_size


def test_a_character_the_base_lacks_is_one_line(source_run, tmp_path):
    c = _fast(finetune_config(str(source_run)))
    c.warmup_steps = 1
    c.data.path = _write_text(tmp_path / "new.txt", "ROMEO: caf\u00e9 au lait\n" * 40)
    with no_compilation() as compiled, pytest.raises(ConfigError) as err:
        trainer.train(c, tmp_path / "ft", jax.devices()[:1])
    assert str(err.value).startswith(f"data.path: {tmp_path / 'new.txt'}: character '\u00e9' "
                                     f"is not in the tokenizer's vocabulary (from:")
    assert not compiled and not (tmp_path / "ft" / "config.json").exists()


def test_another_vocabulary_than_the_source_is_refused(tiny_config, source_run, tmp_path):
    """init.from_workdir set by hand with a tokenizer fitted to the new text."""
    c = _fast(tiny_config)
    c.init.from_workdir = str(source_run)
    c.data.path = _write_text(tmp_path / "new.txt", "ROMEO: only a few characters\n" * 40)
    with no_compilation() as compiled, pytest.raises(ConfigError) as err:
        trainer.train(c, tmp_path / "ft", jax.devices()[:1])
    message = str(err.value)
    assert message.startswith("data.tokenizer: the data's tokenizer is not the one ")
    assert "missing" in message and f"data.tokenizer=from:{source_run}" in message
    assert not compiled


def test_a_source_whose_prepared_data_was_rebuilt_since_is_refused(tiny_config, tmp_path):
    """The source trained on a prepared set later rebuilt with another vocabulary of the
    same size: its data's tokenizer today is not the one it was trained with."""
    from jaxlm.data.prepare import prepare_corpus
    lines = [f"{i} To be, or not to be, that is the question.\n\n" for i in range(60)]
    prepared = tmp_path / "prepared"

    def build(text: str) -> None:
        prepare_corpus([_write_text(tmp_path / "docs.txt", text)], prepared, tokenizer="char",
                       workers=0, progress=False, overwrite=True, split_blank_lines=True)
    build("".join(lines))
    c = _fast(tiny_config)
    c.data.path, c.checkpoint_every = str(prepared), 2
    trainer.train(c, tmp_path / "source", jax.devices()[:1])
    build("".join(lines).replace("e", "\u00e9"))  # as many characters
    c.init.from_workdir = str(tmp_path / "source")
    with no_compilation() as compiled, pytest.raises(ConfigError) as err:
        trainer.train(c, tmp_path / "ft", jax.devices()[:1])
    assert str(err.value).startswith(f"init.from_workdir: the tokenizer of {prepared} is not "
                                     f"the one the run in {tmp_path / 'source'} was trained "
                                     f"with (characters '\u00e9' added, 'e' missing)")
    assert not compiled
