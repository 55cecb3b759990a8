"""Logging to stderr and a per-run file, rank-aware (other ranks only warn)."""

import logging
from pathlib import Path
from typing import Optional


def setup_logging(log_file: Optional[Path] = None, rank: int = 0) -> None:
    handlers = [logging.StreamHandler()]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        handlers=handlers, force=True)
