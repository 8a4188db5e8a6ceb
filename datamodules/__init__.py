"""Data: the embedded procedural domains, the on-disk datasets, the training stream and views."""
