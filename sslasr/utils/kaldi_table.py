"""Kaldi-style tables: `utt-id rest-of-line` text files (text, wav.scp, utt2spk, hyp.txt)."""

import re
from pathlib import Path
from typing import List, Tuple


def read_table(path: Path) -> List[Tuple[str, str]]:
    """`utt-id rest-of-line` pairs; the rest keeps inner spaces, blank lines are skipped.

    Lines end at "\n" only (a "\r" before it is dropped): str.splitlines() would also end a
    line at U+2028, \x0c, \x1c and others that can sit inside a transcript, making half of it
    an utterance id. Fields are split at spaces and tabs, as Kaldi does. A UTF-8 byte-order
    mark, which some editors write, is not part of the first id."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        lines = data.decode("utf-8-sig").split("\n")
    except UnicodeDecodeError as e:  # the codec's own message names neither the file nor the line
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}: not UTF-8 (line {line}, byte {e.start}: {e.reason}); convert it, "
                         "e.g. iconv -f GB18030 -t UTF-8") from e
    rows = []
    for line in lines:
        parts = re.split(r"[ \t]+", line.strip(" \t\r"), maxsplit=1)
        if parts[0]:
            rows.append((parts[0], parts[1].strip(" \t") if len(parts) > 1 else ""))
    return rows


# Kaldi's extended filenames an audio path cannot be: a command whose output is the audio
# ("sox ... - |") and a byte offset into an archive ("data.ark:1234", with an optional range)
_ARCHIVE_OFFSET = re.compile(r".+\.(?:ark|scp):\d+(?:\[[^\]]*\])?")


def not_a_file_path(entry: str) -> str:
    """Why a wav.scp entry is not a file path ("" when it is one)."""
    if not entry:
        return "no path"
    if entry.endswith("|"):
        return "a command, ending in '|'"
    if _ARCHIVE_OFFSET.fullmatch(entry):
        return "an offset into a Kaldi archive"
    return ""
