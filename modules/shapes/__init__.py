"""The captioned-shapes world shared by Atelier's demo models: the vocabulary and caption grammar
(:mod:`modules.shapes.vocabulary`), used by the chat model's synthetic SFT data and by the image trainer; the
image generator (:mod:`modules.shapes.render`, :mod:`modules.shapes.dataset`) that makes the image model's
training data; and the attribute classifier (:mod:`modules.shapes.classifier`) that measures what the image
model draws."""
