"""Lhotse manifests from a Kaldi-style corpus folder, with strict per-utterance validation.

Each split folder holds ``wav.scp`` (``utt-id path``, a path relative to the split folder or
absolute), an optional ``text`` (``utt-id WORDS``) and an optional ``utt2spk``. Every
utterance that cannot be trained on is dropped with a reason, counted, logged and listed in
``{corpus}_{split}_dropped.tsv`` -- never silently.
"""

import json
import logging
import math
import multiprocessing
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import soundfile as sf
from lhotse import CutSet, MonoCut, Recording, RecordingSet, SupervisionSegment, SupervisionSet
from lhotse.audio import AudioSource

from sslasr.data.tokenizer import RESERVED_SYMBOLS
from sslasr.utils.io import atomic_path, write_text_atomic
from sslasr.utils.kaldi_table import not_a_file_path, read_table  # noqa: F401  (read_table: also this module's API)

log = logging.getLogger(__name__)

LANGUAGE = "English"


@dataclass
class Dropped:
    utt_id: str
    reason: str
    detail: str = ""


@dataclass
class KaldiSplit:
    """The parsed files of one split folder (ordered like wav.scp)."""

    wav: Dict[str, str]
    text: Optional[Dict[str, str]]
    speakers: Dict[str, str]
    dropped: List[Dropped] = field(default_factory=list)
    repeated_text_lines: int = 0  # identical repeats of a text line, read once
    repeated_wav_lines: int = 0   # identical repeats of a wav.scp line, read once


@dataclass
class AudioProbe:
    """What reading one audio file fully told us; `reason` is set when it is unusable."""

    utt_id: str
    path: str
    reason: Optional[str] = None
    detail: str = ""
    sampling_rate: int = 0
    num_samples: int = 0
    num_channels: int = 0


# ------------------------------------------------------------------ Kaldi files
def unsupported_segments(split_dir: Path) -> Optional[str]:
    """The error for a split folder with a Kaldi ``segments`` file, None without one: every
    wav.scp entry is read as one utterance, so segments would be ignored -- whole recordings
    trained on under the first segment's transcript, or dropped as text without audio."""
    path = Path(split_dir) / "segments"
    if not path.exists():
        return None
    return (f"segments files are not supported: {path} (each wav.scp entry must be one utterance's "
            f"audio; cut the recordings into one file per segment first)")


@dataclass
class Transcripts:
    """A Kaldi ``text`` file, one entry per utterance id (whitespace-normalised transcripts)."""

    text: Dict[str, str]  # ids whose lines all agree: identical repeats are read once
    conflicting: Dict[str, List[str]]  # ids whose lines disagree: their distinct transcripts
    repeated_lines: int  # identical repeats folded into `text`


def read_transcripts(path: Path) -> Transcripts:
    """An id on several lines keeps its transcript when the lines agree; when they disagree no
    line can be trusted over another, so the id goes to `conflicting` for the caller to drop."""
    variants: Dict[str, List[str]] = {}
    repeated = 0
    for utt_id, words in read_table(path):
        words = " ".join(words.split())
        seen = variants.setdefault(utt_id, [])
        if words in seen:
            repeated += 1
        else:
            seen.append(words)
    return Transcripts(text={u: v[0] for u, v in variants.items() if len(v) == 1},
                       conflicting={u: v for u, v in variants.items() if len(v) > 1},
                       repeated_lines=repeated)


def conflicting_text(utt_id: str, transcripts: Sequence[str]) -> Dropped:
    shown = " vs ".join(repr(t) for t in transcripts)
    return Dropped(utt_id, "conflicting_text", f"{len(transcripts)} different transcripts in text: {shown}")


def read_wav_scp(split_dir: Path, max_utts: Optional[int] = None
                 ) -> Tuple[Dict[str, str], List[str], List[Dropped], int]:
    """(usable id -> absolute path, every id listed, the dropped entries, the number of identical
    repeated lines) of split_dir/wav.scp.

    An id on several lines keeps its path when the lines agree (the repeats are counted, not
    dropped: the utterance is kept); when the paths differ no line can be trusted over another,
    so the id is dropped. With `max_utts`, only the first N ids of the file are read (quick runs).
    """
    rows = read_table(Path(split_dir) / "wav.scp")
    listed = list(dict.fromkeys(utt_id for utt_id, _ in rows))[:max_utts]
    paths: Dict[str, List[str]] = {utt_id: [] for utt_id in listed}
    dropped: List[Dropped] = []
    repeated = 0
    for utt_id, entry in rows:
        if utt_id not in paths:
            continue  # beyond max_utts
        if entry in paths[utt_id]:
            repeated += 1
        else:
            paths[utt_id].append(entry)
    wav: Dict[str, str] = {}
    for utt_id, (entry, *others) in paths.items():
        if others:
            shown = " vs ".join(repr(e) for e in [entry, *others])
            dropped.append(Dropped(utt_id, "conflicting_audio",
                                   f"{1 + len(others)} different paths in wav.scp: {shown}"))
        elif why := not_a_file_path(entry):
            dropped.append(Dropped(utt_id, "unsupported_entry", f"not a file path ({why}): {entry!r}"))
        else:
            # os.path.abspath, not resolve(): keep symlinked corpus paths as the user gave them.
            wav[utt_id] = os.path.abspath(os.path.join(split_dir, entry))
    return wav, listed, dropped, repeated


def read_speakers(path: Path) -> Dict[str, str]:
    """utt2spk; an id repeated with another speaker is an error (which one is right?), and so is
    a line naming no speaker (its utterances would all be one speaker, split as one)."""
    speakers: Dict[str, str] = {}
    conflicting = []
    rows = read_table(path)
    nameless = [utt_id for utt_id, speaker in rows if not speaker]
    if nameless:
        raise ValueError(f"{path}: {len(nameless)} line(s) name no speaker, e.g. {nameless[:3]}")
    for utt_id, speaker in rows:
        if speakers.setdefault(utt_id, speaker) != speaker:
            conflicting.append(utt_id)
    if conflicting:
        raise ValueError(f"{path}: {len(set(conflicting))} utterance id(s) repeated with different speakers, "
                         f"e.g. {sorted(set(conflicting))[:3]}")
    return speakers


def read_kaldi_split(split_dir: Path, max_utts: Optional[int] = None) -> KaldiSplit:
    """Parse wav.scp/text/utt2spk; text-level problems are recorded as dropped utterances.

    With `max_utts`, only the first N wav.scp ids are used (quick runs) and text lines of
    the other utterances are ignored rather than reported as "text without audio".
    Raises ValueError for a segments file, which is not supported.
    """
    split_dir = Path(split_dir)
    problem = unsupported_segments(split_dir)
    if problem:
        raise ValueError(problem)
    wav, listed_ids, dropped, repeated_wav = read_wav_scp(split_dir, max_utts)

    text, repeated = None, 0
    if (split_dir / "text").exists():
        transcripts = read_transcripts(split_dir / "text")
        listed = set(listed_ids)  # every wav.scp id, dropped ones too: their text has audio
        # words as scoring splits them, one space apart: a tab or no-break space inside a transcript
        # is no word boundary to sentencepiece, which splits at spaces only
        text = {u: " ".join(words.split()) for u, words in transcripts.text.items() if u in listed}
        for utt_id, variants in transcripts.conflicting.items():
            if utt_id in wav:  # dropped here, so it is not counted again as missing_text
                del wav[utt_id]
                dropped.append(conflicting_text(utt_id, variants))
        if max_utts is None:
            dropped.extend(Dropped(u, "text_without_audio", "in text, not in wav.scp")
                           for u in [*transcripts.text, *transcripts.conflicting] if u not in listed)
        repeated = transcripts.repeated_lines
    speakers = read_speakers(split_dir / "utt2spk") if (split_dir / "utt2spk").exists() else {}
    return KaldiSplit(wav=wav, text=text, speakers=speakers, dropped=dropped, repeated_text_lines=repeated,
                      repeated_wav_lines=repeated_wav)


def _text_problem(utt_id: str, text: Optional[Dict[str, str]]) -> Optional[Dropped]:
    """In a labelled split every utterance needs a non-empty transcript."""
    if text is None:
        return None
    if utt_id not in text:
        return Dropped(utt_id, "missing_text", "in wav.scp, not in text")
    if not text[utt_id]:
        return Dropped(utt_id, "empty_text", "empty transcript line")
    reserved = [symbol for symbol in RESERVED_SYMBOLS if symbol in text[utt_id]]
    if reserved:  # the tokenizer reads them as its own symbols: a blank in CTC targets, an <eos> mid-sentence
        return Dropped(utt_id, "reserved_symbol", f"the transcript spells the tokenizer's {' '.join(reserved)}")
    return None


# ------------------------------------------------------------------ audio checks
def probe_audio(job: Tuple[str, str, float, float]) -> AudioProbe:
    """Read a whole file and check it (runs in a worker process)."""
    utt_id, path, min_duration, max_duration = job
    probe = AudioProbe(utt_id, path)

    def fail(reason: str, detail: str) -> AudioProbe:
        probe.reason, probe.detail = reason, detail
        return probe

    if not os.path.isfile(path):
        return fail("missing_audio", path)
    if os.path.getsize(path) == 0:
        return fail("empty_audio", "file has 0 bytes")
    try:
        data, sampling_rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types for corrupt/unknown files
        return fail("unreadable_audio", f"{type(e).__name__}: {e}".replace("\t", " ").replace("\n", " "))
    probe.sampling_rate, probe.num_samples, probe.num_channels = sampling_rate, data.shape[0], data.shape[1]
    if data.shape[0] == 0:
        return fail("empty_audio", "0 samples")
    duration = data.shape[0] / sampling_rate
    if duration < min_duration:
        return fail("too_short", f"{duration:.3f}s < {min_duration}s")
    if duration > max_duration:
        return fail("too_long", f"{duration:.3f}s > {max_duration}s")
    channel0 = data[:, 0]  # only channel 0 is used, so only it has to be clean
    bad = int(np.count_nonzero(~np.isfinite(channel0)))
    if bad:
        return fail("non_finite", f"{bad} NaN/Inf samples")
    if not np.any(channel0):
        return fail("digital_silence", "all samples are exactly zero")
    return probe


def probe_all(jobs: List[Tuple[str, str, float, float]], num_jobs: int) -> List[AudioProbe]:
    if num_jobs <= 1 or len(jobs) < 2:
        return [probe_audio(j) for j in jobs]
    with multiprocessing.Pool(num_jobs) as pool:
        return pool.map(probe_audio, jobs, chunksize=max(1, len(jobs) // (8 * num_jobs)))


def make_cut(probe: AudioProbe, text: Optional[str], speaker: Optional[str], sample_rate: int) -> MonoCut:
    """One recording = one utterance = one cut on channel 0, resampled lazily if needed."""
    recording = Recording(
        id=probe.utt_id,
        sources=[AudioSource(type="file", channels=list(range(probe.num_channels)), source=probe.path)],
        sampling_rate=probe.sampling_rate,
        num_samples=probe.num_samples,
        duration=probe.num_samples / probe.sampling_rate,
    )
    supervision = SupervisionSegment(
        id=probe.utt_id, recording_id=probe.utt_id, start=0.0, duration=recording.duration,
        channel=0, text=text, speaker=speaker, language=LANGUAGE)
    cut = MonoCut(id=probe.utt_id, start=0.0, duration=recording.duration, channel=0,
                  recording=recording, supervisions=[supervision])
    if probe.sampling_rate != sample_rate:
        cut = cut.resample(sample_rate)  # stored as a transform: audio is resampled when loaded
    return cut


# ------------------------------------------------------------------ outputs
def write_manifest(manifest, path: Path) -> None:
    """Any lhotse manifest (RecordingSet, CutSet, ...) written atomically."""
    with atomic_path(path) as tmp:
        manifest.to_file(tmp)


def write_cuts(cuts: CutSet, path: Path) -> None:
    write_manifest(cuts, path)


def _write_dropped(dropped: List[Dropped], path: Path) -> None:
    lines = ["utt_id\treason\tdetail"] + [f"{d.utt_id}\t{d.reason}\t{d.detail}" for d in dropped]
    write_text_atomic(path, "\n".join(lines) + "\n")


def _report(split: str, total: int, cuts: List[MonoCut], dropped: List[Dropped], probes: List[AudioProbe],
            sample_rate: int, repeated_text_lines: int, repeated_wav_lines: int) -> Dict:
    kept_ids = {c.id for c in cuts}
    kept_probes = [p for p in probes if p.utt_id in kept_ids]
    return {
        "split": split,
        "total": total,
        "kept": len(cuts),
        "dropped": len(dropped),
        "dropped_per_reason": dict(sorted(Counter(d.reason for d in dropped).items())),
        "kept_duration_s": round(sum(c.duration for c in cuts), 3),
        "resampled": sum(p.sampling_rate != sample_rate for p in kept_probes),
        "multichannel_kept_channel0": sum(p.num_channels > 1 for p in kept_probes),
        "repeated_text_lines": repeated_text_lines,
        "repeated_wav_lines": repeated_wav_lines,
        "sample_rate": sample_rate,
    }


def _log_report(corpus: str, report: Dict) -> None:
    log.info("%s/%s: kept %d of %d utterances (%.1f min)", corpus, report["split"], report["kept"],
             report["total"], report["kept_duration_s"] / 60)
    for reason, count in report["dropped_per_reason"].items():
        log.warning("%s/%s: dropped %d utterance(s): %s", corpus, report["split"], count, reason)
    for key, file in (("repeated_text_lines", "text"), ("repeated_wav_lines", "wav.scp")):
        if report[key]:
            log.warning("%s/%s: %d identical repeated line(s) in %s, each read once", corpus, report["split"],
                        report[key], file)
    if report["resampled"]:
        log.info("%s/%s: %d utterance(s) resampled on the fly to %d Hz", corpus, report["split"],
                 report["resampled"], report["sample_rate"])
        if not _can_resample():
            log.error("lhotse resamples with torchaudio or scipy and neither is installed: "
                      "loading those %d utterance(s) will fail (pip install scipy)", report["resampled"])
    if report["multichannel_kept_channel0"]:
        log.info("%s/%s: %d multi-channel utterance(s), keeping channel 0", corpus, report["split"],
                 report["multichannel_kept_channel0"])


def _can_resample() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(name) for name in ("torchaudio", "scipy"))


# ------------------------------------------------------------------ one split
def prepare_split(split_dir: Path, corpus: str, split: str, out_dir: Path, *, sample_rate: int = 16000,
                  min_duration: float = 0.3, max_duration: float = 30.0, num_jobs: int = 2,
                  max_utts: Optional[int] = None) -> Dict:
    """Validate one split and write its manifests; returns the validation report.

    Raises ValueError when no utterance survives (after writing the dropped list).
    """
    out_dir = Path(out_dir)
    parsed = read_kaldi_split(split_dir, max_utts)
    dropped = list(parsed.dropped)
    to_probe = []
    for utt_id, path in parsed.wav.items():
        problem = _text_problem(utt_id, parsed.text)
        if problem:
            dropped.append(problem)
        else:
            to_probe.append((utt_id, path, min_duration, max_duration))

    probes = probe_all(to_probe, num_jobs)
    cuts = []
    for probe in probes:
        if probe.reason:
            dropped.append(Dropped(probe.utt_id, probe.reason, probe.detail))
            continue
        text = parsed.text[probe.utt_id] if parsed.text is not None else None
        cuts.append(make_cut(probe, text, parsed.speakers.get(probe.utt_id), sample_rate))

    total = len({d.utt_id for d in dropped} | {c.id for c in cuts})
    report = _report(split, total, cuts, dropped, probes, sample_rate, parsed.repeated_text_lines,
                     parsed.repeated_wav_lines)
    _write_dropped(dropped, out_dir / f"{corpus}_{split}_dropped.tsv")
    write_text_atomic(out_dir / f"{corpus}_{split}_validation.json", json.dumps(report, indent=2) + "\n")
    _log_report(corpus, report)
    if not cuts:
        raise ValueError(f"{corpus}/{split}: all {total} utterances were dropped "
                         f"({report['dropped_per_reason']}); see {out_dir}/{corpus}_{split}_dropped.tsv")

    write_split_manifests(cuts, out_dir, corpus, split)
    return report


def split_manifest_paths(out_dir: Path, corpus: str, split: str) -> List[Path]:
    """The recordings, supervisions and cuts manifests of one split."""
    return [Path(out_dir) / f"{corpus}_{kind}_{split}.jsonl.gz" for kind in ("recordings", "supervisions", "cuts")]


def write_split_manifests(cuts: Iterable, out_dir: Path, corpus: str, split: str) -> Path:
    """A split's recordings, supervisions and cuts manifests, all three from the same cuts (one
    recording and one supervision per cut); returns the cuts manifest's path."""
    cuts = list(cuts)
    recordings, supervisions, cuts_path = split_manifest_paths(out_dir, corpus, split)
    write_manifest(RecordingSet.from_recordings(c.recording for c in cuts), recordings)
    write_manifest(SupervisionSet.from_segments(s for c in cuts for s in c.supervisions), supervisions)
    write_cuts(CutSet.from_cuts(cuts), cuts_path)
    return cuts_path


def prepare_corpus(corpus_dir: Path, corpus: str, splits: Sequence[str], out_dir: Path, *,
                   eval_splits: Sequence[str] = (), **kwargs) -> Dict[str, Dict]:
    """Every requested split that exists under corpus_dir; missing ones are logged and skipped.

    The duration limits (min_duration, max_duration) keep training batches in bounds; they do
    not apply to `eval_splits` (test and validation sets), which are scored on every utterance
    (LibriSpeech's test sets hold utterances of up to 35 s).
    """
    reports = {}
    for split in splits:
        split_dir = Path(corpus_dir) / split
        if not (split_dir / "wav.scp").exists():
            log.info("%s: no %s/wav.scp, skipping split %s", corpus, split_dir, split)
            continue
        options = dict(kwargs)
        if split in eval_splits:
            log.info("%s/%s: an evaluation split, kept whatever the utterances' durations", corpus, split)
            options.update(min_duration=0.0, max_duration=math.inf)
        reports[split] = prepare_split(split_dir, corpus, split, out_dir, **options)
    if not reports:
        raise ValueError(f"none of the splits {list(splits)} exist under {corpus_dir}")
    return reports


# ------------------------------------------------------------------ subsets
def subset_by_duration(cuts: Iterable, seconds: float, seed: int) -> CutSet:
    """Whole utterances, in a seeded random order, until their total reaches `seconds`.

    The result keeps the manifest order. If the corpus is shorter, everything is returned.
    """
    cuts = list(cuts)
    order = list(range(len(cuts)))
    random.Random(seed).shuffle(order)
    chosen, total = set(), 0.0
    for index in order:
        if total >= seconds:
            break
        chosen.add(index)
        total += cuts[index].duration
    if total < seconds:
        log.warning("asked for %.1fs of audio but only %.1fs exist: using everything", seconds, total)
    return CutSet.from_cuts(cuts[i] for i in sorted(chosen))


def speed_perturbed_copies(cuts: Iterable, factors: Sequence[float]) -> CutSet:
    """A copy of the cuts at each speed factor (Ko et al., 2015: with 0.9 and 1.1 next to the
    originals, a small training set triples; pitch and tempo change together, as Kaldi's sox
    `speed`). Copies are named `<id>_sp<factor>`, their audio resampled when loaded, their
    supervisions rescaled; stored features do not carry over (fbank frontends compute their own)."""
    factors = [float(f) for f in factors]
    bad = [f for f in factors if not 0.5 <= f <= 2.0 or f == 1.0]
    if bad or len(set(factors)) != len(factors):
        raise ValueError(f"speed factors must be distinct, in [0.5, 2] and not 1 (the originals are kept), "
                         f"got {factors}")
    cuts = list(cuts)
    silent = [cut.id for cut in cuts if not cut.has_recording]
    if silent:  # (an fbank cut padded to its one frame keeps features alone: no audio to resample)
        log.warning("%d of %d cuts have no audio to resample (features alone): no speed-perturbed copies of "
                    "them, e.g. %s", len(silent), len(cuts), silent[0])
    return CutSet.from_cuts(cut.drop_features().perturb_speed(factor, affix_id=True)
                            for factor in factors for cut in cuts if cut.has_recording)


def _speaker(cut) -> str:
    speaker = cut.supervisions[0].speaker if cut.supervisions else None
    return speaker if speaker is not None else cut.id  # no utt2spk: each utterance its own speaker


def held_out_speakers(speakers: Iterable[str], count: int, seed: int) -> List[str]:
    """`count` speakers drawn by `seed`, in draw order (so a caller can cut the list into
    dev, test, ...). The draw depends only on the set of speakers and the seed."""
    speakers = sorted(set(speakers))
    if not 1 <= count < len(speakers):
        raise ValueError(f"cannot hold out {count} of {len(speakers)} speakers: need 1 <= count < "
                         f"{len(speakers)} so that some speakers stay in training")
    random.Random(seed).shuffle(speakers)
    return speakers[:count]


def split_by_speaker(cuts: Iterable, fraction: float, seed: int) -> Tuple[CutSet, CutSet]:
    """(rest, held_out): a seeded `fraction` of the speakers (at least one, never all) held out.
    Without any speakers each utterance is its own; with some missing, the split would put a
    speaker's unnamed utterances on either side: an error."""
    cuts = list(cuts)
    unnamed = [c.id for c in cuts if not c.supervisions or c.supervisions[0].speaker is None]
    if unnamed and len(unnamed) < len(cuts):
        raise ValueError(f"{len(unnamed)} of {len(cuts)} utterances have no speaker (utt2spk), e.g. "
                         f"{unnamed[:3]}: a by-speaker split needs every one or none")
    if unnamed:
        log.warning("no speakers (utt2spk): each of the %d utterances is split as its own speaker", len(cuts))
    speakers = {_speaker(c) for c in cuts}
    if len(speakers) < 2:
        raise ValueError(f"need at least 2 speakers to split by speaker, found {len(speakers)}")
    num_held_out = min(len(speakers) - 1, max(1, round(fraction * len(speakers))))
    held_out = set(held_out_speakers(speakers, num_held_out, seed))
    rest = CutSet.from_cuts(c for c in cuts if _speaker(c) not in held_out)
    dev = CutSet.from_cuts(c for c in cuts if _speaker(c) in held_out)
    return rest, dev


def derive_subsets(out_dir: Path, corpus: str, *, dev_fraction: Optional[float] = None,
                   labeled_seconds: Optional[float] = None, seed: int = 0) -> Dict[str, Path]:
    """Carve a by-speaker dev set out of train, then a labeled subset from what is left.

    Order matters: the labeled subset is drawn after the dev speakers are removed, so the two
    never overlap. With a dev carve the full train set is kept as ``*_cuts_train_full`` and
    ``*_cuts_train`` becomes the remainder -- so call this right after preparing train.
    """
    out_dir = Path(out_dir)
    train_path = out_dir / f"{corpus}_cuts_train.jsonl.gz"
    written = {}
    if dev_fraction:
        # each of train_full, train and dev gets all three manifests, so whatever reads train's
        # recordings (a feature extraction) sees the remainder, not the dev speakers too
        full_path = write_split_manifests(CutSet.from_file(train_path), out_dir, corpus, "train_full")
        rest, dev = split_by_speaker(CutSet.from_file(full_path), dev_fraction, seed)
        # train first: killed in between, no dev shares speakers with train
        write_split_manifests(rest, out_dir, corpus, "train")
        dev_path = write_split_manifests(dev, out_dir, corpus, "dev")
        log.info("%s: carved dev from train by speaker: %d dev / %d train cuts", corpus, len(dev), len(rest))
        written.update(dev=dev_path, train=train_path, train_full=full_path)
    if labeled_seconds:
        subset = subset_by_duration(CutSet.from_file(train_path), labeled_seconds, seed)
        seconds = int(labeled_seconds) if float(labeled_seconds).is_integer() else repr(float(labeled_seconds))
        path = out_dir / f"{corpus}_cuts_train_labeled{seconds}s.jsonl.gz"  # 0.3 and 90.7 named apart
        write_cuts(subset, path)
        log.info("%s: labeled subset of %.1fs (%d cuts) -> %s", corpus,
                 sum(c.duration for c in subset), len(subset), path)
        written["labeled"] = path
    return written
