"""Scale measurements for a Wikipedia-sized datastore, on a synthetic corpus of real sentences.

    RAGHUB_DATA_DIR=../shared/data python benchmarks/scale.py [--bm25-passages 200000]
        [--faiss-passages 200000] [--dense-passages 6000] [--resume-passages N] [--out scale-bench]

The corpus: passages of about 100 words (DPR's length) made by recombining real sentences of
the SQuAD, HotpotQA and 2Wiki paragraphs in the data folder, written as a DPR-style
`psgs_w100.tsv` and read streaming. Queries: the datasets' real questions. Each part runs in
its own process, so its peak resident memory (ru_maxrss) is its own:

- `bm25`: the `bm25` retriever (bm25s) over the TSV: build, on-disk size, queries/s.
- `encode`: the `dense` retriever end to end with all-MiniLM-L6-v2 (sharded, resumable build)
  over the first --dense-passages passages: passages/s.
- `resume`: the build over the first --resume-passages passages killed with SIGKILL after two
  of its eight shards and run again: the shards it did not redo, and how far its embeddings
  are from the `encode` part's (batched differently, so equal only to float rounding: 1e-5).
- `faiss`: Flat, IVF-PQ and HNSW over --faiss-passages stored embeddings of dimension 384:
  the real MiniLM embeddings of the `encode` part, repeated with Gaussian noise (sigma 0.05
  per coordinate, renormalised); build time, size, queries/s and recall@10 against Flat.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from raghub.cache import Cache
from raghub.corpus import CorpusFile
from raghub.plugin_manager import default_host

SOURCES = ("squad", "hotpotqa", "2wiki")
PASSAGE_WORDS = 100
N_QUERIES = 1000
DIM = 384
FACTORIES = {"Flat": "Flat", "IVF-PQ": "IVF{lists},PQ48", "HNSW": "HNSW32"}
SENTENCE = re.compile(r"(?<=[.!?])\s+")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def folder_mb(folder: Path) -> float:
    return sum(file.stat().st_size for file in folder.rglob("*") if file.is_file()) / 2**20


def write_corpus(out: Path, n_passages: int) -> tuple[Path, Path]:
    """The synthetic psgs_w100-style TSV and a file of real questions (one per line)."""
    found = default_host().registry
    tasks = [found.task_families["qa"](name, found.tasks[name], None, registry=found) for name in SOURCES]
    sentences = sorted({s for task in tasks for p in task.corpus()[0] for s in SENTENCE.split(p.text) if s})
    questions = [q.question for task in tasks for q in task.loaded.questions][:N_QUERIES]
    lengths = np.array([len(s.split()) for s in sentences])
    rng = np.random.default_rng(0)
    corpus = out / "psgs_synthetic.tsv"
    with open(corpus, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["id", "text", "title"])
        picks = rng.integers(0, len(sentences), size=(n_passages, 12))
        for number, row in enumerate(picks):
            words = np.cumsum(lengths[row])
            kept = row[: int(np.searchsorted(words, PASSAGE_WORDS)) + 1]
            writer.writerow([number, " ".join(sentences[i] for i in kept), f"Synthetic {number % 5000}"])
    (out / "questions.txt").write_text("\n".join(q.replace("\n", " ") for q in questions))
    return corpus, out / "questions.txt"


def part_bm25(out: Path, corpus: Path) -> dict:
    from raghub.plugins.retrievers.bm25 import BM25S

    passages = CorpusFile(corpus)  # streamed: holds only row offsets
    queries = (out / "questions.txt").read_text().splitlines()
    retriever = BM25S(Cache(out / "cache"))
    clock = time.perf_counter()
    retriever.index(passages, f"bm25-{len(passages)}")
    build = time.perf_counter() - clock
    clock = time.perf_counter()
    retriever.search(queries, 10)
    search = time.perf_counter() - clock
    return {"part": "bm25 (bm25s)", "passages": len(passages), "build_s": build,
            "size_mb": folder_mb(out / "cache" / "bm25-index"), "qps": len(queries) / search,
            "recall@10": 1.0, "peak_rss_mb": peak_rss_mb()}


def dense_build(out: Path, corpus: Path, n_passages: int, cache: str) -> None:
    """The dense retriever's build over the corpus's first passages (its own process)."""
    from raghub.plugins.retrievers.dense import DenseRetriever

    retriever = DenseRetriever(Cache(out / cache), embed_shard_size=max(1, n_passages // 8))
    retriever.index(CorpusFile(corpus)[:n_passages], f"dense-{n_passages}")


def part_encode(out: Path, corpus: Path, n_passages: int) -> dict:
    from raghub.plugins.retrievers.dense import DenseRetriever

    clock = time.perf_counter()
    dense_build(out, corpus, n_passages, "cache")
    build = time.perf_counter() - clock
    retriever = DenseRetriever(Cache(out / "cache"))
    [entry] = (out / "cache" / "dense-embeddings").iterdir()
    np.save(out / "embeddings.npy", np.load(entry / "embeddings.npy"))
    np.save(out / "queries.npy", retriever.embed((out / "questions.txt").read_text().splitlines()))
    return {"part": "MiniLM encode + Flat (end to end)", "passages": n_passages, "build_s": build,
            "passages_per_s": n_passages / build,
            "size_mb": folder_mb(out / "cache" / "dense-embeddings") + folder_mb(out / "cache" / "dense-index"),
            "peak_rss_mb": peak_rss_mb()}


def part_resume(out: Path, corpus: Path, n_passages: int) -> dict:
    """The dense build killed with SIGKILL after two shards, then run again to the end."""
    command = [sys.executable, __file__, "--part", "dense-build", "--out", str(out),
               "--dense-passages", str(n_passages)]
    killed = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    shards = out / "resume-cache" / "dense-embeddings"
    while len(list(shards.glob("*.shards/0*[0-9].npy"))) < 2 and killed.poll() is None:
        time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    kept = len(list(shards.glob("*.shards/0*[0-9].npy")))
    clock = time.perf_counter()
    subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
    resumed = np.load(next(shards.glob("*/embeddings.npy")))
    difference = float(np.abs(resumed - np.load(out / "embeddings.npy")[:n_passages]).max())
    return {"part": "dense build killed -9, resumed", "shards_kept": kept, "resume_s": time.perf_counter() - clock,
            "max_abs_difference_from_encode_part": difference, "same_embeddings": difference < 1e-5}


def part_faiss(out: Path, n_vectors: int) -> list[dict]:
    import faiss

    from raghub.kits.vector_index import ivf_list_count

    real = np.load(out / "embeddings.npy").astype(np.float32)
    rng = np.random.default_rng(0)
    vectors = real[np.arange(n_vectors) % len(real)] + rng.normal(0, 0.05, (n_vectors, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = np.load(out / "queries.npy")
    rows, exact = [], None
    for label, spec in FACTORIES.items():
        spec = spec.format(lists=ivf_list_count(n_vectors))
        clock = time.perf_counter()
        index = faiss.index_factory(DIM, spec, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(vectors[rng.choice(n_vectors, min(n_vectors, 262144), replace=False)])
        index.add(vectors)
        build = time.perf_counter() - clock
        faiss.ParameterSpace().set_index_parameters(index, "nprobe=16" if "IVF" in spec else
                                                    "efSearch=128" if "HNSW" in spec else "")
        clock = time.perf_counter()
        _, found = index.search(queries, 10)
        search = time.perf_counter() - clock
        exact = found if exact is None else exact
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])
        faiss.write_index(index, str(out / "index.faiss"))
        rows.append({"part": f"FAISS {label} ({spec})", "passages": n_vectors, "build_s": build,
                     "size_mb": (out / "index.faiss").stat().st_size / 2**20,
                     "qps": len(queries) / search, "recall@10": float(recall)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bm25-passages", type=int, default=200_000)
    parser.add_argument("--faiss-passages", type=int, default=200_000)
    parser.add_argument("--dense-passages", type=int, default=6_000)
    parser.add_argument("--resume-passages", type=int, default=None,
                        help="passages of the killed-and-resumed dense build (default: --dense-passages)")
    parser.add_argument("--out", type=Path, default=Path("scale-bench"))
    parser.add_argument("--part", choices=("all", "bm25", "encode", "resume", "faiss", "dense-build"), default="all")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = args.out / "psgs_synthetic.tsv"
    if args.part == "dense-build":
        return dense_build(args.out, corpus, args.dense_passages, "resume-cache")
    if args.part != "all":
        rows = {"bm25": lambda: part_bm25(args.out, corpus),
                "encode": lambda: part_encode(args.out, corpus, args.dense_passages),
                "resume": lambda: part_resume(args.out, corpus, args.resume_passages or args.dense_passages),
                "faiss": lambda: part_faiss(args.out, args.faiss_passages)}[args.part]()
        for row in rows if isinstance(rows, list) else [rows]:
            print(json.dumps({**row, "peak_rss_mb": row.get("peak_rss_mb", peak_rss_mb())}), flush=True)
        return
    write_corpus(args.out, max(args.bm25_passages, args.dense_passages))
    for part in ("bm25", "encode", "resume", "faiss"):  # each in its own process: its own peak memory
        subprocess.run([sys.executable, __file__, "--part", part, *sys.argv[1:]], check=True)


if __name__ == "__main__":
    main()
