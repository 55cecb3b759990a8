"""Tests for the espeak-ng synthetic corpus (sslasr.data.minisynth), on tiny corpora."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sslasr.data import minisynth

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")

SIZES = dict(num_train=20, num_unlabeled=20, num_dev=10, num_test=10)
SPLITS = ("train", "unlabeled", "dev", "test")


def read_kaldi(path: Path) -> dict:
    """Kaldi two-column file -> {utt_id: rest}; also checks the ids are sorted and unique."""
    lines = path.read_text(encoding="utf-8").splitlines()
    keys = [line.split(" ", 1)[0] for line in lines]
    assert keys == sorted(keys) and len(set(keys)) == len(keys), path
    return {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in lines}


def transcripts(corpus: Path, split: str) -> dict:
    name = "text.reference" if split == "unlabeled" else "text"
    return read_kaldi(corpus / split / name)


def load_audio(corpus: Path) -> dict:
    audio = {}
    for split in SPLITS:
        for utt, rel in read_kaldi(corpus / split / "wav.scp").items():
            audio[utt] = sf.read(corpus / split / rel, dtype="int16")[0]
    return audio


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("minisynth") / "corpus"
    info = minisynth.generate_corpus(out, seed=0, num_jobs=2, **SIZES)
    return out, info


def test_kaldi_files_parse_and_agree(corpus):
    out, info = corpus
    for split in SPLITS:
        wav = read_kaldi(out / split / "wav.scp")
        utt2spk = read_kaldi(out / split / "utt2spk")
        text = transcripts(out, split)
        assert len(wav) == SIZES[f"num_{split}"]
        assert wav.keys() == utt2spk.keys() == text.keys()
        for utt, rel in wav.items():
            assert utt.startswith(utt2spk[utt] + "-")  # Kaldi: utt-id starts with spk-id
            assert not Path(rel).is_absolute() and (out / split / rel).is_file()
        for sentence in text.values():
            assert re.fullmatch(r"[A-Z]+( [A-Z]+){2,9}", sentence), sentence  # 3-10 words


def test_unlabeled_hides_transcript(corpus):
    out, _ = corpus
    assert not (out / "unlabeled" / "text").exists()
    reference = read_kaldi(out / "unlabeled" / "text.reference")
    assert reference.keys() == read_kaldi(out / "unlabeled" / "wav.scp").keys()


def test_audio_format_and_duration(corpus):
    out, _ = corpus
    for split in SPLITS:
        text = transcripts(out, split)
        for utt, rel in read_kaldi(out / split / "wav.scp").items():
            info = sf.info(out / split / rel)
            assert (info.samplerate, info.channels) == (16000, 1)
            assert (info.format, info.subtype) == ("FLAC", "PCM_16")
            audio, _ = sf.read(out / split / rel, dtype="float32")
            assert np.sqrt(np.mean(audio ** 2)) > 0.01  # not silent
            assert np.max(np.abs(audio)) < 0.95  # levelled below full scale, no clipping
            # 140-190 wpm speech + at most ~0.75 s of added/espeak silence
            num_words = len(text[utt].split())
            assert 0.15 * num_words < info.duration < 0.7 * num_words + 1.0, (utt, info.duration)


def test_test_split_is_held_out(corpus):
    out, info = corpus
    test_sentences = set(transcripts(out, "test").values())
    for split in ("train", "unlabeled", "dev"):
        assert test_sentences.isdisjoint(transcripts(out, split).values())
    speakers = {s: set(read_kaldi(out / s / "utt2spk").values()) for s in SPLITS}
    assert len(speakers["test"]) == 3
    assert speakers["test"].isdisjoint(speakers["train"] | speakers["unlabeled"] | speakers["dev"])
    assert speakers["unlabeled"] <= speakers["train"]
    assert set(info["voices"]["test"]).isdisjoint(info["voices"]["train"] + info["voices"]["dev"])
    # all sentences are unique across the whole corpus
    all_sentences = [t for s in SPLITS for t in transcripts(out, s).values()]
    assert len(set(all_sentences)) == len(all_sentences)


def test_info_json(corpus):
    out, info = corpus
    assert json.loads((out / "info.json").read_text()) == info
    assert info["seed"] == 0 and info["sizes"]["unlabeled"] == SIZES["num_unlabeled"]
    for split in SPLITS:
        frames = sum(sf.info(out / split / rel).frames
                     for rel in read_kaldi(out / split / "wav.scp").values())
        assert info["seconds"][split] == pytest.approx(frames / 16000, abs=0.01)


def test_vocabulary_is_large_and_covers_transcripts(corpus):
    out, _ = corpus
    vocabulary = minisynth.grammar_vocabulary()
    assert len(vocabulary) >= 300
    assert all(w.isupper() and w.isalpha() for w in vocabulary)
    words = {w for s in SPLITS for t in transcripts(out, s).values() for w in t.split()}
    assert words <= vocabulary


def test_every_template_has_room_for_many_sentences():
    # A tiny template would be used up by the test split, and its words never reach train.
    for templates in minisynth.TEMPLATES.values():
        for template in templates:
            assert minisynth.capacity(template) >= 150, template
    taken = set()
    sentences = minisynth.draw_sentences(0, "train", 20000, taken)
    assert len(set(sentences)) == 20000 and taken == set(sentences)


def test_sentence_draws_are_disjoint_even_when_the_grammar_is_tight(monkeypatch):
    # 30 possible sentences: test takes 10, train must get exactly the other 20.
    monkeypatch.setattr(minisynth, "TEMPLATES", {"d": ["the {a} is {b}"]})
    monkeypatch.setattr(minisynth, "SLOTS", {"a": ["cat", "dog", "cow", "pig", "fox", "owl"],
                                             "b": ["red", "big", "old", "shy", "wet"]})
    taken = set()
    test = minisynth.draw_sentences(0, "test", 10, taken)
    train = minisynth.draw_sentences(0, "train", 20, taken)
    assert len(set(test)) == 10 and len(set(train)) == 20 and set(test).isdisjoint(train)
    with pytest.raises(RuntimeError, match="ran out"):
        minisynth.draw_sentences(0, "dev", 1, taken)


def test_deterministic_across_runs_and_worker_counts(corpus, tmp_path):
    out, _ = corpus
    again = tmp_path / "again"
    minisynth.generate_corpus(again, seed=0, num_jobs=1, **SIZES)
    for split in SPLITS:
        for name in ("wav.scp", "utt2spk", "text.reference" if split == "unlabeled" else "text"):
            assert (out / split / name).read_bytes() == (again / split / name).read_bytes()
    first, second = load_audio(out), load_audio(again)
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[utt], second[utt]) for utt in first)


def test_different_seed_differs(corpus, tmp_path):
    out, _ = corpus
    other = tmp_path / "other"
    minisynth.generate_corpus(other, seed=1, num_jobs=2, **SIZES)
    for split in SPLITS:
        assert transcripts(out, split) != transcripts(other, split)
    first, second = load_audio(out), load_audio(other)
    common = first.keys() & second.keys()
    assert not any(np.array_equal(first[u], second[u]) for u in common)


def test_resume_rebuilds_only_missing_audio(tmp_path):
    sizes = dict(num_train=4, num_unlabeled=4, num_dev=2, num_test=2)
    out = tmp_path / "c"
    minisynth.generate_corpus(out, seed=3, num_jobs=1, **sizes)
    wav = read_kaldi(out / "train" / "wav.scp")
    lost, kept = [out / "train" / rel for rel in list(wav.values())[:2]]
    lost_bytes, kept_mtime = lost.read_bytes(), kept.stat().st_mtime_ns
    # Simulate a run killed mid-split: one file missing, a stale temp file, no .done marker.
    lost.unlink()
    (out / "train" / ".done").unlink()
    stale = lost.parent / f".{lost.name}.abc.tmp.flac"
    stale.write_bytes(b"partial")
    minisynth.generate_corpus(out, seed=3, num_jobs=1, **sizes)
    assert lost.read_bytes() == lost_bytes
    assert kept.stat().st_mtime_ns == kept_mtime  # existing audio was not re-synthesised
    assert not stale.exists()
    # Different options into the same folder must not reuse the old audio (ids are the same).
    minisynth.generate_corpus(out, seed=4, num_jobs=1, **sizes)
    fresh = tmp_path / "fresh"
    minisynth.generate_corpus(fresh, seed=4, num_jobs=1, **sizes)
    assert transcripts(out, "train") == transcripts(fresh, "train")
    reused, regenerated = load_audio(out), load_audio(fresh)
    assert reused.keys() == regenerated.keys()
    assert all(np.array_equal(reused[u], regenerated[u]) for u in reused)


def test_render_adds_noise_only_when_asked():
    base = dict(utt_id="u", speaker="s", text="SET AN ALARM FOR SEVEN THIRTY", voice="en-us+m1",
                rate=160, pitch=50, gain_db=-3.0, lead_s=0.2, trail_s=0.05, noise_seed=(0, 1, 2, 3))
    clean = minisynth.render(minisynth.UttSpec(noise="none", snr_db=0.0, **base))
    noisy = minisynth.render(minisynth.UttSpec(noise="pink", snr_db=10.0, **base))
    lead = int(0.2 * 16000)
    assert np.all(clean[:lead] == 0) and np.std(noisy[:lead]) > 1e-3
    assert len(clean) == len(noisy)
    assert np.max(np.abs(clean)) == pytest.approx(10 ** (-3 / 20), rel=1e-4)


def test_resample_keeps_band_and_removes_aliases():
    t = np.arange(22050 * 2) / 22050
    low = minisynth.resample(np.sin(2 * np.pi * 1000 * t), 22050, 16000)
    assert len(low) == 32000
    expected = np.sin(2 * np.pi * 1000 * np.arange(32000) / 16000)
    assert np.max(np.abs(low[100:-100] - expected[100:-100])) < 1e-3
    high = minisynth.resample(np.sin(2 * np.pi * 10000 * t), 22050, 16000)  # above 8 kHz
    assert np.sqrt(np.mean(high ** 2)) < 1e-3


def test_coloured_noise_spectra():
    rng = np.random.default_rng(0)
    for kind in ("white", "pink", "brown"):
        noise = minisynth.coloured_noise(kind, 16000, rng)
        assert noise.shape == (16000,) and np.sqrt(np.mean(noise ** 2)) == pytest.approx(1, 1e-3)
    power = {k: np.abs(np.fft.rfft(minisynth.coloured_noise(k, 16000, rng))) ** 2
             for k in ("white", "pink", "brown")}
    low_share = {k: p[:800].sum() / p.sum() for k, p in power.items()}  # below 800 Hz
    assert low_share["white"] < low_share["pink"] < low_share["brown"]


def test_missing_espeak_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(minisynth.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="espeak-ng"):
        minisynth.generate_corpus(tmp_path, num_train=1, num_unlabeled=1, num_dev=1, num_test=1)


@pytest.mark.parametrize("option", ["--num-dev", "--num-unlabeled"])
def test_an_empty_split_is_refused_before_anything_is_written(tmp_path: Path, option: str, capsys):
    """--num-dev 0 wrote a wav.scp of one blank line, which stage 1 refused as listing no utterances."""
    with pytest.raises(SystemExit):
        minisynth.main(["--out-dir", str(tmp_path / "corpus"), option, "0"])
    assert f"every split needs at least one utterance: {option} 0" in capsys.readouterr().err
    assert not (tmp_path / "corpus").exists()
