"""Check a data set before training: `proscale validate-data`, `validate_dataset`, and
`SkipBadSamples`, which runs the same checks while training.

    proscale validate-data --data coco-panoptic:/data/coco --split all [--json] [--workers 4]

reads every record and file of the split(s) and lists EVERY problem, one line each, with the
file and the ids (image_id, annotation_id, segment_id, category_id, ...), then counts by kind.
Exit status 1 when any error is found (with --strict: any warning too), 0 otherwise.

    report = validate_dataset("coco-panoptic:/data/coco", "val")
    report.ok, report.errors, report.counts()       # list of Problem(kind, severity, path, ids, message)

The checks are the loaders' own (`check_sample` of each data set, `schema.index_coco` for the
JSON), so severities mean:
  error    the loader refuses that sample (or the whole split): missing / corrupt files, JSON
           schema errors, unknown category ids, PNG segments missing from the JSON and the
           reverse, duplicate ids, size mismatches.
  warning  the loader accepts it, but it is probably a mistake: zero-area masks, degenerate or
           out-of-bounds polygons, bad bboxes, images under 32 px or over 10:1, images without
           annotation.
  note     the loader fixed it silently: grayscale / RGBA / 16-bit / palette images converted
           to RGB, EXIF orientation applied (or not, when the annotation size shows it was
           drawn on the stored pixels), files no record uses.
Every kind is listed with its meaning in `proscale.data.errors.KINDS`.

Training runs the same checks on the fly, because every sample is read through them. To stop
at the first bad sample with its message (the default), or to skip bad samples instead:

    dataset = build_dataset(spec, "train", transforms, defer_errors=True)
    dataset = SkipBadSamples(dataset, skip=cfg.skip_bad_samples)   # before build_dataloader
    loader = build_dataloader(dataset, ...)
    for batch in loader:
        n_skipped += sum(len(s) for s in batch.get("skipped", []))

skip=False re-raises the sample's DataError (a DataLoader worker re-raises it as DataError
too). skip=True logs the problem, loads instead the next index (index + 1, + 2, ... wrapping)
that loads, so the substitute is deterministic, and records it: `.skipped` (in the process
that loaded the sample; with num_workers > 0 that is a worker, so count from the batch) and
sample["skipped"] (a list of {"index", "substitute", "kind", "path", "ids", "message"}, empty
for good samples; `collate` turns it into batch["skipped"]). More than `max_fraction` of the
data set failing raises instead: that is a broken data set, not a few bad files.
`defer_errors=True` makes a bad JSON record fail when its sample is loaded rather than when
the data set is built, so it can be skipped; problems with a whole file still fail at once.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import Dataset

from proscale.data.build import build_dataset, parse_spec
from proscale.data.stats import SegmentStats, segment_stats, size_warnings
from proscale.data.coco_instances import CocoInstancesDataset
from proscale.data.coco_panoptic import CocoPanopticDataset
from proscale.data.errors import ERROR, KINDS, NOTE, WARNING, DataError, Problem
from proscale.data.semantic import IMAGE_EXTENSIONS, SemanticDataset

log = logging.getLogger(__name__)
SPLITS = ("train", "val")
_SEVERITY_ORDER = {ERROR: 0, WARNING: 1, NOTE: 2}


@dataclass
class SplitSummary:
    split: str
    num_samples: int = 0  # samples the data set has (0 when it could not be built)
    num_checked: int = 0
    categories: list = field(default_factory=list)  # Category, contiguous order
    class_counts: Counter = field(default_factory=Counter)  # contiguous index -> segments
    segments: SegmentStats | None = None  # segments per image and their sizes (COCO formats)


@dataclass
class ValidationReport:
    """Every Problem found in a data set, plus what was checked."""

    spec: str
    splits: list[SplitSummary] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def by_severity(self, severity: str) -> list[Problem]:
        return [p for p in self.problems if p.severity == severity]

    @property
    def errors(self) -> list[Problem]:
        return self.by_severity(ERROR)

    @property
    def warnings(self) -> list[Problem]:
        return self.by_severity(WARNING)

    @property
    def notes(self) -> list[Problem]:
        return self.by_severity(NOTE)

    @property
    def ok(self) -> bool:
        """No error (warnings and notes allowed)."""
        return not self.errors

    def counts(self) -> dict[str, int]:
        """Number of problems per kind, errors first, then warnings, then notes."""
        c = Counter(p.kind for p in self.problems)
        sev = {p.kind: p.severity for p in self.problems}
        return dict(sorted(c.items(), key=lambda kv: (_SEVERITY_ORDER.get(sev[kv[0]], 3), kv[0])))

    def kinds(self, severity: str | None = None) -> set[str]:
        return {p.kind for p in self.problems if severity is None or p.severity == severity}

    def to_dict(self) -> dict:
        return {
            "spec": self.spec, "ok": self.ok,
            "splits": {s.split: {"num_samples": s.num_samples, "num_checked": s.num_checked,
                                 "segments_per_image": s.segments.summary() if s.segments else None}
                       for s in self.splits},
            "summary": {sev: len(self.by_severity(sev)) for sev in (ERROR, WARNING, NOTE)},
            "counts": self.counts(),
            "problems": [p.to_dict() for p in self.problems],
        }

    def size_warnings(self, num_queries: int, train_size: int = 0) -> list[str]:
        """Per split, what a model of `num_queries` queries trained at side `train_size` (0: the
        images' own size) cannot fit (proscale.data.stats.size_warnings)."""
        return [f"[{s.split}] {w}" for s in self.splits if s.segments
                for w in size_warnings(s.segments, num_queries, train_size)]

    def format(self, max_per_kind: int = 0, categories: bool = True) -> str:
        """Human-readable report: splits, categories, problems (max_per_kind of each kind,
        0 = all), summary."""
        lines = []
        for s in self.splits:
            lines.append(f"{self.spec} [{s.split}]: {s.num_samples} images, checked {s.num_checked}"
                         + (f", {len(s.categories)} categories" if s.categories else ""))
            if s.segments is not None:
                lines.append(f"  {s.segments.describe()}")
            if categories:
                for i, c in enumerate(s.categories):
                    lines.append(f"  {i:4d}  id {c.id:5d}  {'thing' if c.isthing else 'stuff'}  "
                                 f"{c.name:<24s} {s.class_counts.get(i, 0)} segments")
        shown: Counter = Counter()
        hidden: Counter = Counter()
        for p in sorted(self.problems, key=lambda p: _SEVERITY_ORDER.get(p.severity, 3)):
            if max_per_kind and shown[p.kind] >= max_per_kind:
                hidden[p.kind] += 1
                continue
            shown[p.kind] += 1
            lines.append(f"{p.severity.upper():7s} {p.kind}: {p}")
        for kind, n in hidden.items():
            lines.append(f"        ... {n} more {kind} not shown (--max-per-kind)")
        lines.append(self.summary())
        return "\n".join(lines)

    def summary(self) -> str:
        head = (f"summary: {len(self.errors)} error(s), {len(self.warnings)} warning(s), "
                f"{len(self.notes)} note(s)")
        rows = [f"  {KINDS.get(k, ('?',))[0]:7s} {k:<26s} {n}" for k, n in self.counts().items()]
        return "\n".join([head + ("" if rows else ": ok")] + rows)


# ---------------------------------------------------------------- checking


def _record_labels(dataset: Dataset, index: int, raw: dict | None) -> list[int]:
    """Contiguous classes of the targets of one (good) sample, for the per-class counts."""
    meta = dataset.metadata
    known = meta.dataset_id_to_contiguous
    if isinstance(dataset, CocoPanopticDataset):
        segs = dataset.records[index]["annotation"].get("segments_info", [])
        return [known[s["category_id"]] for s in segs
                if not s.get("iscrowd", 0) and s.get("category_id") in known]
    if isinstance(dataset, CocoInstancesDataset):
        return [known[a["category_id"]] for a in dataset.records[index]["annotations"]
                if not a.get("iscrowd", 0) and a.get("category_id") in known]
    if isinstance(dataset, SemanticDataset) and raw is not None:
        return [int(c) for c in np.unique(raw["sem_seg"]) if c != meta.ignore_label]
    return []


def _check_one(dataset: Dataset, index: int) -> tuple[list[int], list[Problem]]:
    try:
        raw, problems = dataset.check_sample(index)
    except DataError as e:  # check_sample collects; this is a safety net
        return [], e.problems
    labels = [] if any(p.is_error for p in problems) else _record_labels(dataset, index, raw)
    return labels, problems


_WORKER_DATASET = None


def _init_worker(dataset: Dataset) -> None:
    global _WORKER_DATASET
    _WORKER_DATASET = dataset


def _check_in_worker(index: int) -> tuple[list[int], list[Problem]]:
    return _check_one(_WORKER_DATASET, index)


def _unreferenced(folder: str, used: set[str], what: str, extensions=None) -> list[Problem]:
    """Notes for top-level files in `folder` that no record names."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    out = []
    for name in names:
        if name in used or name.startswith(".") or not os.path.isfile(os.path.join(folder, name)):
            continue
        if extensions and not name.lower().endswith(extensions):
            continue
        out.append(Problem.make("unreferenced_file", os.path.join(folder, name),
                                f"{what} that no record uses"))
    return out


def _name(record: dict) -> str | None:
    name = record.get("file_name")
    return name if isinstance(name, str) else None


def _file_problems(dataset: Dataset) -> list[Problem]:
    if isinstance(dataset, CocoPanopticDataset):
        images = {_name(r["image"]) for r in dataset.records}
        pngs = {_name(r["annotation"]) for r in dataset.records}
        return (_unreferenced(dataset.png_dir, pngs, "panoptic PNG", (".png",))
                + _unreferenced(dataset.image_dir, images, "image", IMAGE_EXTENSIONS))
    if isinstance(dataset, CocoInstancesDataset):
        images = {_name(r["image"]) for r in dataset.records}
        return _unreferenced(dataset.image_dir, images, "image", IMAGE_EXTENSIONS)
    if isinstance(dataset, SemanticDataset):
        labels = {os.path.basename(label) for _, label in dataset.files}
        return _unreferenced(dataset.label_dir, labels, "label PNG (no image of that name)",
                             (".png",))
    return []


def _key(p: Problem) -> tuple:
    return p.kind, p.path, tuple(sorted((k, repr(v)) for k, v in p.ids.items())), p.message


def _splits(split: str | list | tuple) -> list[str]:
    if isinstance(split, (list, tuple)):
        return list(split)
    return list(SPLITS) if split == "all" else [split]


def validate_dataset(spec: str, split: str | list[str] = "all", *, limit: int = 0,
                     workers: int = 0, progress: bool = False) -> ValidationReport:
    """Checks split(s) of the data set `spec` ("kind:/path", see build_dataset) and returns
    every problem found. split: "train", "val", "all" (both) or a list.

    limit: check only the first N samples of each split (0 = all); workers: processes
    reading samples in parallel (0 or 1 = this process); progress: a tqdm bar on stderr.
    A malformed spec raises ValueError; everything wrong with the data is in the report.
    """
    parse_spec(spec)  # a usage error, not a data problem
    report = ValidationReport(spec)
    for name in _splits(split):
        summary = SplitSummary(name)
        report.splits.append(summary)
        try:
            dataset = build_dataset(spec, name, defer_errors=True)
        except DataError as e:
            report.problems += e.problems  # the whole split is unusable: all file-level problems
            continue
        summary.num_samples = len(dataset)
        summary.categories = list(dataset.metadata.categories)
        summary.segments = segment_stats(dataset)
        report.problems += getattr(dataset, "problems", [])
        # check_sample repeats a sample's JSON problems, which dataset.problems already lists.
        known = {_key(p) for p in getattr(dataset, "problems", [])}
        n = len(dataset) if limit <= 0 else min(limit, len(dataset))
        if workers > 1 and n > 1:
            ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                              else "spawn")
            pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                       initargs=(dataset,))
            results = pool.map(_check_in_worker, range(n), chunksize=max(1, min(64, n // (4 * workers))))
        else:
            pool = None
            results = (_check_one(dataset, i) for i in range(n))
        if progress:
            try:
                from tqdm import tqdm
                results = tqdm(results, total=n, desc=f"{name}", file=sys.stderr, unit="img")
            except ImportError:
                pass
        try:
            for labels, problems in results:
                summary.class_counts.update(labels)
                summary.num_checked += 1
                report.problems += [p for p in problems if _key(p) not in known]
        finally:
            if pool is not None:
                pool.shutdown()
        report.problems += _file_problems(dataset)
    seen: set = set()  # e.g. a missing root reported by every split
    report.problems = [p for p in report.problems if not (_key(p) in seen or seen.add(_key(p)))]
    return report


def validate(spec: str, split: str, limit: int = 0, max_errors: int = 20) -> tuple[int, list[str]]:
    """(number of samples checked, error messages) for the first `limit` samples (0 = all);
    prints the report. Kept for scripts written against the first `proscale validate`."""
    report = validate_dataset(spec, split, limit=limit)
    print(report.format())
    errors = [str(p) for p in report.errors]
    if len(errors) > max_errors:
        errors = errors[:max_errors] + [f"... stopped after {max_errors} errors"]
    return sum(s.num_checked for s in report.splits), errors


# ---------------------------------------------------------------- training-time hook


class SkipBadSamples(Dataset):
    """Wraps a data set so that a sample raising DataError stops training with its message
    (skip=False) or is replaced by the next index that loads (skip=True); see the module
    docstring for how the engine uses it."""

    def __init__(self, dataset: Dataset, skip: bool = False, max_fraction: float = 0.1,
                 tag_samples: bool = True):
        self.dataset = dataset
        self.skip = skip
        self.max_fraction = max_fraction
        self.tag_samples = tag_samples
        self.metadata = getattr(dataset, "metadata", None)
        self.problems = getattr(dataset, "problems", [])
        self.skipped: list[dict] = []  # in this process
        self._bad: dict[int, DataError] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        n = len(self.dataset)
        if not -n <= index < n:
            raise IndexError(f"sample index {index} out of range for {n} samples")
        index %= n
        events: list[dict] = []
        for k in range(n if self.skip else 1):
            j = (index + k) % n
            if j in self._bad:
                continue
            try:
                sample = self.dataset[j]
            except DataError as e:
                if not self.skip:
                    raise
                self._bad[j] = e
                event = {"index": j, "substitute": None, "kind": e.kind, "path": e.path,
                         "ids": dict(e.ids), "message": str(e)}
                events.append(event)
                log.warning("skipping bad sample %d: %s", j, e)
                if len(self._bad) > max(1.0, self.max_fraction * n):
                    raise DataError(e.path, f"{len(self._bad)} of {n} samples failed to load, more "
                                            f"than max_fraction={self.max_fraction}; the last: "
                                            f"{e.problem}", kind=e.kind, **e.ids) from e
                continue
            for event in events:
                event["substitute"] = j
            self.skipped += events
            if self.skip and self.tag_samples and isinstance(sample, dict):
                sample = dict(sample, skipped=events)
            return sample
        last = next(reversed(self._bad.values()))
        raise DataError(last.path, f"no sample of the {n} loads; the last: {last.problem}",
                        kind=last.kind, **last.ids)


# ---------------------------------------------------------------- command line


def _main(args: argparse.Namespace) -> int:
    try:
        report = validate_dataset(args.data, args.split, limit=args.limit, workers=args.workers,
                                  progress=not args.json and sys.stderr.isatty())
    except ValueError as e:  # a malformed --data spec
        print(f"error: {e}", file=sys.stderr)
        return 2
    queries = args.queries
    if args.preset:
        from proscale.presets import get_preset

        queries = get_preset(args.preset).decoder.num_queries
    fits = report.size_warnings(queries, args.train_size)
    if args.json:
        print(json.dumps({**report.to_dict(), "model_fit": fits}, indent=1))
    else:
        print(report.format(max_per_kind=args.max_per_kind))
        for w in fits:
            print(f"WARNING {w}")
    failed = bool(report.errors) or (args.strict and bool(report.warnings))
    return 1 if failed else 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("validate-data", aliases=["validate"],
                              help="check a data set's files and annotations before training",
                              description=__doc__.split("\n\nThe checks")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True,
                   help="data spec: coco-panoptic:DIR, coco-instances:DIR, semantic:DIR, synthetic:DIR")
    p.add_argument("--split", default="all", help="train, val or all (default: all)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--limit", type=int, default=0, help="check only the first N samples per split")
    p.add_argument("--workers", type=int, default=0, help="processes reading samples (default 0)")
    p.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    p.add_argument("--preset", help="warn where this preset's queries cannot hold an image's segments")
    p.add_argument("--queries", type=int, default=100,
                   help="the model's queries, when no --preset (default 100, Mask2Former's COCO models)")
    p.add_argument("--train-size", type=int, default=0,
                   help="image side the model will train at, for the small-object warning (0: own size)")
    p.add_argument("--max-per-kind", type=int, default=0,
                   help="print at most N problems of each kind (the summary counts all; 0 = all)")
    p.set_defaults(func=_main)


def main(argv: list[str] | None = None) -> int:
    """`python -m proscale.data.validate --data ...`: the sub-command on its own."""
    parser = argparse.ArgumentParser(prog="proscale")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["validate-data", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
