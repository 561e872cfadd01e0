"""`python -m jaxlm.data.prepare`: one flag per field of the `Prepare` section (options.py),
of its type, default and help; what they do is in docs/data.md and docs/finetuning.md."""

import sys

from absl import app, flags

from jaxlm.configs.cli import flags_parser
from jaxlm.configs.errors import ConfigError
from jaxlm.data.prepare.cli import run
from jaxlm.data.prepare.options import Prepare, base_type


_DEFINE = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           bool: flags.DEFINE_bool, tuple: flags.DEFINE_multi_string}
for _name, _field in Prepare.model_fields.items():
    _DEFINE[base_type(_field.annotation)](
        _name, None if _field.is_required() else _field.get_default(), _field.description,
        required=_field.is_required())


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    values = {name: flags.FLAGS[name].value for name in Prepare.model_fields}
    try:
        options = Prepare.of(**{**values, "input": tuple(values["input"])})
    except ConfigError as e:
        sys.exit(f"error: {e}")
    run(options)


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser())
