"""Huge pages for llama.cpp's memory: run.py starts itself again with malloc asking for them, the
backend reads the weights into memory on the CPU (a mapped file cannot sit on huge pages), and
/api/system shows how much of the process they back."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import requests

from app.services.backends.llamacpp.backend import LlamaCppBackend
from app.services.checkpoints.spec import ModelSpec
from app.services.system.hugepages import (
    TUNABLE,
    environ_with_hugepages,
    environ_without_hugepages,
    malloc_asks_for_hugepages,
    process_huge_page_bytes,
    thp_mode,
)
from config.settings import LlamaCppSettings
from tests.support.servers import free_port, start_run_py

LINUX = sys.platform.startswith("linux")


def test_the_tunable_is_added_beside_others_and_never_twice():
    assert environ_with_hugepages({"A": "1"}, "linux") == {"A": "1", "GLIBC_TUNABLES": TUNABLE}
    assert environ_with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "linux") == {
        "GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNABLE}"}
    assert environ_with_hugepages({"GLIBC_TUNABLES": TUNABLE}, "linux") is None  # started again: no loop
    assert environ_with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "linux") is None  # the user said no
    assert environ_with_hugepages({}, "darwin") is None
    # and taken out again, leaving what was there before
    for before in ({"A": "1"}, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}):
        assert environ_without_hugepages(environ_with_hugepages(before, "linux")) == before


def test_whether_malloc_asks_is_read_from_the_tunable():
    assert malloc_asks_for_hugepages({"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNABLE}"})
    assert not malloc_asks_for_hugepages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert not malloc_asks_for_hugepages({})


def test_kernel_mode_and_process_figures_are_parsed(tmp_path):
    mode = tmp_path / "enabled"
    mode.write_text("always [madvise] never\n")
    assert thp_mode(mode) == "madvise"
    assert thp_mode(tmp_path / "missing") is None
    rollup = tmp_path / "smaps_rollup"
    rollup.write_text("Rss:              204800 kB\nAnonHugePages:    126976 kB\n")
    assert process_huge_page_bytes(rollup) == 126976 * 1024
    assert process_huge_page_bytes(tmp_path / "missing") is None


def test_the_backend_reads_weights_into_memory_on_the_cpu_unless_told_to_map(default_gguf):
    for choice, weights in (("auto", "in memory"), ("on", "mapped file"), ("off", "in memory")):
        backend = LlamaCppBackend(ModelSpec("llamacpp", default_gguf), LlamaCppSettings(n_ctx=256, n_threads=2, mmap=choice))
        backend.load()
        try:
            assert backend.info().weights == weights, choice
        finally:
            backend.unload()


def start(port: int, tmp_path, **env) -> subprocess.Popen:
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}  # as a shell starts it
    return start_run_py(port, ["--n-ctx", "512", "--n-threads", "2"],
                        {**environ, "MODEL_TEST_SERVER__LOG_DIR": str(tmp_path), **env})


@pytest.mark.skipif(not LINUX, reason="GLIBC_TUNABLES is glibc's (Linux)")
@pytest.mark.parametrize("hugepages", [True, False])
def test_run_py_serves_the_model_on_huge_pages(tmp_path, default_gguf, hugepages):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start(port, tmp_path, **({} if hugepages else {"MODEL_TEST_SERVER__HUGEPAGES": "false"}))
    try:
        assert requests.post(f"{url}/api/load_model", json={}, timeout=120).ok
        answer = requests.post(f"{url}/api/chat", json={"prompt": "Say hi.", "max_new_tokens": 4}, timeout=120)
        assert answer.ok and answer.json()["usage"]["completion_tokens"] > 0
        system = requests.get(f"{url}/api/system", timeout=30).json()
        status = requests.get(f"{url}/api/model_status", timeout=30).json()
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert status["info"]["weights"] == "in memory"
    assert system["memory"]["malloc_huge_pages"] is hugepages
    assert system["memory"]["thp_mode"] == thp_mode()
    if hugepages and thp_mode() in ("madvise", "always"):
        # the weights (~100 MB) and the KV cache: most of it in 2 MiB pages
        assert system["process"]["huge_pages_bytes"] >= 64 * 2**20
    if not hugepages and thp_mode() == "madvise":
        assert system["process"]["huge_pages_bytes"] < 16 * 2**20
