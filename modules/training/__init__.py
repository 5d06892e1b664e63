"""Training: the LLM trainer (``llm/``) and, later, the image trainer, with the pieces they share (config
validation, run directory, checkpoints, metrics). Entry point: ``python -m modules.training <command>``."""
