"""Servers for tests: the app served as run.py serves it, and run.py itself in a subprocess."""
from __future__ import annotations

import threading
from dataclasses import dataclass

from werkzeug.serving import make_server

from app.routes.http.server import StreamingRequestHandler
from config.settings import PROJECT_ROOT


@dataclass
class LiveServer:
    app: object
    url: str

    @property
    def service(self):
        return self.app.extensions["model_service"]


def free_port() -> int:
    """A port free on 127.0.0.1 now, for servers the tests start in subprocesses."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_run_py(port: int, args: list[str], env: dict[str, str]):
    """``python run.py --port PORT ARGS`` in a subprocess, returned once it answers /health."""
    import subprocess
    import sys
    import time

    import requests

    process = subprocess.Popen([sys.executable, "run.py", "--port", str(port), *args], cwd=PROJECT_ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, f"run.py exited with {process.returncode}"
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                return process
        except requests.ConnectionError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError("run.py did not answer /health within 60 s")


def serve(app):
    """The app served as run.py serves it (its request handler included) on a free port."""
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=StreamingRequestHandler)
    thread = threading.Thread(target=server.serve_forever, name="live-server", daemon=True)
    thread.start()
    return server, thread
