"""The plugin host: hooks are called through pluggy (so a hook wrapper wraps them), and each
host, one per CLI invocation, keeps its plugins, failures and registry to itself."""

from types import SimpleNamespace

from click.testing import CliRunner

from plugin_packages import registering
from raghub import Method, hookimpl
from raghub.cli import cli
from raghub.plugin_manager import PluginHost


class Copy(Method):
    name = "copy"
    description = "answers with the best passage's text"


class Timing:
    """A hook wrapper around every plugin's register_methods, noting when it runs."""

    def __init__(self, seen: list[str]) -> None:
        self.seen = seen

    @hookimpl(wrapper=True)
    def register_methods(self, register):
        self.seen.append("wrapper before")
        result = yield
        self.seen.append("wrapper after")
        return result


def test_a_hook_wrapper_wraps_the_implementations(host, add_plugin):
    """Regression: `call_hook` called each implementation itself, so a wrapper was called as one
    (and its plugin skipped for returning a generator)."""
    seen = []
    timing = add_plugin(Timing(seen))
    add_plugin(SimpleNamespace(register_methods=hookimpl(
        lambda register: seen.append("implementation") or register(Copy))))
    assert "copy" in host.registry.methods
    assert seen == ["wrapper before", "implementation", "wrapper after"]
    assert timing not in host.failed and host.plugin(timing) is not None


def test_a_failing_implementation_inside_a_wrapper_is_its_own_plugins_failure(host, add_plugin, capsys):
    seen = []
    timing = add_plugin(Timing(seen))
    broken = add_plugin(registering("register_methods", "not a class"))
    add_plugin(registering("register_methods", Copy))
    assert "copy" in host.registry.methods
    assert list(host.failed) == [broken] and host.plugin(timing) is not None
    assert f"plugin '{broken}' is skipped: its register_methods failed" in capsys.readouterr().err


def test_two_hosts_share_no_plugins_failures_or_registry(capsys):
    one, other = PluginHost(), PluginHost()
    one.load()
    one.register(registering("register_methods", Copy), "copy-plugin")
    one.register(registering("register_methods", "not a class"), "broken")
    assert "copy" in one.registry.methods and "copy" not in other.registry.methods
    assert "broken" in one.failed and not other.failed
    assert one.plugin("copy-plugin") is not None and other.plugin("copy-plugin") is None
    assert one.registry.methods.keys() - {"copy"} == other.registry.methods.keys()


def test_each_cli_invocation_has_a_host_of_its_own():
    given = PluginHost()
    given.load()
    given.register(registering("register_methods", Copy), "copy-plugin")
    assert "copy" in CliRunner().invoke(cli, ["methods"], obj=given, env={"COLUMNS": "200"}).output
    assert "copy" not in CliRunner().invoke(cli, ["methods"], env={"COLUMNS": "200"}).output
