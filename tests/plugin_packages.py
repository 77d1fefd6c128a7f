"""What the plugin tests share. For tests that run the real `raghub` command in a subprocess:
small fake distributions written straight into a folder, and tests/third_party_plugin
pip-installed into one (put the folder on PYTHONPATH and `importlib.metadata` finds their entry
points). For in-process tests: a `LanguageModel` that needs no weights."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

from click.testing import CliRunner

from raghub import Generation, LanguageModel, ModelBackend, hookimpl
from raghub.cli import cli

RAGHUB = Path(sys.executable).with_name("raghub")
THIRD_PARTY_PLUGIN = Path(__file__).parent / "third_party_plugin"
#: the plugin's package folder
PLUGIN_PACKAGE = THIRD_PARTY_PLUGIN / "raghub_uniform"


def write_distribution(folder: Path, name: str, module_source: str | Path, module: str | None = None) -> None:
    """Distribution `name` 0.1 whose `raghub` entry point `name` is the module `module`
    (default `raghub_test_<name>`), holding `module_source`, or a copy of the package folder
    `module_source` names. No installer wrote it (it has no RECORD): raghub treats it as a
    local module."""
    module = module or f"raghub_test_{name}"
    dist_info = folder / f"{name}-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(f"[raghub]\n{name} = {module}\n")
    if isinstance(module_source, Path):
        shutil.copytree(module_source, folder / module, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        (folder / f"{module}.py").write_text(textwrap.dedent(module_source))


def install_third_party_plugin(target: Path, scratch: Path, version: str | None = None) -> None:
    """pip-install tests/third_party_plugin into `target` (built from a copy in `scratch`,
    since the build leaves files beside the sources), as `version` when given."""
    source = scratch / "third_party_plugin"
    shutil.copytree(THIRD_PARTY_PLUGIN, source, ignore=shutil.ignore_patterns("__pycache__", "build",
                                                                             "*.egg-info"))
    if version:
        project = source / "pyproject.toml"
        project.write_text(re.sub(r'^version = ".*"$', f'version = "{version}"', project.read_text(), flags=re.M))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True)


#: a distribution's module: the model backend `echo`, whose model answers "echo" to every
#: prompt, so that a `raghub run` in a subprocess needs no weights (`--model echo`)
ECHO_BACKEND = """
    from raghub import Generation, LanguageModel, ModelBackend, hookimpl

    class Tokenizer:
        pad_token_id, eos_token = 0, "<end>"

        def __len__(self):
            return 1000

    class Echo(LanguageModel):
        device, dtype = "cpu", "float32"

        def sequence_logprobs(self, sequences, starts):
            raise NotImplementedError

        def generate(self, prompts, max_new_tokens):
            return [Generation("echo", []) for _ in prompts]

    class EchoBackend(ModelBackend):
        name = "echo"
        handles_description = "echo: a model that answers 'echo'"

        @classmethod
        def handles(cls, spec):
            return spec == "echo"

        def load(self, spec, device, dtype, batch_size):
            return Echo(Tokenizer(), "echo", batch_size)

    @hookimpl
    def register_models(register):
        register(EchoBackend)
"""


def run_raghub(site: Path, *args: str, load: str | None = None) -> subprocess.CompletedProcess:
    """`raghub ARGS` with the distributions in `site` importable; `load` sets
    RAGHUB_LOAD_PLUGINS (None: every plugin found)."""
    env = {key: value for key, value in os.environ.items() if key != "RAGHUB_LOAD_PLUGINS"}
    env.update(PYTHONPATH=str(site), COLUMNS="200")  # tables wide enough not to wrap a row
    if load is not None:
        env["RAGHUB_LOAD_PLUGINS"] = load
    return subprocess.run([str(RAGHUB), *args], env=env, capture_output=True, text=True)


class _Tokenizer:
    """Just enough of a tokenizer: a vocabulary of 1000 tokens and a padding token."""

    pad_token_id, eos_token = 0, "<end>"

    def __len__(self):
        return 1000


class RecordingModel(LanguageModel):
    """A model with no weights: answers every prompt with the prompt's length and remembers
    each `generate` call as (prompts, max_new_tokens)."""

    device, dtype = "cpu", "float32"

    def __init__(self, name: str = "recording", batch_size: int = 8):
        super().__init__(_Tokenizer(), name, batch_size)
        self.calls: list[tuple[list[str], int]] = []

    def sequence_logprobs(self, sequences, starts):
        raise NotImplementedError

    def generate(self, prompts, max_new_tokens):
        self.calls.append((list(prompts), max_new_tokens))
        return [Generation(f"Answer: {len(p)}\nmore text", []) for p in prompts]


class ShortModel(RecordingModel):
    """A `RecordingModel` of one token per character that takes `length` tokens; it gives every
    scored token ln p = -0.5 and remembers each scored sequence."""

    def __init__(self, length: int, name: str = "short"):
        super().__init__(name)
        self.length = length
        self.scored: list[list[int]] = []

    def encode(self, text):
        return [ord(char) for char in text]

    def max_input_tokens(self, new_tokens=0):
        return self.length - new_tokens

    def sequence_logprobs(self, sequences, starts):
        import torch

        self.scored += [list(sequence) for sequence in sequences]
        return [torch.full((len(sequence) - start,), -0.5) for sequence, start in zip(sequences, starts)]


class ShortBackend(ModelBackend):
    """Loads `--model short:N`, a `ShortModel` that takes N tokens."""

    name = "short"

    @classmethod
    def handles(cls, spec):
        return spec is not None and spec.startswith("short:")

    def load(self, spec, device, dtype, batch_size):
        return ShortModel(int(spec.removeprefix("short:")))


#: the origin `raghub plugins` gives a plugin registered in process
RUN_TIME = "registered at run time"


def invoke(*args):
    """`raghub ARGS` in process, its tables wide enough not to wrap a row."""
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": "200"})


def registering(hook_name, *items):
    """An in-process plugin whose `hook_name` hook registers `items`."""
    def hook(register):
        for item in items:
            register(item)
    return SimpleNamespace(**{hook_name: hookimpl(hook)})
