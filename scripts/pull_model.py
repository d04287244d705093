"""Pulls a model from the Hugging Face Hub into models/, where the tester's model picker finds it.

    python -m scripts.pull_model Qwen/Qwen2.5-0.5B-Instruct-GGUF --quant Q4_K_M
        -> models/Qwen2.5-0.5B-Instruct-GGUF/ with the files matching *Q4_K_M*.gguf (case aside)
    python -m scripts.pull_model Qwen/Qwen2.5-0.5B-Instruct
        -> models/Qwen2.5-0.5B-Instruct/ with the safetensors weights, config and tokenizer files
    python -m scripts.pull_model --list
        -> the models on this machine (models/ and the built-in one), as the picker lists them

Options: ``--revision`` (branch, tag or commit), ``--token`` (else ``HF_TOKEN`` or the stored
``hf auth login`` token), ``--models-dir``, ``--name`` (the folder under models/), ``--cache-dir``
(else ``HF_HUB_CACHE``/``HF_HOME``), ``--force`` (replace a different local copy).

How a pull lands:

1. Each chosen file the Hugging Face cache lacks downloads here, with a progress bar, into
   ``models/.<name>.download/<org>--<repo>/<commit>/<path>.part``. A file cut off mid-way (a
   dropped connection, Ctrl-C) keeps its ``.part``, and the same command again resumes it with
   an HTTP ``Range: bytes=<have>-`` request, the bar starting at the bytes already there; a
   server that ignores the range (200 instead of 206) restarts the file. huggingface_hub (2.4)
   cannot do this across runs: it writes each download to a fresh ``<etag>.<uuid>.incomplete``
   and deletes it on failure (huggingface/huggingface_hub#4196). A finished file is checked
   against the size in the repo's metadata and, for LFS files, its sha256 (a mismatch deletes
   the ``.part``), then moved into the cache as huggingface_hub lays it out (``blobs/<etag>``
   and a ``snapshots/<commit>/<path>`` link). ``snapshot_download`` then records the revision
   and the tree listing, finding every file already there. Files complete in the cache are
   never fetched again. The repo metadata, the auth headers (``--token``/``HF_TOKEN``), the
   endpoint (``HF_ENDPOINT``) and the timeouts are huggingface_hub's.
2. The chosen files are hard-linked (copied across filesystems) into a hidden
   ``models/.<name>.<pid>-<id>.partial`` folder, which is then renamed to ``models/<name>``.
   The catalog skips hidden and ``.partial`` names, so it never lists half a model; the
   ``.download`` folder goes once the pull is done.

Offline (``HF_HUB_OFFLINE=1``, or the Hub cannot be reached) a pull takes the files from the
cache, as ``snapshot_download(local_files_only=True)`` does, choosing them from the cached tree
listing when there is one so that the same files are chosen as online. Failures are one line on
stderr with exit status 2: offline and not cached, unknown or private repo, gated repo, unknown
revision, no file matching the quant (naming the quants there are), not enough disk space
(checked against the sizes in the repo's file metadata before anything downloads), a different
local copy.
"""
from __future__ import annotations

import argparse
import fnmatch
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Optional

import httpx2  # huggingface_hub's HTTP client: its transport errors mean "the Hub cannot be reached"
import requests
from huggingface_hub import HfApi, constants, get_cached_repo_tree, hf_hub_url, snapshot_download
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import are_progress_bars_disabled, build_hf_headers
from tqdm.auto import tqdm

from app.services.catalog import ModelCatalog, ModelEntry
from config.settings import Settings

log = logging.getLogger("pull_model")

# A whole repo brings what transformers needs to load and chat: weights, config, tokenizer,
# chat template, and any modelling code (trust_remote_code models such as Hunyuan ship *.py).
HF_ALLOW = (
    "*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja", "*.py",
    "LICENSE*", "README.md",
)
# Other frameworks' weights (and exports) would double or triple the download for nothing.
HF_IGNORE = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.ot",
             "*.tflite", "*.mlmodel", "*.gguf", "*.npz")
# Only when a repo has no safetensors at all are its PyTorch pickles the weights to take.
PYTORCH_WEIGHTS = ("pytorch_model*.bin", "pytorch_model*.bin.index.json")

# Quant labels as GGUF repos spell them in file names: Q4_K_M, Q8_0, IQ4_XS, Q4_0_4_4, F16, BF16...
QUANT_RE = re.compile(r"(?<![A-Za-z0-9])(I?Q[1-8](?:_[A-Za-z0-9]+)*|BF16|F16|FP16|F32|FP32)(?![A-Za-z0-9])", re.I)


class PullError(Exception):
    """A pull cannot go ahead; the message says why in one line."""


@dataclass(frozen=True)
class RepoFile:
    path: str  # relative, with "/" as in the repo
    size: Optional[int] = None  # bytes; None when the metadata did not say
    etag: Optional[str] = None  # the cache's blob name: the LFS sha256, else the git blob id
    lfs: bool = False  # whether etag is the file's sha256


# --------------------------------------------------------------------------- choosing files


def select_gguf(files: Iterable[RepoFile], quant: str) -> list[RepoFile]:
    """Files matching ``*<quant>*.gguf``, case aside (Hub patterns are case-sensitive and repos
    spell quants both ways: ``Q4_K_M`` and ``q4_k_m``)."""
    pattern = f"*{quant.lower()}*.gguf"
    return [f for f in files if fnmatch.fnmatchcase(f.path.lower(), pattern)]


def quants_in(files: Iterable[RepoFile]) -> list[str]:
    """The quant labels the .gguf files of a repo carry, for a message that lists the choices."""
    found = set()
    for f in files:
        if f.path.lower().endswith(".gguf"):
            found.update(m.upper() for m in QUANT_RE.findall(PurePosixPath(f.path).name[: -len(".gguf")]))
    return sorted(found)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_hf(files: Iterable[RepoFile]) -> list[RepoFile]:
    """The top-level files of a transformers checkpoint: safetensors (else PyTorch .bin) weights,
    config, tokenizer, template and code. Sub-folders (``onnx/``, ``original/``...) are other
    formats of the same model."""
    top = [f for f in files if "/" not in f.path]
    has_safetensors = any(f.path.endswith(".safetensors") for f in top)
    chosen = []
    for f in top:
        if not has_safetensors and _matches(f.path, PYTORCH_WEIGHTS):
            chosen.append(f)
        elif _matches(f.path, HF_ALLOW) and not _matches(f.path, HF_IGNORE):
            chosen.append(f)
    return chosen


def has_weights(files: Iterable[RepoFile]) -> bool:
    return any(f.path.endswith(".safetensors") or _matches(f.path, ("pytorch_model*.bin",)) for f in files)


def choose(repo_id: str, files: list[RepoFile], quant: Optional[str]) -> list[RepoFile]:
    """What to pull from a repo holding ``files``, or a PullError saying why nothing fits."""
    ggufs = [f for f in files if f.path.lower().endswith(".gguf")]
    if quant is not None:
        if not ggufs:
            raise PullError(f"{repo_id} has no .gguf files, so --quant does not apply; pull it without --quant")
        chosen = select_gguf(files, quant)
        if not chosen:
            known = quants_in(files)
            choices = f"; available: {', '.join(known)}" if known else f"; its .gguf files: {', '.join(f.path for f in ggufs)}"
            raise PullError(f"no .gguf file in {repo_id} matches *{quant}*.gguf{choices}")
        return chosen
    chosen = select_hf(files)
    if not has_weights(chosen):
        if ggufs:
            known = quants_in(files)
            raise PullError(f"{repo_id} holds GGUF files only; choose one with --quant"
                            + (f" (available: {', '.join(known)})" if known else ""))
        raise PullError(f"{repo_id} has no safetensors or pytorch_model*.bin weights at its top level; nothing to pull")
    return chosen


# --------------------------------------------------------------------------- where the files are


def hub_files(repo_id: str, revision: Optional[str], token: Optional[str]) -> tuple[str, list[RepoFile]]:
    """The commit a revision points at and its files with sizes, from the Hub (one API call)."""
    info = HfApi().model_info(repo_id, revision=revision, files_metadata=True, token=token)
    files = [
        RepoFile(s.rfilename, s.size, (s.lfs.sha256 if s.lfs is not None else s.blob_id), s.lfs is not None)
        for s in (info.siblings or [])
    ]
    return info.sha, files


def cached_files(snapshot: Path) -> list[RepoFile]:
    """The files of a cached snapshot (symlinks into blobs/, followed for the size)."""
    found = []
    for path in sorted(snapshot.rglob("*")):
        if path.is_file():
            found.append(RepoFile(path.relative_to(snapshot).as_posix(), path.stat().st_size))
    return found


def _existing_parent(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def _human(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def check_disk_space(files: list[RepoFile], storage: Path, commit: str, cache_dir: Path, models_dir: Path) -> None:
    """Refuses a pull that cannot fit, before any byte moves: the cache needs the files it does
    not hold yet, and models_dir a full copy only when it lies on another filesystem (otherwise
    the files are hard links)."""
    to_fetch = sum(f.size or 0 for f in files if not (storage / "snapshots" / commit / f.path).exists())
    cache_root, models_root = _existing_parent(cache_dir), _existing_parent(models_dir)
    needs = {cache_root: to_fetch}
    if os.stat(cache_root).st_dev != os.stat(models_root).st_dev:
        needs[models_root] = sum(f.size or 0 for f in files)
    for root, needed in needs.items():
        free = shutil.disk_usage(root).free
        if needed > free:
            raise PullError(f"not enough disk space: the pull needs {_human(needed)} in {root}, which has "
                            f"{_human(free)} free{_abandoned_note(storage)}")


def _abandoned_note(storage: Path) -> str:
    """Partial files a killed download left behind: huggingface_hub never reuses them (each
    download writes a fresh <etag>.<uuid>.incomplete), so they only take space."""
    partials = list((storage / "blobs").glob("*.incomplete"))
    if not partials:
        return ""
    size = sum(p.stat().st_size for p in partials if p.is_file())
    return (f" ({_human(size)} of it in {len(partials)} abandoned *.incomplete file(s) in {storage / 'blobs'}, "
            f"safe to delete while no download runs)")


def check_snapshot(snapshot: Path, files: list[RepoFile]) -> None:
    """Every chosen file is in the snapshot, at the size the metadata gives. huggingface_hub
    checks a download against the size of the file's own HEAD answer only, so a truncated
    blob (a proxy, a full disk) would otherwise become a model that fails at load time."""
    for f in files:
        local = snapshot / f.path
        if not local.is_file():
            raise PullError(f"the cached snapshot {snapshot} lacks {f.path}; run the pull again")
        size = local.stat().st_size
        if f.size is not None and size != f.size:
            raise PullError(f"{f.path} in the cache is {size} bytes but the repo lists {f.size}; delete "
                            f"{local.resolve()} and pull again")


def check_shards(snapshot: Path, files: list[RepoFile]) -> None:
    """A sharded checkpoint's index names every shard; a cache that lacks one (a download cut
    off before it, with no tree listing to tell) must not become a model that fails to load."""
    names = {f.path for f in files}
    for f in files:
        if not f.path.endswith(".index.json"):
            continue
        try:
            weight_map = json.loads((snapshot / f.path).read_text(encoding="utf-8")).get("weight_map", {})
        except (OSError, ValueError, AttributeError) as exc:
            raise PullError(f"cannot read {f.path} in {snapshot}: {exc}") from None
        missing = sorted(set(weight_map.values()) - names)
        if missing:
            raise PullError(f"{f.path} names shards that are not there ({', '.join(missing)}); "
                            f"pull again with network access to complete the download")


# --------------------------------------------------------------------------- resumable downloads

CHUNK = 1 << 20


def _gated_or_missing(response: requests.Response, repo_id: str, path: str) -> str:
    """A refused download as the one line main() gives for huggingface_hub's own errors."""
    code = response.headers.get("X-Error-Code", "")
    if code == "GatedRepo":
        return (f"{repo_id} is gated: accept its terms at https://huggingface.co/{repo_id} and pass that "
                f"account's token with --token or HF_TOKEN")
    if code == "RepoNotFound" or response.status_code == 401:
        return f"{repo_id} is not on the Hub, or it is private and needs a token with access (--token or HF_TOKEN)"
    return f"the Hub answered HTTP {response.status_code} for {repo_id}/{path}"


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download_resumable(repo_id: str, commit: str, f: RepoFile, part: Path, token: Optional[str]) -> Path:
    """Downloads ``f`` at ``commit`` into ``part``, continuing from the bytes already there with
    a Range request; returns ``part`` once complete and verified. A cut-off download raises a
    PullError and keeps ``part`` for the next run."""
    have = part.stat().st_size if part.is_file() else 0
    if f.size is not None and have > f.size:  # not a prefix of this file: start over
        part.unlink()
        have = 0
    url = hf_hub_url(repo_id, f.path, revision=commit)  # the commit, so resumed bytes are the same file's
    headers = build_hf_headers(token=token)
    if have:
        headers["Range"] = f"bytes={have}-"
        log.info("resuming %s at %s of %s", f.path, _human(have), _human(f.size))
    try:
        with requests.get(url, headers=headers, stream=True,
                          timeout=(constants.HF_HUB_ETAG_TIMEOUT, constants.HF_HUB_DOWNLOAD_TIMEOUT)) as response:
            if response.status_code == 416 and have and have == f.size:
                pass  # the .part was already whole: the last run stopped between download and move
            elif response.status_code in (401, 403, 404):
                raise PullError(_gated_or_missing(response, repo_id, f.path))
            elif response.status_code not in (200, 206):
                raise PullError(f"the Hub answered HTTP {response.status_code} for {repo_id}/{f.path}")
            else:
                if response.status_code == 200 and have:
                    log.warning("the server ignored the range request; downloading %s from the start", f.path)
                    have = 0
                part.parent.mkdir(parents=True, exist_ok=True)  # only now: a refused pull leaves no folders
                with open(part, "ab" if have else "wb") as out, tqdm(
                        total=f.size, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=f.path,
                        disable=are_progress_bars_disabled()) as bar:
                    for block in response.iter_content(CHUNK):
                        out.write(block)
                        bar.update(len(block))
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
        got = part.stat().st_size if part.is_file() else 0
        raise PullError(f"the download of {f.path} was cut off at {_human(got)} of {_human(f.size)} "
                        f"({type(exc).__name__}); run the same command again to resume it from {part}") from None
    size = part.stat().st_size
    if f.size is not None and size != f.size:
        raise PullError(f"{f.path} ended at {size} bytes but the repo lists {f.size}; run the same command "
                        f"again to resume it from {part}")
    if f.lfs and f.etag and _sha256_of(part) != f.etag:
        part.unlink()
        raise PullError(f"{f.path} does not match its sha256 {f.etag} from the repo; the partial file was "
                        f"deleted, run the same command again to download it anew")
    return part


def download_missing(repo_id: str, commit: str, files: list[RepoFile], storage: Path, staging: Path,
                     token: Optional[str]) -> None:
    """Brings every file the cache's snapshot of ``commit`` lacks into the cache, resumably,
    laid out as huggingface_hub lays it out (so snapshot_download and offline pulls find it)."""
    for f in files:
        pointer = storage / "snapshots" / commit / f.path
        if pointer.exists():
            continue
        part = download_resumable(repo_id, commit, f, staging / (f.path + ".part"), token)
        blob = storage / "blobs" / (f.etag or _sha256_of(part))
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(part, blob)  # a rename when the cache and models/ share a filesystem
        pointer.parent.mkdir(parents=True, exist_ok=True)
        if pointer.is_symlink():
            pointer.unlink()  # a link to a blob that is gone
        try:
            pointer.symlink_to(os.path.relpath(blob, pointer.parent))
        except OSError:  # no symlinks here (Windows without developer mode): a copy, as huggingface_hub does
            shutil.copyfile(blob, pointer)
    shutil.rmtree(staging, ignore_errors=True)
    for folder in (staging.parent, staging.parent.parent):  # <org>--<repo>, then models/.<name>.download
        try:
            folder.rmdir()  # only when empty: another revision's partial files stay for their own pull
        except OSError:
            break


# --------------------------------------------------------------------------- putting them in place


def _same_file(a: Path, b: Path, compare_below: int = 10_000_000) -> bool:
    """Whether ``b`` already is ``a``: the same inode (an earlier pull's hard link), or the same
    bytes. Large files of equal size count as equal: hashing gigabytes to find out is not worth it."""
    if not b.is_file():
        return False
    sa, sb = a.stat(), b.stat()
    if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):
        return True
    if sa.st_size != sb.st_size:
        return False
    return sa.st_size >= compare_below or a.read_bytes() == b.read_bytes()


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    real = src.resolve()  # the cache's snapshot entries are symlinks into blobs/
    try:
        os.link(real, dst)  # no second copy of a multi-GB file when both lie on one filesystem
    except OSError:
        shutil.copyfile(real, dst)


def place(snapshot: Path, files: list[RepoFile], target: Path, per_file: bool, force: bool) -> list[str]:
    """Links ``files`` from the cache snapshot into ``target`` without ever showing a half model.

    A new target is built as a hidden ``.partial`` folder and renamed in one step. Into an
    existing target, GGUF files (``per_file``: each one a whole model) move one by one, each an
    atomic rename, so a second quant can join the first; a checkpoint directory is swapped whole,
    and only with ``force`` when the local copy differs. Returns the relative paths placed."""
    staging = target.parent / f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
    if target.exists() and not target.is_dir():
        raise PullError(f"{target} exists and is not a folder; pass --name to pull beside it")
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    existing = target.is_dir()
    if existing:
        todo = [f for f in files if not _same_file(snapshot / f.path, target / f.path)]
        if not todo:
            log.info("%s already holds these files; nothing to do", target)
            return []
        differing = [f.path for f in todo if (target / f.path).exists()]
        if not per_file or differing:
            if not force:
                what = f"differs in {', '.join(differing)}" if differing else "holds another copy"
                raise PullError(f"{target} already exists and {what}; pass --force to replace it, "
                                f"or --name to pull beside it")
        files = files if not per_file else todo
    target.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir()
    try:
        for f in files:
            _link_or_copy(snapshot / f.path, staging / f.path)
        if not existing:
            os.rename(staging, target)
        elif per_file:
            for f in files:
                (target / f.path).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / f.path, target / f.path)
        else:
            # Swapped whole: the old copy steps aside (hidden, so unlisted) and goes once the new one is in.
            old = target.parent / f".{target.name}.{os.getpid()}-old.partial"
            os.rename(target, old)
            os.rename(staging, target)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [f.path for f in files]


# --------------------------------------------------------------------------- the pull


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def pull(repo_id: str, quant: Optional[str] = None, models_dir: Optional[Path] = None,
         revision: Optional[str] = None, token: Optional[str] = None, name: Optional[str] = None,
         cache_dir: Optional[Path] = None, force: bool = False) -> Path:
    """Pulls ``repo_id`` (its ``quant`` GGUF files, or its transformers checkpoint) into
    ``models_dir/<name>``; returns that folder. Raises PullError, or huggingface_hub's errors
    for unknown, gated and unreachable repos (``main`` turns those into one line)."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise PullError(f"expected a Hub repo id like Qwen/Qwen2.5-0.5B-Instruct, got {repo_id!r}")
    if quant is not None and not quant.strip():
        raise PullError("--quant is empty; give a quant such as Q4_K_M")
    models_dir = Path(models_dir or Settings().models_dir).expanduser().resolve()
    cache_dir = Path(cache_dir or constants.HF_HUB_CACHE).expanduser().resolve()
    target = models_dir / (name or repo_id.split("/")[1])
    storage = cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")

    offline_reason = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else None
    files = None
    if offline_reason is None:
        try:
            commit, files = hub_files(repo_id, revision, token)
        except (httpx2.TransportError, OfflineModeIsEnabled) as exc:
            offline_reason = f"the Hub cannot be reached ({type(exc).__name__}: {_one_line(exc)})"
        except HfHubHTTPError as exc:
            if exc.response is None or exc.response.status_code < 500:
                raise  # unknown, private, gated: the cache must not hide that
            offline_reason = f"the Hub answered HTTP {exc.response.status_code}"
        if offline_reason is not None:
            log.warning("%s; looking in the local cache %s", offline_reason, cache_dir)

    if files is not None:
        chosen = choose(repo_id, files, quant)
        check_disk_space(chosen, storage, commit, cache_dir, models_dir)
        log.info("pulling %d file(s), %s, of %s at %s into the cache %s", len(chosen),
                 _human(sum(f.size or 0 for f in chosen)), repo_id, commit[:12], cache_dir)
        staging = models_dir / f".{target.name}.download" / repo_folder_name(repo_id=repo_id, repo_type="model")[len("models--"):] / commit
        download_missing(repo_id, commit, chosen, storage, staging, token)
        # Every chosen file is in the cache now; this records refs/<revision> and the tree listing
        # that offline pulls choose from. The exact names (escaped: names are fnmatch patterns there), so the Hub's own
        # case-sensitive matching cannot differ from ours. The revision as given, not the commit,
        # so the cache records refs/<revision> and a later offline pull finds the snapshot.
        snapshot = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token,
                                          allow_patterns=[glob.escape(f.path) for f in chosen]))
    else:
        snapshot, chosen = from_cache(repo_id, quant, revision, cache_dir, offline_reason)
        log.info("offline (%s): taking %d file(s) of %s from the cache %s", offline_reason, len(chosen), repo_id, snapshot)

    check_snapshot(snapshot, chosen)
    check_shards(snapshot, chosen)
    placed = place(snapshot, chosen, target, per_file=quant is not None, force=force)
    if placed:
        log.info("%s is ready in %s (%s)", repo_id, target, ", ".join(placed))
    return target


def from_cache(repo_id: str, quant: Optional[str], revision: Optional[str], cache_dir: Path,
               offline_reason: str) -> tuple[Path, list[RepoFile]]:
    """The cached snapshot of a revision and the files to take from it, without the network.

    An earlier online pull cached the repo's whole tree listing (trees/<commit>.json): choosing
    from it picks what an online pull would, and snapshot_download then checks that those files
    are all there. Without a listing (a cache filled by older tools), the snapshot's own files
    are all there is to choose from."""
    try:
        listing = [RepoFile(f.path, f.size) for f in get_cached_repo_tree(repo_id, revision=revision, cache_dir=cache_dir)]
    except CachedRepoTreeNotFoundError:
        listing = None
    chosen = choose(repo_id, listing, quant) if listing is not None else None
    patterns = [glob.escape(f.path) for f in chosen] if chosen is not None else None
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True,
                                          allow_patterns=patterns))
    except IncompleteSnapshotError as exc:
        lacking = [f.path for f in chosen or [] if not (Path(exc.snapshot_path) / f.path).is_file()]
        raise PullError(f"offline ({offline_reason}) and the cached copy of {repo_id} lacks "
                        f"{', '.join(lacking[:5]) or 'some files'}; pull it again with network access") from None
    except LocalEntryNotFoundError:
        raise PullError(f"offline ({offline_reason}) and {repo_id} (revision {revision or 'main'}) is not in the "
                        f"Hugging Face cache {cache_dir}; pull it once with network access") from None
    if chosen is None:
        chosen = choose(repo_id, cached_files(snapshot), quant)
    return snapshot, chosen


def list_local(models_dir: Optional[Path] = None) -> list[ModelEntry]:
    """The models the tester can serve from what is on disk, as its catalog lists them."""
    settings = Settings(models_dir=models_dir) if models_dir is not None else Settings()
    return [m for m in ModelCatalog(settings).models() if m.available]


def format_listing(models: list[ModelEntry]) -> str:
    rows = [("id", "backend", "size", "path")] + [
        (m.id, m.backend, _human(m.size_bytes), str(m.path)) for m in models
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows)


# --------------------------------------------------------------------------- command line


def _hub_error_line(exc: Exception, repo_id: str, revision: Optional[str]) -> str:
    """huggingface_hub's multi-line errors as one line that says what to do."""
    if isinstance(exc, GatedRepoError):  # before RepositoryNotFoundError: a subclass of it
        return (f"{repo_id} is gated: accept its terms at https://huggingface.co/{repo_id} and pass that "
                f"account's token with --token or HF_TOKEN")
    if isinstance(exc, RepositoryNotFoundError):
        return (f"{repo_id} is not on the Hub, or it is private and needs a token with access "
                f"(--token or HF_TOKEN)")
    if isinstance(exc, RevisionNotFoundError):
        return f"{repo_id} has no revision {revision!r}"
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return f"the Hub answered HTTP {status} for {repo_id}: {_one_line(exc).splitlines()[0][:200]}"
    if isinstance(exc, (httpx2.TransportError, OfflineModeIsEnabled, LocalEntryNotFoundError)):
        return f"the Hub cannot be reached while downloading {repo_id} ({type(exc).__name__}); run again to resume"
    return f"{type(exc).__name__}: {_one_line(exc)}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repo_id", nargs="?", help="Hub repo, e.g. Qwen/Qwen2.5-0.5B-Instruct or Qwen/Qwen2.5-0.5B-Instruct-GGUF")
    parser.add_argument("--quant", help="pull only the .gguf files matching *QUANT*.gguf (case aside), e.g. Q4_K_M")
    parser.add_argument("--revision", help="branch, tag or commit (default: the repo's main branch)")
    parser.add_argument("--token", help="Hub token for private or gated repos (default: HF_TOKEN or the stored login)")
    parser.add_argument("--models-dir", type=Path, help="where models go (default: the tester's models_dir, models/)")
    parser.add_argument("--name", help="folder under the models dir (default: the repo's name)")
    parser.add_argument("--cache-dir", type=Path, help="Hugging Face cache (default: HF_HUB_CACHE, else HF_HOME/hub)")
    parser.add_argument("--force", action="store_true", help="replace a local copy that differs from the repo")
    parser.add_argument("--list", action="store_true", help="list the models that are already local, and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per HTTP request would bury the progress bars

    if args.list:
        # The listing is this command's output, so it goes to stdout (pipeable); logs go to stderr.
        print(format_listing(list_local(args.models_dir)))
        return 0
    if not args.repo_id:
        parser.error("give a repo id to pull, or --list")
    try:
        pull(args.repo_id, quant=args.quant, models_dir=args.models_dir, revision=args.revision, token=args.token,
             name=args.name, cache_dir=args.cache_dir, force=args.force)
    except PullError as exc:
        log.error("%s", exc)
        return 2
    except (HfHubHTTPError, httpx2.TransportError, OfflineModeIsEnabled, LocalEntryNotFoundError) as exc:
        log.error("%s", _hub_error_line(exc, args.repo_id, args.revision))
        return 2
    except OSError as exc:  # a full disk mid-copy, a read-only models dir
        log.error("cannot place %s: %s", args.repo_id, _one_line(exc))
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; the same command again fetches only the files still missing "
                  "and resumes a file cut off mid-way")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
