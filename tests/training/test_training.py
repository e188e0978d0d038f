"""The synthetic shapes, the latent rescaling and the seeded demo training (a few steps on tiny settings)."""
from __future__ import annotations

import pytest
import torch

from training.data import NUM_CLASSES, ShapesSpec, make_dataset, render
from reference.model import D2C, get_config
from training.demo import PARTS, TrainSettings, normalise_latent_scale, train_demo
from reference.vae import LATENT_SCALE, DiagonalGaussian


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_dataset_is_seeded_balanced_and_in_range():
    images, labels = make_dataset(40, seed=3)
    again, labels_again = make_dataset(40, seed=3)
    other, _ = make_dataset(40, seed=4)
    assert images.shape == (40, 3, 16, 16) and images.dtype == torch.float32
    assert torch.equal(images, again) and torch.equal(labels, labels_again)
    assert not torch.equal(images, other)
    assert float(images.min()) >= -1.0 and float(images.max()) <= 1.0
    assert torch.bincount(labels, minlength=NUM_CLASSES).tolist() == [4] * NUM_CLASSES


def test_classes_differ_and_edges_are_antialiased():
    gen = torch.Generator().manual_seed(0)
    images = render(torch.arange(NUM_CLASSES), gen, ShapesSpec(size=32))
    assert images.shape == (NUM_CLASSES, 3, 32, 32)
    # every class has a distinct mean colour over its foreground pixels
    levels = torch.unique(images.flatten(1), dim=1)
    assert levels.shape[1] > 2 * NUM_CLASSES  # coverage fractions between background and shape colours
    means = images.mean(dim=(2, 3))
    assert torch.cdist(means, means).add(torch.eye(NUM_CLASSES)).min() > 1e-3


def test_render_rejects_unknown_labels():
    with pytest.raises(ValueError, match="labels must be in"):
        render(torch.tensor([NUM_CLASSES]), torch.Generator().manual_seed(0))


def test_latent_rescaling_keeps_decoding_and_unit_scaled_latents():
    torch.manual_seed(0)
    vae = D2C(get_config("d2c-demo")).vae.eval()
    images, _ = make_dataset(20, seed=0)
    with torch.no_grad():
        before = vae.encode(images)
        decoded = vae.decode(before.mean)
        k = normalise_latent_scale(vae, images)
        after = vae.encode(images)
        torch.testing.assert_close(after.mean, before.mean * k, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(after.std, before.std * k, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(vae.decode(after.mean), decoded, rtol=1e-4, atol=1e-5)
        scaled_std = float(DiagonalGaussian.from_moments(vae.encode_moments(images)).mean.std()) * LATENT_SCALE
    assert scaled_std == pytest.approx(1.0, rel=1e-4)


def _tiny_settings() -> TrainSettings:
    return TrainSettings(train_images=16, batch={p: 4 for p in PARTS}, steps={p: 2 for p in PARTS}, warmup=1,
                         log_every=1)


def _weights(result) -> dict[str, torch.Tensor]:
    state = {f"d2c.{k}": v for k, v in result.model.state_dict().items()}
    state.update({f"vq.{k}": v for k, v in result.vq.state_dict().items()})
    state.update({f"classifier.{k}": v for k, v in result.classifier.state_dict().items()})
    return state


@pytest.fixture(scope="module")
def seed_0():
    """One seeded training run (seed 0) that both tests below compare with, on one thread as theirs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_demo(_tiny_settings(), seed=0, progress=False)
    finally:
        torch.set_num_threads(threads)


def test_training_is_reproducible_from_the_seed(seed_0):
    first = _weights(seed_0)
    second = _weights(train_demo(_tiny_settings(), seed=0, progress=False))
    other = _weights(train_demo(_tiny_settings(), seed=6, progress=False))
    assert first.keys() == second.keys() == other.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    for part in ("d2c.gpt.", "d2c.mar.", "d2c.vae.", "vq.", "classifier."):
        keys = [k for k in first if k.startswith(part)]
        assert keys and any(not torch.equal(first[k], other[k]) for k in keys), part


def test_training_moves_every_part(seed_0):
    still = _tiny_settings()
    still.lr = {p: 0.0 for p in PARTS}
    frozen = _weights(train_demo(still, seed=0, progress=False))
    result = seed_0
    trained = _weights(result)
    for part in ("d2c.gpt.", "d2c.mar.", "d2c.vae.", "vq.", "classifier."):
        keys = [k for k in frozen if k.startswith(part) and frozen[k].is_floating_point()]
        assert any(not torch.equal(frozen[k], trained[k]) for k in keys), part
    assert set(result.seconds) == set(result.final_loss) == set(PARTS)
    assert all(torch.isfinite(torch.tensor(v)) for v in result.final_loss.values())


def test_settings_need_every_part():
    with pytest.raises(ValueError, match="every part"):
        TrainSettings(steps={"vq": 1})
