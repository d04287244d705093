"""Settings for test apps: a small context, two threads, logs and results in the test's own folder."""
from __future__ import annotations

from config.settings import LimitSettings, LlamaCppSettings, ServerSettings, Settings, TransformersSettings

TEST_N_CTX = 2048


def run_temp_root(tmp_path):
    """The run's whole temporary tree (pytest-of-<user>/pytest-<n>), where fixtures of every scope
    put the models and adapters they build."""
    for parent in [tmp_path, *tmp_path.parents]:
        if parent.name.startswith("pytest-") and not parent.name.startswith("pytest-of-"):
            return parent
    return tmp_path


def make_settings(tmp_path, **overrides) -> Settings:
    """Settings for a test app: logs in a temp folder, a small context, two threads, and the
    run's temporary tree allowed as a model root."""
    base = {
        "model_roots": [run_temp_root(tmp_path)],
        "server": ServerSettings(log_dir=tmp_path / "logs"),
        "llamacpp": LlamaCppSettings(n_ctx=TEST_N_CTX, n_threads=2),
        "transformers": TransformersSettings(n_ctx=TEST_N_CTX, n_threads=2),
        "saves_dir": tmp_path / "saves",
        "results_dir": tmp_path / "results",
        "limits": LimitSettings(),
    }
    base.update(overrides)
    return Settings(**base)
