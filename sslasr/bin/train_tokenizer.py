"""Train a sentencepiece tokenizer on the transcripts of one or more cut manifests.

    python -m sslasr.bin.train_tokenizer --cuts data/manifests/x_cuts_train.jsonl.gz \
        --out-dir data/lang_bpe_500 --vocab-size 500 [--model-type unigram|bpe]

Writes OUT/bpe.model and OUT/tokens.txt (<blk>=0, <sos/eos>=1, <unk>=2).
"""

import argparse
import logging
from typing import Iterator, Sequence

from sslasr.data.loader import load_cuts
from sslasr.data.tokenizer import train_tokenizer


def iter_texts(paths: Sequence[str]) -> Iterator[str]:
    for path in paths:
        for cut in load_cuts(path):
            for sup in cut.supervisions:
                if sup.text:
                    yield sup.text


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cuts", nargs="+", required=True, help="cut manifests whose texts are used")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", choices=["unigram", "bpe", "char"], default="unigram")
    return p


def main(argv=None) -> None:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tokenizer = train_tokenizer(iter_texts(args.cuts), args.out_dir, args.vocab_size, args.model_type)
    logging.info("wrote %s (%d tokens)", tokenizer.model_path, tokenizer.vocab_size)


if __name__ == "__main__":
    main()
