"""Kaldi-style corpus folders, the input of stage 1: read and check one, write one, carve
speaker-disjoint splits out of a split.

A corpus folder holds one sub-folder per split with ``wav.scp`` (``utt-id path``, the path
relative to the split folder or absolute), ``text`` (``utt-id WORDS``) in transcribed splits
and ``utt2spk``. A recipe's stage 0 writes such a folder under its ``data/`` whose ``wav.scp``
names the corpus audio by absolute path: the audio itself is never copied.

Checks here are structural (files present, ids consistent, audio paths pointing somewhere).
Per-utterance problems -- an unreadable file, an empty transcript -- are stage 1's to drop
and count (``sslasr.data.manifests``); the exceptions are what the written folder cannot carry:
an id whose ``text`` lines disagree (only one transcript can be written) and a ``text`` line
whose id has no audio. Both are dropped here (logged, and listed to the caller).
"""

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, TypeVar

from sslasr.data.manifests import (
    Dropped, Transcripts, conflicting_text, held_out_speakers, read_table, read_transcripts, unsupported_segments,
)
from sslasr.utils.io import write_text_atomic
from sslasr.utils.kaldi_table import not_a_file_path

log = logging.getLogger(__name__)
T = TypeVar("T")


class LayoutError(ValueError):
    """A corpus folder that stage 0 cannot prepare; the message names the file and problem."""


@dataclass(frozen=True)
class Utterance:
    utt_id: str
    path: str  # absolute
    text: Optional[str] = None
    speaker: Optional[str] = None


def _table(path: Path) -> Dict[str, str]:
    """An id repeated with the same value (folders concatenated with cat) is read once, as stage 1
    reads it; with another value it is an error: which line is right?"""
    rows = read_table(path)
    table: Dict[str, str] = {}
    conflicting = sorted({u for u, value in rows if table.setdefault(u, value) != value})
    if conflicting:
        raise LayoutError(f"{path}: {len(conflicting)} utterance id(s) repeated with different values, "
                          f"e.g. {conflicting[:3]}")
    if len(rows) > len(table):
        log.warning("%s: %d identical repeated line(s), each read once", path, len(rows) - len(table))
    return table


def read_split(split_dir: Path, *, need_text: bool, need_speakers: bool, root: Optional[Path] = None,
               dropped: Optional[List[Dropped]] = None) -> List[Utterance]:
    """The utterances of one split folder, in wav.scp order.

    An utterance whose ``text`` lines give different transcripts is left out, logged, and
    appended to `dropped` (when given) with reason ``conflicting_text``; identical repeated
    lines are read once. A ``text`` id absent from wav.scp is logged and appended to `dropped`
    with reason ``text_without_audio``.

    Audio paths are read relative to `root` (default: the split folder itself). Raises
    LayoutError when a required file is missing, when an utterance lacks the speaker that a
    by-speaker split needs, when not one audio path exists (paths relative to the wrong
    folder) or for a segments file (not supported); a few missing files are only logged,
    stage 1 drops and counts them.
    """
    split_dir = Path(split_dir)
    root = Path(root) if root is not None else split_dir
    if not (split_dir / "wav.scp").is_file():
        raise LayoutError(f"{split_dir}: no wav.scp")
    problem = unsupported_segments(split_dir)
    if problem:  # the folder written would lose the segments: whole recordings as utterances
        raise LayoutError(problem)
    wav = _table(split_dir / "wav.scp")
    if not wav:
        raise LayoutError(f"{split_dir}/wav.scp lists no utterances")
    pipes = [(u, entry, why) for u, entry in wav.items() if (why := not_a_file_path(entry))]
    if pipes:
        utt, entry, why = pipes[0]
        raise LayoutError(f"{split_dir}/wav.scp: {len(pipes)} entries are not file paths, e.g. {utt} {entry!r} "
                          f"({why}): write the audio out as files (e.g. Kaldi's wav-copy)")
    transcripts = _optional(split_dir / "text", need_text, _transcripts)
    text = transcripts.text if transcripts is not None else None
    conflicting = transcripts.conflicting if transcripts is not None else {}
    speakers = _optional(split_dir / "utt2spk", need_speakers, _table)
    nameless = [u for u, speaker in (speakers or {}).items() if not speaker]
    if nameless:  # all of them one speaker "", drawn into one split beside their speakers' other utterances
        raise LayoutError(f"{split_dir}/utt2spk: {len(nameless)} line(s) name no speaker, e.g. {nameless[:3]}")
    if text is not None and not (set(text) | set(conflicting)) & set(wav):
        raise LayoutError(f"{split_dir}: no utterance id of text is in wav.scp")
    if need_speakers:
        unknown = [u for u in wav if u not in speakers]
        if unknown:
            raise LayoutError(f"{split_dir}/utt2spk: {len(unknown)} utterance(s) of wav.scp have no speaker, "
                              f"e.g. {unknown[:3]} (a by-speaker split needs every one)")
    skipped = _drop_conflicting(split_dir, wav, conflicting) + _drop_text_without_audio(split_dir, wav, transcripts)
    if dropped is not None:
        dropped.extend(skipped)
    utterances = [Utterance(u, os.path.abspath(os.path.join(root, entry)), (text or {}).get(u),
                            (speakers or {}).get(u)) for u, entry in wav.items() if u not in conflicting]
    _check_audio_paths(split_dir, root, utterances)
    return utterances


def _transcripts(path: Path) -> Transcripts:
    transcripts = read_transcripts(path)
    if transcripts.repeated_lines:
        log.warning("%s: %d identical repeated line(s), each read once", path, transcripts.repeated_lines)
    return transcripts


def _drop_conflicting(split_dir: Path, wav: Dict[str, str], conflicting: Dict[str, List[str]]) -> List[Dropped]:
    """The wav.scp utterances whose text lines disagree, as drops; logged with their count."""
    skipped = [conflicting_text(u, conflicting[u]) for u in wav if u in conflicting]
    if skipped:
        log.warning("%s/text: dropped %d utterance(s): conflicting_text (different transcripts on several "
                    "lines), e.g. %s", split_dir, len(skipped), [d.utt_id for d in skipped[:3]])
    return skipped


def _drop_text_without_audio(split_dir: Path, wav: Dict[str, str], transcripts: Optional[Transcripts]) -> List[Dropped]:
    """The text ids that wav.scp lacks, as drops (the written folder has no line for them)."""
    ids = [*transcripts.text, *transcripts.conflicting] if transcripts is not None else []
    skipped = [Dropped(u, "text_without_audio", "in text, not in wav.scp") for u in ids if u not in wav]
    if skipped:
        log.warning("%s/text: dropped %d line(s): text_without_audio (id not in wav.scp), e.g. %s", split_dir,
                    len(skipped), [d.utt_id for d in skipped[:3]])
    return skipped


def _optional(path: Path, required: bool, read: Callable[[Path], T]) -> Optional[T]:
    """READ(path), or None for an absent file that is not required."""
    if path.is_file():
        return read(path)
    if required:
        raise LayoutError(f"{path} is missing")
    return None


def _check_audio_paths(split_dir: Path, root: Path, utterances: Sequence[Utterance]) -> None:
    missing = [u for u in utterances if not os.path.isfile(u.path)]
    if len(missing) == len(utterances):
        raise LayoutError(f"{split_dir}/wav.scp: none of its {len(missing)} audio paths exists, e.g. "
                          f"{missing[0].path} (paths are read relative to {root})")
    if missing:
        log.warning("%s: %d of %d audio files are missing (stage 1 drops them), e.g. %s", split_dir,
                    len(missing), len(utterances), missing[0].path)


def write_split(split_dir: Path, utterances: Sequence[Utterance]) -> None:
    """wav.scp (absolute paths), and text / utt2spk when the utterances have them; sorted by
    id as Kaldi expects. An empty split is an error: it would vanish from the corpus silently.
    An utterance without a transcript has no text line (an empty line would read as an empty
    transcript: stage 1 then reports missing_text, not empty_text)."""
    if not utterances:
        raise ValueError(f"{split_dir}: no utterances to write")
    ordered = sorted(utterances, key=lambda u: u.utt_id)
    write_text_atomic(Path(split_dir) / "wav.scp", "".join(f"{u.utt_id} {u.path}\n" for u in ordered))
    if any(u.text is not None for u in ordered):
        write_text_atomic(Path(split_dir) / "text",
                          "".join(f"{u.utt_id} {u.text}\n" for u in ordered if u.text is not None))
    if any(u.speaker is not None for u in ordered):
        write_text_atomic(Path(split_dir) / "utt2spk",
                          "".join(f"{u.utt_id} {u.speaker}\n" for u in ordered if u.speaker is not None))


def carve_by_speaker(utterances: Sequence[Utterance], sizes: Dict[str, int], seed: int,
                     rest_name: str = "train", stay: Iterable[str] = ()) -> Dict[str, List[Utterance]]:
    """Split off `sizes[name]` whole speakers per named split (e.g. {"dev": 10, "test": 20}),
    drawn by `seed` among those not in STAY (speakers of other splits, such as unlabeled audio
    that is trained on); the remaining speakers form `rest_name`. No speaker is in two splits."""
    if any(n < 1 for n in sizes.values()):
        raise ValueError(f"speaker counts must be >= 1, got {sizes}")
    speakers = {u.speaker for u in utterances}
    if None in speakers:
        raise ValueError("every utterance needs a speaker to split by speaker")
    eligible = speakers - set(stay)
    if len(eligible) <= sum(sizes.values()) and eligible != speakers:
        raise ValueError(f"cannot hold out {sum(sizes.values())} speakers: {len(speakers) - len(eligible)} of the "
                         f"{len(speakers)} are in other splits too, {len(eligible)} are not")
    drawn = held_out_speakers(eligible, sum(sizes.values()), seed)
    owner, start = {}, 0
    for name, count in sizes.items():
        owner.update({speaker: name for speaker in drawn[start:start + count]})
        start += count
    splits: Dict[str, List[Utterance]] = {rest_name: [], **{name: [] for name in sizes}}
    for u in utterances:
        splits[owner.get(u.speaker, rest_name)].append(u)
    return splits


def speakers_of(utterances: Sequence[Utterance]) -> List[str]:
    return sorted({u.speaker for u in utterances if u.speaker is not None})
