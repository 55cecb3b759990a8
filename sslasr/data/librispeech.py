"""LibriSpeech (Panayotov et al. 2015; OpenSLR 12) with Libri-Light's limited-resource
fine-tuning splits (Kahn et al. 2020) and, for WavLM's utterance mixing, MUSAN noise (Snyder
et al. 2015; OpenSLR 17). Downloading and parsing go through lhotse's recipes.

Layout under ROOT, as the archives unpack:
    LibriSpeech/<part>/<spk>/<chapter>/<spk>-<chapter>-<utt>.flac, <spk>-<chapter>.trans.txt
    librispeech_finetuning/1h/{0..5}/{clean,other}/<spk>/<chapter>/...   six 10-minute folds
    librispeech_finetuning/9h/{clean,other}/<spk>/<chapter>/...
    musan/{music,speech,noise}/...
Kaldi-style splits written (audio named by absolute path, nothing copied):
    train        train-clean-100 + train-clean-360 + train-other-500 (those prepared): 960 h
    train_100h   train-clean-100
    train_10h    1h/* + 9h        train_1h  1h/*        train_10m  1h/0   (Libri-Light)
    dev_clean  dev_other  test_clean  test_other

    python -m sslasr.data.librispeech download --dir downloads [--parts ...] [--musan]
    python -m sslasr.data.librispeech prepare --root downloads --out-dir data/kaldi [--parts ...]
    python -m sslasr.data.librispeech noise --musan-dir downloads/musan --out data/noise/musan_cuts.jsonl.gz
"""

import argparse
import logging
import os
import shutil
import tarfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from lhotse import CutSet
from lhotse.recipes import download_librispeech, download_musan, prepare_librispeech, prepare_musan
from lhotse.utils import resumable_download, safe_extract

from sslasr.data.kaldi_dir import LayoutError, Utterance, write_split
from sslasr.data.manifests import write_cuts

log = logging.getLogger(__name__)

TRAIN_PARTS = ("train-clean-100", "train-clean-360", "train-other-500")
EVAL_PARTS = ("dev-clean", "dev-other", "test-clean", "test-other")
PARTS = TRAIN_PARTS + EVAL_PARTS
FINETUNING_URL = "https://dl.fbaipublicfiles.com/librilight/data/librispeech_finetuning.tgz"
FINETUNING_DIR = "librispeech_finetuning"
SPLITS = ("train", "train_100h", "train_10h", "train_1h", "train_10m") + tuple(p.replace("-", "_") for p in EVAL_PARTS)


def download(target_dir: Path, parts: Sequence[str] = PARTS, musan: bool = False) -> Path:
    """LibriSpeech parts, Libri-Light's fine-tuning splits and optionally MUSAN into target_dir."""
    target_dir = Path(target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    download_librispeech(target_dir, dataset_parts=list(parts))  # → target_dir/LibriSpeech/<part>
    finetuning = target_dir / FINETUNING_DIR
    if not (finetuning / ".completed").is_file():
        archive = target_dir / "librispeech_finetuning.tgz"
        resumable_download(FINETUNING_URL, filename=archive)
        with tarfile.open(archive) as tar:
            safe_extract(tar, path=target_dir)
        (finetuning / ".completed").touch()
    if musan:
        download_musan(target_dir)  # → target_dir/musan
    return target_dir


def _utterances(corpus_dir: Path, parts: Sequence[str], num_jobs: int) -> List[Utterance]:
    """Utterances of LibriSpeech-layout `parts` under corpus_dir, parsed by lhotse."""
    missing = [p for p in parts if not (corpus_dir / p).is_dir()]
    if missing:
        raise LayoutError(f"{corpus_dir}: no folder for {missing}")
    manifests = prepare_librispeech(corpus_dir, dataset_parts=list(parts), num_jobs=num_jobs)
    utterances = []
    for part in parts:
        # by id once: lhotse's RecordingSet[id] scans the set (quadratic over train-other-500's 149k)
        recordings = {recording.id: recording for recording in manifests[part]["recordings"]}
        if not recordings:
            raise LayoutError(f"{corpus_dir / part}: no <spk>-<chapter>.trans.txt with audio found")
        _count_unpaired(corpus_dir / part, len(manifests[part]["supervisions"]))
        for sup in manifests[part]["supervisions"]:
            path = os.path.abspath(recordings[sup.recording_id].sources[0].source)
            utterances.append(Utterance(sup.id, path, sup.text, sup.speaker))
    return utterances


def _count_unpaired(part_dir: Path, paired: int) -> None:
    """lhotse keeps the transcript lines that have a .flac (warning per file) and never looks at
    audio without a line: a partly copied corpus is said here in two counts."""
    lines = sum(1 for trans in part_dir.rglob("*.trans.txt") for line in trans.read_text().splitlines() if line.strip())
    audio = sum(1 for _ in part_dir.rglob("*.flac"))
    if lines > paired:
        log.warning("%s: %d of its %d transcript lines have no audio file: left out", part_dir, lines - paired, lines)
    if audio > paired:
        log.warning("%s: %d of its %d .flac files have no transcript line: left out", part_dir, audio - paired, audio)


def finetuning_folds(finetuning_dir: Path) -> Dict[str, List[Path]]:
    """Libri-Light's nested splits: 10 min = fold 1h/0, 1 h = all 1h folds, 10 h = those + 9h."""
    folds = sorted(p for p in (finetuning_dir / "1h").glob("*") if p.is_dir())
    if not (finetuning_dir / "1h" / "0").is_dir():
        raise LayoutError(f"{finetuning_dir}: no 1h/0 fold (expected 1h/{{0..5}}/{{clean,other}}/ and 9h/)")
    splits = {"train_10m": [finetuning_dir / "1h" / "0"], "train_1h": folds}
    if [p.name for p in folds] != [str(i) for i in range(6)]:  # an incomplete (or altered) download
        log.warning("%s/1h holds the folds %s, Libri-Light's six are 0-5: train_1h is those, not its 1 h split",
                    finetuning_dir, [p.name for p in folds])
    if (finetuning_dir / "9h").is_dir():
        splits["train_10h"] = folds + [finetuning_dir / "9h"]
    else:
        log.warning("%s has no 9h/: --labeled 10h will be a random subset of train, not Libri-Light's split",
                    finetuning_dir)
    return splits


def _fold_utterances(fold: Path, num_jobs: int) -> List[Utterance]:
    """A fold holds clean/ and other/ in LibriSpeech's <spk>/<chapter> layout."""
    parts = [p for p in ("clean", "other") if (fold / p).is_dir()]
    if not parts:
        raise LayoutError(f"{fold}: neither clean/ nor other/")
    if len(parts) == 1:
        log.warning("%s has %s/ alone (Libri-Light's folds hold clean/ and other/): the split is smaller", fold, parts[0])
    return _utterances(fold, parts, num_jobs)


def prepare(root: Path, out_dir: Path, parts: Sequence[str] = PARTS, num_jobs: int = 2) -> Dict[str, int]:
    """Write the Kaldi-style splits of the module docstring; returns utterances per split."""
    root, out_dir = Path(os.path.abspath(root)), Path(out_dir)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown LibriSpeech parts {unknown}; known: {', '.join(PARTS)}")
    corpus_dir = root / "LibriSpeech"
    if not corpus_dir.is_dir():
        raise LayoutError(f"{root}: no LibriSpeech/ folder (the unpacked OpenSLR 12 archives)")
    splits: Dict[str, List[Utterance]] = {}
    train = {part: _utterances(corpus_dir, [part], num_jobs) for part in TRAIN_PARTS if part in parts}
    if train:
        splits["train"] = [u for utterances in train.values() for u in utterances]
    if "train-clean-100" in train:
        splits["train_100h"] = train["train-clean-100"]
    for part in EVAL_PARTS:
        if part in parts:
            splits[part.replace("-", "_")] = _utterances(corpus_dir, [part], num_jobs)
    finetuning = root / FINETUNING_DIR
    if finetuning.is_dir():
        for name, folds in finetuning_folds(finetuning).items():
            splits[name] = [u for fold in folds for u in _fold_utterances(fold, num_jobs)]
    else:
        log.warning("%s is missing: --labeled 10m/1h/10h will be random subsets of train, not Libri-Light's "
                    "splits (download %s)", finetuning, FINETUNING_URL)
    if "train" in splits:
        _labeled_within_train(splits)
    for name in SPLITS:  # a split left from an earlier run with other parts must not survive
        shutil.rmtree(out_dir / name, ignore_errors=True)
    for name, utterances in splits.items():
        write_split(out_dir / name, utterances)
        log.info("%s: %d utterances", name, len(utterances))
    return {name: len(utterances) for name, utterances in splits.items()}


def _labeled_within_train(splits: Dict[str, List[Utterance]]) -> None:
    """Libri-Light's folds span train-clean-100 and train-other-500: with only some parts prepared
    (--parts), their utterances of the others are left out, said, so that a labeled split stays a
    subset of train (noisy student's pool is the rest of train; pretraining reads train)."""
    train_ids = {u.utt_id for u in splits["train"]}
    for name in ("train_10m", "train_1h", "train_10h"):
        if name not in splits:
            continue
        inside = [u for u in splits[name] if u.utt_id in train_ids]
        if len(inside) < len(splits[name]):
            log.warning("%s: %d of its %d utterances are of LibriSpeech parts not prepared (--parts): left out%s",
                        name, len(splits[name]) - len(inside), len(splits[name]),
                        "" if inside else "; none is left: no such split")
            if inside:
                splits[name] = inside
            else:
                del splits[name]


MIN_NOISE_SECONDS = 1.0  # shorter noise pieces are left out of the mixing pool


def prepare_noise(musan_dir: Path, out_path: Path, parts: Sequence[str] = ("noise",), window: float = 10.0) -> int:
    """MUSAN recordings of `parts` as a cut manifest of `window`-second pieces (WavLM's mixing
    loads a whole noise cut per use, so pieces keep that cheap); returns the number of cuts."""
    musan_dir = Path(musan_dir).resolve()  # the manifest is read from other folders (exp/)
    missing = [p for p in parts if not (musan_dir / p).is_dir()]
    if missing:
        raise LayoutError(f"{musan_dir}: no MUSAN folder for {missing}")
    manifests = prepare_musan(musan_dir, parts=list(parts))
    cuts = CutSet.from_cuts(
        cut for part in parts
        for cut in CutSet.from_manifests(recordings=manifests[part]["recordings"]).cut_into_windows(window))
    pieces = len(cuts)
    # a file's last window may be a sliver; by id: the mixing picks noise by its place in the manifest,
    # and lhotse's folder scan lists the files in the filesystem's order
    cuts = CutSet.from_cuts(sorted((c for c in cuts if c.duration >= MIN_NOISE_SECONDS), key=lambda c: c.id))
    if len(cuts) < pieces:
        log.info("noise: %d of %d pieces under %g s (ends of files, short files) left out",
                 pieces - len(cuts), pieces, MIN_NOISE_SECONDS)
    write_cuts(cuts, out_path)
    return len(cuts)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("download", help="LibriSpeech parts + Libri-Light fine-tuning splits (+ MUSAN)")
    fetch.add_argument("--dir", type=Path, required=True)
    fetch.add_argument("--parts", nargs="+", default=list(PARTS))
    fetch.add_argument("--musan", action="store_true")
    prep = commands.add_parser("prepare", help="Kaldi-style splits from ROOT/LibriSpeech and ROOT/librispeech_finetuning")
    prep.add_argument("--root", type=Path, required=True)
    prep.add_argument("--out-dir", type=Path, required=True)
    prep.add_argument("--parts", nargs="+", default=list(PARTS))
    prep.add_argument("--num-jobs", type=int, default=2)
    noise = commands.add_parser("noise", help="MUSAN as a noise cut manifest")
    noise.add_argument("--musan-dir", type=Path, required=True)
    noise.add_argument("--out", type=Path, required=True)
    noise.add_argument("--parts", nargs="+", default=["noise"], choices=["music", "speech", "noise"])
    noise.add_argument("--window", type=float, default=10.0, help="seconds per noise cut")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "download":
            download(args.dir, args.parts, args.musan)
        elif args.command == "prepare":
            prepare(args.root, args.out_dir, args.parts, args.num_jobs)
        else:
            count = prepare_noise(args.musan_dir, args.out, args.parts, args.window)
            log.info("%s: %d noise cuts", args.out, count)
    except (LayoutError, ValueError) as e:
        raise SystemExit(f"librispeech: {e}")


if __name__ == "__main__":
    main()
