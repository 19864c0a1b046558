"""Reduced precision on CPU: speed of fp32 / bf16 (autocast) / int8 dynamic quantisation of the
linear layers, side by side, and the accuracy of each on a trained checkpoint.

Speed: one preset (random weights) on a random image, whole-model inference; the variants take
turns round by round (a machine that gets busier shifts all alike); medians. Accuracy: PQ of a
checkpoint on a data split, evaluated once per variant by proscale.engine.evaluate.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/precision.py --preset proscale_r50_333 --size 800x1088 --threads 2
    python benchmarks/precision.py --speed-only ...
    python benchmarks/precision.py --checkpoint runs/quickstart/runs/proscale/seed0/model_final.pt \\
        --data synthetic:runs/quickstart/data --accuracy-only
bf16 needs AVX512-BF16 or AMX (proscale/precision.py refuses it otherwise).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import proscale
from proscale.kernels.linear import Linear
from proscale.precision import inference_autocast, resolve_dtype

VARIANTS = ("fp32", "bf16", "int8")


def quantize_linear_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` with every nn.Linear dynamically quantised to int8 (weights int8,
    activations quantised per call); convolutions stay fp32."""
    from torch.ao.quantization import quantize_dynamic

    model = copy.deepcopy(model)
    for m in model.modules():  # proscale's oneDNN Linear (kernels/linear.py): plain nn.Linear to quantise
        if type(m) is Linear:
            m.__class__ = nn.Linear
    return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def variant(model: nn.Module, name: str) -> tuple[nn.Module, torch.dtype]:
    if name == "int8":
        return quantize_linear_int8(model), torch.float32
    return model, resolve_dtype(name, "cpu")


def speed(preset: str, size, variants, repeats: int, warmup: int, num_classes: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = proscale.build_model(preset, num_classes=num_classes).eval()
    images = torch.randint(0, 256, (1, 3, *size)).float()
    runs = {name: variant(model, name) for name in variants}
    times: dict[str, list[float]] = {name: [] for name in variants}

    def once(name):
        m, dtype = runs[name]
        with torch.inference_mode(), inference_autocast("cpu", dtype):
            t0 = time.perf_counter()
            m(images)
            return (time.perf_counter() - t0) * 1000

    for name in variants:
        for _ in range(warmup):
            once(name)
    for _ in range(repeats):
        for name in variants:
            times[name].append(once(name))
    return {name: statistics.median(t) for name, t in times.items()}


def accuracy(checkpoint: str, data: str, split: str, variants, limit: int | None) -> dict[str, dict]:
    from proscale.data import TransformConfig, build_dataloader, build_dataset, build_transforms
    from proscale.engine.evaluate import evaluate
    from proscale.predictor import load_for_inference

    model, settings = load_for_inference(checkpoint, "cpu")
    transforms = build_transforms(False, TransformConfig(min_size_test=settings.min_size_test,
                                                         max_size_test=settings.max_size_test))
    dataset = build_dataset(data, split, transforms)
    if limit:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
        dataset.metadata = dataset.dataset.metadata
    out = {}
    for name in variants:
        m, dtype = variant(model, name)
        loader = build_dataloader(dataset, 1, train=False, num_workers=0)
        t0 = time.perf_counter()
        res = evaluate(m, loader, dataset.metadata, ("panoptic",), settings.inference, "cpu",
                       amp_dtype=None if dtype == torch.float32 else dtype)
        out[name] = {"PQ": res["panoptic"]["PQ"], "seconds": time.perf_counter() - t0}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="proscale_r50_333")
    p.add_argument("--size", default="800x1088")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variants", default="fp32,bf16,int8")
    p.add_argument("--num-classes", type=int, default=133)
    p.add_argument("--checkpoint")
    p.add_argument("--data")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=None, help="first N images of the split")
    p.add_argument("--speed-only", action="store_true")
    p.add_argument("--accuracy-only", action="store_true")
    args = p.parse_args()
    from proscale import cpu_policy

    cpu_policy.keep_freed_memory()  # as the proscale command does (run with OMP_WAIT_POLICY=PASSIVE for its other half)
    torch.set_num_threads(args.threads)
    variants = tuple(args.variants.split(","))
    for v in variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; expected among {VARIANTS}")
    if not args.accuracy_only:
        h, w = (int(v) for v in args.size.split("x"))
        ms = speed(args.preset, (h, w), variants, args.repeats, args.warmup, args.num_classes)
        print(f"speed: {args.preset}, {h}x{w}, batch 1, {torch.get_num_threads()} threads, whole model, "
              f"median of {args.repeats} interleaved rounds")
        print("| variant | ms | speed-up vs fp32 |\n|---|---:|---:|")
        for name, t in ms.items():
            print(f"| {name} | {t:.0f} | {ms.get('fp32', t) / t:.2f}x |")
    if not args.speed_only and args.checkpoint:
        acc = accuracy(args.checkpoint, args.data, args.split, variants, args.limit)
        print(f"accuracy: {args.checkpoint} on {args.data} {args.split}")
        print("| variant | PQ | PQ - fp32 | eval seconds |\n|---|---:|---:|---:|")
        for name, r in acc.items():
            print(f"| {name} | {r['PQ']:.2f} | {r['PQ'] - acc.get('fp32', r)['PQ']:+.2f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
