"""A word lexicon as a prefix tree over token ids, for lexicon-constrained search.

With a letter (or word-piece) CTC model every search path spells something, and on little
transcribed speech much of it is misspelt. Constraining the hypothesis to words of a lexicon
(as wav2vec 2.0's letter models are decoded: flashlight's lexicon decoder) turns a near-miss
spelling into the closest word the acoustics and the LM agree on.

Each word is tokenized on its own, as the tokenizer does with every whitespace-separated word
of a sentence (sentencepiece starts it with a '▁' piece), and inserted into a trie. A search
state is a trie node: node 0 is the root, where a word starts. Appending token c at node n
  - follows the edge n --c--> n' when the trie has one (the word goes on), else
  - when n ends a word (or is the root), starts the next word: root --c--> n'.
Any other token is not allowed. A hypothesis is complete when its node ends a word.
"""

import logging
from pathlib import Path
from typing import Iterable, List, Union

import numpy as np

from sslasr.data.tokenizer import Tokenizer
from sslasr.utils.io import write_text_atomic

log = logging.getLogger(__name__)

ROOT = 0
NOT_ALLOWED = -1


class Lexicon:
    """The trie of `words` spelt with `tokenizer`. Its edges are kept sorted by (node, token)
    key, node · V + token, and looked up by binary search: a dense nodes × V table would take
    ~10 GB for a LibriSpeech-size lexicon (~1M nodes) with a 5000-piece vocabulary."""

    def __init__(self, words: Iterable[str], tokenizer: Tokenizer):
        given = sorted({w for w in words if w})
        if not given:
            raise ValueError("a lexicon needs at least one word")
        edges: List[dict] = [{}]
        word_end = [False]
        self.words: List[str] = []  # those spelt: a word with a letter the tokenizer never saw is not
        for word in given:
            tokens = tokenizer.encode(word)
            if not tokens or tokenizer.unk_id in tokens:
                continue
            self.words.append(word)
            node = ROOT
            for token in tokens:
                if token not in edges[node]:
                    edges[node][token] = len(edges)
                    edges.append({})
                    word_end.append(False)
                node = edges[node][token]
            word_end[node] = True
        if not self.words:  # every hypothesis would be empty: 100 % deletions, as if decoded
            raise ValueError(f"no word of the lexicon can be spelt with the tokenizer (e.g. {given[0]!r} has "
                             f"tokens outside its vocabulary: another case or alphabet?)")
        if len(self.words) < len(given):
            log.warning("lexicon: %d of %d words have tokens outside the tokenizer's vocabulary; left out",
                        len(given) - len(self.words), len(given))
        self.vocab_size = tokenizer.vocab_size
        keys = [(node * self.vocab_size + token, target) for node, out in enumerate(edges) for token, target in out.items()]
        keys.sort()
        self.edge_keys = np.array([key for key, _ in keys], dtype=np.int64)
        self.edge_targets = np.array([target for _, target in keys], dtype=np.int64)
        self.word_end = np.array(word_end)
        self.word_end[ROOT] = True  # nothing spelt yet: an empty hypothesis is complete

    @classmethod
    def load(cls, path: Union[str, Path], tokenizer: Tokenizer) -> "Lexicon":
        """From a words.txt: one word per line (a Kaldi words.txt's second column is ignored)."""
        words = [line.split()[0] for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        return cls(words, tokenizer)

    def next_nodes(self, nodes: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """(K,) nodes × (C,) tokens → (K, C) next nodes, NOT_ALLOWED where the token cannot follow."""
        nodes, tokens = np.asarray(nodes, dtype=np.int64), np.asarray(tokens, dtype=np.int64)
        inside = self.child(nodes[:, None], tokens[None, :])
        new_word = np.where(self.word_end[nodes][:, None], self.child(np.array([ROOT]), tokens)[None, :], NOT_ALLOWED)
        return np.where(inside != NOT_ALLOWED, inside, new_word)

    def child(self, nodes: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """The node the edge NODES --TOKENS--> leads to (broadcast), NOT_ALLOWED where there is none."""
        keys = nodes * self.vocab_size + tokens
        at = np.minimum(np.searchsorted(self.edge_keys, keys), len(self.edge_keys) - 1)
        return np.where(self.edge_keys[at] == keys, self.edge_targets[at], NOT_ALLOWED)

    def is_complete(self, nodes: np.ndarray) -> np.ndarray:
        return self.word_end[nodes]


def write_words(sentences: Iterable[str], path: Union[str, Path]) -> int:
    """The distinct words of `sentences`, sorted, one per line (atomically); returns their count."""
    words = sorted({word for sentence in sentences for word in sentence.split()})
    write_text_atomic(Path(path), "".join(f"{w}\n" for w in words))
    return len(words)
