"""A scripted backend for what a real model cannot show on demand: a failure mid-stream,
a slow token. Never used as proof that generation works."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

from app.services.backends.base import BackendInfo, Capabilities, check_token_ids
from app.services.checkpoints.spec import ModelSpec
from app.services.core.errors import InvalidModel
from app.services.core.text_stream import StreamAssembler
from app.services.core.types import Chunk, GenerationParams, Message, Prompt


class FakeBackend:
    name = "fake"
    capabilities = Capabilities(inspection=True)

    def __init__(self, model: str, tokens: Sequence[str] = ("a", "b", "c"), delay_s: float = 0.0,
                 fail_after: Optional[int] = None, fail_load: bool = False, n_ctx: int = 512):
        self.model = model
        self.spec = ModelSpec("llamacpp", Path(model))
        self.tokens = list(tokens)
        self.delay_s = delay_s
        self.fail_after = fail_after
        self.fail_load = fail_load
        self._n_ctx = n_ctx
        self.loaded = False
        self.produced = 0

    def check(self) -> None:
        if self.model.endswith(".bad"):
            raise InvalidModel(f"not a model: {self.model}", field="model")

    def load(self) -> None:
        if self.fail_load:
            raise RuntimeError("simulated loader crash")
        self.loaded = True

    def unload(self) -> None:
        self.loaded = False

    def info(self) -> BackendInfo:
        return BackendInfo(device="fake", n_ctx=self._n_ctx)

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    def render_prompt(self, messages: Sequence[Message]) -> str:
        return "".join(f"<{m.role}>{m.content}" for m in messages)

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    # Inspection: one token per code point, so a round trip is exact and ids are easy to predict.
    @property
    def vocab_size(self) -> int:
        return 0x110000

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return [ord(char) for char in text]

    def detokenize(self, token_ids: Sequence[int]) -> str:
        check_token_ids(token_ids, self.vocab_size)
        return "".join(map(chr, token_ids))

    def token_pieces(self, token_ids: Sequence[int]) -> list[str]:
        check_token_ids(token_ids, self.vocab_size)
        return [chr(token_id) for token_id in token_ids]

    def stop_token_ids(self) -> list[int]:
        return []

    def chat_template(self) -> Optional[str]:
        return "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"

    def prepare(self, messages=None, text=None, continue_final=False, tools=()) -> Prompt:
        text = self.render_prompt(messages) if messages is not None else text
        return Prompt(text=text, token_ids=tuple(range(self.count_tokens(text))))

    def stream(self, prompt: Prompt, params: GenerationParams, cancel: threading.Event) -> Iterator[Chunk]:
        assembler = StreamAssembler(len(prompt.token_ids), params.stop)
        reason = "length"
        for index, token in enumerate(self.tokens[: params.max_new_tokens]):
            if cancel.is_set():
                reason = "cancelled"
                break
            if self.fail_after is not None and index >= self.fail_after:
                raise RuntimeError("simulated backend failure")
            time.sleep(self.delay_s)
            self.produced += 1
            yield assembler.add(index, token.encode("utf-8"))
        else:
            reason = "stop"
        yield assembler.finish(reason)


class FakeFactory:
    """A backend factory that records the backends it built, for assertions; ``options`` are the
    FakeBackend keywords of the next one it builds (a test may change them between loads)."""

    def __init__(self, **options):
        self.options = options
        self.built: list[FakeBackend] = []

    def __call__(self, spec, settings) -> FakeBackend:
        backend = FakeBackend(str(spec.path), **self.options)
        backend.spec = spec
        self.built.append(backend)
        return backend


def fake_factory(**options) -> FakeFactory:
    return FakeFactory(**options)
