"""Compute 80-dim log-mel fbank features for a cut manifest into lilcom storage.

    python -m sslasr.bin.compute_fbank --cuts IN.jsonl.gz --out-cuts OUT.jsonl.gz --storage DIR

Only fbank frontends need this; waveform frontends read audio directly in the loader.
"""

import argparse
import logging
from pathlib import Path

import torch
from lhotse import CutSet, Fbank, FbankConfig, LilcomChunkyWriter

from sslasr.data.loader import load_cuts
from sslasr.data.manifests import write_cuts

log = logging.getLogger(__name__)


def storage_for(storage_dir, out_cuts_path) -> Path:
    """Where the features of the manifest out_cuts_path go: storage_dir/<its file name without
    .jsonl.gz>. The whole name, dots included: cutting at the first dot sent e.g.
    cuts_train_sp0.9-1.1 and cuts_train_sp0.95-1.05 to one archive, each overwriting the other."""
    name = Path(out_cuts_path).name.removesuffix(".jsonl.gz")
    if not name:
        raise ValueError(f"{out_cuts_path}: a manifest needs a name before .jsonl.gz")
    return Path(storage_dir) / name


def compute_fbank(cuts_path, out_cuts_path, storage_dir, num_mel_bins: int = 80, num_jobs: int = 2):
    with_feats = fbank_cuts(load_cuts(cuts_path), storage_for(storage_dir, out_cuts_path), num_mel_bins, num_jobs)
    write_cuts(with_feats, out_cuts_path)
    log.info("features for %d cuts -> %s", len(with_feats), out_cuts_path)
    return with_feats


def fbank_cuts(cuts: CutSet, storage_path: Path, num_mel_bins: int = 80, num_jobs: int = 2) -> CutSet:
    """The cuts with fbank features computed into the lilcom archive(s) at storage_path, in
    input order; cuts whose audio fails to load are left out with a warning."""
    num_in = len(cuts)
    # Several worker processes each running multi-threaded torch can deadlock (lhotse warns).
    if num_jobs > 1:
        torch.set_num_threads(1)
    Path(storage_path).parent.mkdir(parents=True, exist_ok=True)
    with_feats = cuts.compute_and_store_features(
        extractor=Fbank(FbankConfig(num_mel_bins=num_mel_bins)),
        storage_path=storage_path,
        num_jobs=num_jobs, storage_type=LilcomChunkyWriter, progress_bar=False)
    # Parallel jobs return their shards one after another: restore the input order.
    by_id = {cut.id: cut for cut in with_feats}
    with_feats = CutSet.from_cuts(by_id[cut.id] for cut in cuts if cut.id in by_id)
    # lhotse skips cuts whose audio fails to load: say so instead of losing them quietly.
    if len(with_feats) != num_in:
        log.warning("%d of %d cuts failed audio loading and have no features", num_in - len(with_feats), num_in)
    return with_feats


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cuts", required=True, help="input cut manifest")
    p.add_argument("--out-cuts", required=True, help="output cut manifest with features attached")
    p.add_argument("--storage", required=True, help="folder for the lilcom feature archives")
    p.add_argument("--num-mel-bins", type=int, default=80)
    p.add_argument("--num-jobs", type=int, default=2)
    return p


def main(argv=None) -> None:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    compute_fbank(args.cuts, args.out_cuts, args.storage, args.num_mel_bins, args.num_jobs)


if __name__ == "__main__":
    main()
