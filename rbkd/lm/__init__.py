"""rbkd.lm: language-model distillation from stored sparse soft labels (issue 16).

rbkd.lm.store   the sparse soft-label store: safetensors shards plus an index (docs/sparse-soft-labels.md)
"""
