"""Data pipeline: manifest validation, subsets, tokenizer, loader batches, sampler resumption/sharding."""

import copy
import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from lhotse import CutSet, Fbank, FbankConfig, MonoCut, Recording, RecordingSet, SupervisionSegment, SupervisionSet
from lhotse.audio import AudioSource
from shared_data import shared_data_dir

from sslasr.bin import compute_fbank as compute_fbank_cli
from sslasr.bin import cuts as cuts_cli
from sslasr.bin import prepare_manifests as prepare_cli
from sslasr.data.loader import load_cuts, make_dataloader, make_sampler, normalize_waveforms
from sslasr.data.manifests import (
    derive_subsets, prepare_split, speed_perturbed_copies, split_by_speaker, subset_by_duration, write_cuts,
)
from sslasr.data.tokenizer import Tokenizer, train_tokenizer
from sslasr.models.blocks.subsampling import normalize_fbank_bins
from sslasr.train.trainer import SkipBatches

SR = 16000
REAL_CORPUS = shared_data_dir() / "speechocean762"
GOOD = {  # utt-id: (seconds, speaker, text)
    "a1": (1.0, "spkA", "HELLO WORLD"), "a2": (1.3, "spkA", "GOOD MORNING"),
    "b1": (1.6, "spkB", "WE CALL IT BEAR"), "b2": (0.9, "spkB", "ZERO THREE FIVE ONE"),
    "c1": (1.1, "spkC", "THREE TWO TWO SEVEN"), "c2": (2.0, "spkC", "HELLO BEAR"),
}
EXPECTED_DROPS = {
    "corrupt": "unreadable_audio", "missing": "missing_audio", "zerolen": "empty_audio",
    "short": "too_short", "long": "too_long", "nan": "non_finite", "silent": "digital_silence",
    "emptytext": "empty_text", "textonly": "text_without_audio",
}
KEPT = sorted(list(GOOD) + ["rate8k", "stereo"])


def _tone(seconds: float, sr: int = SR, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    mono = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * np.random.default_rng(0).standard_normal(t.size)
    return np.stack([mono] * channels, axis=1).astype(np.float32) if channels > 1 else mono.astype(np.float32)


def _write_kaldi(split_dir: Path, wav: dict, text: dict = None, spk: dict = None) -> None:
    split_dir.mkdir(parents=True, exist_ok=True)
    (split_dir / "wav.scp").write_text("".join(f"{u} {p}\n" for u, p in wav.items()))
    if text is not None:
        (split_dir / "text").write_text("".join(f"{u} {t}\n" for u, t in text.items()))
    if spk is not None:
        (split_dir / "utt2spk").write_text("".join(f"{u} {s}\n" for u, s in spk.items()))


def _build_corpus(root: Path) -> Path:
    audio = root / "train" / "audio"
    audio.mkdir(parents=True)
    wav, text, spk = {}, {}, {}
    for i, (utt, (sec, speaker, words)) in enumerate(GOOD.items()):
        sf.write(audio / f"{utt}.flac", _tone(sec, freq=200 + 50 * i), SR)
        wav[utt], text[utt], spk[utt] = f"audio/{utt}.flac", words, speaker
    (audio / "corrupt.flac").write_bytes(np.random.default_rng(1).bytes(4000))
    (audio / "zerolen.flac").write_bytes(b"")
    sf.write(audio / "short.flac", _tone(0.1), SR)
    sf.write(audio / "long.flac", _tone(4.0), SR)
    nan = _tone(1.0)
    nan[100:110] = np.nan
    sf.write(audio / "nan.wav", nan, SR, subtype="FLOAT")
    sf.write(audio / "silent.flac", np.zeros(SR, dtype=np.float32), SR)
    sf.write(audio / "rate8k.flac", _tone(1.5, sr=8000), 8000)
    sf.write(audio / "stereo.flac", _tone(1.2, channels=2), SR)
    sf.write(audio / "emptytext.flac", _tone(1.0), SR)
    for utt in ("corrupt", "zerolen", "short", "long", "silent", "rate8k", "stereo", "emptytext"):
        wav[utt] = f"audio/{utt}.flac"
    wav["nan"] = str((audio / "nan.wav").resolve())  # absolute entries work too
    wav["missing"] = "audio/missing.flac"
    text.update({u: "SOME WORDS" for u in ("corrupt", "zerolen", "short", "long", "nan", "silent",
                                            "rate8k", "stereo", "missing")})
    text.update(emptytext="", textonly="NO AUDIO HERE")
    spk.update({u: "spkD" for u in wav if u not in spk})
    _write_kaldi(root / "train", wav, text, spk)

    unlabeled = root / "unlabeled"
    (unlabeled / "audio").mkdir(parents=True)
    for utt in ("u1", "u2"):
        sf.write(unlabeled / "audio" / f"{utt}.flac", _tone(1.0, freq=300), SR)
    _write_kaldi(unlabeled, {u: f"audio/{u}.flac" for u in ("u1", "u2")})
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = _build_corpus(tmp_path_factory.mktemp("corpus"))
    out = tmp_path_factory.mktemp("manifests")
    prepare_cli.main(["--corpus-dir", str(root), "--corpus", "toy", "--splits", "train", "unlabeled", "dev",
                      "--out-dir", str(out), "--max-duration", "3", "--num-jobs", "2"])
    return root, out


# ------------------------------------------------------------------ manifests / validation
def test_validation_keeps_exactly_the_good_utterances(prepared):
    _, out = prepared
    cuts = CutSet.from_file(out / "toy_cuts_train.jsonl.gz")
    assert sorted(c.id for c in cuts) == KEPT
    report = json.loads((out / "toy_train_validation.json").read_text())
    assert report["kept"] == len(KEPT) and report["dropped"] == len(EXPECTED_DROPS)
    assert report["dropped_per_reason"] == {r: 1 for r in EXPECTED_DROPS.values()}
    assert report["total"] == len(KEPT) + len(EXPECTED_DROPS)
    assert report["resampled"] == 1 and report["multichannel_kept_channel0"] == 1
    assert report["kept_duration_s"] == pytest.approx(sum(c.duration for c in cuts), abs=1e-3)
    assert not (out / "toy_cuts_dev.jsonl.gz").exists()  # missing split skipped, not an error


def test_dropped_tsv_lists_every_drop(prepared):
    _, out = prepared
    lines = (out / "toy_train_dropped.tsv").read_text().splitlines()
    assert lines[0] == "utt_id\treason\tdetail"
    rows = [line.split("\t") for line in lines[1:]]
    assert all(len(r) == 3 for r in rows)
    assert {r[0]: r[1] for r in rows} == EXPECTED_DROPS
    assert len(rows) == len(EXPECTED_DROPS)


def test_cut_contents(prepared):
    root, out = prepared
    cuts = {c.id: c for c in CutSet.from_file(out / "toy_cuts_train.jsonl.gz")}
    a1 = cuts["a1"]
    assert Path(a1.recording.sources[0].source).is_absolute()
    assert a1.supervisions[0].text == "HELLO WORLD" and a1.supervisions[0].speaker == "spkA"
    assert a1.supervisions[0].language == "English"
    assert cuts["rate8k"].sampling_rate == SR and cuts["rate8k"].num_samples == int(1.5 * SR)
    assert cuts["stereo"].channel == 0 and cuts["stereo"].load_audio().shape == (1, int(1.2 * SR))
    unlabeled = CutSet.from_file(out / "toy_cuts_unlabeled.jsonl.gz")
    assert sorted(c.id for c in unlabeled) == ["u1", "u2"]
    assert all(c.supervisions[0].text is None for c in unlabeled)
    for kind in ("recordings", "supervisions"):
        assert (out / f"toy_{kind}_train.jsonl.gz").exists()


def test_all_dropped_raises(tmp_path):
    _write_kaldi(tmp_path / "c" / "train", {"x": "nowhere.flac"})
    with pytest.raises(ValueError, match="all 1 utterances were dropped"):
        prepare_split(tmp_path / "c" / "train", "bad", "train", tmp_path / "out", num_jobs=1)
    assert "missing_audio" in (tmp_path / "out" / "bad_train_dropped.tsv").read_text()


def test_cli_carves_dev_by_speaker_then_labeled_subset(prepared, tmp_path):
    root, _ = prepared
    prepare_cli.main(["--corpus-dir", str(root), "--corpus", "toy", "--splits", "train", "--out-dir",
                      str(tmp_path), "--max-duration", "3", "--num-jobs", "1", "--dev-fraction", "0.25",
                      "--labeled", "3", "--seed", "1"])
    load = lambda name: CutSet.from_file(tmp_path / f"toy_cuts_{name}.jsonl.gz")  # noqa: E731
    full, train, dev, labeled = load("train_full"), load("train"), load("dev"), load("train_labeled3s")
    assert sorted(c.id for c in full) == KEPT
    speakers = lambda cuts: {c.supervisions[0].speaker for c in cuts}  # noqa: E731
    assert len(speakers(dev)) == 1 and not speakers(dev) & speakers(train)
    assert {c.id for c in train} | {c.id for c in dev} == set(KEPT)
    assert {c.id for c in labeled} <= {c.id for c in train}
    assert sum(c.duration for c in labeled) >= 3
    for name, cuts in (("train_full", full), ("train", train), ("dev", dev)):  # the split's every manifest
        recordings = RecordingSet.from_file(tmp_path / f"toy_recordings_{name}.jsonl.gz")
        supervisions = SupervisionSet.from_file(tmp_path / f"toy_supervisions_{name}.jsonl.gz")
        assert sorted(r.id for r in recordings) == sorted(c.recording.id for c in cuts)
        assert sorted(s.id for s in supervisions) == sorted(c.supervisions[0].id for c in cuts)
    # a run that prepares no train keeps the carve (it failed here: no such split)
    with pytest.raises(ValueError, match="none of the splits"):
        prepare_cli.main(["--corpus-dir", str(root), "--corpus", "toy", "--splits", "nope", "--out-dir", str(tmp_path)])
    assert (tmp_path / "toy_cuts_dev.jsonl.gz").exists()
    # again without the carve: the earlier dev (speakers of the whole train now) goes
    prepare_cli.main(["--corpus-dir", str(root), "--corpus", "toy", "--splits", "train", "--out-dir",
                      str(tmp_path), "--max-duration", "3", "--num-jobs", "1"])
    assert not [p.name for p in tmp_path.glob("toy_*_dev.jsonl.gz")] + [p.name for p in tmp_path.glob("toy_*_train_full.jsonl.gz")]
    # ... and so does the labeled subset of the train before (it held the dev speakers of then)
    assert not list(tmp_path.glob("toy_cuts_train_labeled*"))
    assert len(RecordingSet.from_file(tmp_path / "toy_recordings_train.jsonl.gz")) == len(KEPT)
    for fraction in ("0", "1.5", "-0.5"):
        with pytest.raises(SystemExit, match="--dev-fraction must be between 0 and 1"):
            prepare_cli.main(["--corpus-dir", str(root), "--corpus", "toy", "--splits", "train", "--out-dir",
                              str(tmp_path), "--dev-fraction", fraction])
    # a corpus with a dev of its own: a carve would overwrite its manifests, prepared or not this time
    own = tmp_path / "own"
    shutil.copytree(root / "train", own / "train")
    shutil.copytree(root / "train", own / "dev")
    with pytest.raises(SystemExit, match="own dev split"):
        prepare_cli.main(["--corpus-dir", str(own), "--corpus", "toy", "--splits", "train", "--out-dir",
                          str(tmp_path), "--dev-fraction", "0.25"])


def test_conflicting_transcripts_drop_the_utterance_and_identical_repeats_are_read_once(tmp_path, caplog):
    split = tmp_path / "c" / "train"
    (split / "audio").mkdir(parents=True)
    for i, utt in enumerate("abcd"):
        sf.write(split / "audio" / f"{utt}.flac", _tone(1.0, freq=200 + 50 * i), SR)
    (split / "wav.scp").write_text("".join(f"{u} audio/{u}.flac\n" for u in "abcd"))
    (split / "text").write_text("a HELLO\nb ONE TWO\na WORLD\nb ONE  TWO\nc THREE\nc THREE\nc FOUR\n"
                                "d GOOD\nx NO\nx AUDIO\n")
    caplog.set_level(logging.INFO)
    report = prepare_split(split, "dup", "train", tmp_path / "out", num_jobs=1)
    cuts = {c.id: c.supervisions[0].text for c in CutSet.from_file(tmp_path / "out" / "dup_cuts_train.jsonl.gz")}
    assert cuts == {"b": "ONE TWO", "d": "GOOD"}  # no later line overwrites an earlier one
    assert report["dropped_per_reason"] == {"conflicting_text": 2, "text_without_audio": 1}
    assert (report["total"], report["kept"], report["dropped"], report["repeated_text_lines"]) == (5, 2, 3, 2)
    rows = [line.split("\t") for line in (tmp_path / "out" / "dup_train_dropped.tsv").read_text().splitlines()[1:]]
    assert rows == [["a", "conflicting_text", "2 different transcripts in text: 'HELLO' vs 'WORLD'"],
                    ["c", "conflicting_text", "2 different transcripts in text: 'THREE' vs 'FOUR'"],
                    ["x", "text_without_audio", "in text, not in wav.scp"]]
    assert "dup/train: dropped 2 utterance(s): conflicting_text" in caplog.text
    assert "dup/train: 2 identical repeated line(s) in text, each read once" in caplog.text


# ------------------------------------------------------------------ subsets
def _dummy_cuts(n: int, path: Path = None):
    """Cuts with varied durations and 6 speakers; audio is never read."""
    cuts = []
    for i in range(n):
        dur = 0.5 + (i * 37 % 23) / 10
        rec = Recording(id=f"r{i:03d}", sources=[AudioSource("file", [0], "/nonexistent.flac")],
                        sampling_rate=SR, num_samples=int(dur * SR), duration=int(dur * SR) / SR)
        sup = SupervisionSegment(id=rec.id, recording_id=rec.id, start=0, duration=rec.duration,
                                 speaker=f"s{i % 6}", text="HELLO")
        cuts.append(MonoCut(id=rec.id, start=0, duration=rec.duration, channel=0, recording=rec,
                            supervisions=[sup]))
    cuts = CutSet.from_cuts(cuts)
    if path is None:
        return cuts
    write_cuts(cuts, path)
    return load_cuts(path)


def test_subset_by_duration_total_and_determinism():
    cuts = _dummy_cuts(50)
    subset = subset_by_duration(cuts, 20.0, seed=3)
    durations = [c.duration for c in subset]
    assert sum(durations) >= 20.0 and sum(durations) - max(durations) < 20.0
    assert [c.id for c in subset] == [c.id for c in subset_by_duration(cuts, 20.0, seed=3)]
    assert [c.id for c in subset] != [c.id for c in subset_by_duration(cuts, 20.0, seed=4)]
    assert len(subset_by_duration(cuts, 1e6, seed=0)) == 50


def test_data_buffer_size_decides_how_far_training_batches_reach_into_the_manifest(tmp_path):
    """lhotse's sampler draws from the cuts it holds: a speaker-sorted manifest larger than the
    buffer is visited window by window, in manifest order (LibriSpeech's 960 h against lhotse's
    20,000). A buffer covering the manifest draws the first batches from all of it."""
    path = tmp_path / "cuts.jsonl.gz"
    _dummy_cuts(600, path)
    position = {c.id: i for i, c in enumerate(load_cuts(path))}

    def reach(buffer_size: int) -> int:  # the furthest manifest position among the first 5 batches
        sampler = make_sampler(load_cuts(path), max_duration=8.0, shuffle=True, num_buckets=2, buffer_size=buffer_size)
        return max(position[c.id] for _, batch in zip(range(5), sampler) for c in batch)

    assert reach(60) < 150 and reach(600) > 300
    from sslasr.train.distributed import DistInfo
    from sslasr.train.tasks import _DataMixin

    class Task(_DataMixin):
        input_type = "waveform"

    task = Task()
    task.cfg = {"data": {"max_duration": 8.0, "buffer_size": 600}, "trainer": {"seed": 0}}
    assert task._loader(str(path), DistInfo(), train=True).sampler.buffer_size == 600  # the YAML's


def test_labeled_subset_rule_is_pinned(tmp_path, capsys):
    """--labeled N: whole cuts in the order random.Random(seed) shuffles their indices, added until
    the total reaches N (the cut that crosses it is kept), written in manifest order. The driver
    runs `cuts subset --seconds N` (seed 0); prepare_manifests --labeled runs the same rule."""
    train = tmp_path / "toy_cuts_train.jsonl.gz"
    durations = {c.id: c.duration for c in _dummy_cuts(10, train)}
    assert [durations[f"r00{i}"] for i in (7, 8, 1)] == [1.1, 2.5, 1.9]  # the first three of seed 0's order
    cuts_cli.main(["subset", "--cuts", str(train), "--seconds", "5", "--out", str(tmp_path / "10m.jsonl.gz")])
    assert [c.id for c in load_cuts(tmp_path / "10m.jsonl.gz")] == ["r001", "r007", "r008"]  # 1.1 + 2.5 < 5 <= + 1.9
    cuts_cli.main(["seconds", str(tmp_path / "10m.jsonl.gz")])
    assert capsys.readouterr().out == "5.5\n"
    written = derive_subsets(tmp_path, "toy", labeled_seconds=5, seed=0)
    assert written["labeled"] == tmp_path / "toy_cuts_train_labeled5s.jsonl.gz"
    assert [c.id for c in load_cuts(written["labeled"])] == ["r001", "r007", "r008"]
    cuts_cli.main(["subset", "--cuts", str(train), "--seconds", "5", "--seed", "1",
                   "--out", str(tmp_path / "s1.jsonl.gz")])
    assert [c.id for c in load_cuts(tmp_path / "s1.jsonl.gz")] == ["r006", "r008", "r009"]  # 2.0 + 2.5 < 5 <= + 1.6


def test_combine_concatenates_and_refuses_repeated_cut_ids(tmp_path):
    a, b, out = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz", tmp_path / "out.jsonl.gz"
    _dummy_cuts(3, a)  # r000 r001 r002
    write_cuts(_dummy_cuts(2).modify_ids(lambda cut_id: f"b{cut_id}"), b)
    cuts_cli.main(["combine", "--out", str(out), str(a), str(b)])
    assert [c.id for c in load_cuts(out)] == ["r000", "r001", "r002", "br000", "br001"]

    _dummy_cuts(2, b)  # r000 r001 again
    out.unlink()
    with pytest.raises(SystemExit) as error:
        cuts_cli.main(["combine", "--out", str(out), str(a), str(b)])
    assert str(error.value) == (f"combine: 2 cut id(s) occur more than once in the inputs, e.g. "
                                f"r000 (in {a}, {b}); r001 (in {a}, {b})")
    assert not out.exists()
    with pytest.raises(SystemExit, match=r"combine: 3 cut id\(s\) occur more than once"):
        cuts_cli.main(["combine", "--out", str(out), str(a), str(a)])  # the same manifest twice


def test_exclude_keeps_the_cuts_beyond_a_subset_and_refuses_foreign_ids(tmp_path):
    """train minus its labeled subset: the rest of train, in manifest order, transcripts kept (the
    noisy-student stage measures its pseudo-labels with them)."""
    train, labeled, rest = tmp_path / "train.jsonl.gz", tmp_path / "labeled.jsonl.gz", tmp_path / "rest.jsonl.gz"
    cuts = _dummy_cuts(5, train)
    write_cuts(cuts.subset(cut_ids=["r001", "r003"]), labeled)
    cuts_cli.main(["exclude", "--cuts", str(train), "--ids-of", str(labeled), "--out", str(rest)])
    rest_cuts = load_cuts(rest)
    assert [c.id for c in rest_cuts] == ["r000", "r002", "r004"]
    originals = {c.id: c for c in cuts}
    assert [c.supervisions for c in rest_cuts] == [originals[i].supervisions for i in ("r000", "r002", "r004")]
    with pytest.raises(SystemExit, match=r"exclude: 3 of the 5 ids to leave out are not in the cuts, e.g. r000, r002, r004"):
        cuts_cli.main(["exclude", "--cuts", str(labeled), "--ids-of", str(train), "--out", str(tmp_path / "x.jsonl.gz")])


def test_select_takes_the_cuts_of_another_manifests_ids_and_names_the_missing(tmp_path, capfd):
    """An fbank frontend's labeled subset: the fbank copies of the audio subset's cuts (drawn apart,
    a cut stage 2 lost made two different draws, and the LM read the other one's text)."""
    train, chosen, out = tmp_path / "train.jsonl.gz", tmp_path / "chosen.jsonl.gz", tmp_path / "out.jsonl.gz"
    originals = {c.id: c for c in _dummy_cuts(5, train)}
    write_cuts(CutSet.from_cuts([originals["r003"], originals["r001"]]), chosen)
    cuts_cli.main(["select", "--cuts", str(train), "--ids-of", str(chosen), "--out", str(out)])
    assert [c.id for c in load_cuts(out)] == ["r001", "r003"]  # in the cuts' order
    write_cuts(CutSet.from_cuts(originals[i] for i in ("r000", "r002", "r004")), train)  # r001, r003 lost
    write_cuts(CutSet.from_cuts(originals[i] for i in ("r001", "r002")), chosen)
    cuts_cli.main(["select", "--cuts", str(train), "--ids-of", str(chosen), "--out", str(out)])
    assert [c.id for c in load_cuts(out)] == ["r002"] and "1 of the 2 chosen ids are not in the cuts" in capfd.readouterr().err
    write_cuts(CutSet.from_cuts([originals["r001"]]), chosen)
    with pytest.raises(SystemExit, match="none of the chosen ids"):
        cuts_cli.main(["select", "--cuts", str(train), "--ids-of", str(chosen), "--out", str(out)])


def test_nothing_left_and_no_seconds_are_said_not_written(tmp_path):
    """An empty manifest, which every reader refuses, was written with exit status 0 (exclude of
    every cut, subset --seconds 0); --seconds nan returned everything."""
    train, out = tmp_path / "train.jsonl.gz", tmp_path / "out.jsonl.gz"
    _dummy_cuts(3, train)
    with pytest.raises(SystemExit) as nothing_left:
        cuts_cli.main(["exclude", "--cuts", str(train), "--ids-of", str(train), "--out", str(out)])
    assert nothing_left.value.code == cuts_cli.NOTHING_LEFT == 3 and not out.exists()
    for seconds in ("0", "nan", "-5"):
        with pytest.raises(SystemExit) as refused:
            cuts_cli.main(["subset", "--cuts", str(train), "--seconds", seconds, "--out", str(out)])
        assert refused.value.code == 2 and not out.exists()


def _peak_hz(audio: np.ndarray, sr: int = SR) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(audio)))) * sr / len(audio)


def test_speed_perturbed_copies_resample_audio_and_rescale_supervisions(prepared):
    originals = load_cuts(prepared[1] / "toy_cuts_train.jsonl.gz").to_eager()
    copies = speed_perturbed_copies(originals, [0.9, 1.1])
    assert [c.id for c in copies] == [f"{c.id}_sp{f}" for f in (0.9, 1.1) for c in originals]
    for factor in (0.9, 1.1):
        for cut in originals:
            copy_ = copies[f"{cut.id}_sp{factor}"]
            assert copy_.duration == pytest.approx(cut.duration / factor, abs=1e-3)
            assert copy_.supervisions[0].duration == pytest.approx(cut.supervisions[0].duration / factor, abs=1e-3)
            assert copy_.supervisions[0].text == cut.supervisions[0].text
            audio = copy_.load_audio()  # resampled on load: slower speech, more samples
            assert audio.shape[-1] == copy_.num_samples
            assert abs(audio.shape[-1] - cut.num_samples / factor) <= 2
            # speed, not tempo: the tone's pitch moves by the factor (the fixtures are pure tones)
            assert _peak_hz(audio[0]) == pytest.approx(factor * _peak_hz(cut.load_audio()[0]), rel=0.02)
    for bad in ([1.0], [0.9, 0.9], [0.2], [3.0]):
        with pytest.raises(ValueError, match="speed factors"):
            speed_perturbed_copies(originals, bad)


def test_split_by_speaker_is_disjoint():
    cuts = _dummy_cuts(50)
    rest, dev = split_by_speaker(cuts, 0.34, seed=0)
    rest_spk = {c.supervisions[0].speaker for c in rest}
    dev_spk = {c.supervisions[0].speaker for c in dev}
    assert len(dev_spk) == 2 and not rest_spk & dev_spk
    assert len(rest) + len(dev) == 50
    assert {c.id for c in rest} | {c.id for c in dev} == {c.id for c in cuts}


# ------------------------------------------------------------------ tokenizer
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [t for _, _, t in GOOD.values()] * 3 + ["SEVEN EIGHT NINE TEN", "A BEAR WORLD"]
    return train_tokenizer(texts, tmp_path_factory.mktemp("lang"), vocab_size=30)


def test_tokenizer_ids_and_round_trip(tokenizer):
    assert (tokenizer.blank_id, tokenizer.sos_eos_id, tokenizer.unk_id) == (0, 1, 2)
    assert tokenizer.vocab_size == 30
    ids = tokenizer.encode("HELLO WORLD")
    assert ids and min(ids) > 2
    assert tokenizer.decode(ids) == "HELLO WORLD"
    assert tokenizer.decode([0] + ids + [1]) == "HELLO WORLD"  # blank / sos-eos are not text
    lines = (tokenizer.model_path.parent / "tokens.txt").read_text().splitlines()
    assert lines[:3] == ["<blk> 0", "<sos/eos> 1", "<unk> 2"] and len(lines) == 30
    assert Tokenizer(tokenizer.model_path.parent).vocab_size == 30  # lang dir works too


def test_tokenizer_vocab_too_large_is_softened(tmp_path):
    tok = train_tokenizer(["HELLO WORLD", "GOOD MORNING"], tmp_path, vocab_size=500, model_type="bpe")
    assert 3 < tok.vocab_size < 500 and tok.blank_id == 0
    assert tok.decode(tok.encode("GOOD WORLD")) == "GOOD WORLD"


def test_tokenizer_gives_back_the_transcripts_as_written(tmp_path):
    """Hypotheses are scored against the transcripts themselves: a decoded encoding is the text,
    not its NFKC form (sentencepiece's default made a perfect model score substitutions)."""
    texts = ["CAFE\u0301 AU LAIT", "\uff21\uff22\uff23 ONE TWO", "\u00bd OF THE \ufb01LE"]
    for model_type in ("char", "unigram"):
        tok = train_tokenizer(texts * 3, tmp_path / model_type, vocab_size=30, model_type=model_type)
        assert [tok.decode(tok.encode(text)) for text in texts] == texts


@pytest.mark.parametrize("model_type", ["char", "unigram", "bpe"])
def test_a_tokenizer_trained_again_on_the_same_text_is_the_same_file(tmp_path, model_type):
    """sentencepiece recorded its temporary input and output paths in the model: the same pieces
    trained again were other bytes, and the recipe (which compares bpe.model's digest) refused
    every fine-tuned system and trained the LM again after manifests remade with the same text."""
    texts = ["THE CAT SAT", "ON THE MAT", "A CAT AND A HAT", "THAT IS THE HAT"] * 5
    first = train_tokenizer(texts, tmp_path / "a", vocab_size=24, model_type=model_type)
    train_tokenizer(texts, tmp_path / "b", vocab_size=24, model_type=model_type)
    assert (tmp_path / "a/bpe.model").read_bytes() == (tmp_path / "b/bpe.model").read_bytes()
    assert first.decode(first.encode("THE HAT SAT")) == "THE HAT SAT"


# ------------------------------------------------------------------ loader
def test_waveform_batch(prepared, tokenizer):
    _, out = prepared
    cuts = load_cuts(out / "toy_cuts_train.jsonl.gz")
    dl = make_dataloader(cuts, input_type="waveform", max_duration=1000, shuffle=False, tokenizer=tokenizer)
    batches = list(dl)
    assert len(batches) == 1
    batch = batches[0]
    assert set(batch) == {"inputs", "input_lens", "cut_ids", "texts", "durations", "tokens"}
    assert batch["durations"] == pytest.approx([c.duration for c in cuts])
    expected = {c.id: c.num_samples for c in cuts}
    assert batch["cut_ids"] == [c.id for c in cuts]  # shuffle=False keeps manifest order
    assert batch["inputs"].dtype == torch.float32 and batch["input_lens"].dtype == torch.long
    assert batch["inputs"].shape == (len(KEPT), max(expected.values()))
    assert batch["input_lens"].tolist() == [expected[i] for i in batch["cut_ids"]]
    for row, n in zip(batch["inputs"], batch["input_lens"]):
        assert torch.all(row[n:] == 0) and row[:n].abs().sum() > 0
    assert batch["tokens"][batch["cut_ids"].index("a1")] == tokenizer.encode("HELLO WORLD")
    assert batch["texts"][batch["cut_ids"].index("a1")] == "HELLO WORLD"


def test_transcripts_outside_the_tokenizer_are_reported(prepared, tokenizer, caplog):
    _, out = prepared
    dataset = make_dataloader(load_cuts(out / "toy_cuts_train.jsonl.gz"), input_type="waveform",
                              max_duration=1000, shuffle=False, tokenizer=tokenizer).dataset
    cuts = list(load_cuts(out / "toy_cuts_train.jsonl.gz"))
    with caplog.at_level(logging.WARNING):
        dataset[CutSet.from_cuts(cuts)]
        assert "outside the tokenizer" not in caplog.text
        cuts[0].supervisions[0].text = "hello world"
        batch = dataset[CutSet.from_cuts(cuts)]
    assert tokenizer.unk_id in batch["tokens"][0]
    assert f"1 of {len(cuts)} transcripts have characters outside the tokenizer" in caplog.text
    assert "'hello world'" in caplog.text


def test_empty_transcripts_are_counted_and_several_supervisions_refused(prepared, tokenizer, caplog):
    """An empty transcript was trained on as 'says nothing' without a word; a cut with two
    supervisions had its first transcript alone taken as the whole audio's target or reference."""
    _, out = prepared
    dataset = make_dataloader(load_cuts(out / "toy_cuts_train.jsonl.gz"), input_type="waveform",
                              max_duration=1000, shuffle=False, tokenizer=tokenizer).dataset
    cuts = list(load_cuts(out / "toy_cuts_train.jsonl.gz"))
    cuts[1].supervisions[0].text = ""
    with caplog.at_level(logging.WARNING):
        batch = dataset[CutSet.from_cuts(cuts)]
    assert batch["tokens"][1] == []
    assert f"1 of {len(cuts)} transcripts are empty (no tokens): read as silence, e.g. cut {cuts[1].id}" in caplog.text
    second = copy.deepcopy(cuts[0].supervisions[0])
    second.id, second.text = second.id + "-2", "GENERAL KENOBI"
    cuts[0].supervisions.append(second)
    with pytest.raises(ValueError, match=rf"1 cut\(s\) with several supervisions, e.g. \['{cuts[0].id}'\]"):
        dataset[CutSet.from_cuts(cuts)]


def test_a_transcript_spelling_a_reserved_symbol_is_refused(prepared, tokenizer):
    """sentencepiece reads '<blk>' in a text as its own piece: CTC trained on it as a target blank."""
    _, out = prepared
    dataset = make_dataloader(load_cuts(out / "toy_cuts_train.jsonl.gz"), input_type="waveform",
                              max_duration=1000, shuffle=False, tokenizer=tokenizer).dataset
    cuts = list(load_cuts(out / "toy_cuts_train.jsonl.gz"))
    cuts[1].supervisions[0].text = "HELLO <blk> WORLD"
    assert tokenizer.blank_id in tokenizer.encode("HELLO <blk> WORLD")
    with pytest.raises(ValueError, match=rf"the transcripts of 1 cuts \(e.g. {cuts[1].id}\) spell the tokenizer's"):
        dataset[CutSet.from_cuts(cuts)]


def test_asr_training_on_cuts_without_transcripts_is_a_named_error(prepared, tokenizer):
    from sslasr.train.tasks import _transcripts
    _, out = prepared
    batch = next(iter(make_dataloader(load_cuts(out / "toy_cuts_unlabeled.jsonl.gz"), input_type="waveform",
                                      max_duration=1000, shuffle=False, tokenizer=tokenizer)))
    assert "tokens" not in batch
    with pytest.raises(ValueError, match=rf"{len(batch['cut_ids'])} cut\(s\) of a batch have none, e.g. "
                                         rf"\['{batch['cut_ids'][0]}'"):
        _transcripts(batch)


def test_waveform_normalisation_and_unlabeled(prepared, tokenizer):
    _, out = prepared
    dl = make_dataloader(load_cuts(out / "toy_cuts_unlabeled.jsonl.gz"), input_type="waveform",
                         max_duration=1000, shuffle=False, tokenizer=tokenizer, normalize_waveform=True,
                         num_workers=1)  # the dataset (and tokenizer) must survive pickling
    batch = next(iter(dl))
    assert "tokens" not in batch and batch["texts"] == [None, None]
    x = batch["inputs"][0, : batch["input_lens"][0]]
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-2
    audio = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    assert normalize_waveforms(audio, torch.tensor([3]))[0, 3] == 0  # padding stays zero


def test_fbank_features_and_batch(prepared, tmp_path):
    _, out = prepared
    out_cuts = tmp_path / "toy_cuts_train_fbank.jsonl.gz"
    compute_fbank_cli.main(["--cuts", str(out / "toy_cuts_train.jsonl.gz"), "--out-cuts", str(out_cuts),
                            "--storage", str(tmp_path / "feats"), "--num-jobs", "1"])
    cuts = load_cuts(out_cuts)
    assert [c.id for c in cuts] == [c.id for c in load_cuts(out / "toy_cuts_train.jsonl.gz")]
    assert all(c.has_features for c in cuts)
    batch = next(iter(make_dataloader(cuts, input_type="fbank", max_duration=1000, shuffle=False)))
    frames = {c.id: c.num_frames for c in cuts}
    assert batch["inputs"].shape == (len(KEPT), max(frames.values()), 80)
    assert frames["a1"] == 100 and frames["rate8k"] == 150  # 10 ms shift, 8 kHz resampled first
    # the frames computed from the audio: the last one or two, repeated to lhotse's count, are not
    computed = {c.id: 1 + (round(c.duration * c.sampling_rate) - 400) // 160 for c in cuts}
    assert computed["a1"] == 98 and computed["rate8k"] == 148
    assert batch["input_lens"].tolist() == [computed[i] for i in batch["cut_ids"]]
    with pytest.raises(ValueError, match="compute_fbank"):
        next(iter(make_dataloader(load_cuts(out / "toy_cuts_train.jsonl.gz"), input_type="fbank",
                                  max_duration=1000, shuffle=False)))


def test_fbank_storage_is_named_after_the_whole_manifest_name():
    storage = compute_fbank_cli.storage_for
    names = ["so762_cuts_train_10m_fbank_sp0.9-1.1.jsonl.gz", "so762_cuts_train_10m_fbank_sp0.95-1.05.jsonl.gz",
             "so762_cuts_train_10m_fbank_sp0.9-1.2.jsonl.gz", "so762_cuts_train_10m_fbank.jsonl.gz"]
    paths = [storage("data/fbank", f"data/manifests/{name}") for name in names]
    assert paths == [Path("data/fbank/so762_cuts_train_10m_fbank_sp0.9-1.1"),
                     Path("data/fbank/so762_cuts_train_10m_fbank_sp0.95-1.05"),
                     Path("data/fbank/so762_cuts_train_10m_fbank_sp0.9-1.2"),
                     Path("data/fbank/so762_cuts_train_10m_fbank")]
    assert storage("data/fbank", Path("elsewhere") / names[0]) == paths[0]  # the folder does not matter
    with pytest.raises(ValueError, match="needs a name"):
        storage("data/fbank", "data/manifests/.jsonl.gz")


def test_speed_perturbed_fbank_manifests_keep_their_own_features(prepared, tmp_path):
    fbank = tmp_path / "toy_cuts_train_fbank.jsonl.gz"
    compute_fbank_cli.main(["--cuts", str(prepared[1] / "toy_cuts_train.jsonl.gz"), "--out-cuts", str(fbank),
                            "--storage", str(tmp_path / "feats"), "--num-jobs", "1"])
    outputs = {}
    for factors in (["0.9", "1.1"], ["0.95", "1.05"]):  # the second run must not overwrite the first's archive
        outputs[factors[0]] = tmp_path / f"toy_cuts_train_fbank_sp{'-'.join(factors)}.jsonl.gz"
        cuts_cli.main(["perturb-speed", "--cuts", str(fbank), "--factors", *factors, "--fbank-storage",
                       str(tmp_path / "feats"), "--num-jobs", "1", "--out", str(outputs[factors[0]])])
    archives = {key: {c.features.storage_path for c in load_cuts(path) if "_sp" in c.id}
                for key, path in outputs.items()}
    assert archives == {"0.9": {str(tmp_path / "feats/toy_cuts_train_fbank_sp0.9-1.1.lca")},
                        "0.95": {str(tmp_path / "feats/toy_cuts_train_fbank_sp0.95-1.05.lca")}}
    for cut in load_cuts(outputs["0.9"]):
        assert cut.load_features().shape == (cut.num_frames, 80)
    with pytest.raises(SystemExit, match="perturb-speed: speed factors must be"):  # named, not a traceback
        cuts_cli.main(["perturb-speed", "--cuts", str(fbank), "--factors", "1.0", "--out", str(tmp_path / "x.jsonl.gz")])
    # perturbed again at a factor it has: copies of the same ids (combine refuses those; this kept both)
    with pytest.raises(SystemExit, match=r"perturb-speed: \d+ copies would take ids .* already has"):
        cuts_cli.main(["perturb-speed", "--cuts", str(outputs["0.9"]), "--factors", "0.9", "--out", str(tmp_path / "y.jsonl.gz")])


# ------------------------------------------------------------------ sampler
def _ids(batches):
    return [[c.id for c in b] for b in batches]


def _remaining(sampler):
    """Drain with next(): a `for` loop would call iter() on the lhotse sampler, restarting the epoch."""
    while True:
        try:
            yield next(sampler)
        except StopIteration:
            return


def _sampler(path, **kw):
    args = dict(input_type="waveform", max_duration=8.0, shuffle=True, seed=7, num_buckets=3)
    return make_dataloader(load_cuts(path), **{**args, **kw}).sampler


def test_sampler_resumes_exactly(tmp_path):
    path = tmp_path / "cuts.jsonl.gz"
    _dummy_cuts(60, path)
    reference = _sampler(path)
    reference.set_epoch(2)
    full = _ids(reference)
    assert len(full) > 6

    interrupted = _sampler(path)
    interrupted.set_epoch(2)
    iterator = iter(interrupted)
    head = _ids(next(iterator) for _ in range(4))
    state = copy.deepcopy(interrupted.state_dict())
    assert head == full[:4]

    restored = _sampler(path)
    restored.load_state_dict(state)
    restored.set_epoch(2)  # what a trainer does at the top of the epoch: a no-op here
    assert _ids(restored) == full[4:]

    # The trainer's alternative (exact with prefetching workers): same epoch, skip consumed batches.
    skipping = _sampler(path)
    skipping.set_epoch(2)
    iterator = iter(skipping)
    for _ in range(4):
        next(iterator)
    assert _ids(_remaining(iterator)) == full[4:]

    other_epoch = _sampler(path)
    other_epoch.set_epoch(3)
    assert _ids(other_epoch) != full


@pytest.mark.parametrize("world_size, rank", [(1, 0), (2, 1)])
def test_skip_batches_resumes_mid_epoch_after_exactly_the_consumed_batches(tmp_path, world_size, rank):
    """What the trainer does after a kill: a fresh sampler, the same epoch, N batches skipped."""
    path = tmp_path / "cuts.jsonl.gz"
    _dummy_cuts(60, path)

    def epoch_2():
        sampler = _sampler(path, world_size=world_size, rank=rank)
        sampler.set_epoch(2)
        return sampler

    full = _ids(epoch_2())
    assert len(full) > 5
    for skip in (0, 1, 4, len(full) - 1, len(full), len(full) + 3):
        assert _ids(SkipBatches(epoch_2(), skip)) == full[skip:]
    reused = SkipBatches(epoch_2(), 4)  # each new epoch iterator skips again, from the epoch's start
    assert _ids(reused) == _ids(reused) == full[4:]


def _rank_ids(path, world_size, **kw):
    """The cut ids each rank sees in epoch 1, in order."""
    ranks = []
    for rank in range(world_size):
        sampler = _sampler(path, world_size=world_size, rank=rank, drop_last=False, **kw)
        sampler.set_epoch(1)
        ranks.append([cid for batch in _ids(sampler) for cid in batch])
    return ranks


# lhotse's own split gave (7 cuts, 2 ranks) one and (10 cuts, 3 ranks) two `_dup` copies
@pytest.mark.parametrize("world_size, num_cuts", [(2, 7), (3, 10), (3, 7)])
@pytest.mark.parametrize("max_duration", [3.0, 8.0])
def test_ddp_evaluation_ranks_split_the_cuts_without_duplicates(tmp_path, world_size, num_cuts, max_duration):
    path = tmp_path / "cuts.jsonl.gz"
    all_ids = [c.id for c in _dummy_cuts(num_cuts, path)]
    ranks = _rank_ids(path, world_size, shuffle=False, max_duration=max_duration)
    # rank r: the cuts at indices r, r + W, ... in manifest order, however they fall into batches
    assert ranks == [all_ids[rank::world_size] for rank in range(world_size)]
    assert sorted(cid for rank_ids in ranks for cid in rank_ids) == sorted(all_ids)  # each cut exactly once
    assert not any("_dup" in cid for rank_ids in ranks for cid in rank_ids)


def test_ddp_evaluation_on_one_rank_is_the_manifest_in_order(tmp_path):
    path = tmp_path / "cuts.jsonl.gz"
    all_ids = [c.id for c in _dummy_cuts(7, path)]
    assert _rank_ids(path, 1, shuffle=False, max_duration=3.0) == [all_ids]
    with pytest.raises(ValueError, match="rank 2 is not one of the 2 ranks"):
        _sampler(path, shuffle=False, world_size=2, rank=2)


def test_ddp_training_ranks_get_disjoint_shards(tmp_path):
    path = tmp_path / "cuts.jsonl.gz"
    all_ids = {c.id for c in _dummy_cuts(61, path)}
    shards = []
    for rank in (0, 1):
        sampler = _sampler(path, shuffle=True, world_size=2, rank=rank, drop_last=False)
        sampler.set_epoch(1)
        shards.append(_ids(sampler))
    assert len(shards[0]) == len(shards[1])  # equal steps per rank, so no rank waits forever in DDP's sync
    ids = [[cid for batch in shard for cid in batch] for shard in shards]
    # lhotse gives every rank a batch at the very end by duplicating (and marking) a few cuts.
    originals = [{cid for cid in rank_ids if "_dup" not in cid} for rank_ids in ids]
    duplicates = [cid for rank_ids in ids for cid in rank_ids if "_dup" in cid]
    assert not originals[0] & originals[1]
    assert originals[0] | originals[1] == all_ids
    assert len(duplicates) <= 1 and all(d.split("_dup")[0] in all_ids for d in duplicates)


# ------------------------------------------------------------------ real corpus
@pytest.mark.skipif(not (REAL_CORPUS / "train" / "wav.scp").exists(), reason=f"speechocean762 is not at {REAL_CORPUS}")
def test_real_corpus_few_utterances(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    prepare_cli.main(["--corpus-dir", str(REAL_CORPUS), "--corpus", "so762", "--splits", "train",
                      "--out-dir", str(tmp_path), "--max-utts", "4", "--num-jobs", "1"])
    cuts = CutSet.from_file(tmp_path / "so762_cuts_train.jsonl.gz")
    report = json.loads((tmp_path / "so762_train_validation.json").read_text())
    assert report["total"] == 4 and len(cuts) == report["kept"] > 0
    cut = next(iter(cuts))
    assert cut.supervisions[0].text and cut.supervisions[0].text == cut.supervisions[0].text.upper()
    assert cut.supervisions[0].speaker and Path(cut.recording.sources[0].source).is_absolute()
    assert cut.load_audio().shape[-1] == cut.num_samples


def test_fbank_is_w2v_bert_2s_front_end_at_lhotses_frame_count():
    """An imported w2v-BERT 2.0 sees the features it was trained on: after per-bin normalisation
    (the model's, as the checkpoint's extractor's) ours equal transformers' SeamlessM4T ones frame
    for frame (so pairs stack alike), the last frame repeated to lhotse's frame count; also with
    digital silence and a quiet lead-in, which [-1, 1] samples clamped at the energy floor."""
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(0)
    t = np.arange(int(16000 * 1.234)) / 16000
    audio = (0.1 * np.sin(2 * np.pi * 440 * t * (1 + t)) + 0.02 * rng.standard_normal(len(t))).astype(np.float32)
    hf_fbank = transformers.SeamlessM4TFeatureExtractor(feature_size=80, stride=1)

    def normalised(features):
        return (features - features.mean(0)) / np.sqrt(features.var(0) + 1e-7)

    def theirs_and_ours(samples):
        padded = hf_fbank(samples, sampling_rate=16000, do_normalize_per_mel_bins=False,
                          return_tensors="np")["input_features"][0]
        frames = 1 + (len(samples) - 400) // 160  # the 25 ms windows that fit, 10 ms apart
        assert not padded[frames:].any()  # (zero frames pad it to an even count)
        return padded[:frames], compute_fbank_cli.SeamlessFbank(FbankConfig(num_mel_bins=80)).extract(samples, 16000)

    theirs, ours = theirs_and_ours(audio)
    assert len(theirs) == 121 and len(ours) == 123  # round(1.234 s / 10 ms), lhotse's count
    # the loader's length: transformers' frames (normalised over them alone, as transformers does)
    length = compute_fbank_cli.SeamlessFbank.frames_in(len(audio), 16000)
    assert length == len(theirs)
    normalised_by_model = normalize_fbank_bins(torch.from_numpy(ours)[None], torch.tensor([length]))[0, :length]
    assert np.abs(normalised_by_model.numpy() - (theirs - theirs.mean(0)) / np.sqrt(theirs.var(0, ddof=1) + 1e-7)
                  ).max() < 1e-3
    assert np.abs(normalised(ours[:len(theirs)]) - normalised(theirs)).max() < 1e-3
    assert np.array_equal(ours[-1], ours[-3]) and np.array_equal(ours[-2], ours[-3])
    silence = np.zeros(4800, dtype=np.float32)
    lead_in = (1e-5 * rng.standard_normal(4800)).astype(np.float32)  # -100 dBFS
    for before in (silence, lead_in):
        theirs_q, ours_q = theirs_and_ours(np.concatenate([before, audio]))
        assert np.abs(normalised(ours_q[:len(theirs_q)]) - normalised(theirs_q)).max() < 1e-3
    # Kaldi's default (filters up to 7.6 kHz, frames centred on the shift) is far from them
    kaldi = Fbank(FbankConfig(num_mel_bins=80)).extract(audio, 16000)[1:1 + len(theirs)]
    assert np.abs(normalised(kaldi) - normalised(theirs)).max() > 1.0
    # audio shorter than one window is zero-padded to one (lhotse's extractor failed under 10 ms)
    assert [compute_fbank_cli.SeamlessFbank.frames_in(n, 16000) for n in (100, 400, 559, 560)] == [1, 1, 1, 2]
    for samples, frames in ((300, 2), (100, 1)):
        window = np.zeros(400, dtype=np.float32)
        window[:samples] = audio[:samples]
        short = compute_fbank_cli.SeamlessFbank().extract(audio[:samples], 16000)
        assert short.shape == (frames, 80)
        assert np.allclose(short, compute_fbank_cli.SeamlessFbank().extract(window, 16000)[:1])


def test_fbank_pads_cuts_too_short_for_a_frame_and_says_so(tmp_path, caplog):
    """lhotse counts round(duration / 10 ms) frames and refuses features without any: a 3 ms cut
    (an evaluation split keeps every utterance) stopped the whole split's extraction, and, left
    out, vanished from the scored set of fbank systems."""
    cuts = []
    for samples in (50, 100, 16000):
        path = tmp_path / f"a{samples}.wav"
        sf.write(path, (0.1 * np.random.default_rng(samples).standard_normal(samples)).astype(np.float32), 16000)
        cuts.append(Recording.from_file(path, recording_id=f"a{samples}").to_cut())
    with caplog.at_level("WARNING"):
        kept = compute_fbank_cli.fbank_cuts(CutSet.from_cuts(cuts), tmp_path / "feats", num_jobs=1)
    assert [cut.id for cut in kept] == ["a50", "a100", "a16000"]
    assert [cut.load_features().shape for cut in kept] == [(1, 80), (1, 80), (100, 80)]
    assert "1 of 3 cuts are shorter than half the 10 ms frame shift: padded with silence to one frame: a50" in caplog.text
    # the padded cut keeps its features alone: speed perturbation (stage 5) leaves it out and says so
    with caplog.at_level("WARNING"):
        copies = speed_perturbed_copies(kept, [1.1])
    assert [cut.id for cut in copies] == ["a100_sp1.1", "a16000_sp1.1"]
    assert "1 of 3 cuts have no audio to resample (features alone): no speed-perturbed copies of them, e.g. a50" \
        in caplog.text


def test_fbank_names_the_cuts_whose_audio_failed_to_load(tmp_path, caplog):
    """lhotse leaves out a cut whose audio fails to load: only a count was logged, so a scored set
    lost utterances that no one could name."""
    cuts = []
    for name in ("kept", "gone"):
        path = tmp_path / f"{name}.wav"
        sf.write(path, (0.1 * np.random.default_rng(0).standard_normal(8000)).astype(np.float32), 16000)
        cuts.append(Recording.from_file(path, recording_id=name).to_cut())
    (tmp_path / "gone.wav").write_bytes(b"not audio")
    with caplog.at_level("WARNING"):
        kept = compute_fbank_cli.fbank_cuts(CutSet.from_cuts(cuts), tmp_path / "feats", num_jobs=1)
    assert [cut.id for cut in kept] == ["kept"]
    assert "1 of 2 cuts failed audio loading and have no features (left out): gone" in caplog.text


def test_fbank_models_read_only_the_features_they_were_trained_on(prepared, tokenizer, tmp_path, capsys):
    """data.feature_type: a fine-tuning records its cuts' extractor, refuses valid cuts or a
    pretrained checkpoint of another one, and decoding refuses cuts of another one (Kaldi's
    default fbank, which stage 2 computed before w2v-BERT 2.0's, would decode as nonsense)."""
    from sslasr.bin import decode
    from sslasr.data.loader import check_feature_type
    from sslasr.train.tasks import AsrFinetuneTask
    from sslasr.utils.config import load_config
    seamless = tmp_path / "toy_cuts_train_fbank.jsonl.gz"
    compute_fbank_cli.main(["--cuts", str(prepared[1] / "toy_cuts_train.jsonl.gz"), "--out-cuts", str(seamless),
                            "--storage", str(tmp_path / "feats"), "--num-jobs", "1"])
    kaldi = tmp_path / "toy_cuts_kaldi_fbank.jsonl.gz"
    CutSet.from_cuts(dataclasses.replace(c, features=dataclasses.replace(c.features, type="kaldi-fbank"))
                     for c in load_cuts(seamless)).to_file(kaldi)  # as stage 2 computed them before
    check_feature_type(seamless, "sslasr-seamless-fbank-2", "m")
    with pytest.raises(ValueError, match="holds kaldi-fbank features, but m reads sslasr-seamless-fbank"):
        check_feature_type(kaldi, "sslasr-seamless-fbank-2", "m")
    check_feature_type(kaldi, None, "m")  # a model from before the record: not checked

    frontend = load_config(Path(__file__).resolve().parents[1] / "conf/frontend/w2vbert_tiny.yaml")["frontend"]
    cfg = {"task": "asr", "frontend": frontend, "head": {"name": "ctc"}, "trainer": {},
           "data": {"tokenizer": str(tokenizer.model_path), "train_cuts": str(seamless), "valid_cuts": str(seamless),
                    "max_duration": 100}}
    task = AsrFinetuneTask(copy.deepcopy(cfg))
    assert task.cfg["data"]["feature_type"] == "sslasr-seamless-fbank-2"
    with pytest.raises(ValueError, match="toy_cuts_kaldi_fbank.jsonl.gz holds kaldi-fbank features"):
        AsrFinetuneTask({**cfg, "data": {**cfg["data"], "valid_cuts": str(kaldi)}})
    pretrained = tmp_path / "pretrained.pt"
    torch.save({"model": {f"encoder.{k}": v for k, v in task.model.encoder.state_dict().items()},
                "config": {"data": {"feature_type": "kaldi-fbank"}}}, pretrained)
    with pytest.raises(ValueError, match="pretrained.pt was trained on kaldi-fbank features"):
        AsrFinetuneTask({**cfg, "finetune": {"init_from": str(pretrained)}})

    model = tmp_path / "model.pt"
    torch.save({"model": task.model.state_dict(), "config": task.cfg}, model)
    out = str(tmp_path / "decode_{set}_{method}")
    decode.main(["--model", str(model), "--cuts", f"train={seamless}", "--methods", "ctc_greedy", "--out-dir", out])
    assert (tmp_path / "decode_train_ctc_greedy/hyp.txt").exists()
    with pytest.raises(SystemExit):
        decode.main(["--model", str(model), "--cuts", f"other={kaldi}", "--methods", "ctc_greedy", "--out-dir", out])
    assert "holds kaldi-fbank features" in capsys.readouterr().err
    assert not (tmp_path / "decode_other_ctc_greedy").exists()
    # a cut id twice (manifests concatenated by hand): decoded twice, written and scored once, unsaid
    twice = tmp_path / "twice.jsonl.gz"
    CutSet.from_cuts(list(load_cuts(seamless)) + [next(iter(load_cuts(seamless)))]).to_file(twice)
    with pytest.raises(SystemExit):
        decode.main(["--model", str(model), "--cuts", f"twice={twice}", "--methods", "ctc_greedy", "--out-dir", out])
    assert "twice.jsonl.gz: 1 cut id(s) repeated, e.g. [" in capsys.readouterr().err
    assert not (tmp_path / "decode_twice_ctc_greedy").exists()
    # a cut of two supervisions: scored against the first transcript alone, unsaid
    cuts = list(load_cuts(seamless))
    second = copy.deepcopy(cuts[0].supervisions[0])
    second.id = second.id + "-2"
    cuts[0].supervisions.append(second)
    CutSet.from_cuts(cuts).to_file(twice)
    with pytest.raises(SystemExit):
        decode.main(["--model", str(model), "--cuts", f"twice={twice}", "--methods", "ctc_greedy", "--out-dir", out])
    assert f"twice.jsonl.gz: 1 cut(s) with several supervisions, e.g. ['{cuts[0].id}']" in capsys.readouterr().err

