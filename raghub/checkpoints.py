"""The folder layout of a `raghub train` checkpoint, shared by the trainer that writes it and
the plugins that load it (`--checkpoint DIR`), which may import only the core.

    DIR/manifest.json        the latest complete save: {"step", "folder", "parts", "content",
                             "config", "fingerprint", "model_fingerprint", "trained_on", ...}
    DIR/train_log.jsonl      one line per training step (loss, its parts, steps/s)
    DIR/step-000100/         one complete save: its own manifest.json and the parts,
        generator/             a peft LoRA adapter, or the whole fine-tuned model (absent
                               when the generator was frozen)
        query_encoder/         the retriever's query encoder, as a folder it loads
        passage_encoder/       its passage encoder, when the passage side was trained
        trainer_state.pt       optimizer states, to resume

A save is built in `step-N.partial/`, renamed to `step-N/`, and only then does
`DIR/manifest.json` (replaced in one step) point to it; so a process killed at any moment, or
a save that fails (a full disk: one line, exit 1), leaves the previous save intact and loadable.
Its manifest declares the parts it saved (`parts`); a save missing one of them is refused when read.

A method that declares `CHECKPOINT_OPTION` evaluates the checkpoint's generator: the runner
loads the model with it (`with_trained_generator`), once per distinct checkpoint, so the
loaded model's fingerprint covers the base weights and the checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from raghub.cache import files_fingerprint, fingerprint
from raghub.errors import RunError, UsageError
from raghub.options import Option

#: `--checkpoint`: methods that evaluate a trained generator and the embedding retrievers
#: (`dense`, `dpr`) declare it, each reading its part of the same folder
CHECKPOINT_OPTION = Option(str, "", "a `raghub train` output folder: its trained generator and "
                                       "retriever encoders are used")

MANIFEST = "manifest.json"
TRAIN_LOG = "train_log.jsonl"
GENERATOR, QUERY_ENCODER, PASSAGE_ENCODER, TRAINER_STATE = (
    "generator", "query_encoder", "passage_encoder", "trainer_state.pt")


@dataclass(frozen=True)
class Checkpoint:
    """One complete save: its folder and manifest."""

    folder: Path
    manifest: dict[str, Any]

    def part(self, name: str) -> Path | None:
        """The folder or file of a part (GENERATOR, QUERY_ENCODER, ...), None when absent."""
        path = self.folder / name
        return path if path.exists() else None

    @property
    def identity(self) -> str:
        """What identifies the weights: the training config's fingerprint, the step and the saved
        weights' content (which the config does not fix: the data, a model folder, the code), for
        a save that records it."""
        content = self.manifest.get("content")
        return f"{self.manifest['fingerprint']}@{self.manifest['step']}" + (f"/{content}" if content else "")


def read_checkpoint(path: str | Path, flag: str = "--checkpoint") -> Checkpoint:
    """The latest save of a training output folder (or one `step-N` folder), checked: its
    identity is readable and every part its manifest declares is there; UsageError otherwise."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UsageError(f"{flag} {path}: no {MANIFEST} there; give the --output folder of "
                         "`raghub train`") from None
    if (not isinstance(manifest, dict) or not isinstance(manifest.get("fingerprint"), str)
            or not isinstance(manifest.get("step"), int) or not isinstance(manifest.get("parts", []), list)):
        raise UsageError(f"{flag} {path}: {MANIFEST} is damaged (no fingerprint, step or parts); "
                         "train again into this folder or give another")
    checkpoint = Checkpoint(path / manifest["folder"] if manifest.get("folder") else path, manifest)
    missing = [part for part in manifest.get("parts", []) if checkpoint.part(part) is None]
    if missing:
        raise UsageError(f"{flag} {path}: {checkpoint.folder.name} lacks {', '.join(missing)}, which its "
                         f"{MANIFEST} declares; copy the whole folder or train again")
    return checkpoint


def write_checkpoint(output: Path, step: int, manifest: dict[str, Any],
                     save_parts: Callable[[Path], None]) -> Checkpoint:
    """Save step `step` atomically (see the module docstring) and remove the older saves. A
    save that cannot be written (a full disk) is a RunError; the previous save stays the latest."""
    name = f"step-{step:06d}"
    partial = output / f"{name}.partial"
    pointer = output / f"{MANIFEST}.tmp"
    full = {**manifest, "step": step}
    try:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        save_parts(partial)
        weights = sorted(path for path in partial.rglob("*") if path.is_file() and path.name != TRAINER_STATE)
        full = {**full, "parts": sorted(part.name for part in partial.iterdir()),
                "content": files_fingerprint(weights, partial)}
        (partial / MANIFEST).write_text(json.dumps({**full, "folder": ""}, indent=1), encoding="utf-8")
        shutil.rmtree(output / name, ignore_errors=True)
        partial.rename(output / name)
        pointer.write_text(json.dumps({**full, "folder": name}, indent=1), encoding="utf-8")
        os.replace(pointer, output / MANIFEST)
    except Exception as error:  # not only OSError: torch and safetensors raise their own on a full disk
        shutil.rmtree(partial, ignore_errors=True)
        pointer.unlink(missing_ok=True)
        problem = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RunError(f"could not save step {step} in {output} ({problem}); the previous save is kept "
                       "and the same command resumes from it") from error
    for old in output.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return Checkpoint(output / name, full)


def load_trained_generator(model: Any, checkpoint: Checkpoint, flag: str = "--checkpoint") -> None:
    """Put the checkpoint's trained generator into `model`, which must be the model it was
    trained from (`LanguageModel.load_trained_weights`: a model that provides `weights`)."""
    part = checkpoint.part(GENERATOR)
    if part is None:
        return
    trained_on = checkpoint.manifest["model_fingerprint"]
    if model.fingerprint != trained_on:
        raise UsageError(f"{flag} {checkpoint.folder.parent} was trained on model {checkpoint.manifest['model']} "
                         f"({trained_on}), not {model.name} ({model.fingerprint})")
    model.load_trained_weights(part)


def with_trained_generator(model: Any, checkpoint: Checkpoint | None) -> Any:
    """`model`, just loaded, with the checkpoint's generator in its weights and a fingerprint
    that covers them; unchanged when the checkpoint has no generator."""
    identity = generator_identity(checkpoint)
    if identity is None:
        return model
    load_trained_generator(model, checkpoint)
    model.fingerprint = fingerprint(model.fingerprint, identity)
    return model


def generator_identity(checkpoint: Checkpoint | None) -> str | None:
    """What a model with the checkpoint's generator is told apart by from its base weights
    (None: the base weights)."""
    return checkpoint.identity if checkpoint is not None and checkpoint.part(GENERATOR) else None


def generator_checkpoint(method_class: Any, method_options: dict[str, Any]) -> Checkpoint | None:
    """The checkpoint whose generator a method evaluates, read and checked: the one given to
    its `checkpoint` option when the method declares it as `CHECKPOINT_OPTION`; else None."""
    if method_class.options.get("checkpoint") is not CHECKPOINT_OPTION or not method_options.get("checkpoint"):
        return None
    return read_checkpoint(method_options["checkpoint"])


def checkpoint_stats(checkpoint: Checkpoint | None) -> dict[str, Any]:
    """What a run's record says of the checkpoint it evaluated: which save, trained on what."""
    if checkpoint is None:
        return {}
    manifest = checkpoint.manifest
    return {"checkpoint": checkpoint.identity, "trained_on": manifest["trained_on"],
            "objective": manifest["config"]["objective"], "training_steps": manifest["step"]}
