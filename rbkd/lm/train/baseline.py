"""The unigram baseline: the perplexity of the validation tokens under the training split's
token frequencies (add-one smoothed over the vocabulary), scored on exactly the validation
windows the model is scored on. A model that learnt nothing from context scores about this."""

from __future__ import annotations

import math

import torch

from rbkd.lm.train.tokens import num_windows, read_windows

_CHUNK = 1 << 20  # tokens counted per read: the split is streamed, never held


def unigram_perplexity(train, val, context: int, eval_tokens: int) -> float:
    vocab = train.vocab_size
    counts = torch.ones(vocab, dtype=torch.float64)  # add-one
    for start in range(0, len(train), _CHUNK):
        ids = train.tokens(start, min(start + _CHUNK, len(train)))
        counts += torch.bincount(ids, minlength=vocab)[:vocab].double()
    logp = counts.log() - counts.sum().log()
    total = num_windows(val, context)
    if eval_tokens:
        total = min(total, max(eval_tokens // context, 1))
    nll, n = 0.0, 0
    for j in range(0, total, 64):
        labels = read_windows(val, torch.arange(j, min(j + 64, total)), context)[:, 1:]
        nll -= float(logp[labels.clamp(0, vocab - 1)].sum())
        n += labels.numel()
    return math.exp(nll / n) if n else math.nan
