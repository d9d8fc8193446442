"""Datasets that own samples: shard folders, local image folders, in-memory sequences."""
