"""rbkd.lm: language-model distillation from stored sparse soft labels (issues 16 and 17).

rbkd.lm.corpus     a text folder (default pydocs: Python 3.11's documentation sources), split by
                   file, with its SHA-256 (docs/lm-data.md)
rbkd.lm.tokenizer  a byte-level BPE trained on the train split, saved as tokenizer.json with its hash
rbkd.lm.tokens     the split as memory-mapped token shards, served as fixed-length blocks
rbkd.lm.store      the sparse soft-label store: safetensors shards plus an index (docs/sparse-soft-labels.md)
rbkd.lm.capture    a Hugging Face causal LM's soft labels over a token split, written to a store
"""
