"""Captions: the caption file beside an image, and the per-sample caption augmentations kohya users set.

Caption files. For ``photo.png`` the caption is ``photo.txt``, else ``photo.caption`` (both present:
``.txt`` wins; sd-scripts reads one extension, ``--caption_extension``, default ``.caption``, while the
kohya_ss GUI writes ``.txt``, so looking for both, ``.txt`` first, reads either kind of folder). Text is
UTF-8 as kohya reads it; a UTF-8 byte-order mark (Windows Notepad) is dropped rather than becoming part of
the first tag, and a UTF-16 file with its byte-order mark is read as UTF-16. Anything else that is not
valid UTF-8 is an error naming the file and the byte: guessing another encoding would train on garbled words
without anyone seeing it, so the dataset skips that image and reports why.

A file with several non-empty lines holds alternative captions: each sample picks one, per seed and epoch
(OneTrainer's multi-caption behaviour; sd-scripts uses only the first line). Empty lines are ignored.

Augmentations (:class:`CaptionOptions`, kohya's names in brackets), applied per sample in this order:

1. ``dropout_rate`` [``caption_dropout_rate``]: the whole caption becomes ``""`` (trains the unconditional
   prediction that classifier-free guidance needs);
2. ``shuffle`` [``shuffle_caption``]: the comma-separated tags after the first ``keep_tokens``
   [``keep_tokens``] are put in random order (the kept ones stay first, in order);
3. ``tag_dropout_rate`` [``caption_tag_dropout_rate``]: each tag after the kept ones is dropped with this
   probability.

Every draw comes from a generator seeded by ``(seed, epoch, slot)``, the sample's place in the training
stream, so a run and its resume see the same captions, and each repeat of an image gets its own draw.
"""
from __future__ import annotations

import codecs
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: caption file suffixes, in order of precedence
CAPTION_EXTENSIONS: tuple[str, ...] = (".txt", ".caption")

# separate streams per kind of draw, so that turning one augmentation on does not change the others
_LINE, _DROPOUT, _SHUFFLE, _TAGS = range(4)


class CaptionFileError(ValueError):
    """A caption file that cannot be read as text; the message names the file and the fix."""


class CaptionOptionsError(ValueError):
    """Bad caption settings; ``problems`` lists each one (a config validator can collect them)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("Invalid caption settings: " + "; ".join(self.problems))


def find_caption_file(image: Path, extensions: tuple[str, ...] = CAPTION_EXTENSIONS) -> Path | None:
    """The caption file for ``image`` (same folder and stem), the first of ``extensions`` that exists."""
    for suffix in extensions:
        candidate = image.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def read_caption_file(path: Path, name: str | None = None) -> tuple[str, ...]:
    """The non-empty lines of a caption file, stripped; ``()`` for a file with no text.

    Raises :class:`CaptionFileError` (naming the file as ``name``, default its path) when it cannot be read
    or its bytes are not UTF-8 (or BOM-marked UTF-16) text.
    """
    name = name or str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CaptionFileError(f"caption {name} cannot be read ({exc.strerror or exc})") from None
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    else:
        encoding = "utf-8-sig"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        bad = data[exc.start:exc.start + 1].hex()
        raise CaptionFileError(f"caption {name} is not UTF-8 text (byte 0x{bad} at position {exc.start}); "
                               "save it as UTF-8 (most editors: Save as / Encoding: UTF-8)") from None
    if "\x00" in text:
        raise CaptionFileError(f"caption {name} holds NUL bytes: it is binary or UTF-16 without a byte-order mark; "
                               "save it as UTF-8 text")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


@dataclass(frozen=True)
class CaptionOptions:
    """Per-sample caption augmentations (see the module docstring); all off by default, as in kohya."""

    dropout_rate: float = 0.0
    shuffle: bool = False
    keep_tokens: int = 0
    tag_dropout_rate: float = 0.0
    #: the tag separator (kohya splits on ",")
    separator: str = ","

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise CaptionOptionsError(problems)

    def problems(self) -> list[str]:
        out = []
        for name in ("dropout_rate", "tag_dropout_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                out.append(f"{name} {value!r} must be a probability from 0 to 1 (kohya users often take 0.05)")
        if isinstance(self.keep_tokens, bool) or not isinstance(self.keep_tokens, int) or self.keep_tokens < 0:
            out.append(f"keep_tokens {self.keep_tokens!r} must be 0 or a positive whole number of leading tags")
        if not isinstance(self.shuffle, bool):
            out.append(f"shuffle {self.shuffle!r} must be true or false")
        if not isinstance(self.separator, str) or not self.separator:
            out.append(f"separator {self.separator!r} must be a non-empty string such as ','")
        return out


def _rng(seed: int, epoch: int, slot: int, kind: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, slot, kind])


def make_caption(lines: tuple[str, ...], options: CaptionOptions, *, seed: int, epoch: int, slot: int) -> str:
    """The caption one sample trains with: one of ``lines``, augmented per ``options``.

    ``(seed, epoch, slot)`` identify the sample (``slot``: its position in the epoch's sample stream);
    the same triple always gives the same caption.
    """
    if not lines:
        return ""
    text = lines[0] if len(lines) == 1 else lines[int(_rng(seed, epoch, slot, _LINE).integers(len(lines)))]
    if options.dropout_rate > 0 and _rng(seed, epoch, slot, _DROPOUT).random() < options.dropout_rate:
        return ""
    if not options.shuffle and options.tag_dropout_rate == 0:
        return text
    tags = [t.strip() for t in text.split(options.separator) if t.strip()]
    kept, rest = tags[:options.keep_tokens], tags[options.keep_tokens:]
    if options.shuffle and len(rest) > 1:
        rest = [rest[i] for i in _rng(seed, epoch, slot, _SHUFFLE).permutation(len(rest))]
    if options.tag_dropout_rate > 0 and rest:
        keep = _rng(seed, epoch, slot, _TAGS).random(len(rest)) >= options.tag_dropout_rate
        rest = [tag for tag, k in zip(rest, keep) if k]
    joiner = options.separator + " " if options.separator.strip() else options.separator
    return joiner.join(kept + rest)
