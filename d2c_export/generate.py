"""One generation on a backend: the request checked first, the shared loop run with timed stage calls."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from d2c_export.backends.hooks import StageThreads, StageTimer, Timed
from d2c_export.errors import BackendUnavailable, NonFiniteOutput, Setting
from d2c_export.stages import stages_for
from reference.pipeline import Generation, SamplingParams, draws_for, generate_with
from reference.settings import check_request

# The loop's own tensor math is small (see `hooks.StageThreads`); stage calls keep the caller's threads.
LOOP_THREADS = 1


def check_stages(stages, params: SamplingParams) -> None:
    """Refuse settings that need stages these engines were exported without (LazyMAR's token cache's two)."""
    absent = getattr(stages, "absent_optional", {})
    lacking = [name for name in params.stages_needed if name in absent]
    if lacking:
        raise BackendUnavailable(f"lazy MAR's token cache needs the {' and '.join(lacking)} graphs, which these "
                                 f"engines were exported without; re-export with `{absent[lacking[0]]}`, or leave "
                                 "out ", Setting("lazy_mar_tokens"), setting="lazy_mar_tokens")


def generate_images(stages, labels: list[int], params: SamplingParams, seed: int | Sequence[int],
                    progress: bool | str = False, timer: StageTimer | None = None, *,
                    batch_order: bool = False) -> tuple[Generation, StageTimer]:
    """Run the shared generation loop on `stages` (a backend, or a wrapper of one), timing each stage call; then the
    post-processing stages (`StageSpec.postprocess`) on its images.

    `seed`: an int S gives image i its own generator seeded S + i, a list one seed per image, so an image depends
    only on its class, its seed and `params`; `batch_order`: one generator seeded S for the whole batch, the
    order the official code draws in (`reference.pipeline`'s docstring). `progress`: show progress bars, labelled
    with the backend and batch after it when it is a string (the command's name).
    """
    check_request(stages.config, labels, max_batch=stages.max_batch, seed=seed, params=params)
    check_stages(stages, params)
    draws = draws_for(seed, len(labels), batch_order)
    timer = StageTimer() if timer is None else timer
    stage_threads = torch.get_num_threads()
    timed = Timed(StageThreads(stages, stage_threads, LOOP_THREADS), timer)
    torch.set_num_threads(LOOP_THREADS)
    try:
        label = progress and " ".join(filter(None, [progress if isinstance(progress, str) else "",
                                                    f"{stages.target.name}, batch {len(labels)}"]))
        result = generate_with(timed, torch.tensor(labels), params, draws, progress=label)
        for spec in (s for s in stages_for(stages.config) if s.postprocess):
            (name,) = [t.name for t in spec.input_specs(stages.config)]
            result = dataclasses.replace(result, images=timed.run(spec.name, {name: result.images})[0].float().cpu())
    finally:
        torch.set_num_threads(stage_threads)
    timer.resolve()
    if not bool(torch.isfinite(result.images).all()):
        bad = "latents" if not bool(torch.isfinite(result.latents).all()) else "images"
        raise NonFiniteOutput(bad, params.as_dict(), "; an FP16 overflow of out-of-range latents, say: run with ",
                              Setting("precision", "fp32"), ", settings nearer the model's recommended ones, or check "
                              "the weights")
    return result, timer
