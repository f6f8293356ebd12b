"""``python -m analysis <check>|all [--quick] [--out DIR]``."""
import argparse
import sys

from . import CHECKS
from .report import main

parser = argparse.ArgumentParser(prog="python -m analysis", description="Numerical checks of the Nash-GBML theory")
parser.add_argument("check", choices=[*CHECKS, "all"])
parser.add_argument("--quick", action="store_true", help="smaller grids (the test suite runs this)")
parser.add_argument("--out", help="output directory (default runs/analysis or runs/analysis_quick)")
args = parser.parse_args()
sys.exit(main(args.check, args.out, args.quick, command="python -m analysis " + " ".join(sys.argv[1:])))
