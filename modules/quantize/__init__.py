"""Quantized models: GGUF export (and import), llama.cpp's quantizer, torch-native quantized weights.

One file per job; importing the package is cheap and imports neither torch-heavy code nor llama_cpp.
"""
