"""ONNX export of a trained checkpoint and a NumPy + ONNX Runtime sampling runtime (never torch)."""
