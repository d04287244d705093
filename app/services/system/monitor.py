"""What the machine is doing: this process's memory and CPU, the system's memory and load, and
each GPU's memory and utilisation where the driver reports them, for the page's monitor panel.
On a machine without a GPU the snapshot says so (``gpu_note``)."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from typing import Literal, Optional

from pydantic import Field

from app.services.core.shapes import Shape
from app.services.system.hugepages import malloc_asks_for_hugepages, process_huge_page_bytes, thp_mode

log = logging.getLogger(__name__)

NVIDIA_SMI_TIMEOUT_S = 2.0


NO_GPU = ("no GPU: no NVIDIA driver answers here (NVML, nvidia-smi), and this process uses no CUDA or MPS device "
          "through torch; the models run on the CPU")


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
    utilization_percent: Optional[float] = Field(None, description="The GPU's busy share over the driver's last sample; "
                                                 "null where it is not reported.")
    source: Optional[Literal["nvml", "nvidia-smi", "torch"]] = Field(None, description="Who reported the figures.")


class MachineSnapshot(Shape):
    process: ProcessFigures
    memory: MemoryFigures
    cpu: CpuFigures
    gpus: list[GpuFigures]
    gpu_note: Optional[str] = Field(None, description="Why no GPU is listed, in plain words; null when one is.")


class SystemMonitor:
    def __init__(self, nvidia_smi: Optional[str] = None):
        import psutil

        self._process = psutil.Process()
        # cpu_percent measures since its previous call; prime it so the first snapshot means something
        self._process.cpu_percent(None)
        psutil.cpu_percent(None)
        self._nvidia_smi = nvidia_smi or shutil.which("nvidia-smi")
        self._nvml = None  # pynvml once it has started; False when it is absent or fails
        # fixed for the life of the process: read once, not on every poll
        self._thp_mode, self._malloc_huge_pages = thp_mode(), malloc_asks_for_hugepages()

    def snapshot(self) -> MachineSnapshot:
        import psutil

        with self._process.oneshot():
            process = ProcessFigures(rss_bytes=self._process.memory_info().rss, cpu_percent=self._process.cpu_percent(None),
                                     threads=self._process.num_threads(), huge_pages_bytes=process_huge_page_bytes())
        memory = psutil.virtual_memory()
        gpus = self._gpus()
        return MachineSnapshot(
            process=process,
            memory=MemoryFigures(total_bytes=memory.total, available_bytes=memory.available,
                                 used_bytes=memory.total - memory.available, percent=memory.percent,
                                 thp_mode=self._thp_mode, malloc_huge_pages=self._malloc_huge_pages),
            cpu=CpuFigures(logical_cores=psutil.cpu_count(), physical_cores=psutil.cpu_count(logical=False),
                           percent=psutil.cpu_percent(None),
                           load_avg=[round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None),
            gpus=gpus,
            gpu_note=None if gpus else NO_GPU,
        )

    def _gpus(self) -> list[GpuFigures]:
        """Memory and utilisation from the driver: NVML (the nvidia-ml-py package) where it is
        installed, else nvidia-smi; both see llama.cpp's CUDA memory as well as torch's. Without
        either, torch's own figures, but only where this process already uses CUDA or MPS through
        torch: importing torch here would cost a llama.cpp-only server seconds, and asking an
        unused CUDA would start a context on the GPU."""
        for source in (self._nvml_gpus, self._nvidia_smi_gpus):
            found = source()
            if found is not None:
                return found
        return torch_gpus(sys.modules.get("torch"))

    def _nvml_gpus(self) -> Optional[list[GpuFigures]]:
        nvml = self._start_nvml()
        if nvml is None:
            return None
        try:
            gpus = []
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = nvml.nvmlDeviceGetName(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                gpus.append(GpuFigures(index=index, name=name.decode() if isinstance(name, bytes) else str(name),
                                       memory_used_bytes=int(memory.used), memory_total_bytes=int(memory.total),
                                       utilization_percent=float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                                       source="nvml"))
            return gpus
        except nvml.NVMLError as exc:
            log.debug("NVML failed: %s", exc)
            return None

    def _start_nvml(self):
        if self._nvml is None:
            try:
                import pynvml  # the nvidia-ml-py package, where it is installed

                pynvml.nvmlInit()
                self._nvml = pynvml
            except Exception as exc:  # absent, or no driver: ImportError, NVMLError_LibraryNotFound, ...
                log.debug("NVML is not available: %s", exc)
                self._nvml = False
        return self._nvml or None

    def _nvidia_smi_gpus(self) -> Optional[list[GpuFigures]]:
        if not self._nvidia_smi:
            return None
        try:
            out = subprocess.run([self._nvidia_smi, "--query-gpu=index,name,memory.used,memory.total,utilization.gpu",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                 timeout=NVIDIA_SMI_TIMEOUT_S, check=True).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            log.debug("nvidia-smi failed: %s", exc)
            return None
        gpus = []
        for line in out.strip().splitlines():
            index, name, used, total, utilization = [part.strip() for part in line.split(",")]
            gpus.append(GpuFigures(index=int(index), name=name, memory_used_bytes=int(float(used)) * 2**20,
                                   memory_total_bytes=int(float(total)) * 2**20,
                                   utilization_percent=_number(utilization), source="nvidia-smi"))
        return gpus


def torch_gpus(torch) -> list[GpuFigures]:
    """torch's figures for the devices this process already uses through it (no utilisation: torch
    reads that from NVML too)."""
    if torch is None:
        return []
    if torch.cuda.is_initialized():
        gpus = []
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            gpus.append(GpuFigures(index=index, name=torch.cuda.get_device_name(index), memory_used_bytes=total - free,
                                   memory_total_bytes=total, source="torch"))
        return gpus
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return [GpuFigures(index=0, name="Apple MPS", memory_used_bytes=torch.mps.driver_allocated_memory(), source="torch")]
    return []


def _number(text: str) -> Optional[float]:
    """A figure of nvidia-smi's, or None for its "[N/A]" and "[Not Supported]"."""
    try:
        return float(text)
    except ValueError:
        return None
