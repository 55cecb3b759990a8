"""Write the lexicon of lexicon-constrained decoding: the distinct words of the LM's text.

    python -m sslasr.bin.lexicon --text data/manifests/x_cuts_train.jsonl.gz extra.txt --out exp/lm_char_40/words.txt

--text takes cut manifests (their supervision texts) and text files (a sentence per line), as
the LM's training text does.
"""

import argparse
import logging

from sslasr.data.text import read_sentences
from sslasr.decoding.lexicon import write_words
from sslasr.utils.logging import setup_logging


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", nargs="+", required=True, help="cut manifests and text files")
    parser.add_argument("--out", required=True, help="words.txt to write")
    args = parser.parse_args(argv)
    setup_logging()
    sentences = read_sentences(args.text)
    count = write_words(sentences, args.out)
    logging.info("lexicon: %d words from %d sentences -> %s", count, len(sentences), args.out)


if __name__ == "__main__":
    main()
