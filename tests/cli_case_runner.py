"""Runs many command-line cases in one process: each case is `main(argv)` of a CLI script, as
`python SCRIPT ARGS...` would run it (`sys.exit(main())`), with its stdout and stderr captured and an
exception that escapes `main` printed as the interpreter would print it (a traceback).

    python tests/cli_case_runner.py CASES.json     # [[script, [args...]], ...] -> one JSON result per line

Each result: {"code": exit status, "stderr": ...}. One process instead of one per case keeps the CLI error tests fast: the heavy imports
happen once.
"""
from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys
import traceback


def run_case(script: str, args: list[str]) -> dict:
    stdout, stderr = io.StringIO(), io.StringIO()
    sys.argv = [script, *args]  # argparse names the script in its messages
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            main = runpy.run_path(script, run_name="cli_case")["main"]
            code = main(args)
        except SystemExit as stop:  # argparse's usage errors and --help
            code = stop.code
        except BaseException:  # noqa: BLE001 - what the interpreter would print for an uncaught exception
            traceback.print_exc()
            code = 1
        if code is not None and not isinstance(code, int):  # sys.exit("message") prints it and exits 1
            print(code, file=sys.stderr)
            code = 1
    return {"code": code or 0, "stderr": stderr.getvalue()}


def main() -> None:
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    for script, args in cases:
        print(json.dumps(run_case(script, args)), flush=True)


if __name__ == "__main__":
    main()
