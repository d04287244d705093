"""Transparent huge pages for the memory llama.cpp (and torch) allocate.

Decoding one token reads every weight once. On 4 KiB pages a 98 MB model is 24,000 pages a
token, more than the TLB holds; on 2 MiB pages it is 50. Linux gives anonymous memory huge pages
where the program asks for them (THP mode ``madvise``, the common default), and glibc's malloc
asks for all its large blocks when started with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``. The
tunable is read once, when the process starts, so ``run.py`` and the benchmark start themselves
again with it (:func:`restart_with_hugepages`); ``make serve`` starts gunicorn through
``python -m app.services.system.hugepages``.

Weights read into memory (no mmap) on huge pages decode faster through SSE than the mmap'd file
on 4 KiB pages, and either change alone gains nothing measurable (the figures: LLAMACPP_GUIDE.md,
"Weights in memory, on huge pages", and docs/benchmarks.md). Where the tunable means nothing (THP
``never`` or ``always``, another libc, macOS) glibc or the loader ignores it.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Mapping, Optional

log = logging.getLogger(__name__)

TUNABLE_NAME = "glibc.malloc.hugetlb"
TUNABLE = f"{TUNABLE_NAME}=1"
THP_MODE_PATH = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def tunable_value(environ: Mapping[str, str]) -> Optional[str]:
    """The value GLIBC_TUNABLES gives glibc.malloc.hugetlb, None when it does not name it."""
    for item in environ.get("GLIBC_TUNABLES", "").split(":"):
        name, _, value = item.partition("=")
        if name == TUNABLE_NAME:
            return value
    return None


def environ_with_hugepages(environ: Mapping[str, str], platform: str = sys.platform) -> Optional[dict[str, str]]:
    """The environment to start again with, or None when there is nothing to change: not Linux,
    or GLIBC_TUNABLES already names the tunable (whatever its value: a user's 0 is respected)."""
    if not platform.startswith("linux") or tunable_value(environ) is not None:
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE}


def environ_without_hugepages(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment as a shell gives it before :func:`restart_with_hugepages` added the tunable."""
    kept = [item for item in environ.get("GLIBC_TUNABLES", "").split(":") if item and item != TUNABLE]
    plain = {name: value for name, value in environ.items() if name != "GLIBC_TUNABLES"}
    return {**plain, "GLIBC_TUNABLES": ":".join(kept)} if kept else plain


def restart_with_hugepages() -> None:
    """Replaces this process with itself, same interpreter, options and arguments, started with
    the tunable; returns only when it is already set or does not apply. Call it first thing in a
    ``__main__``, before threads, open sockets or loaded models exist."""
    environ = environ_with_hugepages(os.environ)
    if environ is None:
        return
    # sys.orig_argv keeps "-m package.module" and interpreter options, which sys.argv loses
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


def thp_mode(path: Path = THP_MODE_PATH) -> Optional[str]:
    """The kernel's transparent huge page mode (always, madvise, never), None where there is none."""
    try:
        text = path.read_text()
    except OSError:
        return None
    chosen = [word[1:-1] for word in text.split() if word.startswith("[")]
    return chosen[0] if chosen else None


def process_huge_page_bytes(rollup: Path = Path("/proc/self/smaps_rollup")) -> Optional[int]:
    """Bytes of this process's anonymous memory on huge pages (AnonHugePages), None off Linux."""
    try:
        for line in rollup.read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        log.debug("cannot read %s", rollup, exc_info=True)
    return None


def malloc_asks_for_hugepages(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process was started with the tunable set to a non-zero value."""
    return tunable_value(environ) not in (None, "", "0")


if __name__ == "__main__":
    # `python -m app.services.system.hugepages COMMAND...` runs COMMAND with the tunable added (make serve's gunicorn)
    os.execvpe(sys.argv[1], sys.argv[1:], environ_with_hugepages(os.environ) or dict(os.environ))
