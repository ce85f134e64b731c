"""Logging of diffalign's commands: the environment and log levels they start with, and the third-party progress
bars they turn off. Neither helper imports a heavy library until it is called."""

import logging
import os


def setup_logging():
    """Environment and log levels for a command: the libraries' own verbosity down to errors, diffalign's INFO.

    Environment and logging only: importing diffusers or transformers here would cost every `--help` seconds.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("diffalign").setLevel(logging.INFO)


def quiet_libraries():
    """Turns off diffusers' and transformers' own progress bars ("Loading pipeline components"; ours stay). Imports
    both libraries: the commands that load models call it once their arguments are checked."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
