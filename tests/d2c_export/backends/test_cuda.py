"""The PyTorch backend on a real CUDA device: parity of FP32 / FP16 / BF16 against the CPU reference, CUDA-graph
replays against eager calls, and no host sync inside a masked step. Run by `scripts/gpu_check.sh`."""
from __future__ import annotations

import pytest
import torch

from d2c_export.backends import open_backend
from d2c_export.generate import generate_images
from d2c_export.backends import Target
from d2c_export.verify.parity import check_stage
from reference.pipeline import SamplingParams
from tests.reference.syncs import SyncCounter

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda)")]

DEMO = SamplingParams(cfg=1.0, num_iter=8, diffusion_steps=50)


@pytest.mark.parametrize("name", ["torch", "torch-fp16", "torch-bf16"])
def test_cuda_stages_match_the_cpu_reference(engines, name):
    model = engines.model()  # on the CPU, FP32: the reference
    with open_backend(engines, Target.parse(name), device="cuda") as backend:
        assert backend.device == "cuda"
        reports = [r for spec in engines.specs() for r in check_stage(model, spec, backend, engines.max_batch)]
    failed = [(r.stage, r.output, r.sizes, r.result) for r in reports if not r.passed]
    assert reports and not failed, failed


@pytest.mark.parametrize("name", ["torch", "torch-fp16"])
def test_cuda_generates_the_cpu_images(demo_engines, name):
    with open_backend(demo_engines, Target.parse("torch"), device="cpu") as cpu:
        ref, _ = generate_images(cpu, [1, 7, 3, 5], DEMO, seed=11)
    with open_backend(demo_engines, Target.parse(name), device="cuda") as gpu:
        got, _ = generate_images(gpu, [1, 7, 3, 5], DEMO, seed=11)
    assert float((got.discrete_ids == ref.discrete_ids).float().mean()) >= 0.98
    assert float((got.images - ref.images).abs().mean()) < 0.02


def test_graph_replays_match_eager_cuda_calls(demo_engines):
    with open_backend(demo_engines, Target.parse("torch-fp16"), device="cuda", cuda_graphs=False) as eager:
        a, _ = generate_images(eager, [2, 4], DEMO, seed=3)
    with open_backend(demo_engines, Target.parse("torch-fp16"), device="cuda", cuda_graphs=True) as graphed:
        b, _ = generate_images(graphed, [2, 4], DEMO, seed=3)
        c, _ = generate_images(graphed, [2, 4], DEMO, seed=3)  # replays of the graphs captured by the first run
        assert graphed.graph_replays()["denoise"] == 2 * DEMO.num_iter and graphed.graph_memory_bytes() > 0
    torch.testing.assert_close(b.images, a.images, atol=1e-3, rtol=0)
    assert torch.equal(b.images, c.images)


def test_no_host_sync_inside_a_masked_step_on_cuda(demo_engines):
    counts = []
    with open_backend(demo_engines, Target.parse("torch-fp16"), device="cuda") as backend:
        for steps in (10, 40):
            with SyncCounter() as counter:
                generate_images(backend, [1, 2], SamplingParams(cfg=1.0, num_iter=8, diffusion_steps=steps), seed=0)
            counts.append(counter.calls)
    assert counts[0] == counts[1], counts
