"""Training: the model, optimiser, checkpoints, the training digest, locks, several
processes, and the loop of one fold."""
