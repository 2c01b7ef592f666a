"""A tiny text corpus and tokenizer for language-model tests (rbkd.lm), written in a few ms.

`write_tiny_corpus(folder)` writes `files` text files of seeded sentences from a small grammar
(nested folders, .rst.txt, .md and .txt names, one hidden file that must be skipped), so that a
byte-level BPE of a few hundred entries learns real merges and a tiny model can learn something.
"""

from __future__ import annotations

import random
from pathlib import Path

SUBJECTS = ["the parser", "a module", "this function", "the interpreter", "every object", "a list"]
VERBS = ["returns", "raises", "reads", "writes", "calls", "imports", "creates", "checks"]
OBJECTS = ["a value", "the file", "an exception", "the result", "a new string", "its argument"]
ENDINGS = [".", " when it is called.", " for each item.", " if the flag is set.", " at once."]


def sentence(rng: random.Random) -> str:
    text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(ENDINGS)}"
    return text[0].upper() + text[1:]


def write_tiny_corpus(folder: Path, files: int = 24, sentences: int = 30, seed: int = 0) -> Path:
    rng = random.Random(seed)
    for i in range(files):
        sub = ("library", "tutorial", "howto")[i % 3]
        suffix = (".rst.txt", ".md", ".txt")[i % 3]
        path = folder / sub / f"page{i:02d}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        title = f"Page {i}\n{'=' * (len(str(i)) + 5)}\n\n"
        body = " ".join(sentence(rng) for _ in range(sentences + i))
        path.write_text(title + body + "\n\n   >>> print(len([1, 2, 3]))\n   3\n")
    (folder / ".hidden.txt").write_text("never read")
    (folder / "notes.bin").write_bytes(b"\x00\x01 not text")
    return folder
