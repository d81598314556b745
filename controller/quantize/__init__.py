"""Stage 2: ONNX Runtime's quantizer, candidates by graph edits, layer analysis and per-device feasibility."""
