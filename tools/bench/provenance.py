"""Where a run ran: the machine and library versions, and the code's commit and local changes."""
from __future__ import annotations

import os
import platform
import subprocess

import torch

from tools.bench.settings import ROOT


def machine_info(device="cpu") -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__}
    try:
        import torchvision
        import numpy
        info["torchvision"], info["numpy"] = torchvision.__version__, numpy.__version__
    except ImportError:
        pass
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        info["cpu"] = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                            if line.startswith("Model name")), platform.processor())
    except (OSError, subprocess.SubprocessError):
        info["cpu"] = platform.processor()
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    else:
        info["gpu"] = None
    return info


def code_version() -> dict:
    """The git commit the run used and the files under compiler/, runtime/, tools/ that differed."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,
                              timeout=20).stdout
    try:
        # Porcelain lines are "XY path": the status column may start with a space, so no strip.
        dirty = [line[3:] for line in git("status", "--porcelain", "--", "compiler", "runtime",
                                          "tools").splitlines() if line.strip()]
        return {"commit": git("rev-parse", "--short", "HEAD").strip(), "uncommitted": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "uncommitted": []}
