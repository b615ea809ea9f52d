"""Real data that ships with scikit-learn: the 1,797 8x8 digits, and small models trained on them.

`load_digits_split()` gives normalized float32 train/test tensors; `trained(name)`
returns a model from `MODELS` trained on the train split, caching its weights
under ~/.cache/lowbit (override with LOWBIT_CACHE), never in the repo.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CACHE = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


def save_to_cache(path: Path, save) -> None:
    """`save(file)` writes the cache file `path` whole or not at all: another process (a parallel test worker) may
    be reading it."""
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    save(partial)
    os.replace(partial, path)


def load_digits_split(seed: int = 0, size: int = 8, channels: int = 1):
    """(x_train, y_train, x_test, y_test): images as [N, channels, size, size] float32 in [0, 1], a fixed 75/25 split.

    `size` > 8 upsamples bilinearly and `channels` > 1 repeats the gray channel, for models built for RGB.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy((digits.images / 16.0).astype(np.float32)).unsqueeze(1)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.repeat(1, channels, 1, 1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(x)))
    x, y = x[order], y[order]
    cut = int(0.75 * len(x))
    return x[:cut], y[:cut], x[cut:], y[cut:]


class DigitsCNN(nn.Module):
    """A small conv net with BatchNorm, residual add and a pooled linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DigitsResNet(nn.Module):
    """A wider residual CNN (64 and 128 channels) for 32x32 digits: big enough that pruning its filters shows in
    FLOPs and latency (examples/prune_then_quantize.py)."""

    def __init__(self, in_ch: int = 1, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                    nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64))
        self.down = nn.Sequential(nn.Conv2d(64, 128, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(128),
                                  nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1, bias=False), nn.BatchNorm2d(128), nn.ReLU(),
                                    nn.Conv2d(128, 128, 3, padding=1, bias=False), nn.BatchNorm2d(128))
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.block1(x))
        x = self.down(x)
        x = F.relu(x + self.block2(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


MODELS = {"digits_cnn": DigitsCNN, "digits_resnet": DigitsResNet}


def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


BATCH = 64
LOOP_VERSION = 2  # in the cache's file names: bumped when train() changes, so that no model of the old loop is read


def batches(n: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """One epoch of `n` items as shuffled batches of BATCH indices, the short last one dropped (the train split's
    1347 images end on 3), as loops over BatchNorm do: a BatchNorm in train mode normalizes those few images by
    their own statistics and moves its running ones towards them, the last update before eval. Fewer than BATCH
    items make one batch."""
    return [idx for idx in torch.randperm(n, generator=generator).split(BATCH) if len(idx) == BATCH or n < BATCH]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 30, seed: int = 0, lr: float = 3e-3,
          cosine: bool = False) -> nn.Module:
    """Adam, batch 64, the short last batch of each epoch dropped (`batches`); `cosine` anneals the learning rate
    to 0 over the epochs (wide BatchNorm nets need it)."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs) if cosine else None
    model.train()
    for _ in range(epochs):
        for idx in batches(len(x)):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        if schedule is not None:
            schedule.step()
    return model.eval()


def trained(name: str = "digits_cnn", factory=None, epochs: int = 30, size: int = 8, channels: int = 1,
            cosine: bool = False) -> nn.Module:
    """A model trained on the digits train split (at `size` x `size`, `channels`), from the cache when it is there."""
    factory = factory or MODELS[name]
    path = CACHE / f"{name}{'-cosine' if cosine else ''}-s{size}c{channels}-e{epochs}-v{LOOP_VERSION}.pt"
    torch.manual_seed(0)
    model = factory()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    x, y, _, _ = load_digits_split(size=size, channels=channels)
    train(model, x, y, epochs, cosine=cosine)
    save_to_cache(path, lambda file: torch.save(model.state_dict(), file))
    return model.eval()
