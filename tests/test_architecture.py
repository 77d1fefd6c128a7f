"""The folders' import rules, read from the sources with `ast`: plugins import only the public
API (`from raghub import ...`, the names of `raghub.__all__`) and the kits (`raghub.kits`, the
machinery particular plugins share), never another plugin; the core never imports a plugin or a
kit, and its import graph has no cycle.

The installed package maps the folder plugins/ to `raghub.plugins`, so plugins/methods/x.py is
the module `raghub.plugins.methods.x`.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def module_name(path: Path, root: Path, package: str) -> str:
    """The dotted name of the module at `path`, `root` being the folder of `package`."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def imported_names(path: Path, module: str) -> set[str]:
    """Every module `path` imports, anywhere in it, relative imports resolved; `from X import
    y` counts as X and X.y (y may be a submodule)."""
    return {name for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            for name, _ in import_targets(node, module, path.name == "__init__.py")}


def import_targets(node: ast.AST, module: str, is_package: bool) -> list[tuple[str, str | None]]:
    """What an import statement in `module` imports, relative imports resolved, as (name, the
    module it is imported from): `import X` gives (X, None); `from X import y` gives (X, None)
    and (X.y, X), X.y being a submodule or a name defined in X."""
    if isinstance(node, ast.Import):
        return [(alias.name, None) for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
        base = ".".join(anchor + ([node.module] if node.module else []))
    else:
        base = node.module
    return [(base, None), *((f"{base}.{alias.name}", base) for alias in node.names)]


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


RULES = ("methods and tasks import each other", "a task family imports another",
         "a plugin imports the plugin manager", "a plugin imports beyond the public API and the kits")


def public_api(init: Path = ROOT / "raghub" / "__init__.py") -> set[str]:
    """The names `raghub` exports (its `__all__`), read from the source."""
    assignment = next(node for node in ast.parse(init.read_text(encoding="utf-8")).body
                      if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "__all__")
    return set(ast.literal_eval(assignment.value))


def may_import(module: str, name: str, public: set[str]) -> bool:
    """Whether a plugin's `module` may import `name`: `raghub` and its public names, a kit, the
    plugin's own modules."""
    own = unit(module)
    return (name == "raghub" or name.removeprefix("raghub.") in public or within(name, "raghub.kits")
            or bool(own and within(name, own)))


def violations(root: Path, public: set[str]) -> dict[str, list[str]]:
    """The imports under `root` that break a rule, by rule; `public`: the public API's names."""
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
            if not may_import(module, name, public):
                broken["a plugin imports beyond the public API and the kits"].append(where)
    return broken


@pytest.fixture(scope="module")
def plugin_violations():
    return violations(ROOT / "plugins", public_api())


def test_the_plugins_are_all_read():
    modules = plugin_imports(ROOT / "plugins")
    assert {"raghub.plugins.methods.ensemble", "raghub.plugins.tasks.question_answering.task",
            "raghub.plugins.retrievers.bm25", "raghub.plugins.models.huggingface"} <= modules.keys()
    assert "raghub.plugins.tasks.question_answering.formats" in \
        modules["raghub.plugins.tasks.question_answering.task"]  # a relative import, resolved


@pytest.mark.parametrize("rule", RULES)
def test_plugins_keep_the_import_rule(plugin_violations, rule):
    assert not plugin_violations[rule], "\n".join(plugin_violations[rule])


def imports_of(root: Path, package: str, target: str, subfolders: tuple[str, ...] = ("families",)) -> list[str]:
    """Imports of `target` in the modules of `package` at `root` (its *.py and its `subfolders`'
    *.py; by default the core's: raghub/*.py, raghub/families)."""
    paths = [*root.glob("*.py"), *(path for folder in subfolders for path in (root / folder).glob("*.py"))]
    return [f"{module} imports {name}" for path in sorted(paths)
            for module in [module_name(path, root, package)]
            for name in sorted(imported_names(path, module)) if within(name, target)]


def test_the_core_never_imports_a_plugin():
    assert len(list((ROOT / "raghub").glob("*.py"))) > 10
    offending = imports_of(ROOT / "raghub", "raghub", "raghub.plugins")
    assert not offending, "\n".join(offending)


def test_the_core_never_imports_a_kit():
    assert len(list((ROOT / "raghub" / "kits").glob("*.py"))) > 3
    offending = imports_of(ROOT / "raghub", "raghub", "raghub.kits")
    assert not offending, "\n".join(offending)


def test_a_kit_never_imports_a_plugin():
    offending = imports_of(ROOT / "raghub" / "kits", "raghub.kits", "raghub.plugins", subfolders=())
    assert not offending, "\n".join(offending)


def test_a_core_import_of_a_plugin_or_a_kit_is_caught(tmp_path):
    (tmp_path / "families").mkdir()
    (tmp_path / "runner.py").write_text("def f():\n    from .plugins.methods import none\n")
    (tmp_path / "families" / "qa.py").write_text("from raghub import Passage\nimport raghub.plugins\n")
    (tmp_path / "models.py").write_text("from .kits.pretrained import PretrainedLM\n")
    assert imports_of(tmp_path, "raghub", "raghub.plugins") == [
        "raghub.families.qa imports raghub.plugins",
        "raghub.runner imports raghub.plugins.methods", "raghub.runner imports raghub.plugins.methods.none"]
    assert imports_of(tmp_path, "raghub", "raghub.kits") == [
        "raghub.models imports raghub.kits.pretrained", "raghub.models imports raghub.kits.pretrained.PretrainedLM"]
    (tmp_path / "kits").mkdir()
    (tmp_path / "kits" / "pretrained.py").write_text("from ..plugins.models import huggingface\n")
    assert imports_of(tmp_path / "kits", "raghub.kits", "raghub.plugins", subfolders=()) == [
        "raghub.kits.pretrained imports raghub.plugins.models", "raghub.kits.pretrained imports raghub.plugins.models.huggingface"]


def executed_on_import(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements of `body` that run when the module is imported: those inside functions and
    classes (they run later) and under `if TYPE_CHECKING:` (never) are left out."""
    found = []
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        found.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            found += executed_on_import(node.orelse)
            continue
        for block in ("body", "orelse", "finalbody", "handlers"):
            for child in getattr(node, block, []):
                found += executed_on_import(child.body if isinstance(child, ast.excepthandler) else [child])
    return found


def core_import_graph(core_root: Path) -> dict[str, set[str]]:
    """Each core module (raghub/*.py, raghub/families) -> the core modules it imports when it is
    imported. `from raghub import x` is an edge to raghub.x when x is a module, else to raghub
    (the public API); a package a module sits in is not an edge."""
    paths = [*core_root.glob("*.py"), *(core_root / "families").glob("*.py")]
    modules = {module_name(path, core_root, "raghub"): path for path in paths}
    graph = {}
    for module, path in modules.items():
        edges = set()
        for node in executed_on_import(ast.parse(path.read_text(encoding="utf-8")).body):
            targets = import_targets(node, module, path.name == "__init__.py")
            imported = [(name, source) for name, source in targets if source]
            edges |= {name if name in modules else source for name, source in imported} if imported \
                else {name for name, _ in targets}
        graph[module] = {name for name in edges if name in modules and name != module}
    return graph


def a_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of `graph` as [a, b, ..., a]; [] when it has none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str]:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return []
        path.append(node)
        for following in sorted(graph.get(node, ())):
            if found := visit(following):
                return found
        path.pop()
        done.add(node)
        return []

    return next((found for node in sorted(graph) if (found := visit(node))), [])


def test_the_core_import_graph_has_no_cycle():
    graph = core_import_graph(ROOT / "raghub")
    assert {"raghub.interfaces", "raghub.models", "raghub.plugin_manager"} <= graph["raghub.resolution"]
    assert not a_cycle(graph), " -> ".join(a_cycle(graph))


def test_a_core_import_cycle_is_caught(tmp_path):
    (tmp_path / "families").mkdir()
    sources = {
        "__init__.py": "from raghub.errors import UsageError\nfrom raghub.families.qa import Question\n",
        "errors.py": "",
        "hookspecs.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from raghub import plugin_manager\n"
                        "def f():\n    from raghub.families import qa\n",
        "interfaces.py": "from raghub import errors\n",
        "families/qa.py": "from ..interfaces import Passage\ntry:\n    from raghub.plugin_manager import pm\n"
                          "except ImportError:\n    pass\n",
        "plugin_manager.py": "from raghub import hookspecs\nimport raghub.interfaces\n",
    }
    for name, source in sources.items():
        (tmp_path / name).write_text(source)
    graph = core_import_graph(tmp_path)
    assert graph == {"raghub": {"raghub.errors", "raghub.families.qa"}, "raghub.errors": set(),
                     "raghub.hookspecs": set(), "raghub.interfaces": {"raghub.errors"},
                     "raghub.families.qa": {"raghub.interfaces", "raghub.plugin_manager"},
                     "raghub.plugin_manager": {"raghub.hookspecs", "raghub.interfaces"}}
    assert a_cycle(graph) == []
    (tmp_path / "interfaces.py").write_text("from raghub import errors, UsageError\n")  # UsageError: from raghub/__init__
    assert a_cycle(core_import_graph(tmp_path)) == [
        "raghub", "raghub.families.qa", "raghub.interfaces", "raghub"]


def test_the_public_api_is_read():
    assert {"Method", "hookimpl", "UsageError", "Cache"} <= public_api() and "load_model" not in public_api()


def test_each_rule_catches_a_violation(tmp_path):
    """A plugins/ tree that breaks every rule once, with absolute and relative imports."""
    files = {
        "methods/greedy.py": "from raghub.plugins.tasks.question_answering import formats\n",
        "methods/mixer/__init__.py": "from ..greedy import Greedy\nfrom . import parts\n",
        "methods/mixer/parts.py": "import raghub.plugin_manager\n",
        "tasks/lm/__init__.py": "from ..qa.task import QATask\n",
        "tasks/qa/task.py": "from raghub import Task\nfrom .formats import read\n",
        "retrievers/fuzzy.py": "def f():\n    from raghub.tasks import wikitext2\n",
        "retrievers/dense.py": "from raghub.kits.vector_index import EmbeddingRetriever\nfrom raghub import Cache, runner\n"
                              "from raghub.cache import fingerprint\n",
    }
    for name, source in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(source)
    assert violations(tmp_path, {"Task", "Cache", "fingerprint"}) == {
        "methods and tasks import each other": [
            "raghub.plugins.methods.greedy imports raghub.plugins.tasks.question_answering",
            "raghub.plugins.methods.greedy imports raghub.plugins.tasks.question_answering.formats"],
        "a task family imports another": [
            "raghub.plugins.tasks.lm imports raghub.plugins.tasks.qa.task",
            "raghub.plugins.tasks.lm imports raghub.plugins.tasks.qa.task.QATask"],
        "a plugin imports the plugin manager": [
            "raghub.plugins.methods.mixer.parts imports raghub.plugin_manager"],
        "a plugin imports beyond the public API and the kits": [
            "raghub.plugins.methods.greedy imports raghub.plugins.tasks.question_answering",
            "raghub.plugins.methods.greedy imports raghub.plugins.tasks.question_answering.formats",
            "raghub.plugins.methods.mixer imports raghub.plugins.methods.greedy",
            "raghub.plugins.methods.mixer imports raghub.plugins.methods.greedy.Greedy",
            "raghub.plugins.methods.mixer.parts imports raghub.plugin_manager",
            "raghub.plugins.retrievers.dense imports raghub.cache",
            "raghub.plugins.retrievers.dense imports raghub.cache.fingerprint",
            "raghub.plugins.retrievers.dense imports raghub.runner",
            "raghub.plugins.retrievers.fuzzy imports raghub.tasks",
            "raghub.plugins.retrievers.fuzzy imports raghub.tasks.wikitext2",
            "raghub.plugins.tasks.lm imports raghub.plugins.tasks.qa.task",
            "raghub.plugins.tasks.lm imports raghub.plugins.tasks.qa.task.QATask"],
    }
