"""gunicorn settings for `make serve`: one process, because the model lives in it, with threads
for concurrent clients (they queue for the model in the service, and streams need a thread each
while they wait). Host and port come from the same settings as run.py (MODEL_TEST_SERVER__*)."""
from config.settings import Settings

_server = Settings().server

bind = f"{_server.host}:{_server.port}"
workers = 1
worker_class = "gthread"
threads = 32
# gthread's main loop keeps heartbeating while request threads generate, so this bounds only a
# worker that is truly stuck, not a long answer.
timeout = 120
graceful_timeout = 10
accesslog = None  # the app logs what matters; one line per token stream is noise


def when_ready(server):
    """gunicorn warns as run.py does when the tester is reachable beyond this machine without a key."""
    warning = _server.exposure_warning()
    if warning:
        server.log.warning(warning)


def post_worker_init(worker):
    """The worker holds the model: a crash in it (llama.cpp, torch) prints every thread's stack to the real stderr."""
    from app.logging_setup import enable_crash_traces

    enable_crash_traces()
