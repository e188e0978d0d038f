"""Row buckets of the denoising loops: few buckets, at most a quarter of padding, and padding rows that leave the
real rows' bits alone on ONNX Runtime (which the TensorRT fake computes with)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from d2c_export.engines import Engines
from reference.diffusion import make_tables
from tests.d2c_export.backends.trt_fakes import loop_feeds


def test_buckets_are_few_and_pad_at_most_a_quarter():
    from d2c_export.row_buckets import row_bucket
    assert [row_bucket(n) for n in range(1, 17)] == [1, 2, 3, 4, 5, 6, 7, 8, 10, 10, 12, 12, 14, 14, 16, 16]
    for n in range(1, 5000):
        bucket = row_bucket(n)
        assert n <= bucket <= 1.25 * n and row_bucket(bucket) == bucket, n
    assert len({row_bucket(n) for n in range(1, 4097)}) == 44  # d2c-b's whole diffusion profile at max batch 16
    # d2c-b at batch 1..16 with 64 masked steps over 256 tokens: 60 row counts, 23 buckets
    counts = {b * p for b in range(1, 17) for p in range(1, 8)}
    assert (len(counts), len({row_bucket(n) for n in counts})) == (60, 23)


@pytest.mark.parametrize("threads", [1, 2])
def test_padding_rows_leave_the_real_rows_bits(engines_factory, threads):
    """A diffusion step on a bucket's rows (feeds placed as the captured loops place them) gives the real rows
    exactly what the step on those rows alone gives, guided or not."""
    from d2c_export.row_buckets import bucket_shapes, place_rows, row_bucket
    engines = Engines.open(engines_factory("d2c-tiny"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(engines.file("diffusion", "onnx-fp32")), options,
                                   providers=["CPUExecutionProvider"])
    tables = make_tables(10)
    for groups in (1, 2):
        for rows in [*range(1, 41), 63, 64]:
            feeds = loop_feeds(engines.config, rows, 1, seed=rows, groups=groups)
            shapes = bucket_shapes(feeds, row_bucket(rows))
            padded = {n: torch.zeros(s, dtype=feeds[n].dtype) for n, s in shapes.items()}
            place_rows(lambda dst, src: dst.copy_(src), padded, feeds)
            common = {"t": np.array([tables.model_timestep(7)]), "cfg": feeds["cfg"].numpy(),
                      "temperature": feeds["temperature"].numpy(), "coefs": tables.coefficients(7).numpy()}

            def step(f: dict) -> np.ndarray:
                return session.run(None, {"x": f["noise"][0].numpy(), "noise": f["noise"][1].numpy(),
                                          "z": f["z"].numpy(), **common})[0]

            alone, in_bucket = step(feeds), step(padded)[:rows]
            assert np.array_equal(alone, in_bucket), (groups, rows, float(np.abs(alone - in_bucket).max()))
