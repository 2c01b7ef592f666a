"""`rbkd lm ...`: language models on a real corpus (issues 16 and 17).

Each command lives in a module of its own and is registered here with `app.command(name)(fn)`;
the modules import torch, transformers and rbkd.lm only inside their commands, so `rbkd lm -h`
stays light.
"""

from __future__ import annotations

from rbkd.cli.lm_data import tokenize
from rbkd.cli.lm_softlabels import soft_labels
from rbkd.cli.lm_train import distill, train_teacher
from rbkd.cli.typer_app import new_app

app = new_app(
    help="Language models: tokenise a corpus, train a teacher, capture its sparse soft labels, distill."
)

app.command("tokenize")(tokenize)
app.command("soft-labels")(soft_labels)
app.command("train-teacher")(train_teacher)
app.command("distill")(distill)
