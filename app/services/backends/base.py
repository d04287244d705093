"""The one interface every backend implements."""
from __future__ import annotations

import threading
from typing import Iterator, Optional, Protocol, Sequence

from ..errors import InvalidRequest
from ..types import Chunk, GenerationParams, Message, Prompt


class Backend(Protocol):
    name: str  # "llamacpp", "transformers", ...
    model: str  # what the user asked for: a path or a preset name

    def check(self) -> None:
        """Cheap checks of the model path (exists, right format) that run before the current
        model is let go, so a bad path leaves the current model in place."""

    def load(self) -> None:
        """Loads the weights. Raises a ServiceError subclass with a message a user can act on."""

    def unload(self) -> None:
        """Frees the weights; safe to call twice."""

    def info(self) -> dict:
        """Device facts and model facts for the status: device, n_ctx, threads, build, ..."""

    @property
    def n_ctx(self) -> int: ...

    def render_prompt(self, messages: Sequence[Message]) -> str:
        """The exact prompt string the model sees for these messages."""

    def count_tokens(self, text: str) -> int: ...

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

    def chat_template(self) -> Optional[str]:
        """The model's Jinja chat template, or None when it has none."""

    def prepare(self, messages: Optional[Sequence[Message]] = None, text: Optional[str] = None,
                continue_final: bool = False) -> Prompt:
        """Renders (for messages) and tokenises the prompt once, so the service can check it
        against the context before any stream opens. ``continue_final``: the messages end with
        an assistant message the model goes on writing (see ``continuation_prompt``)."""

    def stream(self, prompt: Prompt, params: GenerationParams, cancel: threading.Event) -> Iterator[Chunk]:
        """Yields chunks; the last one has finish_reason, usage and timings. Checks ``cancel``
        between tokens and ends with finish_reason "cancelled" when it is set."""


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


def check_token_ids(token_ids: Sequence[int], vocab_size: int, field: str = "tokens") -> None:
    """Refuses ids outside the vocabulary before a tokenizer sees them: llama.cpp reads past
    its arrays (and may crash the process) where transformers would only raise."""
    for index, token_id in enumerate(token_ids):
        if not 0 <= token_id < vocab_size:
            # named like the pydantic errors of the same body ("tokens.3"), so a client reads one style
            raise InvalidRequest(
                f"{field}.{index} is {token_id}; this model's token ids run from 0 to {vocab_size - 1}",
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
