"""Counting the calls that make the host wait for the device."""
from __future__ import annotations

from collections import Counter

from torch.overrides import TorchFunctionMode

# Tensor -> host calls: on a GPU each waits for the device to finish what it was given.
SYNCING = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"}


class SyncCounter(TorchFunctionMode):
    """Counts every host-synchronising tensor call made while it is active, by name."""

    def __init__(self):
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))
