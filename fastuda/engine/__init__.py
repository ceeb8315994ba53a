"""Training machinery shared by the entry points: checkpoints, metrics, logging, distribution."""
