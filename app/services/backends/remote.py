"""Models served by another OpenAI-compatible server: vLLM (tensor-parallel or multi-node, for
a 70B fine-tune), llama-server, TGI, Ollama, llama-cpp-python's server.

The server applies its own chat template and tokenizer, so ``prepare`` keeps the messages (or the
raw text, for ``/v1/completions``) and the prompt's token ids stay empty: the server checks the
prompt against its context and its 400 is relayed. Usage comes from the server
(``stream_options.include_usage``, which vLLM, llama-server, TGI and Ollama honour). A server that
sends none (llama-cpp-python's) gets the deltas counted here as completion tokens, which is exact
for servers that stream one token per delta, and 0 prompt tokens.

A worker thread sends the request and reads the SSE lines into a queue; the request's thread
takes them with a short timeout, so Stop and a silent server are noticed even while the socket
waits for bytes (the same shape as the transformers backend's generate worker). Cancelling shuts
the socket down, which is how the server learns the client is gone and stops generating.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import queue
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence
from urllib.parse import urlsplit

from app.services.backends.base import Capabilities
from app.services.checkpoints.spec import ModelSpec
from app.services.core.errors import InvalidModel, InvalidRequest, ModelLoadFailed, ModelNotFound, RemoteUnavailable
from app.services.core.text_stream import StreamAssembler
from app.services.core.types import Chunk, GenerationParams, Message, Prompt, TokenCandidate, TokenLogprob, Usage
from app.services.core.urls import redacted_url, scrubbed
from config.settings import RemoteSettings

log = logging.getLogger(__name__)

POLL_S = 0.1  # how often the request's thread looks at cancel while it waits for the next line
SOCKET_GRACE_S = 5.0  # the worker's socket gives up a little after the request's thread has
ERROR_BODY_CHARS = 500  # of a remote error message relayed to the client
UNKNOWN_TOKEN_ID = -1  # token ids stay on the server; one entry per delta keeps the counts
# The context windows servers put in their /models entries: vLLM's max_model_len, and the
# context_length that LM Studio and OpenRouter-style servers use.
N_CTX_KEYS = ("max_model_len", "context_length", "context_window")
# llama-server and OpenAI end with "stop" or "length"; TGI says "eos_token" and "stop_sequence".
LENGTH_REASONS = {"length", "max_tokens", "model_length"}


@dataclass(frozen=True)
class _Failure:
    message: str


_END = object()


class _Exchange:
    """The request the worker thread runs, shared with the request's thread, which may abort it."""

    def __init__(self):
        self.response = None
        self.aborted = False
        self.lock = threading.Lock()

    def abort(self) -> None:
        """Shuts the socket down: the worker's blocked read returns at once and the server sees
        the disconnect (closing the file alone would wait for the server's next bytes)."""
        with self.lock:
            self.aborted = True
            response = self.response
        if response is None:
            return  # still connecting: the worker closes the response as soon as it has one
        sock = _socket_of(response)
        if sock is None:
            return  # the worker closes it after its read returns (closing here would wait for that read)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed by the server or the worker


def _socket_of(response) -> Optional[socket.socket]:
    """The socket under a streamed requests response. A keep-alive connection holds it; for a
    response that ends at the close (HTTP/1.0), http.client has dropped the connection's reference
    and only the response's file still reaches it."""
    sock = getattr(getattr(response.raw, "connection", None), "sock", None)
    if sock is None:
        reader = getattr(getattr(response.raw, "_fp", None), "fp", None)
        sock = getattr(getattr(reader, "raw", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _connection_reason(exc: Exception) -> str:
    """The OS's words ("Connection refused", "Name or service not known") from requests' long message."""
    match = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
    return match.group(1).strip() if match else type(exc).__name__


def _remote_message(body: str) -> str:
    """The message in a remote error body, whichever server's shape it has."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:ERROR_BODY_CHARS] or "(no message)"
    if isinstance(data, dict):
        error = data.get("error", data)  # OpenAI/vLLM/llama-server nest it under "error"; TGI gives a string there
        if isinstance(error, str):
            return error[:ERROR_BODY_CHARS]
        if isinstance(error, dict):
            for key in ("message", "detail", "msg"):
                if isinstance(error.get(key), str):
                    return error[key][:ERROR_BODY_CHARS]
            if "detail" in error:  # FastAPI's validation errors: a list of {loc, msg}
                return json.dumps(error["detail"])[:ERROR_BODY_CHARS]
    return body.strip()[:ERROR_BODY_CHARS]


def _sse_payloads(response) -> Iterator[str]:
    """The ``data:`` payloads of an SSE body as they arrive. OpenAI-compatible servers put one JSON
    document on each ``data:`` line, so each line is an event of its own (no server splits one
    over several lines); comments (``: ping``) and other fields are skipped. llama-server may
    report a failure as an ``error:`` line, which is passed on marked as such."""
    raw = response.raw
    buffer = b""
    while True:
        # read1 returns what has arrived (at least a byte), where read(n) would wait for n bytes
        data = raw.read1(8192, decode_content=True)
        if not data:
            break
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            payload = _payload(line)
            if payload is not None:
                yield payload
    payload = _payload(buffer)
    if payload is not None:
        yield payload


def _payload(line: bytes) -> Optional[str]:
    text = line.rstrip(b"\r").decode("utf-8", "replace")
    if text.startswith("data:"):
        return text[5:].lstrip(" ")
    if text.startswith("error:"):
        return json.dumps({"error": _remote_message(text[6:].strip())})
    return None


def _candidate(token, logprob, piece=None) -> Optional[TokenCandidate]:
    if not isinstance(token, str) or not isinstance(logprob, (int, float)) or isinstance(logprob, bool):
        return None
    if isinstance(piece, list) and all(isinstance(b, int) and 0 <= b < 256 for b in piece):
        raw = bytes(piece)
    else:
        raw = token.encode("utf-8")
    return TokenCandidate(UNKNOWN_TOKEN_ID, raw, float(logprob))


def remote_logprobs(data, chat: bool) -> list[TokenLogprob]:
    """The server's log-probabilities for one stream event, as it sent them (OpenAI's chat shape,
    or the legacy completions lists); token ids are the server's to know. Anything malformed is
    left out rather than guessed."""
    out: list[TokenLogprob] = []
    if not isinstance(data, dict):
        return out
    if chat:
        for entry in data.get("content") or []:
            if not isinstance(entry, dict):
                continue
            chosen = _candidate(entry.get("token"), entry.get("logprob"), entry.get("bytes"))
            if chosen is None:
                continue
            top = [_candidate(t.get("token"), t.get("logprob"), t.get("bytes")) for t in entry.get("top_logprobs") or []
                   if isinstance(t, dict)]
            out.append(TokenLogprob(chosen, tuple(t for t in top if t is not None)))
        return out
    tokens, values, tops = data.get("tokens") or [], data.get("token_logprobs") or [], data.get("top_logprobs") or []
    for index, (token, value) in enumerate(zip(tokens, values)):
        chosen = _candidate(token, value)
        if chosen is None:
            continue
        alternatives = tops[index] if index < len(tops) and isinstance(tops[index], dict) else {}
        top = sorted((c for c in (_candidate(t, v) for t, v in alternatives.items()) if c is not None),
                     key=lambda c: -c.logprob)
        out.append(TokenLogprob(chosen, tuple(top)))
    return out


class RemoteBackend:
    name = "openai"

    def __init__(self, spec: ModelSpec, settings: RemoteSettings):
        self._spec = spec
        self._settings = settings
        self._base_url = (spec.base_url or "").rstrip("/")
        self._shown_url = redacted_url(self._base_url)  # for messages and logs: never the URL's credentials
        self.model = spec.name or ""  # the server's name for it; found by load() when the spec has none
        self._session = None
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

    # -- lifecycle -------------------------------------------------------------------------
    def check(self) -> None:
        url = self._spec.base_url
        if not url:
            raise InvalidModel(
                "the openai backend needs the remote server's URL: --base-url http://host:8000/v1 "
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
                f"not a usable server URL: {redacted_url(url)!r}; give the server's OpenAI API root, e.g. http://gpu-host:8000/v1",
                field="base_url",
            )

    def _headers(self) -> dict:
        headers = {"Accept-Encoding": "identity"}  # a compressed stream would be held back to fill blocks
        if self._settings.api_key is not None:
            headers["Authorization"] = f"Bearer {self._settings.api_key.get_secret_value()}"
        return headers

    def _timeouts(self) -> tuple[float, float]:
        return self._settings.connect_timeout_s, self._settings.read_timeout_s

    def load(self) -> None:
        self.check()
        import requests  # deferred like the other backends' libraries

        self._session = requests.Session()
        url = f"{self._base_url}/models"
        try:
            response = self._session.get(url, headers=self._headers(), timeout=self._timeouts())
        except requests.RequestException as exc:
            raise RemoteUnavailable(self._request_failure(exc), field="base_url") from exc
        with response:
            if response.status_code >= 400:
                message = self._http_failure(response.status_code, response.text)
                if response.status_code == 404 and not self._base_url.endswith("/v1"):
                    message += f"; is {self._shown_url} the server's OpenAI API root? vLLM and llama-server serve it under /v1"
                raise RemoteUnavailable(f"GET {self._shown_url}/models: {message}", field="base_url")
            try:
                listing = response.json()
            except ValueError:
                raise ModelLoadFailed(f"GET {self._shown_url}/models did not answer JSON; is it an OpenAI-compatible server?", field="base_url") from None
        entries = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(entries, list):
            raise ModelLoadFailed(f"GET {self._shown_url}/models answered no model list (no 'data' array); is it an OpenAI-compatible server?",
                                  field="base_url")
        models = {entry["id"]: entry for entry in entries if isinstance(entry, dict) and isinstance(entry.get("id"), str)}
        self._served = list(models)
        served = ", ".join(self._served[:20]) or "none"
        if self._spec.name:
            if self._spec.name not in models:
                raise ModelNotFound(f"the remote server at {self._shown_url} does not serve {self._spec.name!r}; it serves: {served}",
                                    field="model")
        elif len(models) == 1:
            self.model = self._served[0]
        elif not models:
            raise ModelLoadFailed(f"the remote server at {self._shown_url} lists no models", field="model")
        else:
            raise InvalidRequest(
                f"the remote server at {self._shown_url} serves {len(models)} models ({served}); choose one with "
                "--remote-model (or MODEL_TEST_REMOTE__MODEL)",
                field="model",
            )
        self._entry = models[self.model]
        log.info("remote model %s at %s (n_ctx %s)", self.model, self._shown_url, self._n_ctx_known() or "unknown")

    def unload(self) -> None:
        if self._session is not None:
            self._session.close()
        self._session = None

    # -- facts -----------------------------------------------------------------------------
    def _n_ctx_known(self) -> Optional[int]:
        if self._settings.n_ctx:
            return self._settings.n_ctx
        for key in N_CTX_KEYS:
            value = self._entry.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    @property
    def n_ctx(self) -> int:
        # The server enforces its own window; unknown, a window this large leaves any arithmetic
        # on it (the room left for an answer) to the server's own check.
        return self._n_ctx_known() or 1 << 31

    def info(self) -> dict:
        facts = {
            "device": "remote",
            "base_url": self._shown_url,
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
        return facts

    # -- prompts ---------------------------------------------------------------------------
    def chat_template(self) -> Optional[str]:
        return None  # the server holds it and the OpenAI API does not expose it

    def prepare(self, messages: Optional[Sequence[Message]] = None, text: Optional[str] = None,
                continue_final: bool = False) -> Prompt:
        if continue_final:
            # The server applies its own template; OpenAI's API has no way to say "continue".
            raise InvalidRequest("the openai backend cannot continue an answer: the remote server renders the "
                                 "chat itself; send the conversation without continue_final", field="continue_final")
        if messages is not None:
            return Prompt(text="", token_ids=(), messages=tuple(messages))
        if not text:
            raise InvalidRequest("the prompt is empty", field="prompt")
        return Prompt(text=text, token_ids=())

    # -- generation ------------------------------------------------------------------------
    def _body(self, prompt: Prompt, params: GenerationParams) -> dict:
        body: dict = {
            "model": self.model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if prompt.messages is not None:
            body["messages"] = [{"role": m.role, "content": m.content} for m in prompt.messages]
        else:
            body["prompt"] = prompt.text
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)  # the server stops there too; the assembler cuts the text either way
        if params.presence_penalty:
            body["presence_penalty"] = params.presence_penalty
        if params.frequency_penalty:
            body["frequency_penalty"] = params.frequency_penalty
        # Beyond OpenAI's schema, read by the servers this backend is for; each ignores the ones it
        # does not know. OpenAI's frequency_penalty is a different thing from the multiplicative
        # repetition penalty, so that goes under both names it has: repetition_penalty (vLLM, TGI)
        # and repeat_penalty (llama.cpp's servers, over their last 64 tokens). min_p 0 samples as
        # the local backends do (llama.cpp's servers default to 0.05).
        body.update(top_k=params.top_k, min_p=0.0, repetition_penalty=params.repetition_penalty,
                    repeat_penalty=params.repetition_penalty)
        if params.ignore_eos:
            body["ignore_eos"] = True  # vLLM and llama-server
        if params.logprobs is not None:  # passed on; what the server sends back is passed through
            body.update({"logprobs": True, "top_logprobs": params.logprobs} if prompt.messages is not None
                        else {"logprobs": params.logprobs})
        return body

    def _request_failure(self, exc: Exception) -> str:
        import requests

        connect_s, read_s = self._timeouts()
        if isinstance(exc, requests.ConnectTimeout):
            return f"could not connect to the remote server at {self._shown_url} within {connect_s:g} s"
        if isinstance(exc, requests.ReadTimeout):
            return f"the remote server sent nothing for {read_s:g} s"
        if isinstance(exc, requests.exceptions.ChunkedEncodingError):
            return f"the remote server broke off the stream: {scrubbed(str(exc), self._base_url)}"
        if isinstance(exc, requests.ConnectionError):
            return (f"could not connect to the remote server at {self._shown_url}: {_connection_reason(exc)} "
                    "(is it running, and is the URL right?)")
        return f"the request to the remote server at {self._shown_url} failed: {scrubbed(str(exc), self._base_url)}"

    def _http_failure(self, status: int, body: str) -> str:
        message = _remote_message(body)
        if status in (401, 403):
            if self._settings.api_key is None:
                return (f"the remote server wants an API key (HTTP {status}: {message}); "
                        "give it with --remote-api-key (or MODEL_TEST_REMOTE__API_KEY)")
            return f"the remote server refused the API key (HTTP {status}: {message})"
        return f"the remote server answered HTTP {status}: {message}"

    def _run(self, url: str, body: dict, exchange: _Exchange, lines: queue.Queue) -> None:
        """The worker: sends the request and queues each SSE payload, then _END or a _Failure."""
        response = None
        try:
            connect_s, read_s = self._timeouts()
            response = self._session.post(url, json=body, headers=self._headers(), stream=True,
                                          timeout=(connect_s, read_s + SOCKET_GRACE_S))
            with exchange.lock:
                exchange.response = response
                aborted = exchange.aborted
            if aborted:
                return
            if response.status_code >= 400:
                lines.put(_Failure(self._http_failure(response.status_code, response.text)))
                return
            for payload in _sse_payloads(response):
                lines.put(payload)
            lines.put(_END)
        except Exception as exc:  # the worker's boundary: every failure reaches the request's thread as words
            if not exchange.aborted:
                import requests

                if not isinstance(exc, requests.RequestException):
                    log.exception("remote stream from %s failed", redacted_url(url))
                lines.put(_Failure(self._request_failure(exc)))
        finally:
            if response is not None:
                response.close()

    def stream(self, prompt: Prompt, params: GenerationParams, cancel: threading.Event) -> Iterator[Chunk]:
        chat = prompt.messages is not None
        url = f"{self._base_url}/chat/completions" if chat else f"{self._base_url}/completions"
        assembler = StreamAssembler(len(prompt.token_ids), params.stop)
        exchange = _Exchange()
        lines: queue.Queue = queue.Queue()
        worker = threading.Thread(target=self._run, args=(url, self._body(prompt, params), exchange, lines),
                                  name="remote-stream", daemon=True)
        read_s = self._settings.read_timeout_s
        reason, error, usage = None, None, None
        remote_reason = None  # the server's finish_reason
        complete = False  # the server ended the stream itself (so a usage it had, it has sent)
        seen_events = 0
        worker.start()
        try:
            deadline = time.monotonic() + self._settings.connect_timeout_s + read_s
            while True:
                if cancel.is_set():
                    reason = "cancelled"
                    break
                try:
                    item = lines.get(timeout=POLL_S)
                except queue.Empty:
                    if time.monotonic() > deadline:
                        error = f"the remote server sent nothing for {read_s:g} s"
                        break
                    continue
                deadline = time.monotonic() + read_s
                if isinstance(item, _Failure):
                    error = item.message
                    break
                if item is _END:
                    if not seen_events:
                        # llama-cpp-python's server answers a prompt longer than its context this way
                        error = ("the remote server ended the stream without sending anything; its log says why "
                                 "(a prompt longer than its context, for some servers)")
                    elif remote_reason is None:
                        error = "the remote server ended the stream without a finish_reason"
                    complete = True
                    break
                seen_events += 1
                if item == "[DONE]":
                    remote_reason = remote_reason or "stop"
                    complete = True
                    break
                event, problem = self._parse(item, chat)
                if problem:
                    error = problem
                    break
                if isinstance(event.get("usage"), dict):
                    usage = self._usage(event["usage"]) or usage
                choice = event["choices"][0] if event["choices"] else None
                if choice is None:
                    continue  # the usage chunk
                text = choice["delta"].get("content") if chat else choice.get("text")
                if text:
                    chunk = assembler.add_text(UNKNOWN_TOKEN_ID, text)
                    if params.logprobs is not None:
                        chunk.logprobs = remote_logprobs(choice.get("logprobs"), chat)
                    if chunk.text or chunk.logprobs:
                        yield chunk
                    if assembler.stopped_by_string:
                        reason = "stop"
                        break
                if choice.get("finish_reason"):
                    remote_reason = choice["finish_reason"]  # the usage chunk may still follow
            if error:
                reason = "error"
            elif reason is None:
                reason = "length" if remote_reason in LENGTH_REASONS else "stop"
        finally:
            exchange.abort()  # after [DONE] nothing is lost; before it, the server learns we have gone
        if error:
            log.warning("remote generation on %s ended with an error: %s", self._shown_url, error)
        elif complete:
            self._server_sends_usage = usage is not None
        last = assembler.finish(reason, error)
        if usage is not None:
            last.usage = usage
            last.timings = dataclasses.replace(last.timings, completion_tokens=usage.completion_tokens)
        yield last

    @staticmethod
    def _parse(payload: str, chat: bool) -> tuple[dict, Optional[str]]:
        """One stream event, or the problem that makes it unreadable (named for the user)."""
        try:
            event = json.loads(payload)
        except ValueError:
            return {}, f"the remote server sent a stream line that is not JSON: {payload[:200]!r}"
        if not isinstance(event, dict):
            return {}, f"the remote server sent a stream event that is not a JSON object: {payload[:200]!r}"
        if "error" in event or event.get("object") == "error":
            return {}, f"the remote server reported an error mid-stream: {_remote_message(payload)}"
        choices = event.get("choices")
        if choices is None and isinstance(event.get("usage"), dict):
            event["choices"] = []  # a usage-only event without the empty list
            return event, None
        if not isinstance(choices, list):
            return {}, f"the remote server sent a stream event without choices: {payload[:200]!r}"
        if choices:
            choice = choices[0]
            if not isinstance(choice, dict):
                return {}, f"the remote server sent a choice that is not a JSON object: {payload[:200]!r}"
            delta = choice.setdefault("delta", {}) if chat else choice
            if not isinstance(delta, dict):
                return {}, f"the remote server sent a delta that is not a JSON object: {payload[:200]!r}"
            content = delta.get("content") if chat else delta.get("text")
            if content is not None and not isinstance(content, str):
                return {}, f"the remote server sent content that is not text: {payload[:200]!r}"
        return event, None

    @staticmethod
    def _usage(data: dict) -> Optional[Usage]:
        prompt, completion = data.get("prompt_tokens"), data.get("completion_tokens")
        if isinstance(prompt, int) and isinstance(completion, int):
            return Usage(prompt, completion)
        return None
