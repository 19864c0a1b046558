"""MSDA core on CPU: the grid_sample reference ("pure") against the fused gather ("fused").

Sizes are R50 at 800x1088 (levels 25x34, 50x68, 100x136; M=8 heads, D=32, P=4), queries = all
tokens of the levels in use: the baseline layer (3 levels, 17,850 queries) and the three
PRO-SCALE stages (1 level / 850 queries, 2 levels / 4,250, 3 levels / 17,850). Per
implementation it prints forward and forward+backward ms (median after one warm-up), the bytes
autograd keeps for backward, and the encoder total (MSDA core only) for plans 6x3 levels and
(3, 3, 3).

    python benchmarks/msda_cpu.py              # 2 threads, batch 1
    python benchmarks/msda_cpu.py --threads 1 --clock process   # CPU time: steady on a busy machine
    python benchmarks/msda_cpu.py --quick --runs 1             # smoke test
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from proscale.kernels import ms_deform_attn

LEVELS = ((25, 34), (50, 68), (100, 136))
CASES = {  # name -> number of levels; queries = all their tokens
    "stage1 (1 lvl)": 1,
    "stage2 (2 lvl)": 2,
    "stage3 / baseline (3 lvl)": 3,
}


def make_inputs(levels: int, batch: int, M: int = 8, D: int = 32, P: int = 4, seed: int = 0, scale: float = 1.0):
    """Inputs shaped like one encoder layer's MSDA call: the queries are all tokens of the levels
    in use, and each samples around its own reference point (its pixel centre) at the spread of
    MSDeformAttn's initialisation (point p of head m at (p+1) pixels in direction m) plus
    N(0, 2 px) noise, so that memory access has the locality of a real model."""
    g = torch.Generator().manual_seed(seed)
    shapes = tuple((max(1, round(h * scale)), max(1, round(w * scale))) for h, w in LEVELS[:levels])
    S = sum(h * w for h, w in shapes)
    value = torch.randn(batch, S, M, D, generator=g)
    ref = []
    for h, w in shapes:
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        ref.append(torch.stack((xs.reshape(-1), ys.reshape(-1)), -1))
    ref = torch.cat(ref).view(1, S, 1, 1, 1, 2)
    theta = torch.arange(M) * (2 * torch.pi / M)
    direction = torch.stack((theta.cos(), theta.sin()), -1).view(1, 1, M, 1, 1, 2)
    radius = torch.arange(1, P + 1, dtype=torch.float32).view(1, 1, 1, 1, P, 1)
    pixels = direction * radius + 2.0 * torch.randn(batch, S, M, levels, P, 2, generator=g)
    size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32).view(1, 1, 1, levels, 1, 2)
    loc = ref + pixels / size
    attn = torch.randn(batch, S, M, levels * P, generator=g).softmax(-1).view(batch, S, M, levels, P)
    return shapes, value, loc, attn


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while fn() runs (storage counted once)."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def time_ms(fn, runs: int, clock: str = "wall") -> tuple[float, float]:
    """(median, min) ms after one warm-up. On a shared machine the min is the steadier one;
    clock="process" counts this process's CPU time (all its threads), which other processes
    competing for the cores do not inflate (use it with --threads 1 to compare work)."""
    now = CLOCKS[clock]
    fn()  # warm-up (caches, allocator)
    times = []
    for _ in range(runs):
        t0 = now()
        fn()
        times.append((now() - t0) * 1e3)
    return statistics.median(times), min(times)


def bench_case(backend: str, levels: int, batch: int, runs: int, scale: float = 1.0, clock: str = "wall") -> dict:
    shapes, value, loc, attn = make_inputs(levels, batch, scale=scale)
    leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]

    def forward():
        with torch.no_grad():
            ms_deform_attn(value, shapes, loc, attn, backend=backend)

    def forward_backward():
        out = ms_deform_attn(*leaves[:1], shapes, *leaves[1:], backend=backend)
        out.backward(torch.ones_like(out))
        for t in leaves:
            t.grad = None

    fwd, fwd_min = time_ms(forward, runs, clock)
    fb, fb_min = time_ms(forward_backward, runs, clock)
    return {
        "forward_ms": fwd, "forward_min_ms": fwd_min,
        "fwd_bwd_ms": fb, "fwd_bwd_min_ms": fb_min,
        "saved_MB": saved_bytes(lambda: ms_deform_attn(*leaves[:1], shapes, *leaves[1:], backend=backend)) / 2**20,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--backends", default="pure,fused")
    p.add_argument("--quick", action="store_true", help="levels scaled by 1/4 (a smoke test)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall time, or this process's CPU time (steadier on a shared machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    scale = 0.25 if args.quick else 1.0
    backends = args.backends.split(",")
    results: dict = {}
    print(f"MSDA core, CPU, {torch.get_num_threads()} threads, batch {args.batch}, fp32, "
          f"{'quick (1/4 size)' if args.quick else '800x1088'} ; {args.clock} ms, median (min) of {args.runs}")
    print(f"{'case':28s} {'backend':8s} {'forward':>17s} {'fwd+bwd':>17s} {'saved MB':>9s}")
    for name, levels in CASES.items():
        for backend in backends:
            r = bench_case(backend, levels, args.batch, args.runs, scale, args.clock)
            results[(name, backend)] = r
            print(f"{name:28s} {backend:8s} {r['forward_ms']:9.1f} ({r['forward_min_ms']:5.0f}) "
                  f"{r['fwd_bwd_ms']:9.1f} ({r['fwd_bwd_min_ms']:5.0f}) {r['saved_MB']:9.1f}")
    print("\nencoder MSDA-core totals (median ms): baseline = 6 x stage3, "
          "PRO-SCALE (3,3,3) = 3 x (stage1+stage2+stage3)")
    print(f"{'backend':8s} {'mode':8s} {'baseline':>9s} {'(3,3,3)':>9s} {'ratio':>6s}")
    names = list(CASES)
    for backend in backends:
        for key, mode in (("forward_ms", "forward"), ("fwd_bwd_ms", "fwd+bwd")):
            base = 6 * results[(names[2], backend)][key]
            pro = 3 * sum(results[(n, backend)][key] for n in names)
            print(f"{backend:8s} {mode:8s} {base:9.0f} {pro:9.0f} {pro / base:6.2f}")
    if len(backends) > 1 and "pure" in backends:
        print("\nspeed-up over pure:")
        for name in names:
            for backend in backends:
                if backend == "pure":
                    continue
                ref, r = results[(name, "pure")], results[(name, backend)]
                print(f"  {name:28s} {backend}: forward x{ref['forward_ms'] / r['forward_ms']:.2f}, "
                      f"fwd+bwd x{ref['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}")
    return results


if __name__ == "__main__":
    main()
