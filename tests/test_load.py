"""scripts/load_test.py with smaller numbers: 16 concurrent streaming clients against a real
run.py server on the default model. Every request completes or gets a clean 429, nothing is 5xx
or stuck, a client that hangs up frees the model within a token, and RSS stays steady."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from config.settings import PROJECT_ROOT

pytestmark = pytest.mark.slow


def test_sixteen_streaming_clients(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "scripts.load_test", "--clients", "16", "--requests", "64", "--max-new-tokens", "16",
         "--duration", "300", "--server-arg=--n-ctx", "--server-arg=2048"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900,
        env={"PATH": "/usr/bin:/bin", "MODEL_TEST_SERVER__LOG_DIR": str(tmp_path), "MODEL_TEST_RESULTS_DIR": str(tmp_path)},
    )
    report = json.loads(done.stdout)
    assert report["checks"] == {name: True for name in report["checks"]}, report
    assert done.returncode == 0
    assert report["completed"] + report["disconnected"] == 64
    assert report["disconnected"] == 64 // 5  # every 5th hung up after its first token
    # 16 clients at the defaults: 4 decoding together (llamacpp.parallel), 12 in line, none told to wait
    assert report["rate_limited_429"] == 0
    assert report["server_errors"] == [] and report["stuck_clients"] == 0
    probe = report["disconnect_probe"]
    assert probe["freed_within_s"] and probe["freed_after_ms"] < 1000
