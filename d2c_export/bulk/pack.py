"""A finished bulk directory as one `.npz`: `arr_0`, uint8 N x H x W x 3 in index order (the ADM evaluator's
format, as LlamaGen's `sample_c2i_ddp.py` writes it), and the generated PNGs read back for scoring."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from d2c_export.bulk.shards import BulkError, BulkPlan, ShardStore, png_name
from d2c_export.images import read_png
from reference.files import atomic_path, not_a_readable_file, sha256_file


def read_samples(store: ShardStore, count: int, digests: dict[str, str] | None = None) -> np.ndarray:
    """PNGs 0..count-1 of `store` as (N, H, W, 3) uint8, each checked against its recorded sha256 when given, all
    of the first one's size."""
    images: list[np.ndarray] = []
    for index in range(count):
        path = store.directory / png_name(index)
        problem = not_a_readable_file(path)
        if problem:
            raise BulkError(f"{path} {problem}; rerun the generating command to complete the set")
        if digests is not None and sha256_file(path) != digests.get(path.name):
            raise BulkError(f"{path} does not match its shard record (replaced or changed); rerun the generating "
                            "command to redo it")
        try:
            images.append(read_png(path, None if not images else images[0].shape[1::-1]))
        except ValueError as exc:
            raise BulkError(f"{exc}; rerun the generating command to redo it") from None
    if not images:
        raise BulkError(f"{store.directory} records no image; rerun the generating command")
    return np.stack(images)


def read_directory(directory: str | Path) -> tuple[np.ndarray, list[int], str]:
    """A finished `d2c-generate` directory: (pixels (N, H, W, 3) uint8, labels, a description of its settings),
    every PNG checked against its shard record."""
    store = ShardStore(Path(directory))
    record = store.read_samples()
    if record is None:
        raise BulkError(f"{store.samples_json} is missing; --samples takes a directory written by d2c-generate")
    if not record["complete"]:
        raise BulkError(f"{directory} is not complete; rerun its d2c-generate command first")
    settings, labels = record["settings"], record["labels"]
    plan = BulkPlan.from_settings(settings)
    description = (f"{settings['model']}, {settings['backend']}-{settings['precision']}, seed {settings['seed']}, "
                   + ", ".join(f"{k} {v}" for k, v in settings["sampling"].items() if v is not None))
    return read_samples(store, len(labels), store.recorded_digests(plan)), labels, description


def sample_files(directory: str | Path) -> list[Path]:
    """The files `read_directory` reads."""
    return ShardStore(Path(directory)).files()


def pack_npz(store: ShardStore, plan: BulkPlan) -> str:
    """Write `DIR.npz` from every index of the plan (all shards must be finished); returns its sha256."""
    pixels = read_samples(store, plan.num_images, store.recorded_digests(plan))
    with atomic_path(store.npz) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, arr_0=pixels)
        digest = sha256_file(tmp)
    return digest
