"""Reading Kaldi-style folders (stages 0 and 1): what the files say is read, or refused, or
dropped and counted -- never lost: line breaks, segments, repeated ids, text without audio,
split folders not read, and the duration limits that evaluation splits are exempt from."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from lhotse import CutSet

from sslasr.bin import prepare_manifests as prepare_cli
from sslasr.data.kaldi_dir import LayoutError, read_split, write_split
from sslasr.data.manifests import prepare_split, read_kaldi_split, read_table, split_by_speaker
from sslasr.data.speechocean762 import read_corpus

SR = 16000


def _audio(path: Path, seconds: float) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * SR)) / SR
    sf.write(path, (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), SR)
    return str(path)


def _split(split_dir: Path, seconds: dict, text: str = None, utt2spk: str = None) -> Path:
    """A split folder with one tone per utterance id in `seconds`; text and utt2spk as given."""
    paths = {u: _audio(split_dir / "audio" / f"{u}.wav", s) for u, s in seconds.items()}
    (split_dir / "wav.scp").write_text("".join(f"{u} {p}\n" for u, p in paths.items()))
    if text is not None:
        (split_dir / "text").write_text(text)
    if utt2spk is not None:
        (split_dir / "utt2spk").write_text(utt2spk)
    return split_dir


def _reasons(report_dir: Path, name: str) -> dict:
    rows = (report_dir / f"{name}_dropped.tsv").read_text().splitlines()[1:]
    return {row.split("\t")[0]: row.split("\t")[1] for row in rows}


def test_read_table_ends_lines_at_newline_only_and_drops_the_bom(tmp_path: Path):
    path = tmp_path / "text"
    path.write_bytes("\ufeffa HELLO\u2028WORLD\r\nb ONE\x0cTWO\x1cTHREE\x85FOUR\n\n  c  \nd \tLAST  WORDS \r\n"
                     .encode("utf-8"))
    assert read_table(path) == [("a", "HELLO\u2028WORLD"), ("b", "ONE\x0cTWO\x1cTHREE\x85FOUR"), ("c", ""),
                                ("d", "LAST  WORDS")]


def test_transcript_words_end_one_space_apart(tmp_path: Path):
    """A tab or no-break space inside a transcript is a word boundary to scoring, not to sentencepiece."""
    split = _split(tmp_path / "c" / "train", {"a": 1.0}, text="a HELLO\u00a0WORLD\t AGAIN  NOW\n")
    prepare_split(split, "c", "train", tmp_path / "out", num_jobs=1)
    cuts = CutSet.from_file(tmp_path / "out" / "c_cuts_train.jsonl.gz")
    assert [c.supervisions[0].text for c in cuts] == ["HELLO WORLD AGAIN NOW"]


def test_eval_splits_keep_every_utterance_whatever_its_duration(tmp_path: Path):
    """--max-duration / --min-duration drop training utterances only: a test set is scored whole."""
    seconds = {"short": 0.1, "normal": 1.0, "long": 4.0}
    for split in ("train", "test"):
        _split(tmp_path / "corpus" / split, seconds)
    out = tmp_path / "out"
    prepare_cli.main(["--corpus-dir", str(tmp_path / "corpus"), "--corpus", "c", "--splits", "train", "test",
                      "--eval-splits", "test", "dev", "--out-dir", str(out), "--max-duration", "3",
                      "--num-jobs", "1"])
    assert [c.id for c in CutSet.from_file(out / "c_cuts_train.jsonl.gz")] == ["normal"]
    assert _reasons(out, "c_train") == {"short": "too_short", "long": "too_long"}
    assert sorted(c.id for c in CutSet.from_file(out / "c_cuts_test.jsonl.gz")) == ["long", "normal", "short"]
    assert json.loads((out / "c_test_validation.json").read_text())["dropped"] == 0


def test_segments_files_are_refused_by_both_readers(tmp_path: Path):
    split = _split(tmp_path / "train", {"rec1": 1.0}, text="seg1 HELLO\nseg2 WORLD\n", utt2spk="seg1 s\nseg2 s\n")
    (split / "segments").write_text("seg1 rec1 0.0 0.5\nseg2 rec1 0.5 1.0\n")
    message = f"segments files are not supported: {split / 'segments'}"
    with pytest.raises(ValueError, match=message):
        read_kaldi_split(split)
    with pytest.raises(LayoutError, match=message):
        read_split(split, need_text=True, need_speakers=True)


def test_wav_scp_id_with_different_paths_is_dropped_and_identical_repeats_are_read_once(tmp_path: Path):
    split = _split(tmp_path / "train", {"a": 1.0, "b": 1.0, "c": 1.0}, text="a A\nb B\nc C\n")
    audio = split / "audio"
    (split / "wav.scp").write_text(f"a {audio}/a.wav\nb {audio}/b.wav\na {audio}/c.wav\nb {audio}/b.wav\n"
                                   f"c {audio}/c.wav\n")
    report = prepare_split(split, "c", "train", tmp_path / "out", num_jobs=1)
    assert [c.id for c in CutSet.from_file(tmp_path / "out" / "c_cuts_train.jsonl.gz")] == ["b", "c"]
    # b's identical repeat is read once and counted, not listed as dropped: b is kept
    assert report["dropped_per_reason"] == {"conflicting_audio": 1} and report["repeated_wav_lines"] == 1
    assert report["kept"] + report["dropped"] == report["total"] == 3
    rows = (tmp_path / "out" / "c_train_dropped.tsv").read_text()
    assert f"a\tconflicting_audio\t2 different paths in wav.scp: '{audio}/a.wav' vs '{audio}/c.wav'" in rows


def test_commands_and_archive_offsets_in_wav_scp_are_named_as_such_by_both_readers(tmp_path: Path):
    """An archive offset (utt data.ark:1234) was taken for a file path: reported as missing audio,
    or the whole folder refused for paths relative to the wrong place."""
    split = _split(tmp_path / "train", {"a": 1.0}, text="a A\np P\nk K\nr R\n")
    with open(split / "wav.scp", "a") as wav:
        wav.write("p sox x.flac -t wav - |\nk raw/feats.ark:1234\nr raw/wav.scp:17[0:1600]\n")
    report = prepare_split(split, "c", "train", tmp_path / "out", num_jobs=1)
    assert report["dropped_per_reason"] == {"unsupported_entry": 3} and report["kept"] == 1
    rows = (tmp_path / "out" / "c_train_dropped.tsv").read_text()
    assert "p\tunsupported_entry\tnot a file path (a command, ending in '|'): 'sox x.flac -t wav - |'" in rows
    assert "k\tunsupported_entry\tnot a file path (an offset into a Kaldi archive): 'raw/feats.ark:1234'" in rows
    assert "r\tunsupported_entry\tnot a file path (an offset into a Kaldi archive)" in rows
    with pytest.raises(LayoutError, match=r"3 entries are not file paths, e.g. p 'sox x.flac -t wav - \|' "
                                          r"\(a command, ending in '\|'\): write the audio out as files"):
        read_split(split, need_text=True, need_speakers=False)
    (split / "wav.scp").write_text("k raw/feats.ark:1234\n")
    with pytest.raises(LayoutError, match=r"1 entries are not file paths, e.g. k 'raw/feats.ark:1234' "
                                          r"\(an offset into a Kaldi archive\)"):
        read_split(split, need_text=True, need_speakers=False)


def test_utt2spk_id_repeated_with_another_speaker_is_an_error(tmp_path: Path):
    split = _split(tmp_path / "train", {"a": 1.0, "b": 1.0}, utt2spk="a s1\nb s2\na s1\n")
    assert read_kaldi_split(split).speakers == {"a": "s1", "b": "s2"}  # an identical repeat is harmless
    (split / "utt2spk").write_text("a s1\nb s2\nb s3\n")
    with pytest.raises(ValueError, match=r"utt2spk: 1 utterance id\(s\) repeated with different speakers, e.g. \['b'\]"):
        read_kaldi_split(split)


def test_utt2spk_line_without_a_speaker_is_an_error_in_both_stages(tmp_path: Path):
    """Such lines would make their utterances one speaker "", drawn as one into dev or train."""
    split = _split(tmp_path / "train", {"a": 1.0, "b": 1.0, "c": 1.0}, text="a A\nb B\nc C\n",
                   utt2spk="a s1\nb\nc \t\n")
    with pytest.raises(ValueError, match=r"utt2spk: 2 line\(s\) name no speaker, e.g. \['b', 'c'\]"):
        read_kaldi_split(split)
    with pytest.raises(LayoutError, match=r"utt2spk: 2 line\(s\) name no speaker, e.g. \['b', 'c'\]"):
        read_split(split, need_text=True, need_speakers=True)


def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path: Path):
    path = tmp_path / "text"
    path.write_bytes("a HELLO\nb CAF\u00c9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{path}: not UTF-8 \(line 2, byte 13: invalid continuation byte\)"):
        read_table(path)


def test_dev_fraction_refuses_a_train_split_with_some_speakers_missing(tmp_path: Path):
    """A cut without a speaker counted as its own: one speaker's unnamed utterances fell on
    either side of the split (most seeds put s0 in both)."""
    utt2spk = "".join(f"s{s}_{k} s{s}\n" for s in range(4) for k in range(3) if (s, k) not in ((0, 1), (0, 2)))
    split = _split(tmp_path / "c" / "train", {f"s{s}_{k}": 0.5 for s in range(4) for k in range(3)},
                   text="".join(f"s{s}_{k} HI\n" for s in range(4) for k in range(3)), utt2spk=utt2spk)
    prepare_split(split, "c", "train", tmp_path / "out", num_jobs=1)
    cuts = CutSet.from_file(tmp_path / "out" / "c_cuts_train.jsonl.gz")
    with pytest.raises(ValueError, match=r"2 of 12 utterances have no speaker \(utt2spk\), e.g. \['s0_1', 's0_2'\]"):
        split_by_speaker(cuts, 0.25, seed=0)
    rest, dev = split_by_speaker(cuts.filter(lambda c: c.id not in ("s0_1", "s0_2")), 0.25, seed=0)
    assert len(dev) == 3 and len({c.supervisions[0].speaker for c in dev}) == 1


def test_stage_0_reads_identical_repeated_lines_once_as_stage_1_does(tmp_path: Path, caplog):
    """Kaldi folders concatenated with cat repeat lines: stage 0 refused what stage 1 reads."""
    split = _split(tmp_path / "train", {"a": 1.0, "b": 1.0}, text="a A\nb B\n", utt2spk="a s1\nb s2\na s1\n")
    with open(split / "wav.scp", "a") as wav:
        wav.write(f"b {split / 'audio' / 'b.wav'}\n")
    caplog.set_level(logging.WARNING)
    utterances = read_split(split, need_text=True, need_speakers=True)
    assert [(u.utt_id, u.speaker) for u in utterances] == [("a", "s1"), ("b", "s2")]
    assert "wav.scp: 1 identical repeated line(s), each read once" in caplog.text
    (split / "utt2spk").write_text("a s1\nb s2\nb s3\n")
    with pytest.raises(LayoutError, match=r"utt2spk: 1 utterance id\(s\) repeated with different values, e.g. \['b'\]"):
        read_split(split, need_text=True, need_speakers=True)


def test_stage_0_lists_text_without_audio_and_writes_no_text_line_for_an_utterance_without_one(
        tmp_path: Path, caplog):
    split = _split(tmp_path / "in" / "train", {"a": 1.0, "b": 1.0, "e": 1.0, "r": 1.0},
                   text="a HELLO\ne\nx NO AUDIO\nr HELLO <blk> THERE\n")
    dropped = []
    caplog.set_level(logging.WARNING)
    utterances = read_split(split, need_text=True, need_speakers=False, dropped=dropped)
    assert [(d.utt_id, d.reason) for d in dropped] == [("x", "text_without_audio")]
    assert "dropped 1 line(s): text_without_audio" in caplog.text
    write_split(tmp_path / "out" / "train", utterances)
    assert (tmp_path / "out" / "train" / "text").read_text() == "a HELLO\ne \nr HELLO <blk> THERE\n"  # e's is empty
    report = prepare_split(tmp_path / "out" / "train", "c", "train", tmp_path / "manifests", num_jobs=1)
    # r's <blk> would be a CTC blank among its targets
    assert _reasons(tmp_path / "manifests", "c_train") == {"b": "missing_text", "e": "empty_text", "r": "reserved_symbol"}
    assert report["kept"] == 1


def test_speechocean762_names_the_split_folders_it_does_not_read(tmp_path: Path, caplog):
    corpus = tmp_path / "corpus"
    _split(corpus / "train", {f"u{i}": 0.5 for i in range(4)}, text="".join(f"u{i} HI\n" for i in range(4)),
           utt2spk="".join(f"u{i} s{i}\n" for i in range(4)))
    _split(corpus / "dev", {"d": 0.5}, text="d HI\n")
    (corpus / "resource").mkdir()  # not a split folder: not named
    caplog.set_level(logging.WARNING)
    splits, _ = read_corpus(corpus)
    assert list(splits) == ["train"]
    assert "ignoring the split folder(s) dev/: only train/, unlabeled/ and test/ are read" in caplog.text
    assert "resource" not in caplog.text
