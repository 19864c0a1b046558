"""`proscale validate --data coco-panoptic:/data/coco --split val`: read every sample of a data
set and list what is wrong with it, before a long training run finds out.

Prints the categories, the number of images and segments per class, and one line per bad
file (path, problem, ids). Exit status 1 when any sample fails.
"""
from __future__ import annotations

import argparse
from collections import Counter

from proscale.data.build import build_dataset
from proscale.data.errors import DataError


def validate(spec: str, split: str, limit: int = 0, max_errors: int = 20) -> tuple[int, list[str]]:
    """(number of samples read, error messages) for the first `limit` samples (0 = all)."""
    dataset = build_dataset(spec, split)  # layout and JSON problems surface here
    meta = dataset.metadata
    n = len(dataset) if limit <= 0 else min(limit, len(dataset))
    counts: Counter = Counter()
    errors: list[str] = []
    for i in range(n):
        try:
            sample = dataset[i]
        except DataError as e:
            errors.append(str(e))
            if len(errors) >= max_errors:
                errors.append(f"... stopped after {max_errors} errors")
                break
            continue
        counts.update(sample["labels"].tolist())
    print(f"{spec} [{split}]: {len(dataset)} images, {meta.num_classes} categories "
          f"({len(meta.thing_classes)} things, {len(meta.stuff_classes)} stuff); read {n}")
    for i, c in enumerate(meta.categories):
        print(f"  {i:4d}  id {c.id:5d}  {'thing' if c.isthing else 'stuff'}  {c.name:<24s} "
              f"{counts.get(i, 0)} segments")
    for message in errors:
        print(f"ERROR {message}")
    return n, errors


def _main(args: argparse.Namespace) -> int:
    try:
        _, errors = validate(args.data, args.split, args.limit)
    except DataError as e:
        print(f"ERROR {e}")
        return 1
    print("ok" if not errors else f"{len(errors)} problem(s)")
    return 1 if errors else 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("validate", help="check a data set's files and annotations",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True,
                   help="data spec: coco-panoptic:DIR, coco-instances:DIR, semantic:DIR, synthetic:DIR")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=0, help="read only the first N samples (0 = all)")
    p.set_defaults(func=_main)
