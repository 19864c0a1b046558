"""Backbones from timm (`features_only`), returning res2..res5 (strides 4, 8, 16, 32).

Weights (`BackboneConfig.pretrained`): "" random; "hub" timm downloads them (needs the model
hub); a path: a local .safetensors / .pth / .bin in timm's key names (torchvision's ResNet
names are the same). A local file is checked first against the model (timm's own
checkpoint_filter_fn applied, as timm does), so a wrong file stops with the missing, unexpected
and wrong-shape keys named; then timm loads it exactly as it loads hub weights.
"""
from __future__ import annotations

import sys
from pathlib import Path

import timm
import torch
from torch import nn

from proscale.config import BackboneConfig
from proscale.models.frozen_bn import fold_frozen_norms_, frozen_norms_in_input_dtype_
from proscale.models.swin import make_original_swin_

NAMES = ("res2", "res3", "res4", "res5")


class BackboneWeightsError(ValueError):
    """A local backbone weights file that does not fit the backbone (names the file and keys)."""


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneWeightsError(f"backbone.pretrained={path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear error
        raise BackboneWeightsError(f"backbone.pretrained={path}: cannot read it as weights: {e}") from None
    for key in ("state_dict", "model", "module"):  # common wrappers of a checkpoint's weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneWeightsError(f"backbone.pretrained={path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def check_weights_file(name: str, path: str | Path, **kwargs) -> None:
    """Raises BackboneWeightsError unless every weight of timm model `name` (its classifier
    aside) is in the file with its shape, and the file holds nothing else."""
    path = Path(path)
    model = timm.create_model(name, pretrained=False, **kwargs)
    state = _read_state_dict(path)
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    head = model.pretrained_cfg.get("classifier") or ()
    head = (head,) if isinstance(head, str) else tuple(head)

    def is_head(key: str) -> bool:
        return any(key.startswith(h + ".") for h in head)

    target = {k: v for k, v in model.state_dict().items() if not is_head(k)}
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target and not is_head(k)]
    wrong = [f"{k}: file {tuple(state[k].shape)}, model {tuple(v.shape)}" for k, v in target.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"{title} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                 for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise BackboneWeightsError(f"backbone.pretrained={path} does not fit timm's {name}: " + "; ".join(parts))


class TimmBackbone(nn.Module):
    """Wraps a timm `features_only` model (module docstring for `pretrained`).

    forward: (B, 3, H, W) normalised images -> {"res2": (B, C2, H/4, W/4), ..., "res5": (B, C5, H/32, W/32)}
    out_norms: a LayerNorm over the channels of each output map (`out_norms.i`), as the original
    Swin's output stages have (detectron2's backbone.norm{i}).
    """

    def __init__(self, name: str, pretrained: str | bool = "", freeze_bn: bool = False, drop_path_rate: float = 0.0,
                 freeze_at: int = 0, out_norms: bool = False):
        super().__init__()
        pretrained = {True: "hub", False: ""}.get(pretrained, pretrained)  # configs written before it was a path
        kwargs = {"features_only": True}
        model_kwargs = {}
        if drop_path_rate:
            model_kwargs["drop_path_rate"] = drop_path_rate
        swin = "swin" in name
        if swin:
            # Accept any input size that is a multiple of 32 (windows are padded inside), and keep
            # every window shift: the original Swin's windows (models/swin.py).
            model_kwargs.update(strict_img_size=False, always_partition=True)
        if pretrained in ("hub", "true"):
            kwargs["pretrained"] = True
        elif pretrained:
            check_weights_file(name, pretrained, **model_kwargs)
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(pretrained)})
        body = timm.create_model(name, **kwargs, **model_kwargs)
        reductions = body.feature_info.reduction()
        wanted = [reductions.index(r) for r in (4, 8, 16, 32)]
        if len(reductions) != 4:
            body = timm.create_model(name, out_indices=tuple(wanted), **kwargs, **model_kwargs)
        self.body = make_original_swin_(body) if swin else body
        self.channels = body.feature_info.channels()
        self.names = NAMES
        # Swin / ConvNeXt-style timm models may return channels-last maps.
        self.channels_last = getattr(body, "output_fmt", "NCHW") == "NHWC"
        # A convolutional body (ResNet) runs its inference in channels-last: oneDNN's convolutions
        # are faster so on CPU (R50 at 800x1088, 2 threads: 1115 -> 851 ms fp32, 837 -> 589 ms
        # bf16; docs/speed.md). Training keeps the default layout (see PixelDecoder.forward_fpn).
        self.convolutional = not swin and not self.channels_last
        self.out_norms = nn.ModuleList(nn.LayerNorm(c) for c in self.channels) if out_norms else None
        if freeze_bn:
            timm.layers.freeze_batch_norm_2d(self.body)
            frozen_norms_in_input_dtype_(self.body)
            fold_frozen_norms_(self.body)  # at inference only (models/frozen_bn.py)
        if freeze_at:
            freeze_stages(self.body, freeze_at)
            if freeze_at == 5 and self.out_norms is not None:
                self.out_norms.requires_grad_(False)

    @property
    def out_channels(self) -> dict[str, int]:
        return dict(zip(self.names, self.channels))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.convolutional and not torch.is_grad_enabled() and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        feats = self.body(x)
        if self.out_norms is not None:  # LayerNorm over channels: on (B, H, W, C) maps
            feats = [f if self.channels_last else f.permute(0, 2, 3, 1) for f in feats]
            feats = [norm(f).permute(0, 3, 1, 2) for norm, f in zip(self.out_norms, feats)]
        elif self.channels_last:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        return dict(zip(self.names, feats))


def freeze_stages(body: nn.Module, freeze_at: int) -> list[str]:
    """Stops training the stem (freeze_at >= 1) and res2..res{freeze_at}: every child module of
    the features model up to the one that outputs that level (detectron2's FREEZE_AT). Returns
    the frozen children's names."""
    if not 0 <= freeze_at <= 5:
        raise ValueError(f"backbone.freeze_at must be 0..5, got {freeze_at}")
    modules = [info["module"] for info in body.feature_info.get_dicts()]  # the module of each level, res2 first

    def owns(child: str, module: str) -> bool:  # FeatureListNet flattens "layers.0" to "layers_0"
        return child in (module, module.replace(".", "_")) or module.startswith(child + ".")

    frozen = []
    for child_name, child in body.named_children():
        if freeze_at == 1 and owns(child_name, modules[0]):
            break  # the stem is what comes before res2's module
        child.requires_grad_(False)
        frozen.append(child_name)
        if freeze_at >= 2 and owns(child_name, modules[freeze_at - 2]):
            break
    return frozen


def build_backbone(cfg: BackboneConfig) -> TimmBackbone:
    return TimmBackbone(cfg.name, pretrained=cfg.pretrained, freeze_bn=cfg.freeze_bn, drop_path_rate=cfg.drop_path_rate,
                        freeze_at=5 if cfg.freeze else cfg.freeze_at, out_norms=cfg.out_norms)
