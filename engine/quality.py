"""Sample quality against held-out real images: a small classifier's accuracy on conditional samples, and the
Fréchet distance (Q1, Q2 in docs/formulas.md; ``ldmkit.reference.quality``) between samples and held-out
images in the classifier's penultimate-layer features, beside the real-vs-real floor and their ratio.

The held-out images are the dataset's test split (``engine.data``: a fixed seeded permutation; the built-in
digits give 1,000 held out of 8,000), which training never sees; the classifier learns from the training
split only. The measure, for n samples x₁..x_n asked for classes y₁..y_n:

- accuracy = (1/n) Σ_i [argmax_c logits(x_i)_c = y_i];
- fd = FD(φ(samples), φ(held-out)), φ the classifier's penultimate layer (``FEATURES`` ReLU units), FD the
  Fréchet distance of the fitted Gaussians (Q2);
- fd_floor = the same FD for n *real training* images in place of the samples, averaged over up to
  ``FLOOR_SETS`` disjoint random sets of n (seed ``FLOOR_SEED``): what real digits score at this n, which
  carries the same O(d/n) bias as the samples' FD;
- fd_ratio = fd / fd_floor (≈ 1 for samples as good as real digits; larger is worse).

The classifier (``Classifier``: three stride-2 3×3 convolutions 16→32→64 channels with ReLU, a 64-unit ReLU
layer, a linear read-out) is trained afresh by every ``build_reference`` call, on the CPU in one thread from
a fixed seed, so the same data give the same weights bit for bit on a machine, whatever its core count or
the device the diffusion model runs on (across CPU types oneDNN's kernels may round differently). It takes
a few seconds (4 epochs of the 7,000 training digits: about 4 s on the project's 2-core CPU), so it is not
cached on disk: a cache beside the checkpoint would be one more file to keep in step with this code and the
data, and would buy those seconds back only; ``benchmarks/quality.py`` builds one reference and measures every
sampler with it.

Images enter as float (N, C, H, W) in [0, 1] (what ``engine.sample.generate`` returns).
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.reference.quality import frechet_distance_of_samples

FEATURES = 64
"""Width of the classifier's penultimate layer: the dimension of the Fréchet distance's feature space."""

EPOCHS, BATCH_SIZE, LR, SEED = 4, 64, 3e-3, 0
"""The classifier's training recipe: AdamW (no weight decay), cosine-decayed learning rate, shuffled batches."""

FLOOR_SETS, FLOOR_SEED = 10, 0
"""The floor averages the FD of up to this many disjoint random sets of real training images (this seed)."""


class Classifier(nn.Module):
    """A tiny CNN for S×S images (S ≥ 8): conv 3×3 stride 2 (C→w), (w→2w), (2w→4w), each with ReLU, an
    adaptive average pool to 4×4, a linear layer to ``features`` units with ReLU (the feature space), and a
    linear read-out to ``num_classes`` logits."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, features: int = FEATURES):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(in_channels, width, 3, 2, 1), nn.Conv2d(width, 2 * width, 3, 2, 1),
                                    nn.Conv2d(2 * width, 4 * width, 3, 2, 1)])
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.hidden = nn.Linear(4 * width * 16, features)
        self.out = nn.Linear(features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] → (N, features): the penultimate layer, after its ReLU."""
        for conv in self.convs:
            x = F.relu(conv(x))
        return F.relu(self.hidden(self.pool(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] → logits (N, num_classes)."""
        return self.out(self.features(x))


def _cpu_float(images) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images, dtype=np.float32) if not isinstance(images, torch.Tensor) else images)
    if x.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(x.shape)}")
    return x.detach().to("cpu", torch.float32)


def train_classifier(images, labels, num_classes: int, seed: int = SEED, epochs: int = EPOCHS,
                     batch_size: int = BATCH_SIZE, lr: float = LR) -> Classifier:
    """A ``Classifier`` trained on ``images`` (N, C, H, W) in [0, 1] with int ``labels`` (N,) by cross-entropy:
    AdamW, learning rate lr·½(1 + cos(π·step/total)), batches of a seeded permutation per epoch; on the CPU in
    one thread, the initial weights and the order drawn from ``seed`` (the global torch RNG is left as it was).
    Returns the network in eval mode."""
    x, y = _cpu_float(images), torch.as_tensor(np.asarray(labels), dtype=torch.long).cpu()
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need one label per image and at least one image, got {len(x)} images, {len(y)} labels")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
            x, y = x.clone(), y.clone()  # not inference tensors, even when the caller runs in inference mode
            torch.manual_seed(seed)
            net = Classifier(x.shape[1], num_classes)
            opt = torch.optim.AdamW(net.parameters(), lr, weight_decay=0.0)
            order = torch.Generator().manual_seed(seed)
            total, step = epochs * math.ceil(len(x) / batch_size), 0
            for _ in range(epochs):
                perm = torch.randperm(len(x), generator=order)
                for i in range(0, len(x), batch_size):
                    for group in opt.param_groups:
                        group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                    idx = perm[i : i + batch_size]
                    loss = F.cross_entropy(net(x[idx]), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
    finally:
        torch.set_num_threads(threads)
    return net.eval()


@torch.no_grad()
def features_and_predictions(classifier: Classifier, images, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, FEATURES) float64, predicted classes (N,) int64) of images (N, C, H, W) in [0, 1]."""
    x = _cpu_float(images)
    feats, preds = [], []
    for i in range(0, len(x), batch_size):
        f = classifier.features(x[i : i + batch_size])
        feats.append(f.double().numpy())
        preds.append(classifier.out(f).argmax(1).numpy())
    return np.concatenate(feats), np.concatenate(preds)


@dataclasses.dataclass
class Reference:
    """What samples are measured against: the classifier, the features of the held-out images, the features of
    the training images (for the floor), the classifier's accuracy on the held-out images, its training
    time in seconds, and the (height, width) of the images, which samples must share."""

    classifier: Classifier
    held_out_features: np.ndarray
    train_features: np.ndarray
    held_out_accuracy: float | None
    train_seconds: float
    image_size: tuple[int, int]


def build_reference(train_images, train_labels, held_out_images, held_out_labels=None, num_classes=None,
                    seed: int = SEED) -> Reference:
    """Train the classifier on the training split (images in [0, 1], labels) and compute the features of both
    splits. ``num_classes`` defaults to max(label) + 1; ``held_out_labels``, if given, give the classifier's
    accuracy on real held-out images (what a perfect sampler could reach)."""
    train_labels = np.asarray(train_labels)
    k = int(train_labels.max()) + 1 if num_classes is None else int(num_classes)
    size = _size(train_images)
    if _size(held_out_images) != size:
        raise ValueError(f"training and held-out images must have one size, got {_text(size)} and "
                         f"{_text(_size(held_out_images))}")
    start = time.perf_counter()
    classifier = train_classifier(train_images, train_labels, k, seed)
    seconds = time.perf_counter() - start
    held_feats, held_preds = features_and_predictions(classifier, held_out_images)
    train_feats, _ = features_and_predictions(classifier, train_images)
    accuracy = None if held_out_labels is None else float((held_preds == np.asarray(held_out_labels)).mean())
    return Reference(classifier, held_feats, train_feats, accuracy, seconds, size)


def _size(images) -> tuple[int, int]:
    return tuple(int(v) for v in np.shape(images)[-2:])


def _text(size) -> str:
    return "×".join(map(str, size))


def fd_floor(reference: Reference, n: int) -> tuple[float, int, int]:
    """(mean FD of the held-out features against disjoint random sets of n training images, the set size
    used (n, or every training image if there are fewer), the number of sets: up to ``FLOOR_SETS``)."""
    total = len(reference.train_features)
    size = min(n, total)
    sets = max(1, min(FLOOR_SETS, total // size))
    perm = np.random.default_rng(FLOOR_SEED).permutation(total)
    values = [frechet_distance_of_samples(reference.train_features[perm[i * size : (i + 1) * size]],
                                          reference.held_out_features) for i in range(sets)]
    return float(np.mean(values)), size, sets


def measure(reference: Reference, samples, labels=None) -> dict:
    """The quality of ``samples`` (N, C, H, W) in [0, 1], N ≥ 2, asked for classes ``labels`` (N,) or None
    (unconditional): the keys quality_accuracy (None without labels), quality_fd, quality_fd_floor,
    quality_fd_ratio, quality_samples, quality_floor_images, quality_floor_sets (module docstring). The samples
    must have the size of the reference's images (``Reference.image_size``)."""
    if np.ndim(samples) == 4 and _size(samples) != reference.image_size:
        raise ValueError(f"samples are {_text(_size(samples))} but the real images are "
                         f"{_text(reference.image_size)}; measure them at the same size")
    feats, preds = features_and_predictions(reference.classifier, samples)
    if len(feats) < 2:
        raise ValueError(f"the quality measure needs at least 2 samples, got {len(feats)}")
    if labels is not None and len(np.asarray(labels)) != len(feats):
        raise ValueError(f"labels must hold one class per sample ({len(feats)}), got {len(np.asarray(labels))}")
    fd = frechet_distance_of_samples(feats, reference.held_out_features)
    floor, size, sets = fd_floor(reference, len(feats))
    return {"quality_accuracy": None if labels is None else float((preds == np.asarray(labels)).mean()),
            "quality_fd": fd, "quality_fd_floor": floor, "quality_fd_ratio": fd / floor,
            "quality_samples": len(feats), "quality_floor_images": size, "quality_floor_sets": sets}
