"""Run the real CLI entry point in-process and capture exit code, stdout and stderr; the keys every
``compress`` result has (``adaptzip compress --json``, ``CompressResult.to_json()``)."""

from __future__ import annotations

import io
import json
import sys
from contextlib import redirect_stderr, redirect_stdout

# The keys of every compress result, whatever the form (a calibrated run and a quantised one add more).
RESULT_KEYS = frozenset(
    {
        "output",
        "form",
        "config",
        "state",
        "dtype",
        "source_bytes",
        "bytes",
        "ratio",
        "stored_params",
        "source_params",
        "rel_error",
        "worst_module_rel_error",
        "worst_module",
        "svd_baseline_rel_error",
        "seconds",
    }
)


def run_cli(*args: str) -> tuple[int, str, str]:
    import torch

    from adaptzip.cli import main

    out, err = io.StringIO(), io.StringIO()
    old, threads = sys.argv, torch.get_num_threads()
    sys.argv = ["adaptzip", *map(str, args)]
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
        torch.set_num_threads(threads)  # the CLI sets its own (--threads, default: idle cores)
    return code, out.getvalue(), err.getvalue()


def run_json(*args: str) -> dict:
    code, out, err = run_cli(*args, "--json")
    assert code == 0, err
    return json.loads(out)
