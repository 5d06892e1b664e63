"""The dataset preview the Train tab shows before a run: plain data, no Gradio.

What kohya_ss users otherwise learn from a log line at step 0 (sd-scripts prints ``bucket N: resolution
(w, h), count: k``), or never: how many images were found, which files were skipped and why, which bucket
each image went to, which buckets hold fewer images than a batch, and what the captions look like.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from modules.training.images.buckets import BucketSpec
from modules.training.images.captions import CAPTION_EXTENSIONS
from modules.training.images.dataset import scan_dataset


@dataclass
class DatasetPreview:
    """Everything about a dataset folder a user checks before training; :meth:`to_dict` for JSON/UI.

    ``buckets``: ``{"width", "height", "count" (images), "samples" (images x repeats), "images" (paths)}``;
    ``skipped`` and ``warnings``: ``{"path", "reason"}``; ``samples``: ``{"path", "caption",
    "caption_source"}``; ``error``: why the folder cannot be trained on (None when it can).
    """
    root: str
    image_count: int = 0
    images_per_epoch: int = 0
    concepts: list[dict] = field(default_factory=list)
    buckets: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def preview_dataset(root: str | Path, *, buckets: BucketSpec | None = None, batch_size: int | None = None,
                    samples: int = 4, caption_extensions: tuple[str, ...] = CAPTION_EXTENSIONS) -> DatasetPreview:
    """Scan ``root`` as training would (same checks, same buckets) and summarise it.

    Args:
        buckets: the run's bucket settings (default: 512, buckets on).
        batch_size: the run's global batch; buckets with fewer samples get a warning (their batches repeat images).
        samples: how many (image, caption) examples to include: one per concept in turn, in dataset order.
    """
    spec = buckets or BucketSpec()
    scan = scan_dataset(root, spec, caption_extensions)
    preview = DatasetPreview(root=str(scan.root), error=scan.error,
                             skipped=[asdict(s) for s in scan.skipped], warnings=[asdict(w) for w in scan.warnings])
    records = scan.records
    preview.image_count = len(records)
    preview.images_per_epoch = sum(r.repeats for r in records)
    for concept in scan.concepts:
        mine = [r for r in records if r.concept == concept]
        preview.concepts.append({"folder": concept.folder, "name": concept.name, "repeats": concept.repeats,
                                 "images": len(mine),
                                 "captioned": sum(1 for r in mine if r.caption_source != "folder name")})
    by_bucket: dict[tuple[int, int], list] = {}
    for record in records:
        by_bucket.setdefault(record.bucket, []).append(record)
    for (width, height), members in sorted(by_bucket.items()):
        count = sum(r.repeats for r in members)
        preview.buckets.append({"width": width, "height": height, "count": len(members), "samples": count,
                                "images": [r.relative for r in members]})
        if batch_size and count < batch_size:
            preview.warnings.append({"path": f"bucket {width}x{height}",
                                     "reason": f"holds {count} samples (images x repeats), fewer than the batch of "
                                               f"{batch_size}: its batch repeats images"})
    preview.samples = [{"path": str(r.path), "caption": r.caption_lines[0], "caption_source": r.caption_source}
                       for r in _spread(records, scan.concepts, samples)]
    return preview


def _spread(records, concepts, count: int) -> list:
    """Up to ``count`` records, taking each concept's next image in turn (so every concept is shown)."""
    queues = [[r for r in records if r.concept == c] for c in concepts]
    picked, depth = [], 0
    while len(picked) < count and any(depth < len(q) for q in queues):
        picked.extend(q[depth] for q in queues if depth < len(q))
        depth += 1
    return picked[:count]
