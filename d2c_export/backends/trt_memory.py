"""The activation memory of TensorRT execution contexts: one user-managed scratch allocation per engine (`Scratch`),
shared by all its contexts, and the calls that size and hand it over under the names of TensorRT 10.x and 11.x.

A context made with the default strategy (STATIC) holds activation memory for the profile's largest shapes for as
long as it lives, and the backend makes one context per captured shape and per captured denoising loop, so a
serving mix of batch sizes would hold that maximum dozens of times over.
Contexts made USER_MANAGED hold none; before each enqueue, capture or replay their engine hands them its one
scratch, which `update_device_memory_size_for_shapes` sized for the shapes they are bound to (it "recompute[s] the
internal activation buffer sizes based on the current input shapes, and return[s] the total amount of memory
required", NvInferRuntime.h) and which never grows past the profile's upper bound
(`get_device_memory_size_for_profile_v2`). Sharing it is sound because an engine's contexts never run at the same
time: every enqueue and replay is issued in order on the backend's one stream (setDeviceMemoryV2: the memory is
in use from the enqueue until the work is complete and must not be used by "another execution context running in
parallel").

When a context needs more than the scratch has, the scratch is allocated anew, larger (`Scratch.fit`; at least
double, up to the profile's bound, so it moves a few times at most), and every context given the old one is
given the new one before it runs again; a graph captured with the old one is captured again (`Engine.attach`).

Names: TensorRT 10.1 added `device_memory_size_v2`, `get_device_memory_size_for_profile_v2` and
`set_device_memory(memory, size)` and deprecated `device_memory_size`, `get_device_memory_size_for_profile` and the
`device_memory` setter, which TensorRT 11 removes. The V2 names are used wherever they exist; a V1 name is read only
where its V2 form is missing (TensorRT 10.0), so 10.1+ never warns and 11 never misses a name.
"""
from __future__ import annotations

import torch
from torch import Tensor


def user_managed_context(trt, engine):
    """An execution context that holds no activation memory of its own (`give_memory` before it runs)."""
    return engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)


def profile_memory_bytes(engine) -> int:
    """The most activation memory one context of `engine` (one optimisation profile) can need."""
    if hasattr(engine, "get_device_memory_size_for_profile_v2"):
        return int(engine.get_device_memory_size_for_profile_v2(0))
    return int(engine.device_memory_size)  # TensorRT 10.0


def memory_needed(context, engine) -> int:
    """Activation memory `context` needs for the input shapes set on it (after every input's shape is set)."""
    if not hasattr(context, "set_device_memory"):  # TensorRT 10.0's setter takes no size: it may use the bound
        return profile_memory_bytes(engine)
    if hasattr(context, "update_device_memory_size_for_shapes"):
        need = int(context.update_device_memory_size_for_shapes())
        if need > 0:
            return need
    return profile_memory_bytes(engine)  # no size for these shapes: the profile's upper bound


def give_memory(context, address: int, size: int) -> None:
    """Hand `context` `size` bytes of device memory at `address` for its activations."""
    if hasattr(context, "set_device_memory"):
        context.set_device_memory(address, size)
    else:  # TensorRT 10.0: the size is taken to be the engine's upper bound
        context.device_memory = address


class Scratch:
    """One engine's activation memory, shared by its contexts; allocated on `stream`, so that memory it gives back
    is reused only after the work issued there before (PyTorch's caching allocator orders frees by stream)."""

    def __init__(self, device, stream, bound: int):
        self.device, self.stream, self.bound = device, stream, bound
        self.tensor: Tensor | None = None
        self.moves = 0  # allocations so far: contexts handed an earlier one are handed the new one before they run

    @property
    def size(self) -> int:
        return 0 if self.tensor is None else self.tensor.numel()

    @property
    def address(self) -> int:
        return 0 if self.tensor is None else self.tensor.data_ptr()

    def fit(self, need: int) -> None:
        """At least `need` bytes from now on: a larger allocation (at least double, within the bound) if short."""
        if need <= self.size:
            return
        size = max(need, min(2 * self.size, self.bound))
        self.tensor = None  # the old one goes back before the new one is taken
        with self.device.use(self.stream):
            self.tensor = self.device.empty((size,), torch.uint8)
        self.moves += 1

    def release(self) -> None:
        self.tensor = None
