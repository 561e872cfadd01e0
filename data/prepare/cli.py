"""What `python -m jaxlm.data.prepare` does with its checked flags: prepare, then print a
summary line (JSON); every failure is one line."""

import contextlib
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jaxlm.configs.errors import ConfigError, exit_on_environment_error
from jaxlm.data.prepare.api import corpus, prepare, sft
from jaxlm.data.prepare.formats import META
from jaxlm.data.prepare.options import Prepare
from jaxlm.data.readers import COMPRESSED, file_format

# The one-text builder takes the run config's `data` keys; the command names its flags.
_CONFIG_TO_FLAG = {"data.path": "--input", "data.tokenizer": "--tokenizer",
                   "data.val_fraction": "--val_fraction", "data.vocab_size": "--vocab_size"}


def run(options: Prepare) -> None:
    """Prepare as `options` say and print the summary; a failure exits with one line."""
    with one_line_on_failure(options.output):
        try:
            out = (sft(options) if options.format in ("sft", "preference") else
                   _text_or_corpus(options))
        except ConfigError as e:
            raise SystemExit(f"error: {e}") from None
        meta = json.loads((out / META).read_text())
        if options.format in ("sft", "preference"):
            for line in describe_bad(meta):
                print(line, file=sys.stderr)
        print(json.dumps(summary(out, meta)))


def is_one_text(options: Prepare) -> bool:
    """One plain, uncompressed text file, not split at blank lines: prepared as one text
    (the nanoGPT split by token position, format 1)."""
    path = options.input[0]
    return (len(options.input) == 1 and Path(path).is_file() and
            file_format(Path(path)) == "text" and not path.lower().endswith(COMPRESSED) and
            not options.split_blank_lines)


def _text_or_corpus(options: Prepare) -> Path:
    if not is_one_text(options):
        return corpus(options)
    try:
        return prepare(options.input[0], options.output, tokenizer=options.tokenizer,
                       val_fraction=options.val_fraction, vocab_size=options.vocab_size,
                       overwrite=options.overwrite)
    except ConfigError as e:
        raise ConfigError(_CONFIG_TO_FLAG.get(e.key, e.key), e.message) from None


def summary(out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The command's summary line of a prepared directory."""
    if meta.get("format") in ("sft", "preference"):
        return {"output": str(out), "vocab_size": meta["vocab_size"],
                "records": meta["records"], "examples": meta["examples"],
                "tokens": meta["counts"], "completion_tokens": meta["completion_tokens"],
                "truncated": meta["truncated"],
                "bad": {r: b["count"] for r, b in meta["bad"].items()},
                "template": meta["template"]}
    out_summary = {"output": str(out), "vocab_size": meta["vocab_size"], **meta["counts"]}
    if "documents" in meta:
        out_summary.update(documents=meta["documents"], skipped=meta["skipped"])
    return out_summary


def describe_bad(meta: dict[str, Any]) -> list[str]:
    """One line per reason of the bad records a prepared SFT directory skipped."""
    return [f"skipped {b['count']} bad record(s): {reason} (first at {b['file']}:"
            f"{b['line']}: {b['detail']})" for reason, b in meta.get("bad", {}).items()]


class _Terminated(Exception):
    """SIGTERM, raised in the main thread so that an unfinished build is cleaned up."""


@contextlib.contextmanager
def one_line_on_failure(output: str) -> Iterator[None]:
    """SIGTERM and Ctrl-C stop the build (its staging directory is removed on the way
    out), and they, a full disk and an unwritable --output exit with one line."""
    def on_sigterm(signum: int, frame: Any) -> None:
        raise _Terminated
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    except (KeyboardInterrupt, _Terminated) as e:
        why = "Ctrl-C" if isinstance(e, KeyboardInterrupt) else "SIGTERM"
        raise SystemExit(f"interrupted ({why}): {output} was not prepared; run the same "
                         "command again") from None
    except Exception as e:  # noqa: BLE001 -- a full disk or an unwritable path is one line
        exit_on_environment_error(e)
    finally:
        signal.signal(signal.SIGTERM, previous)
