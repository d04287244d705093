"""The one interface every backend implements."""
from __future__ import annotations

import threading
from typing import Iterator, Optional, Protocol, Sequence

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

    def prepare(self, messages: Optional[Sequence[Message]] = None, text: Optional[str] = None) -> Prompt:
        """Renders (for messages) and tokenises the prompt once, so the service can check it
        against the context before any stream opens."""

    def stream(self, prompt: Prompt, params: GenerationParams, cancel: threading.Event) -> Iterator[Chunk]:
        """Yields chunks; the last one has finish_reason, usage and timings. Checks ``cancel``
        between tokens and ends with finish_reason "cancelled" when it is set."""
