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
"""
from __future__ import annotations

import io
import socket

from werkzeug.serving import WSGIRequestHandler

from app.services.core.thread_scope import mark_ends_with_request


class StreamingRequestHandler(WSGIRequestHandler):
    # werkzeug flushes after each write of the application's iterator, and http.server after
    # each request, so nothing waits in this buffer longer than one write.
    wbufsize = io.DEFAULT_BUFFER_SIZE

    def setup(self) -> None:
        super().setup()
        # werkzeug runs each connection on a thread of its own and closes it after one response
        # ("Connection: close"), so this thread ends with its request and may decode itself.
        if self.server.multithread:
            mark_ends_with_request()
        if self.connection.family in (socket.AF_INET, socket.AF_INET6):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
