"""`rbkd info`: versions, kernel backends, devices and threads: what to paste in a bug report."""

from __future__ import annotations

import os
import platform
from importlib import metadata

from rbkd.cli.errors import handle_errors
from rbkd.cli.output import JsonOpt, print_json, print_table, titled_table
from rbkd.cli.text import escape
from rbkd.cli.threads import physical_cores
from rbkd.cli.typer_app import new_app

import rbkd
from rbkd import memory_policy

app = new_app()

# The table's name of a key where it is not the key with spaces for '_'. The keys themselves
# (`rbkd info --json`) are identifiers: `info["torch_threads"]`, `jq .backends_built`.
LABELS = {
    "backend_cpu": "backend for cpu",
    "backend_cuda": "backend for cuda",
    "rbkd_backend": "RBKD_BACKEND",
}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def collect_info() -> dict[str, str]:
    """Everything `rbkd info` shows, as strings (also handy in tests and bug reports), under
    keys that are identifiers (rbkd, torch, backends_built, torch_threads, ...)."""
    import torch  # here: `rbkd info -h` loads this module without torch

    info = {
        "rbkd": getattr(rbkd, "__version__", _version("rbkd")),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "platform": platform.platform(),
    }
    try:  # imported here so that a broken rbkd.ops is reported, not a crash
        from rbkd.ops import available_backends
        from rbkd.ops.dispatch import BACKEND_NAMES, select_backend

        available = available_backends()
        info["backends_built"] = ", ".join(n for n in BACKEND_NAMES if n in available) or "none"
        info["backends_not_built"] = (
            ", ".join(n for n in BACKEND_NAMES if n not in available) or "none"
        )
        devices = [torch.device("cpu")]
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
        for dev in devices:
            try:
                module = select_backend(dev)
                info[f"backend_{dev.type}"] = getattr(module, "NAME", module.__name__)
            except Exception as e:  # report, don't fail: info must work on a broken install
                info[f"backend_{dev.type}"] = f"none ({e})"
    except ImportError as e:
        info["backends_built"] = f"rbkd.ops not importable ({e})"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["devices"] = "cpu, " + ", ".join(f"cuda:{i} {n}" for i, n in enumerate(names))
        info["cuda"] = str(torch.version.cuda)
    else:
        info["devices"] = "cpu (no CUDA device)"
    info["cpu_cores"] = f"{physical_cores()} physical, {os.cpu_count()} logical"
    info["torch_threads"] = str(torch.get_num_threads())
    info["rbkd_backend"] = os.environ.get("RBKD_BACKEND", "auto (unset)")
    info["freed_memory"] = memory_policy.describe()
    return info


@app.command("info")
@handle_errors
def info(as_json: JsonOpt = False) -> None:
    """Show versions, kernel backends, devices and threads (paste it into bug reports).

    Versions of rbkd, torch, triton and Python; the kernel backends built and the one each
    device would use; the devices; the thread count.

    Example:

        rbkd info
    """
    found = collect_info()
    if as_json:
        print_json(found)
        return
    table = titled_table("rbkd info", show_header=False)
    for key, value in found.items():
        table.add_row(LABELS.get(key, key.replace("_", " ")), escape(value))
    print_table(table)
