"""Decode cut sets with a trained ASR model. Every batch is encoded once and searched with every
method; each (set, method) gets a folder with Kaldi-style hyp.txt / ref.txt and decode_info.json.

    python -m sslasr.bin.decode --model exp/ctc_wav2vec2_all/model_final.pt \\
        --cuts dev=data/manifests/minisynth_cuts_dev.jsonl.gz test=data/manifests/minisynth_cuts_test.jsonl.gz \\
        --methods ctc_greedy ctc_beam ctc_beam+lm --lm exp/lm_char_40/model_final.pt --tune-on dev \\
        --out-dir 'exp/ctc_wav2vec2_all/decode_{set}_{method}'

METHOD+lm is METHOD with shallow fusion, score log p_AM + λ·log p_LM + β·|y|. λ and β are
--lm-weight and --length-bonus, or, with --tune-on SET, the best point on SET (transcribed, one of
--cuts) of the model config's grid `decode.tune` ({lm_weight: [...], length_bonus: [...]}), or of
--tune-lm-weights / --tune-length-bonuses where given (to widen a grid whose best point is on its
edge without retraining). The grid's WERs go to fusion_tuning.json in SET's METHOD+lm folder, which
a resumed run reuses if it covers the same grid (another grid is an error: --overwrite redoes the
tuning and every set's decoding) and was made with the same --lm; SET's METHOD+lm hypotheses are the
best point's, other sets are decoded with the tuned λ, β. A tuning made with another beam size, or
for a lexicon method with another --lexicon (path or contents), is not reused either: it is logged
and tuned again. λ and β are only ever tuned on SET: a
METHOD+lm without a reusable tuning is decoded and tuned there again, even where an earlier run
(with --lm-weight) left a decoding of it.
--lexicon words.txt gives the lexicon of lexicon-constrained methods (ctc_lexicon: the CTC prefix
beam search spelling only those words). `{method}` in --out-dir reads METHOD_lm for METHOD+lm. A (set, method) whose folder holds
decode_info.json is skipped (it is written last) unless --overwrite, when that file records this run's
beam size (beam searches) and --lexicon, and for METHOD+lm its --lm, λ and β (else it is redone). Search settings (beam sizes,
...) come from the model config's `decode` section; --beam-size overrides them. With --confidence,
scores.txt gives each hypothesis's length-normalised score, log p(hyp | audio)/(|hyp| + 1) under the
head's own model (head.log_likelihood; what noisy-student pseudo-label filtering ranks by).
"""

import argparse
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from sslasr.data.loader import (
    check_feature_type, load_cuts, make_dataloader, refuse_several_supervisions, waveform_normalization,
)
from sslasr.data.tokenizer import Tokenizer
from sslasr.decoding.fusion import decode_options, tune_fusion
from sslasr.decoding.lexicon import Lexicon
from sslasr.models.asr import AsrModel, build_asr_model
from sslasr.models.frontends import get_frontend
from sslasr.models.interfaces import DecodeOptions
from sslasr.models.lm import load_lm
from sslasr.utils.devices import resolve_device
from sslasr.utils.io import content_sha256, file_sha256, write_text_atomic
from sslasr.utils.logging import setup_logging

LM_SUFFIX = "+lm"
TUNING_FILE = "fusion_tuning.json"


def load_trained_asr(path: str):
    """(model in eval mode, its config, its tokenizer) from a fine-tuning checkpoint."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    cfg = checkpoint["config"]
    tokenizer = Tokenizer(cfg["data"]["tokenizer"])
    model = build_asr_model(cfg, tokenizer.vocab_size)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), cfg, tokenizer


@dataclass
class Search:
    """One search over a set: a method with fixed options; collects hypotheses and its time."""
    method: str
    options: DecodeOptions
    hyps: Dict[str, str] = field(default_factory=dict)
    scores: Dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class SetPass:
    """What one pass over a set's batches produced: references, audio and encoder time, searches,
    and how many cuts had no transcript (in hyp.txt but not ref.txt: scoring skips them)."""
    searches: Dict[object, Search]
    refs: Dict[str, str] = field(default_factory=dict)
    unreferenced: int = 0
    audio_seconds: float = 0.0
    encode_seconds: float = 0.0


@torch.no_grad()
def hypothesis_scores(head, hidden: torch.Tensor, lengths: torch.Tensor, token_ids: List[List[int]]) -> List[float]:
    """log p(hyp | audio) / (|hyp| + 1) per utterance: the head's probability of its own
    hypothesis (`head.log_likelihood`, not the training loss: a pruned transducer's loss ranked
    looping hypotheses first), per output token (+1 for the end of the sentence, so empty
    hypotheses get a finite score). A hypothesis the head cannot produce from its frames (CTC
    without an alignment) and an utterance with no frames score −inf."""
    scores = []
    for i, tokens in enumerate(token_ids):
        frames = int(lengths[i])
        if frames == 0:  # shorter than the encoder's receptive field: nothing was heard
            scores.append(float("-inf"))
            continue
        log_p = float(head.log_likelihood(hidden[i:i + 1, :frames], lengths[i:i + 1], [tokens])[0])
        scores.append(log_p / (len(tokens) + 1) if log_p == log_p else float("-inf"))
    return scores


def check_decodable(cuts_path: str) -> None:
    """A repeated cut id would be decoded twice but written once (the set scored short), and a cut
    with several supervisions scored against its first transcript alone: both unsaid."""
    cuts = list(load_cuts(cuts_path))
    repeated = [cut_id for cut_id, count in Counter(cut.id for cut in cuts).items() if count > 1]
    if repeated:
        raise ValueError(f"{cuts_path}: {len(repeated)} cut id(s) repeated, e.g. {repeated[:3]}")
    refuse_several_supervisions(cuts, f"{cuts_path}: ")


@torch.no_grad()
def run_searches(model: AsrModel, cfg: Dict, tokenizer: Tokenizer, cuts_path: str,
                 searches: Dict[object, Search], max_duration: float, confidence: bool = False) -> SetPass:
    """Encode each batch of CUTS_PATH once and run every search on the encoder output."""
    loader = make_dataloader(load_cuts(cuts_path), input_type=get_frontend(cfg["frontend"]).input_type,
                             max_duration=max_duration, shuffle=False,
                             **waveform_normalization(cfg.get("data", {})))
    result = SetPass(searches)
    device = next(model.parameters()).device
    for batch in loader:
        start = time.perf_counter()
        encoded = model.encoder(batch["inputs"].to(device), batch["input_lens"].to(device))
        if device.type == "cuda":  # the encoder's time, not its kernel launches'
            torch.cuda.synchronize(device)
        result.encode_seconds += time.perf_counter() - start
        for search in searches.values():
            start = time.perf_counter()
            token_ids = model.head.decode(encoded.hidden, encoded.lengths, search.method, search.options)
            search.seconds += time.perf_counter() - start
            search.hyps.update((cut, tokenizer.decode(t)) for cut, t in zip(batch["cut_ids"], token_ids))
            if confidence:  # not part of the search's time: it is a second pass
                search.scores.update(zip(batch["cut_ids"], hypothesis_scores(
                    model.head, encoded.hidden, encoded.lengths, token_ids)))
        result.refs.update((cut, text) for cut, text in zip(batch["cut_ids"], batch["texts"]) if text is not None)
        result.unreferenced += sum(text is None for text in batch["texts"])
        result.audio_seconds += sum(batch["durations"])
    if result.refs and result.unreferenced:  # a partly transcribed set: say what its WER leaves out
        logging.warning("%s: %d of %d cuts have no transcript: decoded, but left out of ref.txt and its WER",
                        cuts_path, result.unreferenced, result.unreferenced + len(result.refs))
    return result


def write_decoding(out_dir: Path, search: Search, set_pass: SetPass, info: Dict) -> None:
    """hyp.txt (every cut), ref.txt (the cuts with a transcript, when any), then decode_info.json:
    the folder's done mark. An earlier decoding's mark goes first: killed before the new one was
    written, a rerun with the earlier settings would take these hypotheses for that decoding's."""
    (out_dir / "decode_info.json").unlink(missing_ok=True)
    write_text_atomic(out_dir / "hyp.txt", "".join(f"{k} {v}\n" for k, v in sorted(search.hyps.items())))
    if set_pass.refs:
        write_text_atomic(out_dir / "ref.txt", "".join(f"{k} {v}\n" for k, v in sorted(set_pass.refs.items())))
    else:  # another set's transcripts would score these hypotheses
        (out_dir / "ref.txt").unlink(missing_ok=True)
    if search.scores:
        write_text_atomic(out_dir / "scores.txt", "".join(f"{k} {v:.6g}\n" for k, v in sorted(search.scores.items())))
    else:  # an earlier decoding's scores would rank these hypotheses (pseudo_label reads them)
        (out_dir / "scores.txt").unlink(missing_ok=True)
    seconds = set_pass.encode_seconds + search.seconds  # the encoder's share counts in every method's RTF
    info = {**info, "beam_size": search.options.beam_size, "lm_weight": search.options.lm_weight,
            "length_bonus": search.options.length_bonus, "num_utts": len(search.hyps),
            "num_unreferenced": set_pass.unreferenced,
            "audio_seconds": round(set_pass.audio_seconds, 2), "decode_seconds": round(seconds, 3),
            "real_time_factor": round(seconds / max(set_pass.audio_seconds, 1e-9), 5),
            "threads": torch.get_num_threads()}
    write_text_atomic(out_dir / "decode_info.json", json.dumps(info, indent=2) + "\n")
    logging.info("%s: %d utterances, %s, RTF %.4f", out_dir, len(search.hyps), info["method"] +
                 (LM_SUFFIX if info["lm"] else ""), info["real_time_factor"])


def parse_cuts(values: List[str]) -> Dict[str, str]:
    """NAME=PATH items (a lone PATH is named after its file) → {name: path}, in order. A NAME
    is what comes before the first `=` and holds no `/`: a lone path holding `=` needs a `/` before
    it (`/data/run=3/cuts.jsonl.gz`, `./run=3/...`), or a name (`dev=run=3/cuts.jsonl.gz`)."""
    sets = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or "/" in name:
            name, path = "", value
        name = name or Path(path).name.split(".")[0]
        if name in sets:
            raise ValueError(f"--cuts names {name!r} twice")
        sets[name] = path
    return sets


def uses_lexicon(method: str) -> bool:
    """Lexicon-constrained methods are named so (ctc_lexicon, ctc_lexicon+lm)."""
    return "lexicon" in method


def out_dir_of(pattern: str, set_name: str, method: str) -> Path:
    return Path(pattern.format(set=set_name, method=method.replace(LM_SUFFIX, "_lm")))


def main(argv=None) -> None:
    # no abbreviations: the driver refuses --decode-opts that set its own options (--tune-on, ...)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model", required=True, help="model_final.pt written by sslasr.bin.train")
    parser.add_argument("--cuts", required=True, nargs="+", help="NAME=PATH cut manifests (or one PATH)")
    parser.add_argument("--methods", nargs="+", help="methods of the model's head, METHOD+lm with the LM "
                        "(default: the model config's decode.methods and decode.lm_methods)")
    parser.add_argument("--out-dir", required=True,
                        help="folder per (set, method); with several, a pattern with {set} and {method}")
    parser.add_argument("--lm", help="model_final.pt of a token LM (task lm), for the METHOD+lm methods")
    parser.add_argument("--lm-weight", type=float, help="λ (else tuned with --tune-on)")
    parser.add_argument("--length-bonus", type=float, default=0.0, help="β per output token, with --lm-weight")
    parser.add_argument("--lexicon", help="words.txt (one word per line) for lexicon-constrained methods")
    parser.add_argument("--tune-on", help="the set (a --cuts NAME) to tune λ and β on")
    parser.add_argument("--tune-lm-weights", type=float, nargs="+",
                        help="the tuning grid's λ values (default: the model config's decode.tune.lm_weight)")
    parser.add_argument("--tune-length-bonuses", type=float, nargs="+",
                        help="the tuning grid's β values (default: decode.tune.length_bonus, else 0)")
    parser.add_argument("--beam-size", type=int, help="default: the model config's decode.beam_size / lm_beam_size")
    parser.add_argument("--overwrite", action="store_true", help="redo (set, method) folders already decoded")
    parser.add_argument("--confidence", action="store_true", help="also write scores.txt (see above)")
    parser.add_argument("--max-duration", type=float, default=200.0, help="seconds of audio per batch")
    parser.add_argument("--num-threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="auto", help="where the model and LM run: cpu, cuda[:N], or auto "
                        "(the GPU when one is visible)")
    args = parser.parse_args(argv)
    try:
        sets = parse_cuts(args.cuts)
    except ValueError as error:
        parser.error(str(error))
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    device = resolve_device(args.device)
    model, cfg, tokenizer = load_trained_asr(args.model)
    model.to(device)
    model_parameters = sum(p.numel() for p in model.parameters())  # recorded in every decode_info.json
    for cuts_path in sets.values():  # an fbank model on another extractor's features decodes nonsense
        try:
            check_feature_type(cuts_path, cfg.get("data", {}).get("feature_type"), args.model)
            check_decodable(cuts_path)
        except ValueError as error:
            parser.error(str(error))
    decode_cfg = cfg.get("decode", {})
    methods = args.methods or (decode_cfg.get("methods", [model.head.greedy_method])
                               + [m + LM_SUFFIX for m in decode_cfg.get("lm_methods", [])])
    fused = [m for m in methods if m.endswith(LM_SUFFIX)]
    for method in methods:
        if method.removesuffix(LM_SUFFIX) not in model.head.methods:
            parser.error(f"method {method}: the {cfg.get('head', {}).get('name', 'ctc')} head decodes with "
                         f"{', '.join(model.head.methods)} (the searches also as METHOD{LM_SUFFIX})")
        if method == model.head.greedy_method + LM_SUFFIX:  # its output would be greedy's, reported as fused
            parser.error(f"method {method}: greedy search takes no LM; fuse one with a beam search")
    if (len(sets) > 1 and "{set}" not in args.out_dir) or (len(methods) > 1 and "{method}" not in args.out_dir):
        parser.error("--out-dir needs {set} and {method} in it to tell several sets and methods apart")
    lm = load_lm(args.lm).to(device) if fused and args.lm else None
    if fused and lm is None:
        parser.error(f"{', '.join(fused)} need --lm")
    if lm is not None and lm.vocab_size != tokenizer.vocab_size:
        parser.error(f"--lm has {lm.vocab_size} tokens, the ASR tokenizer {tokenizer.vocab_size}")
    if fused and args.lm_weight is None and args.tune_on not in sets:
        parser.error("the LM methods need --lm-weight, or --tune-on naming one of the --cuts sets")
    lexicon = Lexicon.load(args.lexicon, tokenizer) if args.lexicon else None
    constrained = [m for m in methods if uses_lexicon(m)]
    if lexicon is None and constrained:
        parser.error(f"{', '.join(constrained)} need --lexicon")
    setup_logging(out_dir_of(args.out_dir, next(iter(sets)), methods[0]).parent / "decode.log")

    def options(method: str, lm_weight: float = 0.0, length_bonus: float = 0.0) -> DecodeOptions:
        if not method.endswith(LM_SUFFIX):
            return decode_options(decode_cfg, beam_size=args.beam_size, lexicon=lexicon)
        return decode_options(decode_cfg, beam_size=args.beam_size, lm=lm, lm_weight=lm_weight,
                              length_bonus=length_bonus, lexicon=lexicon)

    grid = tuning_grid(decode_cfg.get("tune", {}), args.tune_lm_weights, args.tune_length_bonuses)
    fusion = known_fusion(args, fused, grid, lambda method: options(method).beam_size)
    if len(fusion) < len(fused) and not grid["lm_weight"]:
        parser.error("tuning λ and β needs a grid: decode.tune.lm_weight (and length_bonus) in the model "
                     "config, or --tune-lm-weights (and --tune-length-bonuses)")

    inputs = {method: search_inputs(args, method) for method in methods}  # once per method, not per set
    # the tuning set first: the other sets' fused searches use its λ, β
    for set_name in sorted(sets, key=lambda name: name != args.tune_on):
        cuts_sha256 = content_sha256(sets[set_name])  # (gzip's header holds a time: the same cuts written again)
        pending = [m for m in methods if args.overwrite or not already_decoded(
            out_dir_of(args.out_dir, set_name, m), m, fusion, inputs[m], options(m, *fusion.get(m, (0.0, 0.0))).beam_size,
            args.confidence, cuts_sha256)]
        if not pending:
            logging.info("%s: every method already decoded", set_name)
            continue
        searches = plan_searches(pending, fusion, grid if set_name == args.tune_on else None, options)
        set_pass = run_searches(model, cfg, tokenizer, sets[set_name], searches, args.max_duration, args.confidence)
        for method in pending:
            out_dir = out_dir_of(args.out_dir, set_name, method)
            info = {"method": method.removesuffix(LM_SUFFIX), "set": set_name, "cuts": sets[set_name],
                    "cuts_sha256": cuts_sha256, **inputs[method], "model_parameters": model_parameters,
                    "device": device.type}
            if method not in searches:
                settings = tuning_settings(inputs[method], options(method).beam_size)
                search = tune_on_set(method, searches, set_pass, out_dir, settings)
                fusion[method] = (search.options.lm_weight, search.options.length_bonus)
                info["tuned_on"] = set_name
            else:
                search = searches[method]
                if method.endswith(LM_SUFFIX) and args.lm_weight is None:
                    info["tuned_on"] = args.tune_on
            write_decoding(out_dir, search, set_pass, info)


def tuning_grid(config_grid: Dict, lm_weights: Optional[List[float]], length_bonuses: Optional[List[float]]) -> Dict:
    """The λ, β grid to tune on: the command line's axes where given, else the model config's."""
    return {"lm_weight": [float(x) for x in (lm_weights or config_grid.get("lm_weight") or [])],
            "length_bonus": [float(x) for x in (length_bonuses or config_grid.get("length_bonus") or [0.0])]}


def search_inputs(args, method: str) -> Dict:
    """The files METHOD's search reads, by path and contents (recorded in decode_info.json, and
    with a tuning): the model's contents, the LM of METHOD+lm and the set its λ, β are tuned on
    (--tune-on; a set made again is tuned on again), the lexicon of a lexicon-constrained method."""
    lm = args.lm if method.endswith(LM_SUFFIX) else None
    lexicon = args.lexicon if uses_lexicon(method) else None
    tuned_on = parse_cuts(args.cuts).get(args.tune_on) if lm and args.lm_weight is None else None
    return {"model_sha256": file_sha256(args.model), "lm": lm, "lm_sha256": file_sha256(lm), "lexicon": lexicon,
            "lexicon_sha256": file_sha256(lexicon), "tune_cuts_sha256": content_sha256(tuned_on) if tuned_on else None}


def tuning_settings(inputs: Dict, beam_size: int) -> Dict:
    """What the λ, β of a METHOD+lm were tuned with besides the grid, recorded in TUNING_FILE: its
    search's INPUTS (search_inputs: the LM and, for a lexicon method, the lexicon) and the beam
    size; the best λ, β move with each."""
    return {**inputs, "beam_size": beam_size}


def known_fusion(args, fused: List[str], grid: Dict, beam_size_of: Callable[[str], int]
                 ) -> Dict[str, Tuple[float, float]]:
    """METHOD+lm → (λ, β) known before decoding: given, or saved by an earlier run's tuning over
    the same grid with the same settings (tuning_settings; BEAM_SIZE_OF gives this run's beam
    size of a method). One made with other settings is logged and tuned again. A tuning over
    another grid is an error rather than silently kept: the other sets were decoded with its λ, β,
    so only --overwrite (all redone) makes them consistent."""
    if args.lm_weight is not None:
        return {method: (args.lm_weight, args.length_bonus) for method in fused}
    wanted = {(lw, lb) for lw in grid["lm_weight"] for lb in grid["length_bonus"]}
    fusion = {}
    for method in fused:
        tuning = out_dir_of(args.out_dir, args.tune_on, method) / TUNING_FILE
        if tuning.exists() and not args.overwrite:
            best = json.loads(tuning.read_text())
            settings = tuning_settings(search_inputs(args, method), beam_size_of(method))
            # a setting the file does not name (older files) is taken as this run's
            changed = sorted(key for key, value in settings.items() if best.get(key, value) != value)
            if changed:
                logging.warning("%s was tuned with %s: tuning %s on %s again", tuning, ", ".join(
                    f"{key} {best[key]!r} (this run: {settings[key]!r})" for key in changed), method, args.tune_on)
                continue
            tuned = {(point["lm_weight"], point["length_bonus"]) for point in best["grid"]}
            if wanted and tuned != wanted:
                raise SystemExit(f"{tuning} tuned λ, β over {_grid_text(tuned)}, this run asks for "
                                 f"{_grid_text(wanted)}: add --overwrite to tune and decode every set again (a recipe's "
                                 f"run.sh passes it under --force true: --stage 7 --force true)")
            fusion[method] = (best["lm_weight"], best["length_bonus"])
    return fusion


def _grid_text(points) -> str:
    lm_weights, length_bonuses = sorted({lw for lw, _ in points}), sorted({lb for _, lb in points})
    return f"λ {lm_weights} × β {length_bonuses}"


def already_decoded(out_dir: Path, method: str, fusion: Dict[str, Tuple[float, float]], inputs: Dict,
                    beam_size: int, confidence: bool = False, cuts_sha256: Optional[str] = None) -> bool:
    """Whether OUT_DIR holds a finished decoding of METHOD as this run would make it: of this
    model and set (CUTS_SHA256: the manifest's contents), with this run's beam size and lexicon,
    and for METHOD+lm its LM and λ, β (an earlier run's, say with --lm-weight, is redone; while λ,
    β are still to be tuned nothing counts as decoded). The model, LM and lexicon are their
    contents (INPUTS, search_inputs): one retrained in place (stage 6 with more text) is another
    (files from before contents were recorded are taken by path). With CONFIDENCE, the folder
    must hold scores.txt as well."""
    info_file = out_dir / "decode_info.json"
    if not info_file.exists():
        return False
    info = json.loads(info_file.read_text())
    if confidence and not (out_dir / "scores.txt").exists():
        return False
    recorded = {"model_sha256": inputs["model_sha256"], "cuts_sha256": cuts_sha256}
    if any(info.get(key, value) != value for key, value in recorded.items()):  # made again since
        return False
    searched_with_beam = not method.removesuffix(LM_SUFFIX).endswith("_greedy")
    if (searched_with_beam and info.get("beam_size") != beam_size) or info.get("lexicon") != inputs["lexicon"]:
        return False
    if info.get("lexicon_sha256", inputs["lexicon_sha256"]) != inputs["lexicon_sha256"]:
        return False
    if not method.endswith(LM_SUFFIX):
        return True
    if method not in fusion or info.get("lm_sha256", inputs["lm_sha256"]) != inputs["lm_sha256"]:
        return False
    return (info.get("lm"), info.get("lm_weight"), info.get("length_bonus")) == (inputs["lm"], *fusion[method])


def plan_searches(pending: List[str], fusion: Dict[str, Tuple[float, float]], grid: Optional[Dict],
                  options: Callable[..., DecodeOptions]) -> Dict[object, Search]:
    """One search per method; a METHOD+lm whose λ, β are still unknown gets one per grid point,
    keyed (METHOD+lm, λ, β), and is tuned on this set. GRID is None on any set but the tuning set:
    tuning anywhere else would choose λ, β on data they are then evaluated on."""
    searches: Dict[object, Search] = {}
    for method in pending:
        base = method.removesuffix(LM_SUFFIX)
        if method in fusion or not method.endswith(LM_SUFFIX):
            searches[method] = Search(base, options(method, *fusion.get(method, (0.0, 0.0))))
            continue
        if grid is None:
            raise ValueError(f"{method}: λ and β are not known yet and this is not the tuning set")
        for lm_weight in grid["lm_weight"]:
            for length_bonus in grid.get("length_bonus", [0.0]):
                point = (method, float(lm_weight), float(length_bonus))
                searches[point] = Search(base, options(method, *point[1:]))
    return searches


def tune_on_set(method: str, searches: Dict[object, Search], set_pass: SetPass, out_dir: Path,
                settings: Dict) -> Search:
    """The grid point of METHOD+lm with the lowest WER on this (transcribed) set; writes the grid
    and the SETTINGS (tuning_settings) it was tuned with."""
    if not set_pass.refs:
        raise SystemExit(f"cannot tune λ, β of {method} on a set without transcripts ({out_dir})")
    points = {key[1:]: search for key, search in searches.items() if isinstance(key, tuple) and key[0] == method}
    lm_weights = sorted({lw for lw, _ in points}, key=[lw for lw, _ in points].index)
    length_bonuses = sorted({lb for _, lb in points}, key=[lb for _, lb in points].index)
    best = tune_fusion(lambda lw, lb: points[(lw, lb)].hyps, set_pass.refs, lm_weights, length_bonuses)
    write_text_atomic(out_dir / TUNING_FILE, json.dumps({**best, "method": method, **settings,
                                                         "num_utts": len(set_pass.refs)}, indent=2) + "\n")
    logging.info("%s: best λ=%g β=%g, WER %.2f %% on %s", method, best["lm_weight"], best["length_bonus"],
                 best["dev_wer"], out_dir)
    return points[(best["lm_weight"], best["length_bonus"])]


if __name__ == "__main__":
    main()
