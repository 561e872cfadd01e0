"""Preference records -> (chosen, rejected) pairs of SFT examples, and their training rows.

A record is one JSON line,

  {"prompt": "...", "chosen": "...", "rejected": "..."}                     text
  {"prompt": [messages], "chosen": ..., "rejected": ...}                      chat
  {"messages": [messages], "chosen": ..., "rejected": ...}                    chat

where a chat response is the assistant's text or a list of messages (TRL's conversational
form: `[{"role": "assistant", "content": "..."}]`). Each side becomes one SFT example
(data/sft.py: the same BOS/END, chat template, weights, truncation and bad records) of the
prompt followed by that response; the prompt's tokens weigh 0. A prepared preference set is
an SFT set (format 3, `"format": "preference"`) whose documents come in pairs: document 2i
is the chosen example of pair i, 2i+1 its rejected one, in the same split.

Training reads it as rows of pairs (`pair_rows`): every example alone in a row, padded,
row 2i chosen and 2i+1 rejected, pairs shuffled per epoch, the layout the preference
objective (losses/preference.py) takes.

A record that a reward model scores (`make_scored`, for `eval.py --score_rewards`) is a
preference record, or one response: {prompt, response} with the same forms of prompt and
response, or {messages} whose assistant turns are the response.
"""

import json
from typing import Any

import grain
import numpy as np

from jaxlm.data.sft import (DEFAULT_END_TEXT, BadRecord, ChatTemplate, Example, json_object,
                            make_example)
from jaxlm.data.tokenizers import Tokenizer

SIDES = ("chosen", "rejected")
RESPONSE_FIELDS = ("response", "completion")  # a record to score: its response
REASONS = {
    "missing_field": "no 'prompt' (or 'messages'), 'chosen' and 'rejected'",
    "identical_responses": "'chosen' and 'rejected' are the same",
    "empty_completion": "'chosen' or 'rejected' is empty",
}


def parse_preference(line: bytes) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """A JSON line -> (chosen SFT record, rejected SFT record, the pair's split key);
    raises BadRecord."""
    record = json_object(line)
    if "messages" in record and "prompt" in record:
        raise BadRecord("ambiguous_fields", "both 'messages' and 'prompt'")
    prompt = record.get("prompt", record.get("messages"))
    missing = [k for k, v in (("prompt", prompt), *((s, record.get(s)) for s in SIDES))
               if v is None]
    if missing:
        raise BadRecord("missing_field", f"no {' and no '.join(repr(k) for k in missing)} "
                                         f"field (has: {', '.join(record) or 'nothing'})")
    sides = [_side(prompt, record[s], s) for s in SIDES]
    if sides[0] == sides[1]:
        raise BadRecord("identical_responses", REASONS["identical_responses"])
    key = json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return sides[0], sides[1], key


def _side(prompt: Any, response: Any, name: str) -> dict[str, Any]:
    """One side as an SFT record: {"prompt", "completion"} or {"messages"}."""
    if isinstance(prompt, str) and isinstance(response, str):
        if not response:
            raise BadRecord("empty_completion", f"{name!r} is empty")
        return {"prompt": prompt, "completion": response}
    if isinstance(prompt, str) or not isinstance(response, (str, list)):
        raise BadRecord("not_a_string", f"{name!r} must be a string, or a list of messages "
                                        "after a list of prompt messages")
    turns = [{"role": "assistant", "content": response}] if isinstance(response, str) \
        else response
    if not any(isinstance(m, dict) and m.get("role") == "assistant" and m.get("content")
               for m in turns):
        raise BadRecord("empty_completion", f"{name!r} has no assistant text")
    return {"messages": [*prompt, *turns]} if isinstance(prompt, list) else \
        {"messages": prompt}  # not a list: data/sft.py refuses it as bad_messages


def make_scored(line: bytes, tok: Tokenizer, template: ChatTemplate | None, *,
                seq_len: int | None, end_text: str = DEFAULT_END_TEXT) -> list[Example]:
    """A record to score with a reward model -> its SFT examples: [chosen, rejected] for
    a preference record (`make_pair`), else [prompt + response]: {prompt, response} (or
    `completion`), {messages, response}, or {messages} alone (its assistant turns are the
    response). Raises BadRecord."""
    record = json_object(line)
    if any(s in record for s in SIDES):
        return make_pair(line, tok, template, seq_len=seq_len, end_text=end_text)
    if "messages" in record and "prompt" in record:
        raise BadRecord("ambiguous_fields", "both 'messages' and 'prompt'")
    fields = [f for f in RESPONSE_FIELDS if f in record]
    if len(fields) > 1:
        raise BadRecord("ambiguous_fields", "both 'response' and 'completion'")
    prompt = record.get("prompt", record.get("messages"))
    if fields and prompt is not None:
        record = _side(prompt, record[fields[0]], fields[0])
    elif fields or "messages" not in record:
        raise BadRecord("missing_field", "no 'prompt' (or 'messages') and 'response', nor "
                                         "'chosen' and 'rejected' (has: "
                                         f"{', '.join(record) or 'nothing'})")
    return [make_example(json.dumps(record).encode("utf-8"), tok, template, seq_len=seq_len,
                         end_text=end_text)]


def make_pair(line: bytes, tok: Tokenizer, template: ChatTemplate | None, *,
              seq_len: int | None, truncate: bool = False,
              end_text: str = DEFAULT_END_TEXT) -> list[Example]:
    """One JSON line -> [chosen, rejected] SFT examples keyed by the whole record; raises
    BadRecord (a response's reason names its side)."""
    chosen, rejected, key = parse_preference(line)
    out = []
    for side, record in zip(SIDES, (chosen, rejected)):
        try:
            ex = make_example(json.dumps(record).encode("utf-8"), tok, template,
                              seq_len=seq_len, truncate=truncate, end_text=end_text)
        except BadRecord as e:
            raise BadRecord(e.reason, f"{side}: {e.detail}") from None
        ex.key = key
        out.append(ex)
    if np.array_equal(out[0].tokens, out[1].tokens):
        raise BadRecord("identical_responses", "'chosen' and 'rejected' give the same "
                                               "tokens" + (" once cut" if truncate else ""))
    return out


# Training rows.

class _ReadPairs(grain.transforms.Map):
    """A batch of pair indices -> this process's rows: each example alone in a row."""

    def __init__(self, tokens: Any, weights: Any, offsets: np.ndarray, seq_len: int,
                 rows: slice, global_batch: int):
        self.tokens, self.weights, self.offsets = tokens, weights, offsets
        self.seq_len, self.rows, self.global_batch = seq_len, rows, global_batch

    def map(self, pairs_P: np.ndarray) -> dict[str, np.ndarray]:
        docs_B = np.stack([2 * pairs_P, 2 * pairs_P + 1], 1).reshape(-1)
        # A last, short batch is padded with empty rows (-1): pairs without tokens count
        # for nothing.
        docs_B = np.concatenate([docs_B, np.full(self.global_batch - len(docs_B), -1)])
        return document_rows(self.tokens, self.weights, self.offsets, docs_B[self.rows],
                             self.seq_len)


def document_rows(tokens: Any, weights: Any, offsets: np.ndarray, docs_B: np.ndarray,
                  seq_len: int) -> dict[str, np.ndarray]:
    """Rows of whole documents of at most seq_len + 1 tokens: row i holds document
    docs_B[i] alone (inputs, next-token targets and their weights, from position 0), padded;
    a document -1 is an empty row."""
    shape = (len(docs_B), seq_len)
    batch = {k: np.zeros(shape, np.int32) for k in ("inputs", "targets", "segment_ids",
                                                    "positions")}
    batch["weights"] = np.zeros(shape, np.float32)
    for row, doc in enumerate(docs_B):
        if doc < 0:
            continue
        a, b = int(offsets[doc]), int(offsets[doc + 1])
        n = b - a - 1
        batch["inputs"][row, :n] = tokens[a:b - 1]
        batch["targets"][row, :n] = tokens[a + 1:b]
        batch["weights"][row, :n] = weights[a + 1:b]
        batch["segment_ids"][row, :n] = 1
        batch["positions"][row, :n] = np.arange(n)
    return batch


def pair_rows(data: Any, split: str, *, seq_len: int, global_batch: int, seed: int,
              rows: slice, num_epochs: int | None = None) -> grain.MapDataset:
    """Batches of whole pairs from a preference `TokenData`: global_batch / 2 pairs, in a
    (seed)-shuffle of the pairs repeated per epoch; this process's `rows` of each. With
    `num_epochs`, the last batch is padded with empty rows."""
    offsets = data.docs(split)
    num_pairs = (len(offsets) - 1) // 2
    ds = grain.MapDataset.range(num_pairs).shuffle(seed=seed % 2**32).repeat(num_epochs)
    ds = ds.batch(global_batch // 2, drop_remainder=num_epochs is None)
    return ds.map(_ReadPairs(data.tokens(split), data.weights(split), offsets, seq_len, rows,
                             global_batch))
