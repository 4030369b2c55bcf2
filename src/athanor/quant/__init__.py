"""Quantization: GGML block formats, GGUF files, quantized inference and the damage scorecard."""
