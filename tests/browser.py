"""Headless Chromium for the report page checks (Debian's ``chromium``; the tests skip without it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

#: Flags for a quiet headless run as root on a machine without a network.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
SKIP_REASON = "no chromium/chromium-browser binary on PATH (apt-get install -y chromium)"


def chromium() -> str | None:
    """The Chromium binary on PATH, or None."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def run_chromium(tmp: Path, window: tuple[int, int], args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium with a fresh profile in ``tmp`` and a ``window``-sized viewport."""
    cmd = [
        str(chromium()),
        *CHROMIUM_FLAGS,
        f"--user-data-dir={tmp / 'profile'}",
        f"--window-size={window[0]},{window[1]}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
