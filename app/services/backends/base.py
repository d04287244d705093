"""The one interface every backend implements, and the capabilities each declares."""
from __future__ import annotations

import inspect
import threading
from typing import TYPE_CHECKING, Hashable, Iterator, Literal, Optional, Protocol, Sequence, TypeGuard, TypeVar, Union

from pydantic import Field, model_serializer

from app.services.checkpoints.spec import ModelSpec

if TYPE_CHECKING:
    import numpy as np

    from app.services.backends.constraints import CompiledConstraint
from app.services.core.constraints import OutputConstraint
from app.services.core.errors import BackendIncomplete, InvalidRequest
from app.services.core.shapes import Shape
from app.services.core.types import Chunk, GenerationParams, GpuUse, Message, Prompt, ToolFunction


class Capabilities(Shape):
    """What a backend can do besides load, prepare and stream. Declared, as simonw/llm's models
    declare ``can_stream``: the service and the page read these instead of probing for methods;
    :func:`batching`, :func:`local_tokenizer`, :func:`scoring` and :func:`constraining` check that a
    backend that declares one also has its methods."""

    inspection: bool = Field(False, description="A local tokenizer and chat template (the LocalTokenizer methods): "
                             "/api/tokenize, /api/detokenize, /api/apply_template.")
    max_batch_size: int = Field(1, description="Concurrent generations run together as rows of one batch (1: one at a "
                                "time); above 1, the Batching methods.")
    adapter_switch: bool = Field(False, description="A request can run the model without its adapter (an unmerged LoRA).")
    scoring: bool = Field(False, description="The logits of a given text (teacher forcing, the Scoring methods): "
                          "/api/score, reference likelihoods in evals, divergence.")
    logprobs: bool = Field(False, description="Token log-probabilities of an answer are reported (the remote backend "
                           "passes on what its server sends).")
    tools: bool = Field(False, description="Tools offered in a request are rendered by the chat template, and the "
                        "answer is read for calls in the syntax the template teaches.")
    constrained_decoding: bool = Field(False, description="GenerationParams.constraint (response_format, grammar, an eval "
                                       "row's schema) is enforced token by token: the Constraining methods.")
    prefix_scoring: bool = Field(False, description="Scoring after a text that shares a prefix with the last one scored "
                                 "reads that prefix from the KV cache and computes what it would compute cold, bit for "
                                 "bit (llama.cpp's prefix cache): echo's choices of one question share their context.")


class BackendInfo(Shape):
    """A backend's facts for the status: each backend reports the ones it has, and only those are
    sent (a llama.cpp model has no dtype, a remote one no threads)."""

    device: Optional[str] = Field(None, description="CPU, CUDA, Metal, MPS, or remote.")
    n_ctx: Optional[int] = Field(None, description="The context, in tokens (a remote model's when its server says).")
    n_threads: Optional[int] = None
    model_name: Optional[str] = None
    architecture: Optional[str] = None
    chat_template: Union[bool, str, None] = Field(None, description="Whether the model has one (a remote server applies its own).")
    prefix_cache: Optional[bool] = Field(None, description="A conversation's earlier turns are not computed again.")
    adapter: Optional[str] = None
    gpu: Optional[GpuUse] = Field(None, description="The GPU the loaded model uses, or why it uses none.")
    # llama.cpp
    n_gpu_layers: Optional[int] = None
    parallel: Optional[int] = Field(None, description="llama.cpp: sequences decoded together.")
    n_ctx_train: Optional[int] = None
    llama_cpp_python: Optional[str] = None
    build: Optional[str] = Field(None, description="llama.cpp's system info: the instruction sets and GPU back ends it was built with.")
    weights: Optional[str] = Field(None, description="llama.cpp: a mapped file, or in memory.")
    gpu_fallback: Optional[str] = Field(None, description="Why a GPU start fell back to the CPU.")
    lora_scale: Optional[float] = None
    constraint_vocabulary: Optional[Literal["built", "not built"]] = Field(
        None, description="Whether the constraint engine's view of the vocabulary is built (on the first constrained "
        "request; it costs memory).")
    # transformers
    dtype: Optional[str] = None
    adapter_merged: Optional[bool] = None
    adapter_rank: Optional[int] = None
    max_batch_size: Optional[int] = None
    parameters: Optional[int] = None
    torch: Optional[str] = None
    transformers: Optional[str] = None
    device_fallback: Optional[str] = Field(None, description="Why the device asked for could not be used.")
    # a remote OpenAI-compatible server
    base_url: Optional[str] = None
    remote_model: Optional[str] = None
    api_key: Optional[bool] = Field(None, description="Whether a key is sent (never the key).")
    served_models: Optional[list[str]] = None
    owned_by: Optional[str] = None
    root: Optional[str] = None
    parent: Optional[str] = Field(None, description="vLLM: a LoRA's base model.")
    usage: Optional[str] = Field(None, description="Whether the server reports token counts when streaming.")

    @model_serializer(mode="wrap")
    def _reported_only(self, handler):
        return {name: value for name, value in handler(self).items() if name in self.model_fields_set}


class Backend(Protocol):
    name: str  # "llamacpp", "transformers", "remote"
    model: str  # what the user asked for: a path or a preset name

    @property
    def spec(self) -> ModelSpec:
        """What this backend serves. The remote backend fills in the model's name on its server
        once load() has found it."""

    @property
    def capabilities(self) -> Capabilities: ...

    def check(self) -> None:
        """Cheap checks of the model path (exists, right format) that run before the current
        model is let go, so a bad path leaves the current model in place."""

    def load(self) -> None:
        """Loads the weights. Raises a ServiceError subclass with a message a user can act on."""

    def unload(self) -> None:
        """Frees the weights; safe to call twice."""

    def info(self) -> BackendInfo:
        """Device facts and model facts for the status: device, n_ctx, threads, build, ..."""

    @property
    def n_ctx(self) -> int: ...

    def chat_template(self) -> Optional[str]:
        """The model's Jinja chat template, or None when it has none here (a remote server keeps its own)."""

    def prepare(self, messages: Optional[Sequence[Message]] = None, text: Optional[str] = None,
                continue_final: bool = False, tools: Sequence[ToolFunction] = ()) -> Prompt:
        """Renders (for messages) and tokenises the prompt once, so the service can check it
        against the context before any stream opens. ``continue_final``: the messages end with
        an assistant message the model goes on writing (see ``continuation_prompt``). ``tools``
        (``capabilities.tools``): rendered by the chat template, whose call syntax the prompt's
        ``tool_format`` names; a template without a tools section is a 400 naming ``tools``."""

    def stream(self, prompt: Prompt, params: GenerationParams, cancel: threading.Event) -> Iterator[Chunk]:
        """Yields chunks; the last one has finish_reason, usage and timings. Checks ``cancel``
        between tokens and ends with finish_reason "cancelled" when it is set."""


class LocalTokenizer(Protocol):
    """The tokenizer and chat template generation uses, for the inspection routes
    (``capabilities.inspection``)."""

    def render_prompt(self, messages: Sequence[Message], tools: Sequence[ToolFunction] = ()) -> str:
        """The exact prompt string the model sees for these messages (and tools)."""

    def count_tokens(self, text: str) -> int: ...

    def stop_token_ids(self) -> list[int]:
        """The ids that end an answer, as generation stops on them, lowest first."""

    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to vocab_size - 1."""

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        """Token ids of ``text``, special tokens written in it (``<|im_start|>``) parsed as such,
        as ``prepare`` does. ``add_special`` adds what the tokenizer adds on its own (a BOS)."""

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """The text of these ids, special tokens included. Raises InvalidRequest naming
        ``tokens`` for an id outside the vocabulary (see ``check_token_ids``)."""

    def token_pieces(self, token_ids: Sequence[int]) -> list[str]:
        """Each id's entry in the vocabulary as the tokenizer stores it (``Ġhello``,
        ``<|im_end|>``), the strings tokenizer.json lists and ``convert_ids_to_tokens`` gives."""


class Scoring(Protocol):
    """Teacher forcing on a text the model did not choose (``capabilities.scoring``): reference
    scoring, and the divergence between two models on the same tokens."""

    def continuation_logits(self, prompt_ids: Sequence[int], continuation: Sequence[int],
                            use_adapter: bool = True) -> "np.ndarray":
        """Raw logits, float32, one row per continuation token: row i is the distribution the model
        gives ``continuation[i]`` after the prompt and ``continuation[:i]``. The caller holds the
        model alone (the service's queue), as for a generation."""

    def continuation_logit_blocks(self, prompt_ids: Sequence[int], continuation: Sequence[int], use_adapter: bool = True,
                                  block_rows: int = 64, cancel: Optional[threading.Event] = None,
                                  cache_scope: Optional[str] = None) -> Iterator["np.ndarray"]:
        """The same rows, at most ``block_rows`` at a time, each block computed when it is asked
        for: a long text is read without its whole distributions in memory. The caller holds the
        model alone while it asks for a block, and may let others run between blocks. ``cancel``
        is looked at within a block too (RequestCancelled), so a long block stops soon after it is set.
        ``cache_scope``: as GenerationParams.cache_scope, for a cache the backend shares between requests."""

    def token_bytes(self, token_id: int) -> bytes:
        """The token's own bytes (a multi-byte character may be split across tokens)."""


class Constraining(Protocol):
    """A backend that enforces output constraints (``capabilities.constrained_decoding``)."""

    def compile_constraint(self, constraint: OutputConstraint) -> "CompiledConstraint":
        """Compiles (or finds in its cache) the constraint for this model's vocabulary, on the
        caller's thread; raises InvalidRequest naming ``constraint.field`` for what the engine
        cannot enforce. The first call builds the engine's view of the vocabulary (seconds)."""


class Batching(Protocol):
    """A backend that runs concurrent generations together (``capabilities.max_batch_size`` > 1)."""

    def batch_group(self, params: GenerationParams) -> Hashable:
        """Requests of the same group may share a batch (the same sampling, the same adapter switch)."""

    def expect_row(self) -> None:
        """A request of this model may run now: a round about to start waits for it."""

    def row_not_coming(self) -> None:
        """A request announced by expect_row will not come after all."""


Capability = TypeVar("Capability")


def implements(backend: object, protocol: type[Capability]) -> TypeGuard[Capability]:
    """Whether ``backend`` has every member of ``protocol``. Looked up statically, as isinstance on
    a runtime-checkable Protocol does from Python 3.12 on: no property of the backend runs (an
    unloaded model's vocab_size would raise)."""
    members = {name for name in (*vars(protocol), *getattr(protocol, "__annotations__", {})) if not name.startswith("_")}
    return all(inspect.getattr_static(backend, name, None) is not None for name in members)


def _declared(backend: "Backend", protocol: type[Capability], declared: bool) -> Optional[Capability]:
    if not declared:
        return None
    if not implements(backend, protocol):
        raise BackendIncomplete(f"the {backend.name} backend declares the {protocol.__name__} capability "
                                f"and lacks its methods")
    return backend


def batching(backend: "Backend") -> Optional[Batching]:
    """The backend's Batching methods when it runs generations as rows of one batch, else None."""
    return _declared(backend, Batching, backend.capabilities.max_batch_size > 1)


def local_tokenizer(backend: "Backend") -> Optional[LocalTokenizer]:
    """The backend's own tokenizer and chat template when it declares inspection, else None."""
    return _declared(backend, LocalTokenizer, backend.capabilities.inspection)


def scoring(backend: "Backend") -> Optional[Scoring]:
    """The backend's teacher forcing when it declares scoring, else None."""
    return _declared(backend, Scoring, backend.capabilities.scoring)


def constraining(backend: "Backend") -> Optional[Constraining]:
    """The backend's constraint compiler when it declares constrained decoding, else None."""
    return _declared(backend, Constraining, backend.capabilities.constrained_decoding)


def continuation_prompt(rendered: str, final: Message) -> str:
    """The rendered conversation cut right after the last assistant message's text, so the model
    continues it instead of closing the turn. This is what transformers' ``continue_final_message``
    does, and it works on any template: whatever the template puts after the content (an
    end-of-turn token, a new generation prompt) is dropped."""
    if final.role != "assistant":
        raise InvalidRequest("continue_final needs the messages to end with an assistant message", field="messages")
    for content in (final.content, final.content.rstrip()):
        at = rendered.rfind(content) if content else -1
        if at >= 0:
            return rendered[: at + len(content)]
    raise InvalidRequest("the chat template rewrites the last assistant message, so it cannot be continued",
                         field="messages")


def first_outside_vocabulary(token_ids: Sequence[int], vocab_size: int) -> Optional[int]:
    """The index of the first id that is no token of a vocabulary of ``vocab_size``, or None."""
    for index, token_id in enumerate(token_ids):
        if not 0 <= token_id < vocab_size:
            return index
    return None


def check_token_ids(token_ids: Sequence[int], vocab_size: int, field: str = "tokens") -> None:
    """Refuses ids outside the vocabulary before a tokenizer sees them: llama.cpp reads past
    its arrays (and may crash the process) where transformers would only raise."""
    index = first_outside_vocabulary(token_ids, vocab_size)
    if index is not None:
        # named like the pydantic errors of the same body ("tokens.3"), so a client reads one style
        raise InvalidRequest(
            f"{field}.{index} is {token_ids[index]}; this model's token ids run from 0 to {vocab_size - 1}",
            field=f"{field}.{index}",
        )


def common_prefix_length(a: Sequence, b: Sequence) -> int:
    """How many leading items two sequences share (token ids, texts)."""
    shared = 0
    for x, y in zip(a, b):
        if x != y:
            break
        shared += 1
    return shared
