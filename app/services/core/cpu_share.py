"""How many of the threads a decoder was given it should use now, given what other processes take.

Decoding splits every step across ``n`` threads that wait for each other at barriers, spinning.
When another process (a training run, a browser) takes one of those cores, the thread that shares
it gets a time slice now and then, and every step waits for it: with a busy loop pinned to one
of 2 cores, llama.cpp on 2 threads fell to a small fraction of its speed, far below what 1 thread
keeps (torch collapses the same way). Passive waiting (``OMP_WAIT_POLICY=passive``) survived the
load but cost the quiet machine most of its speed, so the remedy is fewer threads while others
are busy, and all of them again when they are not (the figures: LLAMACPP_GUIDE.md, "A busy
machine: fewer threads while others need the cores").

``CpuShare`` reads the whole machine's busy time (``/proc/stat``) less this process's own, every
``interval_s`` on a thread of its own, and answers the threads to use: the configured count less
the cores other processes kept busy (rounded), at least one. Where ``/proc/stat`` is missing
(macOS) it always answers the configured count.

It gives threads up slowly and takes them back at once: a thread goes only when two samples in a
row saw others busy, and all come back on the first sample that does not. With two servers
taking turns (each the other's "other process"), a share that followed every sample both ways
kept the next server on one thread for seconds after the first had finished, and a quiet stream
right after ran measurably slower than the same server without the share (same section).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

PROC_STAT = Path("/proc/stat")
# Others must keep this much of a core busy before a thread is given up: a browser tab's
# occasional work should not halve the decoder.
BUSY_CORE_THRESHOLD = 0.6


def machine_busy_seconds() -> Optional[float]:
    """CPU seconds the whole machine has been busy (Linux ``/proc/stat``); None elsewhere."""
    try:
        fields = [int(value) for value in PROC_STAT.read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_busy_s() -> float:
    times = os.times()
    return times.user + times.system


def threads_for(configured: int, others_busy_cores: float) -> int:
    """The configured threads less the cores others keep busy (rounded half down), at least one."""
    if others_busy_cores < BUSY_CORE_THRESHOLD:
        return configured
    return max(1, configured - int(others_busy_cores + 0.4))


class CpuShare:
    def __init__(self, configured: int, interval_s: float = 0.25):
        self.configured = configured
        self._interval_s = interval_s
        self._threads = configured
        self._busy_samples = 0  # samples in a row that saw others busy
        self.others_busy_cores = 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if machine_busy_seconds() is not None and configured > 1:
            self._thread = threading.Thread(target=self._watch, name="cpu-share", daemon=True)
            self._thread.start()

    @property
    def threads(self) -> int:
        return self._threads

    def _watch(self) -> None:
        machine, own, at = machine_busy_seconds(), _own_busy_s(), time.monotonic()
        while not self._stop.wait(self._interval_s):
            machine_now, own_now, now = machine_busy_seconds(), _own_busy_s(), time.monotonic()
            if machine_now is None or now <= at:
                continue
            others = max(0.0, (machine_now - machine) - (own_now - own)) / (now - at)
            machine, own, at = machine_now, own_now, now
            self.others_busy_cores = others
            threads = threads_for(self.configured, others)
            self._busy_samples = self._busy_samples + 1 if threads < self.configured else 0
            if threads < self._threads and self._busy_samples < 2:
                continue  # one busy sample may be a burst, or the tail of work that has ended
            if threads != self._threads:
                log.info("other processes keep %.1f cores busy: decoding on %d of %d threads", others, threads,
                         self.configured)
                self._threads = threads

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
