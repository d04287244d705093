"""``make serve``'s gunicorn worker: gthread, with a request's head read before a thread is given.

gunicorn's gthread worker hands a connection to one of its threads as soon as the first bytes
arrive, and the thread then blocks until the whole head has come. Clients that send half a head
and stall (one per thread is enough) leave no thread for anyone else, and nothing times them
out: gunicorn has no header timeout. This worker reads heads on its main loop instead, without
blocking, alongside the idle keep-alive connections gunicorn already watches there:

- a connection gets a thread only once its head is complete (its blank line has arrived);
- a head not complete within ``server.header_timeout_s`` is dropped, as is one larger than
  ``MAX_HEAD_BYTES``;
- a client (an IP address) holds at most ``server.max_connections_per_client`` connections; one
  more gets a 429 and is closed;
- once a thread has the request, its socket reads and writes time out after
  ``server.io_timeout_s`` of silence (a body that stalls, a reader that stopped reading);
- idle keep-alive connections close after gunicorn's ``keepalive`` (``server.keepalive_s``).

It extends gthread's ``ThreadWorker`` of the pinned gunicorn (requirements.txt). With TLS
terminated by gunicorn itself, or another protocol than HTTP, the head cannot be read on the main
loop; the worker then hands connections over as gthread does (README: terminate TLS in the
reverse proxy, which bounds slow clients too).
"""
from __future__ import annotations

import errno
import selectors
import socket
import time
from collections import Counter
from functools import partial

from gunicorn import http
from gunicorn.workers.gthread import TConn, ThreadWorker

from config.settings import Settings

HEAD_END = b"\r\n\r\n"
MAX_HEAD_BYTES = 64 * 1024  # far past any real request's headers; past it the connection closes
READ_CHUNK = 16 * 1024
TOO_MANY = (b"HTTP/1.1 429 Too Many Requests\r\nConnection: close\r\nRetry-After: 5\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 45\r\n\r\ntoo many connections from this client; retry\n")


def client_host(address) -> str:
    """The client's IP address (a UNIX socket's peers count as one client)."""
    return address[0] if isinstance(address, tuple) and address else "local"


class CountedConn(TConn):
    """gthread's connection, which tells the worker when it closes, so its client's count goes down."""

    def __init__(self, worker: "HeadFirstThreadWorker", *args):
        super().__init__(*args)
        self.worker = worker
        self.counted = True

    def close(self, graceful: bool = False) -> None:
        if self.counted:
            self.counted = False
            self.worker.forget(self)
        super().close(graceful)


class HeadFirstThreadWorker(ThreadWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        server = Settings().server
        self.header_timeout_s = server.header_timeout_s
        self.io_timeout_s = server.io_timeout_s
        self.max_per_client = server.max_connections_per_client
        # both touched on the main loop only
        self.heads: dict[CountedConn, tuple[float, bytearray]] = {}  # connection -> (deadline, the head so far)
        self.per_client: Counter[str] = Counter()  # open connections per client host

    def reads_heads(self) -> bool:
        return not self.cfg.is_ssl and getattr(self.cfg, "protocol", "http") == "http"

    # -- connections in and out --------------------------------------------------------------
    def accept(self, listener) -> None:
        try:
            client_sock, client_addr = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        host = client_host(client_addr)
        if self.max_per_client and self.per_client[host] >= self.max_per_client:
            refuse(client_sock)
            return
        self.nr_conns += 1
        self.per_client[host] += 1
        client_sock.setblocking(True)
        self.enqueue_req(CountedConn(self, self.cfg, client_sock, client_addr, listener.getsockname()))

    def forget(self, conn: CountedConn) -> None:
        host = client_host(conn.client)
        self.per_client[host] -= 1
        if self.per_client[host] <= 0:
            del self.per_client[host]

    # -- heads, read on the main loop --------------------------------------------------------
    def enqueue_req(self, conn) -> None:
        """Every way to a thread (a new connection, a kept-alive one that became readable, bytes
        read ahead behind a request) comes here; the thread is given once the head is complete."""
        if not self.reads_heads():
            super().enqueue_req(conn)
            return
        buffered = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        if HEAD_END in buffered:
            conn.parser.unreader.unread(buffered)
            super().enqueue_req(conn)
            return
        conn.sock.setblocking(False)
        self.heads[conn] = (time.monotonic() + self.header_timeout_s, bytearray(buffered))
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_head_bytes, conn))

    def on_head_bytes(self, conn, _sock) -> None:
        _, head = self.heads[conn]
        try:
            data = conn.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data or len(head) + len(data) > MAX_HEAD_BYTES:
            self.drop_head(conn)
            return
        head.extend(data)
        if HEAD_END not in head:
            return
        del self.heads[conn]
        self.poller.unregister(conn.sock)
        if conn.parser is None:
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
        conn.parser.unreader.unread(bytes(head))
        conn.data_ready = True
        super().enqueue_req(conn)

    def drop_head(self, conn) -> None:
        del self.heads[conn]
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        """gthread's sweep of connections that never sent a byte, then the heads whose time is up
        (the main loop runs it at least once a second)."""
        super().murder_pending()
        now = time.monotonic()
        for conn in [conn for conn, (deadline, _) in self.heads.items() if deadline <= now]:
            self.drop_head(conn)

    def on_client_socket_readable(self, conn, client) -> None:
        """A kept-alive connection's next request: its head is read on the main loop too."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self.enqueue_req(conn)

    # -- the request, on its thread ----------------------------------------------------------
    def handle_request(self, req, conn):
        conn.sock.settimeout(self.io_timeout_s)  # the body and the answer: silence past it ends the request
        try:
            return super().handle_request(req, conn)
        except TimeoutError:
            self.log.info("closed a connection silent for %g s (server.io_timeout_s)", self.io_timeout_s)
            return False


def refuse(sock: socket.socket) -> None:
    """A 429 sent without waiting (best effort), then the connection closed."""
    try:
        sock.setblocking(False)
        sock.send(TOO_MANY)
    except OSError:
        pass
    finally:
        sock.close()
