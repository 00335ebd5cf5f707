"""Training: optimizer and schedules, the beta controller, checkpoints, metrics and the loop."""
