"""Ctrl-C while raghub starts (plugins importing) ends in one line and exit code 130."""

import os
import signal
import subprocess
import time

from plugin_packages import RAGHUB, write_distribution


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path):
    """Regression: an interrupt before the CLI group ran printed a traceback."""
    marker = tmp_path / "importing"
    write_distribution(tmp_path, "sleepy", f"""
        import pathlib, time
        pathlib.Path({str(marker)!r}).touch()
        for _ in range(600):  # short sleeps: Python acts on a signal that another thread took when one ends
            time.sleep(0.1)
    """)
    process = subprocess.Popen([str(RAGHUB), "plugins"], env={**os.environ, "PYTHONPATH": str(tmp_path)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130
    assert stderr.strip() == "raghub: interrupted"
