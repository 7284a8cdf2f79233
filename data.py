"""Data for L2W-DEN: CIFAR-10/100 through torchvision, a synthetic CIFAR-shaped set, and the
seeded hold-out split used for per-epoch validation and for fitting the budgeted-inference
thresholds (never the test set; PAPER.md, "Evaluation protocols").
"""
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

# The authors' normalisation (PAPER.md, "Data conventions").
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4824, 0.4467), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
# classes and image size of every dataset the CLI knows
DATASETS = {"cifar10": (10, 32), "cifar100": (100, 32), "synthetic": (10, 32)}


class DataError(Exception):
    """A problem with the user's data, reported as one line."""


@dataclass
class Splits:
    train: Dataset           # augmented training images (training set minus the hold-out)
    threshold_set: Dataset   # test-time transforms: hold-out, or all training images if holdout=0
    test: Dataset
    holdout_indices: torch.Tensor
    num_classes: int
    threshold_source: str    # "holdout" or "train", said in the log and results.json


def holdout_split(n, holdout, seed):
    """Seeded split of range(n) into (train, hold-out) index tensors."""
    if not 0 <= holdout < n:
        raise DataError(f"--holdout must be between 0 and {n - 1} for this dataset, got {holdout}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[holdout:].sort().values, order[:holdout].sort().values


def cifar(name, data_dir):
    """(augmented train, test-transform train, test) for cifar10 or cifar100."""
    import torchvision
    import torchvision.transforms as T

    normalise = T.Normalize(*CIFAR_STATS[name])
    augment = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), normalise])
    plain = T.Compose([T.ToTensor(), normalise])
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        cls(data_dir, train=True, download=True)
        cls(data_dir, train=False, download=True)
    except Exception as e:  # offline, a proxy, a corrupt archive: all end the same way for the user
        raise DataError(
            f"{name} not found in '{data_dir}' and could not be downloaded ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'no detail'}); on a machine without network, "
            f"copy {cls.filename} (from {cls.url}) into '{data_dir}' or pass --data-dir") from None
    return (cls(data_dir, train=True, transform=augment), cls(data_dir, train=True, transform=plain),
            cls(data_dir, train=False, transform=plain))


def synthetic(size, seed, num_classes=10):
    """A learnable CIFAR-shaped set (3x32x32, 10 classes) whose samples range from easy to hard.

    Each class has a smooth random prototype. A sample mixes its class prototype with a
    distractor class's prototype and noise; the mix is drawn per sample, so some samples are
    obvious (an early exit is confident and right) and others are nearly ambiguous (only a
    deeper exit separates them). Returns (train, test) with `size` and `size // 3` samples.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, 3, 4, 4, generator=g)
    fine = torch.randn(num_classes, 3, 16, 16, generator=g)
    up = lambda t: torch.nn.functional.interpolate(t, size=32, mode="bilinear", align_corners=False)
    prototypes = up(coarse) + 0.5 * up(fine)
    prototypes = (prototypes - prototypes.mean()) / prototypes.std()

    def draw(n):
        labels = torch.randint(num_classes, (n,), generator=g)
        distractor = (labels + torch.randint(1, num_classes, (n,), generator=g)) % num_classes
        difficulty = torch.rand(n, generator=g)                # 0 = easy, 1 = hard
        share = (1.0 - 0.5 * difficulty).view(n, 1, 1, 1)        # class share of the signal, 1 .. 0.5
        noise = torch.randn(n, 3, 32, 32, generator=g) * (1.0 + 2.0 * difficulty.view(n, 1, 1, 1))
        images = share * prototypes[labels] + (1 - share) * prototypes[distractor] + noise
        return TensorDataset(images, labels)

    return draw(size), draw(size // 3)


def load(cfg, holdout_indices=None):
    """Build the splits for cfg.dataset. `holdout_indices` (from a checkpoint) wins over the seed."""
    if cfg.dataset not in DATASETS:
        raise DataError(f"unknown dataset '{cfg.dataset}' (choose {', '.join(DATASETS)})")
    num_classes = DATASETS[cfg.dataset][0]
    if cfg.dataset == "synthetic":
        train, test = synthetic(cfg.synthetic_size, cfg.seed, num_classes)
        train_aug = train_plain = train
    else:
        train_aug, train_plain, test = cifar(cfg.dataset, cfg.data_dir)
    n = len(train_plain)
    train_idx, held = holdout_split(n, cfg.holdout, cfg.seed)
    if holdout_indices is not None:
        held = torch.as_tensor(holdout_indices)
        keep = torch.ones(n, dtype=torch.bool)
        keep[held] = False
        train_idx = keep.nonzero().flatten()
    if len(held):
        return Splits(Subset(train_aug, train_idx.tolist()), Subset(train_plain, held.tolist()), test,
                      held, num_classes, "holdout")
    return Splits(Subset(train_aug, train_idx.tolist()), train_plain, test, held, num_classes, "train")
