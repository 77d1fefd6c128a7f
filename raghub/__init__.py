"""raghub: an evaluation harness for retrieval-augmented generation."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("raghub")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
