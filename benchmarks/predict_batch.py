"""Predictor throughput by batch size: images/s of model + post-processing (no file writing).

A preset with random weights, N random images of one size (so every batch is full: batches hold
images of one padded size), the given test resize. Batch sizes run interleaved, `--runs` times
each; the median images/s per batch size is printed, with the process-CPU-time rate, which a
busy machine disturbs less than wall time.

    python benchmarks/predict_batch.py                          # m2f_nano, 32 images 128x128, 1 thread
    python benchmarks/predict_batch.py --preset m2f_r50 --size 480x640 --min-size 480 --images 8
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import proscale
from proscale.predictor import Predictor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="m2f_nano")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--size", default="128x128", help="HxW of the random images")
    p.add_argument("--min-size", type=int, default=128, help="test short side (0: no resize)")
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--batch-sizes", default="1,4,8")
    p.add_argument("--tasks", default="panoptic")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    h, w = (int(v) for v in args.size.split("x"))
    model = proscale.build_model(args.preset, num_classes=8)
    predictor = Predictor(model, device="cpu", tasks=tuple(args.tasks.split(",")), min_size_test=args.min_size,
                          max_size_test=args.max_size)
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for _ in range(args.images)]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    predictor.predict(images[: max(sizes)], batch_size=max(sizes))  # warm-up
    wall: dict[int, list[float]] = {b: [] for b in sizes}
    cpu: dict[int, list[float]] = {b: [] for b in sizes}
    for _ in range(args.runs):
        for b in sizes:
            t, c = time.perf_counter(), time.process_time()
            predictor.predict(images, batch_size=b)
            wall[b].append(len(images) / (time.perf_counter() - t))
            cpu[b].append(len(images) / (time.process_time() - c))
    print(f"{args.preset}, {len(images)} images {h}x{w}, test short side {args.min_size}, tasks {args.tasks}, "
          f"{args.threads} thread(s), median of {args.runs} interleaved runs")
    print("| batch size | images/s (wall) | images/s (process CPU time) |\n|---:|---:|---:|")
    for b in sizes:
        print(f"| {b} | {statistics.median(wall[b]):.2f} | {statistics.median(cpu[b]):.2f} |")


if __name__ == "__main__":
    main()
