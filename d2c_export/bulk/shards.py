"""What a bulk run generates and what it has finished: labels and seeds by index, shards, their records on disk.

Image `i` of a run with seed S draws from its own generator seeded S + i, and its label is a function of `i`
alone: MAR's evaluation order (`engine_mar.py`: `np.arange(class_num).repeat(num_images // class_num)`), so the
first `per_class` images are of the first class, the next `per_class` of the second, and so on. Indices are cut
into shards of `batch` consecutive images; a shard is finished when its record `.shards/{k:06d}.json` exists and
every PNG it lists is there with the sha256 it records. The record is written after the PNGs, each file under a
temporary name and renamed, so a killed run leaves either a finished shard or one that is done again.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from d2c_export.stages import MAX_EXPORT_BATCH
from reference.errors import BadInput
from reference.files import (leftover_temporaries, not_a_readable_file, remove_leftovers, sha256_file,
                             write_json_atomic)
from reference.json_files import ANY, SCALAR, Bool, Int, JsonError, ListOf, MapOf, Obj, Str, read_json

SAMPLES_JSON = "samples.json"
SHARDS_DIR = ".shards"
PNG_NAME = re.compile(r"^\d{6,}\.png$")
MAX_IMAGES = 1_000_000  # images of one run at most (ImageNet FID takes 50,000); every label is held in memory
MAX_CLASS = 1 << 20  # the largest class label a settings record may hold (a model's own range is checked apart)
HEX_DIGEST = Str(pattern="[0-9a-f]{64}")
# samples.json: the run's settings (BulkPlan.settings), the label of every index, whether DIR.npz is packed (with its
# sha256), and one summary per run.
SETTINGS_SCHEMA = Obj({"engines_sha256": HEX_DIGEST, "model": Str(max_len=256), "backend": Str(max_len=64),
                       "precision": Str(max_len=64), "sampling": MapOf(SCALAR),
                       "classes": ListOf(Int(0, MAX_CLASS), min_len=1, max_len=MAX_IMAGES),
                       "per_class": Int(1, MAX_IMAGES), "seed": Int(0, 2 ** 63 - 1), "batch": Int(1, MAX_EXPORT_BATCH),
                       "num_images": Int(1, MAX_IMAGES)})
SAMPLES_SCHEMA = Obj({"command": Str(max_len=64), "settings": SETTINGS_SCHEMA,
                      "labels": ListOf(Int(0, MAX_CLASS), max_len=MAX_IMAGES), "complete": Bool(),
                      "runs": ListOf(MapOf(ANY))}, {"npz_sha256": HEX_DIGEST})
# .shards/{k:06d}.json: a finished shard's indices, the worker that made it, and every PNG's sha256.
RECORD_SCHEMA = Obj({"shard": Int(0, MAX_IMAGES), "start": Int(0, MAX_IMAGES), "stop": Int(0, MAX_IMAGES),
                     "worker": MapOf(SCALAR), "sha256": MapOf(HEX_DIGEST, key=PNG_NAME.pattern.strip("^$"))})


class BulkError(BadInput):
    """A bulk output directory that this command may not write, or a run that cannot complete."""


def png_name(index: int) -> str:
    return f"{index:06d}.png"


def balanced_labels(classes: list[int], per_class: int) -> list[int]:
    """Label of every index: `per_class` images of `classes[0]`, then of `classes[1]`, ... (MAR's order)."""
    return [c for c in classes for _ in range(per_class)]


@dataclass(frozen=True)
class Shard:
    number: int
    start: int  # first index
    stop: int  # one past the last index

    @property
    def indices(self) -> range:
        return range(self.start, self.stop)


@dataclass(frozen=True)
class BulkPlan:
    """Everything that decides the images of a run (and so must match when a run is resumed)."""

    engines_sha256: str  # of the engines' manifest.json
    model: str
    backend: str
    precision: str
    sampling: dict
    classes: list[int]
    per_class: int
    seed: int  # image i draws from a generator seeded seed + i
    batch: int  # images per shard (one generation)

    @property
    def num_images(self) -> int:
        return len(self.classes) * self.per_class

    @property
    def labels(self) -> list[int]:
        return balanced_labels(self.classes, self.per_class)

    def seeds(self, shard: Shard) -> list[int]:
        return [self.seed + i for i in shard.indices]

    def shards(self) -> list[Shard]:
        n = self.num_images
        return [Shard(k, start, min(start + self.batch, n)) for k, start in enumerate(range(0, n, self.batch))]

    def settings(self) -> dict:
        return {**asdict(self), "num_images": self.num_images}

    @classmethod
    def from_settings(cls, settings: dict) -> "BulkPlan":
        """The plan a samples.json's settings (SETTINGS_SCHEMA's shape) record."""
        return cls(**{f.name: settings[f.name] for f in fields(cls)})

    def differences(self, recorded: dict) -> list[str]:
        """The settings in which `recorded` (a samples.json's) differs from this plan, as `name X (recorded Y)`."""
        mine = self.settings()
        keys = sorted(set(mine) | set(recorded))
        out = []
        for k in keys:
            if k == "sampling" and isinstance(recorded.get(k), dict):
                out += [f"{s} {mine[k].get(s)} (recorded {recorded[k].get(s)})"
                        for s in sorted(set(mine[k]) | set(recorded[k])) if mine[k].get(s) != recorded[k].get(s)]
            elif mine.get(k) != recorded.get(k):
                shown = "the engines' manifest" if k == "engines_sha256" else None
                out.append(f"{shown} differs" if shown else f"{k} {mine.get(k)} (recorded {recorded.get(k)})")
        return out


class ShardStore:
    """The output directory of a run: its PNGs, the shard records and samples.json."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.records = self.directory / SHARDS_DIR

    @property
    def samples_json(self) -> Path:
        return self.directory / SAMPLES_JSON

    @property
    def npz(self) -> Path:
        """`DIR.npz` beside the directory, the ADM evaluator's format."""
        return self.directory.with_name(self.directory.name + ".npz")

    def read_samples(self) -> dict | None:
        """The directory's samples.json, checked against its schema and itself (labels, count), or None."""
        if not os.path.lexists(self.samples_json):
            return None
        try:
            record = read_json(self.samples_json, SAMPLES_SCHEMA)
        except (OSError, JsonError) as exc:
            raise BulkError(f"{self.samples_json} is not a valid samples record ({exc}); move it away or write "
                            "elsewhere") from None
        plan = BulkPlan.from_settings(record["settings"])
        if plan.num_images != record["settings"]["num_images"] or record["labels"] != plan.labels:
            raise BulkError(f"{self.samples_json} records labels or a count other than its settings give (classes "
                            f"x per_class); it was edited: move it away or write elsewhere")
        return record

    def check_claim(self, plan: BulkPlan, command: str) -> dict | None:
        """The samples.json record when the directory is already this plan's, None when it is new or empty; another
        plan's directory, or one with files not of a run, is refused. Reads only."""
        if self.directory.exists() and not self.directory.is_dir():
            raise BulkError(f"--out {self.directory} is not a directory; name a directory for the PNGs")
        recorded = self.read_samples()
        if recorded is None:
            strays = [p.name for p in self.directory.iterdir()
                      if p.name != SHARDS_DIR and p not in leftover_temporaries(self.directory)] \
                if self.directory.is_dir() else []
            if strays:
                raise BulkError(f"--out {self.directory} holds files that are not from {command} "
                                f"({strays[0]}, ...); name a new or empty directory")
            return None
        differences = plan.differences(recorded["settings"])
        if differences:
            raise BulkError(f"--out {self.directory} holds samples of other settings ({'; '.join(differences)}); "
                            "rerun with the recorded settings to resume, or name another directory")
        return recorded

    def claim(self, plan: BulkPlan, command: str) -> dict:
        """Make the directory this plan's, or check that it already is (`check_claim`): returns the samples.json
        record."""
        recorded = self.check_claim(plan, command)
        if recorded is not None:
            return recorded
        record = {"command": command, "settings": plan.settings(), "labels": plan.labels, "complete": False,
                  "runs": []}
        self.directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.samples_json, record)
        return record

    def remove_leftovers(self) -> list[Path]:
        """What killed runs left under temporary names (PNGs, records, an unfinished DIR.npz)."""
        removed = remove_leftovers(self.directory) + remove_leftovers(self.records)
        prefix = f".{self.npz.name}."
        for p in leftover_temporaries(self.directory.parent):
            if p.name.startswith(prefix):
                p.unlink(missing_ok=True)
                removed.append(p)
        return removed

    def record_path(self, shard: Shard) -> Path:
        return self.records / f"{shard.number:06d}.json"

    def finished(self, shard: Shard) -> bool:
        """The shard's record is there and names exactly its indices, each PNG present with its recorded sha256."""
        files = self.shard_digests(shard)
        if files is None or sorted(files) != [png_name(i) for i in shard.indices]:
            return False
        return all(not_a_readable_file(self.directory / name) is None
                   and sha256_file(self.directory / name) == digest for name, digest in files.items())

    def shard_digests(self, shard: Shard) -> dict[str, str] | None:
        """The PNG digests the shard's record holds, or None when it has no valid record (it is then done again)."""
        path = self.record_path(shard)
        if not os.path.lexists(path):
            return None
        try:
            record = read_json(path, RECORD_SCHEMA)
        except (OSError, JsonError):
            return None
        return record["sha256"] if (record["start"], record["stop"]) == (shard.start, shard.stop) else None

    def write_shard(self, shard: Shard, pngs: list[bytes], worker: dict) -> None:
        """The shard's PNGs, then its record (each written whole under a temporary name, then renamed)."""
        from hashlib import sha256

        from reference.files import write_bytes_atomic
        if len(pngs) != len(shard.indices):
            raise BulkError(f"shard {shard.number} came back with {len(pngs)} images, not {len(shard.indices)}")
        digests = {}
        for index, data in zip(shard.indices, pngs):
            write_bytes_atomic(self.directory / png_name(index), data)
            digests[png_name(index)] = sha256(data).hexdigest()
        self.records.mkdir(exist_ok=True)
        write_json_atomic(self.record_path(shard), {"shard": shard.number, "start": shard.start, "stop": shard.stop,
                                                    "worker": worker, "sha256": digests})

    def recorded_digests(self, plan: BulkPlan) -> dict[str, str]:
        """Every PNG's sha256 as the shard records hold it; BulkError for a shard whose record is missing or invalid."""
        digests: dict[str, str] = {}
        for shard in plan.shards():
            files = self.shard_digests(shard)
            if files is None or sorted(files) != [png_name(i) for i in shard.indices]:
                raise BulkError(f"{self.record_path(shard)} is missing or not a valid record of shard {shard.number}; "
                                "rerun the generating command to redo it")
            digests.update(files)
        return digests

    def files(self) -> list[Path]:
        """Every file of a run in the directory: samples.json, the shard records and the PNGs."""
        found = [self.samples_json]
        if self.records.is_dir():
            found += sorted(self.records.glob("*.json"))
        return found + sorted(p for p in self.directory.glob("*.png") if PNG_NAME.match(p.name))
