"""`edge-unisd` command line. Errors a user can meet are printed without a traceback, exit code 2."""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-unisd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="end-to-end UniSD adaptation of the bundled model on sample items")
    demo.add_argument("--home", default=None, help="home directory (default: a temporary one)")
    demo.add_argument("--json", action="store_true", help="print the result as JSON")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo's own)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from daemon.demo import main as demo_main

        return demo_main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
