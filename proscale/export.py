"""Export to torch.export (.pt2) and ONNX, each checked against the PyTorch model.

The exported graph takes a (B, 3, H, W) float image batch in 0-255 RGB whose H and W are fixed
at export time (multiples of 32 avoid padding inside the graph) and returns
(pred_logits (B, Q, K+1), pred_masks (B, Q, H/4, W/4)); post-processing stays in Python.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from proscale.models.ms_deform_attn import use_msda_backend


class ExportWrapper(nn.Module):
    """MaskFormer without the Python-side extras (aux outputs, sizes) in its output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images)
        return out["pred_logits"], out["pred_masks"]


def example_input(size: tuple[int, int], batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, *size), generator=g).float()


def export_program(model: nn.Module, size: tuple[int, int], batch: int = 1) -> torch.export.ExportedProgram:
    # The grid_sample reference even where a module was set to another MSDA back end: standard
    # operators only in the exported graph.
    with use_msda_backend(model, "pure"):
        return torch.export.export(ExportWrapper(model).eval(), (example_input(size, batch),))


def export_onnx(model: nn.Module, path: str | Path, size: tuple[int, int], batch: int = 1, opset: int = 17) -> Path:
    """Writes an ONNX file (opset >= 16: GridSample is needed)."""
    if opset < 16:
        raise ValueError("ONNX export needs opset >= 16 (GridSample)")
    path = Path(path)
    wrapper = ExportWrapper(model).eval()
    with torch.no_grad(), use_msda_backend(model, "pure"):
        # The TorchScript-based exporter needs no extra packages; it handles every op we use.
        torch.onnx.export(wrapper, (example_input(size, batch),), str(path), opset_version=opset, dynamo=False,
                          input_names=["images"], output_names=["pred_logits", "pred_masks"])
    return path


def max_abs_diff_pt2(model: nn.Module, program: torch.export.ExportedProgram, size, batch: int = 1) -> float:
    x = example_input(size, batch, seed=1)
    with torch.no_grad():
        ref = ExportWrapper(model).eval()(x)
        got = program.module()(x)
    return max((a - b).abs().max().item() for a, b in zip(ref, got))


def max_abs_diff_onnx(model: nn.Module, path: str | Path, size, batch: int = 1) -> float:
    """Runs the ONNX file with onnxruntime on CPU and compares with PyTorch."""
    import onnxruntime as ort

    x = example_input(size, batch, seed=1)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        ref = ExportWrapper(model).eval()(x)
    return max(float(abs(r.numpy() - g).max()) for r, g in zip(ref, got))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="export to torch.export (.pt2) or ONNX and check it", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="weights: a proscale checkpoint, detectron2 .pkl / .pth, or a "
                                           "Hugging Face folder")
    src.add_argument("--preset", help="a preset with random weights (for trying the export)")
    p.add_argument("--format", choices=["onnx", "pt2"], default="onnx")
    p.add_argument("--size", default="800x1088", help="HxW of the exported input")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=_main)


def _main(args) -> int:
    import proscale

    if args.checkpoint:
        from proscale.checkpoints.loader import load_model

        model, _ = load_model(args.checkpoint)
    else:
        model = proscale.build_model(args.preset)
    model.eval()
    h, w = (int(v) for v in args.size.lower().split("x"))
    if args.format == "pt2":
        program = export_program(model, (h, w), args.batch)
        torch.export.save(program, args.output)
        diff = max_abs_diff_pt2(model, program, (h, w), args.batch)
    else:
        export_onnx(model, args.output, (h, w), args.batch, args.opset)
        diff = max_abs_diff_onnx(model, args.output, (h, w), args.batch)
    print(f"wrote {args.output}; max abs difference vs PyTorch on a test image: {diff:.2e}")
    return 0 if diff <= 1e-3 else 1
