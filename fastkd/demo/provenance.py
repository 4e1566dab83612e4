"""What the demo's summary records about where its numbers come from: versions, device, date."""
from __future__ import annotations

import datetime
import os
import platform
from typing import Dict


def versions() -> Dict[str, str]:
    """Python, torch, fastkd, and the versions of transformers, tokenizers and numpy when present."""
    import torch

    import fastkd

    out = {"python": platform.python_version(), "torch": torch.__version__, "fastkd": fastkd.__version__}
    for mod in ("transformers", "tokenizers", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return out


def cpu_name() -> str:
    """The CPU model and its logical CPU count (Linux /proc/cpuinfo, else ``platform``)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_name(device) -> str:
    """The GPU's name for a CUDA device, else the CPU's."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
