"""Training and inference machinery: the networks, inferers, checkpoints and non-finite guards."""
