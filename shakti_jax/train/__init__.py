"""Training: optimizer, losses, sharded steps, checkpoints, metrics and the trainer loop."""
