"""The speechocean762 recipe on the real data (../shared/data/speechocean762), restricted to the
first utterances of each split: stages 0-3, the speaker-disjoint dev/test carve, manifests and
their validation counts, the letter tokenizer, the labeled subsets; plus stage 0's handling of
the OpenSLR release layout and of broken corpus folders (synthetic audio)."""

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from lhotse import CutSet

from recipe_smoke import REPO, dry_run_parameters, run_recipe
from shared_data import shared_data_dir
from sslasr.bin import cuts as cuts_cli
from sslasr.bin.kmeans import training_overrides
from sslasr.bin.train import dry_run
from sslasr.data.kaldi_dir import LayoutError
from sslasr.data.manifests import held_out_speakers
from sslasr.data.pseudo_labels import filter_config
from sslasr.data.speechocean762 import prepare
from sslasr.data.tokenizer import Tokenizer
from sslasr.utils.config import load_configs

SHARED = shared_data_dir() / "speechocean762"
MAX_UTTS = 120  # the first 6 speakers of train (20 utterances each), 120 unlabeled recordings
DATA_OPTS = f"--max-utts {MAX_UTTS} --dev-speakers 2 --test-speakers 1"
needs_corpus = pytest.mark.skipif(not (SHARED / "train" / "wav.scp").is_file(),
                                  reason=f"speechocean762 is not at {SHARED}")


def _table(path: Path) -> dict:
    return dict(line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A copy of the recipe through stages 0-3 on the shared corpus's first utterances."""
    if not (SHARED / "train" / "wav.scp").is_file():
        pytest.skip(f"speechocean762 is not at {SHARED}")
    tmp = tmp_path_factory.mktemp("speechocean762")
    shutil.copytree(REPO / "local", tmp / "local")
    shutil.copytree(REPO / "conf", tmp / "conf")
    shutil.copytree(REPO / "egs" / "speechocean762", tmp / "egs" / "speechocean762",
                    ignore=shutil.ignore_patterns("data", "exp", "downloads"))
    recipe = tmp / "egs" / "speechocean762"
    result = run_recipe(recipe, "--corpus-dir", str(SHARED), "--data-opts", DATA_OPTS, "--stop-stage", "3",
                        timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return recipe


def _first_train_speakers() -> dict:
    """utt -> speaker of the first MAX_UTTS lines of the shared train/wav.scp."""
    utts = [line.split()[0] for line in (SHARED / "train/wav.scp").read_text().splitlines()[:MAX_UTTS]]
    speakers = _table(SHARED / "train/utt2spk")
    return {u: speakers[u].strip() for u in utts}


@needs_corpus
def test_dev_and_test_speakers_are_held_out_of_train(prepared: Path):
    kaldi = prepared / "data/kaldi"
    speakers = {split: set(_table(kaldi / split / "utt2spk").values()) for split in ("train", "dev", "test")}
    assert len(speakers["dev"]) == 2 and len(speakers["test"]) == 1 and len(speakers["train"]) == 3
    assert not speakers["dev"] & speakers["train"] and not speakers["test"] & speakers["train"]
    assert not speakers["dev"] & speakers["test"]
    first = _first_train_speakers()
    assert set().union(*speakers.values()) == set(first.values())
    # the draw is the library's seeded one: dev first, then test
    drawn = held_out_speakers(set(first.values()), 3, seed=0)
    assert speakers["dev"] == set(drawn[:2]) and speakers["test"] == set(drawn[2:])
    per_speaker = Counter(first.values())
    for split in ("train", "dev", "test"):  # whole speakers move, with all their utterances
        utt2spk = _table(kaldi / split / "utt2spk")
        assert len(utt2spk) == sum(per_speaker[s] for s in speakers[split])
        assert all(first[u] == s for u, s in utt2spk.items())
    summary = json.loads((kaldi / "splits.json").read_text())
    assert summary["dev"]["speakers"] == sorted(speakers["dev"]) and summary["options"]["seed"] == 0


@needs_corpus
def test_corpus_is_referenced_not_copied(prepared: Path):
    wav = _table(prepared / "data/kaldi/train/wav.scp")
    assert all(Path(p).is_absolute() and Path(p).is_relative_to(SHARED) and Path(p).is_file() for p in wav.values())
    assert not [p for p in prepared.rglob("*") if p.suffix.lower() in (".flac", ".wav")]
    unlabeled = prepared / "data/kaldi/unlabeled"
    assert len(_table(unlabeled / "wav.scp")) == MAX_UTTS and not (unlabeled / "text").exists()
    assert (prepared / "data/corpus_dir").read_text().strip() == str(prepared / "data/kaldi")


@needs_corpus
def test_manifests_and_validation_counts(prepared: Path):
    manifests = prepared / "data/manifests"
    for split in ("train", "dev", "test", "unlabeled"):
        ids = set(_table(prepared / "data/kaldi" / split / "wav.scp"))
        report = json.loads((manifests / f"speechocean762_{split}_validation.json").read_text())
        assert report["total"] == report["kept"] == len(ids) and report["dropped"] == 0
        assert report["resampled"] == 0  # 16 kHz FLAC as the corpus ships it
        cuts = CutSet.from_file(manifests / f"speechocean762_cuts_{split}.jsonl.gz")
        assert {c.id for c in cuts} == ids and all(c.sampling_rate == 16000 for c in cuts)
        texts = [c.supervisions[0].text for c in cuts]
        assert all(t is None for t in texts) if split == "unlabeled" else all(t and t.isupper() for t in texts)
    train = CutSet.from_file(manifests / "speechocean762_cuts_train.jsonl.gz")
    reference = _table(SHARED / "train/text")
    assert all(c.supervisions[0].text == " ".join(reference[c.id].split()) for c in train)


@needs_corpus
def test_letter_tokenizer_covers_the_transcripts(prepared: Path):
    tokenizer = Tokenizer(prepared / "data/lang_char_40")
    pieces = {tokenizer.sp.id_to_piece(i) for i in range(3, tokenizer.vocab_size)}
    assert all(len(p) == 1 for p in pieces)  # letters, apostrophe and the word boundary
    for cut in CutSet.from_file(prepared / "data/manifests/speechocean762_cuts_train.jsonl.gz"):
        text = cut.supervisions[0].text
        ids = tokenizer.encode(text)
        assert tokenizer.unk_id not in ids and tokenizer.decode(ids) == text


@needs_corpus
def test_labeled_subset_is_whole_utterances_and_deterministic(prepared: Path, tmp_path: Path):
    """What the driver runs for --labeled 90 (seconds): the same whole cuts every time."""
    train = prepared / "data/manifests/speechocean762_cuts_train.jsonl.gz"
    durations = {c.id: c.duration for c in CutSet.from_file(train)}
    for name in ("a", "b"):
        cuts_cli.main(["subset", "--cuts", str(train), "--seconds", "90", "--out", str(tmp_path / f"{name}.jsonl.gz")])
    a, b = (CutSet.from_file(tmp_path / f"{name}.jsonl.gz") for name in ("a", "b"))
    assert [c.id for c in a] == [c.id for c in b]
    assert all(c.duration == durations[c.id] and c.start == 0 for c in a)
    total = sum(c.duration for c in a)
    assert 90 <= total < 90 + max(durations.values())


def _tone(path: Path, seconds: float = 0.6, freq: float = 300.0) -> None:
    t = np.arange(int(seconds * 16000)) / 16000
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.2 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)


def _release(root: Path, speakers=("0001", "0003", "0005", "0007"), with_test: bool = True,
             utt_id=lambda spk, k: f"{spk}{k:05d}") -> Path:
    """The OpenSLR 101 layout: WAVE/SPEAKERxxxx/*.WAV; {train,test}/wav.scp relative to the root."""
    for split, spks in (("train", speakers), ("test", ("0002",) if with_test else ())):
        if not spks:
            continue
        rows = []
        for spk in spks:
            for k in range(2):
                utt = utt_id(spk, k)
                _tone(root / "WAVE" / f"SPEAKER{spk}" / f"{utt}.WAV", freq=200 + 50 * k)
                rows.append((utt, f"WAVE/SPEAKER{spk}/{utt}.WAV", spk))
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / split / "wav.scp").write_text("".join(f"{u}\t{p}\n" for u, p, _ in rows))
        (root / split / "text").write_text("".join(f"{u}\tWE CALL IT BEAR\n" for u, _, _ in rows))
        (root / split / "utt2spk").write_text("".join(f"{u}\t{s}\n" for u, _, s in rows))
    return root


def test_release_layout_keeps_its_own_test_split(tmp_path: Path):
    root = _release(tmp_path / "speechocean762")
    summary = prepare(root, tmp_path / "kaldi", dev_speakers=1)
    assert summary["test"]["speakers"] == ["0002"] and summary["test"]["utterances"] == 2
    assert summary["dev"]["utterances"] == 2 and summary["train"]["utterances"] == 6
    assert summary["options"]["test_speakers"] is None  # nothing carved for test
    wav = _table(tmp_path / "kaldi/train/wav.scp")
    assert all(p.startswith(str(root / "WAVE")) and Path(p).is_file() for p in wav.values())


def test_conflicting_transcripts_are_dropped_and_listed_identical_repeats_read_once(tmp_path: Path, caplog):
    root = _release(tmp_path / "speechocean762", with_test=False)
    with open(root / "train/text", "a") as text:  # 0001: a second, different transcript; 0003: a repeat
        text.write("000100000\tHELLO\n000300001\tWE CALL IT  BEAR\n")
    caplog.set_level(logging.INFO)
    summary = prepare(root, tmp_path / "kaldi", dev_speakers=1, test_speakers=1)
    assert summary["dropped"] == {"train": [{"utt_id": "000100000", "reason": "conflicting_text",
                                             "detail": "2 different transcripts in text: 'WE CALL IT BEAR' vs 'HELLO'"}]}
    assert json.loads((tmp_path / "kaldi/splits.json").read_text())["dropped"] == summary["dropped"]
    written = {u: t for split in ("train", "dev", "test") for u, t in _table(tmp_path / "kaldi" / split / "text").items()}
    assert sorted(written) == ["000100001", "000300000", "000300001", "000500000", "000500001", "000700000", "000700001"]
    assert written["000300001"].strip() == "WE CALL IT BEAR"
    assert "dropped 1 utterance(s): conflicting_text" in caplog.text
    assert "1 identical repeated line(s), each read once" in caplog.text


def test_carve_is_seeded_and_stale_splits_are_removed(tmp_path: Path):
    root = _release(tmp_path / "so", speakers=tuple(f"{i:04d}" for i in range(1, 9)), with_test=False)
    first = prepare(root, tmp_path / "k1", dev_speakers=2, test_speakers=2, seed=0)
    again = prepare(root, tmp_path / "k2", dev_speakers=2, test_speakers=2, seed=0)
    other = prepare(root, tmp_path / "k3", dev_speakers=2, test_speakers=2, seed=3)
    assert first["dev"]["speakers"] == again["dev"]["speakers"] and first["test"]["speakers"] == again["test"]["speakers"]
    assert (first["dev"]["speakers"], first["test"]["speakers"]) != (other["dev"]["speakers"], other["test"]["speakers"])
    (tmp_path / "k1" / "unlabeled").mkdir()  # a split of an earlier run with other options
    prepare(root, tmp_path / "k1", dev_speakers=2, test_speakers=2, seed=0)
    assert not (tmp_path / "k1" / "unlabeled").exists()


def test_dev_is_never_drawn_from_speakers_of_the_unlabeled_audio_and_test_shares_none_with_train(tmp_path: Path):
    """Dev speakers were drawn from train alone: one also in unlabeled/ (trained on) made dev
    optimistic, and a corpus test/ sharing speakers with train/ went through unsaid."""
    speakers = tuple(f"{i:04d}" for i in range(11, 19))  # test/'s is 0002
    root = _release(tmp_path / "so", speakers=speakers)
    free = prepare(root, tmp_path / "k0", dev_speakers=2, seed=0)["dev"]["speakers"]
    unlabeled = root / "unlabeled"
    unlabeled.mkdir()
    (unlabeled / "wav.scp").write_text(f"u1\tWAVE/SPEAKER{free[0]}/{free[0]}00000.WAV\n")
    (unlabeled / "utt2spk").write_text(f"u1\t{free[0]}\n")
    dev = prepare(root, tmp_path / "k1", dev_speakers=2, seed=0)["dev"]["speakers"]
    assert free[0] not in dev and len(dev) == 2
    with open(root / "test/utt2spk", "a") as utt2spk, open(root / "test/wav.scp", "a") as wav, \
            open(root / "test/text", "a") as text:  # a test utterance of a train speaker
        utt2spk.write("t9\t0011\n"), wav.write("t9\tWAVE/SPEAKER0011/001100000.WAV\n"), text.write("t9\tBEAR\n")
    with pytest.raises(LayoutError, match="test/ and train/ share 1 speaker"):
        prepare(root, tmp_path / "k2", dev_speakers=2, seed=0)


def _corpus_id(speaker: str, k: int) -> str:
    return f"0{speaker}{k:04d}"  # speechocean762's: 000010011 is speaker 0001's


def test_unlabeled_audio_without_utt2spk_keeps_its_speakers_out_of_dev_by_their_ids(tmp_path: Path, caplog):
    """The shared unlabeled/ has no utt2spk: its ids name the speakers (as train's do), so a
    speaker whose unlabeled recordings are pretrained on is not held out; ids that do not are said."""
    root = _release(tmp_path / "so", speakers=tuple(f"{i:04d}" for i in range(11, 19)), utt_id=_corpus_id)
    free = prepare(root, tmp_path / "k0", dev_speakers=2, seed=0)["dev"]["speakers"]
    (root / "unlabeled").mkdir()
    audio = f"WAVE/SPEAKER{free[0]}/{_corpus_id(free[0], 0)}.WAV"
    (root / "unlabeled/wav.scp").write_text(f"{_corpus_id(free[0], 99)}\t{audio}\n")
    summary = prepare(root, tmp_path / "k1", dev_speakers=2, seed=0)
    assert free[0] not in summary["dev"]["speakers"] and len(summary["dev"]["speakers"]) == 2
    assert summary["unlabeled"]["speakers"] == [free[0]]
    assert _table(tmp_path / "k1/unlabeled/utt2spk") == {_corpus_id(free[0], 99): free[0]}
    (root / "unlabeled/wav.scp").write_text(f"rec1\t{audio}\n")
    caplog.set_level(logging.WARNING)
    assert prepare(root, tmp_path / "k2", dev_speakers=2, seed=0)["unlabeled"]["speakers"] == []
    assert "unlabeled/: 1 utterance(s) have no speaker" in caplog.text


def test_unlabeled_audio_of_test_speakers_is_left_out_and_speaker_names_are_checked_against_ids(
        tmp_path: Path, caplog):
    """unlabeled/ was checked against train/ only: a test utterance, or another recording of a test
    speaker, went into pretraining; its text.reference was left behind; and a utt2spk naming a speaker otherwise than the ids
    (SPEAKER0005 for 0005) kept a dev speaker's unlabeled audio unseen by the carve."""
    root = _release(tmp_path / "so", speakers=tuple(f"{i:04d}" for i in range(11, 19)), utt_id=_corpus_id)
    free = prepare(root, tmp_path / "k0", dev_speakers=2, seed=0)["dev"]["speakers"]
    (root / "unlabeled").mkdir()
    audio = f"WAVE/SPEAKER{free[0]}/{_corpus_id(free[0], 0)}.WAV"
    rows = [(_corpus_id("0002", 0), "0002"),  # test/'s own utterance
            (_corpus_id("0002", 7), "0002"),  # another recording of test/'s speaker
            (_corpus_id(free[0], 99), f"SPEAKER{free[0]}")]  # a dev speaker of k0, named as the release's folders
    (root / "unlabeled/wav.scp").write_text("".join(f"{u}\t{audio}\n" for u, _ in rows))
    (root / "unlabeled/utt2spk").write_text("".join(f"{u}\t{s}\n" for u, s in rows))
    (root / "unlabeled/text.reference").write_text("".join(f"{u}\tWE CALL IT BEAR {i}\n" for i, (u, _) in enumerate(rows)))
    caplog.set_level(logging.WARNING)
    summary = prepare(root, tmp_path / "k1", dev_speakers=2, seed=0)
    # the pool's reference transcripts go with it (stage 9 scores the pseudo-labels with them), its kept ones only
    assert _table(tmp_path / "k1/unlabeled/text.reference") == {_corpus_id(free[0], 99): "WE CALL IT BEAR 2"}
    assert summary["dropped"]["unlabeled"] == [
        {"utt_id": _corpus_id("0002", 0), "reason": "test_utterance", "detail": "its id is in test/"},
        {"utt_id": _corpus_id("0002", 7), "reason": "test_speaker", "detail": "speaker 0002 is in test/"}]
    assert "unlabeled/: left out 2 utterance(s) of test/'s utterances or speakers" in caplog.text
    assert f"utt2spk names another speaker than the utterance id for 1 utterance(s), e.g. " \
           f"{_corpus_id(free[0], 99)}: SPEAKER{free[0]}, its id says {free[0]}" in caplog.text
    assert _table(tmp_path / "k1/unlabeled/utt2spk") == {_corpus_id(free[0], 99): free[0]}
    assert free[0] not in summary["dev"]["speakers"] and len(summary["dev"]["speakers"]) == 2
    assert summary["test"]["speakers"] == ["0002"]


@pytest.mark.parametrize("breakage, message", [
    ("no_utt2spk", "utt2spk is missing"),
    ("speakerless", "have no speaker"),
    ("wrong_base", "none of its 8 audio paths exists"),
    ("too_many_dev", "cannot hold out 4 of 4 speakers"),
])
def test_broken_corpus_folders_are_named(tmp_path: Path, breakage: str, message: str):
    corpus = tmp_path / "corpus"
    for spk in ("s1", "s2", "s3", "s4"):
        for k in range(2):
            _tone(corpus / "train" / "audio" / f"{spk}_{k}.flac")
    utts = [f"{spk}_{k}" for spk in ("s1", "s2", "s3", "s4") for k in range(2)]
    base = "../audio" if breakage == "wrong_base" else "audio"
    (corpus / "train/wav.scp").write_text("".join(f"{u} {base}/{u}.flac\n" for u in utts))
    (corpus / "train/text").write_text("".join(f"{u} HELLO\n" for u in utts))
    if breakage != "no_utt2spk":
        keep = utts[:-1] if breakage == "speakerless" else utts
        (corpus / "train/utt2spk").write_text("".join(f"{u} {u.split('_')[0]}\n" for u in keep))
    with pytest.raises((LayoutError, ValueError), match=message):
        prepare(corpus, tmp_path / "kaldi", dev_speakers=3 if breakage == "too_many_dev" else 1, test_speakers=1)


# ---------------------------------------------------------------------- configs of every frontend
CONF = REPO / "egs" / "speechocean762" / "conf"
FRONTENDS = ["hubert", "w2vbert", "wav2vec2", "wavlm"]


def _configs(conf: Path, frontend: str, *tail: str) -> list:
    return [conf / f"frontend_{frontend}.yaml", *(conf / name for name in tail)]


@pytest.mark.parametrize("conf_dir", ["conf", "conf/gpu"])
def test_every_conf_dir_has_every_stage(conf_dir: str):
    """The driver reads these per stage: a missing one stops a --conf-dir run mid-way (or, for
    lm.yaml, silently drops the LM)."""
    conf = REPO / "egs" / "speechocean762" / conf_dir
    for name in ("pretrain.yaml", "finetune_ctc.yaml", "finetune_ctc_10m.yaml", "finetune_ctc_1h.yaml",
                 "scratch.yaml", "lm.yaml", "noisy_student.yaml", "frontend_wav2vec2.yaml"):
        assert (conf / name).is_file(), f"{conf_dir}/{name}"


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_cpu_configs_of_every_frontend_dry_run(frontend: str):
    pretrain = load_configs(_configs(CONF, frontend, "pretrain.yaml"))
    assert pretrain["frontend"]["name"] == frontend
    overrides = []
    if pretrain.get("kmeans"):  # the updates of the k-means iterations are pretrain.yaml's budget
        iterations = pretrain["kmeans"]["iterations"]
        assert sum(it["updates"] for it in iterations) == pretrain["trainer"]["max_updates"]
        overrides = training_overrides(pretrain, len(iterations))
    assert "task: pretrain" in dry_run(load_configs(_configs(CONF, frontend, "pretrain.yaml"), overrides), None, world_size=1)
    extra = [f"finetune_{frontend}.yaml"] if (CONF / f"finetune_{frontend}.yaml").exists() else []
    for labeled in ("finetune_ctc_10m.yaml", "finetune_ctc_1h.yaml"):
        for scratch in ([], ["scratch.yaml"]):
            cfg = load_configs(_configs(CONF, frontend, "finetune_ctc.yaml", labeled, *extra, *scratch))
            assert "task: asr" in dry_run(cfg, 40, world_size=1)
            assert bool(cfg["data"].get("spec_augment")) == (frontend == "w2vbert")


def test_gpu_configs_decode_with_the_cpu_recipes_searches():
    """conf/gpu had no decode section: its systems were decoded greedily only, its LM trained and
    never used, and its noisy student labelled greedily."""
    recipe = REPO / "egs/speechocean762/conf"
    searches = ("methods", "lm_methods", "tune")
    cpu, gpu = (load_configs([recipe / d / "finetune_ctc.yaml"])["decode"] for d in (".", "gpu"))
    assert {k: gpu[k] for k in searches} == {k: cpu[k] for k in searches}
    assert load_configs([REPO / "egs/librispeech/conf/finetune_ctc.yaml"])["decode"]["methods"][-1] == "ctc_beam"


def test_gpu_configs_of_w2vbert_are_base_size_and_fine_tune_its_conformer():
    gpu = CONF / "gpu"
    summary = dry_run(load_configs(_configs(gpu, "w2vbert", "pretrain.yaml")), None, world_size=1)
    params = dry_run_parameters(summary)
    assert "frontend: w2vbert" in summary and 90 < params < 100, summary
    for labeled in ("finetune_ctc_10m.yaml", "finetune_ctc_1h.yaml"):
        for scratch in ([], ["scratch.yaml"]):
            cfg = load_configs(_configs(gpu, "w2vbert", "finetune_ctc.yaml", labeled, "finetune_w2vbert.yaml", *scratch))
            assert "task: asr" in dry_run(cfg, 40, world_size=1)
            encoder = cfg["frontend"]["encoder"]
            assert "transformer" not in encoder and encoder["conformer"]["dropout"] == 0.0
            assert cfg["data"]["spec_augment"] and encoder["mask"]["time_prob"] == 0.0


@pytest.mark.parametrize("frontend", ["hubert", "wavlm"])
def test_gpu_configs_of_the_kmeans_frontends_are_base_size(frontend: str):
    gpu = CONF / "gpu"
    cfg = load_configs(_configs(gpu, frontend, "pretrain.yaml"))
    assert cfg["frontend"]["name"] == frontend
    assert sum(it["updates"] for it in cfg["kmeans"]["iterations"]) == cfg["trainer"]["max_updates"]
    summary = dry_run(load_configs(_configs(gpu, frontend, "pretrain.yaml"), training_overrides(cfg, 2)), None, world_size=1)
    params = dry_run_parameters(summary)
    assert 90 < params < 100, summary  # BASE: 95M


def test_noisy_student_filter_at_one_hour_merges_over_the_corpus_settings():
    """The driver merges noisy_student_1h.yaml over noisy_student.yaml at --labeled 1h: the 1 h
    teacher's filter keeps its most confident 30 %, the pool and the rest stay the corpus's."""
    base = load_configs([CONF / "noisy_student.yaml"])["pseudo_label"]
    merged = load_configs([CONF / "noisy_student.yaml", CONF / "noisy_student_1h.yaml"])["pseudo_label"]
    assert filter_config(merged).keep_fraction == 0.3 and filter_config(base).keep_fraction == 0.9
    assert {k: v for k, v in merged.items() if k != "keep_fraction"} == {k: v for k, v in base.items() if k != "keep_fraction"}
    # conf/gpu (--conf-dir), where the driver looks for noisy_student_1h.yaml: the same filter
    gpu = load_configs([CONF / "gpu/noisy_student.yaml", CONF / "gpu/noisy_student_1h.yaml"])["pseudo_label"]
    assert gpu == merged


def test_download_makes_its_folder_unpacks_and_names_a_broken_archive(tmp_path: Path, monkeypatch):
    """Stage 0's download, the network replaced by a local archive: the target folder is made
    (the download does not make it), the release unpacks to a root marked complete, and an
    archive that does not unpack is a LayoutError saying to remove it."""
    import io
    import tarfile
    from sslasr.data import speechocean762 as so762
    release = io.BytesIO()
    with tarfile.open(fileobj=release, mode="w:gz") as tar:
        data = b"utt1 WAVE/utt1.WAV\n"
        info = tarfile.TarInfo("speechocean762/train/wav.scp")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    payload = {"bytes": release.getvalue()}

    def fake_download(url, filename):
        Path(filename).write_bytes(payload["bytes"])  # fails if the folder is missing, as lhotse's
    monkeypatch.setattr(so762, "resumable_download", fake_download)
    root = so762.download(tmp_path / "downloads" / "new")
    assert root == tmp_path / "downloads/new/speechocean762" and (root / ".completed").is_file()
    assert (root / "train/wav.scp").read_bytes() == data
    payload["bytes"] = payload["bytes"][:40]  # cut short
    with pytest.raises(LayoutError, match="does not unpack .*remove it"):
        so762.download(tmp_path / "other")
