"""An image-training dataset folder in kohya's convention: find its images, check them, caption and bucket them.

Layout (what sd-scripts' DreamBooth-style datasets and the kohya_ss GUI's "folder preparation" make)::

    my-dataset/
      10_sks dog/            N_concept: 10 repeats per epoch; "sks dog" captions images without a caption file
        photo1.png
        photo1.txt           the caption of photo1.png (.txt, else .caption; see captions.py)
        photo2.jpg
      3_dog/
        ...

- Every ``N_concept`` folder (N >= 1) is one concept; each of its images appears N times per epoch. The rest
  of the name after the first ``_`` is the fallback caption (``10_sks_dog`` -> ``sks_dog``, as kohya keeps it).
- Folders not named ``N_concept`` are left out with a warning (kohya does the same); hidden folders (such as
  a latent cache, ``.atelier-latents``) are ignored without one. Images are not searched in sub-folders.
- A plain folder of images with no ``N_concept`` folders is one concept with 1 repeat whose fallback caption
  is the folder's own name; a folder that is itself named ``N_concept`` (the user picked the concept folder
  rather than its parent) is read as that concept.
- Images: ``.png .jpg .jpeg .webp .bmp`` (any case). Each one is decoded in full when the folder is scanned:
  a truncated file often has a valid header and fails only when its pixels are read, and finding that at
  step 4,000 of a run is too late. Unreadable, non-image, truncated and tiny (< 8 px a side) files, and
  images whose caption file is not UTF-8, are skipped and reported by name with the reason.
- Sizes are the displayed ones (EXIF orientation applied, as photo viewers show them); transparent images
  are put on white, 16-bit greyscale is scaled to 8 bits.

The order of images is their sorted relative path, so the same folder always gives the same dataset.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from modules.training.images.buckets import BucketSpec, fit_to_bucket, upscale_factor
from modules.training.images.captions import (
    CAPTION_EXTENSIONS,
    CaptionFileError,
    CaptionOptions,
    find_caption_file,
    make_caption,
    read_caption_file,
)

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: image formats users drop into folders that are not read; reported so nobody wonders where they went
UNSUPPORTED_IMAGE_EXTENSIONS: tuple[str, ...] = (".gif", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl")
#: smaller images carry no usable detail (and a 1x1 file is usually a broken download or a tracking pixel)
MIN_IMAGE_SIDE = 8
#: an image enlarged more than this to fill its bucket gets a warning (it will train blurry)
UPSCALE_WARNING = 2.0
CONCEPT_FOLDER = re.compile(r"^(\d+)_(.+)$")
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}


class DatasetError(ValueError):
    """A dataset folder that cannot be trained on; the message names the folder or file and what to do."""


@dataclass(frozen=True)
class Skipped:
    """A file left out of the dataset, and why (``path`` relative to the dataset folder)."""
    path: str
    reason: str


@dataclass(frozen=True)
class Concept:
    """One ``N_concept`` folder (``folder`` relative to the dataset, ``"."`` for a plain folder)."""
    folder: str
    name: str
    repeats: int


@dataclass(frozen=True)
class ImageRecord:
    """One usable image. ``caption_lines`` are its caption file's lines (or the concept name);
    ``caption_source`` is that file's relative path, or ``"folder name"``; ``size`` is (width, height) as
    displayed; ``sha256`` is of the file's bytes (the latent cache's key)."""
    path: Path
    relative: str
    concept: Concept
    caption_lines: tuple[str, ...]
    caption_source: str
    size: tuple[int, int]
    bucket: tuple[int, int]
    sha256: str

    @property
    def repeats(self) -> int:
        return self.concept.repeats


@dataclass(frozen=True)
class Sample:
    """One draw of an image in the training stream: ``slot`` is its position within ``epoch`` (the key of
    its caption augmentation, so repeats of one image get different captions)."""
    index: int
    epoch: int
    slot: int
    seed: int


@dataclass
class ScanResult:
    """What :func:`scan_dataset` found; ``error`` is set (and ``records`` empty) when nothing is usable."""
    root: Path
    records: list[ImageRecord] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[Skipped] = field(default_factory=list)
    concepts: list[Concept] = field(default_factory=list)
    error: str | None = None


@dataclass
class ImageBatch:
    """One batch, all from one bucket: ``pixels`` (B, 3, H, W) in [-1, 1], or ``latents`` from a cache."""
    samples: list[Sample]
    bucket: tuple[int, int]
    captions: list[str]
    paths: list[Path]
    pixels: torch.Tensor | None = None
    latents: torch.Tensor | None = None


# ------------------------------------------------------------------------------------------ scanning
def scan_dataset(root: str | Path, buckets: BucketSpec,
                 caption_extensions: tuple[str, ...] = CAPTION_EXTENSIONS, *,
                 default_caption: str | None = None) -> ScanResult:
    """Find, check, caption and bucket every image of the dataset folder ``root`` (see the module docstring).

    ``default_caption`` captions the images without a caption file in place of their folder's name
    (DreamBooth's instance or class prompt); its ``caption_source`` is ``"default caption"``.

    Never raises for bad content: problems are in ``skipped`` / ``warnings`` and, when no image is usable,
    in ``error`` (the preview shows them; :class:`ImageDataset` raises ``error``).
    """
    root = Path(root).expanduser()
    result = ScanResult(root=root)
    if not root.is_dir():
        result.error = (f"dataset folder {root} does not exist or is not a folder; "
                        f"{_layout_hint(root)}")
        return result
    try:
        entries = sorted(root.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        result.error = f"dataset folder {root} cannot be listed ({exc.strerror or exc}); check its permissions"
        return result
    folders = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    concept_folders = []
    for folder in folders:
        match = CONCEPT_FOLDER.match(folder.name)
        if not match:
            result.warnings.append(Skipped(folder.name + "/", "folder left out: concept folders are named "
                                           "N_concept (N repeats per epoch), e.g. '10_sks dog'"))
        elif int(match.group(1)) < 1:
            result.warnings.append(Skipped(folder.name + "/", "folder left out: its repeat count is 0; "
                                           "name it 1_... or more"))
        else:
            concept_folders.append((folder, Concept(folder.name, match.group(2), int(match.group(1)))))
    top_images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if concept_folders:
        for path in top_images:
            result.skipped.append(Skipped(path.name, "directly in the dataset folder, which has N_concept "
                                          "folders; move it into one of them (e.g. 1_<concept>/)"))
    else:
        match = CONCEPT_FOLDER.match(root.resolve().name)
        concept = (Concept(".", match.group(2), int(match.group(1))) if match and int(match.group(1)) >= 1
                   else Concept(".", root.resolve().name, 1))
        concept_folders = [(root, concept)]
    resolutions = buckets.resolutions()
    for folder, concept in concept_folders:
        found = _scan_concept(root, folder, concept, buckets, resolutions, caption_extensions, result,
                              default_caption)
        if found:
            result.concepts.append(concept)
        elif concept.folder != ".":
            result.warnings.append(Skipped(concept.folder + "/", "concept folder has no usable image"))
    result.records.sort(key=lambda r: r.relative)
    if not result.records:
        result.error = _empty_message(root, result)
    return result


def _scan_concept(root: Path, folder: Path, concept: Concept, buckets: BucketSpec, resolutions,
                  caption_extensions, result: ScanResult, default_caption: str | None = None) -> int:
    found = 0
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file())
    except OSError as exc:
        result.warnings.append(Skipped(concept.folder + "/", f"folder cannot be listed ({exc.strerror or exc})"))
        return 0
    for path in files:
        relative = path.relative_to(root).as_posix()
        suffix = path.suffix.lower()
        if suffix in UNSUPPORTED_IMAGE_EXTENSIONS:
            result.skipped.append(Skipped(relative, f"{suffix} images are not read; convert it to PNG or JPEG"))
            continue
        if suffix not in IMAGE_EXTENSIONS:
            continue
        try:
            sha, size = _inspect_image(path)
            caption_file = find_caption_file(path, caption_extensions)
            caption_name = caption_file.relative_to(root).as_posix() if caption_file else ""
            lines = read_caption_file(caption_file, caption_name) if caption_file else ()
        except _Unusable as exc:
            result.skipped.append(Skipped(relative, str(exc)))
            continue
        except CaptionFileError as exc:
            result.skipped.append(Skipped(relative, str(exc)))
            continue
        if caption_file and lines:
            source = caption_name
        else:
            fallback, source = ((default_caption, "default caption") if default_caption
                                else (concept.name, "folder name"))
            if caption_file:
                result.warnings.append(Skipped(caption_name,
                                               f"caption file is empty; the {source} {fallback!r} is used"))
            lines = (fallback,)
        bucket = buckets.assign(*size, resolutions)
        factor = upscale_factor(size, bucket)
        if factor > UPSCALE_WARNING:
            result.warnings.append(Skipped(relative, f"{size[0]}x{size[1]} is enlarged {factor:.1f}x to fill its "
                                           f"bucket {bucket[0]}x{bucket[1]}; it will train blurry"))
        result.records.append(ImageRecord(path=path, relative=relative, concept=concept, caption_lines=lines,
                                          caption_source=source, size=size, bucket=bucket, sha256=sha))
        found += 1
    return found


class _Unusable(Exception):
    """An image file that cannot be trained on (the message is the reason shown to the user)."""


def _inspect_image(path: Path) -> tuple[str, tuple[int, int]]:
    """``(sha256 of the bytes, displayed (width, height))`` after decoding the whole image once.

    JPEGs are decoded in draft mode (DCT-scaled, several times faster): every byte is still read, so
    truncation is still found. Raises ``_Unusable`` with the reason.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _Unusable(f"cannot be read ({exc.strerror or exc})") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
            if image.format == "JPEG":
                image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            image.load()
    except UnidentifiedImageError:
        raise _Unusable("is not an image Pillow can read (expected PNG, JPEG, WebP or BMP data)") from None
    except Image.DecompressionBombError as exc:
        raise _Unusable(f"has too many pixels to be read safely ({exc}); downscale it") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _Unusable(f"is truncated or damaged ({exc}); re-export or re-download it") from None
    if orientation in _TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    if min(width, height) < MIN_IMAGE_SIDE:
        raise _Unusable(f"is too small ({width}x{height} px); images need at least {MIN_IMAGE_SIDE} px a side")
    return hashlib.sha256(data).hexdigest(), (width, height)


def _layout_hint(root: Path) -> str:
    return (f"put images ({' '.join(IMAGE_EXTENSIONS)}) in folders named N_concept inside it, e.g. "
            f"'{root / '10_sks dog'}' (N = repeats per epoch), each image with an optional caption file of the "
            "same name (.txt or .caption); a plain folder of images also works")


def _empty_message(root: Path, result: ScanResult) -> str:
    message = f"dataset folder {root} has no usable image; {_layout_hint(root)}"
    if result.skipped:
        shown = "; ".join(f"{s.path}: {s.reason}" for s in result.skipped[:5])
        more = f" (and {len(result.skipped) - 5} more)" if len(result.skipped) > 5 else ""
        message += f". Skipped: {shown}{more}"
    ignored = [w.path for w in result.warnings if w.path.endswith("/")]
    if ignored:
        message += f". Folders left out: {', '.join(ignored)}"
    return message


# ---------------------------------------------------------------------------------- loading pixels
def to_rgb(image):
    """An 8-bit RGB copy of any Pillow image: transparency flattened onto white, 16-bit greyscale scaled.

    Why white: ``convert("RGB")`` keeps whatever colour hides under transparent pixels (often black), so a
    cut-out subject would train on a background nobody sees in a viewer.
    """
    from PIL import Image

    if image.mode.startswith("I"):   # I;16 (16-bit PNG) and I (32-bit): scale 0..65535 to 0..255
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257.0).clip(0, 255).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class ImageDataset:
    """A scanned dataset folder, ready to load: bucketed images, their captions and repeats.

    Args:
        root: the dataset folder (see the module docstring for its layout).
        buckets: bucket settings (default: kohya's 512 with buckets on).
        captions: caption augmentations (default: none).
        caption_extensions: caption file suffixes in order of precedence.
        default_caption: the caption of images without a caption file (default: their folder's name).
    Raises :class:`DatasetError` when the folder has no usable image (the message says what to put there).
    """

    def __init__(self, root: str | Path, *, buckets: BucketSpec | None = None, captions: CaptionOptions | None = None,
                 caption_extensions: tuple[str, ...] = CAPTION_EXTENSIONS, default_caption: str | None = None):
        self.bucket_spec = buckets or BucketSpec()
        self.caption_options = captions or CaptionOptions()
        scan = scan_dataset(root, self.bucket_spec, caption_extensions, default_caption=default_caption)
        if scan.error:
            raise DatasetError(scan.error)
        self.root, self.records = scan.root, scan.records
        self.skipped, self.warnings, self.concepts = scan.skipped, scan.warnings, scan.concepts
        members: dict[tuple[int, int], list[int]] = {}
        for index, record in enumerate(self.records):
            members.setdefault(record.bucket, []).append(index)
        #: bucket (width, height) -> indices of its images, buckets in sorted order
        self.buckets: dict[tuple[int, int], list[int]] = dict(sorted(members.items()))

    def __len__(self) -> int:
        return len(self.records)

    @property
    def images_per_epoch(self) -> int:
        """Samples in one epoch: each image times its concept's repeats (kohya's "num train images * repeats")."""
        return sum(r.repeats for r in self.records)

    @property
    def fingerprint(self) -> str:
        """Identifies what decides the sample order (images, repeats, buckets): a resume refuses a different one.

        Image contents and captions are left out on purpose: fixing a caption typo or retouching an image
        and resuming keeps the order (the latent cache re-encodes a changed image by its own key).
        """
        summary = [[r.relative, r.repeats, list(r.bucket)] for r in self.records]
        text = json.dumps({"images": summary, "buckets": self.bucket_spec.describe()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # ------------------------------------------------------------------------------------ loading
    def load_image(self, index: int):
        """Image ``index`` as RGB, resized and center-cropped to its bucket.

        Raises :class:`DatasetError` when the file changed or vanished since the scan (its bucket and cached
        latent would no longer match it).
        """
        from PIL import Image, ImageOps

        record = self.records[index]
        try:
            data = record.path.read_bytes()
        except OSError as exc:
            raise DatasetError(f"{record.path} cannot be read any more ({exc.strerror or exc}); it was there when "
                               "the dataset was scanned. Put it back, or restart the training to rescan") from None
        if hashlib.sha256(data).hexdigest() != record.sha256:
            raise DatasetError(f"{record.path} changed since the dataset was scanned; restart (or resume) the "
                               "training so that the dataset is scanned again")
        with Image.open(io.BytesIO(data)) as image:
            image = ImageOps.exif_transpose(image)
            return fit_to_bucket(to_rgb(image), record.bucket)

    def pixels(self, indices: list[int]) -> torch.Tensor:
        """``(len(indices), 3, H, W)`` float32 in [-1, 1] (SD's VAE input); the images must share a bucket."""
        import torch

        self._one_bucket(indices)
        arrays = [np.asarray(self.load_image(i), dtype=np.uint8) for i in indices]
        stacked = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)   # (B, H, W, 3) -> (B, 3, H, W)
        return stacked.to(torch.float32).div_(127.5).sub_(1.0)

    def caption(self, sample: Sample) -> str:
        """The caption ``sample`` trains with (per seed, epoch and slot; see captions.py)."""
        return make_caption(self.records[sample.index].caption_lines, self.caption_options,
                            seed=sample.seed, epoch=sample.epoch, slot=sample.slot)

    def batch(self, samples: list[Sample], cache=None) -> ImageBatch:
        """The batch of ``samples`` (one bucket): captions, and pixels, or latents when ``cache`` is given
        (a :class:`~modules.training.images.latent_cache.LatentCache`)."""
        indices = [s.index for s in samples]
        bucket = self._one_bucket(indices)
        out = ImageBatch(samples=list(samples), bucket=bucket, captions=[self.caption(s) for s in samples],
                         paths=[self.records[i].path for i in indices])
        if cache is None:
            out.pixels = self.pixels(indices)
        else:
            out.latents = cache.latents(self, indices)
        return out

    def _one_bucket(self, indices: list[int]) -> tuple[int, int]:
        if not indices:
            raise ValueError("a batch needs at least one image index")
        buckets = {self.records[i].bucket for i in indices}
        if len(buckets) != 1:
            raise ValueError(f"a batch must come from one bucket; indices {indices} span {sorted(buckets)}")
        return buckets.pop()
