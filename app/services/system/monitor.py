"""What the machine is doing: this process's memory and CPU, the system's memory and load, and
GPU memory where there is a GPU, for the page's monitor panel."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from typing import Optional

from pydantic import Field

from app.services.core.shapes import Shape
from app.services.system.hugepages import malloc_asks_for_hugepages, process_huge_page_bytes, thp_mode

log = logging.getLogger(__name__)

NVIDIA_SMI_TIMEOUT_S = 2.0


class ProcessFigures(Shape):
    rss_bytes: int
    cpu_percent: float
    threads: int
    huge_pages_bytes: Optional[int] = Field(None, description="Anonymous memory on transparent huge pages; null off Linux.")


class MemoryFigures(Shape):
    total_bytes: int
    available_bytes: int
    used_bytes: int
    percent: float
    thp_mode: Optional[str] = Field(None, description="The kernel's THP mode: always, madvise or never.")
    malloc_huge_pages: bool = Field(description="Started with GLIBC_TUNABLES=glibc.malloc.hugetlb=1.")


class CpuFigures(Shape):
    logical_cores: int
    physical_cores: Optional[int] = Field(description="null where the platform does not say.")
    percent: float
    load_avg: Optional[list[float]] = None


class GpuFigures(Shape):
    index: int
    name: str
    memory_used_bytes: int
    memory_total_bytes: Optional[int] = None


class MachineSnapshot(Shape):
    process: ProcessFigures
    memory: MemoryFigures
    cpu: CpuFigures
    gpus: list[GpuFigures]


class SystemMonitor:
    def __init__(self):
        import psutil

        self._process = psutil.Process()
        # cpu_percent measures since its previous call; prime it so the first snapshot means something
        self._process.cpu_percent(None)
        psutil.cpu_percent(None)
        self._nvidia_smi = shutil.which("nvidia-smi")
        # fixed for the life of the process: read once, not on every poll
        self._thp_mode, self._malloc_huge_pages = thp_mode(), malloc_asks_for_hugepages()

    def snapshot(self) -> MachineSnapshot:
        import psutil

        with self._process.oneshot():
            process = ProcessFigures(rss_bytes=self._process.memory_info().rss, cpu_percent=self._process.cpu_percent(None),
                                     threads=self._process.num_threads(), huge_pages_bytes=process_huge_page_bytes())
        memory = psutil.virtual_memory()
        return MachineSnapshot(
            process=process,
            memory=MemoryFigures(total_bytes=memory.total, available_bytes=memory.available,
                                 used_bytes=memory.total - memory.available, percent=memory.percent,
                                 thp_mode=self._thp_mode, malloc_huge_pages=self._malloc_huge_pages),
            cpu=CpuFigures(logical_cores=psutil.cpu_count(), physical_cores=psutil.cpu_count(logical=False),
                           percent=psutil.cpu_percent(None),
                           load_avg=[round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None),
            gpus=self._gpus(),
        )

    def _gpus(self) -> list[GpuFigures]:
        # nvidia-smi sees llama.cpp's CUDA memory as well as torch's; torch is asked only when it is
        # already imported, since importing it here would cost a llama.cpp-only server seconds.
        if self._nvidia_smi:
            found = self._nvidia_smi_gpus()
            if found is not None:
                return found
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            gpus = []
            for index in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(index)
                gpus.append(GpuFigures(index=index, name=torch.cuda.get_device_name(index),
                                       memory_used_bytes=total - free, memory_total_bytes=total))
            return gpus
        if torch is not None and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return [GpuFigures(index=0, name="Apple MPS", memory_used_bytes=torch.mps.driver_allocated_memory())]
        return []

    def _nvidia_smi_gpus(self) -> Optional[list[GpuFigures]]:
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
            gpus.append(GpuFigures(index=int(index), name=name, memory_used_bytes=int(float(used)) * 2**20,
                                   memory_total_bytes=int(float(total)) * 2**20))
        return gpus
