"""Streaming overhead, multi-turn reuse and startup of model_test, measured side by side in one run.

llama.cpp (the embedded GGUF):
  llama-bench     native llama.cpp ``llama-bench -p 0 -n N -d P`` tg at the depth of the prompt's P
                  tokens (the same length), built by ``make bench-deps`` from the pinned
                  llama-cpp-python sdist with the wheel's CMAKE_ARGS; for reference also ``-d 0``,
                  and ``-lm none`` (weights read into memory, as the backend loads them)
  llama-cpp-py    llama-cpp-python's own ``create_chat_completion(stream=True)``
  (a) in-process  the llama.cpp backend's own stream, called in this process
  (b) http-sse    the same generation through ``POST /api/chat_stream`` of a ``run.py`` server
  (b2) openai-sse the same through ``/v1/chat/completions`` with ``stream: true``

transformers (the default checkpoint built from the same GGUF):
  bare generate   ``model.generate`` in-process with no streamer (the baseline of the SSE target)
  (c) in-process fp32, the CPU default         (d) the same through HTTP SSE
  (e) in-process bf16                          (f)/(g) a rank-16 all-linear LoRA, merged / unmerged,
  (h) that unmerged LoRA switched off (compare mode's shared base column)

Every path decodes the same prompt greedily to exactly the asked number of tokens (``ignore_eos``;
llama-cpp-python has no such switch, but this prompt runs past 256 tokens without an end token);
paths of one backend run alternately, in an order that turns each round, so drift in machine load
hits them alike. Decode tokens/s
counts the tokens after the first over the time from first to last token as the client sees
them; TTFT is from the request to the first token. Tables show medians over ``--runs``; a ratio
is the median of the per-round ratios (paired), so drift in the machine's speed between rounds cancels out.

Multi-turn: 10 fixed user turns, each answered greedily by the model (up to 140 tokens, so turn 10
is about 1,500 tokens), every turn sent whole to ``/api/chat_stream`` with the earlier answers as
a client sends them back; TTFT of turn 10 against turn 1, and turn 10 sent cold after one
unrelated chat per KV sequence of the server (``--parallel``), which evicts the conversation
from every sequence.
Startup: spawning ``python run.py`` to the first 200 from ``/health``, then ``POST
/api/load_model`` of the default GGUF.
Memory: the benchmark starts itself again with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, as
``run.py`` does (``app/services/system/hugepages.py``), so every path, llama-bench and the servers included, runs
with malloc asking for huge pages; set ``GLIBC_TUNABLES=glibc.malloc.hugetlb=0`` to measure without.

Writes ``results/bench/stream-<time>.{json,md,png}`` and ``latest.{json,md,png}``.

    python -m scripts.bench_stream [--backend all|llamacpp|transformers] [--runs 5] [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import itertools
import json
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import requests

from app.services.backends.llamacpp.backend import LlamaCppBackend
from app.services.checkpoints.default_model import default_gguf_path
from app.services.checkpoints.spec import ModelSpec
from app.services.core.cpu_share import machine_busy_seconds
from app.services.core.thread_scope import on_a_thread_of_its_own
from app.services.core.types import GenerationParams, Message, Prompt
from app.services.system.hugepages import environ_without_hugepages, malloc_asks_for_hugepages, restart_with_hugepages, thp_mode
from config.settings import PROJECT_ROOT, LlamaCppSettings, Settings, TransformersSettings, physical_cores

log = logging.getLogger("bench_stream")

# About 30 tokens once the chat template is applied, as in the issue's reference figures.
PROMPT = "Tell me a long story about a lighthouse keeper and the sea."
RESULTS_DIR = PROJECT_ROOT / "results" / "bench"
LLAMA_BENCH_CACHE = Path.home() / ".cache" / "model_test" / "llama-bench"

# The issue's targets: where the value lies in the summary, the comparison, the bound.
TARGETS = [
    (("backends", "llamacpp", "ratios", "sse_over_llama_bench"), ">=", 0.9),
    (("backends", "llamacpp", "ratios", "sse_over_create_chat_completion"), ">=", 1.0),
    (("backends", "transformers", "ratios", "sse_over_bare_generate"), ">=", 0.9),
    (("backends", "transformers", "ratios", "batch4_over_sequential"), ">=", 2.0),  # issue 7
    (("backends", "llamacpp", "multi_turn", "turn10_over_turn1_ttft"), "<=", 1.5),
    (("backends", "transformers", "multi_turn", "turn10_over_turn1_ttft"), "<=", 1.5),
    (("startup", "health_s"), "<", 2.0),
    (("startup", "load_model_s"), "<", 1.0),
]

# The multi-turn conversation: fixed questions, the model's own greedy answers. The answers are
# the model's, not fixed texts, because that is what a chat sends back and what a kept KV cache
# holds; with fixed texts every turn would have to evaluate a foreign answer anew.
MULTI_TURN_SYSTEM = "You are a helpful assistant who knows a great deal about lighthouses and the sea."
MULTI_TURN_USERS = [
    "What does a lighthouse keeper do all day?",
    "How did keepers keep the lamp burning before electricity?",
    "What was the hardest season for them?",
    "Tell me about the fog signals they used.",
    "How did supplies reach offshore lighthouses?",
    "Were there families living in the towers?",
    "What happened when a ship ran aground nearby?",
    "How were keepers trained for the job?",
    "When did automation replace the keepers?",
    "Summarise our whole conversation in three sentences.",
]
# The system lines of the chats that evict the conversation from every KV sequence: numbered and
# each about something else, so no two share more than a few tokens (nor with MULTI_TURN_SYSTEM).
UNRELATED_TOPICS = [
    "Colours are your speciality.",
    "Painters ask you for advice.",
    "Gardeners trust your taste in flowers.",
    "Tailors choose cloth with your help.",
    "Kites are what you design.",
    "Birdwatchers describe plumage to you.",
    "Bakers decorate cakes under your eye.",
    "Sailors read flags with your guidance.",
]


@dataclass
class Sample:
    ttft_ms: Optional[float]  # None where the path has no first token of its own (llama-bench)
    tokens_per_second: float
    completion_tokens: int


@dataclass
class PathResult:
    name: str
    label: str
    samples: list[Sample]
    note: Optional[str] = None  # why a path was skipped

    @property
    def tokens_per_second(self) -> Optional[float]:
        return statistics.median(s.tokens_per_second for s in self.samples) if self.samples else None

    @property
    def ttft_ms(self) -> Optional[float]:
        values = [s.ttft_ms for s in self.samples if s.ttft_ms is not None]
        return statistics.median(values) if values else None

    def to_dict(self) -> dict:
        return {"label": self.label, "tokens_per_second": self.tokens_per_second, "ttft_ms": self.ttft_ms,
                "note": self.note, "samples": [asdict(s) for s in self.samples]}


def sample_from_arrivals(started: float, arrivals: list[float], completion_tokens: int) -> Sample:
    first, last = arrivals[0], arrivals[-1]
    rate = (completion_tokens - 1) / (last - first) if last > first else 0.0
    return Sample((first - started) * 1000.0, rate, completion_tokens)


# -- paths ------------------------------------------------------------------------------------

def in_process_path(backend, prompt: Prompt, params: GenerationParams) -> Callable[[], Sample]:
    def run() -> Sample:
        started = time.perf_counter()
        arrivals, completion_tokens = [], 0
        for chunk in backend.stream(prompt, params, threading.Event()):
            if chunk.token_ids:
                arrivals.append(time.perf_counter())
            if chunk.is_last:
                completion_tokens = chunk.usage.completion_tokens
        return sample_from_arrivals(started, arrivals, completion_tokens)

    return run


def chat_stream(session: requests.Session, url: str, body: dict) -> tuple[float, list[float], dict, str]:
    """One ``/api/chat_stream`` request: when it was sent, when each token event arrived, the
    ``done`` event's data, and the answer's text."""
    started = time.perf_counter()
    arrivals, done, pieces = [], {}, []
    with session.post(f"{url}/api/chat_stream", json=body, stream=True, timeout=600) as response:
        response.raise_for_status()
        event = None
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                if event == "token":
                    arrivals.append(time.perf_counter())
                    pieces.append(json.loads(line[5:])["text"])
                elif event == "done":
                    done = json.loads(line[5:])
                elif event == "error":
                    raise RuntimeError(f"the server failed: {line}")
    return started, arrivals, done, "".join(pieces)


def http_sse_path(url: str, params: GenerationParams) -> Callable[[], Sample]:
    body = {
        "prompt": PROMPT,
        "temperature": 0.0,
        "max_new_tokens": params.max_new_tokens,
        "repetition_penalty": params.repetition_penalty,
        "ignore_eos": True,
    }
    session = requests.Session()

    def run() -> Sample:
        started, arrivals, done, _ = chat_stream(session, url, body)
        return sample_from_arrivals(started, arrivals, done["usage"]["completion_tokens"])

    return run


def openai_sse_path(url: str, params: GenerationParams) -> Callable[[], Sample]:
    """The same generation through /v1/chat/completions, as the openai SDK streams it."""
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0.0,
        "max_tokens": params.max_new_tokens,
        "repetition_penalty": params.repetition_penalty,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    session = requests.Session()

    def run() -> Sample:
        started = time.perf_counter()
        arrivals, completion_tokens = [], 0
        with session.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=600) as response:
            response.raise_for_status()
            for line in response.iter_lines(decode_unicode=True):
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"the server failed: {line}")
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    arrivals.append(time.perf_counter())
                if chunk.get("usage"):
                    completion_tokens = chunk["usage"]["completion_tokens"]
        return sample_from_arrivals(started, arrivals, completion_tokens)

    return run


def create_chat_completion_path(llama, params: GenerationParams) -> Callable[[], Sample]:
    """llama-cpp-python's own OpenAI-style stream, the reference the backend must not fall behind.
    It has no ignore_eos (a logit_bias would add a Python logits processor and slow it down), so
    it counts the content chunks it got: one per token, except where a multi-byte character is
    held back, which this English prompt does not have."""
    messages = [{"role": "user", "content": PROMPT}]

    def run() -> Sample:
        started = time.perf_counter()
        arrivals = []
        for chunk in llama.create_chat_completion(
            messages, temperature=0.0, max_tokens=params.max_new_tokens, stream=True,
            repeat_penalty=params.repetition_penalty, min_p=0.0,
        ):
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
        if len(arrivals) < params.max_new_tokens:
            log.warning("create_chat_completion stopped after %d of %d tokens", len(arrivals), params.max_new_tokens)
        return sample_from_arrivals(started, arrivals, len(arrivals))

    return on_own_thread(run)


def on_own_thread(run: Callable[[], Sample]) -> Callable[[], Sample]:
    """Runs each sample on a fresh thread, as a server runs each request. llama.cpp's OpenMP keeps
    a thread team alive for every thread that has decoded; an idle team on this (long-lived) main
    thread halves the speed of decoding on any other thread (docs/benchmarks.md, "Measurements
    behind the code"), which would slow the backend's decoding thread in the in-process path
    behind this one."""
    return lambda: on_a_thread_of_its_own(run, "bench-sample")


def llama_bench_path(binary: Path, model: Path, threads: int, n_tokens: int, depth: int = 0,
                     load_mode: Optional[str] = None) -> Callable[[], Sample]:
    """One ``llama-bench`` tg run per call (its own warm-up included), so it alternates with the
    other paths like they do. Flash attention off, as the backend keeps it. ``depth`` tokens are
    in the cache before the timed tokens (``-d``), as the prompt is before an answer. ``load_mode``
    is its ``-lm`` (``none`` reads the weights into memory, as the backend does on the CPU)."""
    command = [str(binary), "-m", str(model), "-t", str(threads), "-p", "0", "-n", str(n_tokens),
               "-d", str(depth), "-r", "1", "-fa", "0", "-o", "json"]
    if load_mode is not None:
        command += ["-lm", load_mode]

    def run() -> Sample:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"llama-bench failed ({done.returncode}): {done.stderr[-2000:]}")
        record = json.loads(done.stdout)[0]
        rates = record.get("samples_ts") or [record["avg_ts"]]
        return Sample(None, statistics.median(rates), record.get("n_gen", n_tokens))

    return run


def bare_generate_path(model, input_ids, n_tokens: int) -> Callable[[], Sample]:
    """``model.generate`` with no streamer or stopping criteria: what the transformers backend
    would cost with nothing of its own around it. With no token to time, decode speed is taken
    from the difference of a 1-token and an n-token generate. Each sample runs on a thread of its
    own (``on_own_thread``), as a user's script would: torch's OpenMP keeps a worker pool for every
    thread that has computed, and with more pool threads than CPUs libgomp stops spinning, which
    halved every other path of this process: the in-process baselines lost to the server, a
    process of its own (LLAMACPP_GUIDE.md, "On transformers: one running batch")."""
    import copy

    import torch

    def config(new_tokens: int):
        generation_config = copy.deepcopy(model.generation_config)
        generation_config.update(do_sample=False, temperature=None, top_p=None, top_k=None, repetition_penalty=1.0,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        if generation_config.pad_token_id is None:
            eos = generation_config.eos_token_id
            generation_config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
        return generation_config

    one, full = config(1), config(n_tokens)
    attention_mask = torch.ones_like(input_ids)

    def timed(generation_config) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config)
        return time.perf_counter() - started

    def run() -> Sample:
        first = timed(one)
        whole = timed(full)
        rate = (n_tokens - 1) / (whole - first) if whole > first else 0.0
        return Sample(first * 1000.0, rate, n_tokens)

    return on_own_thread(run)


# -- servers ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(process: subprocess.Popen) -> None:
    """Asks a server to stop, and kills it if it has not within 30 s."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Server:
    """``run.py`` in a subprocess, as a user starts it. Records how long it took to answer
    ``/health`` after the spawn and to load its model through ``POST /api/load_model``."""

    def __init__(self, flags: list[str], environ: Optional[dict[str, str]] = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.health_s: Optional[float] = None
        self.load_s: Optional[float] = None
        self._log_dir = tempfile.TemporaryDirectory(prefix="bench-logs-")
        env = {**(os.environ if environ is None else environ), "MODEL_TEST_SERVER__LOG_DIR": self._log_dir.name}
        command = [sys.executable, str(PROJECT_ROOT / "run.py"), "--port", str(self.port), "--log-level", "WARNING", *flags]
        # The server's console (a line per request) goes to a file, so it does not bury the
        # benchmark's own log; its tail is shown if the server fails.
        self._console_path = Path(self._log_dir.name) / "console.txt"
        self._console = self._console_path.open("w")
        self._spawned = time.perf_counter()
        self._process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=self._console, stderr=subprocess.STDOUT)

    def console_tail(self) -> str:
        return self._console_path.read_text(errors="replace")[-3000:]

    def __enter__(self) -> "Server":
        session = requests.Session()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"run.py exited with {self._process.returncode}:\n{self.console_tail()}")
            try:
                if session.get(f"{self.url}/health", timeout=1).status_code == 200:
                    self.health_s = time.perf_counter() - self._spawned
                    break
            except requests.ConnectionError:
                time.sleep(0.01)  # short: the wait is part of what is measured
        else:
            tail = self.console_tail()
            self.__exit__()
            raise RuntimeError(f"the server did not answer /health within 60 s:\n{tail}")
        started = time.perf_counter()
        response = session.post(f"{self.url}/api/load_model", json={}, timeout=300)
        self.load_s = time.perf_counter() - started
        if not response.ok:
            tail = self.console_tail()
            self.__exit__()
            raise RuntimeError(f"loading the model failed ({response.status_code}: {response.text[:500]}):\n{tail}")
        return self

    def status(self) -> dict:
        return requests.get(f"{self.url}/api/model_status", timeout=30).json()

    def __exit__(self, *exc) -> None:
        stop_process(self._process)
        self._console.close()
        self._log_dir.cleanup()


def measure_startup(runs: int) -> dict:
    """Plain ``python run.py`` (the default backend and GGUF) started ``runs`` times, from the
    environment a shell gives it, so its restart for huge pages is in the figure."""
    health, load = [], []
    for index in range(runs):
        with Server([], environ=environ_without_hugepages(os.environ)) as server:
            health.append(server.health_s)
            load.append(server.load_s)
        log.info("startup %d: /health after %.2f s, default GGUF loaded in %.2f s", index + 1, health[-1], load[-1])
    return {"health_s": statistics.median(health), "load_model_s": statistics.median(load),
            "samples": {"health_s": health, "load_model_s": load}}


# -- measuring --------------------------------------------------------------------------------

def measure(paths: dict[str, tuple[str, Callable[[], Sample]]], runs: int, warmup: int) -> dict[str, PathResult]:
    """Each round runs every path once; the order turns by one path a round, so no path always
    follows the same neighbour (llama-bench's exit, a server's idle threads)."""
    for _, run in paths.values():
        for _ in range(warmup):
            run()
    results = {name: PathResult(name, label, []) for name, (label, _) in paths.items()}
    names = list(paths)
    for index in range(runs):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            sample = paths[name][1]()
            results[name].samples.append(sample)
            ttft = f"{sample.ttft_ms:6.1f} ms" if sample.ttft_ms is not None else "     -   "
            log.info("run %d %-24s %6.1f tok/s  ttft %s", index + 1, name, sample.tokens_per_second, ttft)
    return results


def paired_ratio(top: list[float], bottom: list[float]) -> Optional[float]:
    """The median over rounds of top / bottom, each round's two figures taken minutes apart at
    most. A VM's speed drifts between minutes (docs/benchmarks.md has this one's), which a ratio
    of the two medians would take for a difference."""
    pairs = [upper / lower for upper, lower in zip(top, bottom) if lower]
    return statistics.median(pairs) if pairs and len(top) == len(bottom) else None


def ratio(results: dict[str, PathResult], top: str, bottom: str) -> Optional[float]:
    upper, lower = results.get(top), results.get(bottom)
    if upper is None or lower is None:
        return None
    return paired_ratio([s.tokens_per_second for s in upper.samples], [s.tokens_per_second for s in lower.samples])


def cache_evicting_chats(sequences: int) -> list[list[dict]]:
    """One short chat per KV sequence, each unlike the others and unlike the conversation.

    The llama.cpp backend keeps a sequence's cells after its request and gives a prompt the free
    sequence holding at least half of it, else the least recently used one
    (``backends/llamacpp/parallel.py``). One unrelated chat therefore lands on another sequence
    and the conversation's cells survive it; ``sequences`` chats sent one after another, none
    sharing half of its cells with another (each has its own system line), take every sequence
    in turn, the conversation's last. The transformers backend keeps one cache, so one is enough."""
    return [[{"role": "system", "content": f"Chat {index + 1}. {topic} You answer in one word."},
             {"role": "user", "content": "Name a colour."}]
            for index, topic in zip(range(sequences), itertools.cycle(UNRELATED_TOPICS))]


def measure_multi_turn(url: str, runs: int, answer_tokens: int, sequences: int = 1) -> dict:
    """TTFT of each turn of the conversation, every turn sent whole with the earlier answers, as
    a client does. Before each run, and before turn 10 is sent again cold, one unrelated chat per
    KV sequence of the server (``sequences``: its ``--parallel``), so nothing starts warm. Greedy
    answers are the same in every run where warm equals cold."""
    session = requests.Session()

    def ask(messages: list[dict], max_new_tokens: int) -> tuple[float, int, str]:
        body = {"messages": messages, "temperature": 0.0, "max_new_tokens": max_new_tokens}
        started, arrivals, done, text = chat_stream(session, url, body)
        return (arrivals[0] - started) * 1000.0, done["usage"]["prompt_tokens"], text

    def evict_every_sequence() -> None:
        for chat in cache_evicting_chats(sequences):
            ask(chat, 1)

    turns = len(MULTI_TURN_USERS)
    per_turn: list[list[float]] = [[] for _ in range(turns)]
    prompt_tokens, cold, conversations = [0] * turns, [], []
    for index in range(runs):
        evict_every_sequence()
        messages = [{"role": "system", "content": MULTI_TURN_SYSTEM}]
        for turn, question in enumerate(MULTI_TURN_USERS):
            messages.append({"role": "user", "content": question})
            ttft, prompt_tokens[turn], answer = ask(messages, answer_tokens)
            per_turn[turn].append(ttft)
            messages.append({"role": "assistant", "content": answer})
        conversations.append(messages)
        evict_every_sequence()
        cold.append(ask(messages[:-1], 1)[0])
        log.info("multi-turn run %d: turn 1 %.1f ms, turn %d %.1f ms (%d prompt tokens), cold %.1f ms",
                 index + 1, per_turn[0][-1], turns, per_turn[-1][-1], prompt_tokens[-1], cold[-1])
    medians = [statistics.median(values) for values in per_turn]
    return {
        "answer_tokens": answer_tokens,
        "turns": [{"turn": turn + 1, "prompt_tokens": prompt_tokens[turn], "ttft_ms": medians[turn]} for turn in range(turns)],
        "turn1_ttft_ms": medians[0],
        "turn10_ttft_ms": medians[-1],
        "turn10_cold_ttft_ms": statistics.median(cold),
        "turn10_prompt_tokens": prompt_tokens[-1],
        "turn10_over_turn1_ttft": medians[-1] / medians[0],
        "turn10_cold_over_warm_ttft": statistics.median(cold) / medians[-1],
        "cold_after_chats": sequences,
        "same_answers_every_run": all(c == conversations[0] for c in conversations),
    }


def find_llama_bench(explicit: Optional[Path]) -> tuple[Optional[Path], str]:
    """The llama-bench to compare with, and where it came from: ``--llama-bench``, then
    ``MODEL_TEST_LLAMA_BENCH``, then the newest ``make bench-deps`` build for the installed
    llama-cpp-python, then ``llama-bench`` on PATH."""
    if explicit is not None:
        return (explicit, "--llama-bench") if explicit.is_file() else (None, f"{explicit} does not exist; run make bench-deps")
    from_env = os.environ.get("MODEL_TEST_LLAMA_BENCH")
    if from_env:
        return (Path(from_env), "MODEL_TEST_LLAMA_BENCH") if Path(from_env).is_file() else (None, f"{from_env} does not exist")
    import llama_cpp

    built = sorted(glob.glob(str(LLAMA_BENCH_CACHE / f"{llama_cpp.__version__}-*" / "llama-bench")), key=os.path.getmtime)
    if built:
        return Path(built[-1]), "make bench-deps"
    on_path = shutil.which("llama-bench")
    if on_path:
        return Path(on_path), "PATH"
    return None, "llama-bench not built; run make bench-deps"


def bench_llamacpp(args, params: GenerationParams) -> dict:
    import llama_cpp

    model = args.model or default_gguf_path()
    settings = LlamaCppSettings(n_ctx=args.n_ctx, n_threads=args.threads)
    backend = LlamaCppBackend(ModelSpec("llamacpp", Path(model)), settings)
    backend.load()
    prompt = backend.prepare(messages=[Message("user", PROMPT)])
    # llama-cpp-python's own reference, opened as the backend opens its model
    reference = llama_cpp.Llama(model_path=str(model), n_ctx=settings.n_ctx, n_batch=min(settings.n_batch, settings.n_ctx),
                                n_threads=settings.n_threads, n_threads_batch=settings.n_threads,
                                flash_attn=False, verbose=False)
    binary, source = find_llama_bench(args.llama_bench)
    flags = ["--model", str(model), "--n-threads", str(args.threads), "--n-ctx", str(args.n_ctx)]
    depth = len(prompt.token_ids)
    # (label, depth, -lm). The baseline decodes at the positions the tester's answer has: after the
    # prompt's tokens; from an empty cache the same tokens attend to fewer keys and come faster.
    # llama-bench maps the GGUF; the backend reads it into memory, which huge pages can back.
    llama_bench_rows = {
        "llama-bench": (f"llama.cpp `llama-bench` tg{params.max_new_tokens} at depth {depth} (native C++; the same length)",
                        depth, None),
        "llama-bench-empty": (f"llama.cpp `llama-bench` tg{params.max_new_tokens} from an empty cache (for reference)", 0, None),
        "llama-bench-in-memory": (f"llama.cpp `llama-bench` tg{params.max_new_tokens} at depth {depth}, weights read into "
                                  f"memory (`-lm none`) as the backend loads them (for reference)", depth, "none"),
    }
    paths = {}
    if binary is not None:
        log.info("llama-bench: %s (%s)", binary, source)
        for name, (label, at_depth, load_mode) in llama_bench_rows.items():
            paths[name] = (label, llama_bench_path(binary, model, args.threads, params.max_new_tokens, at_depth, load_mode))
    else:
        log.warning("skipping llama-bench: %s", source)
    paths["create-chat-completion"] = ("llama-cpp-python `create_chat_completion(stream=True)`",
                                       create_chat_completion_path(reference, params))
    try:
        with Server(flags) as server:
            paths.update({
                "in-process": ("(a) llama.cpp backend in-process", in_process_path(backend, prompt, params)),
                "http-sse": ("(b) llama.cpp through HTTP SSE /api/chat_stream", http_sse_path(server.url, params)),
                "openai-sse": ("(b2) llama.cpp through /v1/chat/completions stream", openai_sse_path(server.url, params)),
            })
            results = measure(paths, args.runs, args.warmup)
            info = server.status().get("info", {})
            # one unrelated chat per KV sequence makes turn 10 cold (cache_evicting_chats)
            multi_turn = measure_multi_turn(server.url, args.multi_turn_runs, args.multi_turn_answer_tokens,
                                            sequences=int(info.get("parallel") or settings.parallel))
            multi_turn["prefix_cache"] = info.get("prefix_cache")
    finally:
        backend.unload()
        reference.close()
    if binary is None:
        results = {name: PathResult(name, label, [], note=source) for name, (label, _, _) in llama_bench_rows.items()} | results
    build_info = binary.parent / "BUILD_INFO" if binary is not None else None
    return {
        "model": str(model),
        "prompt_tokens": len(prompt.token_ids),
        "llama_bench": {"path": str(binary) if binary else None, "source": source,
                        "build_info": build_info.read_text().strip() if build_info and build_info.is_file() else None},
        "build": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
        "results": results,
        "ratios": {
            "sse_over_llama_bench": ratio(results, "http-sse", "llama-bench"),
            "sse_over_llama_bench_from_empty_cache": ratio(results, "http-sse", "llama-bench-empty"),
            "sse_over_llama_bench_in_memory": ratio(results, "http-sse", "llama-bench-in-memory"),
            "sse_over_create_chat_completion": ratio(results, "http-sse", "create-chat-completion"),
            "openai_sse_over_llama_bench": ratio(results, "openai-sse", "llama-bench"),
            "openai_sse_over_create_chat_completion": ratio(results, "openai-sse", "create-chat-completion"),
            "in_process_over_llama_bench": ratio(results, "in-process", "llama-bench"),
            "in_process_over_create_chat_completion": ratio(results, "in-process", "create-chat-completion"),
            "sse_over_in_process_tokens_per_second": ratio(results, "http-sse", "in-process"),
            "sse_added_ttft_ms": results["http-sse"].ttft_ms - results["in-process"].ttft_ms,
            "openai_sse_over_in_process_tokens_per_second": ratio(results, "openai-sse", "in-process"),
        },
        "baseline": "llama-bench" if binary is not None else "create-chat-completion",
        "multi_turn": multi_turn,
    }


BATCH_PROMPTS = [PROMPT, "Write a poem about the mountains in winter.", "Explain how a bicycle works.",
                 "Describe a busy market in the morning."]


def default_cpu_dtype() -> str:
    from app.services.backends.transformers.device import choose_dtype, probe_caps

    return choose_dtype("auto", "cpu", probe_caps())


def measure_batching(backend, params: GenerationParams, runs: int) -> dict:
    """Aggregate decode throughput of 4 different requests run one after another, and together as
    rows of the backend's running batch (as concurrent clients, /batch and evals get them),
    alternately, ``runs`` times; the ratio is paired per round."""
    prompts = [backend.prepare(messages=[Message("user", text)]) for text in BATCH_PROMPTS]

    def consume(prompt) -> int:
        return sum(len(chunk.token_ids) for chunk in backend.stream(prompt, params, threading.Event()))

    def sequential() -> float:
        started = time.perf_counter()
        tokens = sum(consume(prompt) for prompt in prompts)
        return tokens / (time.perf_counter() - started)

    def together() -> float:
        counts = [0] * len(prompts)

        def run(index: int) -> None:
            counts[index] = consume(prompts[index])

        for _ in prompts:
            backend.expect_row()  # what the service does as it lets each request in
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sum(counts) / (time.perf_counter() - started)

    one_by_one, batched = [], []
    for _ in range(runs):
        one_by_one.append(sequential())
        batched.append(together())
    return {"batch_size": len(prompts), "sequential_tokens_per_second": statistics.median(one_by_one),
            "batched_tokens_per_second": statistics.median(batched),
            "batched_over_sequential": paired_ratio(batched, one_by_one),
            "batch_sizes": list(backend.batch_sizes)[-len(prompts) - 1:]}


def random_lora(base: Path, out: Path, rank: int = 16) -> Path:
    """A rank-``rank`` LoRA on all linear layers with random (not zero) B matrices: it costs
    what a trained adapter costs, without training one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(base)
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out


def bench_transformers(args, params: GenerationParams) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from app.services.backends.transformers.backend import TransformersBackend
    from app.services.catalog import ModelCatalog

    catalog = ModelCatalog(Settings())
    base = catalog.default_spec("transformers")
    adapter_dir = tempfile.TemporaryDirectory(prefix="bench-lora-")
    # on a thread that ends: a live thread that has computed would halve every path (on_own_thread)
    adapter = on_a_thread_of_its_own(lambda: random_lora(base.path, Path(adapter_dir.name) / "lora-r16"))

    def backend(dtype: str, merge: bool = True, with_adapter: bool = False) -> TransformersBackend:
        settings = TransformersSettings(dtype=dtype, n_threads=args.threads, n_ctx=args.n_ctx, merge_adapter=merge)
        spec = dataclasses.replace(base, adapter=adapter if with_adapter else None)
        loaded = TransformersBackend(spec, settings)
        loaded.load()
        return loaded

    backends = {
        "hf-fp32": backend("fp32"),
        "hf-bf16": backend("bf16"),
        "hf-lora-merged": backend("fp32", merge=True, with_adapter=True),
        "hf-lora-unmerged": backend("fp32", merge=False, with_adapter=True),
    }
    prompt = backends["hf-fp32"].prepare(messages=[Message("user", PROMPT)])
    # A model of its own, loaded as the backend loads it (fp32, the same threads), so nothing the
    # backend keeps between requests (such as a prefix cache) reaches the baseline.
    torch.set_num_threads(args.threads)
    bare = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32).eval()
    input_ids = torch.tensor([prompt.token_ids], dtype=torch.long)
    flags = ["--backend", "transformers", "--model", str(base.path), "--dtype", "fp32",
             "--n-threads", str(args.threads), "--n-ctx", str(args.n_ctx)]
    try:
        with Server(flags) as server:
            paths = {
                "hf-bare-generate": ("transformers fp32 bare `model.generate`, no streamer",
                                     bare_generate_path(bare, input_ids, params.max_new_tokens)),
                "hf-fp32": ("(c) transformers fp32 in-process", in_process_path(backends["hf-fp32"], prompt, params)),
                "hf-sse": ("(d) transformers fp32 through HTTP SSE", http_sse_path(server.url, params)),
                "hf-bf16": ("(e) transformers bf16 in-process", in_process_path(backends["hf-bf16"], prompt, params)),
                "hf-lora-merged": ("(f) fp32 + LoRA r16 merged", in_process_path(backends["hf-lora-merged"], prompt, params)),
                "hf-lora-unmerged": ("(g) fp32 + LoRA r16 unmerged", in_process_path(backends["hf-lora-unmerged"], prompt, params)),
                # compare mode's base column: the fine-tune's unmerged weights with the adapter switched off
                "hf-lora-off": ("(h) the same unmerged LoRA switched off (compare's shared base)",
                                in_process_path(backends["hf-lora-unmerged"], prompt, dataclasses.replace(params, use_adapter=False))),
            }
            results = measure(paths, args.runs, args.warmup)
            batch_params = dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, 64))
            batching = {dtype: measure_batching(backends[f"hf-{dtype}"], batch_params, args.runs) for dtype in ("fp32", "bf16")}
            # the transformers backend keeps one prefix cache: one unrelated chat replaces it
            multi_turn = measure_multi_turn(server.url, args.multi_turn_runs, args.multi_turn_answer_tokens, sequences=1)
            multi_turn["prefix_cache"] = server.status().get("info", {}).get("prefix_cache")
    finally:
        for loaded in backends.values():
            loaded.unload()
        del bare
        adapter_dir.cleanup()
    return {
        "model": str(base.path),
        "prompt_tokens": len(prompt.token_ids),
        "results": results,
        "ratios": {
            "sse_over_bare_generate": ratio(results, "hf-sse", "hf-bare-generate"),
            "in_process_over_bare_generate": ratio(results, "hf-fp32", "hf-bare-generate"),
            "sse_over_in_process_tokens_per_second": ratio(results, "hf-sse", "hf-fp32"),
            "sse_added_ttft_ms": results["hf-sse"].ttft_ms - results["hf-fp32"].ttft_ms,
            "bf16_over_fp32_tokens_per_second": ratio(results, "hf-bf16", "hf-fp32"),
            "bf16_over_fp32_ttft": results["hf-bf16"].ttft_ms / results["hf-fp32"].ttft_ms,
            "merged_over_unmerged_tokens_per_second": ratio(results, "hf-lora-merged", "hf-lora-unmerged"),
            "merged_over_base_tokens_per_second": ratio(results, "hf-lora-merged", "hf-fp32"),
            "adapter_off_over_base_tokens_per_second": ratio(results, "hf-lora-off", "hf-fp32"),
            # the CPU default dtype's: bf16 where the CPU has native bf16, else fp32 (see README)
            "batch4_over_sequential": batching[default_cpu_dtype()]["batched_over_sequential"],
            "batch4_over_sequential_fp32": batching["fp32"]["batched_over_sequential"],
            "batch4_over_sequential_bf16": batching["bf16"]["batched_over_sequential"],
        },
        "batching": batching,
        "baseline": "hf-bare-generate",
        "multi_turn": multi_turn,
    }


# -- reporting --------------------------------------------------------------------------------

def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "physical_cores": physical_cores(),
            "platform": platform.platform(), "python": platform.python_version(),
            "thp_mode": thp_mode(), "malloc_huge_pages": malloc_asks_for_hugepages()}


def own_cpu_seconds() -> float:
    """This process and its waited-for children (the run.py servers, llama-bench)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def load_average() -> Optional[list[float]]:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


# A served path measured faster than its in-process baseline by more than this is a measurement
# fault, not a result (issue 21: transformers SSE ran at 1.58 x bare generate once): two OpenMP
# runtimes in one process, threads left over from earlier paths, the baseline's thread.
SUSPECT_OVER_BASELINE = 1.10
BASELINE_RATIOS = [
    ("llamacpp", "sse_over_create_chat_completion"),
    ("llamacpp", "sse_over_in_process_tokens_per_second"),
    ("transformers", "sse_over_bare_generate"),
    ("transformers", "sse_over_in_process_tokens_per_second"),
]


def suspect_baselines(summary: dict) -> list[dict]:
    """The served-over-baseline ratios above SUSPECT_OVER_BASELINE: baselines not to trust."""
    suspects = []
    for backend, name in BASELINE_RATIOS:
        value = ((summary.get("backends") or {}).get(backend) or {}).get("ratios", {}).get(name)
        if value is not None and value > SUSPECT_OVER_BASELINE:
            suspects.append({"what": f"{backend}.{name}", "value": value})
    return suspects


def evaluate_targets(summary: dict) -> list[dict]:
    """Each target with its measured value; ``met`` is None where the value was not measured
    (a backend left out, llama-bench not built)."""
    checks = []
    for where, op, bound in TARGETS:
        value = summary
        for key in where:
            value = value.get(key) if isinstance(value, dict) else None
        met = None if value is None else {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]
        checks.append({"what": ".".join(where[1:] if where[0] == "backends" else where), "value": value,
                       "target": f"{op} {bound:g}", "met": met})
    return checks


def fmt(value: Optional[float], digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def paths_table(section: dict) -> str:
    baseline = [sample["tokens_per_second"] for sample in section["paths"][section["baseline"]]["samples"]]
    rows = [f"| path | decode tokens/s | × {section['baseline']} (paired) | TTFT ms |", "| --- | ---: | ---: | ---: |"]
    for path in section["paths"].values():
        share = paired_ratio([sample["tokens_per_second"] for sample in path["samples"]], baseline)
        label = path["label"] + (f" (skipped: {path['note']})" if path["note"] else "")
        rows.append(f"| {label} | {fmt(path['tokens_per_second'])} | {fmt(share, 3)} | {fmt(path['ttft_ms'])} |")
    return "\n".join(rows)


def report_markdown(summary: dict) -> str:
    lines = [f"# bench_stream {summary['when']}", "",
             f"{summary['machine']['cpu']}, {summary['machine']['physical_cores']} physical cores; {summary['threads']} threads; "
             f"median of {summary['runs']} run(s) ({summary['warmup']} warm-up); load average before {summary['load_before']}, "
             f"after {summary['load_after']}; other processes used {summary.get('other_processes_cpu_s', '?')} CPU s "
             f"of the run's {summary.get('wall_s', '?')} s; malloc huge pages "
             f"{'on' if summary['machine'].get('malloc_huge_pages') else 'off'} (THP {summary['machine'].get('thp_mode')})"
             f"{'; QUICK run (few tokens, figures not meaningful)' if summary['quick'] else ''}.", ""]
    lines += ["## Targets (issue 8)", "", "| measure | value | target | met |", "| --- | ---: | ---: | --- |"]
    for check in summary["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[check["met"]]
        lines.append(f"| {check['what']} | {fmt(check['value'], 3)} | {check['target']} | {met} |")
    for name, section in summary["backends"].items():
        lines += ["", f"## {name}", "",
                  f"Model `{Path(section['model']).name}`, {section['prompt_tokens']} prompt tokens, "
                  f"{section['max_new_tokens']} new tokens, greedy.", "", paths_table(section), "",
                  ", ".join(f"{key} = {fmt(value, 3)}" for key, value in section["ratios"].items())]
    batching = summary["backends"].get("transformers", {}).get("batching")
    if batching:
        lines += ["", "## transformers: 4 requests one after another vs as rows of one running batch", "",
                  "| dtype | sequential tokens/s | batched tokens/s (aggregate) | × sequential (paired) | batch sizes |",
                  "| --- | ---: | ---: | ---: | --- |"]
        for dtype, figures in batching.items():
            lines.append(f"| {dtype} | {fmt(figures['sequential_tokens_per_second'])} | {fmt(figures['batched_tokens_per_second'])} | "
                         f"{fmt(figures['batched_over_sequential'], 2)} | {figures['batch_sizes']} |")
    multi = {name: section["multi_turn"] for name, section in summary["backends"].items() if "multi_turn" in section}
    if multi:
        names = list(multi)
        lines += ["", "## Multi-turn TTFT through /api/chat_stream", "",
                  "Fixed questions, the model's own greedy answers (each backend its own), every turn sent whole.", "",
                  "| turn | " + " | ".join(f"{name} prompt tokens | {name} TTFT ms" for name in names) + " |",
                  "| ---: |" + " ---: | ---: |" * len(names)]
        for index in range(len(multi[names[0]]["turns"])):
            cells = [f"{multi[name]['turns'][index]['prompt_tokens']} | {fmt(multi[name]['turns'][index]['ttft_ms'])}" for name in names]
            lines.append(f"| {index + 1} | " + " | ".join(cells) + " |")
        cells = [f"{multi[name]['turn10_prompt_tokens']} | {fmt(multi[name]['turn10_cold_ttft_ms'])}" for name in names]
        evictions = max(multi[name].get("cold_after_chats", 1) for name in names)
        lines.append(f"| 10, cold (after {evictions} unrelated chat{'s' if evictions > 1 else ''}, one per KV sequence) | "
                     + " | ".join(cells) + " |")
        cells = [f" | {fmt(multi[name]['turn10_over_turn1_ttft'], 2)}" for name in names]
        lines.append("| turn 10 / turn 1 | " + " | ".join(cells) + " |")
        cells = [f"{name}: prefix cache {'on' if multi[name].get('prefix_cache') else 'off'}, greedy answers "
                 f"{'the same' if multi[name]['same_answers_every_run'] else '**different**'} in every run" for name in names]
        lines += ["", "; ".join(cells) + "."]
    if summary.get("startup"):
        startup = summary["startup"]
        lines += ["", "## Startup", "", "| measure | seconds (median) |", "| --- | ---: |",
                  f"| spawn `python run.py` → first 200 from `/health` | {startup['health_s']:.2f} |",
                  f"| `POST /api/load_model` of the default GGUF | {startup['load_model_s']:.2f} |"]
    return "\n".join(lines) + "\n"


def write_chart(path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a server or in CI
    import matplotlib.pyplot as plt

    sections = [(name, section) for name, section in summary["backends"].items()]
    figure, axes = plt.subplots(len(sections), 1, figsize=(9, 1.2 + 0.55 * sum(len(s["paths"]) for _, s in sections)),
                                squeeze=False)
    for axis, (name, section) in zip(axes[:, 0], sections):
        labels = [path["label"].replace("`", "") for path in section["paths"].values()][::-1]
        values = [path["tokens_per_second"] or 0.0 for path in section["paths"].values()][::-1]
        bars = axis.barh(labels, values, color="#4c72b0" if name == "llamacpp" else "#dd8452")
        for bar, value in zip(bars, values):
            axis.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:.1f}" if value else " skipped",
                      va="center", fontsize=8)
        axis.set_title(f"{name}: {section['max_new_tokens']} new tokens", fontsize=10)
        axis.set_xlabel("decode tokens/s (median)")
        axis.tick_params(axis="y", labelsize=8)
        axis.margins(x=0.15)
    figure.suptitle(f"bench_stream {summary['when']}, {summary['threads']} threads, median of {summary['runs']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_results(out: Path, summary: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    markdown = report_markdown(summary)
    stamped = out / f"stream-{stamp}"
    stamped.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    stamped.with_suffix(".md").write_text(markdown)
    write_chart(stamped.with_suffix(".png"), summary)
    for suffix in (".json", ".md", ".png"):
        shutil.copyfile(stamped.with_suffix(suffix), out / f"latest{suffix}")
    log.info("wrote %s.{json,md,png} and latest.*", stamped)
    return stamped.with_suffix(".md")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["all", "llamacpp", "transformers"], default="all")
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--llama-bench", type=Path, default=None,
                        help="llama-bench binary (default: MODEL_TEST_LLAMA_BENCH, the make bench-deps build, PATH)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=256, help="llama.cpp paths")
    parser.add_argument("--hf-max-new-tokens", type=int, default=128, help="transformers paths")
    parser.add_argument("--multi-turn-runs", type=int, default=3)
    parser.add_argument("--multi-turn-answer-tokens", type=int, default=140,
                        help="longest answer per turn (140 makes turn 10 about 1,500 tokens)")
    parser.add_argument("--startup-runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: few tokens, 1 run, no warm-up, short conversation (checks the plumbing, not the speed)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.warmup, args.multi_turn_runs, args.startup_runs = 1, 0, 1, 1
        args.max_new_tokens, args.hf_max_new_tokens, args.multi_turn_answer_tokens = 16, 8, 8
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    load_before = load_average()
    if load_before and load_before[0] > 0.5 * (os.cpu_count() or 1):
        # 2-core machines slow down 2-10x under other work; the figures are then not the machine's
        log.warning("load average %s on %d CPUs: figures will be low and noisy", load_before, os.cpu_count())
    summary = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), "threads": args.threads,
               "runs": args.runs, "warmup": args.warmup, "quick": args.quick, "load_before": load_before, "backends": {}}
    busy_before, own_before, started = machine_busy_seconds(), own_cpu_seconds(), time.monotonic()
    summary["startup"] = measure_startup(args.startup_runs)
    sections = {}
    if args.backend in ("all", "llamacpp"):
        params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)
        sections["llamacpp"] = bench_llamacpp(args, params) | {"max_new_tokens": args.max_new_tokens}
    if args.backend in ("all", "transformers"):
        params = GenerationParams(max_new_tokens=args.hf_max_new_tokens, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)
        sections["transformers"] = bench_transformers(args, params) | {"max_new_tokens": args.hf_max_new_tokens}
    for name, section in sections.items():
        results = section.pop("results")
        summary["backends"][name] = section | {"paths": {r.name: r.to_dict() for r in results.values()}}
    summary["load_after"] = load_average()
    busy_after = machine_busy_seconds()
    if busy_before is not None and busy_after is not None:
        # What the machine did beyond this benchmark: near 0 on a quiet machine. Every second of
        # it was taken from the paths measured (2 cores, 2 threads), so the figures are lower.
        foreign = max(0.0, (busy_after - busy_before) - (own_cpu_seconds() - own_before))
        summary["other_processes_cpu_s"] = round(foreign, 1)
        summary["wall_s"] = round(time.monotonic() - started, 1)
    summary["targets"] = evaluate_targets(summary)
    summary["suspect_baselines"] = suspect_baselines(summary)
    for suspect in summary["suspect_baselines"]:
        log.warning("%s = %.3f: the served path beats its baseline by more than %d %%, so the baseline ran in a "
                    "state a user's own process would not be in; do not trust this ratio", suspect["what"],
                    suspect["value"], round(100 * (SUSPECT_OVER_BASELINE - 1)))
    written = write_results(args.out, summary)
    sys.stdout.write(written.read_text())
    return 0


if __name__ == "__main__":
    # Every path runs with the memory setup run.py gives the server (the servers inherit it)
    restart_with_hugepages()
    sys.exit(main())
