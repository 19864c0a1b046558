"""CPU inference fast paths against the standard operators they replace, side by side.

Each row times, in one process and in turns (medians of `--repeats` rounds), the operator a
layer would run by default and the path proscale takes for fp32 CPU inference, at the shapes of
R50 at 800x1088 (17,850 encoder tokens, 8 heads, 3 levels x 4 points; stride-4 maps 200x272),
and checks that both give the same values:

  linear (FFN in 256 -> 1024 + ReLU, FFN out 1024 -> 256, 256 -> 256)   F.linear (MKL)  vs oneDNN
  mask product (100 queries x 256 x 200x272)                          einsum          vs 1x1 conv
  softmax over the 12 sample weights                                  torch.softmax   vs written out
  R50 backbone (frozen norms)                                         conv + norm     vs folded

and, on a CPU with bf16 units, what bf16 can gain over that fp32 path: the FFN's linear layers
in fp32 (oneDNN) against bf16 autocast (oneDNN), the bound on bf16's speed-up for the layers
that carry most of the FLOPs (docs/speed.md, "bf16").

    python benchmarks/cpu_kernels.py [--threads 2] [--repeats 7]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from proscale.cpu_policy import keep_freed_memory
from proscale.kernels.linear import linear
from proscale.models.backbone import TimmBackbone
from proscale.models.frozen_bn import ConvFrozenBN, FrozenBatchNorm2dInputDtype
from proscale.models.ms_deform_attn import _softmax_last
from proscale.models.transformer_decoder import mask_logits
from proscale.precision import cpu_units

TOKENS, HW, IMAGE = 17850, (200, 272), (800, 1088)


def unfolded(backbone: nn.Module) -> nn.Module:
    """A copy of a backbone with its frozen norms applied as written (not folded)."""
    plain = copy.deepcopy(backbone)
    for m in plain.modules():
        if isinstance(m, ConvFrozenBN):
            m.__class__ = nn.Conv2d
        if isinstance(m, FrozenBatchNorm2dInputDtype):
            m.folded = False
    return plain


def cases(tokens: int = TOKENS, hw=HW, image_size=IMAGE) -> list[tuple[str, callable, callable]]:
    """(name, standard, fast) at R50 800x1088's shapes by default."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    x, w1, b1, w2, b2 = rand(1, tokens, 256), rand(1024, 256), rand(1024), rand(256, 1024), rand(256)
    h = rand(1, tokens, 1024)
    w3, b3 = rand(256, 256), rand(256)
    feats = rand(1, 256, *hw).contiguous(memory_format=torch.channels_last)
    embed = rand(1, 100, 256)
    logits = rand(1, tokens, 8, 12) * 3
    backbone = TimmBackbone("resnet50", freeze_bn=True).eval()
    plain = unfolded(backbone)
    image = rand(1, 3, *image_size)
    return [
        ("linear 256->1024 + ReLU", lambda: F.relu(F.linear(x, w1, b1)), lambda: linear(x, w1, b1, relu=True)),
        ("linear 1024->256", lambda: F.linear(h, w2, b2), lambda: linear(h, w2, b2)),
        ("linear 256->256", lambda: F.linear(x, w3, b3), lambda: linear(x, w3, b3)),
        ("mask product", lambda: torch.einsum("bqc,bchw->bqhw", embed, feats), lambda: mask_logits(embed, feats)),
        ("softmax over 12", lambda: logits.softmax(-1), lambda: _softmax_last(logits)),
        ("R50 backbone", lambda: plain(image)["res5"], lambda: backbone(image)["res5"]),
    ]


def bf16_cases(tokens: int = TOKENS) -> list[tuple[str, callable, callable]]:
    """(name, fp32 through oneDNN, bf16 autocast) for the encoder FFN's two linear layers."""
    g = torch.Generator().manual_seed(0)
    x, h = torch.randn(1, tokens, 256, generator=g), torch.randn(1, tokens, 1024, generator=g)
    w1, w2 = torch.randn(1024, 256, generator=g) / 16, torch.randn(256, 1024, generator=g) / 32

    def bf16(fn):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn()  # bf16 out, as the next layer takes it
        return run

    ffn_in, ffn_out = (lambda: linear(x, w1, relu=True)), (lambda: linear(h, w2))
    return [("FFN 256->1024 + ReLU, fp32 vs bf16", ffn_in, bf16(ffn_in)),
            ("FFN 1024->256, fp32 vs bf16", ffn_out, bf16(ffn_out))]


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


def run(repeats: int, cases_fn=cases, **sizes) -> list[dict]:
    rows = []
    with torch.inference_mode():
        for name, standard, fast in cases_fn(**sizes):
            diff = max_rel_diff(standard(), fast())
            times = {"standard": [], "fast": []}
            for _ in range(repeats):
                for key, fn in (("standard", standard), ("fast", fast)):
                    t0 = time.perf_counter()
                    fn()
                    times[key].append((time.perf_counter() - t0) * 1000)
            ms = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"case": name, **ms, "speedup": ms["standard"] / ms["fast"], "max_rel_diff": diff})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the proscale command does (proscale/cpu_policy.py)
    rows = run(args.repeats)
    print(f"{args.threads} threads, fp32, inference, median of {args.repeats} rounds in turns")
    print("| case | standard op ms | proscale's path ms | speed-up | max rel. difference |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['standard']:.1f} | {r['fast']:.1f} | {r['speedup']:.2f}x | {r['max_rel_diff']:.1e} |")
    if cpu_units("bf16"):
        print(f"\nbf16 units ({', '.join(cpu_units('bf16'))}): fp32 (oneDNN) against bf16 autocast")
        print("| case | fp32 ms | bf16 ms | speed-up | max rel. difference |")
        print("|---|---:|---:|---:|---:|")
        for r in run(args.repeats, bf16_cases):
            print(f"| {r['case']} | {r['standard']:.1f} | {r['fast']:.1f} | {r['speedup']:.2f}x | {r['max_rel_diff']:.1e} |")


if __name__ == "__main__":
    main()
