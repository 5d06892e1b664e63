"""eval-shapes-classifier: measure a shapes classifier on freshly generated held-out images.

    python -m modules.training eval-shapes-classifier [--model DIR] [--seed 1] [--n 2000] [--size 64 ...]

Prints the share of images with every attribute right and each attribute's share (see
:func:`~modules.shapes.classifier_training.classifier_accuracy`). ``--model`` defaults to the shipped
``models/shapes-classifier/``; ``--seed`` should not be the one it was trained on (its ``config.json``
says which; 0 for the shipped one).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modules.shapes.classifier import DEFAULT_DIR, ClassifierError, load_classifier
from modules.shapes.classifier_command import format_accuracy
from modules.shapes.classifier_training import classifier_accuracy
from modules.shapes.render import RenderError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=DEFAULT_DIR, help=f"classifier folder (default {DEFAULT_DIR})")
    parser.add_argument("--seed", type=int, default=1, help="generator seed of the held-out images")
    parser.add_argument("--n", type=int, default=2000, help="number of images")
    parser.add_argument("--size", type=int, nargs="+", default=[64], help="image sizes in pixels (multiples of 8)")


def run(args: argparse.Namespace) -> int:
    try:
        classifier = load_classifier(args.model)
        trained_on = classifier.record.get("training", {}).get("seed")
        if trained_on == args.seed:
            raise ClassifierError(f"--seed {args.seed} is the seed {args.model} was trained on; pick another")
        if args.n < 1:
            raise ClassifierError(f"--n must be >= 1, not {args.n}")
        accuracy = [classifier_accuracy(classifier, seed=args.seed, n=args.n, size=size) for size in args.size]
    except (ClassifierError, RenderError) as exc:
        print(f"eval-shapes-classifier: error: {exc}", file=sys.stderr)
        return 2
    print(format_accuracy(accuracy))
    return 0
