"""Models served by another OpenAI-compatible server: vLLM (tensor-parallel or multi-node, for
a 70B fine-tune), llama-server, TGI, Ollama, llama-cpp-python's server.

The server applies its own chat template and tokenizer, so ``prepare`` keeps the messages (or the
raw text, for ``/v1/completions``) and the prompt's token ids stay empty: the server checks the
prompt against its context and its 400 is relayed. Usage comes from the server
(``stream_options.include_usage``, which vLLM, llama-server, TGI and Ollama honour). A server that
sends none (llama-cpp-python's) gets the deltas counted here as completion tokens, which is exact
for servers that stream one token per delta, and 0 prompt tokens.

The HTTP is client.py's (a worker thread per streamed request, aborted on Stop); the mapping
between our types and OpenAI's wire shapes is protocol.py's.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import Iterator, Optional, Sequence
from urllib.parse import urlsplit

from app.services.backends.base import BackendInfo, Capabilities
from app.services.backends.remote.client import RemoteClient
from app.services.backends.remote.protocol import StreamFailed, StreamReading, n_ctx_of, request_body
from app.services.checkpoints.spec import ModelSpec
from app.services.core.errors import InvalidModel, InvalidRequest, ModelLoadFailed, ModelNotFound
from app.services.core.text_stream import StreamAssembler
from app.services.core.types import Chunk, GenerationParams, Message, Prompt
from config.settings import RemoteSettings

log = logging.getLogger(__name__)


class RemoteBackend:
    name = "remote"

    def __init__(self, spec: ModelSpec, settings: RemoteSettings):
        self._spec = spec
        self._settings = settings
        self._client = RemoteClient(spec.base_url or "", settings)
        self.model = spec.name or ""  # the server's name for it; found by load() when the spec has none
        self._entry: dict = {}
        self._served: list[str] = []
        self._server_sends_usage: Optional[bool] = None

    @property
    def capabilities(self) -> Capabilities:
        # the tokenizer and template live on the server; one request at a time here; logprobs passed through
        return Capabilities(logprobs=True)

    @property
    def spec(self) -> ModelSpec:
        """The spec with the model's name on the server, once load() has found it."""
        if not self.model or self.model == self._spec.name:
            return self._spec
        return dataclasses.replace(self._spec, name=self.model, path=Path(self.model))

    @property
    def _base_url(self) -> str:
        return self._client.base_url

    # -- lifecycle -------------------------------------------------------------------------
    def check(self) -> None:
        url = self._spec.base_url
        if not url:
            raise InvalidModel(
                "the remote backend needs the remote server's URL: --base-url http://host:8000/v1 "
                "(or MODEL_TEST_REMOTE__BASE_URL)",
                field="base_url",
            )
        parts = urlsplit(url)
        try:
            _ = parts.port  # raises for a port that is not a number
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise InvalidModel(
                f"not a usable server URL: {url!r}; give the server's OpenAI API root, e.g. http://gpu-host:8000/v1",
                field="base_url",
            )

    def load(self) -> None:
        self.check()
        self._client.open()
        models = self._client.models()
        self._served = list(models)
        self.model = self._choose_model(models)
        self._entry = models[self.model]
        log.info("remote model %s at %s (n_ctx %s)", self.model, self._base_url, self._n_ctx_known() or "unknown")

    def _choose_model(self, models: dict[str, dict]) -> str:
        """The model asked for, if the server serves it; unasked, the server's only one."""
        served = ", ".join(self._served[:20]) or "none"
        if self._spec.name:
            if self._spec.name not in models:
                raise ModelNotFound(f"the remote server at {self._base_url} does not serve {self._spec.name!r}; it serves: {served}",
                                    field="model")
            return self._spec.name
        if len(models) == 1:
            return self._served[0]
        if not models:
            raise ModelLoadFailed(f"the remote server at {self._base_url} lists no models", field="model")
        raise InvalidRequest(
            f"the remote server at {self._base_url} serves {len(models)} models ({served}); choose one with "
            "--remote-model (or MODEL_TEST_REMOTE__MODEL)",
            field="model",
        )

    def unload(self) -> None:
        self._client.close()

    # -- facts -----------------------------------------------------------------------------
    def _n_ctx_known(self) -> Optional[int]:
        return self._settings.n_ctx or n_ctx_of(self._entry)

    @property
    def n_ctx(self) -> int:
        # The server enforces its own window; unknown, a window this large leaves any arithmetic
        # on it (the room left for an answer) to the server's own check.
        return self._n_ctx_known() or 1 << 31

    def info(self) -> BackendInfo:
        facts = {
            "device": "remote",
            "base_url": self._base_url,
            "remote_model": self.model or None,
            "n_ctx": self._n_ctx_known(),
            "api_key": self._settings.api_key is not None,  # whether one is sent, never the key
            "chat_template": "applied by the remote server",
        }
        if self._served:
            facts["served_models"] = self._served
        for key in ("owned_by", "root", "parent"):  # vLLM: a LoRA's parent is its base model
            if isinstance(self._entry.get(key), str):
                facts[key] = self._entry[key]
        if self._server_sends_usage is not None:
            facts["usage"] = "reported by the server" if self._server_sends_usage else (
                "counted here: the server reports no usage when streaming; prompt_tokens is 0"
            )
        return BackendInfo(**facts)

    # -- prompts ---------------------------------------------------------------------------
    def chat_template(self) -> Optional[str]:
        return None  # the server holds it and the OpenAI API does not expose it

    def prepare(self, messages: Optional[Sequence[Message]] = None, text: Optional[str] = None,
                continue_final: bool = False) -> Prompt:
        if continue_final:
            # The server applies its own template; OpenAI's API has no way to say "continue".
            raise InvalidRequest("the remote backend cannot continue an answer: the remote server renders the "
                                 "chat itself; send the conversation without continue_final", field="continue_final")
        if messages is not None:
            return Prompt(text="", token_ids=(), messages=tuple(messages))
        if not text:
            raise InvalidRequest("the prompt is empty", field="prompt")
        return Prompt(text=text, token_ids=())

    # -- generation ------------------------------------------------------------------------
    def stream(self, prompt: Prompt, params: GenerationParams, cancel: threading.Event) -> Iterator[Chunk]:
        chat = prompt.messages is not None
        reading = StreamReading(StreamAssembler(len(prompt.token_ids), params.stop), chat, params.logprobs is not None)
        remote = self._client.stream("/chat/completions" if chat else "/completions", request_body(self.model, prompt, params))
        error = None
        try:
            yield from reading.chunks(remote.payloads(cancel))
        except StreamFailed as failure:
            error = failure.message
        finally:
            remote.abort()  # after [DONE] nothing is lost; before it, the server learns we have gone
        yield self._last_chunk(reading, remote.ended, error)

    def _last_chunk(self, reading: StreamReading, body_ended: bool, error: Optional[str]) -> Chunk:
        """The answer's end: an error, a stop string, a cancel, or the server's own finish_reason."""
        if error is None and body_ended and not reading.done:
            error = reading.problem_at_end_of_body()
        complete = reading.done or body_ended  # the server ended the stream itself (so a usage it had, it has sent)
        if error:
            reason = "error"
            log.warning("remote generation on %s ended with an error: %s", self._base_url, error)
        elif reading.stopped:
            reason = "stop"
        elif not complete:
            reason = "cancelled"
        else:
            reason = reading.finish_reason()
            self._server_sends_usage = reading.usage is not None
        last = reading.assembler.finish(reason, error)
        if reading.usage is not None:
            last.usage = reading.usage
            last.timings = last.timings.recounted(reading.usage.completion_tokens)
        return last
