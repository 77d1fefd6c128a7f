"""Shared test settings: the datasets folder beside the checkout unless one is named."""

import os
from pathlib import Path

os.environ.setdefault("RAGHUB_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
