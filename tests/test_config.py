"""Typed config sections: defaults, round trips, limits beside the keys, dotted keys."""

import math

import pytest
from ml_collections import ConfigDict

from jaxlm.configs import keys
from jaxlm.configs.base import get_base_config
from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Config, Model, Quant, Sampling
from jaxlm.configs.shakespeare_char import get_config


@pytest.mark.parametrize("preset", [None, "large", "tiny", "moe"])
def test_presets_resolve_and_round_trip(preset):
    c = get_config(preset)
    config = Config.from_dict(c)
    assert config.to_dict() == c.to_dict()
    assert Config.from_dict(config.to_dict()) == config


def test_base_config_is_built_from_the_section_defaults():
    assert Config.from_dict(get_base_config()) == Config()
    assert get_base_config().model.moe.top_k == Model().moe.top_k


def test_sections_are_frozen():
    config = Config()
    with pytest.raises(Exception):
        config.train.steps = 5
    assert config.replace(steps=700, **{"model.d_model": 64}).train.steps == 700


@pytest.mark.parametrize("key, value, message", [
    ("steps", 0, "steps: must be a positive integer, got 0"),
    ("steps", True, "steps: must be an integer, got True"),
    ("learning_rate", math.nan, "learning_rate: must be a finite number, got nan"),
    ("learning_rate", math.inf, "learning_rate: must be a finite number, got inf"),
    ("beta2", 1.0, "beta2: must be in [0, 1), got 1.0"),
    ("min_learning_rate", 1.0, "min_learning_rate: 1.0 is above learning_rate 0.001"),
    ("model.dtype", "float64", "model.dtype: unknown value 'float64'; choose one of "
                               "['float32', 'bfloat16', 'float16']"),
    ("model.head_dim", 7, "model.head_dim: RoPE needs an even head_dim, got 7"),
    ("model.moe.jitter", -0.5, "model.moe.jitter: must be in [0, 1), got -0.5"),
    ("mesh.fsdp", -2, "mesh.fsdp: must be >= -1, got -2"),
    ("mesh.tensor", -1, "mesh.tensor: only one mesh axis may be -1"),
    ("mesh.data", 0, "mesh.data: must be a positive size or -1, got 0"),
    ("quant.granularity", "fine", "quant.granularity: 'fine' is not per_channel"),
    ("loss.distill.temperature", 0.0, "loss.distill.temperature: must be > 0, got 0.0"),
    ("data.val_fraction", 1.0, "data.val_fraction: must be in (0, 1), got 1.0"),
    ("data.vocab_size", 2**31, "data.vocab_size: 2147483648 is too large: token ids are int32 "
                               "(at most 2147483647)"),
])
def test_bad_values_name_their_key(key, value, message):
    d = get_base_config().to_dict()
    keys.set_value(d, key, value)
    with pytest.raises(ConfigError) as err:
        Config.from_dict(d)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key, suggestion", [
    ("learnin_rate", "learning_rate"),
    ("model.d_modle", "model.d_model"),
    ("model.moe.topk", "model.moe.top_k"),
])
def test_unknown_keys_suggest_the_closest(key, suggestion):
    d = get_base_config().to_dict()
    node = d
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = 1
    with pytest.raises(ConfigError, match=f"{key}: unknown config key; did you mean "
                                          f"'{suggestion}'"):
        Config.from_dict(d)


def test_dotted_keys_get_and_set():
    c = get_base_config()
    keys.set_value(c, "model.moe.top_k", 1)
    assert keys.get(c, "model.moe.top_k") == 1 == keys.get(Config.from_dict(c), "model.moe.top_k")
    with pytest.raises(ConfigError, match="model.num_layer: unknown config key in here; did you "
                                          "mean 'model.num_layers'"):
        keys.set_value(c, "model.num_layer", 2, "here")
    with pytest.raises(ConfigError, match="model: is a section, not a value"):
        keys.set_value(c, "model", 2)
    with pytest.raises(ConfigError, match="model.d_model: cannot set 'wide'"):
        keys.set_value(c, "model.d_model", "wide")
    assert "model.moe.capacity_factor" in keys.flat_keys(c)


def test_quant_group_must_divide_every_quantized_matrix():
    model = Model(d_model=32, num_heads=4, num_kv_heads=2, d_ff=48)
    Quant(weight_bits=4, granularity="16").check_divides(model)
    with pytest.raises(ConfigError, match="group size 32 does not divide the 48 input features "
                                          "of mlp.down"):
        Quant(weight_bits=4, granularity="32").check_divides(model)


def test_sampling_limits_and_prompt_lengths():
    with pytest.raises(ConfigError, match="top_p: must be in \\(0, 1\\], got 0.0"):
        Sampling.parse({"top_p": 0.0})
    with pytest.raises(ConfigError, match="prompt: every prompt needs at least one token"):
        Sampling().check_prompts([[1], []], 8)


def test_config_dict_and_typed_config_are_interchangeable_at_the_entry():
    c = ConfigDict(get_base_config().to_dict())
    assert Config.from_dict(c) is not None and Config.from_dict(Config.from_dict(c)) == \
        Config.from_dict(c)


def test_a_short_run_scales_the_default_warmup_but_not_a_chosen_one(capsys):
    from jaxlm.configs.sections import Config
    config = Config().replace(steps=20)
    assert config.updates.warmup_steps == 2
    assert "warming up for 2 steps" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="warmup_steps: 50 warm-up steps are more than steps 20"):
        Config().replace(steps=20, warmup_steps=50)
