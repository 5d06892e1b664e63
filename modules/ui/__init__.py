"""The Gradio layer: thin wiring of components to functions in ``modules``."""
