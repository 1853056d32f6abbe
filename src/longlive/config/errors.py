"""The one exception type raised for bad configuration: it lists every problem found, with file and field."""
from __future__ import annotations

from typing import Iterable


class ConfigError(ValueError):
    """A configuration problem. `issues` holds one line per problem, each naming the file and the field."""

    def __init__(self, issues: str | Iterable[str], source: str | None = None) -> None:
        if isinstance(issues, str):
            issues = [issues]
        self.issues: list[str] = list(issues)
        self.source = source
        if len(self.issues) == 1:
            message = self.issues[0]
        else:
            where = f" in {source}" if source else ""
            message = f"{len(self.issues)} configuration problems{where}:\n" + "\n".join(f"  - {i}" for i in self.issues)
        super().__init__(message)
