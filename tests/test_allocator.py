"""The CLI keeps freed memory for reuse under glibc."""

import platform
import subprocess
import sys

import pytest

from raghub import allocator

# in a fresh process (the allocator's state is the process's): how many bytes a 16 MiB tensor
# took from fresh mmapped pages, and how much of the heap its freeing handed back
PROBE = """
import ctypes, sys, torch
from raghub import allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                    "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "kept":
    allocator.keep_freed_memory()
before = libc.mallinfo2()
tensor = torch.ones(2**22)
during = libc.mallinfo2()
del tensor
after = libc.mallinfo2()
print(during.hblkhd - before.hblkhd, during.arena - after.arena)
"""


def probe(mode: str) -> list[int]:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return [int(number) for number in done.stdout.split()]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_freed_memory_is_kept_for_reuse():
    mapped, returned = probe("default")
    assert mapped >= 2**24  # glibc's default: fresh pages for the tensor, handed back on free
    mapped, returned = probe("kept")
    assert mapped == 0 and returned <= 0  # from the heap, which keeps it


def test_every_cli_command_applies_it(monkeypatch):
    from click.testing import CliRunner

    from raghub.cli import cli

    monkeypatch.setattr(allocator, "_in_effect", "default")
    CliRunner().invoke(cli, ["plugins"])
    assert allocator.in_effect() == (allocator.KEPT if platform.libc_ver()[0] == "glibc" else "default")
