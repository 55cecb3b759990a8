"""Tune shallow fusion's LM weight λ and length bonus β on a dev set: the dev set is encoded once,
then decoded once per grid point; writes the best setting as JSON.

    python -m sslasr.bin.tune_fusion --model exp/ctc_wav2vec2_all/model_final.pt --lm exp/lm/model_final.pt \
        --cuts data/manifests/minisynth_cuts_dev.jsonl.gz --method ctc_beam --out exp/.../tune_ctc_beam/best.json
The grid comes from the model config's `decode.tune` ({lm_weight: [...], length_bonus: [...]})
unless --lm-weights / --length-bonuses are given.
"""

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Dict, List

import torch

from sslasr.data.loader import load_cuts, make_dataloader
from sslasr.data.tokenizer import Tokenizer
from sslasr.decoding.fusion import decode_options, tune_fusion
from sslasr.models.asr import AsrModel, build_asr_model
from sslasr.models.frontends import get_frontend
from sslasr.models.interfaces import EncoderOutput
from sslasr.models.lm import load_lm
from sslasr.utils.io import write_text_atomic
from sslasr.utils.logging import setup_logging


def load_trained_asr(path: str):
    """(model in eval mode, its config, its tokenizer) from a fine-tuning checkpoint."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    cfg = checkpoint["config"]
    tokenizer = Tokenizer(cfg["data"]["tokenizer"])
    model = build_asr_model(cfg, tokenizer.vocab_size)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), cfg, tokenizer


@torch.no_grad()
def encode_cuts(model: AsrModel, cfg: Dict, cuts_path: str, max_duration: float):
    """Every batch's encoder output with its cut ids and reference texts."""
    loader = make_dataloader(load_cuts(cuts_path), input_type=get_frontend(cfg["frontend"]).input_type,
                             max_duration=max_duration, shuffle=False,
                             normalize_waveform=cfg.get("data", {}).get("normalize_waveform", False))
    encoded: List[tuple] = []
    for batch in loader:
        out: EncoderOutput = model.encoder(batch["inputs"], batch["input_lens"])
        encoded.append((out.hidden, out.lengths, batch["cut_ids"], batch["texts"]))
    return encoded


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model_final.pt of a fine-tuned ASR system")
    parser.add_argument("--lm", required=True, help="model_final.pt of a trained LM (task lm)")
    parser.add_argument("--cuts", required=True, help="dev cut manifest (with transcripts)")
    parser.add_argument("--method", required=True, help="a decoding method of the model's head, e.g. ctc_beam")
    parser.add_argument("--out", required=True, type=Path, help="JSON file for the best setting")
    parser.add_argument("--lm-weights", type=float, nargs="+", help="λ grid (default: decode.tune.lm_weight)")
    parser.add_argument("--length-bonuses", type=float, nargs="+", help="β grid (default: decode.tune.length_bonus)")
    parser.add_argument("--beam-size", type=int, help="default: decode.beam_size of the model config, else 8")
    parser.add_argument("--max-duration", type=float, default=200.0, help="seconds of audio per batch")
    parser.add_argument("--num-threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    setup_logging(args.out.parent / "tune_fusion.log")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    model, cfg, tokenizer = load_trained_asr(args.model)
    if args.method not in model.head.methods:
        parser.error(f"--method {args.method}: the head decodes with {', '.join(model.head.methods)}")
    decode_cfg = cfg.get("decode", {})
    tune_cfg = decode_cfg.get("tune", {})
    lm_weights = args.lm_weights or tune_cfg.get("lm_weight")
    length_bonuses = args.length_bonuses or tune_cfg.get("length_bonus", [0.0])
    if not lm_weights:
        parser.error("no λ grid: give --lm-weights or decode.tune.lm_weight in the model config")
    lm = load_lm(args.lm)
    if lm.vocab_size != tokenizer.vocab_size:
        parser.error(f"--lm has {lm.vocab_size} tokens, the ASR tokenizer {tokenizer.vocab_size}")

    start = time.perf_counter()
    encoded = encode_cuts(model, cfg, args.cuts, args.max_duration)
    refs = {cut: text for _, _, cuts, texts in encoded for cut, text in zip(cuts, texts) if text is not None}
    if not refs:
        parser.error(f"{args.cuts} has no transcripts to tune on")

    def decode(lm_weight: float, length_bonus: float) -> Dict[str, str]:
        options = decode_options(decode_cfg, beam_size=args.beam_size, lm=lm, lm_weight=lm_weight,
                                 length_bonus=length_bonus)
        hyps = {}
        with torch.no_grad():
            for hidden, lengths, cuts, _ in encoded:
                for cut, tokens in zip(cuts, model.head.decode(hidden, lengths, args.method, options)):
                    hyps[cut] = tokenizer.decode(tokens)
        logging.info("λ=%g β=%g decoded", lm_weight, length_bonus)
        return hyps

    best = tune_fusion(decode, refs, lm_weights, length_bonuses)
    best.update(method=args.method, lm=str(args.lm), num_utts=len(refs),
                tune_seconds=round(time.perf_counter() - start, 1))
    write_text_atomic(args.out, json.dumps(best, indent=2) + "\n")
    logging.info("best on %s: λ=%g β=%g dev WER %.2f %%", args.cuts, best["lm_weight"], best["length_bonus"],
                 best["dev_wer"])


if __name__ == "__main__":
    main()
