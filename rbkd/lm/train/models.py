"""GPT-2-style causal language models from named sizes or a config JSON, and their Hugging Face
folders (config.json + model.safetensors, what `from_pretrained` and `rbkd lm soft-labels` load).

The sizes were chosen by measurement on the 2-core CPU (docs/lm-training.md): at vocabulary
8192 and context 256, "teacher" has 13.9M parameters and "student" 2.5M, about a fifth of it
(most of a small model's parameters are its embedding, which the student keeps whole).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from rbkd.engine.seeds import derive_seed
from rbkd.io import read_json_file
from rbkd.lm.train.config import MODEL_SIZES

_INIT_STREAM = 7  # derive_seed stream of the initial weights (the loop's are 0 and 1)
HF_FOLDER = "model"  # <run>/model/: the Hugging Face folder of the final weights


def model_config(size: str | os.PathLike | dict, vocab_size: int, context: int) -> dict[str, Any]:
    """The GPT-2 config (a plain dict) of a named size or of a config JSON file (a dict, or a path
    to one), for a vocabulary and context. One ValueError line when they do not fit together."""
    if isinstance(size, str) and size in MODEL_SIZES:
        config = {"model_type": "gpt2", **MODEL_SIZES[size], "vocab_size": vocab_size,
                  "n_positions": context}  # fmt: skip
    else:
        config = size if isinstance(size, dict) else _read_config_file(Path(size))
        config = {"model_type": "gpt2", **config}
        config.setdefault("vocab_size", vocab_size)
        config.setdefault("n_positions", context)
        if config["model_type"] != "gpt2":
            raise ValueError(
                f"the model config's model_type is {config['model_type']!r}; rbkd lm trains "
                "GPT-2-style models (model_type 'gpt2')"
            )
    # No dropout by default: the runs see each token at most a few times (docs/lm-training.md).
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        config.setdefault(name, 0.0)
    # GPT-2's own bos/eos id 50256 lies outside a small vocabulary; the corpus marks documents.
    config.setdefault("bos_token_id", None)
    config.setdefault("eos_token_id", None)
    if config["vocab_size"] != vocab_size:
        raise ValueError(
            f"the model's vocabulary is {config['vocab_size']} ids but the tokenizer's is "
            f"{vocab_size}: give a config with vocab_size {vocab_size}"
        )
    if config["n_positions"] < context:
        raise ValueError(
            f"sequences of {context} tokens are longer than the model's context "
            f"(n_positions {config['n_positions']}): use --context {config['n_positions']} or less"
        )
    return config


def _read_config_file(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(
            f"--model {path}: neither a size ({', '.join(MODEL_SIZES)}) nor a config JSON file"
        )
    config = read_json_file(path, "model config")
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds no JSON object: give a GPT-2 config.json")
    return config


def build_model(config: dict, seed: int) -> torch.nn.Module:
    """A GPT2LMHeadModel with initial weights drawn from `seed` alone (the caller's RNG untouched)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, _INIT_STREAM))
        try:
            hf_config = GPT2Config(**{k: v for k, v in config.items() if k != "model_type"})
            return GPT2LMHeadModel(hf_config)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"cannot build a GPT-2 from this config: {str(e).splitlines()[0]}"
            ) from None


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (GPT-2's output matrix is its tied input embedding: counted once)."""
    return sum(p.numel() for p in model.parameters())


def save_hf_folder(model, folder: Path) -> Path:
    """`model.save_pretrained` into a temporary sibling, then renamed to `folder`: a reader sees
    the old folder or the whole new one (safetensors weights, no pickle)."""
    folder = Path(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        quietly(model.save_pretrained, str(tmp))
        if not (tmp / "model.safetensors").is_file():
            raise RuntimeError(f"save_pretrained wrote no model.safetensors into {tmp}")
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def quietly(fn, *args):
    """Hugging Face's own progress bars off for the call (rbkd prints its own, on stderr)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return fn(*args)
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
