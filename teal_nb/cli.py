"""`teal-nb <command>` (also `python -m teal_nb`).

Each command lives in `teal_nb/commands/<name>.py` with `HELP`, `add_arguments(parser)` and
`run(args)`; it is imported only when called, so `teal-nb bench-gemv` on a GPU machine never
imports lm-eval and `teal-nb ppl` never imports Triton.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "calibrate": "calibrate",
    "fit": "fit",
    "ppl": "ppl",
    "allocate": "allocate",
    "lm-eval": "lm_eval",
    "generate": "generate",
    "bench-gemv": "bench_gemv",
    "bench-decode": "bench_decode",
}


def _available():
    for name, module in COMMANDS.items():
        try:
            yield name, importlib.import_module(f"teal_nb.commands.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"teal_nb.commands.{module}":
                raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="teal-nb", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, module in _available():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    try:
        return args._run(args) or 0
    except (ValueError, FileNotFoundError, KeyError, OSError) as e:
        # Bad input: one clear line, no traceback.
        print(f"teal-nb {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
