"""Replaying recorded official draws through our sampler, and the distributions the official code samples from."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.sampling import BatchDraws, filter_logits


class ReplayDraws(BatchDraws):
    """Returns recorded draws in order and checks each has the shape the caller asks for."""

    def __init__(self, records: Sequence[tuple[str, Tensor]]):
        self._records = list(records)
        self._next = 0

    def _pop(self, kind: str, shape: Sequence[int]) -> Tensor:
        if self._next >= len(self._records):
            raise IndexError(f"replay exhausted: asked for {kind}{tuple(shape)} after {self._next} draws")
        rec_kind, value = self._records[self._next]
        if rec_kind != kind or tuple(value.shape) != tuple(shape):
            raise ValueError(f"draw {self._next}: asked for {kind}{tuple(shape)}, "
                             f"recorded {rec_kind}{tuple(value.shape)}")
        self._next += 1
        return value

    def uniform(self, shape: Sequence[int]) -> Tensor:
        return self._pop("uniform", shape).to(torch.float64)

    def normal(self, shape: Sequence[int]) -> Tensor:
        return self._pop("normal", shape).to(torch.float32)

    def permutation(self, n: int) -> Tensor:
        return self._pop("permutation", (n,)).to(torch.int64)

    @property
    def exhausted(self) -> bool:
        return self._next == len(self._records)


def logits_to_probs(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """(B, V) logits -> (B, V) float32 sampling probabilities."""
    return F.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)


def uniforms_for_outcome(scores: Tensor, index: Tensor) -> Tensor:
    """(B, V) uniforms with which `sample_gumbel` picks `index`: replays a recorded categorical draw.

    The chosen token gets a Gumbel value of about +36 and every other one about -3.6, enough to
    overcome any finite score gap below 39; a filtered (-inf) token cannot be forced.
    """
    u = torch.full(scores.shape, 1e-16, dtype=torch.float64)
    return u.scatter(-1, index.view(-1, 1), 1.0 - 2.0 ** -52)
