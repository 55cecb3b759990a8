"""Where the real data outside the repository is: $SSLASR_SHARED_DATA, else the first
`shared/data` beside the checkout or beside one of its parent folders (a clone made in a
subfolder of the workspace finds the same data)."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    if os.environ.get("SSLASR_SHARED_DATA"):
        return Path(os.environ["SSLASR_SHARED_DATA"])
    for folder in REPO.parents:
        if (folder / "shared" / "data").is_dir():
            return folder / "shared" / "data"
    return REPO.parent / "shared" / "data"  # absent: the tests that need it skip and name it
