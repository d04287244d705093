"""Hugging Face checkpoints through transformers, with an optional LoRA adapter from peft.

The adapter is merged into the weights (``merge_and_unload``) in the model's dtype by
default, so generation costs what the base model costs. Requests decode as rows of one running
batch on the batcher's thread (batching.py, running_batch.py), which hands each new token id
through a queue; the request's thread turns ids into text with an incremental detokenizer. The
batch checks Stop and hang-ups between steps, so either ends a row within a token, and a queue
timeout means a stuck worker ends the stream with an error instead of hanging it.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import queue
import sys
import threading
from pathlib import Path
from typing import Iterator, Optional, Sequence

from app.services.backends.base import BackendInfo, Capabilities, check_token_ids, common_prefix_length, continuation_prompt
from app.services.backends.transformers.batching import END, Batcher, Failure, Row, batch_key
from app.services.backends.transformers.detokenizer import TokenBytes, make_detokenizer
from app.services.backends.transformers.device import (
    DTYPE_BYTES,
    DeviceCaps,
    Placement,
    is_mps_size_error,
    place,
    prepare_process_for_torch,
    probe_caps,
)
from app.services.backends.transformers.running_batch import PrefixCache, RunningBatch
from app.services.checkpoints.adapters import ADAPTER_WEIGHT_FILES, AdapterConfig, adapter_matches_base, read_adapter_config
from app.services.checkpoints.hf_checkpoint import CheckpointFacts, inspect_checkpoint, read_safetensors_header
from app.services.checkpoints.spec import ModelSpec
from app.services.checkpoints.stop_tokens import hf_stop_ids
from app.services.core.cpu_share import CpuShare
from app.services.core.errors import InvalidModel, InvalidRequest, ModelLoadFailed, ModelNotFound, ModelTooLarge
from app.services.core.text_stream import Arrival, GenerationFailed, StreamAssembler, stream_tokens
from app.services.core.thread_scope import on_a_thread_of_its_own
from app.services.core.types import Chunk, GenerationParams, GpuUse, Message, Prompt
from config.settings import TransformersSettings

log = logging.getLogger(__name__)

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
WORKER_JOIN_S = 30.0
DEVICE_NAMES = {"cuda": "CUDA", "mps": "MPS", "cpu": "CPU"}


def model_inputs(encoded: dict) -> dict:
    """What the model takes from a tokenizer's output. Some tokenizers (Hunyuan's) return
    ``token_type_ids``, which causal LMs reject or misread, so they are dropped."""
    return {key: value for key, value in encoded.items() if key != "token_type_ids"}


def release_freed_memory() -> None:
    """Hands freed heap pages back to the OS, so process memory falls after an unload."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


class TransformersBackend:
    name = "transformers"

    def __init__(self, spec: ModelSpec, settings: TransformersSettings, caps: Optional[DeviceCaps] = None):
        self.spec = spec
        self.model = str(spec.path)
        self._settings = settings
        self._caps = caps
        self._model = None
        self._tokenizer = None
        self._token_bytes: Optional[TokenBytes] = None
        self._placement: Optional[Placement] = None
        self._facts: Optional[CheckpointFacts] = None
        self._eos_ids: frozenset[int] = frozenset()
        self._n_ctx = settings.n_ctx or 2048
        self._fallback_reason: Optional[str] = None
        self._gpu: Optional[GpuUse] = None
        self._adapter_config: Optional[AdapterConfig] = None
        self._prefix_cache = False
        self._kv_cache = None
        self._kv_ids: tuple[int, ...] = ()
        self._batcher: Optional[Batcher] = None
        self._cpu_share: Optional[CpuShare] = None
        self._torch_threads = settings.n_threads
        self._kv_adapter_on = True  # the cache holds keys and values computed with the adapter on or off
        self._adapter_on = True  # the unmerged adapter's switch, as the batch's thread last set it
        self.last_reused_tokens = 0
        self._versions: dict = {}

    # -- checks ----------------------------------------------------------------------------
    def check(self) -> None:
        """Everything that can refuse a model before the current one is let go: the directory,
        the adapter and its base, the device, and whether the weights fit in memory."""
        self._facts = inspect_checkpoint(self.spec.path)
        self._check_architecture()
        if self.spec.adapter is not None:
            self._adapter_config = self._check_adapter(self.spec.adapter)
        prepare_process_for_torch()
        caps = self._caps or probe_caps()
        placement = place(self._settings.device, self._settings.dtype, caps, self._facts.tensors)
        self._check_memory(placement)
        self._placement = placement

    @property
    def remote_code_allowed(self) -> bool:
        """The checkpoint's own modelling code may run: the operator allowed remote code at startup
        (transformers.trust_remote_code) and the model is no preset that leaves it off."""
        return self._settings.trust_remote_code and self.spec.trust_remote_code is not False

    def _remote_code_hint(self) -> str:
        if not self._settings.trust_remote_code:
            hint = "start the tester with --trust-remote-code (MODEL_TEST_TRANSFORMERS__TRUST_REMOTE_CODE=1) to allow it"
            return hint + (", and set trust_remote_code in the preset" if self.spec.trust_remote_code is False else "")
        return f"set trust_remote_code in the preset {self.spec.name!r} to run it"

    def _check_architecture(self) -> None:
        """A checkpoint transformers has no class for loads only with its own code, and only where
        that is allowed: refused here with the reason, before the current model is let go."""
        import json

        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        try:
            config = json.loads((self.spec.path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidModel(f"unreadable config.json in {self.spec.path}: {exc}", field="model") from None
        model_type = config.get("model_type")
        if not isinstance(model_type, str) or model_type in CONFIG_MAPPING_NAMES:
            return  # a native class (remote code runs only if allowed and shipped), or transformers' to work out
        import transformers

        architecture = (config.get("architectures") or [model_type])[0]
        what = f"{self.spec.path.name} ({architecture}, model_type {model_type!r})"
        if "auto_map" not in config:
            raise InvalidModel(f"{what} has no class in transformers {transformers.__version__} and ships no modelling "
                               f"code of its own (config.json has no auto_map)", field="model")
        if not self.remote_code_allowed:
            raise InvalidModel(f"{what} has no class in transformers {transformers.__version__}; it ships its own "
                               f"modelling code (config.json auto_map), which is not run unless allowed: "
                               f"{self._remote_code_hint()}", field="model")

    def _check_adapter(self, adapter: Path) -> AdapterConfig:
        if not adapter.exists():
            raise ModelNotFound(f"adapter not found: {adapter}", field="adapter")
        if not adapter.is_dir():
            raise InvalidModel(f"not an adapter directory: {adapter}", field="adapter")
        config = read_adapter_config(adapter)
        weights = [adapter / name for name in ADAPTER_WEIGHT_FILES if (adapter / name).is_file()]
        if not weights:
            raise InvalidModel(f"no adapter weights in {adapter} (adapter_model.safetensors)", field="adapter")
        if weights[0].suffix == ".safetensors":
            try:
                read_safetensors_header(weights[0])
            except InvalidModel as exc:
                raise InvalidModel(exc.message, field="adapter") from None
        base = config.base_model_name_or_path
        if base and not adapter_matches_base(base, self.spec.path):
            raise InvalidModel(
                f"adapter {adapter.name} was trained on {base}, not on {self.spec.path.name}; "
                f"load it on its own base model",
                field="adapter",
            )
        return config

    def _check_memory(self, placement: Placement) -> None:
        needed = self._facts.bytes_in(DTYPE_BYTES[placement.dtype])
        limit = self._settings.memory_limit_bytes or self._available_memory(placement.device)
        if limit is not None and needed > limit:
            raise ModelTooLarge(
                f"{self.spec.path.name} needs about {needed / 2**30:.2f} GiB in {placement.dtype} on {placement.device}, "
                f"and {limit / 2**30:.2f} GiB is available; pick a smaller model, a smaller dtype, or another device",
                field="model",
            )

    @staticmethod
    def _available_memory(device: str) -> Optional[int]:
        if device == "cuda":
            import torch

            free, _total = torch.cuda.mem_get_info()
            return free
        import psutil

        return psutil.virtual_memory().available

    # -- lifecycle -------------------------------------------------------------------------
    def load(self) -> None:
        if self._placement is None:
            self.check()
        placement = self._placement
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if placement.reason:
            log.warning("%s: %s", self.spec.path.name, placement.reason)
            self._fallback_reason = placement.reason
        torch.set_num_threads(self._settings.n_threads)
        self._torch_threads = self._settings.n_threads
        if self._settings.adapt_threads and placement.device == "cpu":
            self._cpu_share = CpuShare(self._settings.n_threads)
        transformers.utils.logging.disable_progress_bar()  # a tqdm bar per load is noise in a server log
        trust = self.remote_code_allowed
        dtype = getattr(torch, TORCH_DTYPES[placement.dtype])
        def build():
            model = AutoModelForCausalLM.from_pretrained(self.spec.path, dtype=dtype, trust_remote_code=trust)
            if self.spec.adapter is not None:
                model = self._apply_adapter(model)  # merging computes: not on a thread that lives on
            return model.to(placement.device)

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.spec.path, trust_remote_code=trust)
            model = on_a_thread_of_its_own(build, "transformers-load")
        except ValueError as exc:
            if "trust_remote_code" in str(exc):  # e.g. a tokenizer that exists only as the checkpoint's own code
                raise InvalidModel(f"{self.spec.path.name} needs its own code to load, which is not run unless allowed: "
                                   f"{self._remote_code_hint()} ({exc})", field="model") from exc
            raise ModelLoadFailed(f"transformers could not load {self.spec.path}: {exc}", field="model") from exc
        except (OSError, RuntimeError, KeyError) as exc:
            raise ModelLoadFailed(f"transformers could not load {self.spec.path}: {exc}", field="model") from exc
        model.eval()
        self._model, self._tokenizer = model, tokenizer
        self._gpu = self._measure_gpu_use(model, placement)
        self._adapter_on = True
        self._token_bytes = TokenBytes(tokenizer)
        self._prefix_cache = self._settings.prefix_cache == "on" or (
            self._settings.prefix_cache == "auto" and placement.dtype == "fp32"
        )
        self._eos_ids = self._find_eos_ids(model, tokenizer)
        batch = RunningBatch(self._forward, self._eos_ids, min(self._eos_ids) if self._eos_ids else 0, placement.device,
                             self._token_bytes, self._take_prefix_cache, self._keep_prefix_cache)
        self._batcher = Batcher(batch, self._settings.max_batch_size)
        config_ctx = getattr(model.config, "max_position_embeddings", None)
        self._n_ctx = self._settings.n_ctx or config_ctx or 2048
        self._versions = {"torch": torch.__version__, "transformers": transformers.__version__}
        log.info("loaded %s on %s in %s (n_ctx=%d, threads=%d%s)", self.spec.label, placement.device, placement.dtype,
                 self._n_ctx, self._settings.n_threads,
                 ", adapter merged" if self.spec.adapter and self._settings.merge_adapter else "")

    def _measure_gpu_use(self, model, placement: Placement) -> GpuUse:
        """The GPU's name, the model's layers (all on it) and the bytes of its weights there; on the
        CPU, why. Read once at load, so a status never has to ask the device."""
        layers = getattr(model.config, "num_hidden_layers", None)
        if placement.device == "cpu":
            why = placement.reason or ("--device cpu keeps the model on the CPU" if self._settings.device == "cpu"
                                       else "torch sees no CUDA or MPS device; the model runs on the CPU")
            return GpuUse(layers_total=layers, note=why)
        import torch

        name = torch.cuda.get_device_name(model.device) if placement.device == "cuda" else "Apple MPS"
        weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        return GpuUse(name=name, layers_offloaded=layers or 0, layers_total=layers, memory_bytes=weights)

    def _apply_adapter(self, model):
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, self.spec.adapter)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise InvalidModel(f"adapter {self.spec.adapter.name} does not fit {self.spec.path.name}: {exc}", field="adapter") from exc
        if self._settings.merge_adapter:
            model = model.merge_and_unload()
        return model

    @staticmethod
    def _find_eos_ids(model, tokenizer) -> frozenset[int]:
        """checkpoints.stop_tokens.hf_stop_ids on the loaded objects (the generation config is
        the model config's EOS when the checkpoint has no generation_config.json)."""
        generation = getattr(model, "generation_config", None)
        return frozenset(hf_stop_ids(getattr(generation, "eos_token_id", None), getattr(model.config, "eos_token_id", None),
                                     getattr(tokenizer, "eos_token_id", None)))

    def batch_group(self, params: GenerationParams):
        """Requests of one group can be rows of one batch; the service's queue lets only one group
        run at a time (see engine/queue.py)."""
        return batch_key(params)

    def expect_row(self) -> None:
        """Called by the service as it lets a request in, before stream(): a batch about to start
        waits for it (see Batcher.expect)."""
        if self._batcher is not None:
            self._batcher.expect()

    def row_not_coming(self) -> None:
        """An announced request ended without reaching stream() (its client left first)."""
        if self._batcher is not None:
            self._batcher.not_coming()

    @property
    def batch_sizes(self) -> list[int]:
        """Rows in the running batch after each of the latest admissions (1: alone)."""
        return list(self._batcher.batch_sizes) if self._batcher else []

    @property
    def capabilities(self) -> Capabilities:
        # max_batch_size: generations the service lets in at once; they decode as rows of one batch (see batching.py)
        return Capabilities(inspection=True, max_batch_size=self._settings.max_batch_size,
                            adapter_switch=self.adapter_unmerged, scoring=True, logprobs=True)

    def continuation_logits(self, prompt_ids: Sequence[int], continuation: Sequence[int], use_adapter: bool = True):
        """One forward pass over prompt and continuation on the batch's thread (between two steps);
        only the rows that predict the continuation are kept."""
        import torch

        ids = list(prompt_ids) + list(continuation)
        keep = len(continuation) + 1  # from the prompt's last token; the last row predicts past the text

        def forward():
            self._switch_adapter(use_adapter)  # refuses a merged adapter before any work
            with torch.inference_mode():
                out = self._model(input_ids=torch.tensor([ids], device=self._placement.device), use_cache=False,
                                  logits_to_keep=keep)
            return out.logits[0, :-1].float().cpu().numpy()

        return self._batcher.call(forward)

    def token_bytes(self, token_id: int) -> bytes:
        return self._token_bytes(token_id)

    def _adapt_threads(self) -> None:
        """Fewer torch threads while other processes keep cores busy (core.cpu_share); called
        each step on the batch's thread, between two forward passes."""
        share = self._cpu_share
        if share is not None and share.threads != self._torch_threads:
            import torch

            torch.set_num_threads(share.threads)
            self._torch_threads = share.threads

    def unload(self) -> None:
        share, self._cpu_share = self._cpu_share, None
        if share is not None:
            share.close()
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.close()
        self.clear_cache()
        model, self._model, self._tokenizer = self._model, None, None
        if model is not None:
            device = self._placement.device
            del model
            release_freed_memory()
            if device == "cuda":
                import torch

                torch.cuda.empty_cache()

    # -- facts -----------------------------------------------------------------------------
    @property
    def torch_model(self):
        """The loaded transformers model (None when unloaded): every forward pass of the running
        batch and of scoring is a call of it."""
        return self._model

    @property
    def tokenizer(self):
        """The loaded transformers tokenizer (None when unloaded)."""
        return self._tokenizer

    @property
    def settings(self) -> TransformersSettings:
        """The settings this backend was made with, read as it runs (token_timeout_s at each wait)."""
        return self._settings

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    def info(self) -> BackendInfo:
        placement = self._placement
        facts = {
            "device": DEVICE_NAMES[placement.device] if placement else None,
            "n_ctx": self._n_ctx,
            "n_threads": self._settings.n_threads,
            "dtype": placement.dtype if placement else None,
            "adapter": str(self.spec.adapter) if self.spec.adapter else None,
            "adapter_merged": bool(self.spec.adapter) and self._settings.merge_adapter,
            "prefix_cache": self._prefix_cache,
            "max_batch_size": self._settings.max_batch_size,
        }
        if self._model is not None:
            config = self._model.config
            facts.update(
                {
                    "model_name": self.spec.name or self.spec.path.name,
                    "architecture": (getattr(config, "architectures", None) or [config.model_type])[0],
                    "parameters": self._facts.parameters if self._facts else None,
                    "chat_template": bool(getattr(self._tokenizer, "chat_template", None)),
                    **self._versions,
                }
            )
            if self._adapter_config:
                facts["adapter_rank"] = self._adapter_config.r
        if self._fallback_reason:
            facts["device_fallback"] = self._fallback_reason
        if self._gpu is not None:
            facts["gpu"] = self._gpu
        return BackendInfo(**facts)

    # -- prompts ---------------------------------------------------------------------------
    def render_prompt(self, messages: Sequence[Message]) -> str:
        if not getattr(self._tokenizer, "chat_template", None):
            raise InvalidRequest(
                f"{self.spec.path.name} has no chat template (tokenizer_config.json has no chat_template); "
                f"send a raw prompt to /v1/completions instead",
                field="messages",
            )
        try:
            return self._tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages], tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # jinja raises many kinds; all mean these messages do not fit the template
            raise InvalidRequest(f"the chat template rejected these messages: {exc}", field="messages") from exc

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        encoded = model_inputs(self._tokenizer(text, add_special_tokens=add_special_tokens))
        return list(encoded["input_ids"])

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text, add_special_tokens=False))

    def stop_token_ids(self) -> list[int]:
        """The ids that end an answer, as stream() checks them: the generation config's EOS ids
        (checkpoints/stop_tokens.py), which the running batch stops on too."""
        return sorted(self._eos_ids)

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return self._encode(text, add_special_tokens=add_special)

    @property
    def vocab_size(self) -> int:
        return len(self._tokenizer)  # added tokens included; the embedding may be padded past it

    def detokenize(self, token_ids: Sequence[int]) -> str:
        check_token_ids(token_ids, self.vocab_size)
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def token_pieces(self, token_ids: Sequence[int]) -> list[str]:
        check_token_ids(token_ids, self.vocab_size)
        pieces = self._tokenizer.convert_ids_to_tokens(list(token_ids))
        # tiktoken-based remote-code tokenizers (Hunyuan's) store their tokens as bytes
        return [p if isinstance(p, str) else bytes(p).decode("utf-8", errors="backslashreplace") for p in pieces]

    def chat_template(self) -> Optional[str]:
        template = getattr(self._tokenizer, "chat_template", None)
        if isinstance(template, dict):  # named templates (tool_use, rag, ...): chat uses "default"
            return template.get("default") or next(iter(template.values()), None)
        return template or None

    def prepare(self, messages: Optional[Sequence[Message]] = None, text: Optional[str] = None,
                continue_final: bool = False) -> Prompt:
        if messages is not None:
            text = self.render_prompt(messages)
            if continue_final:
                text = continuation_prompt(text, messages[-1])
            token_ids = self._encode(text, add_special_tokens=False)  # the template wrote its own BOS
        else:
            token_ids = self._encode(text, add_special_tokens=True)
        if not token_ids:
            raise InvalidRequest("the prompt is empty", field="prompt")
        return Prompt(text=text, token_ids=tuple(token_ids))

    # -- generation ------------------------------------------------------------------------
    def stream(self, prompt: Prompt, params: GenerationParams, cancel: threading.Event) -> Iterator[Chunk]:
        assembler = StreamAssembler(len(prompt.token_ids), params.stop)
        budget = min(params.max_new_tokens, self.n_ctx - len(prompt.token_ids))
        row = None
        try:
            if budget > 0:
                self._check_adapter_switch(params.use_adapter)  # refuses a merged adapter before the row waits for the batch
                row = Row(prompt, params, cancel, budget)
                self._batcher.submit(row)
        finally:
            if row is None:
                self._batcher.not_coming()
        if row is None:
            yield assembler.finish("length")
            return
        detokenizer = make_detokenizer(self._tokenizer, prompt.token_ids)
        is_end = (lambda token_id: False) if params.ignore_eos else (lambda token_id: token_id in self._eos_ids)
        last = None
        try:
            for chunk in stream_tokens(assembler, self._arrivals(row, detokenizer), cancel, is_end, budget):
                if chunk.is_last:
                    last = chunk
                    break
                yield chunk
        finally:
            row.halt.set()
            # The last chunk is sent once the row has left the batch (within a step), so a client
            # that stops reading at it finds nothing computed for it any more.
            if not row.left.wait(WORKER_JOIN_S):
                log.error("a row did not leave its batch within %.0f s of being told to", WORKER_JOIN_S)
        yield last

    def _forward(self, input_ids, attention_mask, position_ids, cache, use_adapter: bool):
        """One forward pass of the running batch (on the batch's thread): the logits of each
        row's last position."""
        self._adapt_threads()  # once per step, between forward passes
        self._switch_adapter(use_adapter)  # a batch's rows share it, so no other request sees it switched
        out = self._model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=cache, use_cache=True, logits_to_keep=1)  # in inference mode (running_batch)
        return out.logits[:, -1]

    def _arrivals(self, row: Row, detokenizer) -> Iterator[Arrival]:
        """Token ids and their text as the batch produces them; a failed step, or
        silence past token_timeout_s, ends the stream with an error instead of hanging it."""
        while True:
            try:
                item = row.tokens.queue.get(timeout=self._settings.token_timeout_s)
            except queue.Empty:
                raise GenerationFailed(f"no token for {self._settings.token_timeout_s:g} s; the generation was abandoned") from None
            if item is END:
                return
            if isinstance(item, Failure):
                raise GenerationFailed(self._describe_failure(item.error))
            token_id, logprob = item
            yield token_id, detokenizer.step(token_id), logprob

    # -- prefix cache ------------------------------------------------------------------------
    def _take_prefix_cache(self, token_ids: Sequence[int], adapter_on: bool = True) -> Optional[PrefixCache]:
        """The KV cache of the last generation cut to the prefix it shares with this prompt, or
        None. At least one prompt token is always evaluated, as the first pick needs logits."""
        cache, cached_ids = self._kv_cache, self._kv_ids
        self._kv_cache, self._kv_ids = None, ()  # in use: a failed generation leaves none behind
        self.last_reused_tokens = 0
        if cache is None or not self._prefix_cache or adapter_on != self._kv_adapter_on:
            return None
        shared = min(common_prefix_length(cached_ids, token_ids), len(token_ids) - 1)
        if shared <= 0:
            return None
        excess = cache.get_seq_length() - shared
        if excess > 0:
            cache.crop(-excess)  # transformers 5 takes the number of tokens to drop, as a negative
        self.last_reused_tokens = shared
        return PrefixCache(cache, shared)

    def _keep_prefix_cache(self, cache, sequence: list[int], adapter_on: bool = True) -> None:
        if not self._prefix_cache:
            return
        length = cache.get_seq_length()
        # the last generated token was sampled but never fed back, so the cache ends before it
        self._kv_cache, self._kv_ids, self._kv_adapter_on = cache, tuple(sequence[:length]), adapter_on

    @property
    def adapter_unmerged(self) -> bool:
        """An adapter is loaded and kept apart from the weights, so it can be switched off."""
        return self.spec.adapter is not None and not self._settings.merge_adapter

    def _check_adapter_switch(self, use_adapter: bool) -> None:
        if use_adapter or self.spec.adapter is None or self.adapter_unmerged:
            return
        raise InvalidRequest(f"the adapter {self.spec.adapter.name} is merged into the weights and cannot be "
                             f"switched off; load it unmerged (merge_adapter=false, as compare slots do)", field="slot")

    def _switch_adapter(self, use_adapter: bool) -> None:
        """Turns the unmerged adapter on or off for the next forward passes (on the batch's thread).
        The switch is state on the LoRA layers, not per thread; only that thread runs the model.
        It is flipped only when it changes: peft walks every module to flip it, and doing that
        twice a step (its ``disable_adapter`` context) halved decoding with the adapter off."""
        self._check_adapter_switch(use_adapter)
        if not self.adapter_unmerged or use_adapter == self._adapter_on:
            return
        if use_adapter:
            self._model.base_model.enable_adapter_layers()
        else:
            self._model.base_model.disable_adapter_layers()
        self._adapter_on = use_adapter

    def clear_cache(self) -> None:
        """Forgets the KV cache, so the next request starts cold."""
        self._kv_cache, self._kv_ids = None, ()

    def _describe_failure(self, exc: BaseException) -> str:
        if is_mps_size_error(exc) and self._placement.device == "mps":
            self._move_to_cpu(f"MPS failed on a tensor over 4 GiB ({exc})")
            return f"MPS cannot hold a tensor this generation needs; the model moved to the CPU, send the request again ({exc})"
        return f"{type(exc).__name__}: {exc}"

    def _move_to_cpu(self, reason: str) -> None:
        import torch

        log.warning("%s: %s; moving the model to the CPU", self.spec.path.name, reason)
        self._model.to("cpu", dtype=torch.float32)
        self._placement = Placement("cpu", "fp32", reason)
        self._fallback_reason = f"{reason}; running on the CPU"
        self._gpu = GpuUse(layers_total=self._gpu.layers_total if self._gpu else None, note=self._fallback_reason)
