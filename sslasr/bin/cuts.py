"""Small cut-manifest operations used between stages.

    python -m sslasr.bin.cuts combine --out all.jsonl.gz a.jsonl.gz b.jsonl.gz
    python -m sslasr.bin.cuts subset --cuts train.jsonl.gz --seconds 600 --seed 0 --out train_10m.jsonl.gz
    python -m sslasr.bin.cuts exclude --cuts train.jsonl.gz --ids-of train_1h.jsonl.gz --out rest.jsonl.gz
    python -m sslasr.bin.cuts seconds train.jsonl.gz        # prints the total duration
    python -m sslasr.bin.cuts perturb-speed --cuts train.jsonl.gz --factors 0.9 1.1 --out train_sp.jsonl.gz \
        [--fbank-storage data/fbank]    # originals + speed-perturbed copies (with fbank: the copies' features)
"""

import argparse
import logging
import math
from collections import defaultdict
from typing import Sequence

from lhotse import CutSet

from sslasr.bin.compute_fbank import fbank_cuts, storage_for
from sslasr.data.loader import load_cuts
from sslasr.data.manifests import speed_perturbed_copies, subset_by_duration, write_cuts
from sslasr.utils.logging import setup_logging


NOTHING_LEFT = 3  # exclude's exit status when no cut is left


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    combine = commands.add_parser("combine", help="concatenate cut manifests")
    combine.add_argument("--out", required=True)
    combine.add_argument("inputs", nargs="+")
    subset = commands.add_parser("subset", help="whole utterances, in a seeded order, until their total reaches "
                                 "--seconds (the last one may pass it)")
    subset.add_argument("--cuts", required=True)
    subset.add_argument("--seconds", type=float, required=True)
    subset.add_argument("--seed", type=int, default=0)
    subset.add_argument("--out", required=True)
    perturb = commands.add_parser("perturb-speed", help="the cuts plus speed-perturbed copies")
    perturb.add_argument("--cuts", required=True)
    perturb.add_argument("--factors", type=float, nargs="+", required=True)
    perturb.add_argument("--fbank-storage", help="compute the copies' fbank features into this folder "
                         "(for fbank frontends; the originals keep theirs)")
    perturb.add_argument("--num-jobs", type=int, default=2)
    perturb.add_argument("--out", required=True)
    exclude = commands.add_parser("exclude", help="the cuts whose ids are not in another manifest; exit "
                                  f"status {NOTHING_LEFT}, nothing written, when none is left")
    exclude.add_argument("--cuts", required=True)
    exclude.add_argument("--ids-of", required=True, help="a manifest whose cut ids are left out")
    exclude.add_argument("--out", required=True)
    select = commands.add_parser("select", help="the cuts whose ids are in another manifest (e.g. the fbank "
                                 "copies of a labeled subset drawn from the audio manifest)")
    select.add_argument("--cuts", required=True)
    select.add_argument("--ids-of", required=True, help="a manifest whose cut ids are kept")
    select.add_argument("--out", required=True)
    seconds = commands.add_parser("seconds", help="print the total duration in seconds")
    seconds.add_argument("cuts")
    args = parser.parse_args(argv)
    setup_logging()

    if args.command == "combine":
        cuts = combined_cuts(args.inputs)
        write_cuts(cuts, args.out)
        logging.info("combined %d manifests into %s (%d cuts)", len(args.inputs), args.out, len(cuts))
    elif args.command == "subset":
        if not (math.isfinite(args.seconds) and args.seconds > 0):
            parser.error(f"subset --seconds must be a positive number of seconds, got {args.seconds}")
        write_and_log(subset_by_duration(load_cuts(args.cuts), args.seconds, args.seed), args.out)
    elif args.command == "exclude":
        kept = cuts_excluding(load_cuts(args.cuts), load_cuts(args.ids_of))
        if not kept:  # an empty manifest is refused by every reader: say so instead
            logging.warning("exclude: every cut of %s is in %s: none left, %s not written", args.cuts, args.ids_of, args.out)
            raise SystemExit(NOTHING_LEFT)
        write_and_log(kept, args.out)
    elif args.command == "select":
        write_and_log(cuts_selecting(load_cuts(args.cuts), load_cuts(args.ids_of)), args.out)
    elif args.command == "perturb-speed":
        write_cuts(perturb_speed(args), args.out)
    else:
        print(round(sum(cut.duration for cut in load_cuts(args.cuts)), 2))


def write_and_log(cuts: CutSet, out: str) -> None:
    write_cuts(cuts, out)
    logging.info("%s: %d cuts, %.1f s", out, len(cuts), sum(c.duration for c in cuts))


def combined_cuts(inputs: Sequence[str]) -> CutSet:
    """The cuts of every input, in order. Repeated ids are refused: a combined manifest would
    train on those cuts twice and anything that looks cuts up by id would see only one."""
    cuts, sources = [], defaultdict(list)  # sources: cut id -> the inputs that hold it
    for path in inputs:
        for cut in load_cuts(path):
            cuts.append(cut)
            sources[cut.id].append(str(path))
    repeated = {cut_id: paths for cut_id, paths in sources.items() if len(paths) > 1}
    if repeated:
        examples = "; ".join(f"{cut_id} (in {', '.join(paths)})" for cut_id, paths in list(repeated.items())[:5])
        raise SystemExit(f"combine: {len(repeated)} cut id(s) occur more than once in the inputs, e.g. {examples}")
    return CutSet.from_cuts(cuts)


def cuts_excluding(cuts: CutSet, excluded: CutSet) -> CutSet:
    """CUTS without those whose id is in EXCLUDED (e.g. train beyond its labeled subset). Every
    excluded id must be in CUTS: one that is not means the two manifests do not belong together."""
    excluded_ids = {cut.id for cut in excluded}
    kept, seen = [], set()
    for cut in cuts:
        seen.add(cut.id)
        if cut.id not in excluded_ids:
            kept.append(cut)
    missing = excluded_ids - seen
    if missing:
        raise SystemExit(f"exclude: {len(missing)} of the {len(excluded_ids)} ids to leave out are not in "
                         f"the cuts, e.g. {', '.join(sorted(missing)[:5])}")
    return CutSet.from_cuts(kept)


def cuts_selecting(cuts: CutSet, chosen: CutSet) -> CutSet:
    """The cuts of CUTS whose id is in CHOSEN, in CUTS' order. Ids of CHOSEN that CUTS lacks (audio
    that stage 2 could not load, say) are counted and named: the selection is that much smaller."""
    chosen_ids = {cut.id for cut in chosen}
    kept = [cut for cut in cuts if cut.id in chosen_ids]
    missing = chosen_ids - {cut.id for cut in kept}
    if missing:
        logging.warning("select: %d of the %d chosen ids are not in the cuts, left out: %s", len(missing),
                        len(chosen_ids), ", ".join(sorted(missing)[:5]))
    if not kept:
        raise SystemExit("select: none of the chosen ids is in the cuts")
    return CutSet.from_cuts(kept)


def perturb_speed(args) -> CutSet:
    originals = load_cuts(args.cuts).to_eager()
    try:
        copies = speed_perturbed_copies(originals, args.factors)
    except ValueError as err:  # the factors
        raise SystemExit(f"perturb-speed: {err}") from err
    taken = sorted({c.id for c in originals} & {c.id for c in copies})
    if taken:  # e.g. a manifest perturbed already: the copies would repeat its cuts' ids
        raise SystemExit(f"perturb-speed: {len(taken)} copies would take ids {args.cuts} already has, e.g. "
                         f"{', '.join(taken[:3])} (is it speed-perturbed already?)")
    if args.fbank_storage:
        if not all(c.has_features for c in originals):
            raise SystemExit(f"perturb-speed --fbank-storage: {args.cuts} has cuts without features")
        copies = fbank_cuts(copies, storage_for(args.fbank_storage, args.out), originals[0].num_features,
                            args.num_jobs)
    cuts = CutSet.from_cuts(list(originals) + list(copies))
    logging.info("%s: %d cuts (%d originals, speed factors %s), %.1f s", args.out, len(cuts), len(originals),
                 " ".join(map(str, args.factors)), sum(c.duration for c in cuts))
    return cuts


if __name__ == "__main__":
    main()
