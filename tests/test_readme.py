"""Every ```python block of README.md runs as written (in a fresh namespace, in a temporary
folder, on the CPU). Blocks that import transformers or lightning (the `examples` extra) are
skipped, with the reason, where those are not installed."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
OPTIONAL = {"transformers": "transformers", "lightning": "lightning"}  # import name -> pip name


def python_blocks() -> list[tuple[int, str]]:
    """(line number, code) of every ```python block."""
    text = README.read_text()
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        blocks.append((text.count("\n", 0, match.start()) + 1, match.group(1)))
    return blocks


BLOCKS = python_blocks()


def test_readme_has_the_python_api_examples():
    assert len(BLOCKS) >= 6, "README lost python blocks"
    joined = "\n".join(code for _, code in BLOCKS)
    for needed in ("rbkd.train_teacher", "rbkd.soft_labels", "rbkd.distill", "Trainer"):
        assert needed in joined
    assert 'reduction="sum"' in joined and "training_step" in joined


@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"README.md:{n}" for n, _ in BLOCKS])
def test_readme_python_block_runs(line, code, tmp_path, monkeypatch):
    for module, package in OPTIONAL.items():
        imported = re.search(rf"^\s*(import|from) {module}\b", code, flags=re.M)
        if imported and importlib.util.find_spec(module) is None:
            pytest.skip(
                f"README.md:{line} needs {package}: pip install -e '.[examples]' "
                "(scripts/setup.sh installs it)"
            )
    monkeypatch.chdir(tmp_path)  # whatever a block writes (a Trainer's output folder) goes here
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": f"readme_{line}"})
