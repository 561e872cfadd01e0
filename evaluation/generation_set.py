"""Generation metrics: continue every prompt of a JSON-lines set, score the continuations
against the references with BLEU and chrF (`sacrebleu`) and ROUGE-1/2/L (`rouge-score`).

Per example: sentence BLEU and chrF, and the ROUGE F-measures. Overall: corpus BLEU and
chrF (sacrebleu's corpus statistics, not a mean of sentences) and the mean ROUGE
F-measures. Scores are on sacrebleu's 0-100 scale, ROUGE on 0-1, as the libraries report
them. Both libraries run with their default settings (BLEU: 13a tokenisation, exponential
smoothing for sentences; chrF: character 6-grams, beta 2; ROUGE: no stemming).
"""

import json
from pathlib import Path
from typing import Any

from jaxlm.configs.errors import ConfigError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def load_generation_set(path: str | Path, prompt_field: str, reference_field: str
                        ) -> list[dict[str, str]]:
    """[{"prompt", "reference"}] from a JSON-lines file whose lines are objects holding
    both fields as strings; anything else is a ConfigError naming the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("generation_set", f"cannot read {path} ({e}); give a JSON-lines "
                                            "file of prompts and references") from None
    examples = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError("generation_set", f"{path} line {n} is not JSON ({e})") from None
        for key, field in (("prompt_field", prompt_field), ("reference_field", reference_field)):
            if not isinstance(record, dict) or field not in record:
                found = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ConfigError(key, f"{path} line {n} has no field {field!r} (it has "
                                       f"{found}); name the right one with --{key}")
            if not isinstance(record[field], str):
                raise ConfigError(key, f"{path} line {n}: field {field!r} is "
                                       f"{type(record[field]).__name__}, not a string")
        examples.append({"prompt": record[prompt_field], "reference": record[reference_field]})
    if not examples:
        raise ConfigError("generation_set", f"{path} holds no examples")
    return examples


def score_generations(generations: list[str], references: list[str]
                      ) -> tuple[list[dict[str, float]], dict[str, float]]:
    """(per-example scores, overall scores) from the libraries, default settings."""
    # Deferred: sacrebleu and rouge-score are optional (the `eval` extra).
    import sacrebleu
    from rouge_score import rouge_scorer
    rouge = rouge_scorer.RougeScorer(list(ROUGE_TYPES))
    per_example = []
    for hyp, ref in zip(generations, references, strict=True):
        r = rouge.score(ref, hyp)
        per_example.append({"bleu": sacrebleu.sentence_bleu(hyp, [ref]).score,
                            "chrf": sacrebleu.sentence_chrf(hyp, [ref]).score,
                            **{t: r[t].fmeasure for t in ROUGE_TYPES}})
    overall = {"bleu": sacrebleu.corpus_bleu(generations, [references]).score,
               "chrf": sacrebleu.corpus_chrf(generations, [references]).score,
               **{t: sum(e[t] for e in per_example) / len(per_example) for t in ROUGE_TYPES}}
    return per_example, overall


def cut_at_stop(text: str, stop: str | None) -> str:
    """`text` up to (without) the first `stop`; all of it when `stop` is None or absent."""
    return text if not stop else text.split(stop, 1)[0]


def generation_report(examples: list[dict[str, str]], generations: list[str],
                      decoding: dict[str, Any]) -> dict[str, Any]:
    """The saved result: decoding settings, overall scores, and every example's strings
    and scores."""
    per_example, overall = score_generations(generations, [e["reference"] for e in examples])
    return {"decoding": decoding, "num_examples": len(examples), **overall,
            "examples": [{**e, "generation": g, **s}
                         for e, g, s in zip(examples, generations, per_example)]}
