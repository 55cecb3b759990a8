"""Word error rate scoring, icefall-style error files, and the results table.

Results flow:  decode -> ``score_corpus`` -> ``write_errors_file`` + ``append_result``
(one JSON line per scored run in ``exp/results.jsonl``) -> ``render_results_md``
(RESULTS.md, regenerated from the jsonl, never edited by hand).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import kaldialign

from sslasr.utils.config import finite_number
from sslasr.utils.io import PathLike, append_line, write_text_atomic

logger = logging.getLogger(__name__)

EPS = "*"  # how an empty side of an alignment pair is shown (icefall / Kaldi convention)

REQUIRED_RESULT_KEYS = (
    "corpus", "test_set", "frontend", "head", "decoding", "lm_weight", "labeled_seconds",
    "pretrained", "generation", "wer", "sub", "del", "ins", "num_words", "num_utts", "command",
)  # fmt: skip

# Two result rows with equal values for these describe the same experiment; in RESULTS.md the
# later line of the jsonl replaces the earlier one. A row naming its exp directory is keyed by
# that (EXP_DEDUP_KEYS): the directory names the system, and a rerun in it on a redrawn labeled
# subset (another measured labeled_seconds) replaces the old row rather than standing beside it.
# λ is not a key: the recipes tune it per run, and a rerun whose tuned λ moved must replace the
# old model's row.
DEDUP_KEYS = (
    "corpus", "test_set", "frontend", "head", "decoding", "labeled_seconds", "pretrained", "generation",
)  # fmt: skip
EXP_DEDUP_KEYS = ("corpus", "test_set", "decoding", "exp")


# --------------------------------------------------------------------------- counting


@dataclass(frozen=True)
class ErrorCounts:
    sub: int = 0
    dels: int = 0
    ins: int = 0
    ref_words: int = 0

    @property
    def corr(self) -> int:
        return self.ref_words - self.sub - self.dels

    @property
    def errors(self) -> int:
        return self.sub + self.dels + self.ins

    @property
    def wer(self) -> float:
        """WER in percent. With no reference words it is 0 if nothing was inserted, else inf."""
        if self.ref_words == 0:
            return 0.0 if self.errors == 0 else math.inf
        return 100.0 * self.errors / self.ref_words

    def __add__(self, other: "ErrorCounts") -> "ErrorCounts":
        return ErrorCounts(
            self.sub + other.sub,
            self.dels + other.dels,
            self.ins + other.ins,
            self.ref_words + other.ref_words,
        )

    def wer_line(self) -> str:
        """Kaldi compute-wer style summary line."""
        return (
            f"%WER {self.wer:.2f} [ {self.errors} / {self.ref_words}, "
            f"{self.ins} ins, {self.dels} del, {self.sub} sub ]"
        )


# An alignment pair is (ref_word, hyp_word); None marks the empty side (ins / del).
AlignPair = tuple[Optional[str], Optional[str]]


def align_words(ref_words: Sequence[str], hyp_words: Sequence[str]) -> list[AlignPair]:
    """Levenshtein alignment via kaldialign, with None on the empty side of a pair."""
    eps = EPS
    if EPS in ref_words or EPS in hyp_words:
        # A real word "*" would be confused with the epsilon: align with a symbol no word uses.
        eps = "<eps>" + "_" * max(len(w) for w in [*ref_words, *hyp_words])
    pairs = kaldialign.align(list(ref_words), list(hyp_words), eps)
    return [(None if r == eps else r, None if h == eps else h) for r, h in pairs]


def counts_from_alignment(pairs: Iterable[AlignPair]) -> ErrorCounts:
    sub = dels = ins = ref_words = 0
    for ref, hyp in pairs:
        if ref is None:
            ins += 1
            continue
        ref_words += 1
        if hyp is None:
            dels += 1
        elif hyp != ref:
            sub += 1
    return ErrorCounts(sub=sub, dels=dels, ins=ins, ref_words=ref_words)


def align_counts(ref_words: Sequence[str], hyp_words: Sequence[str]) -> ErrorCounts:
    return counts_from_alignment(align_words(ref_words, hyp_words))


@dataclass
class UttResult:
    utt_id: str
    ref: list[str]
    hyp: list[str]
    alignment: list[AlignPair]
    counts: ErrorCounts
    missing_hyp: bool = False  # no hypothesis at all (scored as all deletions)


def score_corpus(
    refs: dict[str, str], hyps: dict[str, str], skip_unreferenced: bool = False
) -> tuple[ErrorCounts, list[UttResult]]:
    """Score every reference utterance; words are whitespace-split, compared as given.

    A reference without a hypothesis is scored as all deletions and logged (a decoder that
    silently drops utterances must not look better). A hypothesis without a reference raises,
    or with ``skip_unreferenced`` (a set whose cuts are only partly transcribed: the decoder
    writes every cut's hypothesis) is left out of the score, counted in a warning.
    Per-utterance results are sorted by utterance id.
    """
    unknown = unreferenced_ids(refs, hyps)
    if unknown and not skip_unreferenced:
        raise ValueError(
            f"{len(unknown)} hypothesis utterance(s) have no reference, e.g. {unknown[:5]}"
        )
    if unknown:
        logger.warning(
            "%d of %d hypotheses have no reference; not scored, e.g. %s",
            len(unknown), len(hyps), unknown[:5],
        )  # fmt: skip
    missing = sorted(set(refs) - set(hyps))
    if missing:
        logger.warning(
            "%d of %d utterances have no hypothesis; scored as all deletions, e.g. %s",
            len(missing), len(refs), missing[:5],
        )  # fmt: skip

    total = ErrorCounts()
    per_utt = []
    for utt_id in sorted(refs):
        ref = refs[utt_id].split()
        hyp = hyps.get(utt_id, "").split()
        alignment = align_words(ref, hyp)
        counts = counts_from_alignment(alignment)
        per_utt.append(UttResult(utt_id, ref, hyp, alignment, counts, utt_id not in hyps))
        total = total + counts
    return total, per_utt


def unreferenced_ids(refs: dict[str, str], hyps: dict[str, str]) -> list[str]:
    """The hypotheses' utterance ids that have no reference, sorted."""
    return sorted(set(hyps) - set(refs))


# --------------------------------------------------------------------------- errors file


def format_alignment(pairs: Iterable[AlignPair]) -> str:
    """icefall style: correct words as-is, errors as ``(ref->hyp)`` with ``*`` for nothing."""
    out = []
    for ref, hyp in pairs:
        if ref == hyp:
            out.append(ref)
        else:
            out.append(f"({EPS if ref is None else ref}->{EPS if hyp is None else hyp})")
    return " ".join(out)


def _error_tallies(per_utt: Sequence[UttResult]) -> tuple[Counter, Counter, Counter]:
    subs: Counter = Counter()
    dels: Counter = Counter()
    ins: Counter = Counter()
    for utt in per_utt:
        for ref, hyp in utt.alignment:
            if ref is None:
                ins[hyp] += 1
            elif hyp is None:
                dels[ref] += 1
            elif ref != hyp:
                subs[f"{ref} -> {hyp}"] += 1
    return subs, dels, ins


def _most_frequent_first(counter: Counter) -> list[str]:
    # Ties broken alphabetically so the file is deterministic.
    items = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
    return [f"{count}\t{item}" for item, count in items]


def write_errors_file(path: PathLike, per_utt: Sequence[UttResult], num_unreferenced: int = 0) -> ErrorCounts:
    """Write an icefall-style per-utterance error report atomically; return the totals.
    ``num_unreferenced``: hypotheses left out for want of a reference (score_corpus)."""
    total = sum((u.counts for u in per_utt), ErrorCounts())
    num_missing = sum(u.missing_hyp for u in per_utt)
    lines = [
        total.wer_line(),
        f"Errors: {total.ins} insertions, {total.dels} deletions, {total.sub} substitutions, "
        f"over {total.ref_words} reference words ({total.corr} correct)",
        f"Utterances: {len(per_utt)}, of which {num_missing} had no hypothesis "
        "(scored as all deletions)",
        *([f"Hypotheses without a reference (not scored): {num_unreferenced}"] if num_unreferenced else []),
        "Search below for sections starting with PER-UTT DETAILS:, SUBSTITUTIONS:, "
        "DELETIONS:, INSERTIONS:",
        "",
        "PER-UTT DETAILS: corr or (ref->hyp)",
    ]
    for utt in per_utt:
        missing_note = "  (MISSING: no hypothesis)" if utt.missing_hyp else ""
        lines += [
            f"{utt.utt_id}:\tref={utt.ref!r}",
            f"{utt.utt_id}:\thyp={utt.hyp!r}{missing_note}",
            f"{utt.utt_id}:\t{format_alignment(utt.alignment)}",
        ]
    subs, dels, ins = _error_tallies(per_utt)
    for title, counter in (
        ("SUBSTITUTIONS: count ref -> hyp", subs),
        ("DELETIONS: count ref", dels),
        ("INSERTIONS: count hyp", ins),
    ):
        lines += ["", title, *_most_frequent_first(counter)]
    write_text_atomic(path, "\n".join(lines) + "\n")
    return total


# --------------------------------------------------------------------------- results jsonl


def missing_result_keys(keys: Iterable[str]) -> list[str]:
    present = set(keys)
    return [k for k in REQUIRED_RESULT_KEYS if k not in present]


TIMESTAMP_KEY = "timestamp"


# Keys RESULTS.md formats as numbers (a duration, a size, a WER): a row's value is one or null.
NUMERIC_RESULT_KEYS = ("labeled_seconds", "pseudo_label_seconds", "model_parameters", "teacher_wer",
                       "wer_delta", "wer_delta_low", "wer_delta_high", "p_improvement")


def append_result(results_jsonl: PathLike, row: dict[str, Any]) -> dict[str, Any]:
    """Validate ``row``, stamp it, and append it as one JSON line. Returns the written row, or
    the row already there when the experiment's latest row is this one but for its timestamp:
    a run killed after scoring but before its stage's done mark scores again on the rerun, and
    must not record itself twice."""
    problem = result_row_problem(row)
    if problem:
        raise ValueError(f"results row {problem}")
    row = dict(row)
    row.setdefault(TIMESTAMP_KEY, datetime.now(timezone.utc).isoformat(timespec="seconds"))
    line = json.dumps(row, ensure_ascii=False, allow_nan=False)
    previous = latest_row_of(results_jsonl, experiment_key(row))
    if previous is not None and _without_timestamp(previous) == _without_timestamp(json.loads(line)):
        logger.info("%s already holds this result (written %s); not appended again",
                    results_jsonl, previous.get(TIMESTAMP_KEY))
        return previous
    append_line(results_jsonl, line)
    return row


def result_row_problem(row: dict[str, Any]) -> Optional[str]:
    """What makes ROW unfit for a results file, or None. RESULTS.md formats its numbers as
    numbers: one row with a string there would stop every later render."""
    missing = missing_result_keys(row)
    if missing:
        return f"is missing required key(s): {', '.join(missing)}"
    wer = row["wer"]
    if not finite_number(wer):  # (finite too) inf: insertions over 0 reference words
        return (f"of {row.get('corpus')}/{row.get('test_set')} ({row.get('decoding')}) has a non-finite or "
                f"non-numeric wer: {wer!r} over {row.get('num_words')} reference words")
    not_numbers = [f"{key}={row[key]!r}" for key in NUMERIC_RESULT_KEYS
                   if row.get(key) is not None and not finite_number(row[key])]
    if not_numbers:
        return f"of {row.get('corpus')}/{row.get('test_set')}: {', '.join(not_numbers)} must be a number (or null)"
    return None


def experiment_key(row: dict[str, Any]) -> str:
    """What makes two rows the same experiment (see DEDUP_KEYS), as a comparable string."""
    keys = EXP_DEDUP_KEYS if row.get("exp") is not None else DEDUP_KEYS
    return json.dumps([row.get(k) for k in keys], sort_keys=True)


def latest_row_of(results_jsonl: PathLike, key: str) -> Optional[dict[str, Any]]:
    """The last row of the file (if it exists) with experiment key KEY. Lines that are not JSON
    objects are passed over: they are never the same result (read_results reports them)."""
    path = Path(results_jsonl)
    if not path.exists():
        return None
    latest = None
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and experiment_key(row) == key:
            latest = row
    return latest


def _without_timestamp(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != TIMESTAMP_KEY}


def read_results(results_jsonl: PathLike) -> list[dict[str, Any]]:
    """All rows of a results jsonl, in file order. Blank lines are ignored; anything else
    that is not a JSON object with the required keys raises, naming the line."""
    rows = []
    text = Path(results_jsonl).read_text(encoding="utf-8")
    # lines end at "\n" only: json.dumps(ensure_ascii=False) leaves U+2028, U+0085 (which
    # str.splitlines also breaks at) unescaped inside a row's strings, a command's say
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{results_jsonl}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: malformed JSON line: {err}") from err
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        problem = result_row_problem(row)
        if problem:
            raise ValueError(f"{where}: row {problem}")
        rows.append(row)
    return rows


def in_run_order(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """ROWS sorted by their timestamps (stable: rows of one second, and rows without one, first,
    keep their order). One machine's results file is in run order already; an archive merged
    with another machine's older rows is not, and dedup_latest and with_teacher_wer read file
    order as run order."""
    def recorded_at(row: dict[str, Any]) -> datetime:
        try:
            stamp = datetime.fromisoformat(str(row[TIMESTAMP_KEY]))
        except (KeyError, ValueError):
            return datetime.min.replace(tzinfo=timezone.utc)
        return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)
    return sorted(rows, key=recorded_at)


def dedup_latest(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep one row per experiment key; a later row replaces an earlier one."""
    latest: dict[str, dict[str, Any]] = {}
    for row in rows:
        latest[experiment_key(row)] = row
    return list(latest.values())


def archive_results(results_jsonl: PathLike, archive_jsonl: PathLike) -> int:
    """Append to ``archive_jsonl`` (the recipe's tracked history, created if absent) every row
    of ``results_jsonl`` it does not hold yet; returns how many were added. exp/ is scratch
    space that lives on one machine; the archive keeps each run's rows, so RESULTS.md rendered
    from it keeps the rows of earlier runs (other frontends, heads, machines). The archive is
    rewritten atomically."""
    archive = Path(archive_jsonl)
    kept = read_results(archive) if archive.exists() else []
    seen = {json.dumps(row, sort_keys=True) for row in kept}
    new = [row for row in read_results(results_jsonl) if json.dumps(row, sort_keys=True) not in seen]
    if new:  # in run order: results of an out-of-date exp/ (say, rendered after a pull) are not the latest
        lines = [json.dumps(row, ensure_ascii=False, allow_nan=False) for row in in_run_order(kept + new)]
        write_text_atomic(archive, "\n".join(lines) + "\n")
    return len(new)


def with_teacher_wer(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give each noisy-student row (one with a ``teacher`` exp) ``teacher_wer``: the WER of its
    teacher's latest row before it on the same corpus, set and decoding method, the run that
    taught it. Rows are in run order (a results file appends), so rerunning the teacher's exp
    later does not change what an earlier student is compared against. None where no such row
    was recorded."""
    teacher_wer: dict[tuple, float] = {}
    out = []
    for row in rows:
        where = (row.get("corpus"), row.get("test_set"), row.get("decoding"))
        if row.get("teacher") is not None and "teacher_wer" not in row:
            row = {**row, "teacher_wer": teacher_wer.get((*where, row["teacher"]))}
        teacher_wer[(*where, row.get("exp"))] = row["wer"]
        out.append(row)
    return out


# --------------------------------------------------------------------------- RESULTS.md


def human_duration(seconds: Optional[float]) -> str:
    """1800 -> '30 min', 3600 -> '1 h', 5400 -> '1.5 h', None -> 'all'."""
    if seconds is None:
        return "all"
    if seconds >= 3600:
        return f"{round(seconds / 3600, 2):g} h"
    if seconds >= 60:
        return f"{round(seconds / 60, 2):g} min"
    return f"{seconds:g} s"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("|", "\\|")  # a bare | would split the markdown cell


def _sort_key(value: Any) -> tuple:
    # Mixed None / numbers / strings across rows must still sort: None first, numbers
    # numerically, everything else as text.
    if value is None:
        return (0, 0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, value, "")
    return (2, 0, str(value))


def _row_order(row: dict[str, Any]) -> tuple:
    fields = ("labeled_seconds", "frontend", "pretrained", "head", "decoding", "lm_weight",
              "generation", "exp")  # fmt: skip
    return tuple(_sort_key(row.get(f)) for f in fields)


COLUMNS = (
    ("frontend", "frontend", _cell),
    ("pretrained", "pretrained", _cell),
    ("head", "head", _cell),
    ("decoding", "decoding", _cell),
    ("LM weight", "lm_weight", _cell),
    ("labeled", "labeled_seconds", human_duration),
    ("generation", "generation", _cell),
    ("WER %", "wer", lambda w: f"{w:.2f}"),
    ("sub", "sub", _cell),
    ("del", "del", _cell),
    ("ins", "ins", _cell),
    ("#words", "num_words", _cell),
)


def _fence_for(text: str) -> str:
    """A backtick fence longer than any backtick run inside ``text``."""
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


# Shown after "frontend" only in tables where some row carries it: the decoded model's size,
# which tells systems of one frontend at different sizes apart (and scratch rows, frontend "none").
PARAMETERS_COLUMN = ("parameters", "model_parameters", lambda n: _cell(n) if n is None else f"{n / 1e6:.2f}M")


# Shown after "LM weight" only in tables where some row carries them (shallow-fusion decoding).
FUSION_COLUMNS = (
    ("length bonus", "length_bonus", _cell),
    ("LM perplexity", "lm_perplexity", _cell),
)


# Shown after "generation" only in tables with a noisy-student row: the pseudo-labeled audio the
# student trained on, and its pseudo-labels' WER where the unlabeled pool's true text is known.
NOISY_STUDENT_COLUMNS = (
    ("pseudo-labeled", "pseudo_label_seconds", lambda s: _cell(s) if s is None else human_duration(s)),
    ("pseudo-label WER %", "pseudo_label_wer", _cell),
)
# Last before "WER %" in those tables: the teacher's WER on the same set and method
# (with_teacher_wer), so a student row reads against the system that taught it.
TEACHER_COLUMN = ("teacher WER %", "teacher_wer", lambda w: _cell(w) if w is None else f"{w:.2f}")
# A real corpus's unlabeled pool has no true text: the recipe then reports the same teacher and
# filter on the validation set, as pseudo_label_<set>_wer (e.g. pseudo_label_dev_wer).
_PSEUDO_LABEL_SET_WER = re.compile(r"pseudo_label_(\w+)_wer")


# After "WER %" only in tables where some row was scored against a baseline (sslasr.bin.score
# --baseline: a noisy student against its teacher, a pretrained system against scratch): the
# paired bootstrap's difference this − baseline with its 95 % interval, P(improvement), and the
# baseline's exp directory (the decode directory's parent).
def _delta_cell(row: dict[str, Any]) -> str:
    if row.get("wer_delta") is None:
        return "-"
    return f"{row['wer_delta']:+.2f} [{row['wer_delta_low']:+.2f}, {row['wer_delta_high']:+.2f}]"


BASELINE_COLUMNS = (
    ("Δ WER vs baseline [95 % CI]", None, _delta_cell),
    ("P(improvement)", "p_improvement", lambda p: _cell(p) if p is None else f"{p:.3f}"),
    ("baseline", "baseline", lambda d: _cell(d) if d is None else _cell(str(Path(d).parent))),
)

BASELINE_LEGEND = ("Δ WER vs baseline: this row's WER minus the baseline system's on the same utterances and "
                   "decoding method (a noisy student's teacher, a pretrained system's scratch system), in WER "
                   "points, with the 95 % interval of the paired bootstrap over utterances (Bisani & Ney 2004, "
                   "10,000 resamples); P(improvement): the fraction of resamples in which this row's system "
                   "made fewer errors (`python -m sslasr.bin.compare_wer`).")


def _any_model_size(rows: list[dict[str, Any]]) -> bool:
    """Whether a table shows PARAMETERS_COLUMN: some row carries the decoded model's size."""
    return any(r.get("model_parameters") is not None for r in rows)


def _student_columns(rows: list[dict[str, Any]]) -> list[tuple]:
    columns = [c for c in NOISY_STUDENT_COLUMNS if any(c[1] in r for r in rows)]
    sets = sorted({m.group(1) for r in rows for m in map(_PSEUDO_LABEL_SET_WER.fullmatch, r) if m})
    columns += [(f"pseudo-label WER % ({s})", f"pseudo_label_{s}_wer", _cell) for s in sets]
    if any("teacher_wer" in r for r in rows):
        columns.append(TEACHER_COLUMN)
    return columns


def _columns(rows: list[dict[str, Any]]) -> list[tuple]:
    keys = [key for _, key, _ in COLUMNS]
    fusion = [c for c in FUSION_COLUMNS if any(c[1] in r for r in rows)]
    student = _student_columns(rows)
    after_lm, after_generation = keys.index("lm_weight") + 1, keys.index("generation") + 1
    columns = (list(COLUMNS[:after_lm]) + fusion + list(COLUMNS[after_lm:after_generation]) + student
               + list(COLUMNS[after_generation:]))
    if any(r.get("wer_delta") is not None for r in rows):
        after_wer = next(i for i, c in enumerate(columns) if c[1] == "wer") + 1
        columns[after_wer:after_wer] = BASELINE_COLUMNS
    if _any_model_size(rows):
        columns.insert(keys.index("frontend") + 1, PARAMETERS_COLUMN)
    return columns


def _markdown_table(headers: list[str], body: list[list[str]]) -> list[str]:
    """The lines of a markdown table: header, separator, one line per row of cells."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    return [line(headers), "|" + "---|" * len(headers), *map(line, body)]


def _render_table(rows: list[dict[str, Any]]) -> list[str]:
    with_exp = any("exp" in r for r in rows)
    columns = _columns(rows)
    headers = ["#"] + [h for h, _, _ in columns] + (["exp"] if with_exp else [])
    body = []
    for i, row in enumerate(rows, start=1):
        cells = [str(i)] + [fmt(row) if key is None else fmt(row.get(key)) for _, key, fmt in columns]
        if with_exp:
            cells.append(_cell(row.get("exp")))
        body.append(cells)
    lines = _markdown_table(headers, body)

    if BASELINE_COLUMNS[0] in columns:
        lines += ["", BASELINE_LEGEND]
    # icefall keeps the exact command next to each number; "# n" ties it to the table row.
    commands = "\n".join(f"# {i}\n{row['command']}" for i, row in enumerate(rows, start=1))
    fence = _fence_for(commands)
    return lines + ["", "Commands (by row number):", "", f"{fence}bash", commands, fence]


# The summary table's columns that name a system; its other columns are decoding methods.
SUMMARY_SYSTEM_COLUMNS = (
    ("labeled", "labeled_seconds", human_duration),
    ("frontend", "frontend", _cell),
    PARAMETERS_COLUMN,
    ("pretrained", "pretrained", _cell),
    ("head", "head", _cell),
    ("generation", "generation", _cell),
)


def _method_order(decoding: str) -> tuple:
    """Greedy, then beam, then the rest (lexicon, ...), each without before with an LM."""
    family = next((i for i, word in enumerate(("greedy", "beam")) if word in decoding.split("+")[0]), 2)
    return ("+lm" in decoding, family, decoding)


def _system_key(row: dict[str, Any]) -> str:
    """One system per exp directory; rows without one by what names the system."""
    if row.get("exp") is not None:
        return str(row["exp"])
    return json.dumps([row.get(k) for _, k, _ in SUMMARY_SYSTEM_COLUMNS], sort_keys=True)


def _method(row: dict[str, Any]) -> str:
    """The decoding method without its head's prefix (ctc_beam+lm -> beam+lm): the head has its
    own column, so heads share the method columns."""
    decoding, prefix = str(row["decoding"]), f"{row.get('head')}_"
    return decoding[len(prefix):] if decoding.startswith(prefix) else decoding


def _render_summary(rows: list[dict[str, Any]]) -> list[str]:
    """WER % by system (rows) and decoding method (columns); the lowest of each column in bold.
    The same numbers as the full table below it, laid out to be read at a glance."""
    methods = sorted({_method(r) for r in rows}, key=_method_order)
    systems: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:  # rows come in table order, so systems do too
        systems.setdefault(_system_key(row), {})[_method(row)] = row
    # compared as shown (2 decimals): one error more of 50k words must not unbold an equal-looking cell
    best = {m: min((f"{r[m]['wer']:.2f}" for r in systems.values() if m in r), key=float) for m in methods}
    columns = [c for c in SUMMARY_SYSTEM_COLUMNS if c is not PARAMETERS_COLUMN
               or _any_model_size(rows)]
    with_exp = any("exp" in r for r in rows)
    headers = [h for h, _, _ in columns] + methods + (["exp"] if with_exp else [])
    body = []
    for by_method in systems.values():
        first = next(iter(by_method.values()))
        cells = [fmt(first.get(key)) for _, key, fmt in columns]
        for m in methods:
            shown = f"{by_method[m]['wer']:.2f}" if m in by_method else "-"
            cells.append(f"**{shown}**" if shown == best[m] else shown)
        if with_exp:
            cells.append(_cell(first.get("exp")))
        body.append(cells)
    return _markdown_table(headers, body)


def render_results_md(
    results_jsonl: PathLike, out_md: PathLike, title: str = "Results"
) -> str:
    """Regenerate RESULTS.md from the results jsonl: per (corpus, test set) a summary (WER by
    system and decoding method) and the full table, latest row per experiment, a noisy student's
    with the WER of the teacher run that taught it (with_teacher_wer). Written atomically; the
    markdown is also returned."""
    rows = dedup_latest(with_teacher_wer(in_run_order(read_results(results_jsonl))))
    lines = [
        f"# {title}",
        "",
        f"Generated by `python -m sslasr.bin.render_results` from {results_jsonl} "
        "— do not edit by hand.",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((str(row["corpus"]), str(row["test_set"])), []).append(row)

    current_corpus = None
    for corpus, test_set in sorted(groups):
        if corpus != current_corpus:
            lines += ["", f"## {corpus}"]
            current_corpus = corpus
        table_rows = sorted(groups[(corpus, test_set)], key=_row_order)
        lines += ["", f"### {test_set}", "", "WER % by system and decoding method (the lowest of each "
                  "method in bold):", "", *_render_summary(table_rows),
                  "", "Every result, with its error counts and the command that produced it:", "",
                  *_render_table(table_rows)]
    if not rows:
        lines += ["", "_No results yet._"]

    text = "\n".join(lines) + "\n"
    write_text_atomic(out_md, text)
    return text
