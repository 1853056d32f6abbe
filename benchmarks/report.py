"""Shared by the benchmark scripts: the commit a figure belongs to, and writing the JSON report."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("benchmarks")


def commit() -> str | None:
    """LONGLIVE_COMMIT if set (the benchmark machine has no .git), else `git rev-parse --short HEAD`."""
    from longlive.pipelines.bench import commit as package_commit

    return package_commit()


def emit(report: dict, name: str) -> None:
    """Print the report as JSON and, when $OUT is set (device runs), also write $OUT/<name>."""
    text = json.dumps(report, indent=1)
    sys.stdout.write(text + "\n")
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / name
        path.write_text(text)
        logger.info("wrote %s", path)
