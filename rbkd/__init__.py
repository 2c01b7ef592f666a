"""rbkd: response-based knowledge distillation.

Fused kernels for the temperature softmax, the KD loss and soft-label entropy (`rbkd.ops`), a training
engine for teachers and students (`rbkd.engine`), soft labels stored as safetensors
(`rbkd.softlabels`) and the `rbkd` command line (`rbkd.cli`).
"""

__version__ = "0.1.0"
