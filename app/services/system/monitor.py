"""What the machine is doing: this process's memory and CPU, the system's memory and load, and
GPU memory where there is a GPU, for the page's monitor panel."""
from __future__ import annotations

import importlib
import logging
import os
import shutil
import subprocess
import sys
from typing import Optional

from app.services.system.hugepages import malloc_asks_for_hugepages, process_huge_page_bytes, thp_mode

log = logging.getLogger(__name__)

NVIDIA_SMI_TIMEOUT_S = 2.0


def imported_torch():
    """torch when some thread has imported it (or is importing it), else None; it is never
    imported here for its own sake, since that would cost a llama.cpp-only server seconds.

    A module in ``sys.modules`` may still be running its import on another thread (a compare
    column loading transformers), with half its attributes missing. ``import_module`` takes
    the module's import lock, so it returns a whole module: at once when the import is done,
    after the other thread finishes it otherwise."""
    if "torch" not in sys.modules:
        return None
    return importlib.import_module("torch")


class SystemMonitor:
    def __init__(self):
        import psutil

        self._process = psutil.Process()
        # cpu_percent measures since its previous call; prime it so the first snapshot means something
        self._process.cpu_percent(None)
        psutil.cpu_percent(None)
        self._nvidia_smi = shutil.which("nvidia-smi")
        # fixed for the life of the process: read once, not on every poll
        self._huge_pages = {"thp_mode": thp_mode(), "malloc_huge_pages": malloc_asks_for_hugepages()}

    def snapshot(self) -> dict:
        import psutil

        with self._process.oneshot():
            process = {"rss_bytes": self._process.memory_info().rss, "cpu_percent": self._process.cpu_percent(None),
                       "threads": self._process.num_threads(), "huge_pages_bytes": process_huge_page_bytes()}
        memory = psutil.virtual_memory()
        return {
            "process": process,
            "memory": {"total_bytes": memory.total, "available_bytes": memory.available,
                       "used_bytes": memory.total - memory.available, "percent": memory.percent, **self._huge_pages},
            "cpu": {"logical_cores": psutil.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
                    "percent": psutil.cpu_percent(None),
                    "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None},
            "gpus": self._gpus(),
        }

    def _gpus(self) -> list[dict]:
        # nvidia-smi sees llama.cpp's CUDA memory as well as torch's; torch is asked only when it is
        # already imported, since importing it here would cost a llama.cpp-only server seconds.
        if self._nvidia_smi:
            found = self._nvidia_smi_gpus()
            if found is not None:
                return found
        torch = imported_torch()
        if torch is not None and torch.cuda.is_available():
            gpus = []
            for index in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(index)
                gpus.append({"index": index, "name": torch.cuda.get_device_name(index),
                             "memory_used_bytes": total - free, "memory_total_bytes": total})
            return gpus
        if torch is not None and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return [{"index": 0, "name": "Apple MPS", "memory_used_bytes": torch.mps.driver_allocated_memory(),
                     "memory_total_bytes": None}]
        return []

    def _nvidia_smi_gpus(self) -> Optional[list[dict]]:
        try:
            out = subprocess.run([self._nvidia_smi, "--query-gpu=index,name,memory.used,memory.total",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                 timeout=NVIDIA_SMI_TIMEOUT_S, check=True).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            log.debug("nvidia-smi failed: %s", exc)
            return None
        gpus = []
        for line in out.strip().splitlines():
            index, name, used, total = [part.strip() for part in line.split(",")]
            gpus.append({"index": int(index), "name": name, "memory_used_bytes": int(float(used)) * 2**20,
                         "memory_total_bytes": int(float(total)) * 2**20})
        return gpus
