"""Real-time factor of every decoding method of the minisynth-size ASR model, side by side.

RTF = (encoder + search seconds) / audio seconds, on `--threads` torch threads (default 2). The
encoder runs once per batch and its time is added to every method's search time, so the
methods differ only in their search. Methods: each of the head's `decode.methods`, and each of
its `decode.lm_methods` with the LM ("+lm"), from the recipe's fine-tuning YAML.

    .venv/bin/python bench/decode_rtf.py                                   # CTC head, random init
    .venv/bin/python bench/decode_rtf.py --head attention                 # another head's finetune yaml
    .venv/bin/python bench/decode_rtf.py --model exp/.../model_final.pt --lm exp/lm_char_40/model_final.pt \
        --cuts data/manifests/minisynth_cuts_dev.jsonl.gz                  # trained models, real audio

A random-init CTC model is the worst case for beam search (near-uniform posteriors: no
blank-dominated frame is skipped); a trained one is faster.
"""

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from sslasr.decoding.fusion import decode_options
from sslasr.models.asr import build_asr_model
from sslasr.models.lm import build_lm, load_lm
from sslasr.utils.config import load_configs

ROOT = Path(__file__).resolve().parents[1]
RECIPE_CONF = ROOT / "egs/minisynth/conf"
TARGETS = {"ctc_greedy": 0.01, "ctc_beam+lm": 0.1}


def build_models(args) -> Tuple[torch.nn.Module, Dict, torch.nn.Module]:
    if args.model:
        checkpoint = torch.load(args.model, map_location="cpu", weights_only=False)
        cfg = checkpoint["config"]
        vocab = checkpoint["model"]["head.proj.weight"].shape[0] if "head.proj.weight" in checkpoint["model"] else args.vocab
        model = build_asr_model(cfg, vocab)
        model.load_state_dict(checkpoint["model"])
    else:
        cfg = load_configs([RECIPE_CONF / "frontend_wav2vec2.yaml", RECIPE_CONF / f"finetune_{args.head}.yaml"])
        model = build_asr_model(cfg, args.vocab)
    if args.lm:
        lm = load_lm(args.lm)
    else:
        lm = build_lm(load_configs([RECIPE_CONF / "lm.yaml"])["lm"], args.vocab)
    return model.eval(), cfg, lm.eval()


def inputs(args) -> List[Tuple[torch.Tensor, torch.Tensor, float]]:
    """Batches of (waveforms, lengths, audio seconds): real cuts, or seeded noise."""
    if args.cuts:
        from sslasr.data.loader import load_cuts, make_dataloader
        loader = make_dataloader(load_cuts(args.cuts), input_type="waveform", max_duration=args.batch * 3.0,
                                 shuffle=False)
        batches = []
        for batch in loader:
            batches.append((batch["inputs"], batch["input_lens"], sum(batch["durations"])))
            if sum(b[2] for b in batches) >= args.batch * args.seconds * args.batches:
                break
        return batches
    generator = torch.Generator().manual_seed(args.seed)
    samples = int(args.seconds * 16000)
    return [(torch.randn(args.batch, samples, generator=generator), torch.full((args.batch,), samples),
             args.batch * args.seconds) for _ in range(args.batches)]


def methods_of(cfg: Dict, model) -> List[Tuple[str, bool]]:
    decode = cfg.get("decode", {})
    plan = [(m, False) for m in decode.get("methods", model.head.methods)]
    plan += [(m, True) for m in decode.get("lm_methods", [])]
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", default="ctc", help="recipe finetune_<head>.yaml for a random-init model")
    parser.add_argument("--model", help="a fine-tuned model_final.pt instead of random init")
    parser.add_argument("--lm", help="a trained LM instead of a random-init conf/lm.yaml one")
    parser.add_argument("--cuts", help="decode these cuts' audio instead of noise")
    parser.add_argument("--vocab", type=int, default=30, help="vocabulary size of random-init models")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per noise utterance")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes; the median is reported")
    parser.add_argument("--lm-weight", type=float, default=0.5)
    parser.add_argument("--length-bonus", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, cfg, lm = build_models(args)
    batches = inputs(args)
    audio = sum(b[2] for b in batches)
    print(f"threads {args.threads}, load average {os.getloadavg()[0]:.2f}, {audio:.1f} s of "
          f"{'real' if args.cuts else 'noise'} audio, {'trained' if args.model else 'random-init'} "
          f"{cfg.get('head', {}).get('name', 'ctc')} model, {'trained' if args.lm else 'random-init'} "
          f"{lm.cfg.__class__.__name__}")

    with torch.no_grad():
        model.decode(*batches[0][:2], model.head.greedy_method)  # warm-up
        encode_times, encoded = [], None
        for _ in range(args.repeats):
            with Stopwatch() as watch:
                encoded = [model.encoder(x, n) for x, n, _ in batches]
            encode_times.append(watch.seconds)
        encode = _median(encode_times)

        rows = []
        for method, with_lm in methods_of(cfg, model):
            options = decode_options(cfg.get("decode"), lm=lm if with_lm else None,
                                     lm_weight=args.lm_weight if with_lm else 0.0,
                                     length_bonus=args.length_bonus if with_lm else 0.0)
            times = []
            for _ in range(args.repeats):
                with Stopwatch() as watch:
                    for out in encoded:
                        model.head.decode(out.hidden, out.lengths, method, options)
                times.append(watch.seconds)
            rows.append((method + ("+lm" if with_lm else ""), _median(times)))

    # CPU RTF = CPU seconds of all threads / audio seconds. With --threads 1 it is what the wall
    # RTF would be on an otherwise idle machine: robust to other load, unlike the wall clock.
    greedy = encode[0] + rows[0][1][0]
    print(f"\n{'method':<16}{'search RTF':>11}{'total RTF':>11}{'CPU RTF':>9}{'× first':>9}   target (total RTF)")
    print(f"{'(encoder)':<16}{'':>11}{encode[0] / audio:>11.4f}{encode[1] / audio:>9.4f}")
    for name, (wall, cpu) in rows:
        total = (encode[0] + wall) / audio
        target = TARGETS.get(name)
        verdict = "" if target is None else f"≤ {target:g}" + (" ok" if total <= target else " missed")
        print(f"{name:<16}{wall / audio:>11.4f}{total:>11.4f}{(encode[1] + cpu) / audio:>9.4f}"
              f"{(encode[0] + wall) / greedy:>8.1f}×   {verdict}")


class Stopwatch:
    """Wall-clock and process CPU seconds of a block."""

    def __enter__(self):
        self.start = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc):
        self.seconds = (time.perf_counter() - self.start[0], time.process_time() - self.start[1])
        return False


def _median(pairs):
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


if __name__ == "__main__":
    main()
