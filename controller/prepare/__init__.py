"""Stage 1: models (local or ONNX Model Hub) and evaluation data, prepared once per study."""
