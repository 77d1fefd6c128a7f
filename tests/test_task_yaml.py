"""The task YAML reference is written from the schemas the code checks against (and stays so),
a key left out gets the default it documents, and README's task of its own runs as written."""

import json
import re
import shlex
from pathlib import Path

from click.testing import CliRunner

from raghub.cli import cli
from raghub.interfaces import COMMON_TASK_KEYS
from raghub.plugin_manager import PluginHost
from raghub.resolution import RunRequest, resolve
from raghub.schema import reference_rows
from raghub.task_yaml import task_yaml_reference
from scripted import ScriptedBackend, ScriptedModel, scripted  # noqa: F401

ROOT = Path(__file__).parents[1]
REFERENCE = ROOT / "docs" / "task-yaml.md"


def built_in_families():
    found = PluginHost().registry
    return {name: cls for name, cls in found.task_families.items()
            if found.origins[("task family", name)] == "built-in"}


def test_docs_task_yaml_is_what_raghub_task_yaml_writes():
    assert REFERENCE.read_text(encoding="utf-8") == task_yaml_reference(built_in_families()), (
        "docs/task-yaml.md is stale: run `raghub task-yaml > docs/task-yaml.md`")


def test_the_command_prints_the_reference(host):
    out = CliRunner().invoke(cli, ["task-yaml"])
    assert out.exit_code == 0 and out.output == task_yaml_reference(host.registry.task_families)


def test_every_key_of_every_family_says_what_it_means():
    schemas = {"every family": COMMON_TASK_KEYS, **{name: cls.definition_schema for name, cls in built_in_families().items()}}
    silent = [f"{family}: {key}" for family, schema in schemas.items() for key, field in reference_rows(schema)
              if not field.help]
    assert not silent


def reference_default(key):
    """The default the QA section of the reference shows for `key`."""
    qa = REFERENCE.read_text(encoding="utf-8").split("## Family `qa`")[1]
    return re.search(rf"^\| `{key}` \|[^|]*\|[^|]*\| `([^`]*)` \|", qa, re.MULTILINE).group(1)


def test_a_qa_yaml_that_leaves_keys_out_gets_the_documented_defaults(host, tmp_path):
    (tmp_path / "qa.jsonl").write_text(json.dumps(
        {"id": "q1", "title": "Ulm", "context": "Einstein was born in Ulm.", "question": "Where?",
         "answers": {"text": ["Ulm"]}}) + "\n")
    (tmp_path / "bare.yaml").write_text("name: bare\nfamily: qa\ndata: {file: qa.jsonl, format: squad}\n")
    resolved = resolve(RunRequest(task=str(tmp_path / "bare.yaml"), method="incontext"), host)
    (question,) = resolved.task.examples(ScriptedModel(lambda prompt: ""), None)
    assert question.template.style == reference_default("prompt")
    assert question.max_new_tokens == int(reference_default("max_new_tokens"))
    assert question.template.few_shot == ()
    assert (resolved.retriever_class.name, resolved.n_docs) == (COMMON_TASK_KEYS["retriever"].default,
                                                                COMMON_TASK_KEYS["n_docs"].default)


def readme_own_task():
    """README's "A task of your own": its YAML, its data file and its command."""
    text = (ROOT / "README.md").read_text(encoding="utf-8").split("**A task of your own**", 1)[1]
    yaml_text, data, command = re.findall(r"```(?:yaml|json|)\n(.*?)```", text, re.DOTALL)[:3]
    return yaml_text, data, command


def test_the_readmes_own_task_runs_as_written(scripted, tmp_path, monkeypatch):
    yaml_text, data, command = readme_own_task()
    (tmp_path / "mytask.yaml").write_text(yaml_text)
    (tmp_path / "mytask.jsonl").write_text(data)
    monkeypatch.chdir(tmp_path)
    ScriptedBackend.model = ScriptedModel(lambda prompt: " Canberra\n")
    args = shlex.split(command)
    assert args[:2] == ["raghub", "run"]
    out = CliRunner().invoke(cli, [*args[1:], "--model", "scripted", "--json", "--results-dir", "results"])
    assert out.exit_code == 0, out.output
    record = json.loads(out.stdout)
    assert record["n_examples"] == 2 and record["metrics"]["em"] == 0.5 and "recall@1" in record["metrics"]
    first = ScriptedBackend.model.prompts[0]
    assert first.endswith("Answer:") and "George Orwell" in first  # _qa.yaml's completion prompt
