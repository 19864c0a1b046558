"""A test helper: weights moved off their init, so that a weight mapped to the wrong place, or
not at all, changes a model's outputs (the parity and round-trip tests)."""
import torch


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Moves every float parameter and saved buffer away from its init (zeros, ones, identity
    offsets); running variances become positive draws; transformers' loss buffers (criterion.*)
    and buffers outside the state dict (not saved, so not weights) stay. Returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    saved = set(model.state_dict())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.is_floating_point() or name.startswith("criterion.") or name not in saved:
            continue
        if name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            continue
        std = float(t.std()) if t.numel() > 1 else 0.0
        t.add_(torch.randn(t.shape, generator=g) * (0.5 * std if std > 0 else 0.05))
    return model.eval()
