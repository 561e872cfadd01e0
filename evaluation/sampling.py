"""Text generation from a restored run: plain KV-cache sampling and speculative decoding."""

from typing import Any

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Sampling
from jaxlm.data.packing import stores_documents
from jaxlm.evaluation.request import Generate
from jaxlm.evaluation.restore import restore_run
from jaxlm.inference.beam import BeamSearch, EarlyStopping
from jaxlm.inference.generate import Generator
from jaxlm.inference.speculative import SpeculativeGenerator
from jaxlm.losses.objectives import split_objective_params
from jaxlm.training.experiment import Experiment


def encode_prompts(exp: Experiment, prompts: list[str]) -> list[list[int]]:
    """The prompts in the run's tokenizer; a run trained on documents stored as [BOS]
    tokens [EOS] gets the BOS first, as every training document began."""
    tok = exp.data.tokenizer
    head = [tok.bos_id] if tok.bos_id is not None and stores_documents(exp.data) else []
    try:
        return [head + tok.encode(p).tolist() for p in prompts]
    except ValueError as e:
        raise ConfigError("prompt", str(e)) from None


def sample(exp: Experiment, params: Any, prompts: list[str], length: int, sp: Sampling,
           seed: int = 0) -> tuple[list[str], dict[str, float]]:
    """Generate `length` tokens after each prompt with the run's tokenizer."""
    ids = encode_prompts(exp, prompts)
    gen = Generator(exp.graphdef, exp.model_cfg, exp.config.train.seq_len)
    out, stats = gen.generate(split_objective_params(params)[0], ids, length, sp, seed)
    return [exp.data.tokenizer.decode(o) for o in out], stats


def beam_search(exp: Experiment, params: Any, prompts: list[str], length: int,
                num_beams: int, length_penalty: float = 1.0,
                early_stopping: EarlyStopping = False) -> tuple[list[str], dict[str, float]]:
    """Each prompt's best beam-search continuation of at most `length` tokens; a
    hypothesis ends at the tokenizer's EOS, if it has one (the text stops before it)."""
    ids = encode_prompts(exp, prompts)
    beam = BeamSearch(exp.graphdef, exp.model_cfg, exp.config.train.seq_len)
    eos = exp.data.tokenizer.eos_id
    out, stats = beam.generate(split_objective_params(params)[0], ids, length, num_beams,
                               eos, length_penalty, early_stopping)
    return [exp.data.tokenizer.decode(_until_eos(o, eos)) for o in out], stats


def _until_eos(tokens: list[int], eos_id: int | None) -> list[int]:
    return tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens


def continue_prompts(exp: Experiment, params: Any, prompts: list[str], g: Generate,
                     sp: Sampling, batch_size: int) -> list[str]:
    """Each prompt's continuation of at most `g.length` tokens, up to (without) the
    tokenizer's EOS: beam search when `g.num_beams` > 1, else sampling by `sp`; prompts
    go `batch_size` at a time (row i of batch j samples with seed g.seed + j)."""
    out = continue_ids(exp, params, encode_prompts(exp, prompts), g, sp, batch_size)
    return [exp.data.tokenizer.decode(o) for o in out]


def continue_ids(exp: Experiment, params: Any, ids: list[list[int]], g: Generate,
                 sp: Sampling, batch_size: int, sharded: bool = False) -> list[list[int]]:
    """`continue_prompts` of token prompts, returning tokens; with `sharded`, sampling runs
    on the run's mesh with its rules (beam search as the parameters are placed)."""
    params = split_objective_params(params)[0]
    context, eos = exp.config.train.seq_len, exp.data.tokenizer.eos_id
    beam = BeamSearch(exp.graphdef, exp.model_cfg, context) if g.num_beams > 1 else None
    gen = Generator(exp.graphdef, exp.model_cfg, context,
                    (exp.mesh, exp.rules) if sharded else None)
    out: list[list[int]] = []
    for j in range(0, len(ids), batch_size):
        batch = ids[j:j + batch_size]
        if beam is not None:
            out += beam.generate(params, batch, g.length, g.num_beams, eos, g.length_penalty,
                                 g.early_stopping_value())[0]
        else:
            out += gen.generate(params, batch, g.length, sp, g.seed + j // batch_size)[0]
    return [_until_eos(o, eos) for o in out]


def sample_speculative(exp: Experiment, params: Any, draft_workdir: str, prompts: list[str],
                       length: int, sp: Sampling, seed: int = 0, draft_tokens: int = 4,
                       draft_step: int | None = None, devices: Any = None,
                       compare: bool = True) -> tuple[list[str], dict[str, float]]:
    """Speculative sampling with the run in `draft_workdir` as the draft model.

    With `compare`, the target also decodes the same prompts alone (batch 1, as the
    speculative loop does) to measure the speed-up; in greedy mode the two outputs are
    also compared token for token (`matches_plain`).
    """
    draft_exp, draft_state, _ = restore_run(draft_workdir, draft_step, devices)
    t_tok, d_tok = exp.data.tokenizer, draft_exp.data.tokenizer
    t_vocab, d_vocab = exp.model_cfg.vocab_size, draft_exp.model_cfg.vocab_size
    if t_tok.to_dict() != d_tok.to_dict() or t_vocab != d_vocab:
        raise ConfigError("draft_workdir", f"the draft run {draft_workdir} uses another "
                                           f"vocabulary ({d_tok.kind}, {d_vocab} tokens) than "
                                           f"the target ({t_tok.kind}, {t_vocab} tokens)")
    if draft_exp.config.train.seq_len < 2:
        raise ConfigError("draft_workdir", f"the draft run {draft_workdir} has a context of "
                                           "under 2 tokens (seq_len)")
    # Runs trained with learned objective terms carry extra params; generation needs none.
    params = split_objective_params(params)[0]
    draft_params = split_objective_params(draft_state.params)[0]
    ids = encode_prompts(exp, prompts)
    context = exp.config.train.seq_len
    spec = SpeculativeGenerator((exp.graphdef, exp.model_cfg, context),
                                (draft_exp.graphdef, draft_exp.model_cfg,
                                 draft_exp.config.train.seq_len), draft_tokens)
    out, stats = spec.generate(params, draft_params, ids, length, sp, seed)
    stats["draft_tokens"] = draft_tokens
    if compare:
        gen = Generator(exp.graphdef, exp.model_cfg, context)
        plain, seconds = [], 0.0
        for i, p in enumerate(ids):
            o, s = gen.generate(params, [p], length, sp, seed + i)
            plain.append(o[0])
            seconds += s["decode_seconds"]
        stats["plain_decode_tokens_per_sec"] = len(ids) * length / max(seconds, 1e-9)
        stats["speedup"] = stats["decode_tokens_per_sec"] / stats["plain_decode_tokens_per_sec"]
        if sp.temperature <= 0.0:
            stats["matches_plain"] = float(plain == out)
    return [t_tok.decode(o) for o in out], stats
