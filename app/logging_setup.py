"""Logging is configured once, here: the console plus a rotating file under logs/."""
from __future__ import annotations

import logging
import logging.handlers

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
