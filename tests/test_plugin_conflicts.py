"""Plugins that collide or fail half-way: nothing a failing plugin registered stays, an
override is flagged, a record names the plugins behind it, two distributions may share an
entry-point name, two plugins' options of one name are shown apart and refused together; and
what identifies a plugin's code."""

import importlib.metadata
from pathlib import Path
from types import SimpleNamespace

import pytest

from plugin_packages import run_raghub, write_distribution
from raghub import Method, ModelBackend, Option, Task, hookimpl
from raghub.models import choose_backend
from raghub import plugin_manager
from raghub.plugin_manager import _installed_from_a_build, _source_digest


class HalfTask(Task):
    family = "half-registered"

    def examples(self, model, limit):
        return []

    def corpus(self):
        return [], ""

    def evaluate(self, method, examples, retrieved):
        return []

    def aggregate(self, stats):
        return {}


class Replacement(Method):
    name = "none"
    needs_retrieval = False


class DeviceAware(ModelBackend):
    """A backend whose --model-args key `device` is named like a core setting."""

    name = "device-aware"
    options = {"device": Option(str, "cpu", "where to run")}

    @classmethod
    def handles(cls, spec):
        return spec == "device-aware"

    def load(self, spec, device, dtype, batch_size):
        raise AssertionError("not loaded in these tests")


def test_a_plugin_failing_in_one_hook_leaves_nothing_it_registered(host, add_plugin):
    """Regression: its task family, registered by a hook that succeeded, stayed in the registry."""
    def explode(register):
        raise RuntimeError("boom")

    add_plugin(SimpleNamespace(register_task_families=hookimpl(lambda register: register(HalfTask)),
                               register_methods=hookimpl(explode)))
    assert "half-registered" not in host.registry.task_families
    assert "ensemble" in host.registry.methods


def test_an_override_of_a_built_in_is_flagged(host, add_plugin):
    add_plugin(SimpleNamespace(register_methods=hookimpl(lambda register: register(Replacement))))
    found = host.registry
    assert found.methods["none"] is Replacement
    assert found.origin("method", "none") == "registered at run time (overrides built-in)"
    assert found.origin("method", "ensemble") == "built-in"


def test_a_backend_option_may_share_a_core_settings_name(host, add_plugin):
    """A backend's options are --model-args keys, not flags, so `device` shadows nothing."""
    add_plugin(SimpleNamespace(register_models=hookimpl(lambda register: register(DeviceAware))))
    backend = choose_backend(host.registry, "device-aware", model_args="device=cuda")
    assert isinstance(backend, DeviceAware) and backend.settings == {"device": "cuda"}


def test_two_distributions_with_one_entry_point_name_are_both_loaded(tmp_path):
    """Regression: the second distribution's plugin was dropped without a word."""
    for dist, method in (("first-dist", "first"), ("second-dist", "second")):
        info = tmp_path / f"{dist}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[raghub]\nshared = raghub_test_{method}\n")
        (tmp_path / f"raghub_test_{method}.py").write_text(
            "from raghub import Method, hookimpl\n\n"
            f"class M(Method):\n    name = {method!r}\n    needs_retrieval = False\n\n"
            "@hookimpl\ndef register_methods(register):\n    register(M)\n")
    out = run_raghub(tmp_path, "methods")
    assert out.returncode == 0, out.stderr
    assert "first" in out.stdout and "second" in out.stdout
    assert "plugin name 'shared' is used by" in out.stderr


#: a retriever whose `--seed` means something else than the parametric method's (default 42)
SEEDED_RETRIEVER = """
    from raghub import Option, Retriever, hookimpl

    class Seeded(Retriever):
        name = "seeded"
        options = {"seed": Option(int, 0, "seed of the seeded retriever's draws")}

        def index(self, passages, corpus_fingerprint):
            pass

        def search(self, queries, k):
            return [[] for _ in queries]

    @hookimpl
    def register_retrievers(register):
        register(Seeded)
"""


def test_help_shows_each_plugins_own_declaration_of_a_shared_option_name(tmp_path):
    """Regression: the retriever's --seed was shown with the parametric method's help and default."""
    write_distribution(tmp_path, "seeded", SEEDED_RETRIEVER)
    out = run_raghub(tmp_path, "run", "--help")
    assert out.returncode == 0, out.stderr
    seed_help = " ".join(out.stdout.split("--seed ")[1].split("\n  --")[0].split())
    assert "seed of the seeded retriever's draws [retriever seeded; default: 0]" in seed_help
    assert "augmentation sampling [method parametric; default: 42]" in seed_help


def test_two_selected_plugins_declaring_an_option_apart_are_refused_in_one_line(tmp_path):
    write_distribution(tmp_path, "seeded", SEEDED_RETRIEVER)
    out = run_raghub(tmp_path, "run", "--task", "squad", "--method", "parametric", "--retriever", "seeded",
                     "--seed", "3", "--results-dir", str(tmp_path / "results"))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert ("--seed means different things to the method 'parametric' and the retriever 'seeded'"
            in out.stderr)
    assert not (tmp_path / "results").exists()


class Editable(Method):
    name = "editable-method"


def test_a_plugin_registered_at_run_time_is_identified_by_its_source(host, add_plugin):
    """Its identity is the source of the module that defines its hooks: this file."""
    add_plugin(SimpleNamespace(register_methods=hookimpl(lambda register: register(Editable))))
    assert host.code_identity("method", "editable-method") == {"source": _source_digest((__name__,))}
    assert _source_digest((__name__,)) != _source_digest(())


def test_a_local_plugin_modules_code_is_its_whole_top_level_package(host, tmp_path, monkeypatch, add_plugin):
    """An edit to a module the plugin's entry module imports (not the entry module) counts."""
    package = tmp_path / "raghub_test_package"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "retrievers.py").write_text("from raghub import Method\n\n"
                                           "class Packaged(Method):\n    name = 'packaged'\n")
    (package / "hooks.py").write_text("from raghub import hookimpl\n"
                                      "from raghub_test_package.retrievers import Packaged\n\n"
                                      "@hookimpl\ndef register_methods(register):\n    register(Packaged)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    add_plugin(importlib.import_module("raghub_test_package.hooks"))
    before = host.code_identity("method", "packaged")
    (package / "retrievers.py").write_text((package / "retrievers.py").read_text() + "# edited\n")
    _source_digest.cache_clear()  # the hash is kept for the process; a new process reads the edit
    assert host.code_identity("method", "packaged") != before


def test_a_fix_to_a_kit_changes_the_code_of_the_plugins_using_it_and_no_other(host, monkeypatch):
    """Regression: a built-in's code was its own module only, so a fix to a kit it uses (the
    dense retriever's `vector_index`) left its cache entries (passage embeddings, the index)
    keyed as before, and they were served after the fix."""
    host.load()
    before = {name: host.code_identity("retriever", name) for name in ("dense", "bm25")}
    real_sha256 = plugin_manager.file_sha256
    monkeypatch.setattr(plugin_manager, "file_sha256", lambda path: "edited" if Path(path).name == "vector_index.py"
                        else real_sha256(path))
    _source_digest.cache_clear()
    try:
        assert host.code_identity("retriever", "dense") != before["dense"]
        assert host.code_identity("retriever", "bm25") == before["bm25"]
    finally:
        _source_digest.cache_clear()


@pytest.mark.parametrize("files, installed", [
    ({"RECORD": "m.py,sha256=x,1\n"}, True),  # put in place by an installer from a built package
    ({}, False),  # a folder on the path with metadata, as a local module
    ({"RECORD": "m.py,sha256=x,1\n",
      "direct_url.json": '{"url": "file:///src/m", "dir_info": {"editable": true}}'}, False),
])
def test_only_a_distribution_installed_from_a_build_is_identified_by_its_version(tmp_path, files, installed):
    info = tmp_path / "m-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: m\nVersion: 1.0\n")
    for name, text in files.items():
        (info / name).write_text(text)
    assert _installed_from_a_build(importlib.metadata.PathDistribution(info)) is installed
