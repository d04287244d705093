"""GGUF models through llama-cpp-python.

The token loop is ``decoder.decode_tokens``: one ``llama_decode`` per token, greedy
picks in numpy and all other sampling in llama.cpp's own sampler chain (no Python-side sampling
loop), and the KV cache of the longest shared prefix with the last request is kept, so turn N of
a chat evaluates only what is new since turn N-1.

That reuse is exact only where llama.cpp computes a token's KV the same way whether it is
evaluated alone (as generated tokens are) or inside a batch at any offset. On x86 CPUs that
holds for builds without llamafile's sgemm and with flash attention off (measured: all 145
split points of a 145-token prompt give bit-identical logits; with sgemm or flash attention
they do not, and greedy answers drift). So flash attention stays off, and with
``prefix_cache="auto"`` the cache is kept only on such builds; elsewhere each request starts cold.

A LoRA comes as a GGUF adapter file (``convert_lora_to_gguf.py``, or
``scripts.convert_to_gguf --lora-only``), applied at load with llama-cpp-python's ``lora_path``
at scale 1.0, as PEFT applies it; check() refuses a file that is no LoRA or that names another
base (see ``checkpoints.adapters.gguf_lora_matches_base``) before the current model is let go.
"""
from __future__ import annotations

import ctypes
import logging
import queue
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from app.services.backends.base import BackendInfo, Capabilities, check_token_ids, continuation_prompt
from app.services.backends.chat_template import template_messages, template_tools
from app.services.backends.constraints import CompiledConstraint, ConstraintCompiler
from app.services.backends.llamacpp import internals, offload
from app.services.backends.llamacpp.decoder import continuation_logit_blocks, continuation_logits, decode_tokens
from app.services.backends.llamacpp.offload import GgmlDevice, OffloadPlan, plan_offload
from app.services.backends.llamacpp.parallel import ParallelDecoder
from app.services.checkpoints.gguf_metadata import read_gguf_header
from app.services.checkpoints.spec import ModelSpec
from app.services.checkpoints.stop_tokens import gguf_stop_ids
from app.services.core.constraints import OutputConstraint
from app.services.core.cpu_share import CpuShare
from app.services.core.errors import InvalidModel, InvalidRequest, ModelLoadFailed, ModelNotFound
from app.services.core.text_stream import Arrival, GenerationFailed, StreamAssembler, stream_tokens
from app.services.core.thread_scope import ends_with_request, on_a_thread_of_its_own
from app.services.core.types import Chunk, GenerationParams, GpuUse, Message, Prompt, TokenLogprob, ToolCallFormat, ToolFunction
from config.settings import LlamaCppSettings

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
LORA_SCALE = 1.0  # PEFT's merge applies alpha/r and nothing more; so does llama.cpp at 1.0


def check_gguf_file(path: Path) -> None:
    """Raises a clear error for a path that cannot be a GGUF model, before llama.cpp sees it."""
    if not path.exists():
        raise ModelNotFound(f"model file not found: {path}", field="model")
    if not path.is_file():
        raise InvalidModel(f"not a file: {path} (the llamacpp backend takes a .gguf file)", field="model")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise InvalidModel(f"not a GGUF file (no GGUF header): {path}", field="model")


def gpu_backend_name(system_info: str) -> Optional[str]:
    """Which GPU backend the llama.cpp build carries, read from llama_print_system_info."""
    for marker, name in (("CUDA", "CUDA"), ("METAL", "Metal"), ("Metal", "Metal"), ("Vulkan", "Vulkan"), ("ROCm", "ROCm")):
        if marker in system_info:
            return name
    return None


def builds_with_llamafile(system_info: str) -> bool:
    return "LLAMAFILE = 1" in system_info


_DECODED = object()


@dataclass(frozen=True)
class _Run:
    """One request on its way through stream(), as each token path takes it."""

    prompt: Prompt
    params: GenerationParams
    cancel: threading.Event
    budget: int  # tokens it may make: max_new_tokens, or what the context has room for
    seed: int
    is_end: Callable[[int], bool]
    assembler: StreamAssembler
    constraint: Optional[CompiledConstraint] = None


class LlamaCppBackend:
    name = "llamacpp"

    def __init__(self, spec: ModelSpec, settings: LlamaCppSettings):
        self.spec = spec
        self.model = str(spec.path)
        self._path = Path(spec.path)
        self._lora_path = Path(spec.adapter) if spec.adapter is not None else None
        self._settings = settings
        self._llama = None
        self._formatter = None
        self._device = "CPU"
        self._gpu_layers = 0
        self._gpu_fallback_reason: Optional[str] = None
        self._offload: Optional[OffloadPlan] = None
        self._gpu_memory_bytes: Optional[int] = None
        self._pieces: dict[int, bytes] = {}
        self._stop_ids: frozenset[int] = frozenset()
        self._prefix_cache = False
        self._context_scope: Optional[str] = None  # the cache scope of the request that last used the context
        self._piece_buffer = ctypes.create_string_buffer(256)
        self._parallel: Optional[ParallelDecoder] = None
        self._cpu_share: Optional[CpuShare] = None
        self._constraints: Optional[ConstraintCompiler] = None

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(inspection=True, scoring=True, logprobs=True, max_batch_size=self._settings.parallel, tools=True,
                            constrained_decoding=True, prefix_scoring=self._prefix_cache)

    # -- batching (parallel.py): every request may join the running batch ---------------------
    def batch_group(self, params: GenerationParams) -> int:
        return 0  # each sequence samples with a chain of its own, so any sampling shares a step

    def expect_row(self) -> None:
        """Nothing to wait for: a request joins at the decoder's next step whenever it comes."""

    def row_not_coming(self) -> None:
        """See expect_row."""

    # -- lifecycle -------------------------------------------------------------------------
    def check(self) -> None:
        check_gguf_file(self._path)
        try:
            is_lora = read_gguf_header(self._path).is_lora
        except InvalidModel:
            is_lora = False  # a damaged header is llama.cpp's to report, with its own words
        if is_lora:
            raise InvalidModel(
                f"{self._path.name} is a LoRA adapter, not a model; load its base model with it as the adapter",
                field="model",
            )
        if self._lora_path is not None:
            self._check_lora(self._lora_path)

    def _check_lora(self, lora: Path) -> None:
        from app.services.checkpoints.adapters import gguf_lora_matches_base

        if not lora.exists():
            raise ModelNotFound(f"adapter not found: {lora}", field="adapter")
        if not lora.is_file():
            raise InvalidModel(f"not a GGUF LoRA file: {lora} (llama.cpp takes a LoRA as a .gguf file)", field="adapter")
        try:
            header = read_gguf_header(lora)
        except InvalidModel as exc:
            raise InvalidModel(f"{exc.message} (a llama.cpp adapter is a GGUF LoRA file)", field="adapter") from None
        base = read_gguf_header(self._path)
        if not header.is_lora:
            raise InvalidModel(
                f"{lora.name} is not a LoRA adapter (general.type is {header.get('general.type', 'model')!r}); "
                f"load it as the model instead",
                field="adapter",
            )
        if not gguf_lora_matches_base(header, base):
            named = ", ".join(header.lora_base_names()) or "no base"
            raise InvalidModel(
                f"LoRA {lora.name} ({header.architecture}, trained on {named}) does not fit {self._path.name} "
                f"({base.architecture}, {', '.join(base.model_names())}); load it on its own base model",
                field="adapter",
            )

    def load(self) -> None:
        self.check()
        import llama_cpp  # deferred: the page must start without paying for it

        # Llama() initialises llama.cpp's backend on its first call (llama.py's __init__), and
        # every query below needs it done: on a CUDA build the device registry they touch starts
        # the CUDA runtime. So it is done here first, as Llama() would; its own call then
        # changes nothing. (Issue 29: these queries ran before it, and a CUDA build crashed at load.)
        llama_cpp.llama_backend_init()
        system_info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
        gpu = gpu_backend_name(system_info) if llama_cpp.llama_supports_gpu_offload() else None
        plan = self._plan_offload(llama_cpp, gpu)
        if plan.fallback:
            log.warning("%s: %s", self._path.name, plan.why_cpu)
        self._llama, plan = self._open_or_fall_back(llama_cpp, plan, gpu)
        self._offload = plan
        self._gpu_layers = plan.n_gpu_layers
        self._gpu_fallback_reason = plan.why_cpu if plan.fallback else None
        self._device = gpu if (gpu and plan.n_gpu_layers != 0) else "CPU"
        self._system_info = system_info
        self._llama_cpp_version = llama_cpp.__version__
        self._formatter = self._make_formatter(llama_cpp)
        self._stop_ids = self._find_stop_ids(llama_cpp)
        # nothing is built until a request asks for a constraint (see backends/constraints.py)
        vocab, n_vocab, end_ids = internals.vocab(self._llama), self._llama.n_vocab(), self._stop_ids
        self._constraints = ConstraintCompiler(lambda: internals.llguidance_tokenizer(vocab, n_vocab, end_ids), n_vocab,
                                               self._path.name)
        self._prefix_cache = self._settings.prefix_cache == "on" or (
            self._settings.prefix_cache == "auto" and self._device == "CPU" and not builds_with_llamafile(system_info)
        )
        if self._settings.adapt_threads and self._device == "CPU":
            self._cpu_share = CpuShare(self._settings.n_threads)
        if self._settings.parallel > 1:
            self._parallel = ParallelDecoder(self._llama, n_seq=self._settings.parallel, n_ctx=self._llama.n_ctx(),
                                             n_batch=self._llama.n_batch, keep_prefix=self._prefix_cache,
                                             piece=self._piece, threads=self._threads_now)
        self._gpu_memory_bytes = self._memory_taken(llama_cpp, plan.device)
        log.info(
            "loaded %s on %s (n_ctx=%d, parallel=%d, threads=%d, gpu_layers=%d, prefix cache %s, weights %s)",
            self._path.name, self._device, self.n_ctx, self._settings.parallel, self._settings.n_threads,
            self._gpu_layers, "on" if self._prefix_cache else "off", self._weights(),
        )

    def _plan_offload(self, llama_cpp, gpu: Optional[str]) -> OffloadPlan:
        """How many layers go to which GPU (llamacpp/offload.py), from the file's block count and
        the GPU's free memory now; the current model has been let go, so its memory counts as free."""
        requested = self._settings.n_gpu_layers
        devices = offload.gpu_devices(llama_cpp) if gpu and requested != 0 else []  # None: unknown
        header = read_gguf_header(self._path)
        blocks = header.get(f"{header.architecture}.block_count")
        return plan_offload(requested, gpu, devices, blocks if isinstance(blocks, int) else None,
                            self._path.stat().st_size)

    def _open_or_fall_back(self, llama_cpp, plan: OffloadPlan, gpu: Optional[str]) -> tuple[object, OffloadPlan]:
        """The model opened as planned; where the GPU start fails, opened again on the CPU with
        the reason kept for the status."""
        try:
            return self._open_on_own_thread(llama_cpp, plan.n_gpu_layers), plan
        except Exception as exc:  # llama.cpp reports a failed GPU start only as a generic error
            if plan.n_gpu_layers == 0:
                raise ModelLoadFailed(f"llama.cpp could not load {self._path}: {exc}", field="model") from exc
            log.warning("GPU load of %s failed, falling back to the CPU", self._path, exc_info=True)
            reason = f"{gpu} initialisation failed ({exc}); running on the CPU"
        try:
            llama = self._open_on_own_thread(llama_cpp, 0)
        except Exception as cpu_exc:
            raise ModelLoadFailed(f"llama.cpp could not load {self._path}: {cpu_exc}", field="model") from cpu_exc
        return llama, OffloadPlan(0, plan.layers_total, why_cpu=reason, fallback=True)

    def _open_on_own_thread(self, llama_cpp, n_gpu_layers: int):
        """Llama(...) on a thread that ends with the load: the threads llama.cpp starts there
        (OpenMP's team) go with it instead of staying on a server thread that lives on
        (LLAMACPP_GUIDE.md, Threads), and a crash report names the load by its thread."""
        return on_a_thread_of_its_own(lambda: self._open(llama_cpp, n_gpu_layers), "llamacpp-load")

    def _memory_taken(self, llama_cpp, device: Optional[GgmlDevice]) -> Optional[int]:
        """What loading took of the GPU's free memory (weights, KV cache, compute buffers)."""
        if device is None or self._gpu_layers == 0:
            return None
        now = next((d for d in offload.gpu_devices(llama_cpp) or [] if d.index == device.index), None)
        return max(0, device.free_bytes - now.free_bytes) if now is not None else None

    def _open(self, llama_cpp, n_gpu_layers: int):
        settings = self._settings
        return llama_cpp.Llama(
            model_path=str(self._path),
            lora_path=str(self._lora_path) if self._lora_path else None,
            lora_scale=LORA_SCALE,
            n_ctx=settings.n_ctx,
            n_batch=min(settings.n_batch, settings.n_ctx),
            n_threads=settings.n_threads,
            n_threads_batch=settings.n_threads_batch or settings.n_threads,
            n_gpu_layers=n_gpu_layers,
            flash_attn=False,  # its results depend on the batch shape; see the module docstring
            use_mmap=self._use_mmap(n_gpu_layers),
            verbose=settings.verbose,
        )

    def _use_mmap(self, n_gpu_layers: int) -> bool:
        """Weights read into memory can sit on huge pages (app/services/system/hugepages.py); a mapped file cannot.
        On a GPU the weights are copied to it anyway and Metal maps the file without a copy."""
        if self._settings.mmap != "auto":
            return self._settings.mmap == "on"
        if n_gpu_layers != 0:
            return True
        import psutil

        return self._path.stat().st_size * 2 > psutil.virtual_memory().available

    def _weights(self) -> str:
        import llama_cpp

        mapped = self._llama.model_params.load_mode in (llama_cpp.LLAMA_LOAD_MODE_MMAP, llama_cpp.LLAMA_LOAD_MODE_MMAP_MLOCK)
        return "mapped file" if mapped else "in memory"

    def _make_formatter(self, llama_cpp):
        template = self._llama.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        return Jinja2ChatFormatter(
            template=template,
            eos_token=self._token_text(self._llama.token_eos()),
            bos_token=self._token_text(self._llama.token_bos()),
            add_generation_prompt=True,
        )

    def _find_stop_ids(self, llama_cpp) -> frozenset[int]:
        """The end tokens the file declares (checkpoints.stop_tokens.gguf_stop_ids); for a file that
        declares none, llama.cpp's own end-of-generation set, the only guess left."""
        declared = gguf_stop_ids(read_gguf_header(self._path).metadata)
        if declared:
            return frozenset(declared)
        vocab = internals.vocab(self._llama)
        guessed = frozenset(i for i in range(self._llama.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i))
        log.warning("%s declares no end token (tokenizer.ggml.eos/eot/eom_token_id); stopping on llama.cpp's "
                    "end-of-generation tokens %s", self._path.name, sorted(guessed))
        return guessed

    def _token_text(self, token_id: int) -> str:
        if token_id < 0:
            return ""
        return internals.token_text(self._llama, token_id)

    def clear_cache(self) -> None:
        """Forgets the KV cache, so the next request starts cold."""
        if self._llama is not None:
            self._llama.reset()
        if self._parallel is not None:
            self._parallel.forget_cells()

    def _threads_now(self) -> Optional[int]:
        """The decoding threads to use now (core.cpu_share), or None to leave them as loaded."""
        return self._cpu_share.threads if self._cpu_share is not None else None

    def unload(self) -> None:
        if self._parallel is not None:
            self._parallel.close()
            self._parallel = None
        if self._cpu_share is not None:
            self._cpu_share.close()
            self._cpu_share = None
        if self._llama is not None:
            self._llama.close()
        self._llama = None
        self._formatter = None
        self._constraints = None
        self._stop_ids = frozenset()
        self._pieces.clear()

    # -- facts -----------------------------------------------------------------------------
    @property
    def llama(self):
        """The loaded ``llama_cpp.Llama`` (None when unloaded), for checks against llama-cpp-python's
        own generation and cache bookkeeping."""
        return self._llama

    @property
    def parallel_decoder(self) -> Optional[ParallelDecoder]:
        """The decoder that runs requests together (``parallel`` > 1 and loaded), else None."""
        return self._parallel

    @property
    def n_ctx(self) -> int:
        return self._llama.n_ctx() if self._llama is not None else self._settings.n_ctx

    def info(self) -> BackendInfo:
        facts = {
            "device": self._device,
            "n_ctx": self.n_ctx,
            "n_threads": self._settings.n_threads,
            "n_gpu_layers": self._gpu_layers,
            "parallel": self._settings.parallel,
        }
        if self._llama is not None:
            metadata = self._llama.metadata
            facts.update(
                {
                    "model_name": metadata.get("general.name") or self._path.stem,
                    "architecture": metadata.get("general.architecture"),
                    "n_ctx_train": internals.n_ctx_train(self._llama),
                    "llama_cpp_python": self._llama_cpp_version,
                    "build": self._system_info.strip(),
                    "chat_template": bool(self._formatter),
                    "prefix_cache": self._prefix_cache,
                    "weights": self._weights(),
                }
            )
            if self._constraints is not None:
                facts["constraint_vocabulary"] = self._constraints.vocabulary_state
        if self._gpu_fallback_reason:
            facts["gpu_fallback"] = self._gpu_fallback_reason
        if self._offload is not None:
            facts["gpu"] = self.gpu_use()
        if self._lora_path is not None:
            facts.update({"adapter": str(self._lora_path), "lora_scale": LORA_SCALE})
        return BackendInfo(**facts)

    def gpu_use(self) -> GpuUse:
        """The GPU's name, the layers on it (n of N, as llama.cpp counts them) and the memory the
        load took there; on the CPU, why."""
        plan = self._offload
        if plan is None or plan.n_gpu_layers == 0:
            return GpuUse(layers_total=plan.layers_total if plan else None,
                          note=plan.why_cpu if plan else "not loaded")
        layers = plan.n_gpu_layers if plan.n_gpu_layers > 0 else (plan.layers_total or 0)
        # the registry unread (device None): the backend's name is what is known of the GPU
        return GpuUse(name=plan.device.description if plan.device else self._device, layers_offloaded=layers,
                      layers_total=plan.layers_total, memory_bytes=self._gpu_memory_bytes)

    # -- prompts ---------------------------------------------------------------------------
    def render_prompt(self, messages: Sequence[Message], tools: Sequence[ToolFunction] = ()) -> str:
        return self._render(messages, tools)[0]

    def _render(self, messages: Sequence[Message], tools: Sequence[ToolFunction]) -> tuple[str, Optional[ToolCallFormat]]:
        if self._formatter is None:
            raise InvalidRequest(
                f"{self._path.name} has no chat template; send a raw prompt to /v1/completions instead",
                field="messages",
            )
        tool_dicts, tool_format = template_tools(self.chat_template(), tools, self._path.name)
        try:
            return self._formatter(messages=template_messages(messages), tools=tool_dicts).prompt, tool_format
        except Exception as exc:  # jinja raises many kinds; all mean these messages do not fit the template
            raise InvalidRequest(f"the chat template rejected these messages: {exc}", field="messages") from exc

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        # Chat templates write their own BOS, so by default the tokenizer adds none, as in transformers.
        return self._llama.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    @property
    def _end_token(self) -> int:
        """The end token a constrained answer ends with once its document is complete."""
        return min(self._stop_ids) if self._stop_ids else self._llama.token_eos()

    def compile_constraint(self, constraint: OutputConstraint) -> CompiledConstraint:
        """See base.Constraining; the vocabulary comes from the GGUF through llama.cpp."""
        compiler = self._constraints
        if compiler is None:
            raise InvalidRequest("the model was unloaded", field="model")
        return compiler.compile(constraint)

    def stop_token_ids(self) -> list[int]:
        """The ids that end an answer, as stream() checks them: the EOS, EOT and EOM tokens the
        GGUF declares (checkpoints/stop_tokens.py), not every token llama.cpp takes for an end by
        its text."""
        return sorted(self._stop_ids)

    @property
    def vocab_size(self) -> int:
        return self._llama.n_vocab()

    def detokenize(self, token_ids: Sequence[int]) -> str:
        check_token_ids(token_ids, self.vocab_size)
        # special=True: an inspection must show <|im_end|> where it is, not hide it
        return self._llama.detokenize(list(token_ids), special=True).decode("utf-8", errors="replace")

    def token_pieces(self, token_ids: Sequence[int]) -> list[str]:
        check_token_ids(token_ids, self.vocab_size)
        return [self._token_text(token_id) for token_id in token_ids]

    def chat_template(self) -> Optional[str]:
        return self._llama.metadata.get("tokenizer.chat_template") if self._llama is not None else None

    def prepare(self, messages: Optional[Sequence[Message]] = None, text: Optional[str] = None,
                continue_final: bool = False, tools: Sequence[ToolFunction] = ()) -> Prompt:
        tool_format = None
        if messages is not None:
            text, tool_format = self._render(messages, tools)
            if continue_final:
                text = continuation_prompt(text, messages[-1])
            token_ids = self.tokenize(text)
        else:
            # A raw completion prompt gets the BOS the model's vocabulary asks for.
            token_ids = self.tokenize(text, add_special=True)
        if not token_ids:
            raise InvalidRequest("the prompt is empty", field="prompt")
        return Prompt(text=text, token_ids=tuple(token_ids), tool_format=tool_format)

    def continuation_logits(self, prompt_ids: Sequence[int], continuation: Sequence[int], use_adapter: bool = True):
        self._refuse_adapter_off(use_adapter)
        return continuation_logits(self._llama, prompt_ids, continuation, self._reuses_context(None), self._threads_now)

    def continuation_logit_blocks(self, prompt_ids: Sequence[int], continuation: Sequence[int], use_adapter: bool = True,
                                  block_rows: int = 64, cancel: Optional[threading.Event] = None,
                                  cache_scope: Optional[str] = None):
        self._refuse_adapter_off(use_adapter)
        return continuation_logit_blocks(self._llama, prompt_ids, continuation, self._reuses_context(cache_scope), block_rows,
                                         self._threads_now, cancel)

    def _reuses_context(self, cache_scope: Optional[str]) -> bool:
        """Whether a request of ``cache_scope`` may reuse what the context's cache holds: the prefix
        cache is on and the cache was left by a request of the same scope; it is now this one's.
        (The caller holds the model alone, as for every use of the context.)"""
        same = self._context_scope == cache_scope
        self._context_scope = cache_scope
        return self._prefix_cache and same

    def _refuse_adapter_off(self, use_adapter: bool) -> None:
        if not use_adapter and self._lora_path is not None:
            raise InvalidRequest("llama.cpp applies its LoRA at load and cannot switch it off per request; load the "
                                 "base model on a slot of its own", field="slot")

    def token_bytes(self, token_id: int) -> bytes:
        return self._piece(token_id)

    def _piece(self, token_id: int) -> bytes:
        piece = self._pieces.get(token_id)
        if piece is None:
            import llama_cpp

            vocab = internals.vocab(self._llama)
            size = llama_cpp.llama_token_to_piece(vocab, token_id, self._piece_buffer, len(self._piece_buffer), 0, False)
            if size < 0:  # the piece is longer than the buffer; -size is what it needs
                self._piece_buffer = ctypes.create_string_buffer(-size)
                size = llama_cpp.llama_token_to_piece(vocab, token_id, self._piece_buffer, -size, 0, False)
            piece = self._piece_buffer.raw[:size]
            self._pieces[token_id] = piece
        return piece

    # -- generation ------------------------------------------------------------------------
    def stream(self, prompt: Prompt, params: GenerationParams, cancel: threading.Event) -> Iterator[Chunk]:
        """The answer's chunks, from one of three token paths: the parallel decoder's batch when
        there is one; else the single-sequence loop, on this thread when it ends with its request
        (``thread_scope``), or on a decoding thread of its own. Only the thread that runs the
        stream knows which it is, so the choice is made here, at the stream's first step."""
        budget = min(params.max_new_tokens, self.n_ctx - len(prompt.token_ids))
        run = _Run(
            prompt, params, cancel, budget,
            seed=params.seed if params.seed is not None else random.randrange(2**31),
            is_end=self._stop_ids.__contains__ if params.ends_at_end_token else (lambda token_id: False),
            assembler=StreamAssembler(len(prompt.token_ids), params.stop),
            constraint=self.compile_constraint(params.constraint) if params.constraint is not None else None,
        )
        if self._parallel is not None:
            yield from self._stream_in_batch(run)
        elif ends_with_request():
            yield from self._stream_on_this_thread(run)
        else:
            yield from self._stream_handed_off(run)

    def _stream_in_batch(self, run: _Run) -> Iterator[Chunk]:
        """A sequence of the parallel decoder's batch (parallel.py)."""
        arrivals = self._parallel.generate(run.prompt.token_ids, run.params, run.seed, run.budget, run.is_end,
                                           run.constraint.start() if run.constraint is not None else None, self._end_token)
        try:
            yield from stream_tokens(run.assembler, arrivals, run.cancel, run.is_end, run.budget)
        finally:
            arrivals.close()  # frees the sequence at the decoder's next step

    def _stream_on_this_thread(self, run: _Run) -> Iterator[Chunk]:
        """The single-sequence loop on the thread that reads the stream. It ends with its request,
        and with it the OpenMP team llama.cpp starts on it, so it decodes itself: no hand-off per
        token, which on 2 cores pre-empted one of llama.cpp's threads each token."""
        tokens = self._token_loop(run)
        try:
            yield from stream_tokens(run.assembler, self._arrivals(tokens, run.budget), run.cancel, run.is_end, run.budget)
        finally:
            tokens.close()

    def _stream_handed_off(self, run: _Run) -> Iterator[Chunk]:
        """The single-sequence loop on a decoding thread of its own, for a thread that lives on
        (a long-lived thread keeps an idle OpenMP team: see thread_scope). llama_decode releases
        the GIL, so while it computes token n+1 this thread turns token n into a chunk and the
        server writes it. The decoder stops by itself at an end token and at the budget; a stop
        string, Stop or a closed stream halt it within a token."""
        arrivals: queue.SimpleQueue = queue.SimpleQueue()  # C: no Condition to build per get
        halt = threading.Event()
        decoder = threading.Thread(target=self._decode_into, args=(self._token_loop(run), run, arrivals, halt),
                                   name="llamacpp-decode", daemon=True)
        decoder.start()
        last = None
        try:
            for chunk in stream_tokens(run.assembler, _until_decoded(arrivals), run.cancel, run.is_end, run.budget):
                if chunk.is_last:
                    last = chunk  # sent once the decoder has stopped: a client may stop reading at it
                    break
                yield chunk
        finally:
            halt.set()
            decoder.join()
        yield last

    def _decode_into(self, tokens: Iterator, run: _Run, arrivals: queue.SimpleQueue, halt: threading.Event) -> None:
        """The decoding thread of ``_stream_handed_off``: queues each token, then a failure or
        nothing, then ``_DECODED``."""
        produced = 0
        try:
            for item in self._arrivals(tokens, run.budget):
                arrivals.put(item)
                produced += 1
                if halt.is_set() or run.cancel.is_set() or run.is_end(item[0]) or produced >= run.budget:
                    break
        except GenerationFailed as failure:
            arrivals.put(failure)
        except BaseException as exc:  # the worker boundary: the stream must hear of it
            log.exception("llama.cpp decoding stopped")
            arrivals.put(GenerationFailed(f"{type(exc).__name__}: {exc}"))
        finally:
            tokens.close()  # the loop's own cleanup, on the thread that ran it
            arrivals.put(_DECODED)

    def _token_loop(self, run: _Run) -> Iterator[tuple[int, Optional[TokenLogprob]]]:
        """decoder.decode_tokens on the loaded model, seeded for this request."""
        self._llama.set_seed(run.seed)
        return decode_tokens(self._llama, run.prompt.token_ids, run.params,
                             keep_prefix=self._reuses_context(run.params.cache_scope), piece=self._piece,
                             threads=self._threads_now,
                             constraint=run.constraint.start() if run.constraint is not None else None,
                             end_token=self._end_token)

    def _arrivals(self, tokens: Iterator[tuple[int, Optional[TokenLogprob]]], budget: int) -> Iterator[Arrival]:
        """Each token with its bytes; llama.cpp's failure becomes the stream's error chunk."""
        if budget <= 0:
            return
        try:
            for token_id, logprob in tokens:
                yield token_id, self._piece(token_id), logprob
        except Exception as exc:
            log.exception("llama.cpp decoding failed")
            raise GenerationFailed(f"{type(exc).__name__}: {exc}") from exc


def _until_decoded(arrivals: queue.SimpleQueue) -> Iterator[Arrival]:
    """What the decoding thread queued, until ``_DECODED``; a queued failure is raised here."""
    while True:
        item = arrivals.get()
        if item is _DECODED:
            return
        if isinstance(item, GenerationFailed):
            raise item
        yield item
