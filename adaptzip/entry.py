"""The ``adaptzip`` console script. Its first act is to answer SIGINT and SIGTERM: one that
arrives while the CLI's modules (torch, transformers, PEFT: seconds) are still importing ends the
process with ``adaptzip: interrupted`` and exit code 130, as one during the command does, instead
of a KeyboardInterrupt traceback or a silent kill. Nothing has been written by then. Once the CLI
is imported, :func:`adaptzip.cli.main` installs the handlers that unwind a running command."""

from __future__ import annotations

import os
import signal


def _interrupted_while_starting(signum, frame) -> None:
    try:
        os.write(2, b"adaptzip: interrupted\n")
    finally:
        os._exit(130)


def main() -> None:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _interrupted_while_starting)
    from .cli import main as cli_main

    cli_main(process_entry=True)
