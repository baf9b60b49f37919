"""JSON log lines: one object per line on stderr, so that log collectors
parse them without patterns."""
from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

LOGGER_NAME = "kube-policy-manager"


def setup(level: str = "INFO") -> logging.Logger:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(
        "{asctime}{levelname}{message}", style="{",
        rename_fields={"asctime": "time", "levelname": "level"},
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter (connection pools, sh's per-command debug lines) is not ours.
    for noisy in ("urllib3", "sh"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return logging.getLogger(LOGGER_NAME)


def get() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)
