"""Where a run ran: versions, threads, device and processor, recorded in its results."""

from __future__ import annotations

import platform
from typing import Any

import torch

__all__ = ["cpu_name", "environment"]


def environment(device: torch.device, world_size: int = 1) -> dict[str, Any]:
    """Versions, threads, device, processor and the number of processes of a run."""
    import numpy

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "torchmetrics": _version_of("torchmetrics"),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "world_size": world_size,
        "platform": platform.platform(),
        "cpu": cpu_name(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _version_of(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
