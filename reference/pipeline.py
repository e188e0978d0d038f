"""The generation loop: discrete tokens, fusion, masked steps with the diffusion head, then the VAE.

The loop is written once against a small `Stages` interface (`run(stage, inputs)`); the reference passes its
PyTorch modules (`reference.stage_networks.TorchStages`) and the toolchain its backends, so every backend
runs the same sampling math.

Draw order: every random number comes from one `Draws` object, in this order:
  1. Discrete stage (absent for plain MAR): for each of the `block_size` tokens, one
     `uniform((B, V))` that picks the token by Gumbel-max over the vocabulary.
  2. Generation orders: one `permutation(L)` per image, in batch order.
  3. For each masked step, MAR's `DiffLoss.sample` sequence: one `normal((N, C))` starting
     noise for the N = B * P predicted tokens (with guidance it is shared by the unconditional
     half, as MAR duplicates it), then, for each of the masked step's T_s denoising steps from the last
     respaced index down to 0, one `normal((G * N, C))` with G = 2 under guidance, else 1. Only the first
     N rows reach the conditional output; the rest keeps MAR's draw shapes so recorded draws replay.
     T_s is `diffusion_steps` for every masked step, or with diffusion-step annealing its own count
     (`SamplingParams.denoising_counts`, fixed by the settings before the generation starts). Lazy MAR
     steps draw exactly what full ones draw.
This is batch order (`TorchDraws(seed)`: one generator for the batch, as the official code draws). Per-image
seeds (`ImageDraws(seeds)`, the default of `d2c_export.generate`): image i draws the sequence above for a
batch of one image from its own generator seeded seeds[i] (`seed + i` for an int seed), so it is the same
image alone, in any batch, on any replica. Item 3 is asked for in one call per masked step
(`Draws.step_noise`) and moved to the device in one copy.

The loop's calls to its `Draws` follow a plan made before the generation starts (`draw_plan`: block_size
`token_uniforms`, one `orders`, then one `step_noise` per masked step with that step's shapes from
`masked_steps`), which `generate_with` hands to `reference.draw_producer`: on a CUDA loop a producer thread makes
the draws in the plan's order, a few requests ahead (into pinned buffers for a CUDA loop), while the stage calls
run, where the stages say so (`Stages.draws_ahead`); else they are made when the loop asks. The numbers are the
same either way.

Device: the loop keeps its state (KV cache, tokens, fusion features, z, x_t, noise) on `stages.device` and
never waits for it inside a generation step; the draws come from the CPU generator, one copy per token and
per masked step. The result comes back to the host once, at the end.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields
from typing import Protocol, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from reference.diffusion import TRAIN_STEPS, AnnealSchedule, annealed_counts, annealed_tables
from reference.draw_producer import DrawRequest, DrawTime, planned_draws
from reference.errors import BadInput, Setting
from reference.gpt import cache_feeds, write_cache
from reference.model import RECOMMENDED_SAMPLING, D2C, D2CConfig
from reference.sampling import (CfgSchedule, Draws, ImageDraws, TorchDraws, cfg_schedule, filter_logits,
                                guide_logits, image_seeds, mask_len_schedule, sample_gumbel, step_positions,
                                tokens_per_step)
from reference.mar import unpatchify
from reference.samplers import (SAMPLER_FIELDS, SAMPLER_SETS, TOKEN_CACHE_STAGES, ConditionCache, Sampler, TokenCache,
                                expand_preset, full_mar_steps)
from reference.settings import check_request, check_settings, setting
from reference.stage_networks import TorchStages
from reference.vae import LATENT_SCALE


MAX_CFG = 100.0  # guidance scales above this are refused (MAR and LlamaGen sample at 1 to 4)
MAX_TEMPERATURE = 100.0


@dataclass
class SamplingParams:
    """How to sample: each field is a setting (`reference.settings`), the one definition of its flag, request field,
    recorded value and check. The defaults are ImageNet's (MAR's and LlamaGen's)."""

    cfg: float = setting(4.0, "guidance scale (1: none)", 0.0, MAX_CFG)
    cfg_schedule: CfgSchedule = setting(CfgSchedule.LINEAR, "MAR's guidance schedule over the masked steps")
    num_iter: int = setting(64, "masked autoregressive steps (at most the model's latent tokens)", 1)
    diffusion_steps: int = setting(100, "denoising steps per masked step (a respacing of 1000)", 1, TRAIN_STEPS)
    temperature: float = setting(1.0, "diffusion-head temperature", 0.0, MAX_TEMPERATURE, min_exclusive=True)
    gpt_cfg: float | None = setting(None, "guidance scale of the discrete stage (unset: cfg)", 0.0, MAX_CFG)
    gpt_temperature: float = setting(1.0, "discrete sampling: temperature of the logits", 0.0, MAX_TEMPERATURE,
                                     min_exclusive=True)
    top_k: int = setting(0, "discrete sampling: keep the k most likely tokens (0: all)", 0)
    top_p: float = setting(1.0, "discrete sampling: nucleus mass (1: all)", 0.0, 1.0, min_exclusive=True)
    # Fast samplers (`reference.samplers`); the defaults are the exact sampler.
    sampler: str = setting(Sampler.EXACT.value, "exact: MAR's sampler; fast: the speed preset (linear diffusion-step "
                           "annealing from half the diffusion steps to the floor, lazy MAR steps with both of "
                           "LazyMAR's caches), recorded as the settings it stands for", choices=[s.value for s in Sampler])
    diffusion_anneal: str = setting(AnnealSchedule.OFF.value, "anneal the denoising steps over the masked steps, from "
                                    "the diffusion steps (or the annealing start) down to the floor (DiSA)",
                                    choices=[s.value for s in AnnealSchedule])
    diffusion_anneal_start: int = setting(0, "denoising steps of the first masked step when annealing (at most the "
                                          "diffusion steps); 0: the diffusion steps", 0, TRAIN_STEPS)
    diffusion_floor: int = setting(5, "denoising steps of the last masked step when annealing", 1, TRAIN_STEPS)
    lazy_mar: int = setting(0, "lazy MAR steps (LazyMAR): a full mar step every this many masked steps; in between, "
                            "the conditional half alone with the guidance difference kept (guided), and with the "
                            "token cache only the changed tokens; 0: off", 0)
    lazy_mar_warmup: int = setting(5, "masked steps that run in full first with lazy MAR steps", 0)
    lazy_mar_tokens: bool = setting(False, "lazy MAR steps also reuse the features of the tokens that changed least "
                                    "(LazyMAR's token cache: the mar_cached and mar_fresh graphs)")

    def __post_init__(self) -> None:
        for name, kind in (("sampler", Sampler), ("diffusion_anneal", AnnealSchedule)):  # a member: its value
            if isinstance(getattr(self, name), kind):
                setattr(self, name, getattr(self, name).value)
        check_settings(self)
        self._check_fast_samplers()

    def _check_fast_samplers(self) -> None:
        """Expand the preset that `sampler` names, then refuse fast-sampler settings that cannot run together."""
        defaults = {f.name: f.default for f in fields(self)}
        for name, value in expand_preset(Sampler(self.sampler), vars(self), defaults).items():
            setattr(self, name, value)
        if self.diffusion_anneal_start > self.diffusion_steps:
            raise BadInput(f"must be in [0, {self.diffusion_steps}] (at most the diffusion steps; 0: them), got "
                           f"{self.diffusion_anneal_start}", setting="diffusion_anneal_start")
        if self.diffusion_anneal != AnnealSchedule.OFF.value and self.diffusion_floor > self._anneal_start:
            raise BadInput(f"{self.diffusion_floor} is above the {self._anneal_start} denoising steps annealing starts "
                           "from; lower it", setting="diffusion_floor")
        if self.lazy_mar_tokens and not self.lazy_mar:
            raise BadInput("needs lazy MAR steps: set ", Setting("lazy_mar", "N"), " (a full mar step every N)",
                           setting="lazy_mar_tokens")
        if self.lazy_mar and self.cfg == 1.0 and not self.lazy_mar_tokens:
            raise BadInput("without guidance (cfg 1) has nothing to reuse: its condition cache keeps the difference of "
                           "the guided halves; set ", Setting("cfg"), ", add ", Setting("lazy_mar_tokens"), ", or ",
                           Setting("lazy_mar", 0), setting="lazy_mar")

    @property
    def stages_needed(self) -> tuple[str, ...]:
        """Stages beyond the exact sampler's that these settings run."""
        return TOKEN_CACHE_STAGES if self.lazy_mar_tokens else ()

    @property
    def _anneal_start(self) -> int:
        return self.diffusion_anneal_start or self.diffusion_steps

    def denoising_counts(self) -> list[int]:
        """The denoising steps of every masked step, known before the generation starts (a static schedule)."""
        if self.diffusion_anneal == AnnealSchedule.OFF.value:
            return [self.diffusion_steps] * self.num_iter
        return annealed_counts(self._anneal_start, self.diffusion_floor, self.num_iter, self.diffusion_anneal)

    def with_sampler_set(self, name: str) -> "SamplingParams":
        """These settings with the fast samplers' ones replaced by the named set `SAMPLER_SETS[name]`."""
        if name not in SAMPLER_SETS:
            raise BadInput(f"unknown sampler set {name!r}; choose from {', '.join(SAMPLER_SETS)}", setting="samplers")
        exact = {**self.as_dict(), **{f.name: f.default for f in fields(self) if f.name in SAMPLER_FIELDS}}
        return SamplingParams(**{**exact, **SAMPLER_SETS[name](exact)})

    @property
    def discrete_cfg(self) -> float:
        return self.cfg if self.gpt_cfg is None else self.gpt_cfg

    @classmethod
    def recommended_for(cls, config: D2CConfig) -> dict:
        """The settings recorded with a model's engines (as keyword arguments): the preset's own
        (`reference.model.RECOMMENDED_SAMPLING`), and never more masked steps than the model has latent tokens."""
        settings = dict(RECOMMENDED_SAMPLING.get(config.name, {}))
        settings.setdefault("num_iter", min(SamplingParams.num_iter, config.mar.seq_len))
        return settings

    def check_for(self, config: D2CConfig) -> None:
        """Refuse settings the model cannot run (more masked steps than tokens, top-k above the vocabulary)."""
        if self.num_iter > config.mar.seq_len:
            raise BadInput(f"must be in [1, {config.mar.seq_len}] for this model ({config.mar.seq_len} latent "
                           f"tokens), got {self.num_iter}", setting="num_iter")
        if config.gpt is not None and self.top_k > config.gpt.vocab_size:
            raise BadInput(f"must be in [0, {config.gpt.vocab_size}] (the vocabulary), got {self.top_k}",
                           setting="top_k")

    def as_dict(self) -> dict:
        return {k: (v.value if isinstance(v, CfgSchedule) else v) for k, v in vars(self).items()}

    def describe(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.as_dict().items() if v is not None)


class Stages(Protocol):
    """What the loop runs on: `run(stage, inputs) -> outputs` over the stages gpt, cond, mar, diffusion and vae.

    `inputs` maps the stage's input names to tensors on `device`, in the stage's input order; the result is the
    tuple of its outputs in order, on `device` too. `gpt_cache` allocates the zeroed KV caches where `run("gpt")`
    reads them; the loop writes each step's keys and values into them. `denoise(feeds)` runs the denoising
    steps of one masked step: `denoise_steps(self.run, feeds)`, or a replay of it (a CUDA graph).
    `draws_ahead`: whether the loop's draws are made ahead, by a producer thread, while the stage calls run (stages
    that compute on a GPU), or when the loop asks (stages that compute on the CPU, whose cores a producer would
    take from them).
    """

    config: D2CConfig
    device: str
    draws_ahead: bool

    def run(self, stage: str, inputs: dict[str, Tensor]) -> tuple[Tensor, ...]: ...
    def gpt_cache(self, rows: int) -> tuple[Tensor, Tensor]: ...
    def denoise(self, feeds: dict[str, Tensor]) -> Tensor: ...


@dataclass(frozen=True)
class MaskedStep:
    """One masked step of the plan: `pred` tokens predicted per image, denoised in `diffusion_steps` steps."""

    pred: int
    diffusion_steps: int


def masked_steps(seq_len: int, params: SamplingParams) -> list[MaskedStep]:
    """The loop's masked steps, in order: MAR's cosine schedule of predicted tokens, each with its denoising steps."""
    return [MaskedStep(pred, count)
            for pred, count in zip(tokens_per_step(seq_len, params.num_iter), params.denoising_counts())]


def draw_plan(config: D2CConfig, params: SamplingParams, bsz: int) -> list[DrawRequest]:
    """Every call the loop makes to its `Draws` for a batch of `bsz`, in order (the module docstring's draw order)."""
    plan = []
    if config.gpt is not None:
        plan += [DrawRequest("token_uniforms", (bsz, config.gpt.vocab_size))] * config.gpt.block_size
    m = config.mar
    plan.append(DrawRequest("orders", (bsz, m.seq_len)))
    groups = 2 if params.cfg != 1.0 else 1
    plan += [DrawRequest("step_noise", (bsz, step.pred, m.token_dim, groups, step.diffusion_steps))
             for step in masked_steps(m.seq_len, params)]
    return plan


def to_device(t: Tensor, device: str | torch.device) -> Tensor:
    """A host tensor on the stages' device, copied without waiting for the device (pinned, non-blocking)."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def progress_label(progress: bool | str, what: str) -> str:
    """A progress bar's label: `what`, after the caller's label when `progress` is one."""
    return f"{progress}: {what}" if isinstance(progress, str) else what


def sample_discrete(stages: Stages, labels: Tensor, params: SamplingParams, draws: Draws,
                    progress: bool | str = False) -> Tensor:
    """Stage 1: (B,) labels -> (B, block_size) token ids, LlamaGen's prefill + one-token decode, on the device."""
    g, dev = stages.config.gpt, stages.device
    bsz = labels.shape[0]
    guided = params.discrete_cfg > 1.0  # LlamaGen guides only above 1
    rows = 2 * bsz if guided else bsz
    ids = torch.cat([labels, torch.full_like(labels, g.null_class)]) if guided else labels
    positions = to_device(torch.tensor([0] + [g.cls_token_num + i for i in range(g.block_size - 1)]), dev)
    k_cache, v_cache = stages.gpt_cache(rows)

    def step(step_ids: Tensor, i: int) -> Tensor:
        pos = positions[i:i + 1]  # (1,)
        logits, k, v = stages.run("gpt", {"ids": step_ids.view(rows, 1), "input_pos": pos,
                                          **cache_feeds(k_cache, v_cache)})
        write_cache(k_cache, k, pos)
        write_cache(v_cache, v, pos)
        return logits

    logits = step(ids, 0)
    out = []
    for i in tqdm(range(g.block_size), desc=progress_label(progress, "discrete tokens"), disable=not progress, leave=False):
        last = logits[:, -1].float()  # (rows, V)
        if guided:
            last = guide_logits(last[:bsz], last[bsz:], params.discrete_cfg)
        scores = filter_logits(last, params.gpt_temperature, params.top_k, params.top_p)  # (B, V)
        token = sample_gumbel(scores, to_device(draws.token_uniforms(bsz, scores.shape[-1]), dev))  # (B,)
        out.append(token)
        if i + 1 < g.block_size:
            logits = step(torch.cat([token, token]) if guided else token, i + 1)
    return torch.stack(out, dim=1)


def mar_conditions(stages: Stages, full: bool, tokens: Tensor, kept: Tensor, pred: Tensor, labels_in: Tensor,
                   fusion: Tensor | None, groups: int, cache: ConditionCache | None) -> Tensor:
    """One masked step's conditions from the `mar` stage, (G*B, P, Dd): MAR's; with lazy MAR steps' condition cache
    (`cache`), a full step's at every position with the guidance difference kept, a lazy step's from the
    conditional half alone."""
    bsz = tokens.shape[0]
    if full:
        rep = (lambda t: torch.cat([t] * groups))
        feeds = {"tokens": rep(tokens), "kept": rep(kept), "pred": rep(pred), "labels": labels_in}
    else:
        feeds = {"tokens": tokens, "kept": kept, "pred": pred, "labels": labels_in[:bsz]}
    if fusion is not None:
        feeds["fusion"] = fusion if full else fusion[:bsz]
    if cache is None:
        return stages.run("mar", feeds)[0]
    if full:
        return cache.full(stages.run("mar", {**feeds, "pred": cache.all_positions})[0], feeds["pred"])
    return cache.lazy(stages.run("mar", feeds)[0], pred)


def sample_tokens(stages: Stages, labels: Tensor, discrete_ids: Tensor | None, params: SamplingParams,
                  draws: Draws, progress: bool | str = False) -> Tensor:
    """Stage 2: masked autoregressive steps -> (B, L, C) token latents (scaled, as MAR models them), on the device."""
    m, dev = stages.config.mar, stages.device
    bsz, seq_len, channels = labels.shape[0], m.seq_len, m.token_dim
    guided = params.cfg != 1.0
    groups = 2 if guided else 1
    order = to_device(draws.orders(bsz, seq_len), dev)  # (B, L)
    labels_in = torch.cat([labels, torch.full_like(labels, m.null_class)]) if guided else labels
    fusion = None
    if discrete_ids is not None:
        ids_in = discrete_ids
        if guided:
            ids_in = torch.cat([discrete_ids, torch.full_like(discrete_ids, m.null_token)])
        fusion, = stages.run("cond", {"discrete_ids": ids_in})
    counts = params.denoising_counts()  # (num_iter,) denoising steps of each masked step, a static schedule
    per_count = {c: {k: to_device(v, dev) for k, v in t.items()} for c, t in annealed_tables(counts).items()}
    full = full_mar_steps(params.num_iter, params.lazy_mar, params.lazy_mar_warmup)
    token_cache = TokenCache(stages, bsz, params.num_iter, guided, labels_in, fusion) if params.lazy_mar_tokens else None
    cache = ConditionCache(bsz, seq_len, dev) if params.lazy_mar and token_cache is None else None
    mask_lens = mask_len_schedule(seq_len, params.num_iter)
    cfgs = to_device(cfg_schedule(params.cfg, params.cfg_schedule, mask_lens, seq_len), dev)  # (num_iter,)
    temperature = to_device(torch.tensor([params.temperature], dtype=torch.float32), dev)
    tokens = torch.zeros(bsz, seq_len, channels, device=dev)
    steps = zip(step_positions(order, seq_len, params.num_iter), masked_steps(seq_len, params))
    for s, ((kept, pred), step) in enumerate(tqdm(steps, desc=progress_label(progress, "masked steps"),
                                                  disable=not progress, leave=False, total=params.num_iter)):
        if token_cache is not None:  # LazyMAR's token cache (and its condition cache under guidance)
            z = token_cache.step(s, full[s], tokens, kept, pred)
        else:
            z = mar_conditions(stages, full[s], tokens, kept, pred, labels_in, fusion, groups, cache)
        z = z.reshape(-1, z.shape[-1])  # (G*B*P, Dd): conditional rows first, batch-major
        tables = per_count[step.diffusion_steps]
        noise = to_device(draws.step_noise(bsz, pred.shape[1], channels, groups, step.diffusion_steps), dev)
        x = stages.denoise({"noise": noise, "z": z, **tables, "cfg": cfgs[s:s + 1], "temperature": temperature})
        tokens = tokens.scatter(1, pred.unsqueeze(-1).expand(-1, -1, channels), x.reshape(bsz, -1, channels))
    return tokens


@dataclass
class Generation:
    images: Tensor  # (B, 3, H, W) in [-1, 1]
    latents: Tensor  # (B, c, h, w) VAE latents (already divided by LATENT_SCALE)
    discrete_ids: Tensor | None  # (B, N) stage-1 tokens, None for plain MAR
    draw_time: DrawTime = field(default_factory=DrawTime)  # how long the draws took, and what the loop waited


@torch.no_grad()
def generate_with(stages: Stages, labels: Tensor, params: SamplingParams, draws: Draws,
                  progress: bool | str = False) -> Generation:
    """Run all stages for `labels` (B,) with randomness from `draws` (order in the module docstring), made ahead of
    the loop where `stages.draws_ahead` says so; the images are the same either way. `progress`: show progress bars,
    labelled with it when it is a string (`d2c-run ort, batch 4`)."""
    config = stages.config
    labels = torch.as_tensor(labels, dtype=torch.int64).view(-1).cpu()
    check_request(config, labels.tolist())
    device = torch.device(stages.device)
    plan = draw_plan(config, params, labels.numel())
    with planned_draws(draws, plan, stages.draws_ahead, pin=device.type == "cuda") as planned:
        labels = to_device(labels, device)
        discrete = sample_discrete(stages, labels, params, planned, progress) if config.gpt is not None else None
        tokens = sample_tokens(stages, labels, discrete, params, planned, progress)
    m = config.mar
    latents = unpatchify(tokens, m.patch_size, m.vae_embed_dim) / LATENT_SCALE
    images = stages.run("vae", {"latents": latents})[0].clamp(-1, 1)
    return Generation(images=images.float().cpu(), latents=latents.cpu(),
                      discrete_ids=None if discrete is None else discrete.cpu(), draw_time=planned.time)


def draws_for(seed: int | Sequence[int], count: int, batch_order: bool = False) -> Draws:
    """Per-image seeds (`seed + i`, or one seed per image) unless `batch_order`: one generator for the batch."""
    if batch_order:
        if not isinstance(seed, numbers.Integral):
            raise ValueError("batch order draws from one seed; give one seed, not one per image")
        return TorchDraws(int(seed))
    return ImageDraws(image_seeds(seed, count))


def generate(model: D2C, labels: Tensor | list[int], seed: int | Sequence[int] = 0, cfg: float = 4.0,
             num_iter: int = 64, diffusion_steps: int = 100, progress: bool = False, batch_order: bool = False,
             **kwargs) -> Tensor:
    """Reference text-to-image entry point: class labels -> images (B, 3, H, W) in [-1, 1] (seeds: `draws_for`)."""
    params = SamplingParams(cfg=cfg, num_iter=num_iter, diffusion_steps=diffusion_steps, **kwargs)
    labels = torch.as_tensor(labels).view(-1)
    draws = draws_for(seed, labels.numel(), batch_order)
    return generate_with(TorchStages(model), labels, params, draws, progress).images
