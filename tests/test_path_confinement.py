"""Model and adapter paths from API clients stay inside the model folders."""
from __future__ import annotations

import pytest

from app import create_app
from config.settings import LlamaCppSettings, ServerSettings, Settings


@pytest.fixture()
def confined(tmp_path, default_gguf):
    models = tmp_path / "models"
    models.mkdir()
    (models / "good.gguf").symlink_to(default_gguf)  # a symlink whose target is an allowed root (the default's folder)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    (models / "escape.gguf").symlink_to(outside / "secret.gguf")
    (models / "escape-dir").symlink_to(outside, target_is_directory=True)
    settings = Settings(server=ServerSettings(log_dir=tmp_path / "logs"), llamacpp=LlamaCppSettings(n_ctx=512, n_threads=2),
                        models_dir=models, saves_dir=tmp_path / "saves")
    app = create_app(settings)
    yield app, tmp_path
    app.extensions["model_service"].unload()


@pytest.mark.parametrize(
    "body, field",
    [
        ({"model": "/etc/passwd"}, "model"),
        ({"model": "../../../../../../etc/passwd"}, "model"),
        ({"model": "escape.gguf"}, "model"),  # a symlink inside models/ that points out
        ({"model": "escape-dir/secret.gguf"}, "model"),
        ({"model": "{tmp}/outside/secret.gguf"}, "model"),
        ({"model": "smollm2-135m-instruct", "adapter": "/etc"}, "adapter"),
        ({"model": "smollm2-135m-instruct", "adapter": "../../../../../../tmp"}, "adapter"),
    ],
)
def test_paths_outside_the_model_folders_are_refused(confined, body, field):
    app, tmp = confined
    body = {key: value.replace("{tmp}", str(tmp)) for key, value in body.items()}
    response = app.test_client().post("/api/load_model", json=body)
    assert response.status_code == 403
    error = response.get_json()
    assert error["type"] == "path_not_allowed" and error["field"] == field
    assert "outside the model folders" in error["error"]
    assert app.extensions["model_service"].status().state == "not_loaded"


def test_paths_inside_the_folders_and_names_still_load(confined):
    app, _ = confined
    client = app.test_client()
    assert client.post("/api/load_model", json={"model": "good.gguf"}).get_json()["state"] == "loaded"
    assert client.post("/api/load_model", json={"model": "smollm2-135m-instruct-q4_1"}).get_json()["state"] == "loaded"


def test_an_extra_root_allows_its_folder(tmp_path, default_gguf):
    elsewhere = tmp_path / "big-disk"
    elsewhere.mkdir()
    (elsewhere / "m.gguf").symlink_to(default_gguf)
    settings = Settings(server=ServerSettings(log_dir=tmp_path / "logs"), llamacpp=LlamaCppSettings(n_ctx=512, n_threads=2),
                        models_dir=tmp_path / "models", model_roots=[elsewhere])
    app = create_app(settings)
    # the symlink resolves into the default model's folder, itself a root; the link's own folder is allowed too
    assert app.test_client().post("/api/load_model", json={"model": str(elsewhere / "m.gguf")}).status_code == 200
    app.extensions["model_service"].unload()
