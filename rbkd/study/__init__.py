"""The workflow layer: everything that runs training, from one teacher to a whole study.

- `train_teacher` / `distill`: one content-addressed run each (reused when done, resumed when
  killed, refused when the folder holds another run);
- `load_study` / `run_study`: a declared study (TOML, docs/studies.md) expanded into its runs,
  run once each, with tidy tables (results.csv/.jsonl) and a report (`write_report`).

`rbkd.analysis` holds the analyses these use and imports nothing from here.
"""

from rbkd.study.distill import distill
from rbkd.study.runner import run_study
from rbkd.study.schema import StudyFileError, load_study, parse_study
from rbkd.study.splits import limit_dataset, load_splits
from rbkd.study.teacher import train_teacher

__all__ = [
    "StudyFileError",
    "distill",
    "limit_dataset",
    "load_splits",
    "load_study",
    "parse_study",
    "run_study",
    "train_teacher",
]
