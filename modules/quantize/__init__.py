"""Quantization: GGUF import and export, llama.cpp, torch-native quantized weights."""
