"""The reproduction report of a study: the thesis's tables and figures from a study's output folder.

`write_report(study_dir)` reads the folder `rbkd study run` writes (study.json, teachers.jsonl,
results.jsonl and the teacher run folders; docs/studies.md is the contract) and writes
`report/report.md` with Markdown tables and the figures next to it:

- missing-class tables, classes x T per teacher (thesis tables 5.1-5.6) and classes x A for label
  smoothing (table 5.7), as Markdown and as annotated heatmaps;
- soft-label entropy against T with the label-smoothing band and ln C (figures 5.1-5.4), per
  class per teacher, and the entropy form of the hypothesis (figures 5.15 / 6.8);
- transfer-set curves, entropy-selected against random, seeds as error bands, with the full-data
  student as reference (figures 5.5, 5.8, 6.6);
- teacher entropy against batch size and against epochs (figures 6.2-6.4);
- student accuracy against T per teacher (figure 6.5);
- the top highest-entropy training images per class (figures 5.6-5.13) and penultimate-layer
  projections side by side (figures 5.14 / 6.7): these two read the teacher runs and the dataset;
- the noise baseline and a summary table per experiment.

A section whose experiment or rows are missing is skipped with a line saying why, so a report can
be written at any moment of a running study. Accuracies are shown in percent; with several seeds a
cell is mean ± sample standard deviation (n - 1) over the seeds.

The package, one idea a file: load (the folder, seed statistics), markdown (cells and tables),
document (the report being written), rows (what sections ask of the rows), one module per section
family (overview, missing_class, entropy, transfer_set, sweeps, images, noise, summary), and write
(`write_report`).
"""

from rbkd.study.report.document import DATASET_TITLES
from rbkd.study.report.entropy import plot_entropy_hypothesis_
from rbkd.study.report.load import StudyOutput, mean_std, read_jsonl, read_study_output
from rbkd.study.report.markdown import DASH, format_cell, markdown_table
from rbkd.study.report.rows import entropy_at, headline_T
from rbkd.study.report.summary import EXPERIMENT_ORDER
from rbkd.study.report.write import FORMATS, MANIFEST_FILE, REPORT_FILE, SECTIONS, write_report

__all__ = [
    "DASH",
    "DATASET_TITLES",
    "EXPERIMENT_ORDER",
    "FORMATS",
    "MANIFEST_FILE",
    "REPORT_FILE",
    "SECTIONS",
    "StudyOutput",
    "entropy_at",
    "format_cell",
    "headline_T",
    "markdown_table",
    "mean_std",
    "plot_entropy_hypothesis_",
    "read_jsonl",
    "read_study_output",
    "write_report",
]
