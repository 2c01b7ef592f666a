"""`rbkd info`: versions, kernel backends, devices and threads: what to paste in a bug report."""

from __future__ import annotations

import os

from rbkd.cli.common import escape, handle_errors, new_app, physical_cores, titled_table
from rbkd.cli.output import JsonOpt, print_json, print_table

app = new_app()


def _version(package: str) -> str:
    from importlib import metadata  # 20 ms: not for `rbkd --help`

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def collect_info() -> dict[str, str]:
    """Everything `rbkd info` shows, as strings (also handy in tests and bug reports)."""
    import platform

    import torch

    import rbkd

    info = {
        "rbkd": getattr(rbkd, "__version__", _version("rbkd")),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "platform": platform.platform(),
    }
    try:
        from rbkd.ops import available_backends
        from rbkd.ops.dispatch import BACKEND_NAMES, select_backend

        available = available_backends()
        info["backends built"] = ", ".join(n for n in BACKEND_NAMES if n in available) or "none"
        info["backends not built"] = (
            ", ".join(n for n in BACKEND_NAMES if n not in available) or "none"
        )
        devices = [torch.device("cpu")]
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
        for dev in devices:
            try:
                module = select_backend(dev)
                info[f"backend for {dev.type}"] = getattr(module, "NAME", module.__name__)
            except Exception as e:  # report, don't fail: info must work on a broken install
                info[f"backend for {dev.type}"] = f"none ({e})"
    except ImportError as e:
        info["backends built"] = f"rbkd.ops not importable ({e})"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["devices"] = "cpu, " + ", ".join(f"cuda:{i} {n}" for i, n in enumerate(names))
        info["cuda"] = str(torch.version.cuda)
    else:
        info["devices"] = "cpu (no CUDA device)"
    info["cpu cores"] = f"{physical_cores()} physical, {os.cpu_count()} logical"
    info["torch threads"] = str(torch.get_num_threads())
    info["RBKD_BACKEND"] = os.environ.get("RBKD_BACKEND", "auto (unset)")
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
        table.add_row(key, escape(value))
    print_table(table)
