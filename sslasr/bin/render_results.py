"""Regenerate RESULTS.md from the results jsonl written by ``sslasr.bin.score``.

    python -m sslasr.bin.render_results --results exp/results.jsonl --out RESULTS.md

With ``--archive results.jsonl`` (as the recipes run it) the rows of --results not yet in the
archive are appended to it first, and RESULTS.md is rendered from the archive: the recipe's
tracked history of every run, which exp/ (one machine's scratch space) is not.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import sys
from pathlib import Path
from typing import Optional, Sequence

from sslasr.scoring import archive_results, render_results_md


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="exp/results.jsonl", help="results jsonl (input)")
    p.add_argument("--archive", help="tracked results history: gets the new rows of --results, "
                   "and RESULTS.md is rendered from it")
    p.add_argument("--out", default="RESULTS.md", help="markdown file to (over)write")
    p.add_argument("--title", default="Results", help="top-level heading of the page")
    return p


@contextlib.contextmanager
def archive_lock(archive: Optional[str]):
    """Held while the archive is read, merged, replaced and rendered: two recipes' stage 10 at once
    (another --conf-dir's exp root beside the default) each replaced it with its own merge, and one
    run's new rows were lost from it. The lock is a hidden file beside the archive (the archive
    itself is replaced by a rename, so a lock on it would not be the next reader's)."""
    if not archive:
        yield
        return
    path = Path(archive)
    with open(path.parent / f".{path.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    with archive_lock(args.archive):
        return _render(args)


def _render(args) -> int:
    try:
        source = args.results
        if args.archive:
            if Path(args.results).exists():
                added = archive_results(args.results, args.archive)
                print(f"{args.archive}: {added} new row(s) from {args.results}")
            else:  # e.g. a fresh exp/ beside a pulled archive: the archive's rows alone
                print(f"{args.archive}: no {args.results} to add rows from")
            source = args.archive
        render_results_md(source, args.out, title=args.title)
    except (OSError, ValueError) as err:
        raise SystemExit(f"render_results: {err}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
