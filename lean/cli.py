"""What every lean command shares: one-line errors, exit statuses, Ctrl-C, the --device argument."""

import argparse
import importlib
import os
import sys

from lean.errors import LeanError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported as one line like every other bad input."""

    def error(self, message):
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def add_device_argument(parser):
    """--device, as every command that runs a model takes it: cuda where torch sees a GPU, else cpu."""
    import torch  # here, not at the top: this module loads before torch, so Ctrl-C while torch loads is caught

    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=["cuda", "cpu"], default=default, help=f"default: {default}")


def check_device(parser, device):
    """One line where cuda is asked for and torch sees none: for after the arguments are final."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device cuda: torch sees no CUDA device; use --device cpu")


def run_module(name, argv=None):
    """Import the command module `name` and run its main; Ctrl-C while torch and the rest load is caught too."""
    try:
        module = importlib.import_module(name)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        # Nothing is written yet. Seen: a normal exit from here at times ended by SIGINT (-2), not this status.
        os._exit(EXIT_INTERRUPTED)
    run(module.main, argv)


def run(main, argv=None):
    """Run `main(argv)`; LeanError and Ctrl-C become one line on stderr and a non-zero exit."""
    try:
        status = main(argv)
    except LeanError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(status or 0)
