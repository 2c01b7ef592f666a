"""The workflow layer: everything that runs training, from one teacher to a whole study.

- `train_teacher` (rbkd.study.teacher) / `distill` (rbkd.study.student): one content-addressed
  run each (reused when done, resumed when killed, refused when the folder holds another run);
- `load_study` / `run_study`: a declared study (TOML, docs/studies.md) expanded into its runs,
  run once each, with tidy tables (results.csv/.jsonl) and a report (`write_report`).

`rbkd.analysis` holds the analyses these use and imports nothing from here.

The names load on first use (PEP 562): reading and checking a study file (rbkd.study.schema,
rbkd.study.plan) imports no torch, so `rbkd study run --dry-run` and a bad file's one-line error
are quick.
"""

from rbkd._lazy import lazy_names

# name -> the module that defines it, imported when the name is first used.
_LAZY = {
    "StudyFileError": "rbkd.study.schema",
    "distill": "rbkd.study.student",
    "limit_dataset": "rbkd.study.splits",
    "load_splits": "rbkd.study.splits",
    "load_study": "rbkd.study.schema",
    "parse_study": "rbkd.study.schema",
    "run_study": "rbkd.study.runner",
    "train_teacher": "rbkd.study.teacher",
}

__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_names(__name__, globals(), _LAZY)
