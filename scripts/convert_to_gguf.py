"""Converts a Hugging Face checkpoint (or a base model + LoRA adapter) to GGUF, and quantises it.

The conversion is llama.cpp's own ``convert_hf_to_gguf.py`` (``convert_lora_to_gguf.py`` for
``--lora-only``), run as a subprocess from the copy ``make setup`` extracts out of the
llama-cpp-python sdist of the version we compile: a converter from another llama.cpp can write
metadata (tokenizer pre-type, rope keys) that our llama.cpp misreads. Quantising goes through
the compiled library itself (``llama_cpp.llama_model_quantize``), as ``llama-quantize`` does.

    python -m scripts.convert_to_gguf models/MyModel [--outtype f16|bf16|q8_0] [--quantize q4_k_m] [--out FILE]
    python -m scripts.convert_to_gguf --base models/Base --adapter saves/Base/lora/run1 [--merge-dtype fp32|bf16] ...
    python -m scripts.convert_to_gguf --lora-only --adapter saves/Base/lora/run1 [--base models/Base]
    python -m scripts.convert_to_gguf models/MyModel.f16.gguf --quantize q4_k_m      # quantise an existing GGUF

Outputs default to ``models/<name>.<type>.gguf``, where the catalog lists them; ``<name>`` is the
model folder's name, ``<base>-<adapter>`` for a merge and ``<base>-lora-<adapter>`` for a LoRA
(the part before ``-lora`` is how the catalog pairs a GGUF LoRA with its base GGUF). Every file
is written under a hidden ``.partial`` name in the output folder and renamed when complete, so a
failure or Ctrl-C leaves nothing that looks like a model. Failures are one line and exit code 2.
"""
from __future__ import annotations

import argparse
import ast
import ctypes
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Iterator, Optional

from config.settings import Settings

log = logging.getLogger("convert_to_gguf")

OUTTYPES = ("f16", "bf16", "q8_0")
MERGE_DTYPES = ("fp32", "bf16")
# What llama_model_quantize makes without an importance matrix (the IQ1/IQ2/IQ3 types need one).
QUANT_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l",
               "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs")
# Bytes per weight, for the free-space check (k-quants mix types; these are llama.cpp's figures, rounded up).
BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 1.07, "q6_k": 0.83, "q5_k_m": 0.72, "q5_k_s": 0.70,
                    "q5_0": 0.69, "q5_1": 0.75, "q4_k_m": 0.62, "q4_k_s": 0.58, "q4_0": 0.57, "q4_1": 0.63,
                    "iq4_nl": 0.57, "iq4_xs": 0.54, "q3_k_l": 0.54, "q3_k_m": 0.49, "q3_k_s": 0.44, "q2_k": 0.41}
# general.file_type values (LLAMA_FTYPE_*) that are plain floats, so quantising them is not re-quantising
FLOAT_FILE_TYPES = {0: "f32", 1: "f16", 32: "bf16"}
SPACE_MARGIN = 1.05  # headers, tokenizer, 1-d tensors kept in f32
SPACE_SLACK = 64 * 2**20


class ConvertError(Exception):
    """The conversion cannot run, or failed; the message is one line a user can act on."""


# -- where the converter is ----------------------------------------------------------------------
def llama_cpp_version() -> str:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        raise ConvertError("llama-cpp-python is not installed; run `make setup`") from None


def converter_dir() -> Path:
    """Where ``make setup`` puts the converter: LLAMA_CPP_CONVERTER_DIR (the Makefile's variable
    of that name), else ~/.cache/model_test/llama-cpp-python/<version>-src."""
    configured = os.environ.get("LLAMA_CPP_CONVERTER_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "model_test" / "llama-cpp-python" / f"{llama_cpp_version()}-src"


def find_converter(directory: Path, script: str) -> Path:
    """The converter script, with the vendored gguf-py and conversion/ package it imports."""
    path = directory / script
    needed = (path, directory / "gguf-py" / "gguf" / "__init__.py", directory / "conversion" / "__init__.py")
    missing = [p for p in needed if not p.is_file()]
    if missing:
        raise ConvertError(
            f"llama.cpp's converter is missing ({missing[0]} not found); run `make setup`, which extracts it "
            f"from the llama-cpp-python sdist into {directory}"
        )
    return path


def converter_env(directory: Path) -> dict:
    env = dict(os.environ)
    # The vendored gguf-py matches the converter; the gguf wheel in the venv may be older or newer.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(directory / "gguf-py"), str(directory), env.get("PYTHONPATH")) if p)
    # Everything it needs is on disk; never let a missing file turn into a hub download.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# -- running it ------------------------------------------------------------------------------------
_PROGRESS = re.compile(r"Writing:\s+(\d+)%")
_LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL):[^:]*:(.*)$")
_KEY_LINES = ("Loading model", "Loading base model", "Model architecture", "Using model architecture",
              "Exporting model", "n_tensors", "successfully exported", "end tokens")
END_TOKENS_HOOK = Path(__file__).resolve().parent / "gguf_end_tokens_hook.py"


def run_converter(script: Path, args: list[str], verbose: bool = False, end_tokens: tuple[int, ...] = ()) -> None:
    """Runs a converter script, its log forwarded to ours (key lines at INFO, the rest at DEBUG
    unless ``verbose``), and raises ConvertError with its own last error line when it fails.
    With ``end_tokens`` it runs through gguf_end_tokens_hook.py, so the GGUF declares those ids."""
    hook = [str(END_TOKENS_HOOK), ",".join(map(str, end_tokens))] if end_tokens else []
    command = [sys.executable, *hook, str(script), *args]
    log.debug("running %s", " ".join(command))
    errors: list[str] = []
    tail: list[str] = []
    shown = -25
    # text mode reads tqdm's carriage-return updates as lines of their own
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                          env=converter_env(script.parent), cwd=script.parent) as process:
        try:
            for raw in process.stdout:
                line = raw.rstrip()
                if not line:
                    continue
                tail = (tail + [line])[-20:]
                progress = _PROGRESS.search(line)
                if progress:
                    percent = int(progress.group(1))
                    if percent >= shown + 25 or (percent == 100 and shown < 100):
                        shown = percent
                        log.info("%s: writing %d%%", script.name, percent)
                    continue
                match = _LOG_LINE.match(line)
                level, text = (match.group(1), match.group(2).strip()) if match else ("", line)
                if level in ("ERROR", "CRITICAL"):
                    errors.append(text)
                if level in ("WARNING", "ERROR", "CRITICAL"):
                    log.warning("%s: %s", script.name, text)
                elif verbose or any(key in text for key in _KEY_LINES):
                    log.info("%s: %s", script.name, text)
                else:
                    log.debug("%s: %s", script.name, text)
        except BaseException:
            process.kill()
            raise
    if process.returncode != 0:
        raise ConvertError(f"{script.name} failed: {failure_reason(errors, tail, process.returncode)}")


def failure_reason(errors: list[str], tail: list[str], returncode: int) -> str:
    """One line saying why the converter failed, from its error lines and the tail of its output."""
    traceback_at = max((i for i, line in enumerate(tail) if line.startswith("Traceback")), default=None)
    if traceback_at is not None and tail[-1] != tail[traceback_at]:
        reason = tail[-1].strip()  # the exception line
    elif errors:
        reason = errors[-1]
    elif tail:
        reason = tail[-1].strip()
    else:
        reason = f"exit code {returncode}"
    if "No space left on device" in reason:
        return f"no space left on device ({reason})"
    unsupported = re.search(r"Model (\S+) is not supported", reason)
    if unsupported:
        return unknown_architecture(unsupported.group(1))
    return reason


# -- architectures ---------------------------------------------------------------------------------
def unknown_architecture(architecture: str, model_dir: Optional[Path] = None) -> str:
    where = f" ({model_dir.name}/config.json)" if model_dir is not None else ""
    return (f"llama.cpp's converter (llama-cpp-python {llama_cpp_version()}) does not know architecture "
            f"{architecture}{where}, so it cannot be converted to GGUF; a newer llama-cpp-python may know it")


def converter_architectures(directory: Path) -> Optional[frozenset[str]]:
    """The text-model architectures the converter registers (TEXT_MODEL_MAP in its
    conversion/__init__.py), read without importing it, which would load torch; None when the
    file has no such table, and the converter itself decides."""
    try:
        tree = ast.parse((directory / "conversion" / "__init__.py").read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "TEXT_MODEL_MAP" for t in targets) and isinstance(node.value, ast.Dict):
            keys = [k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
            return frozenset(keys) or None
    return None


def model_architecture(model_dir: Path) -> Optional[str]:
    """config.json's ``architectures[0]``, as the converter picks the model class."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    architectures = config.get("architectures") if isinstance(config, dict) else None
    return architectures[0] if isinstance(architectures, list) and architectures and isinstance(architectures[0], str) else None


def check_architecture(model_dir: Path, converter: Path) -> None:
    """Refuses, before any work is done, a checkpoint whose architecture the converter does not know."""
    known = converter_architectures(converter)
    architecture = model_architecture(model_dir)
    if known is not None and architecture is not None and architecture not in known:
        raise ConvertError(unknown_architecture(architecture, model_dir))


# -- temporary outputs -----------------------------------------------------------------------------
def staging_path(out: Path, suffix: str = "") -> Path:
    """A hidden, ``.partial`` name beside ``out``: same filesystem (so the rename is atomic), and
    neither the catalog nor a person takes it for a model."""
    return out.parent / f".{out.name}{suffix}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"


@contextmanager
def staged(out: Path, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary path; removes it on any failure (Ctrl-C included) and on success unless moved."""
    temp = staging_path(out, suffix)
    try:
        yield temp
    finally:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        elif temp.exists():
            temp.unlink()


def publish(temp: Path, out: Path) -> Path:
    os.replace(temp, out)
    return out


# -- disk space ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceFacts:
    parameters: int
    stored_bytes: int


def source_facts(model_dir: Path) -> SourceFacts:
    """Parameter count from the safetensors headers (pytorch .bin: its size as two bytes a weight)."""
    from app.services.checkpoints.hf_checkpoint import inspect_checkpoint
    from app.services.core.errors import ServiceError

    try:
        facts = inspect_checkpoint(model_dir)
    except ServiceError as exc:
        raise ConvertError(exc.message) from None
    parameters = facts.parameters or facts.stored_bytes // 2
    return SourceFacts(parameters, facts.stored_bytes)


def check_free_space(folder: Path, needs: dict[str, float]) -> None:
    """Refuses to start when ``folder`` lacks room for the files of ``needs`` (name -> bytes),
    which all exist at the same time at the end of the run."""
    needed = int(sum(needs.values()) * SPACE_MARGIN) + SPACE_SLACK
    free = shutil.disk_usage(folder).free
    if needed > free:
        parts = ", ".join(f"{name} {size / 2**30:.2f} GiB" for name, size in needs.items())
        raise ConvertError(
            f"not enough disk space in {folder}: about {needed / 2**30:.2f} GiB needed ({parts}), "
            f"{free / 2**30:.2f} GiB free"
        )


# -- the steps -------------------------------------------------------------------------------------
def convert_checkpoint(model_dir: Path, out: Path, outtype: str, model_name: Optional[str] = None,
                       converter: Optional[Path] = None, verbose: bool = False) -> Path:
    """``convert_hf_to_gguf.py`` on a Hugging Face model folder; writes ``out`` (a .partial first),
    declaring the end tokens of the folder's generation config (checkpoints/stop_tokens.py)."""
    from app.services.checkpoints.stop_tokens import hf_stop_ids_in

    script = find_converter(converter or converter_dir(), "convert_hf_to_gguf.py")
    started = time.perf_counter()
    with staged(out) as temp:
        args = [str(model_dir), "--outfile", str(temp), "--outtype", outtype]
        if model_name:
            args += ["--model-name", model_name]
        run_converter(script, args, verbose, end_tokens=hf_stop_ids_in(model_dir))
        if not temp.is_file():
            raise ConvertError(f"{script.name} exited without writing {temp.name}")
        publish(temp, out)
    log.info("converted %s to %s (%s, %.1f MB) in %.1f s", model_name or model_dir.name, out, outtype,
             out.stat().st_size / 1e6, time.perf_counter() - started)
    return out


def convert_lora(adapter: Path, base: Path, out: Path, outtype: str, converter: Optional[Path] = None,
                 verbose: bool = False) -> Path:
    """``convert_lora_to_gguf.py``: the PEFT adapter alone as a GGUF LoRA for llama.cpp."""
    script = find_converter(converter or converter_dir(), "convert_lora_to_gguf.py")
    started = time.perf_counter()
    with staged(out) as temp:
        run_converter(script, [str(adapter), "--base", str(base), "--outfile", str(temp), "--outtype", outtype], verbose)
        if not temp.is_file():
            raise ConvertError(f"{script.name} exited without writing {temp.name}")
        publish(temp, out)
    log.info("converted LoRA %s (base %s) to %s (%s, %.1f MB) in %.1f s", adapter.name, base.name, out, outtype,
             out.stat().st_size / 1e6, time.perf_counter() - started)
    return out


def quant_ftype(name: str) -> int:
    import llama_cpp

    if name not in QUANT_TYPES:
        raise ConvertError(f"unknown quantisation type {name!r}; choose one of {', '.join(QUANT_TYPES)}")
    return getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name.upper()}")


class _QuantizeLog:
    """llama.cpp's log during a quantisation, routed to ours: one INFO line per 10 % of the
    tensors, the rest at DEBUG, and the last error kept for the failure message."""

    _TENSOR = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")

    def __init__(self, verbose: bool):
        import llama_cpp

        self.verbose = verbose
        self.last_error = ""
        self.shown = -10
        self._partial = ""

        @llama_cpp.llama_log_callback
        def callback(level, text, user_data):
            self._line(int(level), text.decode("utf-8", errors="replace"))

        self.callback = callback  # kept referenced: llama.cpp holds only the C pointer

    def _line(self, level: int, text: str) -> None:
        self._partial += text
        if not self._partial.endswith("\n"):
            return
        line, self._partial = self._partial.strip(), ""
        if not line:
            return
        if level == 3 or "failed" in line or "error" in line.lower():
            self.last_error = line
        tensor = self._TENSOR.match(line)
        if tensor:
            percent = 100 * int(tensor.group(1)) // max(int(tensor.group(2)), 1)
            if percent >= self.shown + 10:
                self.shown = percent
                log.info("quantising: tensor %s of %s", tensor.group(1), tensor.group(2))
        if self.verbose or "WARNING" in line or "size =" in line and "MiB" in line and not tensor:
            log.info("llama.cpp: %s", line)
        else:
            log.debug("llama.cpp: %s", line)


def quantize(source: Path, out: Path, quant: str, allow_requantize: bool = False, verbose: bool = False) -> Path:
    """``llama_model_quantize`` from a float GGUF (f32, f16, bf16) into ``out``."""
    import llama_cpp

    from app.services.checkpoints.gguf_metadata import read_gguf_header
    from app.services.core.errors import InvalidModel

    ftype = quant_ftype(quant)
    try:
        header = read_gguf_header(source)
    except InvalidModel as exc:
        raise ConvertError(exc.message) from None
    if header.is_lora:
        raise ConvertError(f"{source.name} is a LoRA adapter; quantise the model, or convert the LoRA with --outtype q8_0")
    file_type = header.get("general.file_type")
    if file_type not in FLOAT_FILE_TYPES and not allow_requantize:
        raise ConvertError(
            f"{source.name} is already quantised (general.file_type {file_type}); quantise from an f16/bf16 GGUF "
            f"(--outtype f16), or pass --allow-requantize to accept the extra loss"
        )
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 0  # all cores
    params.allow_requantize = allow_requantize
    started = time.perf_counter()
    quant_log = _QuantizeLog(verbose)
    result: dict = {}
    with staged(out) as temp:
        llama_cpp.llama_log_set(quant_log.callback, ctypes.c_void_p(0))
        try:
            worker = threading.Thread(target=lambda: result.update(
                rc=llama_cpp.llama_model_quantize(str(source).encode(), str(temp).encode(), ctypes.byref(params))),
                name="llama-quantize", daemon=True)
            worker.start()
            while worker.is_alive():  # a join with a timeout keeps Ctrl-C working
                worker.join(10.0)
                if worker.is_alive():
                    log.info("quantising %s to %s: %.0f s", source.name, quant, time.perf_counter() - started)
        finally:
            _restore_llama_log()
        if result.get("rc") != 0 or not temp.is_file():
            raise ConvertError(f"quantising {source.name} to {quant} failed: {quant_log.last_error or 'llama.cpp gave no reason'}")
        publish(temp, out)
    log.info("quantised %s to %s (%s, %.1f MB) in %.1f s", source.name, out, quant, out.stat().st_size / 1e6,
             time.perf_counter() - started)
    return out


def _restore_llama_log() -> None:
    """Hands llama.cpp's log back to llama-cpp-python's own handler (Llama(verbose=...) relies on it)."""
    import llama_cpp
    from llama_cpp import _logger

    llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


# -- the whole run ---------------------------------------------------------------------------------
def default_out(models_dir: Path, name: str, kind: str) -> Path:
    return models_dir / f"{name}.{kind}.gguf"


def _check_out(out: Path, overwrite: bool) -> Path:
    out = out.expanduser().resolve()
    if out.suffix.lower() != ".gguf":
        raise ConvertError(f"the output must be a .gguf file, got {out}")
    if out.exists() and not overwrite:
        raise ConvertError(f"output {out} already exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _check_model_dir(path: Path, role: str = "model") -> Path:
    path = path.expanduser().resolve()
    if not path.exists():
        raise ConvertError(f"{role} not found: {path}")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ConvertError(f"not a Hugging Face model directory (no config.json): {path}")
    return path


def _check_adapter(adapter: Path, base: Path, force: bool) -> Path:
    from app.services.checkpoints.adapters import adapter_matches_base
    from scripts.merge_lora import MergeError, adapter_base

    adapter = adapter.expanduser().resolve()
    try:
        named = adapter_base(adapter)
    except MergeError as exc:
        raise ConvertError(str(exc)) from None
    if not adapter_matches_base(named, base) and not force:
        raise ConvertError(f"adapter {adapter} was trained on {named or '(no base named in adapter_config.json)'}, "
                           f"not on {base}; pass --force to convert anyway")
    return adapter


def _adapter_size(adapter: Path) -> int:
    return sum(p.stat().st_size for p in adapter.glob("adapter_model.*") if p.is_file())


def run(args: argparse.Namespace) -> Path:
    """One of the module docstring's four runs, chosen by the arguments; the path written."""
    models_dir = Path(args.models_dir or Settings().models_dir)
    started = time.perf_counter()
    if args.quantize:
        quant_ftype(args.quantize)  # an unknown type fails before any work
    if args.lora_only:
        out = _convert_lora_only(args, models_dir)
    elif args.model is not None and args.model.suffix.lower() == ".gguf":
        out = _quantize_gguf(args)
    else:
        out = _convert_model(args, models_dir)
    log.info("done in %.1f s: %s", time.perf_counter() - started, out)
    return out


def _convert_lora_only(args: argparse.Namespace, models_dir: Path) -> Path:
    """``--lora-only``: the PEFT adapter alone, as a GGUF LoRA."""
    if args.adapter is None:
        raise ConvertError("--lora-only needs --adapter DIR (the PEFT adapter to convert)")
    if args.model is not None:
        raise ConvertError("--lora-only takes --adapter (and --base), not a model")
    if args.quantize:
        raise ConvertError("a LoRA is not quantised with --quantize; convert it with --outtype q8_0 instead")
    base = _check_model_dir(args.base or _base_named_by(args.adapter), "base model")
    adapter = _check_adapter(args.adapter, base, args.force)
    converter = args.converter_dir or converter_dir()
    find_converter(converter, "convert_lora_to_gguf.py")
    check_architecture(base, converter)
    out = _check_out(args.out or default_out(models_dir, f"{base.name}-lora-{adapter.name}", args.outtype), args.overwrite)
    check_free_space(out.parent, {"LoRA": _adapter_size(adapter) * BYTES_PER_WEIGHT[args.outtype] / 2})
    convert_lora(adapter, base, out, args.outtype, converter, args.verbose)
    return out


def _base_named_by(adapter: Path) -> Path:
    """The base folder an adapter's config names, when it is a local folder."""
    from scripts.merge_lora import MergeError, adapter_base

    try:
        named = adapter_base(adapter.expanduser().resolve())
    except MergeError as exc:
        raise ConvertError(str(exc)) from None
    if not named or not Path(named).expanduser().is_dir():
        raise ConvertError(f"the adapter names its base as {named or 'nothing'}, which is no local folder; pass --base DIR")
    return Path(named)


def _quantize_gguf(args: argparse.Namespace) -> Path:
    """An existing GGUF: quantised, nothing else."""
    source = args.model.expanduser().resolve()
    if not source.is_file():
        raise ConvertError(f"model not found: {source}")
    if not args.quantize:
        raise ConvertError(f"{source.name} is already a GGUF; pass --quantize TYPE to quantise it")
    from app.services.checkpoints.gguf_metadata import stem_without_type

    out = _check_out(args.out or default_out(source.parent, stem_without_type(source), args.quantize), args.overwrite)
    check_free_space(out.parent, {args.quantize: source.stat().st_size * BYTES_PER_WEIGHT[args.quantize] / 2})
    quantize(source, out, args.quantize, args.allow_requantize, args.verbose)
    return out


@dataclass(frozen=True)
class _Source:
    """What a conversion starts from: a model folder, or a base with an adapter to merge first."""

    folder: Path
    name: str  # of the outputs, and of the merged folder the converter names the model after
    base: Optional[Path] = None
    adapter: Optional[Path] = None


def _conversion_source(args: argparse.Namespace) -> _Source:
    if args.base is not None or args.adapter is not None:
        if args.model is not None:
            raise ConvertError("give either a model directory or --base with --adapter, not both")
        if args.base is None or args.adapter is None:
            raise ConvertError("a merge needs both --base DIR and --adapter DIR")
        base = _check_model_dir(args.base, "base model")
        adapter = _check_adapter(args.adapter, base, args.force)
        return _Source(base, f"{base.name}-{adapter.name}", base, adapter)
    if args.model is not None:
        folder = _check_model_dir(args.model)
        return _Source(folder, folder.name)
    raise ConvertError("give a model directory, --base DIR --adapter DIR, or --lora-only --adapter DIR")


def _convert_model(args: argparse.Namespace, models_dir: Path) -> Path:
    """A model folder, or a base merged with an adapter, converted and maybe quantised."""
    source = _conversion_source(args)
    converter = args.converter_dir or converter_dir()
    find_converter(converter, "convert_hf_to_gguf.py")
    check_architecture(source.folder, converter)
    out = _check_out(args.out or default_out(models_dir, source.name, args.quantize or args.outtype), args.overwrite)
    converted, keep_converted = _converted_path(args, out, source.name)
    check_free_space(out.parent, _space_needed(args, source_facts(source.folder).parameters, merging=source.adapter is not None))
    with staged(out, ".merged") as merged_root, staged(out, f".{args.outtype}") as intermediate:
        folder = source.folder
        if source.adapter is not None:
            folder = _merge(source, merged_root, args)
        target = converted if keep_converted else intermediate
        convert_checkpoint(folder, target, args.outtype, model_name=source.name if source.adapter is not None else None,
                           converter=converter, verbose=args.verbose)
        if source.adapter is not None:
            shutil.rmtree(merged_root, ignore_errors=True)  # room for the quantised file
        if args.quantize:
            quantize(target, out, args.quantize, args.allow_requantize, args.verbose)
    return out


def _converted_path(args: argparse.Namespace, out: Path, name: str) -> tuple[Path, bool]:
    """Where the converter writes (``out`` itself when nothing is quantised after), and whether that file stays."""
    if not args.quantize:
        return out, True
    if args.outtype == "q8_0" and not args.allow_requantize:
        raise ConvertError("--quantize re-quantises a q8_0 conversion; convert with --outtype f16 (or bf16) first")
    converted = out.parent / f"{name}.{args.outtype}.gguf"
    if args.keep_unquantized:
        return _check_out(converted, args.overwrite), True
    return converted, False


def _space_needed(args: argparse.Namespace, parameters: int, merging: bool) -> dict[str, float]:
    """Bytes each file of the run takes, by what it is (check_free_space names them)."""
    needs = {}
    if merging:
        needs[f"merged {args.merge_dtype} checkpoint (temporary)"] = parameters * (4 if args.merge_dtype == "fp32" else 2)
    needs[args.outtype] = parameters * BYTES_PER_WEIGHT[args.outtype]
    if args.quantize:
        needs[args.quantize] = parameters * BYTES_PER_WEIGHT[args.quantize]
    return needs


def _merge(source: _Source, merged_root: Path, args: argparse.Namespace) -> Path:
    """The base with its adapter merged, in a folder named like the model inside ``merged_root``:
    the converter derives general.name/basename/finetune from the folder's name."""
    from scripts.merge_lora import MergeError, merge

    merged_dir = merged_root / source.name
    merged_root.mkdir()
    started = time.perf_counter()
    try:
        merge(source.base, source.adapter, merged_dir, dtype=args.merge_dtype, force=args.force)
    except MergeError as exc:
        raise ConvertError(str(exc)) from None
    log.info("merged %s into %s (%s) in %.1f s", source.adapter.name, source.base.name, args.merge_dtype, time.perf_counter() - started)
    return merged_dir


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", type=Path, help="Hugging Face model directory (or a .gguf with --quantize)")
    parser.add_argument("--base", type=Path, help="base model directory the adapter was trained on")
    parser.add_argument("--adapter", type=Path, help="PEFT LoRA adapter folder: merged into --base, or alone with --lora-only")
    parser.add_argument("--lora-only", action="store_true", help="convert the adapter alone to a GGUF LoRA (llama.cpp applies it at load)")
    parser.add_argument("--outtype", choices=OUTTYPES, default="f16", help="the converter's output type (default f16)")
    parser.add_argument("--quantize", metavar="TYPE", help=f"then quantise with llama.cpp: {', '.join(QUANT_TYPES)}")
    parser.add_argument("--keep-unquantized", action="store_true", help="with --quantize, keep the --outtype GGUF as well")
    parser.add_argument("--allow-requantize", action="store_true", help="quantise a GGUF that is already quantised")
    parser.add_argument("--merge-dtype", choices=MERGE_DTYPES, default="fp32",
                        help="dtype of the temporary merge (fp32 keeps the f16 conversion the only rounding; bf16 halves its disk)")
    parser.add_argument("--out", type=Path, help="output .gguf file (default models/<name>.<type>.gguf)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--force", action="store_true", help="use an adapter that names another base")
    parser.add_argument("--models-dir", type=Path, help="where default outputs go (default: the tester's models folder)")
    parser.add_argument("--converter-dir", type=Path,
                        help="llama.cpp converter folder (default LLAMA_CPP_CONVERTER_DIR or the one `make setup` fills)")
    parser.add_argument("--verbose", action="store_true", help="show every line of the converter's and llama.cpp's log")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except ConvertError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; nothing half-written was kept")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
