"""Latency and peak memory, side by side: `proscale bench --preset A --vs B`.

Every number comes from the same process and machine: warm-up runs, then the median and the
10th/90th percentiles of repeated runs. The pixel decoder is timed on fixed backbone features
(computed once), the whole model on images. "train" is forward + backward (+ the real Mask2Former
loss for the whole model). For a detector (a `ddetr_*` preset) the "encoder" rows time the input
projections, the extra level and the encoder on fixed backbone features, and the whole-model
training step uses Deformable DETR's set loss.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from proscale.analysis.memory import peak_memory_bytes
from proscale.precision import DTYPES, PrecisionError, resolve_dtype


@dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    peak_mb: float | None = None


@dataclass
class BenchReport:
    device: str
    size: tuple[int, int]
    batch: int
    dtype: str
    threads: int
    columns: list[str] = field(default_factory=list)
    rows: dict[str, dict[str, Timing]] = field(default_factory=dict)  # "pixel_decoder/infer" -> column -> Timing

    def table(self) -> str:
        base = self.columns[0]
        head = ["component / mode"] + [f"{c} ms (p10-p90)" for c in self.columns]
        head += [f"{c}/{base}" for c in self.columns[1:]] + [f"{c} peak MB" for c in self.columns]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row, cells in self.rows.items():
            vals = [row]
            for c in self.columns:
                t = cells.get(c)
                vals.append(f"{t.median_ms:.1f} ({t.p10_ms:.1f}-{t.p90_ms:.1f})" if t else "n/a")
            for c in self.columns[1:]:
                a, b = cells.get(base), cells.get(c)
                vals.append(f"{b.median_ms / a.median_ms:.2f}x" if a and b else "n/a")
            for c in self.columns:
                t = cells.get(c)
                vals.append(f"{t.peak_mb:.0f}" if t and t.peak_mb is not None else "n/a")
            lines.append("| " + " | ".join(vals) + " |")
        title = (f"device {self.device}, {self.size[0]}x{self.size[1]}, batch {self.batch}, {self.dtype}, "
                 f"{self.threads} threads")
        return title + "\n" + "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> Timing:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(round(p * (len(times) - 1))))]  # noqa: E731
    return Timing(statistics.median(times), q(0.1), q(0.9), len(times))


def _surrogate_loss(outputs) -> torch.Tensor:
    """A cheap scalar touching every output, for backward through a component alone."""
    tensors = [outputs[0]] + list(outputs[1]) if isinstance(outputs, tuple) else [outputs]
    return sum(t.float().square().mean() for t in tensors)


def _random_targets(batch: int, size: tuple[int, int], num_classes: int, device) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(batch):
        n = 5
        masks = torch.zeros(n, *size, dtype=torch.bool)
        for i in range(n):
            y0, x0 = (int(torch.randint(0, s // 2, (1,), generator=g)) for s in size)
            masks[i, y0:y0 + size[0] // 3, x0:x0 + size[1] // 3] = True
        labels = torch.randint(0, num_classes, (n,), generator=g)
        targets.append({"labels": labels.to(device), "masks": masks.to(device)})
    return targets


def component_fns(model, images: torch.Tensor, dtype: torch.dtype, device: torch.device) -> dict[str, Callable]:
    """The four measured callables: pixel decoder / whole model x inference / training step."""
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731
    with torch.no_grad(), autocast():
        x, _ = model.preprocess(images)
        feats = {k: v.detach() for k, v in model.backbone(x).items()}
    pd = model.pixel_decoder
    from proscale.models.criterion import LossConfig, build_criterion, pad_targets

    criterion = build_criterion(model.num_classes, LossConfig())
    targets = _random_targets(images.shape[0], tuple(images.shape[-2:]), model.num_classes, device)

    def model_loss():
        out = model(images)
        return criterion.total_loss(criterion(out, pad_targets(targets, out["padded_size"])))

    pd_infer, pd_train = _infer_and_train(model, autocast, lambda: pd(feats), lambda: _surrogate_loss(pd(feats)))
    model_infer, model_train = _infer_and_train(model, autocast, lambda: model(images), model_loss)
    return {"pixel_decoder/infer": pd_infer, "pixel_decoder/train": pd_train,
            "model/infer": model_infer, "model/train": model_train}


def _infer_and_train(model, autocast, forward: Callable, loss: Callable) -> tuple[Callable, Callable]:
    """(inference call: `forward()` under inference mode, training step: backward of `loss()`),
    both under `autocast()`; the step clears the gradients it made."""
    def infer():
        with torch.inference_mode(), autocast():
            return forward()

    def train():
        with autocast():
            value = loss()
        value.backward()
        model.zero_grad(set_to_none=True)

    return infer, train


def detector_fns(model, images: torch.Tensor, dtype: torch.dtype, device: torch.device) -> dict[str, Callable]:
    """A DeformableDETR's measured callables: encoder / whole model x inference / training step."""
    from proscale.models.detr.criterion import build_detr_criterion
    from proscale.models.image_batch import padding_mask

    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731
    with torch.no_grad(), autocast():
        x, sizes = model.preprocess(images)
        feats = {k: v.detach() for k, v in model.backbone(x).items()}
        pad = padding_mask(sizes, tuple(x.shape[-2:]), x.device)
    criterion = build_detr_criterion(model.num_classes)
    targets = _random_targets(images.shape[0], tuple(images.shape[-2:]), model.num_classes, device)

    def encoder():
        maps, masks = model.levels(feats, pad)
        return model.forward_encoder(maps, masks)[0]

    enc_infer, enc_train = _infer_and_train(model, autocast, encoder, lambda: _surrogate_loss(encoder()))
    model_infer, model_train = _infer_and_train(model, autocast, lambda: model(images),
                                                lambda: criterion.total_loss(criterion(model(images), targets)))
    return {"encoder/infer": enc_infer, "encoder/train": enc_train, "model/infer": model_infer,
            "model/train": model_train}


def run_benchmark(presets: list[str], size=(800, 1088), batch: int = 1, device: str = "cpu", dtype: str = "fp32",
                  modes=("infer", "train"), components=("pixel_decoder", "model"), warmup: int = 2,
                  repeats: int = 5, memory: bool = True, num_classes: int = 133, threads: int | None = None,
                  peer: str | None = None) -> BenchReport:
    import proscale

    dev = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    report = BenchReport(str(dev), tuple(size), batch, dtype, torch.get_num_threads())
    torch.manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, *size), dtype=torch.uint8, device=dev).float()
    wanted = [f"{c}/{m}" for c in components for m in modes]
    models = [(name, lambda name=name: proscale.build_model(name, num_classes=num_classes)) for name in presets]
    if peer == "hf":
        from proscale.analysis.hf_peer import build_hf_peer

        models.append(("hf", lambda: build_hf_peer(proscale.get_preset(presets[0]), num_classes)))
    for column, make in models:
        model = make().to(dev).train(False)
        report.columns.append(column)
        detector = hasattr(model, "forward_encoder") and not hasattr(model, "pixel_decoder")
        fns = (detector_fns if detector else component_fns)(model, images, DTYPES[dtype], dev)
        for row in wanted:
            if detector:  # a detector's encoder part stands where Mask2Former's pixel decoder does
                row = row.replace("pixel_decoder/", "encoder/")
            fn = fns.get(row)
            if fn is None:
                continue
            timing = time_fn(fn, dev, warmup, repeats)
            if memory:
                timing.peak_mb = peak_memory_bytes(fn, dev) / 2**20
            report.rows.setdefault(row, {})[column] = timing
        del model, fns
    return report


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="latency and peak memory, baseline vs PRO-SCALE side by side",
                              description=__doc__)
    p.add_argument("--preset", default="m2f_r50")
    p.add_argument("--vs", default="proscale_r50_333", help="the preset to compare with ('' for none)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", default="800x1088", help="HxW")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--mode", choices=["infer", "train", "both"], default="both")
    p.add_argument("--component", choices=["pixel_decoder", "encoder", "model", "both", "none"], default="both",
                   help="pixel_decoder (Mask2Former) and encoder (a detector's) name the same rows; none: only "
                        "the sections asked for below (--profile ...)")
    p.add_argument("--profile", action="store_true",
                   help="also time every component (input projections, each encoder stage, TRC, FPN, mask "
                        "features, backbone, transformer decoder) beside its GFLOPs, models in turns "
                        "(proscale/analysis/profile.py)")
    p.add_argument("--throughput", action="store_true",
                   help="also measure whole-model images/s at the --throughput-batches sizes (in turns)")
    p.add_argument("--throughput-batches", type=int, nargs="+", default=[1, 4], metavar="B")
    p.add_argument("--compile", action="store_true",
                   help="also run the throughput rows through torch.compile (compile time reported apart)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--num-classes", type=int, default=133)
    p.add_argument("--no-memory", action="store_true", help="skip the (slow on CPU) peak-memory pass")
    p.add_argument("--peer", choices=["hf"], default=None,
                   help="add transformers' Mask2Former (same config, random weights) as a column")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=_main)


def run_profile(presets: list[str], size=(800, 1088), batch: int = 1, device: str = "cpu", dtype: str = "fp32",
                warmup: int = 1, repeats: int = 5, num_classes: int = 133, threads: int | None = None):
    """The per-component profile (analysis/profile.py) of `presets`, timed in turns."""
    import proscale
    from proscale.analysis.profile import profile_models

    dev = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, *size), dtype=torch.uint8, device=dev).float()
    models = {name: proscale.build_model(name, num_classes=num_classes).to(dev).train(False) for name in presets}
    return profile_models(models, images, DTYPES[dtype], warmup=warmup, repeats=repeats)


def run_throughput(presets: list[str], size=(800, 1088), batches=(1, 4), device: str = "cpu", dtype: str = "fp32",
                   warmup: int = 1, repeats: int = 3, num_classes: int = 133, threads: int | None = None,
                   compile: bool = False) -> dict:
    """Whole-model inference throughput (images/s) of each preset at each batch size, every
    (preset, batch) taking turns round by round; medians. With `compile`, each preset also runs
    through torch.compile (default inductor), its first call (the compile) timed apart.

    Returns {"rows": {f"{preset} batch {b}": {"ms": median ms per batch, "images_per_s": ...}},
    "compile_s": {preset: seconds of the first compiled call} (or {preset: "failed: why"})}."""
    import proscale

    dev = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    amp = DTYPES[dtype]
    torch.manual_seed(0)
    runs: dict[str, Callable] = {}
    compile_s: dict[str, object] = {}
    for name in presets:
        model = proscale.build_model(name, num_classes=num_classes).to(dev).train(False)
        variants = [(name, model)]
        if compile:
            compiled = torch.compile(model)
            images = torch.randint(0, 256, (1, 3, *size), device=dev).float()
            try:
                start = time.perf_counter()
                with torch.inference_mode(), torch.autocast(dev.type, dtype=amp, enabled=amp != torch.float32):
                    compiled(images)
                _sync(dev)
                compile_s[name] = time.perf_counter() - start
                variants.append((f"{name} compiled", compiled))
            except Exception as e:  # noqa: BLE001 - reported, the eager rows still run
                compile_s[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        for label, m in variants:
            for b in batches:
                images = torch.randint(0, 256, (b, 3, *size), device=dev).float()

                def fn(m=m, images=images):
                    with torch.inference_mode(), torch.autocast(dev.type, dtype=amp, enabled=amp != torch.float32):
                        return m(images)

                runs[f"{label} batch {b}"] = fn
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for key, fn in runs.items():
            samples[key].append(time_fn(fn, dev, 0, 1).median_ms)
    rows = {}
    for key, ms in samples.items():
        b = int(key.rsplit(" ", 1)[1])
        med = statistics.median(ms)
        rows[key] = {"ms": med, "images_per_s": 1000 * b / med}
    return {"rows": rows, "compile_s": compile_s}


def throughput_table(result: dict, title: str) -> str:
    lines = [title, "| model / batch | ms per batch | images/s |", "|---|---:|---:|"]
    for key, r in result["rows"].items():
        lines.append(f"| {key} | {r['ms']:.0f} | {r['images_per_s']:.3f} |")
    for name, s in result["compile_s"].items():
        lines.append(f"torch.compile {name}: " + (f"first call (compile) {s:.1f} s" if isinstance(s, float) else s))
    return "\n".join(lines)


def _main(args) -> int:
    h, w = (int(v) for v in args.size.lower().split("x"))
    try:
        resolve_dtype(args.dtype, args.device)
    except PrecisionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    presets = [args.preset] + ([args.vs] if args.vs else [])
    out: dict = {}
    if args.profile:
        profile = run_profile(presets, (h, w), args.batch, args.device, args.dtype, max(1, args.warmup),
                              args.repeats, args.num_classes, args.threads)
        print(profile.table())
        print(profile.spread())
        out["profile"] = profile.to_dict()
    if args.throughput or args.compile:
        result = run_throughput(presets, (h, w), tuple(args.throughput_batches), args.device, args.dtype,
                                max(1, args.warmup), args.repeats, args.num_classes, args.threads, args.compile)
        title = (f"throughput: device {args.device}, {h}x{w}, {args.dtype}, {torch.get_num_threads()} threads, "
                 f"whole model inference, median of {args.repeats} interleaved rounds")
        print(throughput_table(result, title))
        out["throughput"] = result
    if args.component == "none":
        _write_json(args.json, out)
        return 0
    report = run_benchmark(
        presets, (h, w), args.batch, args.device, args.dtype,
        modes=("infer", "train") if args.mode == "both" else (args.mode,),
        components=("pixel_decoder", "model") if args.component == "both"
        else (args.component.replace("encoder", "pixel_decoder"),),
        warmup=args.warmup, repeats=args.repeats, memory=not args.no_memory, num_classes=args.num_classes,
        threads=args.threads, peer=args.peer)
    print(report.table())
    _write_json(args.json, {**asdict(report), **out})  # the bench report's keys at the top, as before
    return 0


def _write_json(path: str | None, data: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
