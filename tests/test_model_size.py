"""`run.sh --model-size SIZE`: another size of a frontend, from conf/frontend_<frontend>_<size>.yaml,
with its own exp dirs; `--pretrain-tag`, a pretraining variant with its own; and the sizes
speechocean762 ships."""

import torch

from recipe_smoke import REPO, SMOKE, dry_run_parameters, recipe_copy, recipe_with_data, run_recipe
from sslasr.bin.train import dry_run
from sslasr.utils.config import load_configs

SO762 = REPO / "egs" / "speechocean762" / "conf"


def test_speechocean762_medium_w2vbert_is_the_tiny_one_widened_and_deepened():
    tail = [SO762 / "finetune_ctc.yaml", SO762 / "finetune_w2vbert.yaml", SO762 / "scratch.yaml"]
    tiny = load_configs([SO762 / "frontend_w2vbert.yaml", *tail])
    medium = load_configs([SO762 / "frontend_w2vbert_medium.yaml", *tail[:2], SO762 / "finetune_w2vbert_medium.yaml",
                           *tail[2:]])
    assert (tiny["optim"]["lr"], medium["optim"]["lr"]) == (1.0e-3, 5.0e-4)
    assert (tiny["finetune"]["reinit_top_layers"], medium["finetune"]["reinit_top_layers"]) == (2, 3)
    assert medium["frontend"]["encoder"]["conformer"] == dict(
        tiny["frontend"]["encoder"]["conformer"], dim=256, layers=6, heads=4, ffn_dim=1024)
    assert medium["frontend"]["encoder"]["subsampling"] == tiny["frontend"]["encoder"]["subsampling"]
    assert 2.0 < dry_run_parameters(dry_run(tiny, 40, world_size=1)) < 2.3
    assert 9.5 < dry_run_parameters(dry_run(medium, 40, world_size=1)) < 9.9
    pretrain = load_configs([SO762 / "frontend_w2vbert_medium.yaml", SO762 / "pretrain.yaml"])
    assert pretrain["pretrain"]["contrastive_layers"] == 3
    assert "task: pretrain" in dry_run(pretrain, None, world_size=1)


def test_an_unknown_size_is_refused_naming_the_missing_file(tmp_path):
    recipe = recipe_copy(tmp_path)
    result = run_recipe(recipe, "--stage", "5", "--model-size", "huge", timeout=120)
    assert result.returncode == 2 and "no conf/frontend_wav2vec2_huge.yaml" in result.stderr, result.stderr


def test_a_size_and_a_pretraining_tag_train_their_own_architecture_into_their_own_exp_dirs(tmp_path,
                                                                                          prepared_minisynth):
    recipe = recipe_with_data(tmp_path, prepared_minisynth)
    (recipe / "conf/frontend_wav2vec2_narrow.yaml").write_text(
        "_base_: frontend_wav2vec2.yaml\nfrontend: {encoder: {transformer: {dim: 48, ffn_dim: 96}}}\n")
    (recipe / "conf/pretrain_wav2vec2_narrow.yaml").write_text("optim: {lr: 2.5e-4}\n")    # merged last
    (recipe / "conf/finetune_wav2vec2_narrow.yaml").write_text("optim: {lr: 1.234e-4}\n")  # merged last
    result = run_recipe(recipe, *SMOKE, "--stage", "4", "--stop-stage", "5", "--model-size", "narrow",
                        "--pretrain-tag", "_long", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(path.name for path in (recipe / "exp").glob("pretrain_*")) == ["pretrain_wav2vec2_narrow_long"]
    pretrained = torch.load(recipe / "exp/pretrain_wav2vec2_narrow_long/model_final.pt", weights_only=False)
    assert pretrained["config"]["optim"]["lr"] == 2.5e-4
    # the pretrained system is named by the pretraining it starts from; scratch does not start from one
    for system in ("ctc_wav2vec2_narrow_long_all", "ctc_scratch_wav2vec2_narrow_all"):
        checkpoint = torch.load(recipe / "exp" / system / "model_final.pt", weights_only=False)
        transformer = checkpoint["config"]["frontend"]["encoder"]["transformer"]
        assert (transformer["dim"], transformer["ffn_dim"]) == (48, 96), system
        assert checkpoint["config"]["optim"]["lr"] == 1.234e-4, system
    init_from = torch.load(recipe / "exp/ctc_wav2vec2_narrow_long_all/model_final.pt",
                           weights_only=False)["config"]["finetune"]["init_from"]
    assert init_from.endswith("exp/pretrain_wav2vec2_narrow_long/model_final.pt"), init_from


def test_a_pretraining_tag_outside_letters_digits_dot_underscore_dash_is_refused(tmp_path):
    result = run_recipe(recipe_copy(tmp_path), "--stage", "5", "--pretrain-tag", "a/b", timeout=120)
    assert result.returncode == 2 and "--pretrain-tag 'a/b'" in result.stderr, result.stderr
