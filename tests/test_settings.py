"""Settings: the environment, flags that beat it, and bounds."""
from __future__ import annotations

import pytest

from config.cli import parse_settings
from config.settings import Settings


def test_settings_read_the_environment(monkeypatch):
    monkeypatch.setenv("MODEL_TEST_LLAMACPP__N_CTX", "1024")
    monkeypatch.setenv("MODEL_TEST_SERVER__PORT", "5123")
    monkeypatch.setenv("MODEL_TEST_MODEL", "/models/x.gguf")
    settings = Settings()
    assert settings.llamacpp.n_ctx == 1024
    assert settings.server.port == 5123
    assert settings.model == "/models/x.gguf"


def test_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("MODEL_TEST_LLAMACPP__N_CTX", "1024")
    monkeypatch.setenv("MODEL_TEST_LLAMACPP__N_BATCH", "64")
    settings = parse_settings(["--n-ctx", "8192", "--port", "6000", "--n-threads", "3", "--n-gpu-layers", "0", "--model", "m.gguf"])
    assert settings.llamacpp.n_ctx == 8192
    assert settings.llamacpp.n_batch == 64  # untouched by flags, still from the environment
    assert settings.llamacpp.n_threads == 3
    assert settings.llamacpp.n_gpu_layers == 0
    assert settings.server.port == 6000
    assert settings.model == "m.gguf"


def test_out_of_range_setting_is_refused(monkeypatch):
    monkeypatch.setenv("MODEL_TEST_LLAMACPP__N_CTX", "10")
    with pytest.raises(Exception, match="n_ctx"):
        Settings()
