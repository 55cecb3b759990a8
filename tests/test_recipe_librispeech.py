"""The LibriSpeech recipe without the network: a tiny espeak-ng fixture in LibriSpeech's and
Libri-Light's on-disk layouts (plus a MUSAN noise file) through stages 0-3, and a dry run of
every config in egs/librispeech/conf checked against the published batch sizes."""

import json
import random
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from lhotse import CutSet, MonoCut, Recording

from recipe_smoke import REPO, dry_run_parameters, run_recipe
from sslasr.bin.kmeans import training_overrides
from sslasr.bin.train import dry_run
from sslasr.data.pseudo_labels import filter_config
from sslasr.data.kaldi_dir import LayoutError
from sslasr.data.loader import make_sampler
from sslasr.data.librispeech import finetuning_folds, prepare as prepare_librispeech_splits, prepare_noise
from sslasr.data.minisynth import resample, run_espeak
from sslasr.data.tokenizer import Tokenizer
from sslasr.train.config_check import ConfigError
from sslasr.utils.config import load_configs

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")

CONF = REPO / "egs" / "librispeech" / "conf"
SR = 16000
# part -> {speaker-chapter: [transcripts]}, LibriSpeech style (upper case, apostrophes)
PARTS = {
    "train-clean-100": {"19-198": ["NORTHANGER ABBEY WAS A HOUSE", "SHE HAD NEVER READ IT"],
                        "26-495": ["THE RIVER RAN QUIETLY", "HE DIDN'T LOOK BACK"]},
    "train-other-500": {"20-205": ["A STORM CAME OVER THE HILLS", "WE WAITED FOR THE MORNING"]},
    "dev-other": {"116-288045": ["THE CANDLE BURNED LOW", "NOBODY ANSWERED THE DOOR"]},
    "test-clean": {"1089-134686": ["HE HOPED THERE WOULD BE STEW", "THE WIND WAS COLD"]},
}
# Libri-Light's folds reuse LibriSpeech utterances: fold path -> utterance ids
FOLDS = {"1h/0/clean": ["19-198-0000"], "1h/0/other": ["20-205-0001"], "1h/1/clean": ["26-495-0000"],
         "9h/clean": ["19-198-0001"]}
FLAT = {f"{sc}-{i:04d}": (part, text) for part, chapters in PARTS.items()
        for sc, texts in chapters.items() for i, text in enumerate(texts)}


def _speech(text: str, index: int) -> np.ndarray:
    audio, sr = run_espeak(text, "en-us+m1" if index % 2 else "en-gb-x-rp+f1", 170, 50)
    return resample(audio, sr, SR)


def _write_chapter(folder: Path, speaker_chapter: str, utts: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{speaker_chapter}.trans.txt").write_text("".join(f"{u} {t}\n" for u, t in utts.items()))


def make_fixture(root: Path) -> Path:
    """root/LibriSpeech/<part>/<spk>/<chapter>/*.flac + trans.txt, root/librispeech_finetuning/
    with the fold layout, root/musan/noise/ with one 25 s noise file."""
    for index, (utt, (part, text)) in enumerate(FLAT.items()):
        speaker, chapter, _ = utt.split("-")
        folder = root / "LibriSpeech" / part / speaker / chapter
        folder.mkdir(parents=True, exist_ok=True)
        sf.write(folder / f"{utt}.flac", _speech(text, index), SR, format="FLAC", subtype="PCM_16")
    for part, chapters in PARTS.items():
        for sc, texts in chapters.items():
            speaker, chapter = sc.split("-")
            _write_chapter(root / "LibriSpeech" / part / speaker / chapter, sc,
                           {f"{sc}-{i:04d}": t for i, t in enumerate(texts)})
    for fold, utts in FOLDS.items():
        for utt in utts:
            speaker, chapter, _ = utt.split("-")
            part = FLAT[utt][0]
            folder = root / "librispeech_finetuning" / fold / speaker / chapter
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / "LibriSpeech" / part / speaker / chapter / f"{utt}.flac", folder)
            trans = folder / f"{speaker}-{chapter}.trans.txt"
            with trans.open("a") as f:
                f.write(f"{utt} {FLAT[utt][1]}\n")
    noise = root / "musan" / "noise" / "free-sound"
    noise.mkdir(parents=True)
    sf.write(noise / "noise-free-sound-0000.wav",
             0.1 * np.random.default_rng(0).standard_normal(25 * SR).astype(np.float32), SR)
    return root


def fold_ids(*folds: str) -> set:
    return {u for fold in folds for u in FOLDS[fold]}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The recipe (copied) through stages 0-3 on the fixture, MUSAN included."""
    tmp = tmp_path_factory.mktemp("librispeech")
    corpus = make_fixture(tmp / "corpus")
    shutil.copytree(REPO / "local", tmp / "local")
    shutil.copytree(REPO / "conf", tmp / "conf")
    shutil.copytree(REPO / "egs" / "librispeech", tmp / "egs" / "librispeech",
                    ignore=shutil.ignore_patterns("data", "exp", "downloads"))
    recipe = tmp / "egs" / "librispeech"
    parts = "train-clean-100,train-other-500,dev-other,test-clean"
    result = run_recipe(recipe, "--corpus-dir", str(corpus), "--data-opts", f"--parts {parts} --musan true",
                        "--stop-stage", "3", timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return recipe


def test_incomplete_librilight_folds_are_named_in_warnings(tmp_path: Path, caplog):
    """Folds other than 1h/0-5, or no 9h/, still give splits (a fixture has two folds), said."""
    for fold in ("1h/0", "1h/1"):
        (tmp_path / fold).mkdir(parents=True)
    with caplog.at_level("WARNING"):
        splits = finetuning_folds(tmp_path)
    assert sorted(splits) == ["train_10m", "train_1h"]
    assert "holds the folds ['0', '1'], Libri-Light's six are 0-5" in caplog.text
    assert "has no 9h/: --labeled 10h will be a random subset" in caplog.text
    for fold in ("1h/2", "1h/3", "1h/4", "1h/5", "9h"):
        (tmp_path / fold).mkdir(parents=True)
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert len(finetuning_folds(tmp_path)["train_10h"]) == 7
    assert caplog.text == ""


def _kaldi_ids(recipe: Path, split: str) -> set:
    return {line.split()[0] for line in (recipe / "data/kaldi" / split / "wav.scp").read_text().splitlines()}


def test_kaldi_splits_follow_librispeech_and_librilight(prepared: Path):
    kaldi = prepared / "data/kaldi"
    assert sorted(p.name for p in kaldi.iterdir() if p.is_dir()) == [
        "dev_other", "test_clean", "train", "train_100h", "train_10h", "train_10m", "train_1h"]
    train_ids = {u for u, (part, _) in FLAT.items() if part.startswith("train")}
    assert _kaldi_ids(prepared, "train") == train_ids
    assert _kaldi_ids(prepared, "train_100h") == {u for u, (p, _) in FLAT.items() if p == "train-clean-100"}
    assert _kaldi_ids(prepared, "train_10m") == fold_ids("1h/0/clean", "1h/0/other")
    assert _kaldi_ids(prepared, "train_1h") == fold_ids("1h/0/clean", "1h/0/other", "1h/1/clean")
    assert _kaldi_ids(prepared, "train_10h") == set().union(*(fold_ids(f) for f in FOLDS))
    assert _kaldi_ids(prepared, "dev_other") == {"116-288045-0000", "116-288045-0001"}
    text = dict(line.split(" ", 1) for line in (kaldi / "train/text").read_text().splitlines())
    assert text == {u: FLAT[u][1] for u in train_ids}
    speakers = dict(line.split() for line in (kaldi / "train/utt2spk").read_text().splitlines())
    assert speakers == {u: u.split("-")[0] for u in train_ids}
    for line in (kaldi / "train_10m/wav.scp").read_text().splitlines():  # the fold's own copies, by absolute path
        utt, path = line.split()
        assert Path(path).is_absolute() and "librispeech_finetuning/1h/0/" in path and Path(path).is_file()
    assert (prepared / "data/corpus_dir").read_text().strip() == str(kaldi)


def test_manifests_validation_and_labeled_splits(prepared: Path):
    manifests = prepared / "data/manifests"
    for split in ("train", "train_100h", "train_10h", "train_1h", "train_10m", "dev_other", "test_clean"):
        report = json.loads((manifests / f"librispeech_{split}_validation.json").read_text())
        assert report["kept"] == report["total"] == len(_kaldi_ids(prepared, split)) and report["dropped"] == 0
    # the driver's --labeled 10m reads exactly this file instead of drawing a random subset
    cuts = CutSet.from_file(manifests / "librispeech_cuts_train_10m.jsonl.gz")
    assert {c.id for c in cuts} == fold_ids("1h/0/clean", "1h/0/other")
    assert {c.id: c.supervisions[0].text for c in cuts} == {u: FLAT[u][1] for u in fold_ids("1h/0/clean", "1h/0/other")}
    assert all(c.sampling_rate == SR and c.duration > 0.5 for c in cuts)


def test_labeled_split_of_the_corpus_is_never_replaced_by_a_draw(prepared: Path, tmp_path: Path):
    """--labeled 10m reads Libri-Light's fold even under --force (it used to be overwritten by a
    seeded draw from the 960 h); an amount without such a split is a draw from train."""
    for part in ("local", "conf"):
        shutil.copytree(prepared.parents[1] / part, tmp_path / part)
    recipe = tmp_path / "egs" / "librispeech"
    shutil.copytree(prepared, recipe, ignore=shutil.ignore_patterns("exp"))  # data/ too: the manifests
    manifests = recipe / "data/manifests"
    fold = (manifests / "librispeech_cuts_train_10m.jsonl.gz").read_bytes()
    # fine-tuning stops at its config check: the labeled cuts are chosen before it
    stop = ("--stage", "5", "--stop-stage", "5", "--force", "true", "--no-pretrain", "true",
            "--finetune-opts", "optim.not_an_option=1")
    result = run_recipe(recipe, "--labeled", "10m", *stop, timeout=300)
    assert "optim: unknown keys ['not_an_option']" in result.stderr, result.stderr[-3000:]
    assert "--labeled 10m: the corpus's split train_10m" in result.stderr
    assert (manifests / "librispeech_cuts_train_10m.jsonl.gz").read_bytes() == fold
    result = run_recipe(recipe, "--labeled", "4", *stop, timeout=300)
    assert "optim: unknown keys ['not_an_option']" in result.stderr, result.stderr[-3000:]
    drawn = CutSet.from_file(manifests / "librispeech_cuts_train_4.jsonl.gz")
    train_ids = {u for u, (part, _) in FLAT.items() if part.startswith("train")}
    assert len(drawn) >= 1 and {c.id for c in drawn} <= train_ids


def test_tokenizer_is_letters(prepared: Path):
    tokenizer = Tokenizer(prepared / "data/lang_char_40")
    pieces = {tokenizer.sp.id_to_piece(i) for i in range(3, tokenizer.vocab_size)}
    assert "'" in pieces and {"N", "O", "R", "T", "H"} <= pieces and all(len(p) == 1 for p in pieces)
    assert tokenizer.decode(tokenizer.encode("HE DIDN'T LOOK BACK")) == "HE DIDN'T LOOK BACK"


def test_musan_noise_is_cut_into_windows(prepared: Path):
    cuts = CutSet.from_file(prepared / "data/noise/musan_cuts.jsonl.gz")
    assert sorted(round(c.duration, 3) for c in cuts) == [5.0, 10.0, 10.0]  # 25 s in 10 s windows
    # by absolute path (read from exp/ too), in id order (the mixing picks noise by its place in the file)
    assert all(Path(c.recording.sources[0].source).is_absolute() for c in cuts)
    assert [c.id for c in cuts] == sorted(c.id for c in cuts)


def test_labeled_folds_of_parts_not_prepared_are_left_out_and_unpaired_files_counted(prepared: Path, tmp_path: Path,
                                                                                      caplog):
    """With --parts short of train-other-500, Libri-Light's folds kept its utterances: a labeled
    split held ids train did not (stage 9's pool, the rest of train, stopped on them). Transcript
    lines without audio, and audio without a line, were left out by lhotse without a count."""
    corpus = prepared.parents[1] / "corpus"
    copy = tmp_path / "corpus"
    shutil.copytree(corpus / "librispeech_finetuning", copy / "librispeech_finetuning")
    shutil.copytree(corpus / "LibriSpeech" / "train-clean-100", copy / "LibriSpeech" / "train-clean-100")
    chapter = copy / "LibriSpeech/train-clean-100/19/198"
    (chapter / "19-198-0001.flac").rename(chapter / "19-198-0009.flac")  # a line without audio, audio without a line
    with caplog.at_level("WARNING"):
        counts = prepare_librispeech_splits(copy, tmp_path / "out", ["train-clean-100"])
    assert counts["train"] == 3 and counts["train_10m"] == 1 and counts["train_1h"] == 2
    assert _ids(tmp_path / "out/train_10m") == fold_ids("1h/0/clean")  # 20-205-0001 is train-other-500's
    assert "train_10m: 1 of its 2 utterances are of LibriSpeech parts not prepared (--parts): left out" in caplog.text
    assert "train_10h: 2 of its 4 utterances" in caplog.text  # 19-198-0001's audio is gone too
    assert "train-clean-100: 1 of its 4 transcript lines have no audio file: left out" in caplog.text
    assert "train-clean-100: 1 of its 4 .flac files have no transcript line: left out" in caplog.text


def _ids(split_dir: Path) -> set:
    return {line.split()[0] for line in (split_dir / "wav.scp").read_text().splitlines()}


def test_noise_pieces_under_a_second_are_left_out_and_counted(tmp_path: Path, caplog, monkeypatch):
    noise = tmp_path / "musan" / "noise" / "free-sound"
    noise.mkdir(parents=True)
    for name, seconds in (("noise-free-sound-0000", 20.4), ("noise-free-sound-0001", 0.5)):
        sf.write(noise / f"{name}.wav", 0.1 * np.ones(int(seconds * SR), dtype=np.float32), SR)
    monkeypatch.chdir(tmp_path)  # the recipe's default --corpus-dir is relative (downloads)
    with caplog.at_level("INFO"):
        kept = prepare_noise(Path("musan"), tmp_path / "noise.jsonl.gz")
    cuts = CutSet.from_file(tmp_path / "noise.jsonl.gz")
    assert kept == 2 and sorted(c.duration for c in cuts) == [10.0, 10.0]
    assert all(c.recording.sources[0].source == str(noise / "noise-free-sound-0000.wav") for c in cuts)
    assert "2 of 4 pieces under 1 s" in caplog.text


def test_missing_parts_and_folders_are_clear_errors(tmp_path: Path):
    with pytest.raises(LayoutError, match="no LibriSpeech/ folder"):
        prepare_librispeech_splits(tmp_path, tmp_path / "out", ["dev-clean"])
    (tmp_path / "LibriSpeech").mkdir()
    with pytest.raises(LayoutError, match=r"no folder for \['dev-clean'\]"):
        prepare_librispeech_splits(tmp_path, tmp_path / "out", ["dev-clean"])
    with pytest.raises(ValueError, match="unknown LibriSpeech parts"):
        prepare_librispeech_splits(tmp_path, tmp_path / "out", ["dev_clean"])


def _frontends():
    return sorted(p.stem.removeprefix("frontend_") for p in CONF.glob("frontend_*.yaml"))


def _pretrain_configs(frontend: str):
    configs = [CONF / f"frontend_{frontend}.yaml", CONF / "pretrain.yaml"]
    if (CONF / f"pretrain_{frontend}.yaml").exists():
        configs.append(CONF / f"pretrain_{frontend}.yaml")
    return configs


def test_wavlm_without_its_noise_manifest_stops_at_the_kmeans_plan(tmp_path: Path, monkeypatch, capsys):
    """The manifest was first read when pretraining started, after the k-means fits and labels."""
    from sslasr.bin import kmeans
    monkeypatch.chdir(tmp_path)  # the recipe's dir, without data/noise/
    args = ["plan", "--count", "--config", *map(str, _pretrain_configs("wavlm"))]
    with pytest.raises(SystemExit, match="noise_cuts: data/noise/musan_cuts.jsonl.gz does not exist"):
        kmeans.main(args)
    kmeans.main([*args, "--set", "pretrain.utterance_mixing.noise_cuts=null"])  # synthetic noise
    assert capsys.readouterr().out.strip() == "2"


@pytest.mark.parametrize("frontend", _frontends())
def test_dry_run_pretraining_configs(frontend: str):
    configs = _pretrain_configs(frontend)
    cfg = load_configs(configs)
    # what the driver adds for a k-means iteration (HuBERT / WavLM targets): here the last one
    overrides = training_overrides(cfg, len(cfg["kmeans"]["iterations"])) if cfg.get("kmeans") else []
    summary = dry_run(load_configs(configs, overrides), None, world_size=8)
    assert "task: pretrain" in summary and f"frontend: {frontend}" in summary
    params = dry_run_parameters(summary)
    assert 90 < params < 100  # base size: 95M
    # fairseq: wav2vec 2.0 BASE 64 GPUs × 87.5 s; HuBERT / WavLM BASE 32 GPUs × 87.5 s;
    # w2v-BERT on wav2vec 2.0's schedule
    expected = 2800 if frontend in ("hubert", "wavlm") else 5600
    assert f"batch per update: {expected} s" in summary


LABELED_AMOUNTS = sorted(p.stem.removeprefix("finetune_ctc_") for p in CONF.glob("finetune_ctc_*.yaml")
                         if not any(f"_{frontend}_" in p.stem for frontend in _frontends()))


@pytest.mark.parametrize("labeled", LABELED_AMOUNTS)
def test_dry_run_finetuning_configs(labeled: str):
    configs = [CONF / "frontend_wav2vec2.yaml", CONF / "finetune_ctc.yaml", CONF / f"finetune_ctc_{labeled}.yaml"]
    summary = dry_run(load_configs(configs), 31, world_size=2)
    assert "task: asr" in summary and "batch per update: 1600 s" in summary  # fairseq: 3.2M samples × 2 GPUs × 4
    published = {"10m": (13000, 5e-05), "1h": (13000, 5e-05), "10h": (20000, 5e-05), "100h": (80000, 3e-05),
                 "all": (320000, 1e-05)}[labeled]
    assert f"updates: {published[0]}, peak lr {published[1]}" in summary


@pytest.mark.parametrize("frontend", _frontends())
def test_training_shuffles_all_of_960_hours(frontend: str):
    """lhotse's default buffer (20,000 cuts) would shuffle the speaker-sorted 960 h only within a
    window (tests/test_data.py): pretraining and --labeled all hold every one of its 281,241 cuts."""
    for configs in (_pretrain_configs(frontend), [CONF / f"frontend_{frontend}.yaml", CONF / "finetune_ctc.yaml",
                                                  CONF / "finetune_ctc_all.yaml"]):
        assert load_configs(configs)["data"]["buffer_size"] >= 281241


@pytest.mark.parametrize("labeled, seconds", [("10m", 600), ("1h", 3600), ("10h", 36000)])
def test_small_labeled_splits_fill_their_batches(labeled: str, seconds: int):
    """Each batch comes from one duration bucket: 10 minutes in 30 buckets made batches of one or
    two utterances (28 s where max_duration is 200), an update a third of fairseq's audio."""
    cfg = load_configs([CONF / "frontend_wav2vec2.yaml", CONF / "finetune_ctc.yaml", CONF / f"finetune_ctc_{labeled}.yaml"])
    data, rng = cfg["data"], random.Random(0)
    durations = []
    while sum(durations) < seconds:  # Libri-Light's segments: 1-35 s, about 12 s on average
        durations.append(round(min(35.0, max(1.0, rng.gauss(12.5, 5.0))), 2))
    cuts = CutSet.from_cuts(MonoCut(f"u{i}", 0.0, d, 0, recording=Recording(f"u{i}", [], 16000, int(d * 16000), d))
                            for i, d in enumerate(durations))
    for rank in range(2):  # the configs' two GPUs
        sampler = make_sampler(cuts, max_duration=data["max_duration"], shuffle=True, num_buckets=data["num_buckets"],
                               world_size=2, rank=rank)
        batches = [sum(c.duration for c in batch) for batch in sampler]
        per_update = statistics.mean(batches) * cfg["trainer"]["accum_grad"] * 2
        # fairseq: 1600 s (all of 10m); lhotse's buckets fill 65-85 % of max_duration at 1 h and up
        assert per_update > 0.5 * min(seconds, 1600), (labeled, batches)


@pytest.mark.parametrize("frontend", _frontends())
def test_dry_run_finetuning_other_frontends_and_scratch(frontend: str):
    own = [CONF / f"finetune_{frontend}.yaml"] if (CONF / f"finetune_{frontend}.yaml").exists() else []
    for labeled in ("10m", "10h", "all"):  # in the driver's order: the frontend's own settings last but scratch
        own_here = [path for path in [CONF / f"finetune_ctc_{frontend}_{labeled}.yaml"] if path.exists()]
        configs = [CONF / f"frontend_{frontend}.yaml", CONF / "finetune_ctc.yaml", CONF / f"finetune_ctc_{labeled}.yaml",
                   *own, *own_here, CONF / "scratch.yaml"]
        cfg = load_configs(configs)
        assert cfg["finetune"]["freeze_feature_extractor"] is False and cfg["finetune"]["freeze_encoder_updates"] == 0
        assert "task: asr" in dry_run(cfg, 31, world_size=2)
        encoder = cfg["frontend"]["encoder"]
        if frontend == "w2vbert":  # the wav2vec 2.0 settings replaced by the Conformer's, span masks by SpecAugment
            assert "transformer" not in encoder and "dropout_input" not in encoder
            assert encoder["conformer"]["layerdrop"] == 0.1 and encoder["mask"]["time_prob"] == 0.0
            assert cfg["data"]["spec_augment"]["features_mask_size"] == 27
        else:
            assert encoder["transformer"]["layerdrop"] == (0.05 if labeled == "10h" and not own_here else 0.1)


def test_hubert_fine_tunes_on_10_hours_with_its_own_published_settings():
    """HuBERT and WavLM were fine-tuned with wav2vec 2.0's settings at every amount; fairseq
    publishes HuBERT's for 10 h (examples/hubert/config/finetune/base_10h.yaml)."""
    configs = [CONF / "frontend_hubert.yaml", CONF / "finetune_ctc.yaml", CONF / "finetune_ctc_10h.yaml",
               CONF / "finetune_ctc_hubert_10h.yaml"]  # the driver's order (finetune_configs)
    cfg = load_configs(configs)
    summary = dry_run(cfg, 31, world_size=2)
    assert "updates: 25000, peak lr 2e-05" in summary and "batch per update: 1600 s" in summary
    assert cfg["scheduler"] == {"name": "tri_stage", "phase_updates": [8000, 0, 72000], "init_lr_scale": 0.01,
                                "final_lr_scale": 0.05}
    encoder = cfg["frontend"]["encoder"]
    assert encoder["mask"]["time_prob"] == 0.75 and encoder["mask"]["channel_prob"] == 0.5
    assert encoder["transformer"]["layerdrop"] == 0.1 and cfg["finetune"]["freeze_encoder_updates"] == 10000
    assert cfg["trainer"]["final_model"] == "best" and cfg["trainer"]["best_metric"] == "wer"


@pytest.mark.parametrize("frontend", _frontends())
def test_dry_run_noisy_student_configs(frontend: str):
    """The student of a 10 h teacher, configs in the driver's order: base_960h's schedule for its
    ~960 h, the teacher's masking as its noise, the filter valid, the pool the rest of train."""
    own = [CONF / f"finetune_{frontend}.yaml"] if (CONF / f"finetune_{frontend}.yaml").exists() else []
    own += [path for path in [CONF / f"finetune_ctc_{frontend}_10h.yaml"] if path.exists()]
    teacher = load_configs([CONF / f"frontend_{frontend}.yaml", CONF / "finetune_ctc.yaml",
                            CONF / "finetune_ctc_10h.yaml", *own])
    student = load_configs([CONF / f"frontend_{frontend}.yaml", CONF / "finetune_ctc.yaml",
                            CONF / "finetune_ctc_10h.yaml", *own, CONF / "noisy_student.yaml"])
    assert "updates: 320000, peak lr 1e-05" in dry_run(student, 31, world_size=2)
    # its schedule spans its own updates (HuBERT's 10 h teacher decays over fixed steps, 80k in all)
    assert student["scheduler"]["phase_ratio"] == [0.1, 0.4, 0.5] and "phase_updates" not in student["scheduler"]
    assert student["frontend"]["encoder"] == teacher["frontend"]["encoder"]
    assert student["pseudo_label"]["pool"] == ["rest_of_train"]
    filter_config(student["pseudo_label"])
    # a 10-minute teacher's batching (2 buckets) is not the ~960 h student's
    small_teacher = [CONF / f"frontend_{frontend}.yaml", CONF / "finetune_ctc.yaml", CONF / "finetune_ctc_10m.yaml", *own]
    assert load_configs([*small_teacher, CONF / "noisy_student.yaml"])["data"]["num_buckets"] == 30


def test_dry_run_command_line_needs_no_exp_dir_or_data():
    tiny = REPO / "conf" / "frontend" / "wav2vec2_tiny.yaml"  # the command line, not the model size, is tested
    result = subprocess.run([sys.executable, "-m", "sslasr.bin.train", "--dry-run", "--config",
                             str(tiny), str(CONF / "finetune_ctc.yaml"),
                             "--set", "data.tokenizer=/nonexistent/bpe.model", "--vocab-size", "31",
                             "--world-size", "2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "batch per update: 1600 s = 0.44 h" in result.stdout
    with pytest.raises(ConfigError, match="give --vocab-size"):  # no tokenizer and no --vocab-size
        dry_run(load_configs([tiny, CONF / "finetune_ctc.yaml"]), None, world_size=1)
