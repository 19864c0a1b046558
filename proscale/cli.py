"""The `proscale` command. Each sub-command lives beside what it drives and registers itself
through `add_parser(subparsers)`; this file only lists them."""
from __future__ import annotations

import argparse
import importlib
import sys

# (module, what it adds): data flow order, then tools.
COMMANDS = (
    "proscale.quickstart",
    "proscale.tradeoff",
    "proscale.engine.train",
    "proscale.engine.evaluate",
    "proscale.engine.predict",
    "proscale.data.validate",
    "proscale.analysis.flops",
    "proscale.analysis.benchmark",
    "proscale.checkpoints.convert",
    "proscale.export",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proscale", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before any command module imports torch: OpenMP reads its wait policy when it loads.
    from proscale import cpu_policy

    cpu_policy.configure()
    cpu_policy.configure_malloc()
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
