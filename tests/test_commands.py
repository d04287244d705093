"""Every command the Makefile runs and the docs show parses with the arguments it is given.

``make -n -B TARGET`` prints what a target would run, without running it; each Python command in
that print-out is checked, and so is each ``python ...`` and ``make ...`` command shown in
README.md, LLAMACPP_GUIDE.md and docs/*.md. A script's arguments are parsed by the script's own
``main`` up to its ``ArgumentParser.parse_args``, where the check stops it: nothing is built,
loaded, downloaded or served. ``run.py``'s flags go through ``config.cli.parse_settings`` whole,
bounds included. CHANGELOG.md is history and is not checked.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import io
import re
import shlex
import subprocess
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from typing import Optional
from unittest import mock

import pytest

from config.settings import PROJECT_ROOT

DOCUMENTS = ["README.md", "LLAMACPP_GUIDE.md", *sorted(str(p.relative_to(PROJECT_ROOT)) for p in (PROJECT_ROOT / "docs").glob("*.md"))]
# Modules the Makefile runs that are not ours: only their presence is checked.
TOOLS = {"pip", "venv", "ruff", "pytest"}
SHELL_OPERATORS = {"&&", "||", ";", "|"}
PYTHON = re.compile(r"^(?:.*/)?python(?:3(?:\.\d+)?)?$")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True)
class Command:
    where: str  # file:line, or the make invocation
    words: tuple[str, ...]  # after the interpreter: -m module args..., or script.py args...


class _Parsed(Exception):
    """Raised in place of returning from ``parse_args``, so the script's work never starts."""


# -- finding the commands ----------------------------------------------------------------------
def _segments(words: list[str]) -> list[list[str]]:
    """A shell line's words split at ``&&``, ``||``, ``;`` and ``|``, leading VAR=value dropped."""
    segments, current = [], []
    for word in [*words, ";"]:
        if word in SHELL_OPERATORS:
            while current and ASSIGNMENT.match(current[0]):
                current.pop(0)
            if current:
                segments.append(current)
            current = []
        else:
            current.append(word)
    return segments


def python_commands(shell_text: str, where: str) -> list[Command]:
    """The Python commands of shell lines (continuations joined, comments dropped)."""
    commands = []
    for line in shell_text.replace("\\\n", " ").splitlines():
        if "python" not in line:
            continue
        for segment in _segments(shlex.split(line, comments=True)):
            if PYTHON.match(segment[0]):
                commands.append(Command(where, tuple(segment[1:])))
    return commands


def make_dry_run(args: list[str]) -> str:
    """What ``make ARGS`` would run, every recipe included whether or not its target is current."""
    done = subprocess.run(["make", "-n", "-B", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"make -n {shlex.join(args)} failed: {done.stderr}"
    return done.stdout


def make_targets() -> list[str]:
    """The Makefile's .PHONY targets: the ones a user types."""
    text = (PROJECT_ROOT / "Makefile").read_text()
    return [word for line in text.splitlines() if line.startswith(".PHONY:") for word in line.split()[1:]]


def _expand_optional(words: list[str]) -> list[list[str]]:
    """A usage line's variants: ``[--flag value]`` left out, and put in with each of its ``a|b|c``
    alternatives (``--outtype f16|bf16|q8_0`` is three commands)."""
    if not any(word.startswith("[") or word.endswith("]") or "|" in word for word in words):
        return [words]
    bare, full, depth = [], [], 0
    for word in words:
        opened = len(word) - len(word.lstrip("["))
        depth += opened
        word = word.strip("[")
        closed = len(word) - len(word.rstrip("]"))
        word = word.rstrip("]")
        if depth == 0:
            bare.append(word)
        full.append(word)
        depth -= closed
    widest = max((len(word.split("|")) for word in full), default=1)
    variants = [bare] + [[word.split("|")[min(k, len(word.split("|")) - 1)] for word in full] for k in range(widest)]
    return [list(v) for v in dict.fromkeys(tuple(v) for v in variants)]


def documented_commands() -> tuple[list[Command], list[tuple[str, list[str]]]]:
    """The Python commands and ``make`` invocations shown in the docs: lines of code blocks and
    inline code that begin with a Python interpreter or ``make``."""
    commands: list[Command] = []
    makes: list[tuple[str, list[str]]] = []
    for name in DOCUMENTS:
        lines = (PROJECT_ROOT / name).read_text().splitlines()
        in_block, pending, start = False, "", 0
        shown: list[tuple[int, str]] = []
        for number, line in enumerate(lines, 1):
            if line.lstrip().startswith("```"):
                in_block = not in_block
                continue
            if in_block:
                if not pending:
                    start = number
                pending += line.rstrip("\\") + " " if line.endswith("\\") else line
                if not line.endswith("\\"):
                    shown.append((start, pending))
                    pending = ""
            else:
                shown += [(number, span) for span in re.findall(r"`([^`]+)`", line)]
        for number, text in shown:
            try:
                words = shlex.split(text, comments=True)
            except ValueError:
                continue  # not a shell line (a JSON body, a sentence)
            where = f"{name}:{number}"
            for segment in _segments(words):
                if segment[0] == "make" and len(segment) > 1:  # a bare `make` is the tool's name in a sentence
                    makes.append((where, segment[1:]))
                elif PYTHON.match(segment[0]) and len(segment) > 1:
                    commands += [Command(where, tuple(variant)) for variant in _expand_optional(segment[1:])]
    # each distinct command once, where it is first shown
    commands = list({c.words: c for c in reversed(commands)}.values())[::-1]
    makes = list({tuple(args): (where, args) for where, args in reversed(makes)}.values())[::-1]
    return commands, makes


# -- checking one command ----------------------------------------------------------------------
def _parse_with_main(module_name: str, args: list[str]) -> Optional[str]:
    """Runs the script's ``main(args)`` until it has parsed them; the problem, or None."""
    module = importlib.import_module(module_name)
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    stderr = io.StringIO()
    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop), \
            mock.patch("logging.basicConfig"), redirect_stderr(stderr), redirect_stdout(io.StringIO()):
        try:
            module.main(args)
        except _Parsed:
            return None
        except SystemExit as exc:
            return None if exc.code in (0, None) else f"exit {exc.code}: {stderr.getvalue().strip()}"
    return f"{module_name}.main returned without parsing its arguments"


def _parse_run_py(args: list[str]) -> Optional[str]:
    from config.cli import parse_settings

    stderr = io.StringIO()
    with redirect_stderr(stderr), redirect_stdout(io.StringIO()):
        try:
            parse_settings(args)
        except SystemExit as exc:
            return None if exc.code in (0, None) else f"exit {exc.code}: {stderr.getvalue().strip()}"
    return None


def _parse_gunicorn(args: list[str]) -> Optional[str]:
    from gunicorn.config import Config

    stderr = io.StringIO()
    with redirect_stderr(stderr):
        try:
            parsed = Config().parser().parse_args(args)
        except SystemExit as exc:
            return f"gunicorn: exit {exc.code}: {stderr.getvalue().strip()}"
    if parsed.config and not (PROJECT_ROOT / parsed.config).is_file():
        return f"gunicorn: no config file {parsed.config}"
    for spec in parsed.args:  # module:callable() as gunicorn imports it
        module_name, _, call = spec.partition(":")
        if not callable(getattr(importlib.import_module(module_name), call.split("(")[0], None)):
            return f"gunicorn: {spec} names nothing callable"
    return None


def problem(words: tuple[str, ...], strict: bool) -> Optional[str]:
    """Why ``python WORDS`` would not start, or None. Not strict: a module of another project
    (``python -m llama_cpp.server``) is left alone."""
    if not words:
        return "a bare interpreter"
    if words[0] == "-c":
        try:
            compile(words[1], "<-c>", "exec")
        except SyntaxError as exc:
            return f"python -c: {exc}"
        return None
    if words[0] == "-m":
        module, args = words[1], list(words[2:])
        if module == "app.services.system.hugepages":  # runs the command it is given, with the tunable
            if not args or not PYTHON.match(args[0]):
                return f"{module} wraps a Python command, got {args}"
            return problem(tuple(args[1:]), strict)
        if module == "gunicorn":
            return _parse_gunicorn(args)
        if module in TOOLS:
            return None if importlib.util.find_spec(module) else f"{module} is not installed"
        if module.split(".")[0] in ("scripts", "app"):
            if importlib.util.find_spec(module) is None:
                return f"no module {module}"
            return _parse_with_main(module, args)
        return f"unknown module {module}" if strict else None
    script, args = words[0], list(words[1:])
    if script == "run.py":
        return _parse_run_py(args)
    if script.startswith("scripts/") and script.endswith(".py"):
        if not (PROJECT_ROOT / script).is_file():
            return f"no script {script}"
        return _parse_with_main(script[:-3].replace("/", "."), args)
    return f"unknown script {script}" if strict else None


# -- the tests ---------------------------------------------------------------------------------
COMMANDS, MAKES = documented_commands()


def problems_of_make(args: list[str]) -> list[tuple[str, str]]:
    """Each Python command ``make ARGS`` would run that would not start, with the reason."""
    commands = python_commands(make_dry_run(args), f"make {shlex.join(args)}")
    return [(shlex.join(c.words), reason) for c in commands if (reason := problem(c.words, strict=True))]


@pytest.mark.parametrize("target", make_targets())
def test_every_python_command_of_a_make_target_parses(target):
    assert problems_of_make([target]) == []


@pytest.mark.parametrize("where, args", MAKES, ids=[f"{where} make {shlex.join(args)}" for where, args in MAKES])
def test_every_documented_make_command_runs_commands_that_parse(where, args):
    assert problems_of_make(args) == []


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.where} {shlex.join(c.words)}" for c in COMMANDS])
def test_every_documented_python_command_parses(command):
    assert problem(command.words, strict=False) is None


def test_the_docs_show_commands_to_check():
    """The extraction itself: it finds the commands it is meant to check."""
    shown = {c.words[:2] for c in COMMANDS}
    assert {("-m", "scripts.train_lora"), ("-m", "scripts.convert_to_gguf"), ("-m", "scripts.bench_parallel")} <= shown
    assert any(c.words[0] == "run.py" for c in COMMANDS)
    assert {"bench", "bench-parallel", "serve"} <= {args[0] for _, args in MAKES if args}
    assert {"bench", "bench-parallel", "run", "serve", "test"} <= set(make_targets())


def test_a_flag_the_script_does_not_take_is_caught():
    """What broke ``make bench``: a flag bench_stream never had."""
    assert "unrecognized arguments: --llama-server" in problem(("-m", "scripts.bench_stream", "--llama-server", "x"), strict=True)
    assert problem(("-m", "scripts.bench_stream", "--llama-bench", "x", "--runs", "1"), strict=True) is None
    assert "--n-ctx" in problem(("run.py", "--n-ctx", "0"), strict=True)  # bounds, not just syntax
    assert problem(("-m", "scripts.no_such_script"), strict=False) == "no module scripts.no_such_script"
    assert problem(("-m", "somebody_elses.server"), strict=False) is None
    assert _expand_optional(["-m", "x", "a", "[--t", "f16|bf16]", "[--q", "q4", "[--keep]]"]) == [
        ["-m", "x", "a"], ["-m", "x", "a", "--t", "f16", "--q", "q4", "--keep"], ["-m", "x", "a", "--t", "bf16", "--q", "q4", "--keep"]]


# -- the build switch: CUDA where nvcc and a GPU are, the CPU flags everywhere (issue 29) ----------
def _fake_tool(folder, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


@pytest.mark.parametrize("gpu_listed, expected", [
    (True, "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA=OFF"),
    (False, None),  # the CUDA toolkit without a GPU (this CI): a CPU build, or every run would compile CUDA
])
def test_make_builds_llama_cpp_with_cuda_for_the_gpu_it_sees(tmp_path, gpu_listed, expected):
    import os
    import platform

    if platform.system() != "Linux":
        pytest.skip("the CUDA switch is Linux's")
    _fake_tool(tmp_path, "nvcc", "exit 0\n")
    _fake_tool(tmp_path, "nvidia-smi", 'case "$1" in -L) echo "GPU 0: NVIDIA H200 (UUID: GPU-0)";; '
                                       '--query-gpu=compute_cap) echo "9.0";; esac\n' if gpu_listed
               else 'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver." >&2; exit 9\n')
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    env.pop("CMAKE_ARGS", None)
    env.pop("LLAMA_GPU", None)
    done = subprocess.run(["make", "-n", "-B", "setup"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    build = next(line for line in done.stdout.splitlines() if "pip wheel" in line)
    cpu_flags = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_LLAMAFILE=OFF"
    if platform.machine() == "x86_64":
        assert cpu_flags in build  # the same CPU flags as a CPU build, CUDA or not
    if expected:
        assert expected in build and "llama-cpp-python/0.3.36-cuda90-" in build
    else:
        assert "GGML_CUDA" not in build and "-cuda" not in build
