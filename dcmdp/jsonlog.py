"""Structured logs: one JSON object per line on stderr, as log collectors in a cluster expect.

    log = jsonlog.setup("trainer", worker_id="...")    # fields added to every line
    log.info("step trained", extra={"fields": {"step": 3, "lag": 0}})

gives ``{"ts": "2026-...Z", "level": "info", "role": "trainer", "msg": "step trained", "step": 3, ...}``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


class JsonFormatter(logging.Formatter):
    def __init__(self, static: dict[str, Any]):
        super().__init__()
        self.static = static

    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            **self.static,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(role: str, level: str = "INFO", **static: Any) -> logging.Logger:
    """The ``dcmdp.<role>`` logger writing JSON lines to stderr (idempotent)."""
    log = logging.getLogger(f"dcmdp.{role}")
    log.setLevel(level.upper())
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter({"role": role, **static}))
    log.addHandler(handler)
    return log


def parse(line: str) -> dict[str, Any] | None:
    """One log line back as a dict (None for a line that is not a JSON object)."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None
