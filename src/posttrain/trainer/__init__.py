"""The training loop and its plumbing: batch sources, optimiser/schedule, checkpoints, metrics."""
