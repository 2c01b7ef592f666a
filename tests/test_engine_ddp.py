"""Data parallelism: 2 gloo processes under torchrun end with the weights of 1 process.

The global batch is what the thesis varies, so K ranks must reproduce the single-process
trajectory, the short last batch included (203 rows / batch 32: the last batch is 11 = 6 + 5).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = textwrap.dedent(
    """
    import sys
    from dataclasses import dataclass
    import torch
    from rbkd.engine import Distillation, TrainConfig, fit
    from rbkd.models import build_model

    torch.set_num_threads(1)

    @dataclass
    class Tiny:
        name: str
        split: str
        images: torch.Tensor
        labels: torch.Tensor
        num_classes: int = 10
        def normalize(self, b):
            return (b.float() / 255 - 0.2) / 0.3
        def __len__(self):
            return len(self.labels)

    def tiny(n, split, seed):
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % 10
        images = torch.randint(0, 255, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
        return Tiny("tiny", split, images, labels)

    train, test = tiny(203, "train", 0), tiny(51, "test", 1)
    teacher = torch.randn(203, 10, generator=torch.Generator().manual_seed(2))
    cfg = TrainConfig(epochs=2, batch_size=32, lr=1e-3, optimizer="adam", seed=5, device="cpu")
    model = build_model("mnist", "general", seed=0)
    out = fit(model, train, test, cfg, Distillation(teacher, 4.0, 0.5), run_dir=sys.argv[1],
              progress=False)
    # One write per line: the ranks finish together (a barrier before the group is torn down),
    # and print's separate writes of text and newline interleaved between them.
    sys.stdout.write(f"RESULT {out['test_accuracy']} {out['test_ce_loss']}\\n")
    sys.stdout.flush()
    """
)


def _run(cmd, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path: Path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    single = _run([sys.executable, str(script), str(tmp_path / "one")], tmp_path)
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(tmp_path / "two"),
    ]
    double = _run(torchrun, tmp_path)
    a = load_file(tmp_path / "one" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5, msg=f"{k} differs")
    # Sharded evaluation is all-reduced: every rank reports the full-test-set metrics.
    assert len(double) == 2 and double[0] == double[1]
    acc1, loss1 = map(float, single[0].split()[1:])
    acc2, loss2 = map(float, double[0].split()[1:])
    assert acc1 == acc2 and loss1 == pytest.approx(loss2, rel=1e-5)
    # rank 0 alone writes files
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )
