"""Loader throughput: training tokens/s of `data.packing.train_batches`, as a multiple of
what the default model consumes.

  python benchmarks/loader_throughput.py [--batches=2000] [--model_tokens_per_sec=16000] \
      [--workdir=/tmp/jaxlm_bench]

Data: the embedded Shakespeare prepared as one text (windows, the default) and as
corpora of documents (benchmarks/corpus_gen.py: 1 to 8 paragraphs each, and single
paragraphs, the hardest case for packing) with the char tokenizer, the default model's. Shapes: the default recipe (seq_len 64, batch 12) and a
longer one (seq_len 1024, batch 8). Tokens/s counts real (weight 1) target tokens only,
so padding is not credited. Each configuration is iterated for --batches after a warm-up,
with prefetch on (one background thread, as in training) and off; the best of 3 repeats
is reported. `--model_tokens_per_sec` is the default model's training speed on this
machine (python benchmarks/train_throughput.py).
"""

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


from benchmarks.corpus_gen import make_jsonl  # noqa: E402
from jaxlm.data.mixture import Mixture  # noqa: E402
from jaxlm.data.packing import train_batches  # noqa: E402
from jaxlm.data.pipeline import TokenData  # noqa: E402
from jaxlm.data.prepare import EMBEDDED_CORPUS, prepare, prepare_corpus  # noqa: E402


def measure(data: Mixture, packing: str, seq_len: int, batch: int, n: int, prefetch: int,
            repeats: int = 3) -> tuple[float, float]:
    """(best real tokens/s, fraction of positions that are real tokens)."""
    best, fill = 0.0, 0.0
    for r in range(repeats):
        it = train_batches(data, seq_len=seq_len, global_batch=batch, seed=r,
                           packing=packing, prefetch=prefetch)
        for _ in range(20):
            next(it)
        t = time.perf_counter()
        real = 0.0
        for _ in range(n):
            real += float(next(it)["weights"].sum())
        seconds = time.perf_counter() - t
        it.close()
        best = max(best, real / seconds)
        fill = real / (n * batch * seq_len)
    return best, fill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--model_tokens_per_sec", type=float, default=16000.0)
    ap.add_argument("--workdir", default="/tmp/jaxlm_bench")
    args = ap.parse_args()
    work = Path(args.workdir)
    one_text = TokenData.load(prepare(EMBEDDED_CORPUS, work / "shakespeare_char"))
    corpus = make_jsonl(work / "corpus_16mb.jsonl", 16_000_000)
    docs = TokenData.load(prepare_corpus([corpus], work / "docs_char", tokenizer="char",
                                         workers=1, progress=False, overwrite=True))
    short = make_jsonl(work / "corpus_paragraphs_4mb.jsonl", 4_000_000, max_paragraphs=1)
    paragraphs = TokenData.load(prepare_corpus([short], work / "paragraphs_char",
                                               tokenizer="char", workers=1, progress=False,
                                               overwrite=True))
    mixture = Mixture.parse(f"{work / 'docs_char'}:0.7,{work / 'paragraphs_char'}:0.3")
    mean_doc = float(np.diff(docs.train_docs).mean())
    mean_par = float(np.diff(paragraphs.train_docs).mean())
    one_text, docs, paragraphs = map(Mixture.of_set, (one_text, docs, paragraphs))
    cases = [("windows", "one text", one_text), ("windows", "documents", docs),
             ("documents", "documents", docs), ("documents", "paragraphs", paragraphs),
             ("documents", "mixture 0.7/0.3", mixture)]
    rows, results = [], []
    for seq_len, batch in ((64, 12), (1024, 8)):
        n = args.batches if seq_len == 64 else max(50, args.batches // 8)
        for packing, what, data in cases:
            for prefetch in (2, 0):
                speed, fill = measure(data, packing, seq_len, batch, n, prefetch)
                ratio = speed / args.model_tokens_per_sec
                rows.append((packing, what, seq_len, batch, prefetch, speed, fill, ratio))
                results.append({"packing": packing, "data": what, "seq_len": seq_len,
                                "batch": batch, "prefetch": prefetch,
                                "tokens_per_sec": round(speed), "fill": round(fill, 3),
                                "x_model": round(ratio, 1)})
    print(f"documents: {len(docs.train_docs) - 1:,} training documents of 1-8 paragraphs, "
          f"{mean_doc:.0f} tokens on average; paragraphs: {len(paragraphs.train_docs) - 1:,} "
          f"of one paragraph, {mean_par:.0f} tokens on average (char tokenizer); mixture: "
          f"documents 0.7, paragraphs 0.3. Model reference "
          f"{args.model_tokens_per_sec:,.0f} tokens/s; {os.cpu_count()} CPUs.\n")
    print("| packing | data | seq_len x batch | prefetch | real tokens/s | fill | x model |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for packing, what, seq_len, batch, prefetch, speed, fill, ratio in rows:
        print(f"| {packing} | {what} | {seq_len} x {batch} | {prefetch} | {speed:,.0f} | "
              f"{fill:.1%} | {ratio:.0f}x |")
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
