"""Versions of the tools whose output the study reuses: part of every reuse key; and this machine's cores."""

from __future__ import annotations

import functools
import os


def cpu_cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@functools.cache
def tool_versions() -> dict[str, str]:
    """Versions of tuneqn and of the libraries that determine the bytes of what the study builds.

    tuneqn (its own preprocessing, key and graph code), onnx (checker, version converter, shape
    inference, serialization), onnxruntime (quantizer, calibrator), numpy (calibration statistics,
    ``.npy`` files) and Pillow (image decoding and resizing). A change of any of them makes stored
    data samples, calibrations, analyses and candidates stale.
    """
    import numpy
    import onnx
    import onnxruntime
    import PIL

    from tuneqn import __version__

    return {
        "tuneqn": __version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
    }
