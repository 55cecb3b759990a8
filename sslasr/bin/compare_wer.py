"""Paired significance of two systems' WER on one test set (sslasr.significance).

    python -m sslasr.bin.compare_wer exp/ctc_w2vbert_1h/decode_test_ctc_greedy \
        exp/noisy_student_ctc_w2vbert_1h/gen1/decode_test_ctc_greedy

Each argument is a decode directory with ref.txt and hyp.txt (what the recipes' decode stage
writes); the first is the baseline. Prints both WERs, the difference (second − first, in WER
points), its 95 % confidence interval from the paired bootstrap over utterances, and the
probability that the second system is better. The two must have decoded the same utterances.
With --utt2spk (Kaldi's `utt-id speaker` lines) whole speakers are resampled instead of
utterances: the honest interval where a test set has few speakers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from sslasr.bin.score import read_kaldi_text, score_decode_dir
from sslasr.significance import PairedBootstrap, compare_scored


def compare_dirs(baseline: str | Path, system: str | Path, samples: int = 10000, seed: int = 0,
                 utt2spk: Optional[str | Path] = None) -> PairedBootstrap:
    group_of = None if utt2spk is None else read_kaldi_text(utt2spk)
    return compare_scored(score_decode_dir(baseline), score_decode_dir(system), samples=samples, seed=seed,
                          group_of=group_of)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("baseline", help="decode directory of the baseline system (ref.txt, hyp.txt)")
    p.add_argument("system", help="decode directory of the system compared with it")
    p.add_argument("--samples", type=int, default=10000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--utt2spk", help="Kaldi utt2spk of the test set: resample speakers, not utterances")
    args = p.parse_args(argv)
    try:
        result = compare_dirs(args.baseline, args.system, args.samples, args.seed, args.utt2spk)
    except (OSError, ValueError) as err:
        raise SystemExit(f"compare_wer: {err}")
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
