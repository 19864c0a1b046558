"""`proscale convert`: released weights (detectron2 .pkl / .pth, Hugging Face, safetensors) -> a
proscale checkpoint (weights + model config) that `proscale eval/predict --checkpoint` and
`proscale.checkpoints.load_model` read without further options.

    proscale convert model_final_94dc52.pkl -o m2f_r50.pt                  # Mask2Former R50 (model zoo)
    proscale convert proscale_r50_333.pth -o proscale_r50_333.pt           # the PRO-SCALE release
    proscale convert mine.pkl -o mine.pt --preset proscale_tiny_333 --trc-layout spatial
    proscale convert m2f_r50.pt -o m2f_r50.pkl --to detectron2             # export to detectron2 names
    proscale convert runs/x/model_final.pt -o my_model/ --to pretrained     # config.json + model.safetensors
    proscale convert m2f_r50.pt -o m2f_r50_hf/ --to hf                     # transformers' Mask2Former folder
    proscale convert r50_deformable_detr.pth -o ddetr.pt --preset ddetr_r50 --num-classes 91   # original Deformable DETR
    proscale convert hf_deformable_detr/ -o ddetr.pt                       # transformers' Deformable DETR folder

Without --preset the model config is the file's own (a proscale checkpoint's, a Hugging Face
config.json), else read from the weights: backbone, layer plan, TRC, LPE or conv output, sizes
and classes (attention heads, which the weights do not record, default to 8). detectron2-named
weights with TRC get the "official" TRC layout unless --trc-layout says otherwise: the released
PRO-SCALE weights were trained with it. Loading is strict: every tensor must fit, or nothing is
written (--no-strict writes what fits and lists the rest).

--to pretrained writes a save_pretrained folder (proscale.from_pretrained reads it; class names
and test settings go along). --to hf writes one that transformers'
Mask2FormerForUniversalSegmentation.from_pretrained loads with the same outputs; only
Mask2Former (baseline encoder) models with a timm CNN backbone or a Swin (with output norms)
fit there, others are refused with the reason (proscale.checkpoints.to_hf).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from proscale.checkpoints.errors import CheckpointError
from proscale.checkpoints.from_detectron2 import to_detectron2
from proscale.checkpoints.io import atomic_save, save_model
from proscale.checkpoints.loader import load_model
from proscale.checkpoints.to_hf import save_hf_pretrained

TARGETS = ("proscale", "detectron2", "pretrained", "hf")
from proscale.config import DetrConfig


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert detectron2 / Hugging Face weights to a proscale checkpoint",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="weights: .pkl, .pth/.pt/.bin, .safetensors")
    p.add_argument("-o", "--output", required=True, help="where to write (.pt or .safetensors; .pkl/.pth with "
                                                         "--to detectron2; a folder with --to pretrained / hf)")
    p.add_argument("--preset", help="take this preset's config instead of reading it from the weights")
    p.add_argument("--num-classes", type=int, help="number of classes (default: from the weights)")
    p.add_argument("--trc-layout", choices=["official", "official_conv", "spatial"],
                   help="TRC layout (default: official for detectron2 weights, else the preset's / stored one)")
    p.add_argument("--source", choices=["auto", "proscale", "detectron2", "hf", "deformable-detr"], default="auto",
                   help="naming of the input weights (default: detected)")
    p.add_argument("--to", choices=TARGETS, default="proscale",
                   help="output: a proscale checkpoint, detectron2 naming (Mask2Former / PRO-SCALE code), a "
                        "save_pretrained folder (pretrained), or a transformers Mask2Former folder (hf)")
    p.add_argument("--no-strict", action="store_true", help="write even when some tensors do not fit")
    p.set_defaults(func=_main)


def _describe(cfg) -> str:
    e = cfg.encoder
    trc = f"TRC (temperature {e.trc_temperature}, {e.trc_layout} layout)" if e.trc else "no TRC"
    if isinstance(cfg, DetrConfig):
        d = cfg.decoder
        return (f"Deformable DETR: backbone {cfg.backbone.name}, encoder plan {tuple(e.plan)} ({sum(e.plan)} layers, "
                f"d_model {e.d_model}), {trc}, decoder {d.layers} layers x {d.num_queries} queries, box refine "
                f"{d.box_refine}, two-stage {d.two_stage}, {cfg.num_classes} classes")
    return (f"backbone {cfg.backbone.name}, encoder plan {tuple(e.plan)} ({sum(e.plan)} layers, d_model {e.d_model}, "
            f"{e.n_heads} heads x {e.n_points} points), {trc}, output {e.output}, decoder {cfg.decoder.dec_layers} "
            f"layers x {cfg.decoder.num_queries} queries, {cfg.num_classes} classes")


def convert(input_path: str | Path, output_path: str | Path, preset: str | None = None,
            num_classes: int | None = None, trc_layout: str | None = None, source: str = "auto",
            to: str = "proscale", strict: bool = True):
    """Reads `input_path` with `load_model` (which builds the model it describes) and writes
    `output_path`. Returns (LoadReport, ModelConfig). Raises CheckpointError when the weights do
    not fit; then nothing is written."""
    input_path, output_path = Path(input_path), Path(output_path)
    if to == "proscale" and output_path.suffix.lower() in (".pkl", ".pickle"):
        raise CheckpointError(f"{output_path}: a proscale checkpoint is .pt or .safetensors (.pkl needs --to detectron2)")
    overrides = [f"encoder.trc_layout={trc_layout}"] if trc_layout else []
    model, info = load_model(input_path, preset=preset, overrides=overrides, num_classes=num_classes, strict=strict,
                             source=source)
    return _write(model, info, output_path, to), info.config


def _inference_settings(train_config: dict | None) -> dict:
    """The test settings a training checkpoint stores: {"min_size_test", "max_size_test", **test}."""
    train_config = train_config or {}
    data = train_config.get("data") or {}
    out = {k: data[k] for k in ("min_size_test", "max_size_test") if k in data}
    out.update(train_config.get("test") or {})
    return out


def _write(model, info, output_path: Path, to: str):
    report = info.report
    if to in ("pretrained", "hf") and output_path.exists() and not output_path.is_dir():
        raise CheckpointError(f"{output_path}: exists and is a file; --to {to} writes a folder")
    if to == "proscale":
        save_model(model, output_path, extra={"metadata": info.metadata} if info.metadata else None)
    elif to == "pretrained":
        model.save_pretrained(output_path, metadata=info.metadata,
                              inference=_inference_settings(info.train_config) or None)
    elif to == "hf":
        settings = _inference_settings(info.train_config)
        save_hf_pretrained(model, output_path, info.metadata, int(settings.get("min_size_test", 800)),
                           int(settings.get("max_size_test", 1333)))
    else:
        official = to_detectron2(model.state_dict(), numpy=output_path.suffix.lower() in (".pkl", ".pickle"))
        atomic_save({"model": official, "__author__": "proscale"}, output_path)
        if any(k.startswith("backbone.layers.") for k in official) and "backbone.norm0.weight" not in official:
            report.notes.append("detectron2's Swin also expects backbone.norm{0..3} (output norms), which this "
                                "model (backbone.out_norms=false) does not have: they are not in the output")
    return report


def _main(args) -> int:
    try:
        report, cfg = convert(args.input, args.output, preset=args.preset, num_classes=args.num_classes,
                              trc_layout=args.trc_layout, source=args.source, to=args.to,
                              strict=not args.no_strict)
    except CheckpointError as e:
        print(f"proscale convert: {e}", file=sys.stderr)
        return 1
    print(f"model: {_describe(cfg)}")
    print(report)
    print(f"wrote {args.output} ({args.to} naming)")
    return 0
