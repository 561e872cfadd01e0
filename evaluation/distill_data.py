"""Sequence-level distillation data: a teacher run's completions of prompts, written as a
JSON-lines file of SFT records (data/sft.py) that `python -m jaxlm.data.prepare
--format=sft` reads, with a sidecar `OUTPUT.meta.json` that records the teacher and the
settings.

  python -m jaxlm.evaluation.distill_data --workdir=TEACHER --prompts=prompts.jsonl \\
      --output=gen.jsonl --max_new_tokens=128 [--temperature=0.8 --top_k=40 --top_p=0.9]
  python -m jaxlm.evaluation.distill_data --workdir=TEACHER --prefixes=4096 \\
      --prefix_len=16 --split=train --output=gen.jsonl --end_text=

Prompts are `{"prompt": ...}` records (written back as `{"prompt", "completion"}`) or
`{"messages": [...]}` conversations (written back with the teacher's answer as one more
assistant message), or N prefixes of L tokens cut from a split of the teacher's prepared
data (or of `--data`). Each prompt is tokenized as the SFT example of its record will be
(BOS, the simple or the tokenizer's chat template), so the teacher continues exactly the
tokens the student will see before the completion. A completion ends at END, where the
SFT example ends: the tokenizer's EOS, else `--end_text` (the same flag of prepare; empty:
no END, every completion is `--max_new_tokens` tokens). Completions that are empty are
counted and left out (the SFT reader refuses them).

The teacher runs on its own mesh (data parallel over the devices, `--tensor` and
`--fsdp` as asked), sampling with the KV-cache decoder (`inference/generate.py`), greedy
at `--temperature=0`; batch j of `--batch_size` prompts samples with seed `--seed + j`.
"""

import json
import os
import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

import jax
import numpy as np
from absl import app, flags, logging
from pydantic import model_validator

from jaxlm.configs.cli import Launch, flags_parser
from jaxlm.configs.errors import ConfigError, RunError, exit_on_environment_error
from jaxlm.configs.sections import NonNegativeInt, PositiveInt, Sampling, Section, require
from jaxlm.data import fingerprints
from jaxlm.data.pipeline import TokenData
from jaxlm.data.prepare import is_prepared, prepared_directory_of, sft_tokenizer
from jaxlm.data.sft import (DEFAULT_END_TEXT, BadRecord, ChatTemplate, encode_pieces,
                            parse_prompt, prompt_pieces)
from jaxlm.data.tokenizers import Tokenizer, file_sha256, first_vocabulary_difference
from jaxlm.evaluation.generation_set import cut_at_stop
from jaxlm.evaluation.request import Generate
from jaxlm.evaluation.restore import restore_run
from jaxlm.evaluation.sampling import continue_ids
from jaxlm.parallel.distributed import initialize
from jaxlm.storage import dirs
from jaxlm.training import rundir

META_SUFFIX = ".meta.json"  # the sidecar: OUTPUT + this
KIND = "jaxlm sequence-level distillation data"


class DistillData(Section):
    """The settings of one generation: the teacher, the prompts, how to decode, where."""
    FLAT_KEYS: ClassVar[bool] = True  # errors name the flag (--top_p)
    workdir: str  # the teacher: a training run's directory
    step: int | None = None  # default: the latest checkpoint
    prompts: str | None = None  # a JSON-lines file of {prompt} or {messages} records
    prefixes: NonNegativeInt = 0  # or: cut this many prefixes from a prepared split
    prefix_len: PositiveInt = 16  # tokens per prefix
    split: Literal["train", "val"] = "train"
    data: str | None = None  # a prepared directory for --prefixes (default: the run's)
    output: str  # the JSON-lines file to write
    max_new_tokens: PositiveInt = 128
    sampling: Sampling = Sampling()  # temperature 0: greedy
    seed: int = 0
    batch_size: PositiveInt = 64  # prompts generated at once
    end_text: str = DEFAULT_END_TEXT  # END for tokenizers without EOS (as prepare's)
    chat_template: str = "auto"  # auto | simple | a Jinja file (as prepare's)
    tensor: PositiveInt = 1  # the teacher's mesh: tensor parallelism
    fsdp: PositiveInt = 1  # and parameter sharding; data parallel over the rest
    overwrite: bool = False  # replace an output made from other inputs or settings

    @model_validator(mode="after")
    def _one_source(self) -> "DistillData":
        require((self.prompts is None) != (self.prefixes == 0), "prompts",
                "give either --prompts=FILE.jsonl or --prefixes=N (with --prefix_len), "
                "not both" if self.prompts else "give --prompts=FILE.jsonl or --prefixes=N")
        require(self.data is None or self.prefixes > 0, "data",
                "is where --prefixes are cut from; add --prefixes=N, or drop --data")
        return self

    def decoding(self) -> dict[str, Any]:
        """How completions are decoded, as recorded beside them."""
        sp = self.sampling
        method: dict[str, Any] = {"method": "greedy"} if sp.temperature <= 0 else {
            "method": "sample", "temperature": sp.temperature, "top_k": sp.top_k,
            "top_p": sp.top_p, "seed": self.seed}
        return {**method, "max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size,
                "end_text": self.end_text, "chat_template": self.chat_template}


# Prompts.

def read_prompts(path: str) -> list[dict[str, Any]]:
    """The prompt records of a JSON-lines file; a bad line is one error naming it."""
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as e:
        raise ConfigError("prompts", f"cannot read {path} ({e.strerror or e}); give a "
                                     f"JSON-lines file of prompts") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(parse_prompt(line))
        except BadRecord as e:
            raise ConfigError("prompts", f"{path} line {n}: {e.detail}; each line is "
                                         f'{{"prompt": "..."}} or {{"messages": [...]}}') from None
    if not records:
        raise ConfigError("prompts", f"{path} holds no prompts; give one JSON object per "
                                     f'line: {{"prompt": "..."}} or {{"messages": [...]}}')
    return records


def prefix_prompts(data: TokenData, tok: Tokenizer, n: int, length: int, split: str
                   ) -> list[dict[str, Any]]:
    """`n` prompts of `length` tokens, evenly spaced: the first tokens of documents (after
    BOS) in a corpus of documents, windows of the text in a one-text set."""
    tokens, offsets = data.tokens(split), data.docs(split)
    skip = int(tok.bos_id is not None and data.train_docs is not None)
    starts = offsets[:-1] + skip
    if len(starts) > 1:
        starts = starts[offsets[1:] - starts >= length + skip]  # never into EOS
        if len(starts) < n:
            raise ConfigError("prefixes", f"the {split} split of {data.path} has "
                                          f"{len(starts)} documents of {length} tokens or "
                                          f"more (--prefix_len), fewer than --prefixes={n}")
        starts = starts[np.linspace(0, len(starts) - 1, n).round().astype(np.int64)]
    else:
        if n * length > len(tokens):
            raise ConfigError("prefixes", f"--prefixes={n} of --prefix_len={length} tokens "
                                          f"do not fit the {len(tokens):,} tokens of the "
                                          f"{split} split of {data.path} without overlapping")
        starts = np.linspace(0, len(tokens) - length, n).astype(np.int64)
    return [{"prompt": tok.decode(np.asarray(tokens[s:s + length]).tolist())} for s in starts]


def prompt_ids(records: list[dict[str, Any]], tok: Tokenizer, template: ChatTemplate | None,
               end_text: str, context: int, where: str) -> list[list[int]]:
    """Each record's prompt tokens, as its SFT example begins; one error for a prompt that
    cannot be encoded, is empty or does not fit the teacher's context."""
    out = []
    for n, record in enumerate(records, 1):
        try:
            ids = encode_pieces(tok, prompt_pieces(record, tok, template, end_text))[0]
        except BadRecord as e:
            raise ConfigError("prompts", f"{where} prompt {n}: {e.detail}") from None
        require(len(ids) > 0, "prompts", f"{where} prompt {n} is empty and the tokenizer has "
                                         f"no BOS to start from; give it some text")
        require(len(ids) <= context, "prompts",
                f"{where} prompt {n} is {len(ids)} tokens, longer than the teacher's context "
                f"of {context} tokens (seq_len); shorten it")
        out.append(ids.tolist())
    return out


def load_prefix_data(req: DistillData, tok: Tokenizer) -> TokenData:
    """The prepared set --prefixes are cut from, which must use the teacher's tokenizer."""
    key = "data" if req.data else "workdir"
    directory = Path(req.data) if req.data else prepared_directory_of(req.workdir, key)
    if directory is None or not is_prepared(directory):
        raise ConfigError(key, f"{directory} is not a prepared data directory; prepare it "
                               f"with the teacher's tokenizer (python -m jaxlm.data.prepare)")
    data = TokenData.load(directory)
    difference = first_vocabulary_difference(tok, data.tokenizer)
    require(difference is None, key, f"{directory} was prepared with another tokenizer than "
                                     f"the teacher's ({difference})")
    return data


# Output.

def meta_path(output: Path) -> Path:
    return output.with_name(output.name + META_SUFFIX)


def read_meta(output: Path) -> dict[str, Any] | None:
    """The sidecar of an output this command wrote, or None."""
    try:
        meta = json.loads(meta_path(output).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("kind") == KIND else None


def check_own(output: Path) -> None:
    """Refuse an `output` that is a directory or a file this command did not write."""
    if output.is_dir():
        raise ConfigError("output", f"{output} is a directory; --output names the JSON-lines "
                                    f"file to write")
    if output.exists() and read_meta(output) is None:
        raise ConfigError("output", f"{output} exists and was not written by this command "
                                    f"(no {meta_path(output).name} beside it); choose another "
                                    f"--output")


def check_output(output: Path, settings: dict[str, Any], overwrite: bool) -> bool:
    """Whether `output` must be written: False when it holds these settings' generations
    already; refused as `check_own` says, or when it was made from other settings and
    `overwrite` is not given."""
    check_own(output)
    if not output.exists():
        return True
    meta = read_meta(output) or {}
    if meta.get("settings") == settings and meta.get("records_sha256") == file_sha256(output):
        return False
    require(overwrite, "output", f"{output} holds generations of another teacher, prompts or "
                                 f"settings; pass --overwrite to replace it, or choose another "
                                 f"--output")
    return True


def teacher_record(workdir: str, step: int) -> dict[str, Any]:
    """The teacher: its directory, step and the sha256 of that checkpoint's files."""
    record = {"workdir": str(Path(workdir).absolute()), "step": step,
              "checkpoint_sha256": fingerprints.base_sha256(
                  rundir.checkpoint_dir(workdir) / str(step))}
    lora_base = fingerprints.read(workdir).get("lora_base")
    return {**record, "lora_base": lora_base} if lora_base else record


def prompts_record(req: DistillData, prefix_data: TokenData | None) -> dict[str, Any]:
    """Where the prompts came from: the file and its sha256, or the prefixes' source."""
    if prefix_data is None:
        return {"file": str(Path(req.prompts).absolute()), "sha256": file_sha256(Path(req.prompts))}
    return {"prefixes": req.prefixes, "prefix_len": req.prefix_len, "split": req.split,
            "data": str(prefix_data.path.absolute()),
            "data_fingerprint": fingerprints.data_fingerprint(prefix_data.path)}


def output_records(records: list[dict[str, Any]], completions: list[str]
                   ) -> list[dict[str, Any]]:
    """SFT records of the non-empty completions: {prompt, completion}, or the messages
    with the completion as the assistant's next message."""
    out = []
    for record, completion in zip(records, completions, strict=True):
        if not completion:
            continue
        if "messages" in record:
            out.append({"messages": record["messages"] +
                        [{"role": "assistant", "content": completion}]})
        else:
            out.append({"prompt": record["prompt"], "completion": completion})
    return out


def prepare_command(req: DistillData) -> str:
    """The command that prepares the output for training with the teacher's tokenizer."""
    end = "" if req.end_text == DEFAULT_END_TEXT else f" --end_text={json.dumps(req.end_text)}"
    template = "" if req.chat_template == "auto" else f" --chat_template={req.chat_template}"
    return (f"python -m jaxlm.data.prepare --format=sft --input={req.output} "
            f"--output=DIR --tokenizer={req.workdir}{end}{template}")


def write_output(output: Path, lines: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """The records and their sidecar, each through a temporary file and a rename; the
    sidecar first, holding the records' sha256, so that a half-finished write is never
    taken for a finished one."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        meta = {**meta, "records_sha256": file_sha256(tmp)}
        dirs.write_text_atomically(meta_path(output), json.dumps(meta, indent=1) + "\n")
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)


# The command.

def completions(req: DistillData, exp: Any, params: Any, ids: list[list[int]]) -> list[str]:
    """The teacher's completions, up to (without) END."""
    g = Generate(length=req.max_new_tokens, seed=req.seed)
    out = continue_ids(exp, params, ids, g, req.sampling, req.batch_size, sharded=True)
    tok = exp.data.tokenizer
    stop = req.end_text if tok.eos_id is None else None
    return [cut_at_stop(tok.decode(o), stop) for o in out]


def generate_sft(req: DistillData, devices: list[jax.Device] | None = None) -> dict[str, Any]:
    """Generate and write the SFT file (process 0); returns the summary line's fields."""
    context = rundir.load_config(req.workdir).train.seq_len
    try:
        tok, template = sft_tokenizer(req.workdir, req.chat_template)
    except ConfigError as e:
        raise ConfigError("chat_template" if "template" in e.message else "workdir",
                          e.message) from None
    if tok.eos_id is None and req.end_text:
        try:
            tok.encode(req.end_text)
        except ValueError as e:
            raise ConfigError("end_text", f"{req.end_text!r}: {e}") from None
    prefix_data = load_prefix_data(req, tok) if req.prefixes else None
    records = read_prompts(req.prompts) if prefix_data is None else prefix_prompts(
        prefix_data, tok, req.prefixes, req.prefix_len, req.split)
    ids = prompt_ids(records, tok, template, req.end_text, context, req.prompts or "--prefixes")
    output = Path(req.output).absolute()
    with dirs.output_lock(output):
        check_own(output)  # before the teacher is restored
        exp, state, step = restore_run(req.workdir, req.step, devices,
                                       {"mesh.tensor": req.tensor, "mesh.fsdp": req.fsdp})
        settings = {"teacher": teacher_record(req.workdir, step),
                    "prompts": prompts_record(req, prefix_data), "decoding": req.decoding()}
        summary = {"output": str(output), "teacher_step": step, "prompts": len(records)}
        if not check_output(output, settings, req.overwrite):
            return {**summary, **read_meta(output)["counts"], "unchanged": True}
        texts = completions(req, exp, state.params, ids)
        lines = output_records(records, texts)
        counts = {"records": len(lines), "empty": len(texts) - len(lines)}
        meta = {"kind": KIND, "records": output.name, "settings": settings, "counts": counts,
                "mesh": dict(exp.mesh.shape), "prepare": prepare_command(req)}
        if jax.process_index() == 0:
            write_output(output, lines, meta)
    return {**summary, **counts}


def main(argv: list[str]) -> None:
    """`python -m jaxlm.evaluation.distill_data`: flags in, one JSON summary line out."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if logging.get_verbosity() == logging.INFO:  # orbax's restore logs: noise here
        logging.set_verbosity(logging.ERROR)
    f = flags.FLAGS
    try:
        req = DistillData.parse(dict(
            workdir=f.workdir, step=f.step, prompts=f.prompts, prefixes=f.prefixes,
            prefix_len=f.prefix_len, split=f.split, data=f.data, output=f.output,
            max_new_tokens=f.max_new_tokens, seed=f.seed, batch_size=f.batch_size,
            sampling={"temperature": f.temperature, "top_k": f.top_k, "top_p": f.top_p},
            end_text=f.end_text, chat_template=f.chat_template, tensor=f.tensor,
            fsdp=f.fsdp, overwrite=f.overwrite))
        initialize(**Launch.parse(dict(cpu_devices=f.cpu_devices)).to_dict())
        print(json.dumps(generate_sft(req)), flush=True)
    except (ConfigError, RunError) as e:
        sys.exit(f"error: {e}")
    except Exception as e:  # noqa: BLE001 -- a full disk or an unwritable path is one line
        exit_on_environment_error(e)


def define_flags() -> None:
    """The command's flags (the fields of DistillData, sampling's flattened): defined
    only when the module runs as the command."""
    d = DistillData.model_fields
    flags.DEFINE_string("workdir", None, "The teacher: a training run's directory.",
                        required=True)
    flags.DEFINE_integer("step", None, "The teacher's checkpoint step (default: the latest).")
    flags.DEFINE_string("prompts", None, "A JSON-lines file of {\"prompt\"} or {\"messages\"} "
                        "records.")
    flags.DEFINE_integer("prefixes", 0, "Instead of --prompts: cut this many prefixes from "
                         "a split of the teacher's data (or of --data).")
    flags.DEFINE_integer("prefix_len", d["prefix_len"].default, "Tokens per prefix.")
    flags.DEFINE_string("split", "train", "--prefixes' split: train | val.")
    flags.DEFINE_string("data", None, "A prepared directory (the teacher's tokenizer) to cut "
                        "--prefixes from.")
    flags.DEFINE_string("output", None, "The SFT JSON-lines file to write (and OUTPUT"
                        f"{META_SUFFIX}).", required=True)
    flags.DEFINE_integer("max_new_tokens", d["max_new_tokens"].default,
                         "Tokens to generate per prompt at most.")
    flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
    flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
    flags.DEFINE_integer("seed", 0, "Sampling seed (batch j uses seed + j).")
    flags.DEFINE_integer("batch_size", d["batch_size"].default, "Prompts generated at once.")
    flags.DEFINE_string("end_text", DEFAULT_END_TEXT, "END for a tokenizer without EOS: a "
                        "completion stops before it (as prepare's --end_text; empty: none).")
    flags.DEFINE_string("chat_template", "auto", "auto | simple | a Jinja template file "
                        "(as prepare's).")
    flags.DEFINE_integer("tensor", 1, "The teacher's tensor-parallel degree.")
    flags.DEFINE_integer("fsdp", 1, "The teacher's parameter-sharding degree.")
    flags.DEFINE_bool("overwrite", False, "Replace an output generated with other inputs or "
                      "settings.")
    flags.DEFINE_integer("cpu_devices", 0, "Use N fake CPU devices.")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=flags_parser())
