"""rbkd.lm: language-model distillation from stored sparse soft labels (issues 16 and 17).

rbkd.lm.corpus     a text folder (default pydocs: Python 3.11's documentation sources), split by
                   file, with its SHA-256 (docs/lm-data.md)
rbkd.lm.tokenizer  a byte-level BPE trained on the train split, saved as tokenizer.json with its hash
rbkd.lm.tokens     the split as memory-mapped token shards, served as fixed-length blocks
rbkd.lm.store      the sparse soft-label store: safetensors shards plus an index (docs/sparse-soft-labels.md)
rbkd.lm.capture    a Hugging Face causal LM's soft labels over a token split, written to a store
"""

from rbkd._lazy import lazy_names

# Language-model training (rbkd.lm.train, docs/lm-training.md), loaded on first use.
_LAZY = {"train_teacher": "rbkd.lm.train.runs", "distill": "rbkd.lm.train.runs",
         "LMTrainConfig": "rbkd.lm.train.config",
         # rbkd.lm.capture(model, tokens, out, ...): the function (its module is callable too)
         "capture": "rbkd.lm.capture", "corpus_tokens": "rbkd.lm.tokens",
         "load_teacher": "rbkd.lm.capture"}  # fmt: skip
__getattr__, __dir__ = lazy_names(__name__, globals(), _LAZY)
