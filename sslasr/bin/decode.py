"""Decode a cut set with a trained ASR model; writes Kaldi-style hyp.txt / ref.txt.

    python -m sslasr.bin.decode --model exp/ctc_wav2vec2_all/model_final.pt \
        --cuts data/manifests/minisynth_cuts_test.jsonl.gz --method ctc_greedy --out-dir exp/.../decode_test
With shallow fusion: --method ctc_beam --lm exp/lm_char_40/model_final.pt --lm-weight 0.5 --length-bonus 1.0
(λ and β from sslasr.bin.tune_fusion). Search settings default to the model config's `decode` section.
"""

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from sslasr.data.loader import load_cuts, make_dataloader
from sslasr.data.tokenizer import Tokenizer
from sslasr.models.asr import build_asr_model
from sslasr.models.frontends import get_frontend
from sslasr.decoding.fusion import decode_options
from sslasr.models.lm import load_lm
from sslasr.utils.io import write_text_atomic
from sslasr.utils.logging import setup_logging


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model_final.pt written by sslasr.bin.train")
    parser.add_argument("--cuts", required=True)
    parser.add_argument("--out-dir", required=True, type=Path)
    parser.add_argument("--method", default="ctc_greedy", help="a method of the model's head (e.g. ctc_greedy)")
    parser.add_argument("--beam-size", type=int, help="default: decode.beam_size of the model config, else 8")
    parser.add_argument("--lm", help="model_final.pt of a token LM (task lm): shallow fusion")
    parser.add_argument("--lm-weight", type=float, help="λ in log p_AM + λ·log p_LM + β·|y| (needed with --lm)")
    parser.add_argument("--length-bonus", type=float, default=0.0, help="β, per output token")
    parser.add_argument("--max-duration", type=float, default=200.0, help="seconds of audio per batch")
    parser.add_argument("--num-threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    setup_logging(args.out_dir / "decode.log")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    checkpoint = torch.load(args.model, map_location="cpu", weights_only=False)
    cfg = checkpoint["config"]
    tokenizer = Tokenizer(cfg["data"]["tokenizer"])
    model = build_asr_model(cfg, tokenizer.vocab_size)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    if args.method not in model.head.methods:
        parser.error(f"--method {args.method}: the {cfg['head'].get('name', 'ctc')} head decodes with "
                     f"{', '.join(model.head.methods)}")
    lm = load_lm(args.lm) if args.lm else None
    if lm is not None and args.lm_weight is None:
        parser.error("--lm needs --lm-weight (tune λ and β with sslasr.bin.tune_fusion)")
    if lm is not None and lm.vocab_size != tokenizer.vocab_size:
        parser.error(f"--lm has {lm.vocab_size} tokens, the ASR tokenizer {tokenizer.vocab_size}")
    options = decode_options(cfg.get("decode"), beam_size=args.beam_size, lm=lm,
                             lm_weight=args.lm_weight if lm is not None else 0.0, length_bonus=args.length_bonus)
    loader = make_dataloader(load_cuts(args.cuts), input_type=get_frontend(cfg["frontend"]).input_type,
                             max_duration=args.max_duration, shuffle=False,
                             normalize_waveform=cfg.get("data", {}).get("normalize_waveform", False))

    hyps, refs, audio_seconds = {}, {}, 0.0
    start = time.perf_counter()
    for batch in loader:
        for cut_id, tokens, text in zip(batch["cut_ids"], model.decode(batch["inputs"], batch["input_lens"], args.method, options),
                                        batch["texts"]):
            hyps[cut_id] = tokenizer.decode(tokens)
            if text is not None:
                refs[cut_id] = text
        audio_seconds += sum(batch["durations"])
    elapsed = time.perf_counter() - start

    write_text_atomic(args.out_dir / "hyp.txt", "".join(f"{k} {v}\n" for k, v in sorted(hyps.items())))
    if refs:
        write_text_atomic(args.out_dir / "ref.txt", "".join(f"{k} {v}\n" for k, v in sorted(refs.items())))
    info = {"method": args.method, "beam_size": options.beam_size, "lm": args.lm, "lm_weight": options.lm_weight,
            "length_bonus": options.length_bonus, "num_utts": len(hyps), "audio_seconds": round(audio_seconds, 2),
            "decode_seconds": round(elapsed, 3), "real_time_factor": round(elapsed / max(audio_seconds, 1e-9), 5),
            "threads": torch.get_num_threads()}
    write_text_atomic(args.out_dir / "decode_info.json", json.dumps(info, indent=2) + "\n")
    logging.info("decoded %d utterances with %s in %.1f s (RTF %.4f)", len(hyps), args.method, elapsed,
                 info["real_time_factor"])


if __name__ == "__main__":
    main()
