"""Fast samplers beside the exact one: the `fast` preset, named setting sets, and LazyMAR's condition cache.

Both speed-ups are training-free changes to the sampler on the same weights, options of the one shared loop
(`reference.pipeline`); with them off the loop is MAR's exact sampler.
- Diffusion-step annealing (DiSA): the denoising steps of each masked step fall from `diffusion_steps` (or
  `diffusion_anneal_start`) to `diffusion_floor` over the masked steps (`reference.diffusion.annealed_counts`).
- Lazy MAR steps (LazyMAR's condition cache): between full mar steps the unconditional conditions are the
  conditional ones plus the guidance difference kept from the last full step (`ConditionCache`), so the `mar`
  stage runs on the conditional half alone. Guided generations only: without guidance there is no other half.
LazyMAR's token cache (recomputing only the tokens whose features change) needs a `mar` graph over cached keys and
values of every layer; it is not built (README, "Fast samplers").
"""
from __future__ import annotations

from enum import Enum
from typing import Callable

import torch
from torch import Tensor

from reference.errors import BadInput, Setting


class Sampler(str, Enum):
    EXACT = "exact"  # MAR's and LlamaGen's sampler, bit for bit
    FAST = "fast"  # the speed preset: `fast_settings` over the other settings


ANNEAL_FIELDS = ("diffusion_anneal", "diffusion_anneal_start")
LAZY_FIELDS = ("lazy_mar", "lazy_mar_warmup")
# The settings of the fast samplers that a named set replaces (the annealing floor is the model's, kept).
SAMPLER_FIELDS = ("sampler",) + ANNEAL_FIELDS + LAZY_FIELDS


def fast_settings(values: dict[str, object]) -> dict[str, object]:
    """What `sampler="fast"` stands for, given the other settings (`values`: field -> value).

    DiSA's MAR setting, linear annealing from 50 of MAR's 100 denoising steps down to 5: here from half the
    diffusion steps (never below the floor) down to `diffusion_floor` (the model's own where its settings record
    one; the demo's head needs 250). LazyMAR's refresh rule: a full mar step every 9 after 5 full ones (its
    `fresh_t` and `start_step`), where the generation is guided (there is no other half without guidance).
    """
    guided = values["cfg"] != 1.0
    return {"diffusion_anneal": "linear",
            "diffusion_anneal_start": min(values["diffusion_steps"], max(values["diffusion_floor"],
                                                                         values["diffusion_steps"] // 2)),
            "lazy_mar": 9 if guided else 0, "lazy_mar_warmup": 5}


# Named setting sets over a model's settings, to measure each option against the exact sampler in one run
# (`d2c-bench --samplers`, `d2c-quality --samplers`): each option alone as the preset sets it, and the preset.
SAMPLER_SETS: dict[str, Callable[[dict[str, object]], dict[str, object]]] = {
    "exact": lambda values: {},
    "anneal": lambda values: {k: v for k, v in fast_settings(values).items() if k in ANNEAL_FIELDS},
    "lazy": lambda values: {"lazy_mar": 9, "lazy_mar_warmup": 5},
    "fast": lambda values: {"sampler": Sampler.FAST.value},
}


def expand_preset(sampler: Sampler, values: dict[str, object], defaults: dict[str, object]) -> dict[str, object]:
    """The settings `sampler` stands for, to write over `values` (field -> value).

    A setting the preset decides that was given another value than its default and the preset's is refused (one
    line naming the flag), so a recorded, already expanded set of settings expands to itself.
    """
    if sampler is Sampler.EXACT:
        return {}
    out = fast_settings(values)
    for name, value in out.items():
        if values[name] not in (defaults[name], value):
            raise BadInput(f"is {values[name]!r}, but ", Setting("sampler", "fast"), f" sets it to {value!r}: leave "
                           "it out, or use ", Setting("sampler", "exact"), " with the options named", setting=name)
    return out


def full_mar_steps(num_iter: int, interval: int, warmup: int) -> list[bool]:
    """Per masked step, whether the `mar` stage runs in full (both halves); all of them when `interval` is 0.

    LazyMAR's rule (`global_force_fresh`): step s is full when s < warmup or (s - warmup) % interval == 0.
    """
    if interval == 0:
        return [True] * num_iter
    return [s < warmup or (s - warmup) % interval == 0 for s in range(num_iter)]


class ConditionCache:
    """LazyMAR's condition cache over the `mar` stage's conditions z of a guided batch of `bsz` images.

    A full step asks for the conditions at every position (`all_positions`) of both halves and keeps
    diff = z_uncond - z_cond (B, L, Dd); a lazy step runs the conditional half only and rebuilds the
    unconditional half at the positions it predicts as z_cond + diff.
    """

    def __init__(self, bsz: int, seq_len: int, device: str | torch.device):
        self.bsz = bsz
        self.all_positions = torch.arange(seq_len, device=device).expand(2 * bsz, seq_len)  # (2B, L)
        self.diff: Tensor | None = None

    def full(self, z_all: Tensor, pred: Tensor) -> Tensor:
        """Keep the difference of `z_all` (2B, L, Dd), conditional rows first; -> its rows at `pred` (2B, P, Dd)."""
        self.diff = z_all[self.bsz:] - z_all[:self.bsz]  # (B, L, Dd)
        return z_all.gather(1, pred.unsqueeze(-1).expand(-1, -1, z_all.shape[-1]))

    def lazy(self, z_cond: Tensor, pred: Tensor) -> Tensor:
        """Conditional conditions (B, P, Dd) at `pred` (B, P) -> both halves (2B, P, Dd), the unconditional rebuilt."""
        if self.diff is None:
            raise RuntimeError("a lazy mar step before any full one: the first masked step must run in full")
        diff = self.diff.gather(1, pred.unsqueeze(-1).expand(-1, -1, z_cond.shape[-1]))  # (B, P, Dd)
        return torch.cat([z_cond, z_cond + diff])
