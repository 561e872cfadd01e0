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
import functools
import json
import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxlm.configs.errors import ConfigError
from jaxlm.data.readers import BadLine, json_line
from jaxlm.data.tokenizers import HFTokenizer, Tokenizer

ASSISTANT = "assistant"
DEFAULT_END_TEXT = "\n"
SIMPLE_TEMPLATE = "simple"
REASONS = {
    "invalid_utf8": "the line is not UTF-8",
    "invalid_json": "the line is not valid JSON (or nested too deeply, or holds a lone "
                    "surrogate escape)",
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

# What one rendering may produce, for a conversation of n characters (its roles, contents
# and special tokens): TEMPLATE_BASE + TEMPLATE_PER_CHAR * n characters of output (every
# piece a template emits counts, also inside macros and {% set %} blocks), loop steps, and
# characters or items in any one value it builds.
TEMPLATE_BASE = 1 << 20
TEMPLATE_PER_CHAR = 16


class TemplateLimit(Exception):
    """A chat template rendering that exceeds its bound (see TEMPLATE_BASE)."""


class _Budget:
    """The bound of one rendering: `spend` counts output characters and loop steps,
    `size` checks one value."""

    def __init__(self) -> None:
        self.limit, self.spent = 0, 0

    def start(self, limit: int) -> None:
        self.limit, self.spent = limit, 0

    def spend(self, n: int, what: str) -> None:
        self.spent += n
        if self.spent > self.limit:
            raise TemplateLimit(f"the chat template produces more than {self.limit:,} "
                                f"characters and loop steps ({what}) for this record")

    def size(self, n: int, what: str) -> None:
        if n > self.limit:
            raise TemplateLimit(f"the chat template builds {what} of {n:,} characters or "
                                f"items, more than the {self.limit:,} this record allows")


def _length(x: Any) -> int:
    return len(x) if isinstance(x, (str, list, tuple, dict)) else 0


_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[#0 +\-]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_widths(budget: _Budget, specs: Sequence[str], args: Sequence[Any]) -> None:
    """Widths and precisions in format specs, and `*` widths from int arguments."""
    for spec in specs:
        for number in re.findall(r"\d+", spec):
            budget.size(int(number), "a formatted field")
    if any("*" in spec or "{" in spec for spec in specs):
        for a in args:
            if isinstance(a, int):
                budget.size(abs(a), "a formatted field")


def _printf_specs(text: str) -> list[str]:
    return [m.group(0) for m in _PRINTF_SPEC.finditer(text)]


def _format_specs(text: str) -> list[str]:
    try:
        return [spec or "" for _, _, spec, _ in string.Formatter().parse(text)]
    except ValueError:
        return []  # str.format raises the same error itself


def _check_str_call(budget: _Budget, s: str, name: str, args: tuple, kwargs: dict) -> None:
    """The size of what a str method will build, checked before it runs."""
    first = args[0] if args else next(iter(kwargs.values()), None)
    if name in ("center", "ljust", "rjust", "zfill") and isinstance(first, int):
        budget.size(first, f"str.{name}")
    elif name == "expandtabs":
        tab = first if isinstance(first, int) else 8
        budget.size(len(s) + max(tab, 0) * s.count("\t"), "str.expandtabs")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and \
            isinstance(args[1], str):
        _check_replace(budget, s, args[0], args[1], args[2] if len(args) > 2 else -1)
    elif name == "join" and isinstance(first, (list, tuple)):
        budget.size(sum(_length(x) for x in first) + len(s) * max(len(first) - 1, 0),
                    "str.join")
    elif name in ("format", "format_map"):
        _check_widths(budget, _format_specs(s), [*args, *kwargs.values()])


def _check_replace(budget: _Budget, s: str, old: str, new: str, count: Any) -> None:
    n = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    budget.size(len(s) + n * (len(new) - len(old)), "a replacement")


def _bounded_filters(env: Any, budget: _Budget) -> None:
    """Every filter's result is size-checked; those that build from a size argument
    (center, indent, batch, slice, format, replace, join) are checked before they run."""

    def before(name: str, value: Any, rest: tuple, kwargs: dict) -> None:
        first = rest[0] if rest else next(iter(kwargs.values()), None)
        if name in ("center", "batch", "slice") and isinstance(first, int):
            budget.size(first, f"the {name} filter")
        elif name == "indent" and isinstance(value, str):
            width = first if first is not None else 4
            pad = width if isinstance(width, int) else _length(width)
            budget.size(len(value) + max(pad, 0) * (value.count("\n") + 1), "the indent filter")
        elif name == "format" and isinstance(value, str):
            _check_widths(budget, _printf_specs(value), [*rest, *kwargs.values()])
        elif name == "replace" and isinstance(value, str) and len(rest) >= 2:
            _check_replace(budget, value, str(rest[0]), str(rest[1]),
                           rest[2] if len(rest) > 2 else kwargs.get("count"))
        elif name == "join" and isinstance(value, (list, tuple)):
            sep = first if isinstance(first, str) else ""
            budget.size(sum(_length(x) for x in value) + len(sep) * max(len(value) - 1, 0),
                        "the join filter")

    def wrap(name: str, f: Any) -> Any:
        skip = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0

        @functools.wraps(f)
        def bounded(*args: Any, **kwargs: Any) -> Any:
            if len(args) > skip:
                before(name, args[skip], args[skip + 1:], kwargs)
            result = f(*args, **kwargs)
            budget.size(_length(result), f"the {name} filter's result")
            return result
        return bounded

    env.filters = {name: wrap(name, f) for name, f in env.filters.items()}


def _bounded_environment(budget: _Budget) -> Any:
    """An ImmutableSandboxedEnvironment whose operators, calls, filters, range, loops and
    output are bounded by `budget`."""
    # Deferred: jinja2 loads only when a chat template renders messages.
    import jinja2
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "+", "**", "%"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                        budget.size(len(seq) * max(n, 0), "a repetition")
            elif operator == "+" and isinstance(left, (str, list, tuple)) and \
                    isinstance(right, (str, list, tuple)):
                budget.size(len(left) + len(right), "a concatenation")
            elif operator == "**" and isinstance(left, int) and isinstance(right, int) and \
                    abs(left) > 1 and right > 0:
                budget.size(right * left.bit_length() // 3, "a power")
            elif operator == "%" and isinstance(left, str):
                args = right if isinstance(right, tuple) else (right,)
                _check_widths(budget, _printf_specs(left), args)
            result = super().call_binop(context, operator, left, right)
            budget.size(_length(result), "a value")
            return result

        def call(__self, __context: Any, __obj: Any, *args: Any,
                 **kwargs: Any) -> Any:
            target = getattr(__obj, "__wrapped__", __obj)
            owner = getattr(target, "__self__", None)
            if isinstance(owner, str):
                _check_str_call(budget, owner, getattr(target, "__name__", ""), args, kwargs)
            result = super().call(__context, __obj, *args, **kwargs)
            budget.size(_length(result), "a value")
            return result

    env = Bounded(trim_blocks=True, lstrip_blocks=True,
                  extensions=["jinja2.ext.loopcontrols"])
    safe_range = env.globals["range"]

    def bounded_range(*args: int) -> range:
        r = safe_range(*args)
        budget.size(len(r), "a range")
        return r

    def steps(iterable: Any) -> Any:
        for x in iterable:
            budget.spend(1, "loop steps")
            yield x

    def emit(value: Any) -> Any:
        budget.spend(len(str(value)), "output")
        return value

    def concat(*values: Any) -> str:
        budget.size(sum(len(str(v)) for v in values), "a ~ concatenation")
        return "".join(str(v) for v in values)

    env.globals.update(range=bounded_range, jaxlm_steps=steps, jaxlm_emit=emit,
                       jaxlm_concat=concat)
    env.globals.pop("lipsum", None)  # builds text from a count alone

    def call(name: str, args: list, lineno: int) -> Any:
        return nodes.Call(nodes.Name(name, "load", lineno=lineno), args, [], None, None,
                          lineno=lineno)

    class Transform(jinja2.visitor.NodeTransformer):
        """Loops count their steps, each piece of output counts its characters, and `~`
        checks the size of what it joins."""

        def visit_For(self, node: Any) -> Any:
            node = self.generic_visit(node)
            node.iter = call("jaxlm_steps", [node.iter], node.lineno)
            return node

        def visit_Output(self, node: Any) -> Any:
            node = self.generic_visit(node)
            node.nodes = [call("jaxlm_emit", [n], n.lineno) for n in node.nodes]
            return node

        def visit_Concat(self, node: Any) -> Any:
            node = self.generic_visit(node)
            return call("jaxlm_concat", node.nodes, node.lineno)

    env.bounded_transform = Transform()
    return env


class ChatTemplate:
    """A Hugging Face chat template (Jinja), rendered with the settings transformers uses
    (trim_blocks, lstrip_blocks, loop controls, `raise_exception`, `tojson`), in a
    sandbox that bounds what one rendering may produce (TEMPLATE_BASE). `origin` names
    where the source came from, for the error a template that does not parse raises."""

    def __init__(self, source: str, special_tokens: dict[str, str],
                 origin: str = "the chat template"):
        # Deferred: jinja2 loads only when a chat template renders messages.
        import jinja2
        self.source, self.special_tokens = source, dict(special_tokens)
        self._budget = _Budget()

        def raise_exception(message: str) -> None:
            raise jinja2.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None,
                   separators: Any = None, sort_keys: bool = False) -> str:
            if isinstance(indent, int):
                self._budget.size(indent, "a tojson indent")
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                              separators=separators, sort_keys=sort_keys)

        env = _bounded_environment(self._budget)
        env.filters["tojson"] = tojson
        _bounded_filters(env, self._budget)
        env.globals["raise_exception"] = raise_exception
        self._errors = (jinja2.TemplateError,)
        try:
            tree = env.bounded_transform.visit(env.parse(source))
            self._template = env.from_string(tree)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError("--chat_template", f"{origin} is not a valid Jinja template "
                                                 f"({e.message}, line {e.lineno}); fix it, "
                                                 f"or pass --chat_template=simple or a "
                                                 f"template file") from None
        except RecursionError:
            raise ConfigError("--chat_template", f"{origin} is nested too deeply to parse; "
                                                 f"pass --chat_template=simple or a "
                                                 f"template file") from None

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
        size = sum(len(m["role"]) + len(m["content"]) for m in messages) + \
            sum(len(v) for v in self.special_tokens.values())
        self._budget.start(TEMPLATE_BASE + TEMPLATE_PER_CHAR * size)
        try:
            return self._template.render(messages=list(messages),
                                         add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except TemplateLimit as e:
            raise BadRecord("template_error", str(e)) from None
        except RecursionError:
            raise BadRecord("template_error", "the chat template recursed too deeply (a "
                                              "macro that calls itself?)") from None
        except self._errors as e:
            raise BadRecord("template_error", f"the chat template failed: {e}") from None
        except (TypeError, KeyError, IndexError, ValueError, OverflowError) as e:
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
    origin = cfg_file
    if (directory / "chat_template.jinja").is_file():
        origin = directory / "chat_template.jinja"
        source = origin.read_text(encoding="utf-8")
    elif isinstance(cfg.get("chat_template"), str):
        source = cfg["chat_template"]
    elif isinstance(cfg.get("chat_template"), list):
        named = {t.get("name"): t.get("template") for t in cfg["chat_template"]
                 if isinstance(t, dict)}
        source = named.get("default")
    if not source or not isinstance(source, str):
        return None
    return ChatTemplate(source, special_token_strings(tok, cfg),
                        f"the chat template of {origin}")


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


def choose_template(chat_template: str, tok: Tokenizer, found: ChatTemplate | None
                    ) -> ChatTemplate | None:
    """`--chat_template`: `auto` (`found`, the tokenizer's own template, when there is one,
    else the simple template: None), `simple` (None), or a Jinja template file."""
    if chat_template == "auto":
        return found
    if chat_template == SIMPLE_TEMPLATE:
        return None
    file = Path(chat_template)
    if not file.is_file():
        raise ConfigError("--chat_template", f"expected auto, simple or a Jinja template "
                                             f"file; no such file: {file}")
    try:
        source = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("--chat_template", f"{file} is not UTF-8 text ({e.reason} at byte "
                                             f"{e.start})") from None
    return ChatTemplate(source, special_token_strings(tok), str(file))


def saved_template(meta: dict[str, Any], where: Path) -> ChatTemplate | None:
    """The chat template a prepared SFT directory's meta.json (at `where`) recorded."""
    saved = meta.get("chat_template")
    if not isinstance(saved, dict):
        return None
    if not (isinstance(saved.get("source"), str) and
            isinstance(saved.get("special_tokens"), dict)):
        raise ConfigError("--tokenizer", f"{where} is damaged (its chat_template has no "
                                         f"source and special_tokens); prepare it again")
    return ChatTemplate(saved["source"], saved["special_tokens"], f"the chat template in {where}")


# Records.

def json_object(line: bytes) -> dict[str, Any]:
    """A JSON line that holds an object; raises BadRecord."""
    try:
        record = json_line(line)
    except BadLine as e:
        raise BadRecord(e.reason, e.detail) from None
    if not isinstance(record, dict):
        raise BadRecord("not_an_object", f"a JSON {type(record).__name__}, not an object")
    return record


def parse_record(line: bytes) -> dict[str, Any]:
    """A JSON line -> {"prompt", "completion"} or {"messages"}; raises BadRecord."""
    record = json_object(line)
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


def _messages(value: Any, answered: bool = True) -> list[dict[str, str]]:
    """The checked messages; with `answered`, some assistant message must have text."""
    if not isinstance(value, list) or not value:
        raise BadRecord("bad_messages", "'messages' is not a non-empty list")
    out = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and m["role"] and
                isinstance(m.get("content"), str)):
            raise BadRecord("bad_messages", f"message {i + 1} is not an object with string "
                                            f"'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    if answered and not any(m["role"] == ASSISTANT and m["content"] for m in out):
        raise BadRecord("empty_completion", "no assistant message has text")
    return out


def parse_prompt(line: bytes) -> dict[str, Any]:
    """A JSON line -> {"prompt"} or {"messages"} (a conversation to answer, whose last
    message need not be the assistant's): a prompt of a record; raises BadRecord."""
    record = json_object(line)
    if "messages" in record:
        if "prompt" in record:
            raise BadRecord("ambiguous_fields")
        return {"messages": _messages(record["messages"], answered=False)}
    if "prompt" not in record:
        raise BadRecord("missing_field", f"no 'prompt' nor 'messages' field (has: "
                                         f"{', '.join(record) or 'nothing'})")
    if not isinstance(record["prompt"], str):
        raise BadRecord("not_a_string", f"'prompt' is a JSON "
                                        f"{type(record['prompt']).__name__}, not a string")
    return {"prompt": record["prompt"]}


def _role_header(role: str) -> str:
    """The simple template's text before a message's content."""
    return f"{role}: "


def simple_pieces(messages: Sequence[dict[str, str]], end: str | int) -> list[Piece]:
    """The simple template: `{role}: {content}\\n` per message; assistant turns end with
    `end` (EOS id, or the end text) and their content and end weigh 1."""
    out: list[Piece] = []
    for m in messages:
        out.append((_role_header(m["role"]), 0))
        if m["role"] == ASSISTANT:
            out += [(m["content"], 1), (end, 1)]
        else:
            out.append((m["content"] + "\n", 0))
    return [p for p in out if p[0] != ""]


def record_pieces(record: dict[str, Any], tok: Tokenizer, template: ChatTemplate | None,
                  end_text: str) -> list[Piece]:
    """The weighted pieces of a parsed record, BOS and the completion end included."""
    end = completion_end(tok, end_text)
    if "messages" in record and template is not None:
        return template.pieces(record["messages"])
    if "messages" in record:
        return _bos(tok) + simple_pieces(record["messages"], end)
    body = [(record["completion"], 1), (end, 1)]
    return prompt_pieces(record, tok, template, end_text) + [p for p in body if p[0] != ""]


def completion_end(tok: Tokenizer, end_text: str) -> str | int:
    """END, what follows every completion: the tokenizer's EOS id, else `end_text`."""
    return tok.eos_id if tok.eos_id is not None else end_text


def _bos(tok: Tokenizer) -> list[Piece]:
    return [] if tok.bos_id is None else [(tok.bos_id, 0)]


def prompt_pieces(record: dict[str, Any], tok: Tokenizer, template: ChatTemplate | None,
                  end_text: str) -> list[Piece]:
    """The pieces an example of `record` has before its completion: BOS and the prompt,
    or the conversation and the header of the assistant's next turn (a Hugging Face
    template's rendering with the generation prompt, as one piece)."""
    if "messages" in record and template is not None:
        text = template.render(record["messages"], add_generation_prompt=True)
        return [(text, 0)] if text else []
    if "messages" in record:
        return _bos(tok) + simple_pieces(record["messages"], completion_end(tok, end_text)) \
            + [(_role_header(ASSISTANT), 0)]
    return _bos(tok) + ([(record["prompt"], 0)] if record["prompt"] else [])


def generation_prompt(tok: Tokenizer, prompt: str) -> np.ndarray:
    """The int32 ids a model fine-tuned on {prompt, completion} records continues with a
    completion: [BOS] prompt, as `record_pieces` lays out a record."""
    head = [] if tok.bos_id is None else [tok.bos_id]
    return np.asarray(head + tok.encode(prompt).tolist(), np.int32)


def end_ids(tok: Tokenizer, end_text: str = DEFAULT_END_TEXT) -> list[int]:
    """The ids that close a completion: the tokenizer's EOS, else `end_text`'s tokens."""
    return [tok.eos_id] if tok.eos_id is not None else tok.encode(end_text).tolist()


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
