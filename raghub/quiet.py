"""Third-party noise kept off a person's terminal: the progress bars of transformers and the
hub (`Loading weights`), transformers' advisory logging, and libraries' deprecation warnings,
whose fix is the library's (peft asks a model `is_gradient_checkpointing`). `--verbose` shows
them all."""

from __future__ import annotations

import os
import sys
import warnings

#: environment settings read when transformers and huggingface_hub are imported
QUIET_ENVIRONMENT = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                     "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def quiet_third_party(verbose: bool) -> None:
    """Silence the libraries' bars, advisory logging and deprecation warnings (unless `verbose`),
    before they are imported, or at once when they already are. A setting the user exported
    stays."""
    if verbose:
        return
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
