"""The config `convert.py --from_hf` starts from: the base config with batch sizes that
split over 1, 2, 4, 8, 16 or 32 data-parallel devices. The import replaces the `model`
section with the Hugging Face model's; every other key (mesh, data, training) is this
one's, overridden with `--config.KEY=VALUE`."""

from ml_collections import ConfigDict

from jaxlm.configs.base import get_base_config


def get_config(arg: str | None = None) -> ConfigDict:
    del arg
    c = get_base_config()
    c.batch_size = 32
    c.eval_batch_size = 256
    return c
