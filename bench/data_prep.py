"""Data-preparation throughput (`tokenformer prepare`) on the standard-library corpus, in tokens/s.

    python -m bench.data_prep [--quick]

Prepares the running Python's standard-library source (the `prepare` default corpus) with the
byte tokenizer, the GPT-NeoX-20B tokenizer (when ../shared/data is present) and a BPE trained on
the corpus (training included), end to end: reading, encoding, splitting, writing. The baseline is
measured in the same run on the same documents: `tokenizers`' batched encoder (what `prepare`
uses) against encoding one document at a time. `--quick` takes the first 100 documents (< 30 s).
Prints a table and writes bench/results/data_prep.json. Not a test: numbers depend on the machine
and on its load. `run(quick)` returns the same numbers as a dict for other benchmarks.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEOX_CANDIDATES = [ROOT.parent / "shared" / "data" / "gpt-neox-20b" / "tokenizer.json",
                   ROOT / "shared" / "data" / "gpt-neox-20b" / "tokenizer.json"]
QUICK_DOCUMENTS = 100
BASELINE_DOCUMENTS = 60
FLAT_NAMES = {"byte": "byte", "bpe": "bpe", "gpt-neox-20b": "neox"}


def neox_tokenizer_path() -> Path | None:
    return next((p for p in NEOX_CANDIDATES if p.is_file()), None)


def time_encoders(tokenizer, texts: list[str]) -> dict:
    """Seconds for the batched encoder and for one-by-one encoding of the same texts."""
    backend = tokenizer.backend
    batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
    start, cpu = time.perf_counter(), time.process_time()  # process time counts every thread
    batched_tokens = sum(len(e.ids) for e in batch(texts, add_special_tokens=False))
    batched, batched_cpu = time.perf_counter() - start, time.process_time() - cpu
    start, cpu = time.perf_counter(), time.process_time()
    single_tokens = sum(len(backend.encode(t, add_special_tokens=False).ids) for t in texts)
    single, single_cpu = time.perf_counter() - start, time.process_time() - cpu
    assert batched_tokens == single_tokens
    return {"documents": len(texts), "tokens": batched_tokens,
            "batched_tokens_per_s": batched_tokens / batched, "one_by_one_tokens_per_s": single_tokens / single,
            "batched_speedup": single / batched,
            "batched_cores_busy": batched_cpu / batched, "one_by_one_cores_busy": single_cpu / single}


def run(quick: bool = False) -> dict:
    """Prepare the stdlib corpus with each tokenizer; tokens/s per tokenizer and the batching ratio."""
    prepare_module = importlib.import_module("tokenformer.data.prepare")
    from tokenformer.data.tokenizer import load_tokenizer

    max_documents = QUICK_DOCUMENTS if quick else None
    tokenizers = {"byte": "byte", "bpe": "bpe"}
    neox = neox_tokenizer_path()
    if neox is not None:
        tokenizers["gpt-neox-20b"] = str(neox)
    results: dict = {"benchmark": "data_prep", "quick": quick, "corpus": "python-stdlib",
                     "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                     "load_average_1min": os.getloadavg()[0], "tokenizers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in tokenizers.items():
            cpu = time.process_time()
            meta = prepare_module.prepare(out=Path(tmp) / name, tokenizer=spec, vocab_size=2048,
                                          max_documents=max_documents, progress=False)
            cpu = time.process_time() - cpu
            results["tokenizers"][name] = {
                "documents": meta["documents"], "tokens": meta["tokens"], "seconds": meta["seconds"],
                "tokens_per_s": meta["tokens_per_second"], "cpu_seconds": round(cpu, 3),
                "tokens_per_cpu_s": round(meta["tokens"] / cpu, 1)}
        # The same documents for every row, so bytes/token and MB/s compare tokenizers fairly.
        texts = list(itertools.islice(prepare_module.iter_documents(), max_documents))
        corpus_bytes = sum(len(t.encode("utf-8")) for t in texts)
        results["documents"], results["megabytes"] = len(texts), round(corpus_bytes / 1e6, 2)
        for name, row in results["tokenizers"].items():
            row["bytes_per_token"] = round(corpus_bytes / row["tokens"], 3)
            row["megabytes_per_s"] = round(corpus_bytes / 1e6 / row["seconds"], 3)
        baseline_tokenizer = load_tokenizer(neox if neox is not None else Path(tmp) / "bpe")
        results["baseline"] = {"tokenizer": "gpt-neox-20b" if neox is not None else "bpe",
                               **time_encoders(baseline_tokenizer, texts[:BASELINE_DOCUMENTS])}
    for name, row in results["tokenizers"].items():  # flat keys, for a one-row summary
        results[f"{FLAT_NAMES[name]}_tokens_per_s"] = row["tokens_per_s"]
    results["batched_vs_one_by_one"] = results["baseline"]["batched_speedup"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"only the first {QUICK_DOCUMENTS} documents")
    args = parser.parse_args()
    results = run(quick=args.quick)
    print(f"stdlib corpus: {results['documents']:,} documents, {results['megabytes']} MB; "
          f"{results['cpu_count']} cores, load average {results['load_average_1min']:.1f}")
    print(f"{'tokenizer':<16}{'tokens':>12}{'seconds':>10}{'tokens/s':>14}{'MB/s':>8}{'bytes/token':>13}"
          f"{'CPU s':>9}{'tokens/CPU s':>14}")
    for name, row in results["tokenizers"].items():
        print(f"{name:<16}{row['tokens']:>12,}{row['seconds']:>10.2f}{row['tokens_per_s']:>14,.0f}"
              f"{row['megabytes_per_s']:>8.2f}{row['bytes_per_token']:>13.2f}{row['cpu_seconds']:>9.2f}"
              f"{row['tokens_per_cpu_s']:>14,.0f}")
    b = results["baseline"]
    print(f"baseline ({b['tokenizer']}, {b['documents']} documents): encode_batch {b['batched_tokens_per_s']:,.0f} "
          f"tokens/s vs one by one {b['one_by_one_tokens_per_s']:,.0f} tokens/s = {b['batched_speedup']:.2f}x "
          f"(cores busy: {b['batched_cores_busy']:.2f} vs {b['one_by_one_cores_busy']:.2f})")
    out = Path(__file__).parent / "results" / "data_prep.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
