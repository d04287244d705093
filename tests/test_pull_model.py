"""scripts.pull_model without the real Hub (this machine cannot reach it).

Offline pulls read a Hugging Face cache that the tests lay out by hand (``models--org--name``
with ``refs/``, ``snapshots/<commit>/`` symlinks and ``blobs/``), exactly as
``snapshot_download(local_files_only=True)`` expects it. Online pulls talk to a small stub of
the Hub's HTTP API (model info, tree listing, resolve) on 127.0.0.1, reached through
``HF_ENDPOINT``. The script runs as a module in a subprocess, as users run it, because
huggingface_hub reads HF_HUB_OFFLINE, HF_HUB_CACHE and HF_ENDPOINT once, at import.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

import pytest
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from app.services.catalog import ModelCatalog, ModelEntry
from config.settings import PROJECT_ROOT, Settings

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CUT_AT = 1 << 20  # where the stub cuts a download off: one whole read of the script's
GGUF_HEADER = b"GGUF\x03\x00\x00\x00"  # the magic and version 3: enough for the catalog, which reads names only
GGUF_FILES = {
    "Tiny-Q4_K_M.gguf": GGUF_HEADER + b"q4" * 64,
    "Tiny-Q8_0.gguf": GGUF_HEADER + b"q8" * 96,
    "README.md": b"# tiny gguf\n",
}
HF_FILES = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + b"\x00" * 32,
    "tokenizer.json": b'{"model": {"type": "BPE"}}',
    "tokenizer_config.json": b'{"chat_template": "{{ messages }}"}',
    "generation_config.json": b'{"eos_token_id": 2}',
    # other frameworks' weights and exports: a pull must leave them on the Hub
    "pytorch_model.bin": b"pickle",
    "flax_model.msgpack": b"msgpack",
    "onnx/model.onnx": b"onnx",
}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def cache_repo(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """Lays ``files`` out as the Hugging Face cache holds a downloaded revision ``main``."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    (storage / "blobs").mkdir()
    for rel, data in files.items():
        blob = storage / "blobs" / _sha256(data)
        blob.write_bytes(data)
        pointer = storage / "snapshots" / commit / rel
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    return storage


def run_pull(*args, cache: Path, offline: bool = True, endpoint: str | None = None, timeout: float = 60):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(cache.parent / "hf_home"), HF_HUB_CACHE=str(cache), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    return subprocess.run([sys.executable, "-m", "scripts.pull_model", *map(str, args)], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def error_line(result) -> str:
    """The one error line a failed pull prints, after checking that it printed nothing else alarming."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    return errors[0]


def catalog_ids(models_dir: Path) -> dict[str, ModelEntry]:
    """What the catalog offers from models_dir (presets and built-ins point there too, absent)."""
    return {m.id: m for m in ModelCatalog(Settings(models_dir=models_dir)).models()
            if m.available and Path(m.path).is_relative_to(models_dir)}


def no_leftovers(models_dir: Path) -> bool:
    return not [p for p in models_dir.rglob("*") if p.name.startswith(".") or p.name.endswith(".partial")]


@pytest.fixture()
def hub_cache(tmp_path):
    cache = tmp_path / "hub"
    cache_repo(cache, "org/Tiny-GGUF", GGUF_FILES)
    cache_repo(cache, "org/Tiny", HF_FILES)
    return cache


# --------------------------------------------------------------------------- offline, from the cache


def test_offline_pull_materialises_cached_models_that_the_catalog_lists(tmp_path, hub_cache):
    models = tmp_path / "models"
    gguf = run_pull("org/Tiny-GGUF", "--quant", "q4_k_m", "--models-dir", models, cache=hub_cache)
    assert gguf.returncode == 0, gguf.stderr
    hf = run_pull("org/Tiny", "--models-dir", models, cache=hub_cache)
    assert hf.returncode == 0, hf.stderr

    # the quant matched case aside, and only it came
    assert sorted(p.name for p in (models / "Tiny-GGUF").iterdir()) == ["Tiny-Q4_K_M.gguf"]
    assert (models / "Tiny-GGUF" / "Tiny-Q4_K_M.gguf").read_bytes() == GGUF_FILES["Tiny-Q4_K_M.gguf"]
    # the checkpoint without other frameworks' weights
    assert sorted(p.name for p in (models / "Tiny").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    # hard links into the cache, not second copies (tmp_path is one filesystem)
    blob = hub_cache / "models--org--Tiny" / "blobs" / _sha256(HF_FILES["model.safetensors"])
    assert (models / "Tiny" / "model.safetensors").stat().st_ino == blob.stat().st_ino
    assert no_leftovers(models)

    listed = catalog_ids(models)
    assert listed["Tiny-GGUF/Tiny-Q4_K_M.gguf"].backend == "llamacpp"
    assert listed["Tiny-GGUF/Tiny-Q4_K_M.gguf"].available
    assert listed["Tiny"].backend == "transformers"
    assert listed["Tiny"].size_bytes == len(HF_FILES["model.safetensors"])

    # a second quant joins the first; pulling one again changes nothing
    assert run_pull("org/Tiny-GGUF", "--quant", "Q8_0", "--models-dir", models, cache=hub_cache).returncode == 0
    again = run_pull("org/Tiny-GGUF", "--quant", "Q4_K_M", "--models-dir", models, cache=hub_cache)
    assert again.returncode == 0 and "nothing to do" in again.stderr
    assert sorted(p.name for p in (models / "Tiny-GGUF").iterdir()) == ["Tiny-Q4_K_M.gguf", "Tiny-Q8_0.gguf"]

    # --list shows what the catalog serves from there
    listing = run_pull("--list", "--models-dir", models, cache=hub_cache)
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line.split() for line in listing.stdout.splitlines()[1:]}
    assert rows["Tiny"][1] == "transformers"
    assert rows["Tiny-GGUF/Tiny-Q8_0.gguf"][1] == "llamacpp"
    assert listing.stdout.splitlines()[0].split() == ["id", "backend", "size", "path"]


def test_offline_and_uncached_is_one_clear_line(tmp_path, hub_cache):
    result = run_pull("org/Not-Cached", "--models-dir", tmp_path / "models", cache=hub_cache)
    line = error_line(result)
    assert "offline (HF_HUB_OFFLINE is set)" in line and "org/Not-Cached" in line and "not in the Hugging Face cache" in line
    assert not (tmp_path / "models" / "Not-Cached").exists()


def test_no_file_matching_the_quant_names_the_quants_there_are(tmp_path, hub_cache):
    line = error_line(run_pull("org/Tiny-GGUF", "--quant", "Q5_K_M", "--models-dir", tmp_path / "models", cache=hub_cache))
    assert "*Q5_K_M*.gguf" in line and "available: Q4_K_M, Q8_0" in line
    line = error_line(run_pull("org/Tiny-GGUF", "--models-dir", tmp_path / "models", cache=hub_cache))
    assert "GGUF files only" in line and "--quant" in line and "Q4_K_M, Q8_0" in line
    line = error_line(run_pull("org/Tiny", "--quant", "Q4_K_M", "--models-dir", tmp_path / "models", cache=hub_cache))
    assert "no .gguf files" in line
    assert not (tmp_path / "models").exists() or no_leftovers(tmp_path / "models")


def test_a_different_local_copy_is_kept_unless_forced(tmp_path, hub_cache):
    models = tmp_path / "models"
    (models / "Tiny").mkdir(parents=True)
    (models / "Tiny" / "config.json").write_text('{"model_type": "mine"}')
    line = error_line(run_pull("org/Tiny", "--models-dir", models, cache=hub_cache))
    assert "already exists" in line and "--force" in line
    assert (models / "Tiny" / "config.json").read_text() == '{"model_type": "mine"}'
    forced = run_pull("org/Tiny", "--models-dir", models, "--force", cache=hub_cache)
    assert forced.returncode == 0, forced.stderr
    assert (models / "Tiny" / "config.json").read_bytes() == HF_FILES["config.json"]
    assert no_leftovers(models)


def test_a_cached_sharded_checkpoint_missing_a_shard_is_refused(tmp_path):
    cache = tmp_path / "hub"
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    cache_repo(cache, "org/Sharded", {"config.json": b"{}", "model-00001-of-00002.safetensors": b"x",
                                      "model.safetensors.index.json": json.dumps(index).encode()})
    line = error_line(run_pull("org/Sharded", "--models-dir", tmp_path / "models", cache=cache))
    assert "model-00002-of-00002.safetensors" in line
    assert not (tmp_path / "models" / "Sharded").exists()


# --------------------------------------------------------------------------- online, against a stub Hub


class StubHub:
    """The few Hub routes a pull uses: model info (with file sizes), the tree listing, and
    HEAD/GET resolve, with Range requests (206). ``sizes`` overrides the sizes the metadata claims.
    A file in ``cut_once`` ("repo/path") is cut off after ``CUT_AT`` bytes on its next GET, the
    connection dropped mid-body as a flaky network does. A ``gated`` repo answers
    its metadata but refuses its files (401 GatedRepo), as the Hub does before its terms are
    accepted; unknown repos and revisions get the Hub's 404s with their X-Error-Code."""

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.sizes: dict[tuple[str, str], int] = {}
        self.gated: set[str] = set()
        self.downloads: list[str] = []  # "repo/path" of every GET of a file's bytes
        self.ranges: list[tuple[str, Optional[str]]] = []  # ("repo/path", its Range header) of every GET
        self.cut_once: set[str] = set()

    def _meta(self, repo: str, path: str, data: bytes) -> dict:
        size = self.sizes.get((repo, path), len(data))
        return {"size": size, "oid": _git_blob_id(data), "lfs": {"oid": _sha256(data), "size": size, "pointerSize": 130}}

    def __call__(self, environ, start_response):
        request = Request(environ)
        response = self.route(request)
        return response(environ, start_response)

    def route(self, request: Request) -> Response:
        path = request.path
        match = (re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
                 or re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path)
                 or re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path))
        if match is None:
            return Response("not a route of this stub", status=404)
        repo, revision = match.group(1), match.group(2) or "main"
        if repo not in self.repos:
            return Response("no", status=404, headers={"X-Error-Code": "RepoNotFound"})
        if revision not in ("main", COMMIT):
            return Response("no", status=404, headers={"X-Error-Code": "RevisionNotFound"})
        files = self.repos[repo]
        if "/tree/" in path:
            return Response(json.dumps([{"type": "file", "path": p, **self._meta(repo, p, d)} for p, d in files.items()]),
                            content_type="application/json")
        if path.startswith("/api/"):
            siblings = []
            for p, d in files.items():
                meta = self._meta(repo, p, d)
                siblings.append({"rfilename": p, "size": meta["size"], "blobId": meta["oid"],
                                 "lfs": {"sha256": meta["lfs"]["oid"], "size": meta["size"], "pointerSize": 130}})
            return Response(json.dumps({"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "siblings": siblings}),
                            content_type="application/json")
        name = match.group(3)
        if repo in self.gated:
            return Response("no", status=401, headers={"X-Error-Code": "GatedRepo"})
        if name not in files:
            return Response("no", status=404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
        data = files[name]
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{_sha256(data)}"', "Accept-Ranges": "bytes"}
        if request.method == "GET":
            self.downloads.append(f"{repo}/{name}")
            self.ranges.append((f"{repo}/{name}", request.headers.get("Range")))
            start = 0
            ranged = re.fullmatch(r"bytes=(\d+)-", request.headers.get("Range", ""))
            if ranged:
                start = int(ranged.group(1))
                if start >= len(data):
                    return Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
            body = data[start:]
            if ranged:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            if f"{repo}/{name}" in self.cut_once:
                self.cut_once.discard(f"{repo}/{name}")

                def cut_off():
                    yield body[:CUT_AT]
                    raise ConnectionAbortedError("the stub drops the connection mid-body")  # werkzeug closes it

                return Response(cut_off(), status=206 if ranged else 200, direct_passthrough=True,
                                headers={**headers, "Content-Length": str(len(body))})
            return Response(body, status=206 if ranged else 200, headers=headers)
        # werkzeug answers a HEAD with this response's headers (Content-Length included) and no body
        return Response(data, headers=headers)


@pytest.fixture()
def stub_hub():
    hub = StubHub()
    hub.repos["org/Tiny-GGUF"] = dict(GGUF_FILES)
    hub.repos["org/Tiny"] = dict(HF_FILES)
    server = make_server("127.0.0.1", 0, hub, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub.url = f"http://127.0.0.1:{server.server_port}"
    yield hub
    server.shutdown()
    thread.join(timeout=10)


def test_online_pull_downloads_only_the_chosen_files_then_works_offline(tmp_path, stub_hub):
    cache, models = tmp_path / "hub", tmp_path / "models"
    result = run_pull("org/Tiny-GGUF", "--quant", "Q4_K_M", "--models-dir", models, cache=cache, offline=False,
                      endpoint=stub_hub.url)
    assert result.returncode == 0, result.stderr
    assert stub_hub.downloads == ["org/Tiny-GGUF/Tiny-Q4_K_M.gguf"]
    assert (models / "Tiny-GGUF" / "Tiny-Q4_K_M.gguf").read_bytes() == GGUF_FILES["Tiny-Q4_K_M.gguf"]

    result = run_pull("org/Tiny", "--models-dir", models, cache=cache, offline=False, endpoint=stub_hub.url)
    assert result.returncode == 0, result.stderr
    fetched = sorted(d.split("/", 2)[2] for d in stub_hub.downloads if d.startswith("org/Tiny/"))
    assert fetched == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert set(catalog_ids(models)) == {"Tiny-GGUF/Tiny-Q4_K_M.gguf", "Tiny"}
    assert no_leftovers(models)

    # Files already in the cache are not fetched again: a re-pull elsewhere downloads nothing.
    stub_hub.downloads.clear()
    result = run_pull("org/Tiny", "--models-dir", tmp_path / "other", cache=cache, offline=False, endpoint=stub_hub.url)
    assert result.returncode == 0, result.stderr
    assert stub_hub.downloads == []

    # Offline, the cached tree listing picks the same files, though the cache lacks the skipped ones.
    result = run_pull("org/Tiny", "--models-dir", tmp_path / "offline", cache=cache)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "offline" / "Tiny").iterdir()) == fetched


def test_online_errors_are_one_clear_line(tmp_path, stub_hub):
    stub_hub.repos["org/Gated"] = dict(HF_FILES)
    stub_hub.gated.add("org/Gated")
    models, cache = tmp_path / "models", tmp_path / "hub"

    def pull(*args):
        return error_line(run_pull(*args, "--models-dir", models, cache=cache, offline=False, endpoint=stub_hub.url))

    line = pull("org/Missing")
    assert "org/Missing is not on the Hub" in line and "HF_TOKEN" in line
    line = pull("org/Gated")
    assert "org/Gated is gated" in line and "https://huggingface.co/org/Gated" in line
    assert not (models / "Gated").exists() and no_leftovers(models)
    line = pull("org/Tiny", "--revision", "v9")
    assert "no revision 'v9'" in line
    line = pull("org/Tiny-GGUF", "--quant", "IQ2_XS")
    assert "available: Q4_K_M, Q8_0" in line
    line = pull("not-a-repo-id")
    assert "expected a Hub repo id" in line
    assert stub_hub.downloads == []


def test_not_enough_disk_space_is_refused_before_downloading(tmp_path, stub_hub):
    stub_hub.sizes[("org/Tiny-GGUF", "Tiny-Q8_0.gguf")] = 10**18  # an exabyte, per the file metadata
    result = run_pull("org/Tiny-GGUF", "--quant", "Q8_0", "--models-dir", tmp_path / "models", cache=tmp_path / "hub",
                      offline=False, endpoint=stub_hub.url)
    line = error_line(result)
    assert "not enough disk space" in line and "1000000.0 TB" in line
    assert stub_hub.downloads == []


def test_unreachable_hub_falls_back_to_the_cache(tmp_path, hub_cache):
    with socket.socket() as sock:  # a port nobody listens on: connections are refused at once
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    models = tmp_path / "models"
    result = run_pull("org/Tiny", "--models-dir", models, cache=hub_cache, offline=False, endpoint=closed)
    assert result.returncode == 0, result.stderr
    assert "the Hub cannot be reached (ConnectError" in result.stderr
    assert "Tiny" in catalog_ids(models)
    line = error_line(run_pull("org/Elsewhere", "--models-dir", models, cache=hub_cache, offline=False, endpoint=closed))
    assert "the Hub cannot be reached" in line and "not in the Hugging Face cache" in line


def test_a_download_cut_off_mid_way_resumes_where_it_stopped(tmp_path, stub_hub):
    big = bytes(range(256)) * (3 * 4096 + 17)  # ~3 MB, so the cut leaves a partial file behind
    stub_hub.repos["org/Big-GGUF"] = {"Big-Q4_K_M.gguf": GGUF_HEADER + big}
    stub_hub.cut_once.add("org/Big-GGUF/Big-Q4_K_M.gguf")
    cache, models = tmp_path / "hub", tmp_path / "models"

    def pull():
        return run_pull("org/Big-GGUF", "--quant", "Q4_K_M", "--models-dir", models, cache=cache, offline=False,
                        endpoint=stub_hub.url)

    line = error_line(pull())
    assert "cut off" in line and "run the same command again to resume" in line
    parts = list((models / ".Big-GGUF.download").rglob("*.part"))
    assert [p.name for p in parts] == ["Big-Q4_K_M.gguf.part"]
    have = parts[0].stat().st_size
    assert 0 < have < len(GGUF_HEADER + big)
    assert not (models / "Big-GGUF").exists()

    result = pull()
    assert result.returncode == 0, result.stderr
    assert stub_hub.ranges == [("org/Big-GGUF/Big-Q4_K_M.gguf", None), ("org/Big-GGUF/Big-Q4_K_M.gguf", f"bytes={have}-")]
    assert "resuming Big-Q4_K_M.gguf" in result.stderr
    assert (models / "Big-GGUF" / "Big-Q4_K_M.gguf").read_bytes() == GGUF_HEADER + big
    assert no_leftovers(models)  # the .download folder went with the pull

    # the cache holds it as huggingface_hub would: an offline pull elsewhere finds it
    offline = run_pull("org/Big-GGUF", "--quant", "Q4_K_M", "--models-dir", tmp_path / "offline", cache=cache)
    assert offline.returncode == 0, offline.stderr
    assert (tmp_path / "offline" / "Big-GGUF" / "Big-Q4_K_M.gguf").read_bytes() == GGUF_HEADER + big
