"""What every bad-input test checks: one line, exit code 2, nothing written, and (where the
input can be judged before it) no model loaded."""

import pytest

from raghub.models import ModelBackend


def assert_one_line_exit_2(result, message, results_dir):
    """Bad input: exit code 2, one line holding `message`, and nothing written."""
    assert result.exit_code == 2, result.output
    assert len(result.output.splitlines()) == 1 and message in result.output, result.output
    assert not results_dir.exists()


def replace_model_loading(monkeypatch, load, found):
    """Makes every model backend's `load` call `load` instead (each backend overrides it)."""
    for backend in {ModelBackend, *found.models.values()}:
        monkeypatch.setattr(backend, "load", load)


@pytest.fixture
def model_never_loads(monkeypatch, host):
    """Fails the test if any model backend of the test's host loads."""
    replace_model_loading(monkeypatch, lambda *a, **k: pytest.fail("model loaded"), host.registry)
