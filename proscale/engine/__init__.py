"""Training, evaluation and prediction loops, and what they need: optimizer and schedules,
torch.distributed (torchrun DDP), training checkpoints."""
