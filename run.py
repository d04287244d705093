"""Runs the tester: ``python run.py`` serves the embedded SmolLM2-135M-Instruct at http://127.0.0.1:5000."""
from __future__ import annotations

import logging

from config.cli import parse_settings

log = logging.getLogger("model_test")


def main(argv=None) -> None:
    from app.logging_setup import enable_crash_traces

    enable_crash_traces()  # first: a crash anywhere later, a model load included, reports where it was
    settings = parse_settings(argv)  # every flag comes from config/settings.py (see config/cli.py)
    from app.services.system.hugepages import malloc_asks_for_hugepages, restart_with_hugepages, thp_mode

    if argv is None and settings.server.hugepages:
        restart_with_hugepages()  # the command line is this process's own, so it can start again with it
    from app import create_app
    from app.routes.http.server import StreamingRequestHandler

    app = create_app(settings)
    if settings.server.exposure_warning():
        log.warning("%s", settings.server.exposure_warning())
    log.info("huge pages: malloc %s, kernel THP mode %s",
             "asks for them" if malloc_asks_for_hugepages() else "does not ask", thp_mode() or "absent")
    log.info("serving on http://%s:%d", settings.server.host, settings.server.port)
    app.run(host=settings.server.host, port=settings.server.port, threaded=True, use_reloader=False,
            request_handler=StreamingRequestHandler)


if __name__ == "__main__":
    main()
