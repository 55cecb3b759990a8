"""k-means targets for HuBERT, one iteration at a time (stage 4 of local/ssl_asr.sh).

    # how many iterations the config has; the training overrides of iteration I
    python -m sslasr.bin.kmeans plan --config conf/frontend_hubert.yaml --count
    python -m sslasr.bin.kmeans plan --config conf/frontend_hubert.yaml --iteration 1
    # features of a bounded random sample of frames → mini-batch k-means → centres
    python -m sslasr.bin.kmeans fit --config conf/frontend_hubert.yaml --iteration 2 \\
        --cuts data/manifests/minisynth_cuts_pretrain.jsonl.gz --model exp/pretrain_hubert/iter1/model_final.pt \\
        --out exp/pretrain_hubert/iter2/kmeans.pt
    # label every frame of every cut with the same features and centres: OUT_DIR/<manifest name>
    # carries the labels as a lhotse TemporalArray field, stored under OUT_DIR/storage
    python -m sslasr.bin.kmeans label --config conf/frontend_hubert.yaml \\
        --kmeans exp/pretrain_hubert/iter2/kmeans.pt --cuts CUTS... --out-dir exp/pretrain_hubert/iter2/labels

The `kmeans` section of the config holds the iterations and sizes (sslasr.kmeans.KMeansConfig);
`--set kmeans.frames_budget=20000` and the like override it.
"""

import argparse
import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Union

import numpy as np
import torch
from lhotse import CutSet, NumpyFilesWriter

from sslasr.data.frame_features import MfccFeatures, build_features, cut_features, encoder_frame_rate
from sslasr.data.loader import load_cuts
from sslasr.kmeans import (
    KMeansConfig, assign_labels, chosen_cuts, cluster_usage, fit_kmeans, label_cuts, log_usage, sample_frames,
)
from sslasr.utils.config import load_configs
from sslasr.utils.devices import resolve_device
from sslasr.utils.io import (atomic_path, content_sha256, file_sha256, flush_to_disk, save_torch_atomic,
                             write_text_atomic)
from sslasr.utils.logging import setup_logging

log = logging.getLogger(__name__)


def training_overrides(cfg: Dict, number: int, previous_model: Optional[str] = None) -> List[str]:
    """`key=value` overrides that make the pretraining config learn iteration `number`'s labels
    (from the previous iteration's encoder, `previous_model`, where the iteration's init says so)."""
    kmeans = KMeansConfig.from_dict(cfg.get("kmeans"))
    iteration = kmeans.iteration(number)
    if iteration.features == "mfcc":
        label_rate = MfccFeatures.frame_rate
    else:
        label_rate = encoder_frame_rate(cfg["frontend"]["encoder"], cfg.get("pretrain", {}).get("sample_rate", 16000))
    overrides = [f"pretrain.num_classes={iteration.clusters}", f"pretrain.label_rate={label_rate:g}",
                 f"data.targets_field={kmeans.targets_field}"]
    if iteration.updates is not None:
        overrides.append(f"trainer.max_updates={iteration.updates}")
    if iteration.init == "previous":
        if not previous_model:
            raise ValueError(f"k-means iteration {number} starts from the previous iteration's model "
                             f"(init: previous): give its model_final.pt")
        overrides.append(f"init.encoder_from={previous_model}")
    return overrides


def fit(cfg: Dict, number: int, cuts_path: str, model: Optional[str], out: Path, num_jobs: int = 1,
        device: Union[str, torch.device] = "cpu") -> Dict:
    kmeans = KMeansConfig.from_dict(cfg.get("kmeans"))
    iteration = kmeans.iteration(number)
    features = build_features(iteration.features, model, iteration.layer)
    start = time.monotonic()
    cuts = chosen_cuts(load_cuts(cuts_path), kmeans.cuts_fraction, kmeans.seed)
    frames = (f for _, f in cut_features(cuts, iteration.features, model, iteration.layer, num_jobs, device))
    sample, seen = sample_frames(frames, kmeans.frames_budget, kmeans.seed)
    log.info("iteration %d: %s features (dim %d, %g Hz), sampled %d of %d frames in %.0f s", number,
             iteration.features, sample.shape[1], features.frame_rate, len(sample), seen, time.monotonic() - start)
    start = time.monotonic()
    centers = fit_kmeans(sample, iteration.clusters, kmeans)
    usage = cluster_usage(np.bincount(assign_labels(sample, centers, kmeans.assign_block_frames),
                                      minlength=iteration.clusters))
    log.info("fitted %d clusters in %.0f s", iteration.clusters, time.monotonic() - start)
    log_usage("k-means sample", usage)
    state = {"centers": centers, "iteration": asdict(iteration), "frames_seen": seen, "frames_sampled": len(sample),
             "features": {"kind": iteration.features, "layer": iteration.layer, "model": model,
                          "model_sha256": file_sha256(model) if model else None,
                          "frame_rate": features.frame_rate, "dim": int(sample.shape[1]),
                          "definition": getattr(features, "definition", None)},
             "sample_usage": usage}
    save_torch_atomic(state, out)
    return state


def check_feature_definition(spec: Dict, definition: Optional[str], kmeans_path: str) -> None:
    """The k-means's centres are of the features it was fitted on: other features (another MFCC
    definition) would be labelled by the wrong centres. A k-means without a recorded MFCC
    definition predates the filters reaching Nyquist."""
    fitted = spec.get("definition", None if spec["kind"] == "mfcc" else definition)
    if fitted != definition:
        raise ValueError(f"{kmeans_path} was fitted on other {spec['kind']} features "
                         f"({fitted or 'mel filters to Nyquist − 400 Hz'}) than these ({definition}): "
                         f"fit the k-means again (run.sh --stage 4 --force true)")


def label(cfg: Dict, kmeans_path: str, cuts_paths: List[str], out_dir: Path, model: Optional[str] = None,
          num_jobs: int = 1, device: Union[str, torch.device] = "cpu") -> Dict:
    """Labels with the features the k-means was fitted on (kind, layer and model from its file).
    Each manifest's label counts are kept beside it (<name>.counts.json, with the k-means file's
    and the input manifest's digests): a run killed after some manifests redoes only the others.
    A manifest is labelled in parts of LABEL_PART_CUTS cuts, each kept with its counts until the
    manifest is whole: a run killed inside one (the pretraining manifest, hours of a model's
    layer features at scale) redoes the part it was in, not the manifest."""
    repeated = sorted(name for name, count in Counter(Path(path).name for path in cuts_paths).items() if count > 1)
    if repeated:  # their labelled copies would share one file in OUT_DIR: the last would overwrite the others
        raise ValueError(f"manifests to label share file names ({', '.join(repeated)}): their labelled copies in "
                         f"{out_dir} are named after them")
    kmeans = KMeansConfig.from_dict(cfg.get("kmeans"))
    state = torch.load(kmeans_path, map_location="cpu", weights_only=False)
    spec, centers = state["features"], state["centers"]
    model_override = model is not None
    model = model or spec["model"]
    model_sha256 = file_sha256(model)  # None for an MFCC k-means (no model)
    if not model_override and spec.get("model_sha256") and model_sha256 != spec["model_sha256"]:
        # e.g. the earlier iteration trained again: labels of its new features by the old centres
        raise ValueError(f"{spec['model']} is not the model {kmeans_path} was fitted on (it changed since): "
                         f"fit the k-means again, or label with another model on purpose (--model)")
    features = build_features(spec["kind"], model, spec["layer"])
    if features.frame_rate != spec["frame_rate"]:
        raise ValueError(f"{kmeans_path} was fitted on {spec['frame_rate']} Hz features, these are {features.frame_rate} Hz")
    check_feature_definition(spec, getattr(features, "definition", None), kmeans_path)
    writer = NumpyFilesWriter(out_dir / "storage")
    counts = np.zeros(len(centers), dtype=np.int64)
    start = time.monotonic()
    for path in cuts_paths:
        out, done = out_dir / Path(path).name, out_dir / f"{Path(path).name}.counts.json"
        # the manifest by content: stage 4 writes the pretraining manifest again on every entry
        made_from = {"kmeans_sha256": file_sha256(kmeans_path), "cuts_sha256": content_sha256(path), "model": model,
                     "model_sha256": model_sha256, "targets_field": kmeans.targets_field}
        earlier = json.loads(done.read_text()) if out.exists() and done.exists() else None
        if earlier is not None and "model_sha256" not in earlier["made_from"] and "model_sha256" not in spec \
                and not model_override:  # labels of a k-means fitted before model digests were recorded:
            del made_from["model_sha256"]  # compared without one (else the manifest is labelled again in full)
        if earlier is not None and earlier["made_from"] == made_from:
            counts += np.asarray(earlier["counts"], dtype=np.int64)
            log.info("%s: labelled already (%s)", path, out)
            continue
        def label_part(cuts: List, part_counts: np.ndarray) -> Iterator:
            pairs = cut_features(cuts, spec["kind"], model, spec["layer"], num_jobs, device)
            return label_cuts(pairs, centers, writer, kmeans.targets_field, features.frame_rate,
                              part_counts, kmeans.assign_block_frames)

        done.unlink(missing_ok=True)  # (the labels' files are rewritten in place, cut by cut)
        made = _label_in_parts(path, out, made_from, label_part, len(centers))
        counts += made
        write_text_atomic(done, json.dumps({"made_from": made_from, "counts": made.tolist()}) + "\n")
        shutil.rmtree(_parts_dir(out), ignore_errors=True)
        log.info("labelled %s → %s", path, out)
    usage = cluster_usage(counts)
    log_usage(f"labels of {len(cuts_paths)} manifests ({time.monotonic() - start:.0f} s)", usage)
    write_text_atomic(out_dir / "usage.json", json.dumps(usage, indent=1) + "\n")
    return usage


LABEL_PART_CUTS = 20000  # cuts per resumable part of a manifest's labelling


def _label_in_parts(path: str, out: Path, made_from: Dict, label_part: Callable, num_clusters: int) -> np.ndarray:
    """OUT: PATH's cuts labelled by LABEL_PART(cuts, counts) part by part, each part kept (in
    .<name>.parts/, atomically, with its counts and what it was made from) until OUT is written
    from them; returns the label counts."""
    parts_dir = _parts_dir(out)
    counts = np.zeros(num_clusters, dtype=np.int64)
    parts = []
    for index, cuts in enumerate(_groups(load_cuts(path), LABEL_PART_CUTS)):
        part, part_done = parts_dir / f"part{index:05d}.jsonl.gz", parts_dir / f"part{index:05d}.counts.json"
        part_made_from = {**made_from, "part": index, "cuts": len(cuts), "first": cuts[0].id, "last": cuts[-1].id}
        earlier = json.loads(part_done.read_text()) if part.exists() and part_done.exists() else None
        if earlier is not None and earlier["made_from"] == part_made_from:
            part_counts = np.asarray(earlier["counts"], dtype=np.int64)
            log.info("%s: part %d (%d cuts) labelled already", path, index, len(cuts))
        else:  # (its record goes first: the labels' files are rewritten in place, cut by cut)
            part_done.unlink(missing_ok=True)
            part_counts = np.zeros(num_clusters, dtype=np.int64)
            with atomic_path(part) as tmp, CutSet.open_writer(tmp) as manifest:
                for cut in label_part(cuts, part_counts):
                    manifest.write(cut)
            flush_to_disk()  # the labels' .npy files, written without an fsync, before the record
            write_text_atomic(part_done, json.dumps({"made_from": part_made_from, "counts": part_counts.tolist()}) + "\n")
        counts += part_counts
        parts.append(part)
    with atomic_path(out) as tmp, CutSet.open_writer(tmp) as manifest:
        for part in parts:
            for cut in load_cuts(part):
                manifest.write(cut)
    return counts  # (the caller removes the parts once OUT's record is written)


def _parts_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.parts"


def _groups(items: Iterable, size: int) -> Iterator[List]:
    group = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", required=True, nargs="+", help="YAML files, merged in order")
    common.add_argument("--set", action="extend", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides (--set may be given more than once)")
    common.add_argument("--num-jobs", type=int, default=1,
                        help="processes computing features, one thread each (small per-cut ops scale "
                             "better over processes than over threads)")
    common.add_argument("--device", default="auto", help="where a model's layer features are computed: cpu, "
                        "cuda[:N], or auto (the GPU when one is visible); MFCCs are always on the CPU")
    plan = commands.add_parser("plan", parents=[common], help="iteration count or training overrides")
    which = plan.add_mutually_exclusive_group(required=True)
    which.add_argument("--count", action="store_true", help="print the number of k-means iterations (0: none)")
    which.add_argument("--iteration", type=int, help="print the training overrides of this iteration")
    plan.add_argument("--model", help="previous iteration's model_final.pt (iterations with init: previous)")
    fit_cmd = commands.add_parser("fit", parents=[common], help="fit the k-means of one iteration")
    fit_cmd.add_argument("--iteration", type=int, required=True)
    fit_cmd.add_argument("--cuts", required=True, help="cuts whose frames are sampled")
    fit_cmd.add_argument("--model", help="previous iteration's model_final.pt (layer features)")
    fit_cmd.add_argument("--out", required=True, type=Path)
    label_cmd = commands.add_parser("label", parents=[common], help="label cuts with fitted k-means")
    label_cmd.add_argument("--kmeans", required=True)
    label_cmd.add_argument("--cuts", required=True, nargs="+")
    label_cmd.add_argument("--model", help="instead of the model the k-means was fitted with")
    label_cmd.add_argument("--out-dir", required=True, type=Path)
    return parser


def check_noise_manifest(cfg: Dict) -> None:
    """WavLM's noise manifest is first read when its pretraining starts: missing, it would stop
    the run after the k-means fits and labels (hours at LibriSpeech's size). Said at the plan."""
    noise = ((cfg.get("pretrain") or {}).get("utterance_mixing") or {}).get("noise_cuts")
    if noise and not Path(noise).is_file():
        raise SystemExit(f"pretrain.utterance_mixing.noise_cuts: {noise} does not exist; the corpus's data "
                         f"preparation makes it (egs/librispeech: --data-opts \"--musan true\"), or set it "
                         f"to null for synthetic noise")


def main(argv=None) -> None:
    args = get_parser().parse_args(argv)
    cfg = load_configs(args.config, args.set)
    check_noise_manifest(cfg)
    if args.command == "plan":
        if args.count:
            print(len(KMeansConfig.from_dict(cfg.get("kmeans")).iterations))
        else:
            print(" ".join(training_overrides(cfg, args.iteration, args.model)))
        return
    setup_logging()
    torch.set_num_threads(1)  # before any worker forks; the k-means matmuls are small too
    device = resolve_device(args.device)
    if args.command == "fit":
        fit(cfg, args.iteration, args.cuts, args.model, args.out, args.num_jobs, device)
    else:
        label(cfg, args.kmeans, args.cuts, args.out_dir, args.model, args.num_jobs, device)


if __name__ == "__main__":
    main()
