"""python -m lean.cache: the command line of lean.cache.command, imported only once Ctrl-C is caught."""

from lean.cli import run_module

if __name__ == "__main__":
    run_module("lean.cache.command")
