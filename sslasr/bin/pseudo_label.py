"""Filter a teacher's decoding of unlabeled cuts into pseudo-labeled cuts (noisy-student training).

    python -m sslasr.bin.pseudo_label --cuts data/manifests/minisynth_cuts_unlabeled.jsonl.gz \\
        --decode-dir exp/noisy_student_ctc_wav2vec2_all/gen1/pseudo_labels/decode_unlabeled \\
        --labeled-cuts data/manifests/minisynth_cuts_train.jsonl.gz --config conf/noisy_student.yaml \\
        --reference corpus/unlabeled/text.reference \\
        --out-cuts exp/noisy_student_ctc_wav2vec2_all/gen1/pseudo_labels/pseudo_labeled.jsonl.gz \\
        --report exp/noisy_student_ctc_wav2vec2_all/gen1/pseudo_labels/report.json

DECODE_DIR is a folder of sslasr.bin.decode --confidence (hyp.txt, scores.txt). The filter
(sslasr/data/pseudo_labels.py) reads the `pseudo_label` section of --config. The report counts
kept and dropped cuts (per reason) and, where the true transcripts are known (transcripts in
--cuts, --reference), the pseudo-labels' WER over those cuts and over the kept ones among them.
The kept cuts are written with the teacher's hypothesis as their only transcript.

keep_fraction ranks the cuts it is given: the same fraction of another set (transcribed audio,
to measure the pool's filter where the truth is known) would be cut at another score. The report
therefore records the score the filter ended at (`score_cutoff`: the lowest kept score where a
top fraction was taken, else min_score), and `--score-cutoff-of REPORT` filters by that score
instead of a fraction of these cuts.
"""

import argparse
import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Optional

from sslasr.bin.score import read_kaldi_text
from sslasr.data.loader import load_cuts
from sslasr.data.manifests import write_cuts
from sslasr.data.pseudo_labels import DROP_REASONS, filter_config, median_rate, relabel, select
from sslasr.decoding.fusion import corpus_wer
from sslasr.utils.config import load_configs
from sslasr.utils.io import write_text_atomic
from sslasr.utils.logging import setup_logging


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuts", required=True, help="the decoded cuts (audio of the unlabeled pool)")
    parser.add_argument("--decode-dir", required=True, type=Path, help="hyp.txt and scores.txt of the teacher")
    parser.add_argument("--labeled-cuts", required=True, help="transcribed cuts: the reference speaking rate")
    parser.add_argument("--config", nargs="+", default=[], help="YAML with a pseudo_label section")
    parser.add_argument("--set", action="extend", nargs="*", default=[], help="key=value overrides, e.g. pseudo_label.keep_fraction=0.8")
    parser.add_argument("--reference", help="Kaldi text of the true transcripts, to measure the pseudo-labels")
    parser.add_argument("--out-cuts", help="the kept cuts with their pseudo-labels (omit to only report)")
    parser.add_argument("--report", required=True, type=Path, help="JSON counts and WERs")
    parser.add_argument("--score-cutoff-of", type=Path,
                        help="another run's report: keep what scores at least its score_cutoff (no top fraction)")
    args = parser.parse_args(argv)
    setup_logging()

    cfg = filter_config(load_configs(args.config, args.set).get("pseudo_label"))
    if args.score_cutoff_of:
        cfg = dataclasses.replace(cfg, keep_fraction=1.0, min_score=score_cutoff_of(args.score_cutoff_of))
    hyps = read_kaldi_text(args.decode_dir / "hyp.txt")
    if not (args.decode_dir / "scores.txt").exists():  # (decode writes none without --confidence)
        raise SystemExit(f"{args.decode_dir} has no scores.txt: decode the pool with --confidence")
    scores = {cut: float(value) for cut, value in read_kaldi_text(args.decode_dir / "scores.txt").items()}
    cuts = load_cuts(args.cuts)
    durations = {cut.id: cut.duration for cut in cuts}
    rate = median_rate(load_cuts(args.labeled_cuts))
    kept, dropped = select(durations, hyps, scores, rate, cfg)
    strays = sorted(set(hyps) - set(durations))
    if strays:  # (a decode folder of another pool, say): not among the cuts, so never candidates
        logging.warning("%d hypotheses of %s are of cuts not in %s, e.g. %s: not considered",
                        len(strays), args.decode_dir, args.cuts, strays[0])

    report = {"num_cuts": len(durations), "kept": len(kept), "hyps_not_in_cuts": len(strays),
              "kept_seconds": round(sum(durations[c] for c in kept), 2),
              "dropped": {reason: dropped.get(reason, 0) for reason in DROP_REASONS},
              "labeled_letters_per_second": round(rate, 3), "filter": vars(cfg),
              # (nothing kept by a top fraction: no score passes)
              "score_cutoff": min((scores[c] for c in kept), default=math.inf) if cfg.keep_fraction < 1 else cfg.min_score}
    # the truth where it is known: transcripts the pool's cuts carry (train beyond the labeled
    # subset), then --reference's (a corpus keeping its unlabeled audio's text aside)
    references = {cut.id: cut.supervisions[0].text for cut in cuts if cut.supervisions and cut.supervisions[0].text}
    references.update(read_kaldi_text(args.reference) if args.reference else {})
    # (an empty reference, an id-only line, has no words to score against, as an empty supervision)
    references = {cut: text for cut, text in references.items() if cut in durations and text.split()}
    if references:
        report["wer_all"] = round(corpus_wer(hyps, references), 2)
        kept_refs = {cut: text for cut, text in references.items() if cut in kept}
        report["wer_kept"] = round(corpus_wer(kept, kept_refs), 2) if kept_refs else None
        report["num_references"] = len(references)
    if args.out_cuts:
        if not kept:
            raise SystemExit(f"the filter kept none of the {len(durations)} cuts: {dict(dropped)}")
        write_cuts(relabel(cuts, kept, scores), Path(args.out_cuts))
    write_text_atomic(args.report, json.dumps(report, indent=2) + "\n")
    logging.info("pseudo-labels: kept %d of %d cuts (%.0f s); dropped %s%s", len(kept), len(durations),
                 report["kept_seconds"], dict(dropped),
                 f"; WER {report['wer_all']} % all, {report['wer_kept']} % kept" if references else "")


def score_cutoff_of(report: Path) -> Optional[float]:
    recorded = json.loads(report.read_text(encoding="utf-8"))
    if "score_cutoff" not in recorded:
        raise SystemExit(f"{report} records no score_cutoff (made before it was recorded): label the pool again")
    return recorded["score_cutoff"]


if __name__ == "__main__":
    main()
