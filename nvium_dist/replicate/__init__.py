"""tools/replicate.py: the small-scale reproduction of the N-vium claim (train, export, evaluate, bench, report)."""
