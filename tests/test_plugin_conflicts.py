"""Plugins that collide or fail half-way: nothing a failing plugin registered stays, an
override is flagged, a record names the plugins behind it, two distributions may share an
entry-point name."""

from types import SimpleNamespace

from plugin_packages import run_raghub
from raghub import Method, ModelBackend, Option, Task, hookimpl
from raghub.models import choose_backend
from raghub.plugin_manager import registry


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


def test_a_plugin_failing_in_one_hook_leaves_nothing_it_registered(add_plugin):
    """Regression: its task family, registered by a hook that succeeded, stayed in the registry."""
    def explode(register):
        raise RuntimeError("boom")

    add_plugin(SimpleNamespace(register_task_families=hookimpl(lambda register: register(HalfTask)),
                               register_methods=hookimpl(explode)))
    assert "half-registered" not in registry().task_families
    assert "ensemble" in registry().methods


def test_an_override_of_a_built_in_is_flagged(add_plugin):
    add_plugin(SimpleNamespace(register_methods=hookimpl(lambda register: register(Replacement))))
    found = registry()
    assert found.methods["none"] is Replacement
    assert found.origin("method", "none") == "registered at run time (overrides built-in)"
    assert found.origin("method", "ensemble") == "built-in"


def test_a_backend_option_may_share_a_core_settings_name(add_plugin):
    """A backend's options are --model-args keys, not flags, so `device` shadows nothing."""
    add_plugin(SimpleNamespace(register_models=hookimpl(lambda register: register(DeviceAware))))
    backend = choose_backend(registry(), "device-aware", model_args="device=cuda")
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
