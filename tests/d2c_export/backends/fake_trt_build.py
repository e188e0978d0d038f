"""The building half of the contract fake of `tensorrt` (`fake_tensorrt` has the rules and their sources): the
enums, the logger, and the network, parser, profile and builder that `d2c_export.export.trt_build` uses."""
from __future__ import annotations

import json
import warnings
from enum import IntEnum
from pathlib import Path

import numpy as np
import onnx
import torch

from tests.d2c_export.backends.fake_cuda import ContractViolation

ONNX_DTYPES = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.INT64: torch.int64,
                onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.INT32: torch.int32}


class TensorIOMode(IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(IntEnum):
    FLOAT = 0
    HALF = 1
    INT32 = 3
    BOOL = 4
    INT64 = 8


TRT_DTYPE = {torch.float32: DataType.FLOAT, torch.float16: DataType.HALF, torch.int32: DataType.INT32,
              torch.int64: DataType.INT64, torch.bool: DataType.BOOL}
TORCH_DTYPE = {v: k for k, v in TRT_DTYPE.items()}


class ExecutionContextAllocationStrategy(IntEnum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class Logger:
    WARNING = 2
    INFO = 3

    def __init__(self, severity: int = WARNING):
        self.severity = severity


class NetworkDefinitionCreationFlag(IntEnum):
    STRONGLY_TYPED = 5


class MemoryPoolType(IntEnum):
    WORKSPACE = 0


class BuilderFlag(IntEnum):
    TF32 = 7


def nbytes_of(shape, dtype: torch.dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()


class FakeApi:
    """What the fake module's builders, parsers and runtimes share: the module (its device, API version, loggers)."""

    trt: "FakeTensorRT"  # set on the subclasses each `FakeTensorRT` makes

    def use_logger(self, logger: Logger) -> None:
        self.trt.use_logger(logger)

    def deprecated(self, name: str, instead: str) -> None:
        """A deprecated name: a DeprecationWarning on 10.x; gone on 11.x."""
        if self.trt.major >= 11:
            raise AttributeError(f"{name} was removed in TensorRT 11; use {instead}")
        warnings.warn(f"{name} is deprecated; use {instead}", DeprecationWarning, stacklevel=3)


# -- building ---------------------------------------------------------------------------------------------
class NetworkTensor:
    def __init__(self, name: str, dtype: DataType):
        self.name, self.dtype = name, dtype


class Network:
    def __init__(self, flags: int):
        self.flags = flags
        self.onnx: Path | None = None
        self.inputs: list[NetworkTensor] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> NetworkTensor:
        return self.inputs[i]


class OnnxParser(FakeApi):
    def __init__(self, network: Network, logger: Logger):
        self.use_logger(logger)
        self.network = network
        self.num_errors = 0

    def parse_from_file(self, path: str) -> bool:
        onnx.checker.check_model(path)
        self.network.onnx = Path(path).resolve()
        model = onnx.load(path, load_external_data=False)
        self.network.inputs = [NetworkTensor(i.name, TRT_DTYPE[ONNX_DTYPES[i.type.tensor_type.elem_type]])
                               for i in model.graph.input]
        return True


class OptimizationProfile:
    def __init__(self):
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, name: str, lo, opt, hi) -> None:
        lo, opt, hi = tuple(lo), tuple(opt), tuple(hi)
        if not (len(lo) == len(opt) == len(hi) and all(a <= b <= c for a, b, c in zip(lo, opt, hi))):
            raise ContractViolation(f"profile of {name}: min <= opt <= max is required, got {lo}, {opt}, {hi}")
        self.shapes[name] = (lo, opt, hi)


class TimingCache:
    def __init__(self, data: bytes):
        self.data = data or b"fake timing cache"

    def serialize(self) -> bytes:
        return self.data


class BuilderConfig:
    def __init__(self):
        self.profiles: list[OptimizationProfile] = []
        self.cache = None

    def set_memory_pool_limit(self, pool, size: int) -> None:
        if size <= 0:
            raise ContractViolation("memory pool limit must be positive")

    def clear_flag(self, flag) -> None:
        pass

    def add_optimization_profile(self, profile: OptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> TimingCache:
        return TimingCache(bytes(data))

    def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
        self.cache = cache
        return True


class Builder(FakeApi):
    def __init__(self, logger: Logger):
        self.use_logger(logger)

    def create_network(self, flags: int = 0) -> Network:
        if not flags & (1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED):
            raise ContractViolation("networks are strongly typed (TensorRT 10.12+ deprecates the FP16 builder flag)")
        return Network(flags)

    def create_builder_config(self) -> BuilderConfig:
        return BuilderConfig()

    def create_optimization_profile(self) -> OptimizationProfile:
        return OptimizationProfile()

    def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes | None:
        model = onnx.load(str(network.onnx), load_external_data=False)
        dynamic = [i.name for i in model.graph.input if any(d.dim_param for d in i.type.tensor_type.shape.dim)]
        if len(config.profiles) != 1 or set(config.profiles[0].shapes) != set(dynamic):
            return None  # TensorRT needs a profile for every dynamic input
        declared = {i.name: TRT_DTYPE[ONNX_DTYPES[i.type.tensor_type.elem_type]] for i in model.graph.input}
        retyped = {t.name: int(t.dtype) for t in network.inputs if t.dtype != declared[t.name]}
        for name in retyped:
            if any(n.op_type != "Cast" for n in model.graph.node if name in n.input):
                return None  # a layer other than a Cast would read a type it was not written for
        return json.dumps({"onnx": str(network.onnx), "profile": config.profiles[0].shapes,
                           "dtypes": retyped}).encode()
