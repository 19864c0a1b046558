"""Everything GPU-related about the deformable encoder, in one run (< 5 min on one H100).

    python benchmarks/gpu.py --out gpu_results.json            # on the GPU machine
    python benchmarks/gpu.py --device cpu --quick --out x.json  # plumbing check, anywhere

Sections, each measurement guarded (an error is printed and recorded, the run goes on):
  1. correctness: fused and Triton MSDA against the grid_sample reference on the GPU (max abs
     error of output and gradients, res5+res4 shapes, batch 2);
  2. Triton launch settings: a small sweep of (block_q, num_warps) for the forward and backward
     kernels at the stage-3 shape, batch 8; the best is printed (copy it into
     proscale/kernels/msda_triton.py FORWARD_CONFIG / BACKWARD_CONFIG) and used for section 3;
  3. encoder: the deformable encoder layers (proscale.models.encoder.DeformableEncoder, or a
     stand-in built from MSDeformAttn if that module does not import), plans baseline (0,0,6),
     PRO-SCALE (3,3,3) and (1,1,1), at 800x1088 token shapes (25x34, 50x68, 100x136),
     d_model 256, 8 heads, 4 points, FFN 1024, fp32 (optionally bf16 autocast), for every MSDA
     back end (pure = grid_sample, fused = gather, triton): forward (no_grad) and forward+
     backward at batch 1 and 8, forward under a CUDA graph at batch 1; median of --runs after
     --warmup runs (CUDA events); peak memory (torch.cuda.max_memory_allocated, bytes held
     beyond the weights and inputs).
Prints one table (rows: batch / mode / back end; columns: plans, ratio to the baseline, peak
memory) and writes all numbers to --out as JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from proscale import kernels  # noqa: E402
from proscale.models.ms_deform_attn import MSDeformAttn, use_msda_backend  # noqa: E402

LEVELS_800x1088 = ((25, 34), (50, 68), (100, 136))  # res5, res4, res3 (coarse to fine)
PLANS = {"baseline": (0, 0, 6), "(3,3,3)": (3, 3, 3), "(1,1,1)": (1, 1, 1)}
BACKENDS = ("triton", "pure", "fused")  # in order of interest on a GPU (the budget may cut the tail)
D_MODEL, HEADS, POINTS, FFN = 256, 8, 4, 1024


# ---- small utilities ----------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn, device: torch.device, warmup: int, runs: int) -> dict:
    """Median / min / max ms of fn() over `runs` after `warmup` (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "runs": runs}


def peak_bytes(fn, device: torch.device):
    """Bytes allocated at the peak of one fn() call beyond what was allocated before (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


DEADLINE = [float("inf")]  # time.time() after which measurements are skipped (--budget-s)


def guarded(results: list, record: dict, fn) -> None:
    """Runs one measurement; an exception is printed and stored instead of stopping the run."""
    try:
        if time.time() > DEADLINE[0]:
            raise TimeoutError("skipped: --budget-s exhausted")
        record.update(fn())
    except Exception as exc:  # noqa: BLE001 - a benchmark reports, it does not stop
        record["error"] = f"{type(exc).__name__}: {exc}"
        print(f"  ! {record.get('name', '')}: {record['error']}", file=sys.stderr)
        traceback.print_exc(limit=2, file=sys.stderr)
    finally:
        results.append(record)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---- the encoder ---------------------------------------------------------------------------

def _standin_encoder(plan) -> torch.nn.Module:
    """Minimal plan-driven deformable encoder, used only if proscale.models.encoder does not
    import: the same layer maths (post-norm, MSDA + FFN), no TRC."""
    enc = torch.nn.Module()
    enc.plan = plan
    enc.layers = torch.nn.ModuleList()
    for stage, count in enumerate(plan):
        for _ in range(count):
            layer = torch.nn.Module()
            layer.attn = MSDeformAttn(D_MODEL, stage + 1, HEADS, POINTS)
            layer.norm1, layer.norm2 = torch.nn.LayerNorm(D_MODEL), torch.nn.LayerNorm(D_MODEL)
            layer.ffn = torch.nn.Sequential(torch.nn.Linear(D_MODEL, FFN), torch.nn.ReLU(),
                                            torch.nn.Linear(FFN, D_MODEL))
            enc.layers.append(layer)
    return enc


def _standin_forward(enc, tokens, pos, shapes, refs):
    x, layers = None, iter(enc.layers)
    for stage, count in enumerate(enc.plan):
        x = tokens[stage] if x is None else torch.cat((x, tokens[stage]), 1)
        if count == 0:
            continue
        levels = stage + 1
        n = sum(h * w for h, w in shapes[:levels])
        p = torch.cat(pos[:levels], 1)
        ref = refs[:, :n, :levels]
        for _ in range(count):
            layer = next(layers)
            x = layer.norm1(x + layer.attn(x + p, ref, x, tuple(shapes[:levels])))
            x = layer.norm2(x + layer.ffn(x))
    return x


def build_encoder(plan, device, shapes):
    """Returns (forward(tokens, pos) -> tensor, module, description)."""
    try:
        from proscale.config import EncoderConfig
        from proscale.models.encoder import DeformableEncoder

        enc = DeformableEncoder(EncoderConfig(plan=plan, trc=False, d_model=D_MODEL, n_heads=HEADS,
                                              n_points=POINTS, ffn_dim=FFN)).to(device)
        return (lambda tokens, pos: enc(tokens, pos, shapes)), enc, "proscale.models.encoder.DeformableEncoder"
    except Exception as exc:  # noqa: BLE001
        print(f"  (encoder module unavailable: {exc!r}; using a stand-in built from MSDeformAttn)", file=sys.stderr)
    enc = _standin_encoder(plan).to(device)
    refs = []
    for h, w in shapes:
        ys, xs = torch.meshgrid((torch.arange(h, device=device) + 0.5) / h, (torch.arange(w, device=device) + 0.5) / w,
                                indexing="ij")
        refs.append(torch.stack((xs.reshape(-1), ys.reshape(-1)), -1))
    refs = torch.cat(refs)[None, :, None, :].expand(1, -1, len(shapes), 2).contiguous()
    return (lambda tokens, pos: _standin_forward(enc, tokens, pos, shapes, refs)), enc, "stand-in (MSDeformAttn layers)"


def encoder_inputs(batch, shapes, device, requires_grad=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    tokens = [torch.randn(batch, h * w, D_MODEL, generator=g).to(device).requires_grad_(requires_grad)
              for h, w in shapes]
    pos = [torch.randn(batch, h * w, D_MODEL, generator=g).to(device) for h, w in shapes]
    return tokens, pos


def measure_encoder(plan_name, plan, backend, batch, mode, shapes, device, args, amp_dtype=None) -> dict:
    """One encoder measurement: mode 'forward' | 'fwd+bwd' | 'forward (CUDA graph)'."""
    torch.manual_seed(0)
    forward, module, desc = build_encoder(plan, device, shapes)
    tokens, pos = encoder_inputs(batch, shapes, device, requires_grad=(mode == "fwd+bwd"))
    # No autocast weight-cast cache: it does not mix with CUDA graph capture.
    autocast = (torch.autocast(device.type, dtype=amp_dtype, cache_enabled=False) if amp_dtype is not None
                else torch.autocast(device.type, enabled=False))
    out_info = {"encoder": desc}
    with use_msda_backend(module, backend):
        if mode == "forward":
            def step():
                with torch.no_grad(), autocast:
                    return forward(tokens, pos)
        elif mode == "fwd+bwd":
            with autocast:
                grad = torch.randn_like(forward(tokens, pos), dtype=torch.float32)
            params = [p for p in module.parameters()]

            def step():
                with autocast:
                    out = forward(tokens, pos)
                out.float().backward(grad)
                for p in params:
                    p.grad = None
                for t in tokens:
                    t.grad = None
        elif mode == "forward (CUDA graph)":
            if device.type != "cuda":
                raise RuntimeError("CUDA graphs need a GPU")
            with torch.no_grad(), autocast:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(3):  # warm-up off the default stream: caches, Triton compiles
                        forward(tokens, pos)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    forward(tokens, pos)

            def step():
                graph.replay()
        else:
            raise ValueError(mode)
        out_info.update(time_runs(step, device, args.warmup, args.runs))
        out_info["peak_bytes"] = peak_bytes(step, device)
    return out_info


# ---- MSDA core: correctness and Triton settings ------------------------------------------

def core_inputs(batch, shapes, device, seed=0):
    """Sampling around each query's own pixel, as in a real layer (locality matters)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    S, L = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(batch, S, HEADS, D_MODEL // HEADS, generator=g)
    ref = []
    for h, w in shapes:
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        ref.append(torch.stack((xs.reshape(-1), ys.reshape(-1)), -1))
    size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32).view(1, 1, 1, L, 1, 2)
    pixels = 3.0 * torch.randn(batch, S, HEADS, L, POINTS, 2, generator=g)
    loc = torch.cat(ref).view(1, S, 1, 1, 1, 2) + pixels / size
    attn = torch.randn(batch, S, HEADS, L * POINTS, generator=g).softmax(-1).view(batch, S, HEADS, L, POINTS)
    return value.to(device), loc.to(device), attn.to(device)


def check_correctness(device, quick: bool) -> list:
    shapes = LEVELS_800x1088[:2] if not quick else ((3, 4), (6, 8))
    value, loc, attn = core_inputs(2, shapes, device)
    records = []

    def run(backend):
        leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
        out = kernels.ms_deform_attn(leaves[0], shapes, leaves[1], leaves[2], backend=backend)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
        return [out.detach(), *torch.autograd.grad(out, leaves, g)]

    ref = run("pure")
    for backend in ("fused", "triton"):
        record = {"name": f"correctness {backend}", "backend": backend}

        def measure(backend=backend):
            got = run(backend)
            names = ("output", "grad_value", "grad_locations", "grad_attention")
            return {f"max_abs_err_{n}": (a - b).abs().max().item() for n, a, b in zip(names, got, ref)} | {
                "max_abs_grad_locations": ref[2].abs().max().item()}

        guarded(records, record, measure)
    return records


def sweep_triton(device, args) -> list:
    """(block_q, num_warps) for each Triton kernel at the stage-3 shape, batch 8 (2 in --quick)."""
    records = []
    if device.type != "cuda" or not kernels.triton_available():
        records.append({"name": "triton sweep", "error": "skipped: needs CUDA and Triton"})
        return records
    from proscale.kernels import msda_triton as mt

    shapes = LEVELS_800x1088
    value, loc, attn = core_inputs(8 if not args.quick else 2, shapes, device)
    leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    default_fwd, default_bwd = dict(mt.FORWARD_CONFIG), dict(mt.BACKWARD_CONFIG)
    # A few candidates each: every one is a compile (the backward unrolls 4*L*P corners).
    grids = {"forward": [(32, 4), (64, 4), (128, 4), (64, 8)], "backward": [(16, 4), (32, 4), (64, 4), (32, 8)]}
    best = {}
    for kernel, grid in grids.items():
        for bq, nw in grid:
            record = {"name": f"triton {kernel} block_q={bq} num_warps={nw}", "kernel": kernel, "block_q": bq,
                      "num_warps": nw}

            def measure(kernel=kernel, bq=bq, nw=nw):
                mt.FORWARD_CONFIG.update(default_fwd)
                mt.BACKWARD_CONFIG.update(default_bwd)
                (mt.FORWARD_CONFIG if kernel == "forward" else mt.BACKWARD_CONFIG).update(block_q=bq, num_warps=nw)
                if kernel == "forward":
                    def step():
                        with torch.no_grad():
                            mt.ms_deform_attn_triton(value, shapes, loc, attn)
                else:
                    out = mt.ms_deform_attn_triton(leaves[0], shapes, leaves[1], leaves[2])
                    grad = torch.ones_like(out)

                    def step():
                        torch.autograd.grad(out, leaves, grad, retain_graph=True)
                return time_runs(step, device, 2, max(5, args.runs // 2))

            guarded(records, record, measure)
            if "median_ms" in record and record["median_ms"] < best.get(kernel, ({}, float("inf")))[1]:
                best[kernel] = ({"block_q": bq, "num_warps": nw}, record["median_ms"])
    mt.FORWARD_CONFIG.update(best.get("forward", (default_fwd,))[0])
    mt.BACKWARD_CONFIG.update(best.get("backward", (default_bwd,))[0])
    records.append({"name": "triton best", "forward": mt.FORWARD_CONFIG, "backward": mt.BACKWARD_CONFIG,
                    "defaults": {"forward": default_fwd, "backward": default_bwd}})
    print(f"Triton best settings: forward {mt.FORWARD_CONFIG}, backward {mt.BACKWARD_CONFIG} "
          f"(defaults {default_fwd} / {default_bwd})")
    return records


def core_timings(device, args) -> list:
    """MSDA core alone at the stage-3 shape (3 levels, all 17,850 queries), per back end."""
    records = []
    shapes = LEVELS_800x1088 if not args.quick else ((3, 4), (6, 8), (12, 17))
    value, loc, attn = core_inputs(8 if not args.quick else 2, shapes, device)
    for backend in args.backends:
        for mode in ("forward", "fwd+bwd"):
            record = {"name": f"core {backend} {mode}", "section": "core", "backend": backend, "mode": mode,
                      "batch": value.shape[0]}

            def measure(backend=backend, mode=mode):
                leaves = [t.clone().requires_grad_(mode == "fwd+bwd") for t in (value, loc, attn)]

                def step():
                    if mode == "forward":
                        with torch.no_grad():
                            kernels.ms_deform_attn(value, shapes, loc, attn, backend=backend)
                    else:
                        out = kernels.ms_deform_attn(leaves[0], shapes, leaves[1], leaves[2], backend=backend)
                        out.backward(torch.ones_like(out))
                        for t in leaves:
                            t.grad = None
                r = time_runs(step, device, args.warmup, args.runs)
                r["peak_bytes"] = peak_bytes(step, device)
                return r

            guarded(records, record, measure)
    return records


# ---- driver --------------------------------------------------------------------------------

def format_table(records, args) -> str:
    enc = [r for r in records if r.get("section") == "encoder"]
    plans = list(PLANS)
    lines = []
    head = (["batch", "mode", "MSDA", "dtype"] + [f"{p} ms" for p in plans] + [f"{p}/baseline" for p in plans[1:]]
            + [f"{p} peak GB" for p in plans])
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    keys = []
    for r in enc:
        k = (r["batch"], r["mode"], r["backend"], r["dtype"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        cells = {r["plan"]: r for r in enc if (r["batch"], r["mode"], r["backend"], r["dtype"]) == k}
        row = [str(k[0]), k[1], k[2], k[3]]
        ms = {p: cells.get(p, {}).get("median_ms") for p in plans}
        row += [f"{ms[p]:.2f}" if ms[p] is not None else ("error" if "error" in cells.get(p, {}) else "-")
                for p in plans]
        row += [f"{ms[p] / ms['baseline']:.2f}" if ms[p] and ms["baseline"] else "-" for p in plans[1:]]
        for p in plans:
            b = cells.get(p, {}).get("peak_bytes")
            row.append(f"{b / 1e9:.2f}" if b is not None else "-")
        lines.append("| " + " | ".join(row) + " |")
    core = [r for r in records if r.get("section") == "core"]
    if core:
        lines.append("")
        lines.append("MSDA core alone, stage-3 shape (3 levels, all queries): " + "; ".join(
            f"{r['backend']} {r['mode']} " + (f"{r['median_ms']:.2f} ms" if "median_ms" in r else "error")
            + (f" ({r['peak_bytes'] / 1e9:.2f} GB)" if r.get("peak_bytes") is not None else "")
            for r in core))
    for r in records:
        if r.get("name", "").startswith("correctness"):
            errs = {k.replace("max_abs_err_", ""): f"{v:.1e}" for k, v in r.items() if k.startswith("max_abs_err")}
            lines.append(f"{r['name']} vs grid_sample: " + (str(errs) if errs else r.get("error", "")))
    return "\n".join(lines)


def environment(device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["threads"] = torch.get_num_threads()
    return info


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="gpu_results.json")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--dtypes", default="fp32", help="fp32 and/or bf16 (autocast), comma separated")
    p.add_argument("--no-sweep", action="store_true", help="skip the Triton launch-settings sweep")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 runs: checks the plumbing")
    p.add_argument("--budget-s", type=float, default=270.0,
                   help="skip (and record as skipped) measurements that would start after this many seconds")
    args = p.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    device = torch.device(args.device)
    if args.quick:
        args.runs, args.warmup = min(args.runs, 2), min(args.warmup, 1)
    if device.type == "cpu":
        torch.set_num_threads(1 if args.quick else min(2, torch.get_num_threads()))
    shapes = LEVELS_800x1088 if not args.quick else ((3, 4), (6, 8), (12, 17))
    batches = [int(b) for b in args.batches.split(",")] if not args.quick else [1, 2]
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    t_start = time.time()
    DEADLINE[0] = t_start + args.budget_s
    records: list = []
    print(f"proscale GPU benchmark on {environment(device)}; token shapes {shapes}", flush=True)

    records += check_correctness(device, args.quick)
    if not args.no_sweep and "triton" in args.backends:
        records += sweep_triton(device, args)
    records += core_timings(device, args)
    for dtype_name in args.dtypes.split(","):
        for batch in batches:
            modes = ["forward", "fwd+bwd"] + (["forward (CUDA graph)"] if batch == min(batches) else [])
            for mode in modes:
                for backend in args.backends:
                    for plan_name, plan in PLANS.items():
                        record = {"name": f"encoder {plan_name} b{batch} {mode} {backend} {dtype_name}",
                                  "section": "encoder", "plan": plan_name, "layers": plan, "batch": batch,
                                  "mode": mode, "backend": backend, "dtype": dtype_name}
                        guarded(records, record, lambda: measure_encoder(
                            plan_name, plan, backend, batch, mode, shapes, device, args, dtypes[dtype_name]))
                        if "median_ms" in record:
                            print(f"  {record['name']}: {record['median_ms']:.2f} ms", flush=True)
    table = format_table(records, args)
    print()
    print(f"Deformable encoder layers, {'x'.join(map(str, shapes[-1]))} res3 tokens, d_model {D_MODEL}, "
          f"median of {args.runs} ms ({environment(device)})")
    print(table)
    result = {"environment": environment(device), "shapes": shapes, "runs": args.runs, "warmup": args.warmup,
              "wall_s": time.time() - t_start, "records": records, "table": table}
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwrote {args.out} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
