"""Bulk generation on Ray (`d2c-generate`): shards of indices, workers, resumable output, the ADM `.npz`."""
