"""Language-model training for rbkd: causal-LM teachers and students (issue 17).

It lives BESIDE rbkd's engine (rbkd.engine.fit), not inside it, and reuses the engine's parts.
fit() is one epoch loop over an image tensor held on the device: a batch is an index slice of
a per-epoch permutation, a checkpoint is written per epoch. A language model trains for a
number of optimizer steps over a token stream that is read, never held (a memory-mapped file),
with a learning-rate schedule, warm-up, clipping, accumulation and autocast, and is evaluated
and checkpointed every N steps. Folding that into fit() would have given it a second loop; here
the step loop (loop.py) is its own ~300 lines and everything around it is the engine's:

    run folders, content keys  rbkd.study.keys.run_key, rbkd.study.runstate.run_state,
                               rbkd.engine.rundir.check_run_folder (config.json, metrics.jsonl)
    resume                     rbkd.engine.checkpoint (one safetensors file, atomic; its
                               "epoch" counts completed optimizer steps here)
    lock                       rbkd.engine.distributed.main_folder_lock, rbkd.locking.folder_lock
    provenance                 rbkd.provenance.run_provenance / recording
    torchrun / DDP             rbkd.engine.distributed (setup, wrap_model, on_main, shard)
    seeds                      rbkd.engine.seeds.derive_seed (per step: resume replays exactly)

    config.py      LMTrainConfig: the training hyper-parameters (torch-free)
    schedule.py    AdamW's cosine learning rate with linear warm-up
    models.py      GPT-2 teachers and students from named sizes or a config JSON; HF folders
    tokens.py      what the loop reads of a token split (rbkd.lm.tokens'), and the window order
    objectives.py  hard labels, dense KD from a teacher online, sparse KD from a store
    store_reader   the store's rows for a batch's token positions (rbkd.lm.store underneath)
    loop.py        fit_lm: the step loop
    runs.py        train_teacher / distill: the verbs (keys, folders, resume, reuse)

docs/lm-training.md says what it does and what it measured.
"""

from __future__ import annotations

from rbkd._lazy import lazy_names

_LAZY = {
    "LMTrainConfig": "rbkd.lm.train.config",
    "MemoryTokens": "rbkd.lm.train.tokens",
    "fit_lm": "rbkd.lm.train.loop",
    "train_teacher": "rbkd.lm.train.runs",
    "distill": "rbkd.lm.train.runs",
    "MODEL_SIZES": "rbkd.lm.train.config",
}
__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_names(__name__, globals(), _LAZY)
