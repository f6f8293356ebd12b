"""The ``implicit-nash`` command."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, non-zero exit, no traceback
        self.exit(2, f"implicit-nash: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="implicit-nash", description="Differentiable Nash equilibria and Nash-GBML.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="solve a small non-symmetric game and check its hypergradient")
    demo.add_argument("--players", type=int, default=5)
    demo.add_argument("--dim", type=int, default=3)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        if args.players < 1 or args.dim < 1:
            print("implicit-nash: error: --players and --dim must be positive", file=sys.stderr)
            return 2
        from .demo import main as demo_main
        return demo_main(args.players, args.dim)
    return 2  # pragma: no cover (argparse enforces a command)


if __name__ == "__main__":
    raise SystemExit(main())
