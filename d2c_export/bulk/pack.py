"""A finished bulk directory as one `.npz`: `arr_0`, uint8 N x H x W x 3 in index order (the ADM evaluator's
format, as LlamaGen's `sample_c2i_ddp.py` writes it), and the generated PNGs read back for scoring."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from d2c_export.bulk.shards import BulkError, BulkPlan, ShardStore, png_name
from d2c_export.images import read_png
from reference.files import atomic_path, sha256_file


def read_samples(store: ShardStore, count: int, digests: dict[str, str] | None = None) -> np.ndarray:
    """PNGs 0..count-1 of `store` as (N, H, W, 3) uint8, each checked against its recorded sha256 when given."""
    images = []
    for index in range(count):
        path = store.directory / png_name(index)
        if not path.is_file():
            raise BulkError(f"{path} is missing; rerun the generating command to complete the set")
        if digests is not None and sha256_file(path) != digests.get(path.name):
            raise BulkError(f"{path} does not match its shard record; rerun the generating command to redo it")
        images.append(read_png(path))
    return np.stack(images)


def read_directory(directory: str | Path) -> tuple[np.ndarray, list[int], str]:
    """A finished `d2c-generate` directory: (pixels (N, H, W, 3) uint8, labels, a description of its settings)."""
    store = ShardStore(Path(directory))
    record = store.read_samples()
    if record is None:
        raise BulkError(f"{store.samples_json} is missing; --samples takes a directory written by d2c-generate")
    if not record.get("complete"):
        raise BulkError(f"{directory} is not complete; rerun its d2c-generate command first")
    settings, labels = record["settings"], record["labels"]
    description = (f"{settings['model']}, {settings['backend']}-{settings['precision']}, seed {settings['seed']}, "
                   + ", ".join(f"{k} {v}" for k, v in settings["sampling"].items() if v is not None))
    return read_samples(store, len(labels)), labels, description


def pack_npz(store: ShardStore, plan: BulkPlan) -> Path:
    """Write `DIR.npz` from every index of the plan (all shards must be finished)."""
    pixels = read_samples(store, plan.num_images, store.recorded_digests(plan))
    with atomic_path(store.npz) as tmp, open(tmp, "wb") as f:
        np.savez(f, arr_0=pixels)
    return store.npz
