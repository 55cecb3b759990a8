"""Regenerate RESULTS.md from the results jsonl written by ``sslasr.bin.score``.

    python -m sslasr.bin.render_results --results exp/results.jsonl --out RESULTS.md
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from sslasr.scoring import render_results_md


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="exp/results.jsonl", help="results jsonl (input)")
    p.add_argument("--out", default="RESULTS.md", help="markdown file to (over)write")
    p.add_argument("--title", default="Results", help="top-level heading of the page")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        render_results_md(args.results, args.out, title=args.title)
    except (OSError, ValueError) as err:
        raise SystemExit(f"render_results: {err}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
