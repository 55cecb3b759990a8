"""Text batches for language-model training: sentences from cut manifests (their transcripts) or
plain text files (one sentence a line), tokenised once, batched by token count.

Resuming mid-epoch works as for the audio loader: `TokenBatchSampler` is deterministic given
(sentences, seed, epoch, world_size, rank), so the trainer calls `sampler.set_epoch(epoch)` and
skips the batches it had consumed.
"""

import logging
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Sequence, Union

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from sslasr.data.tokenizer import RESERVED_SYMBOLS, Tokenizer
from sslasr.models.lm import teacher_forcing_batch

log = logging.getLogger(__name__)

PathOrPaths = Union[str, Path, Sequence[Union[str, Path]], None]


def _as_list(paths: PathOrPaths) -> List[Path]:
    if paths is None:
        return []
    if isinstance(paths, (str, Path)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def read_sentences(paths: PathOrPaths) -> List[str]:
    """Non-empty sentences from each path: a lhotse cut manifest (`*.jsonl.gz` / `*.jsonl`: the
    supervision texts) or a text file (a sentence per line)."""
    sentences: List[str] = []
    for path in _as_list(paths):
        if not path.is_file():
            raise FileNotFoundError(f"LM text {path} does not exist")
        if path.name.endswith((".jsonl.gz", ".jsonl")):
            from sslasr.data.loader import load_cuts
            texts = (s.text for cut in load_cuts(path) for s in cut.supervisions)
        else:
            # lines end at \n only (U+2028 and kin can sit inside a sentence); an editor's BOM is dropped
            # (newline="": a lone \r is whitespace inside the sentence, as kaldi_table reads it)
            with open(path, encoding="utf-8-sig", newline="") as f:
                texts = f.read().split("\n")
        before = len(sentences)
        # words one space apart, as in the manifests: sentencepiece's word boundary is a space, the
        # lexicon's and scoring's any whitespace
        sentences.extend(" ".join(t.split()) for t in texts if t and t.strip())
        if len(sentences) == before:
            raise ValueError(f"LM text {path} holds no sentences")
    return sentences


class TokenBatchSampler(Sampler):
    """Batches of sentence indices holding at most `max_tokens` padded tokens (sentence + <eos>),
    or one sentence longer than that alone.

    Training (shuffle): each epoch a seeded permutation is cut into pools of ~100 batches, each
    pool sorted by length (little padding), and the batches' order shuffled; rank r of W takes
    every W-th batch, the epoch's first batches repeated to make the count a multiple of W (as
    lhotse's samplers pad): DDP ranks step together, so a rank with a batch fewer would end the
    epoch for all, its peers' last batch never trained on, and with fewer batches than ranks no
    rank could train at all. Evaluation: corpus order, every sentence once over the ranks."""

    def __init__(self, lengths: Sequence[int], max_tokens: int, shuffle: bool, seed: int = 0,
                 world_size: int = 1, rank: int = 0):
        longer = sum(length + 1 > max_tokens for length in lengths)
        if longer:  # one paragraph of an extra text file must not stop the training, nor be lost
            log.warning("%d sentences are longer than max_tokens %d (the longest: %d tokens + <eos>): each is a "
                        "batch of its own", longer, max_tokens, max(lengths))
        self.lengths = np.asarray(lengths) + 1
        self.max_tokens, self.shuffle, self.seed = max_tokens, shuffle, seed
        self.world_size, self.rank = world_size, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> List[List[int]]:
        order = np.arange(len(self.lengths))
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.shuffle:
            order = rng.permutation(order)
            pool = max(1, 100 * self.max_tokens // int(self.lengths.mean()))
            order = np.concatenate([chunk[np.argsort(self.lengths[chunk], kind="stable")]
                                    for chunk in np.array_split(order, max(1, len(order) // pool))])
        batches, current, longest = [], [], 0
        for index in order.tolist():
            length = int(self.lengths[index])
            if current and max(longest, length) * (len(current) + 1) > self.max_tokens:
                batches.append(current)
                current, longest = [], 0
            current.append(index)
            longest = max(longest, length)
        if current:
            batches.append(current)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
            batches = padded_to_multiple(batches, self.world_size)
        return batches[self.rank::self.world_size]

    def __iter__(self) -> Iterator[List[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def padded_to_multiple(batches: List[List[int]], world_size: int) -> List[List[int]]:
    """BATCHES followed by as many of them again, from the first, cycling (fewer batches than
    ranks), as make the count a multiple of WORLD_SIZE."""
    missing = -len(batches) % world_size
    return batches + [batches[i % len(batches)] for i in range(missing)]


class TextDataset(Dataset):
    """Indices → {"inputs", "targets" (B, L+1), "num_targets"} for teacher forcing."""

    def __init__(self, token_ids: List[List[int]], vocab_size: int):
        self.token_ids, self.vocab_size = token_ids, vocab_size

    def __len__(self) -> int:
        return len(self.token_ids)

    def __getitem__(self, indices: List[int]) -> Dict:
        sequences = [self.token_ids[i] for i in indices]
        inputs, targets = teacher_forcing_batch(sequences, self.vocab_size)
        return {"inputs": inputs, "targets": targets, "num_targets": sum(len(s) + 1 for s in sequences)}


def tokenize_sentences(sentences: Iterable[str], tokenizer: Tokenizer, drop_unknown: bool = True) -> List[List[int]]:
    """Token ids per sentence. Dropped and counted: sentences that tokenise to nothing, and (for
    training, `drop_unknown`) those with characters the tokenizer never saw (<unk>: an LM trained on
    them would learn to predict <unk>, e.g. from lower-case or digit text beside upper-case letter
    tokens). Evaluation keeps them, counted, so a perplexity covers the whole text. Always dropped:
    sentences that spell <blk> or <sos/eos>, which the tokenizer reads as its own symbols."""
    sentences = list(sentences)
    ids = tokenizer.encode_batch(sentences)
    empty = sum(1 for s in ids if not s)
    marked = [i for i, s in enumerate(ids) if tokenizer.spells_reserved(s)]
    if marked:  # no LM can be trained or scored on a blank or an <eos> inside a sentence
        log.warning("dropped %d sentences that spell the tokenizer's reserved symbols (%s), e.g. %r", len(marked),
                    " ".join(RESERVED_SYMBOLS), sentences[marked[0]][:80])
        ids = [[] if tokenizer.spells_reserved(s) else s for s in ids]
    unknown = [i for i, s in enumerate(ids) if tokenizer.unk_id in s]
    if empty:
        log.warning("dropped %d sentences that tokenise to nothing", empty)
    if unknown:
        example = sentences[unknown[0]]
        log.warning("%s %d sentences with characters outside the tokenizer (%s), e.g. %r",
                    "dropped" if drop_unknown else "kept (as <unk>)", len(unknown), tokenizer.model_path,
                    example if len(example) <= 80 else example[:77] + "...")
    kept = [s for s in ids if s and not (drop_unknown and tokenizer.unk_id in s)]
    if not kept:
        raise ValueError(f"no LM sentences left after tokenisation ({empty} empty, {len(marked)} with reserved "
                         f"symbols, {len(unknown)} with characters outside the tokenizer {tokenizer.model_path})")
    return kept


def make_text_dataloader(paths: PathOrPaths, tokenizer: Tokenizer, *, max_tokens: int, shuffle: bool,
                         seed: int = 0, world_size: int = 1, rank: int = 0, drop_unknown: bool = True) -> DataLoader:
    token_ids = tokenize_sentences(read_sentences(paths), tokenizer, drop_unknown)
    sampler = TokenBatchSampler([len(s) for s in token_ids], max_tokens, shuffle, seed, world_size, rank)
    return DataLoader(TextDataset(token_ids, tokenizer.vocab_size), batch_size=None, sampler=sampler,
                      num_workers=0, persistent_workers=False)
