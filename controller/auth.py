"""TEMP (lead): replaced by the misc helper's read_token at merge."""
from __future__ import annotations
from pathlib import Path
from tuneqn.controller.errors import UserError


def read_token(path: Path | None, what: str) -> str | None:
    """A bearer token from a file (None when no file is given)."""
    if path is None:
        return None
    try:
        return Path(path).read_text().strip() or None
    except OSError as exc:
        raise UserError(f"{what}: {path}: {exc.strerror}") from None
