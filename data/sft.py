"""Supervised fine-tuning records -> token ids and per-token loss weights.

A record is one JSON line, either

  {"prompt": "...", "completion": "..."}
  {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}

and becomes one example: token ids and, for each token, its weight as a *target* (1 on
completion tokens, 0 on the rest). Prompt/completion: [BOS] prompt completion END, with
END = the tokenizer's EOS, or `end_text` (default "\\n") for tokenizers without one; the
completion and END weigh 1. Messages are rendered by the tokenizer's Hugging Face chat
template when it has one, else by the simple template

  {role}: {content}\\n            every message but the assistant's (weight 0)
  assistant: {content}END        assistant turns: "assistant: " 0, content and END 1

(`SIMPLE_TEMPLATE`, documented in docs/data.md). With a Hugging Face template the text
of each assistant turn is what rendering the turn adds after the conversation so far with
the generation prompt; everything else weighs 0, and nothing is added (the template
writes its own BOS and end-of-turn tokens). Pieces are tokenized one by one, so a token
never straddles the prompt/completion boundary.

A record that cannot become an example raises `BadRecord(reason, detail)`; `REASONS`
lists the reasons.
"""

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxlm.data.tokenizers import HFTokenizer, Tokenizer

ASSISTANT = "assistant"
DEFAULT_END_TEXT = "\n"
SIMPLE_TEMPLATE = "simple"
REASONS = {
    "invalid_utf8": "the line is not UTF-8",
    "invalid_json": "the line is not valid JSON",
    "not_an_object": "the line is not a JSON object",
    "missing_field": "no 'prompt' and 'completion', nor 'messages'",
    "ambiguous_fields": "both 'messages' and 'prompt'/'completion'",
    "not_a_string": "'prompt' or 'completion' is not a string",
    "bad_messages": "'messages' is not a list of {role, content} strings",
    "empty_completion": "the completion is empty (or no assistant turn has text)",
    "template_error": "the chat template failed or does not render turn by turn",
    "unencodable": "the tokenizer cannot encode the text",
    "too_long": "longer than seq_len + 1 tokens (pass --truncate to cut it)",
    "prompt_too_long": "no completion token left within seq_len + 1 tokens",
}


class BadRecord(Exception):
    """A record that cannot become an example: `reason` (a key of REASONS) and detail."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail or REASONS[reason]}")
        self.reason, self.detail = reason, detail or REASONS[reason]


@dataclasses.dataclass
class Example:
    tokens: np.ndarray  # int32 [n]
    weights: np.ndarray  # uint8 [n]: 1 where the token is a completion target
    key: bytes  # what the train/validation split hashes: the record's canonical text
    text_bytes: int  # UTF-8 bytes of the completion text (for bits per byte)
    truncated: bool = False


Piece = tuple[str | int, int]  # (text, or a special token id; weight)


# Chat templates.

class ChatTemplate:
    """A Hugging Face chat template (Jinja), rendered with the settings transformers uses
    (trim_blocks, lstrip_blocks, loop controls, `raise_exception`, `tojson`)."""

    def __init__(self, source: str, special_tokens: dict[str, str]):
        # Deferred: jinja2 loads only when a chat template renders messages.
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        self.source, self.special_tokens = source, dict(special_tokens)

        def raise_exception(message: str) -> None:
            raise jinja2.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None,
                   separators: Any = None, sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                              separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        self._errors = (jinja2.TemplateError,)
        self._template = env.from_string(source)

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(messages=list(messages),
                                         add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except self._errors as e:
            raise BadRecord("template_error", f"the chat template failed: {e}") from None
        except (TypeError, KeyError, IndexError, ValueError) as e:
            raise BadRecord("template_error", f"the chat template failed: {e!r}") from None

    def pieces(self, messages: Sequence[dict[str, str]]) -> list[Piece]:
        """Text pieces with weights: each assistant turn's own text weighs 1."""
        out: list[Piece] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != ASSISTANT:
                continue
            head = self.render(messages[:i], add_generation_prompt=True)
            full = self.render(messages[:i + 1], add_generation_prompt=False)
            if not head.startswith(done) or not full.startswith(head):
                raise BadRecord("template_error", f"rendering turn {i + 1} does not extend "
                                                  f"the conversation before it")
            out += [(head[len(done):], 0), (full[len(head):], 1)]
            done = full
        full = self.render(messages, add_generation_prompt=False)
        if not full.startswith(done):
            raise BadRecord("template_error", "the whole conversation does not extend its "
                                              "turns' rendering")
        out.append((full[len(done):], 0))
        return [p for p in out if p[0]]


def _config_token(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def find_chat_template(tok: Tokenizer, directory: Path | None) -> ChatTemplate | None:
    """The chat template of a Hugging Face tokenizer's directory (`chat_template.jinja`,
    or `chat_template` in tokenizer_config.json: a string, or the one named "default"),
    with its special tokens; None when it has none."""
    if not isinstance(tok, HFTokenizer) or directory is None:
        return None
    source, cfg = None, {}
    cfg_file = directory / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cfg = {}
    if (directory / "chat_template.jinja").is_file():
        source = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    elif isinstance(cfg.get("chat_template"), str):
        source = cfg["chat_template"]
    elif isinstance(cfg.get("chat_template"), list):
        named = {t.get("name"): t.get("template") for t in cfg["chat_template"]
                 if isinstance(t, dict)}
        source = named.get("default")
    if not source:
        return None
    return ChatTemplate(source, special_token_strings(tok, cfg))


def special_token_strings(tok: Tokenizer, cfg: dict[str, Any] | None = None) -> dict[str, str]:
    """`bos_token`, `eos_token` (and `unk_token`, `pad_token` when configured) as the
    strings a chat template sees."""
    out: dict[str, str] = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = _config_token((cfg or {}).get(name))
        if value is not None:
            out[name] = value
    if isinstance(tok, HFTokenizer):
        for name, i in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id)):
            if name not in out and i is not None:
                out[name] = tok.tok.id_to_token(i) or ""
    return out


def template_directory(spec_path: str | None) -> Path | None:
    """The directory a `hf:PATH` tokenizer spec names (PATH itself, or its parent)."""
    if spec_path is None:
        return None
    path = Path(spec_path)
    return path if path.is_dir() else path.parent


# Records.

def parse_record(line: bytes) -> dict[str, Any]:
    """A JSON line -> {"prompt", "completion"} or {"messages"}; raises BadRecord."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord("invalid_utf8", f"not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        record = json.loads(text)
    except ValueError as e:
        raise BadRecord("invalid_json", f"not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise BadRecord("not_an_object", f"a JSON {type(record).__name__}, not an object")
    has_pc = "prompt" in record or "completion" in record
    if "messages" in record:
        if has_pc:
            raise BadRecord("ambiguous_fields")
        return {"messages": _messages(record["messages"])}
    missing = [k for k in ("prompt", "completion") if k not in record]
    if missing:
        raise BadRecord("missing_field", f"no {' and no '.join(repr(k) for k in missing)} "
                                         f"field (has: {', '.join(record) or 'nothing'})")
    for k in ("prompt", "completion"):
        if not isinstance(record[k], str):
            raise BadRecord("not_a_string", f"{k!r} is a JSON "
                                            f"{type(record[k]).__name__}, not a string")
    if not record["completion"]:
        raise BadRecord("empty_completion", "'completion' is empty")
    return {"prompt": record["prompt"], "completion": record["completion"]}


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise BadRecord("bad_messages", "'messages' is not a non-empty list")
    out = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and m["role"] and
                isinstance(m.get("content"), str)):
            raise BadRecord("bad_messages", f"message {i + 1} is not an object with string "
                                            f"'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == ASSISTANT and m["content"] for m in out):
        raise BadRecord("empty_completion", "no assistant message has text")
    return out


def simple_pieces(messages: Sequence[dict[str, str]], end: str | int) -> list[Piece]:
    """The simple template: `{role}: {content}\\n` per message; assistant turns end with
    `end` (EOS id, or the end text) and their content and end weigh 1."""
    out: list[Piece] = []
    for m in messages:
        out.append((f"{m['role']}: ", 0))
        if m["role"] == ASSISTANT:
            out += [(m["content"], 1), (end, 1)]
        else:
            out.append((m["content"] + "\n", 0))
    return [p for p in out if p[0] != ""]


def record_pieces(record: dict[str, Any], tok: Tokenizer, template: ChatTemplate | None,
                  end_text: str) -> list[Piece]:
    """The weighted pieces of a parsed record, BOS and the completion end included."""
    end: str | int = tok.eos_id if tok.eos_id is not None else end_text
    if "messages" in record and template is not None:
        return template.pieces(record["messages"])
    head: list[Piece] = [] if tok.bos_id is None else [(tok.bos_id, 0)]
    if "messages" in record:
        return head + simple_pieces(record["messages"], end)
    body = [(record["prompt"], 0), (record["completion"], 1), (end, 1)]
    return head + [p for p in body if p[0] != ""]


def encode_pieces(tok: Tokenizer, pieces: Sequence[Piece]) -> tuple[np.ndarray, np.ndarray]:
    """(int32 ids, uint8 weights) of the pieces, each tokenized alone."""
    ids, weights = [], []
    for value, w in pieces:
        if isinstance(value, int):
            part = np.asarray([value], np.int32)
        else:
            try:
                part = tok.encode(value).astype(np.int32)
            except ValueError as e:
                raise BadRecord("unencodable", str(e)) from None
        ids.append(part)
        weights.append(np.full(len(part), w, np.uint8))
    if not ids:
        return np.zeros(0, np.int32), np.zeros(0, np.uint8)
    return np.concatenate(ids), np.concatenate(weights)


def make_example(line: bytes, tok: Tokenizer, template: ChatTemplate | None, *,
                 seq_len: int | None, truncate: bool = False,
                 end_text: str = DEFAULT_END_TEXT) -> Example:
    """One JSON line -> an Example of at most seq_len + 1 tokens (any length with
    seq_len None); raises BadRecord."""
    record = parse_record(line)
    pieces = record_pieces(record, tok, template, end_text)
    ids, weights = encode_pieces(tok, pieces)
    truncated = False
    if seq_len is not None and len(ids) > seq_len + 1:
        if not truncate:
            raise BadRecord("too_long", f"{len(ids)} tokens, more than seq_len + 1 = "
                                        f"{seq_len + 1}; pass --truncate to cut it")
        ids, weights, truncated = ids[:seq_len + 1], weights[:seq_len + 1], True
    if not weights[1:].any():  # the first token is never a target
        raise BadRecord("prompt_too_long" if truncated else "empty_completion",
                        "no completion token is a target" +
                        (f" within seq_len + 1 = {seq_len + 1} tokens" if truncated else ""))
    key = json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8")
    text_bytes = int(tok.token_bytes[ids[1:]][weights[1:] > 0].sum())
    return Example(ids, weights, key, text_bytes, truncated)
