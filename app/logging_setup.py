"""Logging is configured once, here: the console plus a rotating file under logs/, and where
a crash of the process (a segfault in llama.cpp or torch) reports its Python threads."""
from __future__ import annotations

import faulthandler
import logging
import logging.handlers
import os
import sys

from config.settings import ServerSettings

_HANDLER_MARK = "_model_test_handler"
LOG_FORMAT = "%(asctime)s %(levelname)s [%(threadName)s] %(name)s: %(message)s"


def configure_logging(settings: ServerSettings) -> None:
    root = logging.getLogger()
    root.setLevel(settings.log_level)
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(handler)
        handler.close()
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter(LOG_FORMAT)
    handlers = [
        logging.StreamHandler(),
        logging.handlers.RotatingFileHandler(
            settings.log_dir / "model_test.log",
            maxBytes=settings.log_max_bytes,
            backupCount=settings.log_backups,
            encoding="utf-8",
        ),
    ]
    for handler in handlers:
        setattr(handler, _HANDLER_MARK, True)
        handler.setFormatter(formatter)
        root.addHandler(handler)


def enable_crash_traces() -> None:
    """A crash (SIGSEGV, SIGABRT, ...) prints every thread's Python stack to the real stderr.

    faulthandler writes to a copy of stderr's file descriptor, taken at start-up: while llama.cpp
    loads a model, llama-cpp-python points descriptor 2 at /dev/null (its suppress_stdout_stderr),
    and a crash there, the moment it matters most, would otherwise report into nothing.
    faulthandler keeps the file object alive itself.
    """
    real_stderr = os.fdopen(os.dup(sys.stderr.fileno()), "w")
    faulthandler.enable(file=real_stderr, all_threads=True)
