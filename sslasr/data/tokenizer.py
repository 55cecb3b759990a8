"""SentencePiece tokenizer with the icefall id convention: <blk>=0, <sos/eos>=1, <unk>=2."""

import io
import logging
from pathlib import Path
from typing import Iterable, List, Sequence, Union

import sentencepiece as spm

from sslasr.utils.io import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

BLANK, SOS_EOS, UNK = "<blk>", "<sos/eos>", "<unk>"
RESERVED_SYMBOLS = (BLANK, SOS_EOS)  # user-defined pieces: written in a text, sentencepiece returns their ids
MODEL_NAME = "bpe.model"


class Tokenizer:
    """Text <-> token ids. `model_path` is a bpe.model file or the lang folder holding it."""

    def __init__(self, model_path: Union[str, Path]):
        path = Path(model_path)
        if path.is_dir():
            path = path / MODEL_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no sentencepiece model at {path} (run sslasr.bin.train_tokenizer)")
        self.model_path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.blank_id = self.sp.piece_to_id(BLANK)
        self.sos_eos_id = self.sp.piece_to_id(SOS_EOS)
        self.unk_id = self.sp.unk_id()
        if (self.blank_id, self.sos_eos_id, self.unk_id) != (0, 1, 2):
            raise ValueError(f"{path}: expected <blk>=0 <sos/eos>=1 <unk>=2, got "
                             f"{self.blank_id} {self.sos_eos_id} {self.unk_id}")
        self._reserved_ids = frozenset((self.blank_id, self.sos_eos_id))

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self.sp.encode(list(texts), out_type=int)

    def spells_reserved(self, ids: Iterable[int]) -> bool:
        """Whether token IDS hold <blk> or <sos/eos>: a text that spells them (sentencepiece reads
        them as its own symbols), which no CTC target or LM sentence may hold."""
        return not self._reserved_ids.isdisjoint(ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Blank and <sos/eos> are not text, so they are skipped rather than printed."""
        ids = [int(i) for i in ids]
        return self.sp.decode([i for i in ids if i not in (self.blank_id, self.sos_eos_id)])

    def __getstate__(self):  # picklable for DataLoader workers: reload from the file
        return {"model_path": self.model_path}

    def __setstate__(self, state):
        self.__init__(state["model_path"])


def _train(texts: List[str], vocab_size: int, model_type: str, hard_limit: bool) -> bytes:
    """The model's bytes. Trained from memory, not from a file into a file: sentencepiece records
    the input and output paths in the model, and a temporary folder's would make the same
    tokenizer trained again other bytes (and digests, which the recipe compares)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, character_coverage=1.0, input_sentence_size=100_000_000,
        user_defined_symbols=[BLANK, SOS_EOS], unk_id=2, bos_id=-1, eos_id=-1,
        hard_vocab_limit=hard_limit, minloglevel=1,
        # the transcripts as they are: sentencepiece's default NFKC would decode "½" as "1⁄2",
        # "ＡＢＣ" as "ABC", a combining accent as the composed letter, so the hypotheses would
        # differ from references holding the very same text (scored as errors)
        normalization_rule_name="identity")
    return model.getvalue()


def train_tokenizer(texts: Iterable[str], out_dir: Union[str, Path], vocab_size: int,
                    model_type: str = "unigram") -> Tokenizer:
    """Train on `texts` and write OUT/bpe.model (atomically) and OUT/tokens.txt."""
    # one sentence a line, as a text file would give them to sentencepiece
    texts = [line for t in texts if t for line in t.split("\n") if line.strip()]
    if not texts:
        raise ValueError("no non-empty transcripts to train the tokenizer on")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        model = _train(texts, vocab_size, model_type, hard_limit=True)
    except RuntimeError as e:
        if "smaller than required_chars" in str(e):
            raise ValueError(f"vocab size {vocab_size} is below the number of distinct characters in the "
                             f"transcripts plus 3 special tokens; choose a larger --vocab-size") from e
        if "Vocabulary size too high" not in str(e):
            raise
        # Tiny corpora cannot support the requested vocab: take what the text allows.
        log.warning("vocab size %d is too large for %d transcripts (%s); retrying with a soft limit",
                    vocab_size, len(texts), str(e).split("] ")[-1])
        model = _train(texts, vocab_size, model_type, hard_limit=False)
    with atomic_path(out_dir / MODEL_NAME) as final_tmp:
        final_tmp.write_bytes(model)
    tokenizer = Tokenizer(out_dir / MODEL_NAME)
    write_tokens_txt(tokenizer, out_dir / "tokens.txt")
    if tokenizer.vocab_size != vocab_size:
        log.warning("tokenizer has %d tokens instead of the requested %d", tokenizer.vocab_size, vocab_size)
    return tokenizer


def write_tokens_txt(tokenizer: Tokenizer, path: Path) -> None:
    """icefall's tokens.txt: `piece id` per line."""
    sp = tokenizer.sp
    lines = [f"{sp.id_to_piece(i)} {i}" for i in range(sp.get_piece_size())]
    write_text_atomic(path, "\n".join(lines) + "\n")
