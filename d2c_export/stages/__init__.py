"""The stage registry: one module per stage, each registering its `StageSpec` (run order is import order).

Adding a stage is adding a module here that calls `register` and importing it below.
"""
# registration, in run order
from d2c_export.stages import gpt, cond, mar, mar_cached, mar_fresh, diffusion, vae  # noqa: F401  (registration)
from d2c_export.stages.spec import (DEFAULT_MAX_BATCH, FP16_TOLERANCE, MAX_EXPORT_BATCH, ORT_FP32_TOLERANCE, STAGES,
                                    TRT_FP32_TOLERANCE, Shapes, Sizes, StageSpec, TensorSpec, Tolerance, register,
                                    stages_for)

__all__ = ["DEFAULT_MAX_BATCH", "FP16_TOLERANCE", "MAX_EXPORT_BATCH", "ORT_FP32_TOLERANCE", "STAGES", "TRT_FP32_TOLERANCE", "Shapes",
           "Sizes", "StageSpec", "TensorSpec", "Tolerance", "register", "stages_for"]
