"""Image upscalers: the PIL ones (None, Lanczos, Nearest) and ESRGAN-family models from ``models/ESRGAN``."""
