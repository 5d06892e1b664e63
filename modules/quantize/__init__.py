"""Quantization: GGUF export and import, and torch-native int8 / int4 weights for Atelier's own engine."""
