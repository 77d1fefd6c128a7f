"""The declared contracts between methods, task families and model backends: which families a
method supports (`Method.families`), what it and its family require of a model (`requires`)
and what a backend provides (`ModelBackend.provides`), checked before anything loads or is
written; and an error inside evaluation reported as itself."""

import time

import pytest
from click.testing import CliRunner

from bad_input import assert_one_line_exit_2, model_never_loads  # noqa: F401 (model_never_loads: a fixture)
from raghub import Method, UsageError
from raghub.cli import cli
from raghub.models import ModelSpec
from raghub.plugins.methods.device_cloud import method as device_cloud_method
from raghub.plugins.methods.device_cloud.method import DeviceCloud
from raghub.plugins.tasks.language_modelling import LanguageModelling
from raghub.plugins.tasks.question_answering.task import QATask
from test_hooks import WORDS_TASK, Toy, Words, registering


def invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


@pytest.fixture
def toy_loads(add_plugin, monkeypatch):
    """The `toy` backend registered, each of its loads recorded as (spec, dtype)."""
    add_plugin(registering("register_models", Toy))
    loads = []
    real_load = Toy.load
    monkeypatch.setattr(Toy, "load", lambda self, spec, device, dtype, batch_size:
                        loads.append((spec, dtype)) or real_load(self, spec, device, dtype, batch_size))
    return loads


class AnswersOnly(Method):
    """A third-party method that declares nothing and implements the QA entry point only."""

    name = "answers-only"
    needs_retrieval = False

    def answer(self, questions, retrieved):
        return ["" for _ in questions]


def fails_deep_inside():
    raise NotImplementedError("an operator this build of torch lacks")


class FailsDeepInside(Method):
    """A method whose library raises NotImplementedError while it answers."""

    name = "fails-deep-inside"
    needs_retrieval = False

    def answer(self, questions, retrieved):
        fails_deep_inside()


# --- method and family ------------------------------------------------------------------------

def test_fid_on_a_language_modelling_task_is_refused_before_anything_loads_or_is_written(
        tmp_path, monkeypatch, model_never_loads):
    monkeypatch.setenv("RAGHUB_CACHE", str(tmp_path / "cache"))
    started = time.perf_counter()
    result = invoke("run", "--task", "wikitext2", "--method", "fid", "--results-dir", tmp_path / "results")
    assert_one_line_exit_2(result, "method 'fid' does not support language-modelling tasks such as 'wikitext2' "
                                   "(it supports: qa)", tmp_path / "results")
    assert not (tmp_path / "cache").exists()  # no index, no retrieval, no dequantised model
    assert time.perf_counter() - started < 5


def test_a_method_that_declares_no_families_supports_those_whose_entry_point_it_implements():
    assert AnswersOnly.supports(QATask) and not AnswersOnly.supports(LanguageModelling)
    assert AnswersOnly.supports(Words)  # a family that names no entry point: every such method


def test_an_undeclared_method_on_a_family_it_does_not_implement_is_refused_before_loading(
        add_plugin, tmp_path, model_never_loads):
    add_plugin(registering("register_methods", AnswersOnly))
    result = invoke("run", "--task", "wikitext2", "--method", "answers-only", "--results-dir", tmp_path / "results")
    assert_one_line_exit_2(result, "method 'answers-only' does not support language-modelling tasks such as "
                                   "'wikitext2'", tmp_path / "results")


def test_every_built_in_method_declares_the_families_whose_entry_points_it_implements(host):
    found = host.registry
    families = found.task_families.values()
    for name, method_class in found.methods.items():
        if found.origins[("method", name)] != "built-in":
            continue
        implemented = {family.family for family in families
                       if getattr(method_class, family.entry_point) is not getattr(Method, family.entry_point)}
        assert method_class.families == implemented, name


def test_a_not_implemented_error_inside_evaluation_is_not_reported_as_an_unsupported_family(
        add_plugin, toy_loads, tmp_path, monkeypatch):
    monkeypatch.setenv("RAGHUB_CACHE", str(tmp_path / "cache"))
    for hook, item in [("register_task_families", Words), ("register_tasks", WORDS_TASK),
                       ("register_methods", FailsDeepInside)]:
        add_plugin(registering(hook, item))
    result = invoke("run", "--task", "three-words", "--method", "fails-deep-inside", "--model", "tiny.toy",
                    "--results-dir", tmp_path / "results")
    assert "does not support" not in result.output
    assert isinstance(result.exception, NotImplementedError)
    assert str(result.exception) == "an operator this build of torch lacks"


# --- what a method needs of a model, and what a backend provides ----------------------------

def test_a_backend_lacking_what_a_method_requires_is_refused_before_loading(toy_loads, tmp_path):
    result = invoke("run", "--task", "squad", "--method", "parametric", "--model", "tiny.toy",
                    "--results-dir", tmp_path / "results")
    assert_one_line_exit_2(result, "method 'parametric' needs a model that provides weights (the transformers "
                                   "model itself in this process (`hf_model`)", tmp_path / "results")
    assert ("model backend 'toy' provides only continuation_logprobs, generate, sequence_logprobs"
            in result.output)
    assert toy_loads == []


def test_a_backend_that_declares_nothing_provides_the_language_model_interface(toy_loads, tmp_path, monkeypatch):
    monkeypatch.setenv("RAGHUB_CACHE", str(tmp_path / "cache"))
    result = invoke("run", "--task", "squad", "--method", "none", "--model", "tiny.toy", "--limit", 1,
                    "--results-dir", tmp_path / "results")
    assert result.exit_code == 0, result.output
    assert toy_loads == [("tiny.toy", "auto")]


def test_raghub_train_with_a_backend_lacking_weights_is_refused_before_loading(toy_loads, tmp_path):
    result = invoke("train", "--task", "squad-train", "--output", tmp_path / "out", "--model", "tiny.toy")
    assert_one_line_exit_2(result, "raghub train needs a model that provides answer_scores", tmp_path / "out")
    assert "weights (the transformers model itself" in result.output and toy_loads == []


# --- device-cloud's cloud: the run's whole model spec ----------------------------------------

class SteppableToy(Toy):
    """A toy backend that claims what device-cloud's sides need."""

    name = "steppable-toy"
    provides = frozenset({"generate", "sequence_logprobs", "weights"})


def test_device_cloud_starts_its_cloud_with_the_runs_whole_model_spec(tmp_path, monkeypatch):
    model = Toy().load_from_spec(ModelSpec("tiny.toy", None, "width=3", "auto"), "cpu", 8)
    spawned = []
    monkeypatch.setattr(device_cloud_method, "start_cloud",
                        lambda arguments, timeout_s, environment: spawned.append(arguments) or (None, "address"))
    DeviceCloud(model, None)._spawn_cloud()
    arguments = spawned[0]
    assert arguments[:9] == ["--once", "--model", "tiny.toy", "--model-backend", "toy", "--model-args", "width=3",
                             "--dtype", "float32"]  # the dtype the model runs in, for --dtype auto


def test_device_cloud_without_a_loaded_from_spec_asks_for_a_cloud_address():
    model = Toy().load("tiny.toy", "cpu", "float32", 8)
    with pytest.raises(UsageError, match="give --cloud-address"):
        DeviceCloud(model, None)._spawn_cloud()


@pytest.fixture
def cloud_loads(add_plugin, monkeypatch):
    """`toy` and `steppable-toy` registered; each load is recorded as (backend, its settings,
    spec, dtype) and ends `raghub cloud serve` with exit 2 instead of serving."""
    add_plugin(registering("register_models", Toy, SteppableToy))
    loads = []

    def load(self, spec, device, dtype, batch_size):
        loads.append((self.name, self.settings, spec, dtype))
        raise UsageError("loaded")

    monkeypatch.setattr(Toy, "load", load)
    return loads


def test_the_cloud_loads_the_model_spec_it_is_given(cloud_loads):
    result = invoke("cloud", "serve", "--port", 0, "--model", "tiny.toy", "--model-backend", "steppable-toy",
                    "--model-args", "width=3", "--dtype", "bfloat16")
    assert result.exit_code == 2 and "loaded" in result.output
    assert cloud_loads == [("steppable-toy", {"width": 3}, "tiny.toy", "bfloat16")]


def test_the_cloud_refuses_a_backend_lacking_what_a_side_needs_before_loading(cloud_loads):
    result = invoke("cloud", "serve", "--port", 0, "--model", "tiny.toy", "--model-backend", "toy")
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1
    assert "the device-cloud cloud needs a model that provides weights" in result.output and cloud_loads == []
