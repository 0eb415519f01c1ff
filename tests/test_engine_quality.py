"""The sample-quality measure (engine/quality.py, the Fréchet distance of Q2 in a classifier's features): real
held-out digits score near the real-vs-real floor with a high accuracy, while blurred digits and mode-collapsed
sets (one image repeated, or one image per class) score far worse; the classifier is deterministic."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

from ldmkit.engine import evaluate, quality  # noqa: E402
from ldmkit.engine.data import center_crop, load_dataset  # noqa: E402

N = 500  # the "samples": the second half of the held-out split; the first half is the reference


@pytest.fixture(scope="module")
def digits():
    """(train images, train labels, held-out images, held-out labels), images in [0, 1], NumPy, at the digits' own
    28×28 (the centre of the 32×32 images the VAE sees), the size ``ldmkit eval`` measures samples at."""
    train_x, train_y, description = load_dataset("mnist", "train", 32, 10)
    test_x, test_y, _ = load_dataset("mnist", "test", 32, 10)
    size = description["content_size"]
    assert size == [28, 28]
    return (np.ascontiguousarray((center_crop(train_x, size) + 1) / 2), train_y.numpy(),
            np.ascontiguousarray((center_crop(test_x, size) + 1) / 2), test_y.numpy())


@pytest.fixture(scope="module")
def reference(digits):
    """The measure built on the training split, with the first half of the held-out split as the reference set:
    the second half is real digits that neither the classifier nor the reference saw."""
    train_x, train_y, test_x, test_y = digits
    return quality.build_reference(train_x, train_y, test_x[:N], test_y[:N], 10)


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """A separable Gaussian blur of (N, C, H, W) images (edges replicated)."""
    r = int(3 * sigma)
    k = torch.exp(-torch.arange(-r, r + 1.0) ** 2 / (2 * sigma**2))
    k = (k / k.sum()).float()
    x = F.conv2d(F.pad(torch.from_numpy(images), (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1)).numpy()


def test_real_held_out_digits_score_near_the_floor(digits, reference):
    """Real digits the classifier never saw: accuracy as on the reference half, FD at the real-vs-real floor."""
    _, _, test_x, test_y = digits
    assert reference.held_out_accuracy > 0.94
    result = quality.measure(reference, test_x[N:], test_y[N:])
    assert result["quality_accuracy"] > 0.94
    assert 0.6 < result["quality_fd_ratio"] < 1.3, result
    assert result["quality_fd_ratio"] == result["quality_fd"] / result["quality_fd_floor"]
    assert (result["quality_samples"], result["quality_floor_images"], result["quality_floor_sets"]) == (N, N, 10)


def test_blurred_digits_score_far_worse(digits, reference):
    """A Gaussian blur of σ = 1 pixel keeps the digits recognisable (accuracy barely moves) but triples the FD
    ratio at least (measured: 0.86 → 4.5, accuracy 0.964 → 0.952); σ = 0.5 already shows (1.11)."""
    _, _, test_x, test_y = digits
    real = quality.measure(reference, test_x[N:], test_y[N:])
    soft = quality.measure(reference, blur(test_x[N:], 0.5), test_y[N:])
    blurred = quality.measure(reference, blur(test_x[N:], 1.0), test_y[N:])
    assert blurred["quality_accuracy"] > 0.9
    assert real["quality_fd_ratio"] < soft["quality_fd_ratio"] < blurred["quality_fd_ratio"]
    assert blurred["quality_fd_ratio"] > 3 * real["quality_fd_ratio"] and blurred["quality_fd_ratio"] > 3


def test_mode_collapse_scores_far_worse(digits, reference):
    """One image repeated: accuracy ≈ 10% and an FD ratio over 50; one (correctly classified) image per class,
    each repeated for its class: accuracy 1, which the accuracy cannot tell from real digits, but an FD ratio
    over 10 (measured: 171 and 27)."""
    _, _, test_x, test_y = digits
    x, y = test_x[N:], test_y[N:]
    one = quality.measure(reference, np.repeat(x[:1], N, axis=0), y)
    assert one["quality_accuracy"] < 0.2 and one["quality_fd_ratio"] > 50
    _, predicted = quality.features_and_predictions(reference.classifier, x)
    first = np.stack([x[(y == c) & (predicted == c)][0] for c in range(10)])
    per_class = quality.measure(reference, first[y], y)
    assert per_class["quality_accuracy"] == 1.0 and per_class["quality_fd_ratio"] > 10


def test_classifier_is_deterministic_and_leaves_torch_as_it_was(digits):
    """Two trainings give the same weights bit for bit, whatever the caller's thread count; the global torch RNG
    and thread count are left as they were; without labels the measure gives no accuracy, and a dataset
    without labels no measure."""
    train_x, train_y, test_x, _ = digits
    threads, state = torch.get_num_threads(), torch.get_rng_state()
    nets = []
    for n in (1, 2):
        torch.set_num_threads(n)
        nets.append(quality.train_classifier(train_x[:600], train_y[:600], 10, epochs=1))
    torch.set_num_threads(threads)
    assert torch.equal(state, torch.get_rng_state())
    for (name, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.get_num_threads() == threads
    ref = quality.build_reference(train_x[:600], train_y[:600], test_x[:100])
    assert ref.held_out_accuracy is None
    assert quality.measure(ref, test_x[100:150])["quality_accuracy"] is None
    x = torch.from_numpy(test_x[:20]) * 2 - 1  # an unlabelled dataset: nothing to train the classifier on
    assert list(evaluate.sample_quality(test_x[:20], None, x, None, x, None)) == ["quality_skipped"]


def test_measure_bad_input(reference, digits):
    _, _, test_x, test_y = digits
    with pytest.raises(ValueError, match="at least 2 samples"):
        quality.measure(reference, test_x[:1], test_y[:1])
    with pytest.raises(ValueError, match="one class per sample"):
        quality.measure(reference, test_x[:5], test_y[:4])
    with pytest.raises(ValueError, match=r"shape \(N, C, H, W\)"):
        quality.measure(reference, test_x[:5, 0], test_y[:5])
    with pytest.raises(ValueError, match="one label per image"):
        quality.train_classifier(test_x[:5], test_y[:4], 10)
    padded = np.pad(test_x[:5], ((0, 0), (0, 0), (2, 2), (2, 2)))  # 32×32 samples against 28×28 real digits
    with pytest.raises(ValueError, match="samples are 32×32 but the real images are 28×28; measure them at the "
                                         "same size"):
        quality.measure(reference, padded, test_y[:5])
    with pytest.raises(ValueError, match="training and held-out images must have one size, got 28×28 and 32×32"):
        quality.build_reference(test_x[:20], test_y[:20], padded)
