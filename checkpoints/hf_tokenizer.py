"""The tokenizer and generation files of a Hugging Face export.

An export carries the tokenizer the run's data was encoded with, so `AutoTokenizer` on the
exported directory gives the run's ids:

- the Hugging Face files of the run it descends from (`convert.py --from_hf` keeps them in
  `RUN/hf/`; a fine-tuned or LoRA run finds them through `init.from_workdir`), when that
  run's `tokenizer.json` is the one the data was encoded with;
- else a `tokenizer.json` built with the `tokenizers` library from the run's tokenizer:
  `hf` and `bpe` copy their file, `char` is a WordLevel model over its characters (one
  token per character, ids in the run's order), `byte` a byte-level BPE without merges
  (token id = byte value); the end-of-document token is `<|endoftext|>`.

`generation_config.json` comes from the same origin, else holds the run's bos/eos ids.
"""

import json
import shutil
from pathlib import Path
from typing import Any

from jaxlm.checkpoints.hf_import import HF_DIR
from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Config
from jaxlm.data.tokenizers import HF_FILE, HFTokenizer, Tokenizer, file_sha256
from jaxlm.training import rundir

ORIGIN_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                "generation_config.json", "chat_template.jinja")
EOS_TOKEN = "<|endoftext|>"
MAX_ANCESTORS = 16  # init.from_workdir links followed back to an imported run


def origin_hf_dir(workdir: Path, config: Config, tok: Tokenizer) -> Path | None:
    """The `hf/` directory of `workdir` or of the run it started from (init.from_workdir,
    followed back), whose tokenizer.json is `tok`'s file; None when there is none."""
    if not isinstance(tok, HFTokenizer):
        return None
    for _ in range(MAX_ANCESTORS):
        candidate = workdir / HF_DIR / HF_FILE
        if candidate.is_file() and file_sha256(candidate) == tok.sha256:
            return candidate.parent
        if not config.init.from_workdir:
            return None
        workdir = Path(config.init.from_workdir)
        try:
            config = rundir.load_config(workdir)
        except ConfigError:  # the source run is gone: build the files instead
            return None
    return None


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte, as byte-level BPE files use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable}
    chars.update({b: chr(256 + i) for i, b in enumerate(others)})
    return chars


def build_tokenizer_json(tok: Tokenizer, out_file: Path) -> None:
    """A tokenizer.json that encodes and decodes exactly as `tok` does."""
    if isinstance(tok, HFTokenizer):
        shutil.copyfile(tok.path, out_file)
        return
    # Deferred: Hugging Face tokenizers loads only when a char or byte run is exported.
    from tokenizers import AddedToken, Regex, Tokenizer as HF, decoders, models, pre_tokenizers
    if tok.kind == "char":
        hf = HF(models.WordLevel({c: i for i, c in enumerate(tok.chars)}, unk_token=None))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex("(?m:.)|\n"), behavior="isolated")
        hf.decoder = decoders.Fuse()
    elif tok.kind == "byte":
        hf = HF(models.BPE({c: b for b, c in _byte_to_unicode().items()}, []))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
    else:
        raise ConfigError("data.tokenizer", f"a {tok.kind} tokenizer has no Hugging Face "
                                            f"tokenizer.json form to export")
    if tok.eos_id is not None:
        hf.add_special_tokens([AddedToken(EOS_TOKEN, special=True)])
        assert hf.token_to_id(EOS_TOKEN) == tok.eos_id, (hf.token_to_id(EOS_TOKEN), tok.eos_id)
    hf.save(str(out_file))


def _token_string(tok: Tokenizer, token_id: int | None) -> str | None:
    if token_id is None:
        return None
    if isinstance(tok, HFTokenizer):
        # Deferred: Hugging Face tokenizers loads only for hf and bpe runs.
        from tokenizers import Tokenizer as HF
        return HF.from_file(str(tok.path)).id_to_token(token_id)
    return EOS_TOKEN


def write_tokenizer_files(workdir: Path, config: Config, tok: Tokenizer, out_dir: Path,
                          max_length: int) -> list[str]:
    """Write the tokenizer and generation files of `tok` into `out_dir`; their names."""
    origin = origin_hf_dir(workdir, config, tok)
    if origin is not None:
        copied = [name for name in ORIGIN_FILES if (origin / name).is_file()]
        for name in copied:
            shutil.copyfile(origin / name, out_dir / name)
        return copied
    build_tokenizer_json(tok, out_dir / HF_FILE)
    specials = {f"{role}_token": _token_string(tok, getattr(tok, f"{role}_id"))
                for role in ("bos", "eos")}
    tokenizer_config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                                        "model_max_length": max_length,
                                        "clean_up_tokenization_spaces": False,
                                        **{k: v for k, v in specials.items() if v}}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    generation = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                  "max_length": max_length}
    (out_dir / "generation_config.json").write_text(json.dumps(
        {k: v for k, v in generation.items() if v is not None}, indent=2))
    return [HF_FILE, "tokenizer_config.json", "generation_config.json"]
