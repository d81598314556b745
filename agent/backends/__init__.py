"""Execution backends of the agent.

Backends are imported lazily so that the CLI can validate its arguments without
loading a runtime.
"""

from __future__ import annotations

import importlib
from typing import Any

# backend name -> "module:factory"; a factory returns one backend or a list of device lanes
BACKENDS: dict[str, str] = {
    "ort": "tuneqn.agent.backends.ort:OrtBackend",
    "tvm": "tuneqn.agent.backends.tvm:create_lanes",
}

#: The Python module each backend needs besides the agent's own dependencies.
RUNTIME_MODULES: dict[str, str] = {"ort": "onnxruntime", "tvm": "tvm"}


def create_backend(name: str, **kwargs: Any) -> Any:
    """Instantiate the backend registered under ``name`` (KeyError if unknown)."""
    target = BACKENDS[name]
    module_name, _, class_name = target.partition(":")
    factory = getattr(importlib.import_module(module_name), class_name)
    return factory(**kwargs)


def create_backends(name: str, **kwargs: Any) -> list[Any]:
    """The device backends (lanes) of backend ``name``: a list even for one device."""
    made = create_backend(name, **kwargs)
    return list(made) if isinstance(made, list | tuple) else [made]
