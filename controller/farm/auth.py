"""Credentials the controller sends to agents."""

from __future__ import annotations

from pathlib import Path

from tuneqn.controller.common.errors import UserError
from tuneqn.controller.common.files import read_user_file


def read_token(path: Path | str | None, what: str = "token file") -> str | None:
    """The bearer token in the file ``path`` (surrounding whitespace stripped); None when ``path`` is None.

    A missing, unreadable or empty file is bad input: :class:`UserError` naming ``what`` (the flag
    or config key, e.g. ``--token-file`` or ``agents[0].token_file``) and the path.
    """
    if path is None:
        return None
    path = Path(path)
    raw = read_user_file(path, "file", "a file holding the token", what)
    try:
        token = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise UserError(f"{what}: {path} is not a text file") from None
    if not token:
        raise UserError(f"{what}: {path} is empty")
    return token
