"""Token perplexity of a trained LM on text (cut manifests' transcripts or text files), as JSON.

    python -m sslasr.bin.lm_perplexity --lm exp/lm_char_40/model_final.pt \
        --text data/manifests/minisynth_cuts_dev.jsonl.gz --out exp/lm_char_40/perplexity.json
Perplexity = exp(−Σ log p(token) / N) over every token and each sentence's <eos>.
"""

import argparse
import json
import math
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from sslasr.data.text import read_sentences, tokenize_sentences
from sslasr.data.tokenizer import Tokenizer
from sslasr.models.lm import TokenLM, load_lm
from sslasr.utils.io import write_text_atomic


def perplexity(lm: TokenLM, sequences: List[List[int]], batch_size: int = 64) -> Dict[str, float]:
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        total += float(lm.score_sequences(chunk).sum())
        count += sum(len(s) + 1 for s in chunk)
    return {"perplexity": math.exp(-total / count), "log_prob": total, "num_tokens": count,
            "num_sentences": len(sequences)}


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm", required=True, help="model_final.pt of an lm task")
    parser.add_argument("--text", required=True, nargs="+", help="cut manifests and/or text files")
    parser.add_argument("--tokenizer", help="bpe.model (default: data.tokenizer of the LM's config)")
    parser.add_argument("--out", type=Path, help="JSON output (printed when absent)")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    lm = load_lm(args.lm)
    tokenizer_path = args.tokenizer or torch.load(args.lm, map_location="cpu", weights_only=False)["config"]["data"]["tokenizer"]
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.vocab_size != lm.vocab_size:
        parser.error(f"the tokenizer has {tokenizer.vocab_size} tokens, the LM {lm.vocab_size}")
    try:
        sentences = read_sentences(args.text)
    except (FileNotFoundError, ValueError) as err:  # a missing file, or one without sentences
        parser.error(str(err))
    result = perplexity(lm, tokenize_sentences(sentences, tokenizer, drop_unknown=False))
    result = {"perplexity": round(result["perplexity"], 4), **{k: v for k, v in result.items() if k != "perplexity"},
              "text": args.text, "lm": args.lm}
    text = json.dumps(result, indent=2) + "\n"
    if args.out:
        write_text_atomic(args.out, text)
    print(text, end="")


if __name__ == "__main__":
    main()
