"""Score a decoding against references and record it in the results jsonl.

    python -m sslasr.bin.score --ref data/test/text --hyp exp/x/decode/text \
        --out-dir exp/x/decode --results exp/results.jsonl \
        --set corpus=librispeech --set test_set=test-clean --set lm_weight=0.3 ... \
        --set command="python -m ..."

REF and HYP are Kaldi-style text files: ``utt-id word word ...`` per line (an utterance
id alone on its line means an empty transcript). Hypotheses without a reference (a partly
transcribed set: sslasr.bin.decode writes every cut's hypothesis, but only the transcribed cuts'
references) are not scored; their count is logged and recorded (num_unreferenced_hyps). A REF
without any reference word is an error: its WER is undefined. Writes OUT_DIR/wer.txt (the ``%WER`` line)
and OUT_DIR/errors.txt (per-utterance details), prints the ``%WER`` line, and, with
--results, appends one row made of the --set values plus the computed fields.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from sslasr.scoring import (
    ErrorCounts,
    UttResult,
    append_result,
    missing_result_keys,
    score_corpus,
    unreferenced_ids,
    write_errors_file,
)
from sslasr.significance import compare_scored
from sslasr.utils.io import write_text_atomic
from sslasr.utils.kaldi_table import read_table

COMPUTED_KEYS = ("wer", "sub", "del", "ins", "num_words", "num_utts", "num_missing_hyps", "num_unreferenced_hyps")
# With --baseline: the decode directory compared with, and the paired bootstrap's fields
BASELINE_KEYS = ("baseline", "wer_delta", "wer_delta_low", "wer_delta_high", "p_improvement")
# never type-converted: a command "true", or a corpus, set or system named "no", "on", "1e3" (YAML
# would read booleans and numbers) stays the string it is
STRING_KEYS = ("command", "corpus", "test_set", "exp", "decoding", "frontend", "head", "teacher")

# YAML 1.1 reads "1e-3" as a string (it needs "1.0e-3"); people will type the former.
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def read_kaldi_text(path: str | Path) -> dict[str, str]:
    """``utt-id transcript`` lines (read_table: lines end at \\n only, a BOM dropped) ->
    {utt_id: transcript}; duplicate ids raise."""
    texts: dict[str, str] = {}
    for utt_id, transcript in read_table(Path(path)):
        if utt_id in texts:
            raise ValueError(f"{path}: duplicate utterance id {utt_id!r}")
        texts[utt_id] = transcript
    return texts


def parse_value(key: str, raw: str) -> Any:
    """Type a --set value: YAML scalars (numbers, true/false, null; empty -> null),
    anything else (dates, lists, unparsable YAML) stays the raw string."""
    if key in STRING_KEYS:
        return raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str) and _FLOAT_RE.match(value):
        return float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return raw  # JSON has no inf / nan
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return raw


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        if key in COMPUTED_KEYS + BASELINE_KEYS:
            raise ValueError(f"--set {key}=... is not allowed: {key} is computed by scoring")
        if key in row:
            raise ValueError(f"--set {key} given twice")
        row[key] = parse_value(key, raw)
    return row


def score_decode_dir(decode_dir: str | Path) -> list[UttResult]:
    """Per-utterance scoring of a decode directory's ref.txt and hyp.txt."""
    decode_dir = Path(decode_dir)
    refs, hyps = read_kaldi_text(decode_dir / "ref.txt"), read_kaldi_text(decode_dir / "hyp.txt")
    return score_corpus(refs, hyps, skip_unreferenced=True)[1]


def check_has_reference_words(refs: dict[str, str], ref_path: str, test_set: Any) -> None:
    """Raise, naming the set, when REFS hold no word: its WER (errors / 0 words) is undefined,
    and a row of 0 or inf must not reach the results."""
    if not any(text.split() for text in refs.values()):
        name = f" (test_set {test_set})" if test_set is not None else ""
        raise ValueError(f"{ref_path}{name}: no reference words in its {len(refs)} utterance(s), "
                         "so its WER is undefined; is it the transcribed set?")


def computed_fields(total: ErrorCounts, num_utts: int, num_missing: int, num_unreferenced: int = 0) -> dict[str, Any]:
    return {
        "wer": round(total.wer, 4),
        "sub": total.sub,
        "del": total.dels,
        "ins": total.ins,
        "num_words": total.ref_words,
        "num_utts": num_utts,
        "num_missing_hyps": num_missing,
        "num_unreferenced_hyps": num_unreferenced,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True, help="Kaldi-style reference text")
    p.add_argument("--hyp", required=True, help="Kaldi-style hypothesis text")
    p.add_argument("--out-dir", required=True, help="where wer.txt and errors.txt go")
    p.add_argument("--results", help="results jsonl to append a row to (e.g. exp/results.jsonl)")
    p.add_argument("--set", dest="sets", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="a field of the results row (repeatable); values are YAML-typed")  # fmt: skip
    p.add_argument("--baseline", metavar="DECODE_DIR",
                   help="a decode directory (ref.txt, hyp.txt) of the same utterances by the system this one "
                        "is compared with (a noisy student's teacher): the paired bootstrap's WER difference, "
                        "its 95 %% interval and P(improvement) go into the row (sslasr.significance)")
    return p


def run(args: argparse.Namespace) -> None:
    row = parse_sets(args.sets)
    if args.results:
        # Fail before scoring, so a typo in the recipe does not leave a half-recorded run.
        missing = missing_result_keys([*row, *COMPUTED_KEYS])
        if missing:
            raise ValueError(f"missing --set for required key(s): {', '.join(missing)}")

    refs, hyps = read_kaldi_text(args.ref), read_kaldi_text(args.hyp)
    check_has_reference_words(refs, args.ref, row.get("test_set"))
    num_unreferenced = len(unreferenced_ids(refs, hyps))
    total, per_utt = score_corpus(refs, hyps, skip_unreferenced=True)
    out_dir = Path(args.out_dir)
    write_text_atomic(out_dir / "wer.txt", total.wer_line() + "\n")
    write_errors_file(out_dir / "errors.txt", per_utt, num_unreferenced)
    num_missing = sum(u.missing_hyp for u in per_utt)  # score_corpus already warned of both
    print(total.wer_line())
    compared = {}
    if args.baseline:
        result = compare_scored(score_decode_dir(args.baseline), per_utt)
        print(f"against {args.baseline}: {result.summary()}")
        compared = {"baseline": str(args.baseline), **result.row_fields()}

    if args.results:
        append_result(args.results, {**row, **computed_fields(total, len(refs), num_missing, num_unreferenced),
                                     **compared})


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except (OSError, ValueError) as err:
        raise SystemExit(f"score: {err}")  # a one-line message, not a traceback
    return 0


if __name__ == "__main__":
    sys.exit(main())
