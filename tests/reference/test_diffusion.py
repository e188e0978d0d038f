"""The diffusion tables, the head and the denoising step against MAR's recordings."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from reference.diffusion import DenoiseStep, make_tables, space_timesteps, step_tables
from reference.diffusion_head import HeadArgs, SimpleMLPAdaLN
from tests.reference.replay import ReplayDraws
from reference.stage_networks import ModuleStages

TABLE_NAMES = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next", "sqrt_alphas_cumprod",
               "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
               "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
               "posterior_mean_coef1", "posterior_mean_coef2", "log_betas"]


@pytest.mark.parametrize("name,steps", [("diffusion_100", 100), ("diffusion_50", 50), ("diffusion_25", 25),
                                        ("diffusion_1000_train", None)])
def test_tables_match_official(official_dir, name, steps):
    rec = np.load(official_dir / "diffusion" / f"{name}.npz")
    tables = make_tables(steps)
    np.testing.assert_array_equal(tables.timestep_map, rec["timestep_map"])
    for key in TABLE_NAMES:
        np.testing.assert_allclose(getattr(tables, key), rec[key], rtol=1e-12, atol=0, err_msg=key)
    assert tables.num_timesteps == int(rec["num_timesteps"])


def test_space_timesteps_rejects_impossible_split():
    with pytest.raises(ValueError):
        space_timesteps(10, "11")


@pytest.fixture(scope="module")
def mar_rec(official_dir):
    io = dict(np.load(official_dir / "mar_tiny_a" / "io.npz"))
    draws = dict(np.load(official_dir / "mar_tiny_a" / "draws.npz"))
    state = load_file(official_dir / "mar_tiny_a" / "model.safetensors")
    head = SimpleMLPAdaLN(HeadArgs(in_channels=16, z_channels=64, width=96, depth=2))
    head.load_state_dict({k[len("diffloss.net."):]: v for k, v in state.items() if k.startswith("diffloss.net.")},
                         strict=True)
    return io, draws, head.eval()


def t_(a):
    return torch.from_numpy(np.asarray(a))


def call_draws(draws: dict, call: str) -> list[tuple[str, torch.Tensor]]:
    names = sorted(k for k in draws if k.startswith(call + "_draw_"))
    return [("normal", t_(draws[k])) for k in names]


@torch.no_grad()
def test_head_matches_official(mar_rec):
    io, _, head = mar_rec
    out = head(t_(io["in_dl_x"]), t_(io["in_dl_t"]), t_(io["in_dl_c"]))
    torch.testing.assert_close(out, t_(io["out_dl_out"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(head.time_embed(t_(io["in_dl_t"])), t_(io["out_dl_t_emb"]), atol=1e-5, rtol=0)


@torch.no_grad()
def test_guided_step_matches_official_p_sample(mar_rec):
    io, draws, head = mar_rec
    tables = make_tables(10)
    step = DenoiseStep(head)
    x = t_(io["in_ps_x"])
    z = t_(io["in_sample_z"])
    for index, tag, call in ((5, "t", "psample_t"), (0, "t0", "psample_t0")):
        noise = call_draws(draws, call)[0][1]
        out = step(x[:3], torch.tensor([tables.model_timestep(index)]), z, noise[:3], torch.tensor([2.0]),
                   torch.tensor([0.9]), tables.coefficients(index))
        torch.testing.assert_close(out, t_(io[f"out_psample_{tag}_sample"])[:3], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cfg_scale_one_equals_conditional_path(mar_rec):
    io, _, head = mar_rec
    tables = make_tables(10)
    step = DenoiseStep(head)
    x, z = t_(io["in_ps_x"])[:3], t_(io["in_sample_z"])
    noise = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    args = (torch.tensor([tables.model_timestep(4)]),)
    tail = (torch.tensor([0.9]), tables.coefficients(4))
    guided = step(x, *args, z, noise, torch.tensor([1.0]), *tail)
    plain = step(x, *args, z[:3], noise, torch.tensor([1.0]), *tail)
    torch.testing.assert_close(guided, plain, atol=1e-6, rtol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("guided", [True, False])
def test_replayed_sample_loop_matches_official(mar_rec, guided):
    io, draws, head = mar_rec
    call = "sample_cfg" if guided else "sample_nocfg"
    z = t_(io["in_sample_z"] if guided else io["in_sample_z_nocfg"])
    replay = ReplayDraws(call_draws(draws, call))
    groups = 2 if guided else 1
    noise = replay.step_noise(1, z.shape[0] // groups, 16, groups, 10)  # all of DiffLoss.sample's draws, one call
    assert replay.exhausted
    feeds = {"noise": noise, "z": z, **step_tables(make_tables(10)), "cfg": torch.tensor([2.0 if guided else 1.0]),
             "temperature": torch.tensor([0.9])}
    out = ModuleStages(None, {"diffusion": DenoiseStep(head)}).denoise(feeds)
    ref = t_(io[f"out_{call}_out"])[: out.shape[0]]
    scale = ref.abs().max()
    assert float((out - ref).abs().max() / scale) < 1e-5


def test_the_denoising_loop_leaves_nothing_on_its_tables():
    """Its per-step views are made per call: kept on a table they would hold the table through its own views, a
    cycle inside PyTorch that the garbage collector cannot see, and every generation's tables would never be freed."""
    import gc
    import weakref

    from reference.diffusion import denoise_steps
    tables = step_tables(make_tables(7))
    seen = []

    def step(stage, inputs):
        seen.append((inputs["t"].clone(), inputs["coefs"].clone()))
        return (inputs["x"],)

    feeds = {"noise": torch.zeros(8, 2, 3), "z": torch.zeros(2, 4), **tables, "cfg": torch.ones(1),
             "temperature": torch.ones(1)}
    denoise_steps(step, feeds)
    assert torch.equal(torch.cat([t for t, _ in seen]), tables["timesteps"])
    assert torch.equal(torch.stack([c for _, c in seen]), tables["coefs"])
    alive = [weakref.ref(t) for t in tables.values()]
    del tables, feeds, seen
    gc.collect()
    assert all(ref() is None for ref in alive)
