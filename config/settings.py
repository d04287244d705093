"""Typed settings for model_test.

Every field has bounds and a description, in the style of llama-cpp-python's
``server/settings.py``. Values come from, in rising priority: the defaults here,
environment variables (``MODEL_TEST_<FIELD>``, nested sections as
``MODEL_TEST_<SECTION>__<FIELD>``, e.g. ``MODEL_TEST_LLAMACPP__N_CTX=2048``), and the
keyword arguments given to :class:`Settings` (which is what ``run.py`` flags and tests use).
"""
from __future__ import annotations

import functools
import logging
import os
import warnings
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent

BackendName = Literal["llamacpp", "transformers", "remote"]
# The remote backend was called "openai" up to 0.5 (issue 25); "openai" now names only the /v1 surface.
# The old name is still taken wherever users gave it, with a warning.
OLD_BACKEND_NAMES = {"openai": "remote"}


@functools.cache
def say_backend_renamed(old: str, where: str) -> None:
    """Logs, once per process for each old name and place, that a backend was asked for by its old name."""
    log.warning("backend %r in %s is deprecated: it is called %r now (the old name will stop working in a "
                "later release)", old, where, OLD_BACKEND_NAMES[old])


def current_backend_name(name: Optional[str], where: str) -> Optional[str]:
    """``name``, or what a backend given by its old name is called now (said once in the log)."""
    if isinstance(name, str) and name in OLD_BACKEND_NAMES:
        say_backend_renamed(name, where)
        return OLD_BACKEND_NAMES[name]
    return name


def _backend_setting(name, where: str):
    """A backend setting's value, its old name taken with a log line and a DeprecationWarning."""
    current = current_backend_name(name, where)
    if current != name:
        warnings.warn(f"backend {name!r} is deprecated; use {current!r}", DeprecationWarning, stacklevel=2)
    return current


def physical_cores() -> int:
    """Physical cores, not hyper-threads: llama.cpp decodes slower with SMT siblings."""
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:  # psutil is a runtime requirement; this keeps settings importable alone
        return os.cpu_count() or 1


MIN_API_KEY_LENGTH = 16
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


class ServerSettings(BaseModel):
    host: str = Field("127.0.0.1", description="Interface to listen on. 0.0.0.0 exposes the tester to the network.", json_schema_extra={"flag": "--host"})
    api_key: Optional[SecretStr] = Field(
        None,
        description="When set, /api/*, /v1/* and the service routes need 'Authorization: Bearer <key>'; "
        "the page, /health and the API docs stay public. A SecretStr: it never prints in logs or reprs.", json_schema_extra={"flag": "--api-key"},
    )
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="More API keys, each accepted as api_key is: one per person or team, so that isolate_prefix_cache "
        "can keep their prompts apart. Each at least 16 characters.",
    )
    isolate_prefix_cache: bool = Field(
        False,
        description="With API keys in use, a request reuses only the cached prompt prefix of a request made with the same "
        "key (llama.cpp's sequences and its context, transformers' prefix cache), so no key can time a guess at another "
        "key's prompt. Costs a cold prompt where different keys alternate. Without keys every request shares one cache.",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins (e.g. https://lab.example.org) whose pages may call the API from a browser. "
        "Empty (the default) sends no CORS headers, so other sites' pages cannot read answers.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names (as browsers send them in the Host header) this server answers to, besides "
        "localhost, 127.0.0.1, [::1] and the bound host; any other is refused (DNS rebinding). '*' allows every name.",
    )
    any_model_name: bool = Field(
        False, description="On the OpenAI routes, a model name this server does not know means the served model, for "
        "clients that hard-code one (gpt-4o-mini). Off: OpenAI's 404 model_not_found, so a typo is seen.",
        json_schema_extra={"flag": "--any-model-name"})
    port: int = Field(5000, ge=1, le=65535, description="TCP port to listen on.", json_schema_extra={"flag": "--port"})
    log_dir: Path = Field(PROJECT_ROOT / "logs", description="Folder of the rotating log file.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level of console and file.", json_schema_extra={"flag": "--log-level"})
    log_max_bytes: int = Field(5_000_000, ge=10_000, description="Size at which the log file rotates.")
    log_backups: int = Field(3, ge=0, le=100, description="Rotated log files kept.")
    def exposure_warning(self) -> Optional[str]:
        """What to warn of when the server is reachable beyond this machine without a key."""
        if self.host in LOOPBACK_HOSTS or self.keys():
            return None
        return (f"listening on {self.host} without an API key: anyone who can reach this port can use the model; "
                f"set --api-key (or MODEL_TEST_SERVER__API_KEY)")

    @field_validator("api_key", "api_keys")
    @classmethod
    def _real_keys(cls, keys):
        # An empty key used to turn auth off without a word; a short one is guessed in minutes.
        for key in keys if isinstance(keys, list) else [keys]:
            if key is not None and len(key.get_secret_value().strip()) < MIN_API_KEY_LENGTH:
                raise ValueError(f"the API key must be at least {MIN_API_KEY_LENGTH} characters (e.g. python -c "
                                 f"'import secrets; print(secrets.token_urlsafe(24))'); leave it unset for no key")
        return keys

    def keys(self) -> list[str]:
        """Every API key the server accepts: api_key and api_keys."""
        return [key.get_secret_value() for key in ([self.api_key] if self.api_key is not None else []) + list(self.api_keys)]

    header_timeout_s: float = Field(10.0, gt=0, le=600, description="Longest a client may take to send a request's "
                                    "head (request line and headers); past it the connection closes. A client that sends "
                                    "half a head and stalls would otherwise hold a server thread.")
    io_timeout_s: float = Field(60.0, gt=0, le=3600, description="Longest silence while a request's body is read or its "
                                "answer written (a stalled upload, a client that stopped reading); past it the connection closes.")
    keepalive_s: int = Field(5, ge=0, le=600, description="gunicorn (make serve): seconds an idle keep-alive "
                               "connection stays open; 0 closes each connection after its answer.")
    max_connections_per_client: int = Field(64, ge=0, le=100_000, description="Connections one client (IP address) may "
                                            "hold open at once; one more gets 429. 0: no cap. Behind a reverse proxy every "
                                            "client is the proxy's address: raise it there, or cap per client in the proxy.")
    hugepages: bool = Field(
        True,
        description="run.py starts itself again with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (Linux), so the "
        "memory llama.cpp allocates sits on transparent huge pages (see app/services/system/hugepages.py).",
    )


class LimitSettings(BaseModel):
    max_body_bytes: int = Field(1_000_000, ge=1024, le=1 << 30, description="Largest request body accepted; more gets 413.")
    max_new_tokens: int = Field(4096, ge=1, le=131072, description="Upper bound a request may ask for as max_new_tokens.")
    max_messages: int = Field(256, ge=1, le=10000, description="Most messages one chat request may carry.")
    max_stop_strings: int = Field(16, ge=0, le=64, description="Most stop strings one request may carry.")
    max_queue: int = Field(16, ge=0, le=1024, description="Requests that may wait for the model beside those it decodes (llamacpp.parallel); one more gets 429. 16 serves sixteen clients at once without one.")
    queue_retry_after_s: int = Field(2, ge=1, le=3600, description="Retry-After sent with a 429 when the queue is full.")
    stream_ttl_s: float = Field(60.0, gt=0, le=3600, description="How long a prepared stream id waits for its EventSource.")
    max_parked_streams: int = Field(32, ge=1, le=10000, description="Prepared streams (POST /api/streams) waiting to be "
                                    "opened at once; one more gets 429. Each expires after stream_ttl_s.")
    max_batch: int = Field(64, ge=1, le=10000, description="Most prompts one /batch request may carry.")
    generation_timeout_s: float = Field(
        600.0, gt=0, le=86400,
        description="Longest a single generation may run once it has the model; past it the answer ends with an "
        "error saying so (what was streamed stays sent). Waiting in the queue does not count.",
    )
    max_slots: int = Field(4, ge=1, le=16, description="Most models one compare set or one eval may hold.")
    max_test_set_bytes: int = Field(5_000_000, ge=1024, le=1 << 30, description="Largest eval test set accepted; more gets a 400.")
    max_test_set_rows: int = Field(10_000, ge=1, le=1_000_000, description="Most rows an eval test set may have.")
    max_evals_kept: int = Field(200, ge=1, le=100_000, description="Evals kept under results/evals/; starting one more "
                                "removes the oldest finished ones (never a running one).")
    max_eval_storage_bytes: int = Field(2_000_000_000, ge=1_000_000, le=1 << 44, description="Space results/evals/ may "
                                        "take; past it the oldest finished evals go, and an eval that still does not fit "
                                        "is refused with 507.")
    max_scored_tokens: int = Field(16_384, ge=1, le=1 << 22, description="Tokens one /api/score or /api/divergence request "
                                   "may read by teacher forcing (references, and for rows without one the answers generated, "
                                   "summed over the rows); more gets a 400 naming the field.")
    max_arena_comparisons: int = Field(10_000, ge=1, le=10_000_000, description="Blind comparisons kept in results/arena.sqlite3; "
                                       "a new one past it removes the oldest not voted on, and gets 507 when every one left holds a vote.")
    max_arena_bytes: int = Field(200_000_000, ge=100_000, le=1 << 40, description="Bytes the comparisons' prompts and answers "
                                 "may take in results/arena.sqlite3; past it as for max_arena_comparisons.")


class LlamaCppSettings(BaseModel):
    n_ctx: int = Field(4096, ge=64, le=1 << 20, description="Context window in tokens (prompt + answer).", json_schema_extra={"flag": "--n-ctx"})
    n_threads: int = Field(default_factory=physical_cores, ge=1, le=512, description="CPU threads for decoding; physical cores by default.", json_schema_extra={"flag": "--n-threads"})
    n_threads_batch: Optional[int] = Field(None, ge=1, le=512, description="CPU threads for prompt processing; n_threads when unset.")
    adapt_threads: bool = Field(True, description="Decode on fewer threads while other processes keep cores busy "
                                "(all threads spin at every step, so one busy core stalls them all), all of them again when they are not.")
    n_batch: int = Field(512, ge=1, le=65536, description="Prompt tokens evaluated per llama_decode call.")
    parallel: int = Field(4, ge=1, le=64, description="Requests decoded together, each on a sequence of its own with n_ctx cells "
                          "(continuous batching; the KV cache is parallel x n_ctx). 1 decodes one request at a time.",
                          json_schema_extra={"flag": "--parallel"})
    n_gpu_layers: int = Field(
        -1,
        ge=-1,
        description="Layers offloaded to Metal/CUDA. -1 offloads all where the build has a GPU backend; "
        "a build without one, or a failed GPU start, runs on the CPU.", json_schema_extra={"flag": "--n-gpu-layers"},
    )
    prefix_cache: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Keep the KV cache of the last request and evaluate only the new suffix of the next. "
        "auto turns it on where the build computes the same numbers in any batch shape (a CPU build "
        "without llamafile sgemm), so a warm answer always equals a cold one; on keeps it everywhere.",
    )
    mmap: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Map the GGUF file (on) or read the weights into the process's memory (off). auto reads "
        "them in on the CPU when the file takes less than half the available memory, where they can sit on "
        "huge pages, which decode faster (see app/services/system/hugepages.py), and maps it otherwise and on a GPU.",
    )
    verbose: bool = Field(False, description="Let llama.cpp print its own load log to stderr.")


class TransformersSettings(BaseModel):
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Weights dtype. auto: bf16 on CUDA, fp16 on MPS; on the CPU bf16 where it has native bf16 "
        "instructions (AVX512-BF16/AMX; measured faster there), else fp32 (see README). The LoRA is merged in this dtype.", json_schema_extra={"flag": "--dtype"},
    )
    device: Literal["auto", "cuda", "mps", "cpu"] = Field("auto", description="auto tries CUDA, then MPS, then the CPU.", json_schema_extra={"flag": "--device"})
    trust_remote_code: bool = Field(
        False,
        description="Allow a checkpoint's own modelling code (config.json auto_map) to run: for model paths, and for "
        "presets that set trust_remote_code. Off, every model loads into transformers' own class for its architecture "
        "(Qwen2.5, Qwen3 and Hunyuan dense have one), and one without such a class is refused.", json_schema_extra={"flag": "--trust-remote-code"})
    merge_adapter: bool = Field(True, description="Merge the LoRA into the weights (merge_and_unload) instead of keeping it unmerged.")
    n_threads: int = Field(default_factory=physical_cores, ge=1, le=512, description="torch CPU threads; physical cores by default.", json_schema_extra={"flag": "--n-threads"})
    adapt_threads: bool = Field(True, description="Decode on fewer threads while other processes keep cores busy "
                                "(all threads spin at every step, so one busy core stalls them all), all of them again when they are not.")
    n_ctx: Optional[int] = Field(None, ge=64, le=1 << 20, description="Context window; the model's max_position_embeddings when unset.", json_schema_extra={"flag": "--n-ctx"})
    prefix_cache: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Keep the KV cache of the last generation and evaluate only the new suffix of the next "
        "prompt. auto turns it on for fp32, where a warm answer matches a cold one (measured max logit "
        "difference 4e-5); in bf16/fp16 the batch shape moves logits by up to 0.25 and greedy answers can change.",
    )
    max_batch_size: int = Field(
        8, ge=1, le=256,
        description="Requests decoded together as rows of one running batch (concurrent chats, /batch, evals); "
        "newcomers join at the next step. 1 generates one at a time. 8: aggregate tokens/s still grow up to 8 "
        "rows on 2 CPU cores (docs/benchmarks.md).",
    )
    token_timeout_s: float = Field(120.0, gt=0, le=3600, description="A generation that yields no token for this long ends with an error.")
    memory_limit_bytes: Optional[int] = Field(
        None, ge=1, description="Refuse models whose weights need more; available RAM (or GPU memory) when unset."
    )


class RemoteSettings(BaseModel):
    """The remote backend: a model served by another OpenAI-compatible server (vLLM, llama-server,
    TGI, Ollama), for models too big for this machine."""

    base_url: Optional[str] = Field(
        None, description="The server's OpenAI API root, e.g. http://gpu-host:8000/v1 (vLLM, llama-server), "
        "http://host:11434/v1 (Ollama). Needed by the remote backend.", json_schema_extra={"flag": "--base-url"},
    )
    api_key: Optional[SecretStr] = Field(
        None, min_length=1, description="Sent as 'Authorization: Bearer <key>' to that server (vLLM --api-key, "
        "llama-server --api-key). Not this tester's own key (server.api_key).", json_schema_extra={"flag": "--remote-api-key"},
    )
    model: Optional[str] = Field(
        None, min_length=1, description="The model name the server serves (vLLM: --served-model-name or a "
        "--lora-modules name). Unset: the server's only model; a server with several asks you to choose.", json_schema_extra={"flag": "--remote-model"},
    )
    connect_timeout_s: float = Field(10.0, gt=0, le=600, description="Longest wait for the TCP (and TLS) connection.")
    read_timeout_s: float = Field(
        120.0, gt=0, le=3600,
        description="Longest silence the server may keep: before the first token (its queue and prompt processing "
        "count) and between tokens. Longer ends the answer with an error naming it.",
    )
    n_ctx: Optional[int] = Field(
        None, ge=64, le=1 << 24,
        description="The server's context window, for the status; unset: what its /models says (vLLM's "
        "max_model_len), if anything. The server itself refuses prompts too long for it.", json_schema_extra={"flag": "--n-ctx"},
    )


class Preset(BaseModel):
    backend: BackendName
    path: str = Field(description="A .gguf file or a Hugging Face model directory; relative paths are under models_dir. "
                      "For the remote backend: the model's name on the remote server (remote.base_url).")
    trust_remote_code: bool = Field(
        False, description="This model needs its own modelling code. Honoured only when the tester was started with "
        "remote code allowed (transformers.trust_remote_code); a preset without it always loads transformers' own class.")

    @field_validator("backend", mode="before")
    @classmethod
    def _old_backend_name(cls, name):
        return _backend_setting(name, "a preset")


DEFAULT_PRESETS: dict[str, Preset] = {
    # transformers has HunYuanDenseV1ForCausalLM (and Qwen2/Qwen3) natively: no remote code
    "hunyuan-7b-instruct": Preset(backend="transformers", path="Hunyuan-7B-Instruct"),
    "qwen2.5-0.5b-instruct": Preset(backend="transformers", path="Qwen2.5-0.5B-Instruct"),
    "qwen2.5-1.5b-instruct": Preset(backend="transformers", path="Qwen2.5-1.5B-Instruct"),
    "qwen2.5-7b-instruct": Preset(backend="transformers", path="Qwen2.5-7B-Instruct"),
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODEL_TEST_", env_nested_delimiter="__", extra="ignore")

    backend: Optional[BackendName] = Field(
        None, description="Backend serving the model. Unset: inferred from the model (a .gguf file runs on llamacpp, "
        "a directory on transformers); llamacpp for the default model. remote forwards to a remote OpenAI-compatible "
        "server (see remote; its old name openai still works, with a warning).",
        json_schema_extra={"old_choices": list(OLD_BACKEND_NAMES)},
    )
    model: Optional[str] = Field(
        None,
        description="Model to serve: a .gguf file (llamacpp), a Hugging Face directory (transformers) or a preset name. "
        "Unset means the embedded SmolLM2-135M-Instruct: its Q4_1 GGUF, or for transformers the checkpoint built from it.",
    )
    adapter: Optional[str] = Field(None, description="A LoRA adapter applied on the model: a PEFT directory (transformers backend) or a GGUF LoRA file (llamacpp).")
    models_dir: Path = Field(PROJECT_ROOT / "models", description="Where models and adapters are found (and pulled to).")
    model_roots: list[Path] = Field(
        default_factory=list,
        description="Folders besides models_dir and saves_dir in which API clients may name models and adapters "
        "by path (symlinks are followed first). Paths given on the command line or in presets are always allowed.",
    )
    saves_dir: Path = Field(PROJECT_ROOT / "saves", description="LLaMA-Factory style outputs: saves/<model>/lora/<name>/.")
    results_dir: Path = Field(PROJECT_ROOT / "results", description="Where evals (results/evals/<id>/) and benchmarks are saved.")
    judge_prompts: Path = Field(PROJECT_ROOT / "config" / "judge_prompts.txt",
                                description="The prompts an eval's judge model reads (pairwise and single-answer grading); edit them freely.")
    presets: dict[str, Preset] = Field(
        default_factory=lambda: dict(DEFAULT_PRESETS),
        description='Named models; override as JSON, e.g. MODEL_TEST_PRESETS=\'{"qwen2.5-7b-instruct": {"backend": "transformers", "path": "/data/qwen7b"}}\'.',
    )
    server: ServerSettings = Field(default_factory=ServerSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    llamacpp: LlamaCppSettings = Field(default_factory=LlamaCppSettings)
    transformers: TransformersSettings = Field(default_factory=TransformersSettings)
    remote: RemoteSettings = Field(default_factory=RemoteSettings)
    judge_endpoint: RemoteSettings = Field(
        default_factory=RemoteSettings,
        description="An OpenAI-compatible server an eval may use as its judge (base_url, model, api_key), set by the "
        "operator only: clients choose it by name, never give its address or key, and results never hold the key.")

    @field_validator("backend", mode="before")
    @classmethod
    def _old_backend_name(cls, name):
        return _backend_setting(name, "the backend setting (--backend, MODEL_TEST_BACKEND)")
