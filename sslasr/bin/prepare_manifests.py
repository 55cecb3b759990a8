"""Validate a Kaldi-style corpus folder and write lhotse manifests.

    python -m sslasr.bin.prepare_manifests --corpus-dir DIR --corpus NAME \
        --splits train unlabeled dev test --eval-splits dev test --out-dir data/manifests

Writes, per existing split: {corpus}_{recordings,supervisions,cuts}_{split}.jsonl.gz,
{corpus}_{split}_dropped.tsv and {corpus}_{split}_validation.json.
"""

import argparse
import logging
from pathlib import Path

from sslasr.data.manifests import derive_subsets, prepare_corpus, split_manifest_paths


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus-dir", required=True, help="folder with one sub-folder per split")
    p.add_argument("--corpus", required=True, help="name used as manifest file prefix")
    p.add_argument("--splits", nargs="+", default=["train", "unlabeled", "dev", "test"])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--sample-rate", type=int, default=16000, help="other rates are resampled on the fly")
    p.add_argument("--min-duration", type=float, default=0.3, help="seconds; shorter is dropped")
    p.add_argument("--max-duration", type=float, default=30.0, help="seconds; longer is dropped")
    p.add_argument("--eval-splits", nargs="*", default=[],
                   help="splits kept whole, every utterance whatever its duration: test and validation "
                        "sets, a corpus's fixed labeled subsets (--min-duration and --max-duration apply to "
                        "the other splits)")
    p.add_argument("--num-jobs", type=int, default=2, help="processes reading/checking audio")
    p.add_argument("--max-utts", type=int, default=None, help="first N wav.scp entries per split (quick runs)")
    p.add_argument("--dev-fraction", type=float, default=None,
                   help="carve this fraction of train speakers into the dev split (recordings, "
                        "supervisions and cuts manifests; the full train kept as split train_full)")
    p.add_argument("--labeled", type=float, default=None, metavar="SECONDS",
                   help="also write {corpus}_cuts_train_labeled{SECONDS}s: a seeded subset of train")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> None:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.dev_fraction is not None and not 0 < args.dev_fraction < 1:
        raise SystemExit(f"--dev-fraction must be between 0 and 1 (the share of train's speakers), got {args.dev_fraction}")
    own_dev = (Path(args.corpus_dir) / "dev" / "wav.scp").exists()
    if args.dev_fraction and own_dev:  # (whatever --splits says: its manifests may be there from before)
        raise SystemExit(f"--dev-fraction would overwrite the manifests of {args.corpus_dir}'s own dev split")
    reports = prepare_corpus(args.corpus_dir, args.corpus, args.splits, args.out_dir,
                             sample_rate=args.sample_rate, min_duration=args.min_duration,
                             max_duration=args.max_duration, num_jobs=args.num_jobs, max_utts=args.max_utts,
                             eval_splits=args.eval_splits)
    carved = [path for name in ("train_full", "dev") for path in split_manifest_paths(args.out_dir, args.corpus, name)]
    if not args.dev_fraction and "train" in reports and carved[2].exists() and not own_dev:
        # an earlier run's carve: its dev holds speakers of the whole train prepared now
        carved = [path for path in carved if path.exists()]
        logging.info("removing the dev carved by an earlier run (--dev-fraction): %s", ", ".join(map(str, carved)))
        for path in carved:
            path.unlink()
    if "train" in reports:  # an earlier run's labeled subsets are of the train before (its dev speakers too)
        for path in sorted(Path(args.out_dir).glob(f"{args.corpus}_cuts_train_labeled*s.jsonl.gz")):
            logging.info("removing %s: a subset of train as an earlier run prepared it", path)
            path.unlink()
    if args.dev_fraction or args.labeled:
        if "train" not in reports:
            raise SystemExit("--dev-fraction/--labeled need a train split")
        derive_subsets(args.out_dir, args.corpus, dev_fraction=args.dev_fraction,
                       labeled_seconds=args.labeled, seed=args.seed)


if __name__ == "__main__":
    main()
