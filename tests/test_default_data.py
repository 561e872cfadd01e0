"""The embedded default must not move: same token files, split and batches as before the
corpus pipeline (checksums computed from the code at commit 69cf587)."""

import hashlib

import numpy as np
import pytest

from jaxlm.configs.sections import Data
from jaxlm.data.mixture import Mixture
from jaxlm.data.packing import windows_source
from jaxlm.data.pipeline import EvalBatches, resolve_data

EXPECTED = {
    "char": {
        "files": "130968a68ecd064b45089162431754dde73f0649ee4baac7a228f6caf4de5a02",
        "train": "00cb0930dbbf36234f2eb3f440efc2748a19794d599890566f216ad2273d1a11",
        "eval": "8bd2e7def60e7dc0e38b46c6206c10adc184c11a8a10783027ec3f3f4374918a",
    },
    "byte": {
        "files": "eb10c2a77e39444cde175c10bc2e878203484670b5322e878d2ba83e1dca389e",
        "train": "37a4e83aaf8af61cffcad16667b432eb5d9dc16b2b419de05b7ca27fa5fd23de",
        "eval": "aa3309317a827bf365687f0df653eec90208366506038aed7ed35356f572199a",
    },
}


def _batch_digest(batches, with_dtype: bool) -> str:
    h = hashlib.sha256()
    for b in batches:
        for k in sorted(b):
            h.update(k.encode())
            h.update(np.ascontiguousarray(b[k]).tobytes())
            if with_dtype:
                h.update(str(b[k].dtype).encode())
    return h.hexdigest()


@pytest.mark.parametrize("tokenizer", ["char", "byte"])
def test_embedded_default_is_unchanged(tokenizer, tmp_path):
    cfg = Data(tokenizer=tokenizer)
    data = resolve_data(cfg, tmp_path)
    files = hashlib.sha256()
    for f in ("train.bin", "val.bin"):
        files.update((data.path / f).read_bytes())
    assert files.hexdigest() == EXPECTED[tokenizer]["files"]
    assert (len(data.train), len(data.val)) == (1003854, 111540)
    assert data.vocab_size == (65 if tokenizer == "char" else 256)
    train = windows_source(Mixture.of_set(data), seq_len=64, global_batch=12, seed=0)
    pairs = ({k: train[s][k] for k in ("inputs", "targets")} for s in range(20))
    assert _batch_digest(pairs, True) == EXPECTED[tokenizer]["train"]
    ev = EvalBatches(data.val, 64, 48)
    assert _batch_digest((ev[i] for i in range(len(ev))), False) == EXPECTED[tokenizer]["eval"]
