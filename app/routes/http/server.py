"""The request handler ``run.py`` serves with: werkzeug's, with each write sent as one packet.

werkzeug writes a chunked response piece by piece to an unbuffered socket: the chunk's size,
CRLF, the data and CRLF are four ``send`` calls, and the client wakes up for each. A token
stream writes one small chunk per token, so on a machine whose cores are all decoding, those
extra system calls and wake-ups come out of the decoder's time (docs/benchmarks.md, "Measurements
behind the code", has what it cost). Buffering the socket file makes werkzeug's
``flush`` after every write the only send; Nagle's algorithm is turned off so that send is not
held back until the client acknowledges the previous token. gunicorn (``make serve``) already
joins a chunk into one send.

It also marks its threads as ending with their request (``services/core/thread_scope.py``), which lets
the llama.cpp backend decode on them without a hand-off per token.

``bounded_handler`` adds what a server facing other clients needs (werkzeug has none of it): a
request's head must arrive within ``server.header_timeout_s`` (a client that sends half of it and
stalls would otherwise hold its thread for ever), its body and answer may not stall past
``server.io_timeout_s``, and a client holds at most ``server.max_connections_per_client``
connections (one more gets a 429).
"""
from __future__ import annotations

import io
import socket
import threading
from collections import Counter
from typing import Optional

from werkzeug.serving import WSGIRequestHandler

from app.services.core.thread_scope import mark_ends_with_request
from config.settings import ServerSettings

TOO_MANY = (b"HTTP/1.1 429 Too Many Requests\r\nConnection: close\r\nRetry-After: 5\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 45\r\n\r\ntoo many connections from this client; retry\n")


class ClientConnections:
    """Open connections per client host, for the per-client cap (the handler's threads share it)."""

    def __init__(self, limit: int):
        self._limit = limit
        self._lock = threading.Lock()
        self._open: Counter[str] = Counter()

    def enter(self, host: str) -> bool:
        with self._lock:
            if self._limit and self._open[host] >= self._limit:
                return False
            self._open[host] += 1
            return True

    def leave(self, host: str) -> None:
        with self._lock:
            self._open[host] -= 1
            if self._open[host] <= 0:
                del self._open[host]


class HeadDeadline:
    """Shuts the reading side of a connection whose request head has not arrived in time: the
    blocked read returns, and the request ends as if the client had gone."""

    def __init__(self, connection: socket.socket, seconds: float):
        self._connection = connection
        self._timer = threading.Timer(seconds, self._give_up)
        self._timer.daemon = True
        self._timer.start()

    def _give_up(self) -> None:
        try:
            self._connection.shutdown(socket.SHUT_RD)
        except OSError:
            pass  # already closed

    def cancel(self) -> None:
        self._timer.cancel()


class StreamingRequestHandler(WSGIRequestHandler):
    # werkzeug flushes after each write of the application's iterator, and http.server after
    # each request, so nothing waits in this buffer longer than one write.
    wbufsize = io.DEFAULT_BUFFER_SIZE

    # set by bounded_handler (run.py); the plain handler (tests' in-process servers) has none
    header_timeout_s: Optional[float] = None
    io_timeout_s: Optional[float] = None
    connections: Optional[ClientConnections] = None
    head_deadline: Optional[HeadDeadline] = None

    def setup(self) -> None:
        super().setup()
        # werkzeug runs each connection on a thread of its own and closes it after one response
        # ("Connection: close"), so this thread ends with its request and may decode itself.
        if self.server.multithread:
            mark_ends_with_request()
        if self.connection.family in (socket.AF_INET, socket.AF_INET6):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self) -> None:
        host = self.client_address[0] if isinstance(self.client_address, tuple) else "local"
        if self.connections is not None and not self.connections.enter(host):
            try:
                self.connection.sendall(TOO_MANY)
            except OSError:
                pass
            return
        try:
            super().handle()
        finally:
            if self.connections is not None:
                self.connections.leave(host)

    def handle_one_request(self) -> None:
        if self.header_timeout_s is not None:
            self.connection.settimeout(self.header_timeout_s)  # each read of the head, and all of them together:
            self.head_deadline = HeadDeadline(self.connection, self.header_timeout_s)
        try:
            super().handle_one_request()
        finally:
            self.head_over()

    def parse_request(self) -> bool:
        parsed = super().parse_request()  # has read the headers
        self.head_over()
        if self.io_timeout_s is not None:
            self.connection.settimeout(self.io_timeout_s)
        return parsed

    def head_over(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None


def bounded_handler(server: ServerSettings) -> type[StreamingRequestHandler]:
    """run.py's handler: StreamingRequestHandler with the server's time limits and per-client cap."""
    return type("BoundedRequestHandler", (StreamingRequestHandler,), {
        "header_timeout_s": server.header_timeout_s, "io_timeout_s": server.io_timeout_s,
        "connections": ClientConnections(server.max_connections_per_client)})
