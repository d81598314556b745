"""tuneqn: selective quantization tuning for ONNX models across real devices.

The package is assembled from the repository's folders: ``tuneqn.controller``
(``controller/``), ``tuneqn.agent`` (``agent/``) and the versioned gRPC contract
``tuneqn.v1`` (``protos/tuneqn/v1``), which is the only thing the two share.
"""

__version__ = "0.1.0"
