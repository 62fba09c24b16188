"""One logger for the whole tool. Paddle reconfigures the root logger on import, so ours is
configured explicitly and does not propagate to the root."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

LOGGER_NAME = "padim"
_FORMAT = logging.Formatter("%(asctime)s\t%(message)s", datefmt="%Y-%m-%d %H:%M:%S")


def get_logger(log_file=None, level=logging.INFO) -> logging.Logger:
    """The project logger, writing to stdout and, if given, to ``log_file`` (appended)."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    logger.propagate = False
    if not any(getattr(h, "_padim_stdout", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(_FORMAT)
        handler._padim_stdout = True
        logger.addHandler(handler)
    if log_file is not None:
        log_file = str(Path(log_file).resolve())
        if not any(getattr(h, "baseFilename", None) == log_file for h in logger.handlers):
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(log_file, encoding="utf-8")
            handler.setFormatter(_FORMAT)
            logger.addHandler(handler)
    return logger


def close_file_handlers() -> None:
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        if isinstance(handler, logging.FileHandler):
            handler.close()
            logger.removeHandler(handler)
