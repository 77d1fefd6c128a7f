"""The folders' import rules, read from the sources with `ast`: plugins import only the core
(never another plugin, never the plugin manager), and the core never imports a plugin.

The installed package maps the folder plugins/ to `raghub.plugins`, so plugins/methods/x.py is
the module `raghub.plugins.methods.x`.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
#: what the installed `raghub` package holds besides the core (raghub/*.py, raghub/families)
NOT_CORE = ("raghub.plugins", "raghub.tasks")


def module_name(path: Path, root: Path, package: str) -> str:
    """The dotted name of the module at `path`, `root` being the folder of `package`."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def imported_names(path: Path, module: str) -> set[str]:
    """Every module `path` imports, anywhere in it, relative imports resolved; `from X import
    y` counts as X and X.y (y may be a submodule)."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def plugin_imports(root: Path) -> dict[str, set[str]]:
    """For every module under `root` (a plugins/ folder): the raghub modules it imports."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root, "raghub.plugins")
        found[module] = {name for name in imported_names(path, module) if is_raghub(name)}
    return found


def is_raghub(name: str) -> bool:
    return name == "raghub" or name.startswith("raghub.")


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def unit(module: str) -> str | None:
    """The plugin a module belongs to, e.g. raghub.plugins.methods.parametric for
    raghub.plugins.methods.parametric.training; None for the kind packages themselves."""
    parts = module.split(".")
    return ".".join(parts[:4]) if len(parts) >= 4 else None


def kind(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) >= 3 else None


def is_core(name: str) -> bool:
    """Whether `name` (a module, or a name imported from one) is raghub's core."""
    return is_raghub(name) and not any(within(name, package) for package in NOT_CORE)


RULES = ("methods and tasks import each other", "a task family imports another",
         "a plugin imports the plugin manager", "a plugin imports a non-core module")


def violations(root: Path) -> dict[str, list[str]]:
    """The imports under `root` that break a rule, by rule."""
    broken = {rule: [] for rule in RULES}
    for module, names in plugin_imports(root).items():
        for name in sorted(names):
            where = f"{module} imports {name}"
            if (kind(module) == "methods" and within(name, "raghub.plugins.tasks")) or (
                    kind(module) == "tasks" and within(name, "raghub.plugins.methods")):
                broken["methods and tasks import each other"].append(where)
            if kind(module) == "tasks" and within(name, "raghub.plugins.tasks") \
                    and unit(module) and unit(name) and unit(name) != unit(module):
                broken["a task family imports another"].append(where)
            if within(name, "raghub.plugin_manager"):
                broken["a plugin imports the plugin manager"].append(where)
            if kind(module) in ("methods", "retrievers", "rerankers", "refiners", "models", "training") and unit(module) \
                    and not is_core(name) and not within(name, unit(module)):
                broken["a plugin imports a non-core module"].append(where)
    return broken


@pytest.fixture(scope="module")
def plugin_violations():
    return violations(ROOT / "plugins")


def test_the_plugins_are_all_read():
    modules = plugin_imports(ROOT / "plugins")
    assert {"raghub.plugins.methods.ensemble", "raghub.plugins.tasks.question_answering.task",
            "raghub.plugins.retrievers.bm25", "raghub.plugins.models.huggingface"} <= modules.keys()
    assert "raghub.plugins.tasks.question_answering.formats" in \
        modules["raghub.plugins.tasks.question_answering.task"]  # a relative import, resolved


@pytest.mark.parametrize("rule", RULES)
def test_plugins_keep_the_import_rule(plugin_violations, rule):
    assert not plugin_violations[rule], "\n".join(plugin_violations[rule])


def core_imports_of_plugins(core_root: Path) -> list[str]:
    """Imports of `raghub.plugins` in the core at `core_root` (raghub/*.py, raghub/families)."""
    core = [*core_root.glob("*.py"), *(core_root / "families").glob("*.py")]
    return [f"{module} imports {name}" for path in sorted(core)
            for module in [module_name(path, core_root, "raghub")]
            for name in sorted(imported_names(path, module)) if within(name, "raghub.plugins")]


def test_the_core_never_imports_a_plugin():
    assert len(list((ROOT / "raghub").glob("*.py"))) > 10
    offending = core_imports_of_plugins(ROOT / "raghub")
    assert not offending, "\n".join(offending)


def test_a_core_import_of_a_plugin_is_caught(tmp_path):
    (tmp_path / "families").mkdir()
    (tmp_path / "runner.py").write_text("def f():\n    from .plugins.methods import none\n")
    (tmp_path / "families" / "qa.py").write_text("from raghub import Passage\nimport raghub.plugins\n")
    assert core_imports_of_plugins(tmp_path) == [
        "raghub.families.qa imports raghub.plugins",
        "raghub.runner imports raghub.plugins.methods", "raghub.runner imports raghub.plugins.methods.none"]


def test_each_rule_catches_a_violation(tmp_path):
    """A plugins/ tree that breaks every rule once, with absolute and relative imports."""
    files = {
        "methods/greedy.py": "from raghub.plugins.tasks.question_answering import formats\n",
        "methods/mixer/__init__.py": "from ..greedy import Greedy\nfrom . import parts\n",
        "methods/mixer/parts.py": "import raghub.plugin_manager\n",
        "tasks/lm/__init__.py": "from ..qa.task import QATask\n",
        "tasks/qa/task.py": "from raghub import Task\nfrom .formats import read\n",
        "retrievers/fuzzy.py": "def f():\n    from raghub.tasks import wikitext2\n",
    }
    for name, source in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(source)
    assert violations(tmp_path) == {
        "methods and tasks import each other": [
            "raghub.plugins.methods.greedy imports raghub.plugins.tasks.question_answering",
            "raghub.plugins.methods.greedy imports raghub.plugins.tasks.question_answering.formats"],
        "a task family imports another": [
            "raghub.plugins.tasks.lm imports raghub.plugins.tasks.qa.task",
            "raghub.plugins.tasks.lm imports raghub.plugins.tasks.qa.task.QATask"],
        "a plugin imports the plugin manager": [
            "raghub.plugins.methods.mixer.parts imports raghub.plugin_manager"],
        "a plugin imports a non-core module": [
            "raghub.plugins.methods.greedy imports raghub.plugins.tasks.question_answering",
            "raghub.plugins.methods.greedy imports raghub.plugins.tasks.question_answering.formats",
            "raghub.plugins.methods.mixer imports raghub.plugins.methods.greedy",
            "raghub.plugins.methods.mixer imports raghub.plugins.methods.greedy.Greedy",
            "raghub.plugins.retrievers.fuzzy imports raghub.tasks",
            "raghub.plugins.retrievers.fuzzy imports raghub.tasks.wikitext2"],
    }
