"""run.py's request handler sends each chunk of a streamed response in one piece, unhindered by
Nagle's algorithm, and still answers plain requests, errors and dropped clients as werkzeug does."""
from __future__ import annotations

import socket
import threading

import pytest
import requests
from werkzeug.serving import make_server

from app.routes.http.server import StreamingRequestHandler

EVENTS = [f"event: token\ndata: {{\"text\": \"piece {index}\"}}\n\n".encode() for index in range(5)]


@pytest.fixture
def stream_server():
    """A WSGI app that writes one event at a time, each only after the client has read the last."""
    go_on = threading.Event()
    seen = {}

    def app(environ, start_response):
        connection = environ["werkzeug.socket"]
        seen["nodelay"] = connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        if environ["PATH_INFO"] == "/boom":
            raise RuntimeError("the app failed before answering")
        start_response("200 OK", [("Content-Type", "text/event-stream")])

        def events():
            for event in EVENTS:
                yield event
                go_on.wait(10)
                go_on.clear()
        return events()

    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=StreamingRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_port, go_on, seen
    go_on.set()
    server.shutdown()
    thread.join(timeout=10)


def read_headers(sock) -> bytes:
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    return received.split(b"\r\n\r\n", 1)[1]


def test_each_event_arrives_in_one_piece_with_nagle_off(stream_server):
    port, go_on, seen = stream_server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        leftover = read_headers(sock)
        for index, event in enumerate(EVENTS):
            # werkzeug's own handler sent "<size>\r\n", the event and "\r\n" as separate packets
            received = leftover or sock.recv(65536)
            leftover = b""
            assert received == f"{len(event):x}\r\n".encode() + event + b"\r\n", index
            go_on.set()
        assert sock.recv(65536) == b"0\r\n\r\n"
    assert seen["nodelay"] == 1


def test_plain_requests_and_app_errors_are_answered_as_before(stream_server):
    port, go_on, _ = stream_server
    go_on.set()
    with requests.get(f"http://127.0.0.1:{port}/events", stream=True, timeout=10) as response:
        go_on.set()
        assert response.status_code == 200
    assert requests.get(f"http://127.0.0.1:{port}/boom", timeout=10).status_code == 500
