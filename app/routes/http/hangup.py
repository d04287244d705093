"""Noticing that a client hung up while its whole (not streamed) answer is being computed.

A stream learns it at its next write (werkzeug and gunicorn raise there, wire.py cancels); a
request answered in one piece writes nothing until the end, so a client that gave up would leave
the model working for nobody (a long /api/chat, a divergence report). Both servers put the
connection's socket in the WSGI environ; a peer that closed it makes it readable with nothing to
read (EOF), which this watcher polls for, a few times a second, and turns into the request's
cancel Event. Under a test client, or a server without a socket there, it watches nothing.
"""
from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
from typing import Iterator, Optional

from flask import request

log = logging.getLogger(__name__)

POLL_S = 0.2
SOCKET_KEYS = ("werkzeug.socket", "gunicorn.socket")


def request_socket() -> Optional[socket.socket]:
    for key in SOCKET_KEYS:
        sock = request.environ.get(key)
        if isinstance(sock, socket.socket):
            return sock
    return None


def peer_closed(sock: socket.socket, wake: int) -> Optional[bool]:
    """True when the peer closed the connection, False when it is open and quiet, None when it
    cannot be told any more (bytes are waiting: a pipelined request; a TLS socket; or ``wake``
    became readable: the answer is done)."""
    try:
        readable, _, _ = select.select([sock, wake], [], [], POLL_S)
        if wake in readable:
            return None
        if not readable:
            return False
        return True if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"" else None
    except (BlockingIOError, InterruptedError):
        return False
    except (ConnectionError, TimeoutError):
        return True
    except (OSError, ValueError):  # closed under us, or an SSL socket (no MSG_PEEK): stop watching
        return None


@contextlib.contextmanager
def cancel_on_hangup(cancel: threading.Event) -> Iterator[None]:
    """Sets ``cancel`` if the client closes its connection before the block ends."""
    sock = request_socket()
    if sock is None or not hasattr(socket, "MSG_DONTWAIT"):
        yield
        return
    wake_read, wake_write = os.pipe()  # ends the watch at once when the answer is ready

    def watch() -> None:
        while not cancel.is_set():
            closed = peer_closed(sock, wake_read)
            if closed is None:
                return
            if closed:
                log.info("the client hung up; cancelling its request")
                cancel.set()
                return

    watcher = threading.Thread(target=watch, name="hangup-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        os.write(wake_write, b"x")
        watcher.join()
        os.close(wake_read)
        os.close(wake_write)
