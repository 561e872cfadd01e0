"""Mixtures of prepared sets: proportions, source tags, per-source evaluation, errors."""

import json

import numpy as np
import pytest

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Data
from jaxlm.data.mixture import Mixture, resolve_mixture
from jaxlm.data.packing import eval_sources, tokens_per_source, train_batches
from jaxlm.data.prepare import prepare_corpus


def _prepare(tmp, name, alphabet, tokenizer="byte", n=120):
    rng = np.random.default_rng(len(name))
    with open(tmp / f"{name}.jsonl", "w") as f:
        for i in range(n):
            text = "".join(rng.choice(list(alphabet), size=rng.integers(2, 50)))
            f.write(json.dumps({"text": text + alphabet[i % len(alphabet)] * (i % 7)}) + "\n")
    return prepare_corpus([tmp / f"{name}.jsonl"], tmp / name, tokenizer=tokenizer,
                          workers=0, progress=False)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mix")
    return {"low": _prepare(tmp, "low", "abcdefghijklm"),
            "high": _prepare(tmp, "high", "nopqrstuvwxyz"),
            "digits": _prepare(tmp, "digits", "0123456789 "),
            "char": _prepare(tmp, "char", "abc", tokenizer="char")}


@pytest.mark.parametrize("packing", ["documents", "windows"])
def test_rows_follow_the_weights_and_carry_their_source(sets, packing):
    mix = Mixture.parse(f"{sets['low']}:0.7,{sets['high']}:0.3")
    assert mix.names == ["low", "high"]
    it = train_batches(mix, seq_len=12, global_batch=8, seed=0, packing=packing)
    sources, counts = [], np.zeros(2)
    low = set(b"abcdefghijklm") | {256}  # + EOS
    for _ in range(150):
        b = next(it)
        assert b["source"].dtype == np.int32 and b["source"].shape == (8,)
        sources.append(b["source"])
        counts += tokens_per_source(b, 2)
        for row, s in enumerate(b["source"]):
            toks = set(b["inputs"][row][b["weights"][row] > 0].tolist())
            assert toks <= low if s == 0 else not toks & set(b"abcdefghijklm")
    share = np.mean(np.concatenate(sources) == 0)
    n = 150 * 8
    assert abs(share - 0.7) < 3 * np.sqrt(0.7 * 0.3 / n)
    assert counts.sum() > 0 and counts[0] > counts[1]


@pytest.mark.parametrize("packing", ["documents", "windows"])
def test_mixture_is_deterministic_split_over_processes_and_resumes(sets, packing):
    mix = Mixture.parse(f"{sets['low']}:2,{sets['high']}:1")
    kw = dict(seq_len=12, global_batch=8, seed=4, packing=packing)
    whole = [next(it) for it in [train_batches(mix, **kw)] for _ in range(10)]
    parts = [train_batches(mix, process_index=i, process_count=2, **kw) for i in range(2)]
    for step in range(10):
        got = [next(p) for p in parts]
        for k in whole[step]:
            if k == "tokens_seen":  # a count over the global batch: every process agrees
                for g in got:
                    np.testing.assert_array_equal(g[k], whole[step][k])
                continue
            np.testing.assert_array_equal(np.concatenate([g[k] for g in got]),
                                          whole[step][k])
    # tokens_seen is the running total of the weighted targets per source.
    totals = np.cumsum([tokens_per_source(b, 2) for b in whole], axis=0)
    np.testing.assert_array_equal([b["tokens_seen"] for b in whole], totals)
    it = train_batches(mix, **kw)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    it2 = train_batches(mix, **kw)
    it2.set_state(state)
    for step in range(5, 10):
        b = next(it2)
        np.testing.assert_array_equal(b["inputs"], whole[step]["inputs"])
        np.testing.assert_array_equal(b["tokens_seen"], whole[step]["tokens_seen"])


def test_zero_weight_is_evaluation_only_and_eval_is_per_source(sets):
    mix = Mixture.parse(f"{sets['low']}:1,{sets['digits']}:0")
    it = train_batches(mix, seq_len=12, global_batch=8, seed=0, packing="documents")
    assert all((next(it)["source"] == 0).all() for _ in range(20))
    evals = eval_sources(mix, seq_len=12, global_batch=4, packing="documents")
    assert list(evals) == ["low", "digits"]
    digits = evals["digits"][0]
    assert set(digits["targets"][digits["weights"] > 0].tolist()) <= set(b"0123456789 ") | {256}
    assert digits["target_bytes"].sum() > 0


def test_resolve_mixture_checks_the_config_tokenizer(sets):
    cfg = Data(mixture=f"{sets['low']}:1,{sets['high']}:1", tokenizer="byte")
    assert resolve_mixture(cfg).vocab_size == 257
    cfg = cfg.model_copy(update={"tokenizer": "char"})
    with pytest.raises(ConfigError, match="data.tokenizer: the mixture's first source .* "
                                          "was prepared with the 'byte' tokenizer"):
        resolve_mixture(cfg)


def test_mixture_errors(sets, tmp_path):
    low, high, char = sets["low"], sets["high"], sets["char"]
    cases = [
        (f"{low}:0.5,{high}:-0.5", "data.mixture: weight of .*high must be a finite number "
                                   ">= 0, got -0.5"),
        (f"{low}:0,{high}:0", "data.mixture: the weights sum to zero"),
        (f"{low}:1,{char}:1", "data.mixture: .*char was prepared with another tokenizer "
                              r"\(char, 4 tokens\) than .*low \(byte, 257 tokens\); mixture "
                              "sources must share the tokenizer"),
        (f"{low}:x", "data.mixture: weight 'x' of .*low is not a number"),
        (f"{low}", "data.mixture: .*is not DIR:WEIGHT"),
        (f"{tmp_path}:1", "data.mixture: .* is not a prepared token directory"),
        ("", "data.mixture: no sources"),
    ]
    for spec, match in cases:
        with pytest.raises(ConfigError, match=match):
            Mixture.parse(spec)
