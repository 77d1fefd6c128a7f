"""What the embedding retrievers share (`dense`, `dpr`): passage embeddings and a FAISS
inner-product index over them (exact flat, IVF clusters or an HNSW graph), each cached by
fingerprint. They are two cache entries: changing only the index type reuses the embeddings."""

from __future__ import annotations

import math
from abc import abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from raghub.errors import UsageError
from raghub.interfaces import Passage, Retriever
from raghub.options import Option

if TYPE_CHECKING:  # pragma: no cover
    import faiss

INDEX_TYPES = ("flat", "ivf", "hnsw")
HNSW_NEIGHBOURS = 32
#: FAISS wants at least this many training points per IVF cluster
IVF_POINTS_PER_LIST = 39


def ivf_list_count(n_vectors: int) -> int:
    """IVF clusters for a corpus: FAISS's 4·sqrt(n) rule, capped so each has enough points."""
    return max(1, min(round(4 * math.sqrt(n_vectors)), n_vectors // IVF_POINTS_PER_LIST))


class EmbeddingRetriever(Retriever):
    """A retriever that embeds passages and queries and ranks by inner product in a FAISS
    index. Subclasses embed (`embed_passages`, `embed_queries`) and say what the passage
    embeddings depend on (`embedding_key`); their cache entries are `<name>-embeddings` and
    `<name>-index`."""

    options = {
        "index_type": Option(INDEX_TYPES, "flat", "FAISS index: exact flat, ivf clusters or hnsw graph"),
        "nprobe": Option(int, 16, "ivf: clusters searched per query", at_least=1),
        "ef_search": Option(int, 128, "hnsw: candidates kept while searching", at_least=1),
        "encode_batch_size": Option(int, 64, "texts embedded per encoder call", at_least=1),
    }

    def __init__(self, cache, **options: Any) -> None:
        super().__init__(cache, **options)
        self.faiss_index: faiss.Index | None = None

    @abstractmethod
    def embed_passages(self, passages: Sequence[Passage]) -> np.ndarray:
        """float32 passage embeddings [len(passages), dim]."""

    @abstractmethod
    def embed_queries(self, queries: Sequence[str]) -> np.ndarray:
        """float32 query embeddings [len(queries), dim]."""

    @abstractmethod
    def embedding_key(self) -> dict[str, Any]:
        """The settings the passage embeddings depend on (encoders, normalisation)."""

    def fingerprint(self) -> dict[str, Any]:
        """The settings without `encode_batch_size`, which does not change results."""
        return {key: value for key, value in super().fingerprint().items() if key != "encode_batch_size"}

    def passage_embeddings(self, passages: Sequence[Passage], corpus_fingerprint: str) -> np.ndarray:
        """The passages' embeddings, computed once per corpus and `embedding_key`."""
        def build(folder: Path) -> None:
            np.save(folder / "embeddings.npy", self.embed_passages(passages))

        return self.cache.get_or_build(
            f"{self.name}-embeddings", {"corpus": corpus_fingerprint, **self.embedding_key()}, build,
            lambda folder: np.load(folder / "embeddings.npy"))

    def build_index(self, embeddings: np.ndarray) -> faiss.Index:
        import faiss

        dim = embeddings.shape[1]
        if self.settings["index_type"] == "flat":
            index = faiss.IndexFlatIP(dim)
        elif self.settings["index_type"] == "ivf":
            index = faiss.IndexIVFFlat(
                faiss.IndexFlatIP(dim), dim, ivf_list_count(len(embeddings)), faiss.METRIC_INNER_PRODUCT
            )
            index.train(embeddings)
        else:
            index = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.add(embeddings)
        return index

    def load_index(self, folder: Path) -> faiss.Index:
        import faiss

        index = faiss.read_index(str(folder / "index.faiss"))
        if self.settings["index_type"] == "ivf":
            index.nprobe = self.settings["nprobe"]
        elif self.settings["index_type"] == "hnsw":
            index.hnsw.efSearch = self.settings["ef_search"]
        return index

    def index(self, passages: Sequence[Passage], corpus_fingerprint: str) -> None:
        if not passages:
            raise UsageError(f"{self.name}: the retrieval corpus has no passages; check the task's corpus")

        def build(folder: Path) -> None:
            import faiss

            index = self.build_index(self.passage_embeddings(passages, corpus_fingerprint))
            faiss.write_index(index, str(folder / "index.faiss"))

        key = {"corpus": corpus_fingerprint, **self.fingerprint()}
        self.faiss_index = self.cache.get_or_build(f"{self.name}-index", key, build, self.load_index)

    def search(self, queries: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        if self.faiss_index is None:
            raise RuntimeError("index() must be called before search()")
        k = min(k, self.faiss_index.ntotal)
        if not queries or k <= 0:
            return [[] for _ in queries]
        scores, positions = self.faiss_index.search(self.embed_queries(queries), k)
        return [
            sorted(
                ((int(position), float(score)) for position, score in zip(row_positions, row_scores)
                 if position >= 0),  # IVF / HNSW return -1 when they find fewer than k
                key=lambda pair: (-pair[1], pair[0]),
            )
            for row_positions, row_scores in zip(positions, scores)
        ]
