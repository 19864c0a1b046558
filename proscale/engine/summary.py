"""What `proscale train` prints before the first iteration: the model (plan, parameters, GFLOPs at
the training size), the data (sizes, classes, segments per image, with warnings when the model
cannot fit them) and the settings that decide the run. The full resolved config is OUT/config.yaml.
"""
from __future__ import annotations

from torch import nn

from proscale.config import TrainConfig
from proscale.data.stats import segment_stats, size_warnings
from proscale.recipes import training_side


def _gflops(model: nn.Module, size: tuple[int, int]) -> str:
    """"total X, <encoder part> Y" at `size` (counted on a meta-device copy), or why not."""
    from proscale.analysis.detr_flops import count_detr_flops
    from proscale.analysis.flops import count_flops
    from proscale.models.detr import DeformableDETR

    detector = isinstance(model, DeformableDETR)
    try:
        g = (count_detr_flops if detector else count_flops)(model, size).gflops
    except Exception as e:  # noqa: BLE001 - a summary line must never stop a training
        return f"not counted ({type(e).__name__}: {e})"
    part = "encoder" if detector else "pixel_decoder"
    return f"total {g['total']:.2f}, {part.replace('_', ' ')} {g[part]:.2f}"


def startup_summary(cfg: TrainConfig, model: nn.Module, dataset, val_dataset, metadata) -> tuple[str, list[str]]:
    """(the summary's text, its warnings)."""
    mcfg = model.cfg
    stats = segment_stats(dataset)
    side = 0 if cfg.data.augmentation == "none" else int(training_side(cfg))  # 0: the images' own size
    flops_side = int(round(training_side(cfg, dataset)))
    size = (flops_side, flops_side)
    gflops = _gflops(model, size)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    enc = mcfg.encoder
    things = sum(c.isthing for c in metadata.categories)
    lines = [
        f"model: {cfg.preset} | backbone {mcfg.backbone.name} | encoder plan {tuple(enc.plan)}"
        f"{' + TRC' if enc.trc else ''}, {enc.output} output | {mcfg.decoder.num_queries} queries, "
        f"{getattr(mcfg.decoder, 'dec_layers', getattr(mcfg.decoder, 'layers', '?'))} decoder layers",
        f"parameters: {params / 1e6:.2f} M ({trainable / 1e6:.2f} M trained) | GFLOPs at {size[0]}x{size[1]}: "
        f"{gflops}",
        f"data: {', '.join(cfg.data.train)} [{cfg.data.train_split}]: {len(dataset)} images, "
        f"{metadata.num_classes} classes ({things} things, {metadata.num_classes - things} stuff)"
        + (f" | val {cfg.data.val} [{cfg.data.val_split}]: {len(val_dataset)} images" if val_dataset is not None
           else " | no validation data"),
    ]
    warnings = []
    if stats is not None:
        lines.append(stats.describe())
        warnings = size_warnings(stats, mcfg.decoder.num_queries, side)
    s = cfg.solver
    aug = {"lsj": f"LSJ crop {cfg.data.image_size}", "resize": f"resize short side {tuple(cfg.data.min_size_train)}",
           "none": "images at their own size"}.get(cfg.data.augmentation, cfg.data.augmentation)
    lines.append(f"run: {cfg.iterations} iterations x batch {cfg.batch_size} | {s.optimizer} lr {s.lr:g} "
                 f"({s.schedule}, warmup {s.warmup_iters}), clip {s.clip_grad:g} | {aug}"
                 f"{', flips' if cfg.data.flip else ''} | {cfg.loss.num_points} points per mask | "
                 f"test size {cfg.data.min_size_test or 'own'}")
    lines.append(f"config: {cfg.output_dir}/config.yaml")
    return "\n".join(lines), warnings


def log_startup(logger, cfg: TrainConfig, model: nn.Module, dataset, val_dataset, metadata) -> list[str]:
    """Logs the summary and each warning; returns the warnings."""
    text, warnings = startup_summary(cfg, model, dataset, val_dataset, metadata)
    for line in text.splitlines():
        logger.info("%s", line)
    for w in warnings:
        logger.warning("%s", w)
    return warnings

