"""An LM study's token splits: the corpus, its tokenizer, and the heads each cell reads.

Teachers train on the train split (or its first `train_tokens`); the students and the stores
share one head of it, `[data] student_tokens` long, so that every store row is a student
position; validation is the corpus's fixed validation split (rbkd.lm.corpus). `--limit N` cuts
every head to at most N tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rbkd.lm.train.tokens import split_identity


@dataclass
class LMData:
    train: object  # rbkd.lm.tokens.TokenSplit, the whole train split
    validation: object
    teacher_train: dict[str, object]  # teacher name -> its head of the train split
    student_train: object  # the head the stores cover and the students distil on
    tokenizer_path: Path | None

    def identities(self, precision: str) -> dict:
        return {
            "teacher_train": {n: split_identity(s) for n, s in self.teacher_train.items()},
            "student_train": split_identity(self.student_train),
            "validation": split_identity(self.validation),
            "vocab_size": self.train.vocab_size,
            "precision": precision,
        }


def _head(split, n: int | None, limit: int | None):
    want = [x for x in (n, limit) if x is not None]
    if not want or min(want) >= len(split):
        return split
    return split.head(max(2, min(want)))


def load_lm_data(study: dict, *, progress: bool = False) -> LMData:
    """The study's splits (tokenised on first use, cached by content: rbkd.lm.tokens)."""
    from rbkd.lm.corpus import load_corpus
    from rbkd.lm.tokenizer import tokenizer_for
    from rbkd.lm.tokens import tokenize_split

    corpus = load_corpus(study["corpus"])
    tok = tokenizer_for(corpus, study["vocab_size"] or 8192, study["tokenizer"])
    train = tokenize_split(corpus, tok, "train", progress=progress)
    val = tokenize_split(corpus, tok, "validation", progress=progress)
    limit = study["limit"]
    teachers = {t["name"]: _head(train, t["train_tokens"], limit) for t in study["teachers"]}
    student = _head(train, study["data"]["student_tokens"], limit)
    return LMData(train, val, teachers, student, getattr(tok, "path", None))


def resolved_precision(device: str) -> str:
    from rbkd.engine.device import resolve_device
    from rbkd.lm.train.loop import resolve_precision

    return resolve_precision("auto", resolve_device(device))
