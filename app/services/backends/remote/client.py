"""HTTP to the remote OpenAI-compatible server: its model list, and streamed requests.

A worker thread sends a streamed request and reads the SSE lines into a queue; the request's
thread takes them with a short timeout, so Stop and a silent server are noticed even while the
socket waits for bytes (the same shape as the transformers backend's generate worker).
Aborting shuts the socket down, which is how the server learns the client is gone and stops
generating.
"""
from __future__ import annotations

import json
import logging
import queue
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional

from app.services.backends.remote.protocol import StreamFailed, remote_message
from app.services.core.errors import ModelLoadFailed, RemoteUnavailable
from app.services.core.urls import redacted_url, scrubbed
from config.settings import RemoteSettings

log = logging.getLogger(__name__)

POLL_S = 0.1  # how often the request's thread looks at cancel while it waits for the next line
SOCKET_GRACE_S = 5.0  # the worker's socket gives up a little after the request's thread has


@dataclass(frozen=True)
class _Failure:
    message: str


_END = object()


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
        return json.dumps({"error": remote_message(text[6:].strip())})
    return None


class RemoteClient:
    """One OpenAI-compatible server at ``base_url`` (its API root), with the key and timeouts of ``settings``."""

    def __init__(self, base_url: str, settings: RemoteSettings):
        self.base_url = base_url.rstrip("/")
        self.shown_url = redacted_url(self.base_url)  # for messages and logs: never the URL's credentials
        self._settings = settings
        self._session = None

    def open(self) -> None:
        import requests  # deferred like the other backends' libraries

        self._session = requests.Session()

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
        self._session = None

    def headers(self) -> dict:
        headers = {"Accept-Encoding": "identity"}  # a compressed stream would be held back to fill blocks
        if self._settings.api_key is not None:
            headers["Authorization"] = f"Bearer {self._settings.api_key.get_secret_value()}"
        return headers

    def timeouts(self) -> tuple[float, float]:
        return self._settings.connect_timeout_s, self._settings.read_timeout_s

    def models(self) -> dict[str, dict]:
        """The server's ``/models`` entries by id; raises RemoteUnavailable or ModelLoadFailed with the reason."""
        import requests

        url = f"{self.base_url}/models"
        try:
            response = self._session.get(url, headers=self.headers(), timeout=self.timeouts())
        except requests.RequestException as exc:
            raise RemoteUnavailable(self.request_failure(exc), field="base_url") from exc
        with response:
            if response.status_code >= 400:
                message = self.http_failure(response.status_code, response.text)
                if response.status_code == 404 and not self.base_url.endswith("/v1"):
                    message += f"; is {self.shown_url} the server's OpenAI API root? vLLM and llama-server serve it under /v1"
                raise RemoteUnavailable(f"GET {self.shown_url}/models: {message}", field="base_url")
            try:
                listing = response.json()
            except ValueError:
                raise ModelLoadFailed(f"GET {self.shown_url}/models did not answer JSON; is it an OpenAI-compatible server?", field="base_url") from None
        entries = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(entries, list):
            raise ModelLoadFailed(f"GET {self.shown_url}/models answered no model list (no 'data' array); is it an "
                                  f"OpenAI-compatible server?", field="base_url")
        return {entry["id"]: entry for entry in entries if isinstance(entry, dict) and isinstance(entry.get("id"), str)}

    def stream(self, path: str, body: dict) -> "RemoteStream":
        """Starts a streamed POST of ``body`` to ``path`` (under the API root) on a worker thread."""
        stream = RemoteStream(self, f"{self.base_url}{path}", body)
        stream.start()
        return stream

    def request_failure(self, exc: Exception) -> str:
        import requests

        connect_s, read_s = self.timeouts()
        if isinstance(exc, requests.ConnectTimeout):
            return f"could not connect to the remote server at {self.shown_url} within {connect_s:g} s"
        if isinstance(exc, requests.ReadTimeout):
            return f"the remote server sent nothing for {read_s:g} s"
        if isinstance(exc, requests.exceptions.ChunkedEncodingError):
            return f"the remote server broke off the stream: {scrubbed(str(exc), self.base_url)}"
        if isinstance(exc, requests.ConnectionError):
            return (f"could not connect to the remote server at {self.shown_url}: {_connection_reason(exc)} "
                    "(is it running, and is the URL right?)")
        return f"the request to the remote server at {self.shown_url} failed: {scrubbed(str(exc), self.base_url)}"

    def http_failure(self, status: int, body: str) -> str:
        message = remote_message(body)
        if status in (401, 403):
            if self._settings.api_key is None:
                return (f"the remote server wants an API key (HTTP {status}: {message}); "
                        "give it with --remote-api-key (or MODEL_TEST_REMOTE__API_KEY)")
            return f"the remote server refused the API key (HTTP {status}: {message})"
        return f"the remote server answered HTTP {status}: {message}"

    def post_streamed(self, url: str, body: dict):
        connect_s, read_s = self.timeouts()
        return self._session.post(url, json=body, headers=self.headers(), stream=True,
                                  timeout=(connect_s, read_s + SOCKET_GRACE_S))


class RemoteStream:
    """One streamed request: the worker thread that sends it and queues each SSE payload, and the
    request's thread that reads them (``payloads``) and may abort it."""

    def __init__(self, client: RemoteClient, url: str, body: dict):
        self._client = client
        self._url = url
        self._body = body
        self._lines: queue.Queue = queue.Queue()
        self._response = None
        self._aborted = False
        self._lock = threading.Lock()
        self.ended = False  # the server ended the body (with or without [DONE])

    def start(self) -> None:
        threading.Thread(target=self._run, name="remote-stream", daemon=True).start()

    def payloads(self, cancel: threading.Event) -> Iterator[str]:
        """Each ``data:`` payload as it comes, until the body ends (``ended``) or ``cancel`` is set;
        a failure, or silence past read_timeout_s, raises StreamFailed with the words for the user."""
        connect_s, read_s = self._client.timeouts()
        deadline = time.monotonic() + connect_s + read_s
        while not cancel.is_set():
            try:
                item = self._lines.get(timeout=POLL_S)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise StreamFailed(f"the remote server sent nothing for {read_s:g} s") from None
                continue
            deadline = time.monotonic() + read_s
            if isinstance(item, _Failure):
                raise StreamFailed(item.message)
            if item is _END:
                self.ended = True
                return
            yield item

    def abort(self) -> None:
        """Shuts the socket down: the worker's blocked read returns at once and the server sees
        the disconnect (closing the file alone would wait for the server's next bytes)."""
        with self._lock:
            self._aborted = True
            response = self._response
        if response is None:
            return  # still connecting: the worker closes the response as soon as it has one
        sock = _socket_of(response)
        if sock is None:
            return  # the worker closes it after its read returns (closing here would wait for that read)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed by the server or the worker

    def _run(self) -> None:
        """The worker: sends the request and queues each SSE payload, then _END or a _Failure."""
        response = None
        try:
            response = self._client.post_streamed(self._url, self._body)
            with self._lock:
                self._response = response
                aborted = self._aborted
            if aborted:
                return
            if response.status_code >= 400:
                self._lines.put(_Failure(self._client.http_failure(response.status_code, response.text)))
                return
            for payload in _sse_payloads(response):
                self._lines.put(payload)
            self._lines.put(_END)
        except Exception as exc:  # the worker's boundary: every failure reaches the request's thread as words
            if not self._aborted:
                import requests

                if not isinstance(exc, requests.RequestException):
                    log.exception("remote stream from %s failed", redacted_url(self._url))
                self._lines.put(_Failure(self._client.request_failure(exc)))
        finally:
            if response is not None:
                response.close()
