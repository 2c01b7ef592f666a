"""A byte-level BPE tokenizer for a corpus (Hugging Face `tokenizers`), saved as tokenizer.json.

`train_tokenizer(corpus, vocab_size=8192)` trains a GPT-2-style byte-level BPE on the corpus's
train split only (the validation files never shape the vocabulary), with one special token,
`<|endoftext|>` (id 0), which ends every document in the token stream (rbkd.lm.tokens). It is
saved as `tokenizer.json` (atomically) and identified by that file's SHA-256. Training is
deterministic: the same corpus and vocabulary size give the same file.

`tokenizer_for(corpus, vocab_size)` reuses the one trained before, kept content-addressed in the
cache (`~/.cache/rbkd/lm/tokenizers/<corpus sha256 [:16]>-bpe<V>/tokenizer.json`);
`load_tokenizer(path)` loads any tokenizer.json (`--tokenizer FILE`). Measured on the 2-core CPU
(shared): the 8192-entry BPE trains on pydocs' train split (10.6 MB) in 5.0-6.4 s and gives 3.91
characters per token on the train split, 3.92 on validation (docs/lm-data.md).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from rbkd.io import read_bounded, write_bytes

__all__ = [
    "DEFAULT_VOCAB_SIZE",
    "EOS_TOKEN",
    "LMTokenizer",
    "default_tokenizer_path",
    "load_tokenizer",
    "tokenizer_for",
    "train_tokenizer",
]

DEFAULT_VOCAB_SIZE = 8192
EOS_TOKEN = "<|endoftext|>"
MAX_TOKENIZER_BYTES = 256 << 20  # a 256k-entry BPE's tokenizer.json is about 20 MB


@dataclass(frozen=True)
class LMTokenizer:
    """A loaded tokenizer.json: the `tokenizers.Tokenizer`, its file's SHA-256 and its EOS id."""

    tokenizer: object  # tokenizers.Tokenizer
    sha256: str
    path: Path | None
    eos_id: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (the Rust encoder's threads)."""
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def to_hf(self):
        """The same tokenizer as transformers' PreTrainedTokenizerFast (for Trainer users)."""
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(
            tokenizer_object=self.tokenizer, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN
        )


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError(
            "rbkd's language-model tools need Hugging Face tokenizers and transformers: "
            "pip install 'rbkd[lm]' (from a checkout: pip install -e '.[lm]')"
        ) from None
    return tokenizers


def _from_bytes(data: bytes, path: Path | None) -> LMTokenizer:
    Tokenizer = _tokenizers().Tokenizer

    where = path if path is not None else "tokenizer"
    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # tokenizers raises its own Exception type
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{where} is not a readable tokenizer.json ({first[:200]})") from None
    eos = tok.token_to_id(EOS_TOKEN)
    if eos is None:  # another family's tokenizer: its own end-of-text token, if it names one
        specials = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]
        eos = tok.token_to_id(specials[0]) if specials else None
    if eos is None:
        raise ValueError(
            f"{where} has no special token to end documents with (rbkd's is {EOS_TOKEN!r}): add "
            "one, or train a tokenizer with `rbkd lm tokenizer`"
        )
    return LMTokenizer(tok, hashlib.sha256(data).hexdigest(), path, eos)


def load_tokenizer(path: str | os.PathLike[str]) -> LMTokenizer:
    """A tokenizer.json (or a folder holding one); ValueError/FileNotFoundError in one line."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {path} not found: give a tokenizer.json")
    return _from_bytes(read_bounded(path, MAX_TOKENIZER_BYTES, "tokenizer"), path)


def train_tokenizer(corpus, vocab_size: int = DEFAULT_VOCAB_SIZE, out=None) -> LMTokenizer:
    """Train a byte-level BPE of `vocab_size` entries on `corpus`'s train split (an
    rbkd.lm.corpus.Corpus); with `out`, save it there as tokenizer.json (atomically)."""
    tk = _tokenizers()
    Tokenizer, decoders, models = tk.Tokenizer, tk.decoders, tk.models
    pre_tokenizers, trainers = tk.pre_tokenizers, tk.trainers

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
        raise ValueError(
            f"vocab_size must be an int >= 257 (256 bytes and the end-of-text token), got "
            f"{vocab_size!r}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((text for _, text in corpus.documents("train")), trainer=trainer)
    data = tok.to_str().encode()
    path = None if out is None else write_bytes(out, data)
    return _from_bytes(data, path)


def default_tokenizer_path(corpus, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    from rbkd.data.locate import cache_dir

    key = f"{corpus.sha256[:16]}-bpe{vocab_size}"
    return cache_dir() / "lm" / "tokenizers" / key / "tokenizer.json"


def tokenizer_for(
    corpus, vocab_size: int = DEFAULT_VOCAB_SIZE, path: str | os.PathLike[str] | None = None
) -> LMTokenizer:
    """`path`'s tokenizer when given; else the corpus's BPE from the cache, trained (and saved
    there) on first use."""
    if path is not None:
        return load_tokenizer(path)
    cached = default_tokenizer_path(corpus, vocab_size)
    if cached.is_file():
        return load_tokenizer(cached)
    return train_tokenizer(corpus, vocab_size, out=cached)
