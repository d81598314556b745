"""Execution backends of the agent.

Backends are imported lazily so that the CLI can validate its arguments without
loading a runtime.
"""

from __future__ import annotations

import importlib
from typing import Any

# backend name -> "module:class"
BACKENDS: dict[str, str] = {
    "ort": "tuneqn.agent.backends.ort:OrtBackend",
}


def create_backend(name: str, **kwargs: Any) -> Any:
    """Instantiate the backend registered under ``name`` (KeyError if unknown)."""
    target = BACKENDS[name]
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**kwargs)
