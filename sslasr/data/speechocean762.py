"""speechocean762 (Zhang et al., Interspeech 2021; OpenSLR 101, CC BY 4.0): non-native English
read speech, 250 Mandarin-L1 speakers, 16 kHz, upper-case word transcripts.

Two input layouts are read:
  * a Kaldi-style folder: ``train/`` (``wav.scp`` with paths relative to ``train/``, ``text``,
    ``utt2spk``), optional ``unlabeled/`` (``wav.scp``; ``utt2spk`` and ``text.reference``, the
    pool's true transcripts for stage 9's pseudo-label WER, where known) and optional ``test/``;
  * the OpenSLR release (``speechocean762.tar.gz``, ~520 MB): ``train/`` and ``test/`` (125
    speakers each, 2,500 utterances each) whose ``wav.scp`` paths (``WAVE/SPEAKER0001/*.WAV``)
    are relative to the release root, next to ``WAVE/`` and ``resource/``.

`prepare` writes the recipe's Kaldi folder: dev -- and, when the corpus has no ``test/``, test --
carved out of train by speaker (seeded), so no held-out speaker is in training.

    python -m sslasr.data.speechocean762 download --dir downloads      # prints the release root
    python -m sslasr.data.speechocean762 prepare --corpus-dir DIR --out-dir data/kaldi \
        --dev-speakers 10 --test-speakers 20 --seed 0 [--max-utts N]
"""

import argparse
import json
import logging
import re
import shutil
import tarfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from lhotse.utils import resumable_download, safe_extract

from sslasr.data.kaldi_dir import LayoutError, Utterance, carve_by_speaker, read_split, speakers_of, write_split
from sslasr.data.manifests import Dropped
from sslasr.utils.io import write_text_atomic
from sslasr.utils.kaldi_table import read_table

log = logging.getLogger(__name__)

ARCHIVE = "speechocean762.tar.gz"
MIRRORS = (  # OpenSLR 101 and its mirrors (https://www.openslr.org/101/)
    "https://www.openslr.org/resources/101",
    "https://us.openslr.org/resources/101",
    "https://openslr.elda.org/resources/101",
    "https://openslr.magicdatatech.com/resources/101",
)
SPLITS = ("train", "dev", "test", "unlabeled")
# the corpus's utterance ids hold their speaker: 0 SSSS NNNN (000010011: speaker 0001)
SPEAKER_IN_ID = re.compile(r"\d(\d{4})\d{4}")


def download(target_dir: Path) -> Path:
    """Fetch and unpack the OpenSLR release into target_dir; returns the release root."""
    target_dir = Path(target_dir)
    root = target_dir / "speechocean762"
    if (root / ".completed").is_file():
        log.info("%s already downloaded", root)
        return root
    target_dir.mkdir(parents=True, exist_ok=True)  # the download opens its file there, makes no folder
    archive = target_dir / ARCHIVE
    errors = []
    for mirror in MIRRORS:
        try:
            resumable_download(f"{mirror}/{ARCHIVE}", filename=archive)
            break
        except Exception as e:  # network errors come in many types; try the next mirror
            errors.append(f"{mirror}: {type(e).__name__}: {e}")
            log.warning("download from %s failed: %s", mirror, e)
    else:
        raise RuntimeError("could not download speechocean762 from any mirror:\n" + "\n".join(errors))
    try:
        with tarfile.open(archive) as tar:
            safe_extract(tar, path=target_dir)
    except (tarfile.TarError, EOFError, OSError) as e:  # a cut-short or corrupt download
        raise LayoutError(f"{archive} does not unpack ({type(e).__name__}: {e}): remove it and run stage 0 "
                          "again to download it afresh") from e
    if not (root / "train" / "wav.scp").is_file():
        raise LayoutError(f"{archive} did not unpack to {root}/train/wav.scp")
    (root / ".completed").touch()
    return root


def is_release_layout(corpus_dir: Path) -> bool:
    """The OpenSLR release keeps its audio in WAVE/ with wav.scp paths relative to the root."""
    return (Path(corpus_dir) / "WAVE").is_dir()


def read_corpus(corpus_dir: Path) -> Tuple[Dict[str, List[Utterance]], Dict[str, List[Dropped]]]:
    """train (transcribed, with speakers), and unlabeled / test where the corpus has them; and
    per split the utterances left out (conflicting transcripts)."""
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise LayoutError(f"--corpus-dir {corpus_dir} is not a folder")
    root = corpus_dir if is_release_layout(corpus_dir) else None  # None: relative to each split folder
    if root is not None:
        log.info("%s: the OpenSLR release layout (wav.scp paths relative to the corpus root)", corpus_dir)
    _warn_ignored_splits(corpus_dir)
    dropped: Dict[str, List[Dropped]] = {name: [] for name in ("train", "unlabeled", "test")}
    splits = {"train": read_split(corpus_dir / "train", need_text=True, need_speakers=True,
                                  root=root or corpus_dir / "train", dropped=dropped["train"])}
    for name, need_text in (("unlabeled", False), ("test", True)):
        split_dir = corpus_dir / name
        if split_dir.is_dir():
            splits[name] = _with_speakers(name, read_split(split_dir, need_text=need_text, need_speakers=False,
                                                           root=root or split_dir, dropped=dropped[name]),
                                          splits["train"])
    _unlabeled_without_test(splits, dropped["unlabeled"])
    return splits, dropped


def _speaker_in_id(utt_id: str) -> Optional[str]:
    match = SPEAKER_IN_ID.fullmatch(utt_id)
    return match.group(1) if match else None


def _with_speakers(name: str, utts: List[Utterance], train: List[Utterance]) -> List[Utterance]:
    """NAME's utterances, those without a utt2spk line given the speaker their id holds, where
    train/utt2spk shows the corpus's id convention (the shared unlabeled/ has no utt2spk).
    Without speakers, a held-out speaker's unlabeled audio cannot be kept out of pretraining:
    said, not silently taken."""
    convention = all(_speaker_in_id(u.utt_id) == u.speaker for u in train)
    if convention:
        utts = _speakers_as_their_ids_say(name, utts)
    unnamed = [u for u in utts if u.speaker is None]
    if not unnamed:
        return utts
    if convention and all(_speaker_in_id(u.utt_id) for u in unnamed):
        log.info("%s/: the speakers of %d utterance(s) without a utt2spk line read from their ids "
                 "(speechocean762's convention, as train/utt2spk has it)", name, len(unnamed))
        return [u if u.speaker is not None else replace(u, speaker=_speaker_in_id(u.utt_id)) for u in utts]
    log.warning("%s/: %d utterance(s) have no speaker (no utt2spk line, ids not speechocean762's): whether "
                "they are of the speakers held out as dev/test cannot be checked", name, len(unnamed))
    return utts


def _speakers_as_their_ids_say(name: str, utts: List[Utterance]) -> List[Utterance]:
    """Where train/ follows the id convention, a utt2spk line naming another speaker than the id
    (say SPEAKER0005, the release's folder name, for 0005) would hide a held-out speaker's audio
    from the overlap checks: the id's speaker is taken, and said."""
    renamed = [(u, _speaker_in_id(u.utt_id)) for u in utts
               if u.speaker is not None and _speaker_in_id(u.utt_id) not in (None, u.speaker)]
    if not renamed:
        return utts
    first, speaker = renamed[0]
    log.warning("%s/: utt2spk names another speaker than the utterance id for %d utterance(s), e.g. %s: %s, "
                "its id says %s; the ids' speakers are taken (train/utt2spk follows the ids)",
                name, len(renamed), first.utt_id, first.speaker, speaker)
    by_id = {u.utt_id: speaker for u, speaker in renamed}
    return [replace(u, speaker=by_id[u.utt_id]) if u.utt_id in by_id else u for u in utts]


def _unlabeled_without_test(splits: Dict[str, List[Utterance]], dropped: List[Dropped]) -> None:
    """Unlabeled audio is pretrained on and pseudo-labelled: a test utterance, or another recording of a
    test speaker, there would put the scored speakers in training. Left out, counted and said."""
    if "test" not in splits or "unlabeled" not in splits:
        return
    test_ids = {u.utt_id for u in splits["test"]}
    test_speakers = {u.speaker for u in splits["test"] if u.speaker is not None}
    kept = []
    for u in splits["unlabeled"]:
        if u.utt_id in test_ids:
            dropped.append(Dropped(u.utt_id, "test_utterance", "its id is in test/"))
        elif u.speaker in test_speakers:
            dropped.append(Dropped(u.utt_id, "test_speaker", f"speaker {u.speaker} is in test/"))
        else:
            kept.append(u)
    if len(kept) < len(splits["unlabeled"]):
        log.warning("unlabeled/: left out %d utterance(s) of test/'s utterances or speakers (listed in "
                    "splits.json): held-out audio is not pretrained on%s", len(splits["unlabeled"]) - len(kept),
                    "" if kept else "; none is left: no unlabeled split")
    if kept:
        splits["unlabeled"] = kept
    else:
        del splits["unlabeled"]


def _write_unlabeled_reference(corpus_dir: Path, out_dir: Path, utts: List[Utterance]) -> None:
    """unlabeled/text.reference (true transcripts of the pool, where known) for the utterances kept:
    stage 9 measures the pseudo-labels' WER with it."""
    reference = Path(corpus_dir) / "unlabeled" / "text.reference"
    if not reference.is_file():
        return
    kept = {u.utt_id for u in utts}
    rows = sorted((utt, text) for utt, text in read_table(reference) if utt in kept)
    write_text_atomic(out_dir / "unlabeled" / "text.reference", "".join(f"{u} {t}\n" for u, t in rows))
    log.info("unlabeled/text.reference: %d of the %d utterances kept have a reference transcript", len(rows), len(kept))


def _warn_ignored_splits(corpus_dir: Path) -> None:
    """Split folders other than train/, unlabeled/ and test/ are not read: dev is carved out of
    train by speaker. Said, so that a corpus's own dev/ is not taken for the recipe's."""
    ignored = sorted(d.name for d in corpus_dir.iterdir()
                     if d.is_dir() and (d / "wav.scp").is_file() and d.name not in ("train", "unlabeled", "test"))
    if ignored:
        log.warning("%s: ignoring the split folder(s) %s: only train/, unlabeled/ and test/ are read "
                    "(dev is carved out of train by speaker)", corpus_dir, ", ".join(f"{n}/" for n in ignored))


def _speakers_elsewhere(splits: Dict[str, List]) -> set:
    """Train's speakers that test/ or unlabeled/ also name (their utt2spk, where given): none may
    be held out in dev (unlabeled audio is trained on), and test/ sharing any with train/ is an
    error (its utterances would be scored on speakers the model trained on)."""
    train = {u.speaker for u in splits["train"]}
    named = {name: {u.speaker for u in splits.get(name, ()) if u.speaker is not None} & train
             for name in ("test", "unlabeled")}
    if named["test"]:
        raise LayoutError(f"test/ and train/ share {len(named['test'])} speaker(s), e.g. "
                          f"{', '.join(sorted(named['test'])[:5])}: a test set must hold other speakers")
    return named["unlabeled"]


def prepare(corpus_dir: Path, out_dir: Path, *, dev_speakers: int = 10, test_speakers: int = 20, seed: int = 0,
            max_utts: Optional[int] = None) -> Dict[str, Dict]:
    """Write out_dir/{train,dev,test[,unlabeled]}; returns per split its utterance and speaker
    counts (also written to out_dir/splits.json, with the utterances dropped per input split).
    `max_utts` keeps the first N utterances of each input split (quick runs) before the speakers
    are drawn."""
    splits, dropped = read_corpus(corpus_dir)
    if max_utts is not None:
        splits = {name: utts[:max_utts] for name, utts in splits.items()}
    sizes = {"dev": dev_speakers}
    if "test" not in splits:  # the corpus's own test speakers are missing: hold out others
        sizes["test"] = test_speakers
    carved = carve_by_speaker(splits["train"], sizes, seed, stay=_speakers_elsewhere(splits))
    if "test" in splits:
        carved["test"] = splits["test"]
    if "unlabeled" in splits:
        carved["unlabeled"] = splits["unlabeled"]

    out_dir = Path(out_dir)
    for name in SPLITS:  # a split left from an earlier run with other options must not survive
        shutil.rmtree(out_dir / name, ignore_errors=True)
    summary = {}
    for name, utts in carved.items():
        write_split(out_dir / name, utts)
        summary[name] = {"utterances": len(utts), "speakers": speakers_of(utts)}
        log.info("%s: %d utterances, %d speakers", name, len(utts), len(summary[name]["speakers"]))
    if "unlabeled" in carved:
        _write_unlabeled_reference(corpus_dir, out_dir, carved["unlabeled"])
    summary["dropped"] = {name: [asdict(d) for d in drops] for name, drops in dropped.items() if drops}
    summary["options"] = {"corpus_dir": str(Path(corpus_dir).resolve()), "dev_speakers": dev_speakers,
                          "test_speakers": test_speakers if "test" in sizes else None, "seed": seed,
                          "max_utts": max_utts}
    write_text_atomic(out_dir / "splits.json", json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("download", help="download and unpack the OpenSLR 101 release")
    fetch.add_argument("--dir", type=Path, required=True)
    prep = commands.add_parser("prepare", help="the recipe's Kaldi folder with speaker-disjoint dev/test")
    prep.add_argument("--corpus-dir", type=Path, required=True)
    prep.add_argument("--out-dir", type=Path, required=True)
    prep.add_argument("--dev-speakers", type=int, default=10, help="train speakers held out as dev")
    prep.add_argument("--test-speakers", type=int, default=20,
                      help="train speakers held out as test when the corpus has no test/")
    prep.add_argument("--seed", type=int, default=0, help="draws the held-out speakers")
    prep.add_argument("--max-utts", type=int, default=None, help="first N utterances of each split (quick runs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "download":
            print(download(args.dir))
        else:
            prepare(args.corpus_dir, args.out_dir, dev_speakers=args.dev_speakers,
                    test_speakers=args.test_speakers, seed=args.seed, max_utts=args.max_utts)
    except (LayoutError, ValueError) as e:
        raise SystemExit(f"speechocean762: {e}")


if __name__ == "__main__":
    main()
