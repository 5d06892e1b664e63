"""The captioned-shapes world shared by Atelier's demo models: the vocabulary and caption grammar
(:mod:`modules.shapes.vocabulary`), used by the chat model's synthetic SFT data and by the image trainer."""
