"""Data: the prepared-dataset format and its readers, trajectory shards, feature spaces for FID."""
