"""Continue from another run's parameters: its model, a fresh optimizer, your data.

  python train.py --config=configs/finetune.py:runs/qwen --workdir=runs/qwen_ft \
      --config.data.path=corpus.txt --config.learning_rate=1e-4 --config.steps=500

The argument after the colon is a run directory (trained here, or imported from Hugging
Face with `convert.py --from_hf`). The config is the base config with that run's
`model` section, `init.from_workdir` set to it and `data.tokenizer=from:RUN` (the data is
encoded with the run's own vocabulary), and for a quantized run (eval.py --save) its
weights' format (`quant`: bits, format, granularity, symmetric), which a LoRA run on it
takes as its frozen base; every other key is yours to override
(`--config.init.step=N` picks one of its checkpoints, default its latest).
"""

import json
from pathlib import Path

from ml_collections import ConfigDict

from jaxlm.configs.base import get_base_config
from jaxlm.configs.sections import Quant


def get_config(arg: str | None = None) -> ConfigDict:
    if not arg:
        raise ValueError("configs/finetune.py: give the run to start from after a colon, "
                         "e.g. --config=configs/finetune.py:runs/qwen")
    saved = Path(arg) / "config.json"
    if not saved.is_file():
        raise ValueError(f"configs/finetune.py: {arg} has no config.json: not a run directory")
    c = get_base_config()
    c.name = f"{Path(arg).name}_finetune"
    saved_config = json.loads(saved.read_text())
    for key, value in saved_config["model"].items():
        if isinstance(value, dict):
            for sub, sub_value in value.items():
                c.model[key][sub] = sub_value
        else:
            c.model[key] = value
    saved_quant = saved_config.get("quant", {})
    if saved_quant.get("ptq"):  # a quantized run: its integers are the base, as stored
        for key in Quant.FORMAT_KEYS:
            c.quant[key] = saved_quant[key]
    c.init.from_workdir = str(Path(arg).absolute())
    c.data.tokenizer = f"from:{c.init.from_workdir}"  # the base's vocabulary encodes the data
    return c
