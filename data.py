"""Data for L2W-DEN: CIFAR-10/100 (balanced or long-tailed), ImageNet, any image folder, a synthetic CIFAR-shaped
set, the seeded hold-out split (validation and the budgeted-inference thresholds, never the test set) and loaders.

Augmentation draws from generators of its own, seeded from (seed, epoch[, sample]): a batch does not depend on the
number of loader workers or ranks, and a resumed run sees the batches it would have. CIFAR is augmented in whole
batches on the training device (`DeviceImages`), folders and ImageNet image by image in loader workers (`Split`).
"""
import hashlib
import json
import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

# The authors' normalisation (their released code); ImageNet's for ImageNet and folders.
CIFAR_STATS = {"cifar10": ((0.4914, 0.4824, 0.4467), (0.2471, 0.2435, 0.2616)),
               "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# classes of every dataset the CLI knows (None: read from the folder)
DATASETS = {"cifar10": 10, "cifar100": 100, "cifar10-lt": 10, "cifar100-lt": 100, "imagenet": 1000,
            "folder": None, "synthetic": 10}


class DataError(Exception):
    """A problem with the user's data, reported as one line. Raised in a DataLoader worker, it
    reaches the main process rebuilt from the worker's whole traceback, which ends in its line."""

    def __init__(self, message):
        super().__init__(message.strip().rpartition("\n")[2].removeprefix(f"{__name__}.DataError: "))


@dataclass
class Splits:
    train: Dataset            # augmented training images (training set minus the hold-out)
    threshold_set: Dataset    # test-time transforms: hold-out, or all training images if holdout=0
    test: Dataset
    holdout_indices: torch.Tensor
    num_classes: int
    threshold_source: str     # "holdout" or "train", said in the log and results.json
    class_counts: list        # training images per class (before the hold-out is taken)
    ignored: tuple = ()       # files beside the class folders of DIR/train and DIR/val (ImageFolder skips them too)


def seed_of(*keys):
    """A 32-bit seed for torch.Generator from (seed, epoch[, sample]): a hash, which no key can overflow."""
    return int.from_bytes(hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()[:4], "little")


class Split(Dataset):
    """Samples `indices` of `base` through `transform(image, generator)`. An item is an index or (epoch, index);
    the generator, seeded from (seed, epoch, index in `base`), alone draws the transform's random parameters."""

    def __init__(self, base, indices, transform=None, seed=0):
        self.base, self.indices, self.transform, self.seed = base, list(indices), transform, seed

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, item):
        epoch, i = item if isinstance(item, tuple) else (0, item)
        image, label = self.base[self.indices[i]]
        if self.transform is not None:
            image = self.transform(image, torch.Generator().manual_seed(seed_of(self.seed, epoch, self.indices[i])))
        return image, label


class DeviceImages(Dataset):
    """Samples `indices` of uint8 `images` (N, 3, H, W) and `labels` on the training device, where whole batches get
    CIFAR's random crop (zero padding 4) and flip, drawn for all N images per (seed, epoch); items as for `Split`."""

    def __init__(self, images, labels, indices, stats, augment, seed=0):
        self.images, self.labels, self.augment, self.seed = images, labels, augment, seed
        self.indices = torch.as_tensor(indices, dtype=torch.long, device=images.device)
        self.mean, self.std = (torch.tensor(v, device=images.device).view(3, 1, 1) for v in stats)
        self.table = (None, None)   # (epoch, augmentation(epoch)): the epoch being walked

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, item):
        images, labels = self.batch([item if isinstance(item, tuple) else (0, item)])
        return images[0], labels[0]

    def augmentation(self, epoch, padding=4):
        """Every sample's crop offset (top, left) in [0, 2 padding] and flip for `epoch`: (N, 2), (N,)."""
        if self.table[0] != epoch:
            g = torch.Generator().manual_seed(seed_of(self.seed, epoch))
            n = len(self.images)
            offset, flip = torch.randint(2 * padding + 1, (n, 2), generator=g), torch.rand(n, generator=g) < 0.5
            self.table = epoch, (offset.to(self.images.device), flip.to(self.images.device))
        return self.table[1]

    def batch(self, items, padding=4):
        """(images, labels) of [(epoch, i), ...], augmented where `augment` says, normalised."""
        # non_blocking: a plain copy to a GPU would wait for the work queued there before it
        index = self.indices[torch.tensor([i for _, i in items]).to(self.indices.device, non_blocking=True)]
        images = self.images[index]
        if self.augment:   # (square images)
            offset, flip = (t[index] for t in self.augmentation(items[0][0], padding))
            size, steps = images.shape[-1], torch.arange(images.shape[-1], device=images.device)
            rows = (offset[:, :1] + steps)[:, None, :, None].expand(-1, 3, -1, size + 2 * padding)
            columns = torch.where(flip[:, None], offset[:, 1:] + steps.flip(0), offset[:, 1:] + steps)
            padded = F.pad(images, [padding] * 4)   # zeros: RandomCrop(32, padding=4)'s black border
            images = padded.gather(2, rows).gather(3, columns[:, None, None, :].expand(-1, 3, size, -1))
        return images.float().div_(255).sub_(self.mean).div_(self.std), self.labels[index]   # ToTensor, Normalize


class ShardedBatches(Sampler):
    """Batches of (epoch, index) pairs: each epoch's permutation (generator seed: seed * 100_003 + epoch), cut into
    global batches of `batch_size`, of which rank r of `world` yields its contiguous share. Without shuffling, the
    split is walked in order and the last batch may be short. `set_epoch(epoch, skip)` starts at batch `skip`."""

    def __init__(self, n, batch_size, seed=0, rank=0, world=1, shuffle=True):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.shuffle, self.epoch, self.skip = shuffle, 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def __len__(self):
        return self.n // self.batch_size if self.shuffle else -(-self.n // self.batch_size)

    def __iter__(self):
        order = (torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
                 if self.shuffle else torch.arange(self.n))
        for b in range(self.skip, len(self)):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            share = -(-len(batch) // self.world)
            mine = batch[self.rank * share:(self.rank + 1) * share].tolist()
            if mine:   # a short last batch may leave nothing for the last ranks
                yield [(self.epoch, i) for i in mine]


class DeviceBatches:
    """The loader of a `DeviceImages` split: (images, labels) of each batch of `batch_sampler`, made on the device."""

    def __init__(self, dataset, batch_sampler):
        self.dataset, self.batch_sampler = dataset, batch_sampler

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        return (self.dataset.batch(items) for items in self.batch_sampler)


def make_loader(dataset, cfg, device, shuffle):
    """Batches seeded by (seed, epoch), the same in a resumed epoch; under torchrun each rank loads its share of
    every global batch. CIFAR (`DeviceImages`) is augmented on the device, other images in loader workers."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    sampler = ShardedBatches(len(dataset), cfg.batch_size, cfg.seed, rank, cfg.world_size, shuffle)
    if isinstance(dataset, DeviceImages):
        return DeviceBatches(dataset, sampler)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.workers, pin_memory=device.type == "cuda",
                      persistent_workers=cfg.workers > 0)


def holdout_split(targets, holdout, seed):
    """Seeded, stratified (train, hold-out) indices: every (n / holdout)-th sample in class order (random within)."""
    targets = torch.as_tensor(targets)
    n = len(targets)
    if not 0 <= holdout < n:
        raise DataError(f"--holdout must be between 0 and {n - 1} for this dataset, got {holdout}")
    key = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    order = torch.argsort(targets.double() * 2 + key)   # by class, randomly within a class
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[order[((torch.arange(holdout, dtype=torch.float64) + 0.5) * n / holdout).long()]] = True
    return (~chosen).nonzero().flatten(), chosen.nonzero().flatten()


def long_tailed_indices(targets, imbalance, seed=0):
    """Cui et al. (2019): class c keeps int(N_max * (1/imbalance)^(c/(C-1))) of its images (seeded); sorted indices."""
    targets = torch.as_tensor(targets)
    counts = torch.bincount(targets)
    n_max, classes = int(counts.max()), len(counts)
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in range(classes):
        members = (targets == c).nonzero().flatten()
        n_c = int(n_max * (1 / imbalance) ** (c / (classes - 1)))
        keep.append(members[torch.randperm(len(members), generator=g)[:n_c]])
    return torch.cat(keep).sort().values


def folder_transforms(image_size):
    """(train, test) transforms of a folder or ImageNet: `folder_transform` at that size."""
    return tuple(partial(folder_transform, size=image_size, train=train) for train in (True, False))


def folder_transform(image, generator, size, train):
    """A PIL image -> normalised tensor: ImageNet's transforms from 64 pixels, CIFAR's (after a resize) below, with
    random parameters from `generator` alone (torchvision's classes draw from the process's random stream)."""
    import torchvision.transforms.functional as TF

    if size >= 64 and train:
        image = TF.resized_crop(image, *resized_crop_box(*image.size, generator), [size, size])
    elif size >= 64:
        image = TF.center_crop(TF.resize(image, size * 256 // 224), size)
    else:
        image = TF.resize(image, [size, size])
        if train:
            padding = size // 8
            top, left = torch.randint(2 * padding + 1, (2,), generator=generator).tolist()
            image = TF.crop(TF.pad(image, padding), top, left, size, size)
    if train and torch.rand(1, generator=generator).item() < 0.5:
        image = TF.hflip(image)
    return TF.normalize(TF.to_tensor(image), *IMAGENET_STATS)


def resized_crop_box(width, height, generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's box (top, left, height, width), as torchvision draws it, from `generator`."""
    uniform = lambda: torch.rand(1, generator=generator).item()
    for _ in range(10):
        area = width * height * (scale[0] + (scale[1] - scale[0]) * uniform())
        aspect = math.exp(math.log(ratio[0]) + math.log(ratio[1] / ratio[0]) * uniform())
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = (torch.randint(n + 1, (1,), generator=generator).item() for n in (height - h, width - w))
            return top, left, h, w
    aspect = min(max(width / height, ratio[0]), ratio[1])
    w, h = min(width, round(height * aspect)), min(height, round(width / aspect))
    return (height - h) // 2, (width - w) // 2, h, w


def cifar(name, data_dir):
    """(train, test) torchvision datasets without transforms, downloaded if missing."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name.removesuffix("-lt") == "cifar10" else torchvision.datasets.CIFAR100
    try:
        return cls(data_dir, train=True, download=True), cls(data_dir, train=False, download=True)
    except Exception as e:  # offline, a proxy, a corrupt archive: all end the same way for the user
        raise DataError(f"{name} not found in '{data_dir}' and could not be downloaded ({type(e).__name__}: "
                        f"{(str(e).splitlines() or ['no detail'])[0]}); on a machine without network, copy "
                        f"{cls.filename} (from {cls.url}) into '{data_dir}' or pass --data-dir") from None


def image_folders(name, data_dir, expected_classes=None):
    """(train, val) ImageFolders of DIR/train and DIR/val, after checking the layout, and the paths of the files
    beside their class folders, which are ignored (as ImageFolder ignores them: .DS_Store, README.txt, ...)."""
    import torchvision

    classes, ignored = {}, []
    for split in ("train", "val"):
        path = os.path.join(data_dir, split)
        if not os.path.isdir(path):
            raise DataError(f"{name}: no '{split}' folder in '{data_dir}' (expected {data_dir}/train/<class>/"
                            f"<images> and {data_dir}/val/<class>/<images>)")
        entries = list(os.scandir(path))
        classes[split] = {e.name for e in entries if e.is_dir()}
        others = sorted(os.path.join(path, e.name) for e in entries if not e.is_dir())
        if not classes[split]:   # (ImageNet's validation images come in one folder)
            raise DataError(f"{name}: '{path}' holds no class folder (and {len(others)} files outside class "
                            "folders, which are ignored); sort the images into one folder per class")
        ignored += others
    train, val = classes["train"], classes["val"]
    if train != val or len(train) < 2 or expected_classes and len(train) != expected_classes:
        differ = (f": '{min(train - val)}' has no folder in val" if train - val else
                  f": '{min(val - train)}' has no folder in train" if val - train else "")
        raise DataError(f"{name}: expected {expected_classes or 'at least two'} class folders in '{data_dir}', the "
                        f"same in train and val; found {len(train)} in train and {len(val)} in val{differ}")
    try:
        return (*(torchvision.datasets.ImageFolder(os.path.join(data_dir, s), loader=read_image)
                  for s in ("train", "val")), tuple(ignored))
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{name}: {str(e).splitlines()[0]}") from None


def read_image(path):
    """ImageFolder's loader, naming the file it cannot read (it may be found only mid-epoch)."""
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except Exception as e:
        detail = (str(e).splitlines() or [""])[0]
        raise DataError(f"cannot read the image '{path}' ({type(e).__name__}: {detail})") from None


def synthetic(size, seed, num_classes=10):
    """A learnable CIFAR-shaped set, (train, test) of `size` and `size // 3` samples, from easy to hard: a class is a
    colour layout and a texture at a random shift and strength; a hard sample (half) shows its texture over a layout
    of no class. In unit Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    smooth = lambda t: F.interpolate(t, size=32, mode="bilinear", align_corners=False)
    layouts = smooth(torch.randn(num_classes, 3, 4, 4, generator=g))
    layouts = (layouts - layouts.mean()) / layouts.std()
    motifs = torch.randn(num_classes, 3, 8, 8, generator=g).repeat_interleave(2, 2).repeat_interleave(2, 3)
    textures = motifs.repeat(1, 1, 2, 2)   # period 16
    textures = (textures - textures.mean()) / textures.std()

    def draw(n):
        labels = torch.randint(num_classes, (n,), generator=g)
        hard = (torch.rand(n, generator=g) < 0.5).view(n, 1, 1, 1)
        no_class = smooth(torch.randn(n, 3, 4, 4, generator=g))
        no_class = no_class / no_class.std()
        shifts = torch.randint(16, (n, 2), generator=g).tolist()
        shifted = torch.stack([textures[c].roll(shift, dims=(1, 2)) for c, shift in zip(labels.tolist(), shifts)])
        strength = 1 + torch.rand(n, 1, 1, 1, generator=g)
        images = (torch.where(hard, no_class, layouts[labels]) + strength * shifted
                  + torch.randn(n, 3, 32, 32, generator=g))
        return TensorDataset(images, labels)

    return draw(size), draw(size // 3)


def read_holdout_indices(path, holdout, kept, n):
    """--holdout-indices: the hold-out indices into the `n` training images (among the `kept`) from a run's
    holdout_indices.json or MSDNet-PyTorch's / L2W-DEN's index.pth (a permutation of range(n), the hold-out last)."""
    what, is_json = f"--holdout-indices '{path}'", path.endswith(".json")
    try:
        content = (json.loads(Path(path).read_text()) if is_json
                   else torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:   # unreadable, not JSON, not a torch file
        raise DataError(f"{what} cannot be read as {'JSON' if is_json else 'a torch-saved tensor'} "
                        f"({type(e).__name__})") from None
    if is_json and not (isinstance(content, list) and all(type(i) is int and 0 <= i < n for i in content)):
        raise DataError(f"{what} is not a JSON list of indices into the {n} training images")
    if not is_json and not (torch.is_tensor(content) and content.dtype in (torch.int32, torch.int64)
                            and torch.equal(content.sort().values, torch.arange(n, dtype=content.dtype))):
        raise DataError(f"{what} is not a permutation of the {n} training images (the form of MSDNet-PyTorch's "
                        "and L2W-DEN's index.pth)")
    held = torch.tensor(content, dtype=torch.long) if is_json else content[n - holdout:].long()
    if holdout == 0:
        raise DataError(f"{what} gives the hold-out split, and --holdout 0 asks for none")
    if len(held) != holdout:
        raise DataError(f"{what} holds {len(held)} hold-out indices, not --holdout {holdout}: "
                        f"give --holdout {len(held)}")
    if len(held.unique()) < holdout:
        raise DataError(f"{what} repeats indices")
    if not torch.isin(held, kept).all():
        raise DataError(f"{what} holds indices of images that are not in this long-tailed set")
    return held


def load(cfg, holdout_indices=None, device="cpu"):
    """The splits of cfg.dataset; the hold-out is drawn from the seed unless given (`holdout_indices`, from a
    checkpoint, or else the file cfg.holdout_indices). CIFAR's images are kept on `device`, the training device."""
    if cfg.dataset not in DATASETS:
        raise DataError(f"unknown dataset '{cfg.dataset}' (choose {', '.join(DATASETS)})")
    ignored = ()
    if cfg.dataset == "synthetic":
        train, test = synthetic(cfg.synthetic_size, cfg.seed)
    elif cfg.dataset.startswith("cifar"):
        train, test = cifar(cfg.dataset, cfg.data_dir)
    else:
        train, test, ignored = image_folders(cfg.dataset, cfg.data_dir, DATASETS[cfg.dataset])
    targets = train.tensors[1] if isinstance(train, TensorDataset) else torch.as_tensor(train.targets)
    kept = (long_tailed_indices(targets, cfg.imbalance, cfg.seed) if cfg.dataset.endswith("-lt")
            else torch.arange(len(targets)))
    num_classes = DATASETS[cfg.dataset] or len(train.classes)
    class_counts = torch.bincount(targets[kept], minlength=num_classes).tolist()
    train_pos, held_pos = holdout_split(targets[kept], cfg.holdout, cfg.seed)
    train_idx, held = kept[train_pos], kept[held_pos]
    if holdout_indices is None and cfg.holdout_indices:
        holdout_indices = read_holdout_indices(cfg.holdout_indices, cfg.holdout, kept, len(targets))
    if holdout_indices is not None:
        held = torch.as_tensor(holdout_indices)
        train_idx = kept[~torch.isin(kept, held)]
    threshold_idx = held if len(held) else kept
    if cfg.dataset.startswith("cifar"):   # the train and threshold splits share one tensor of images
        stats = CIFAR_STATS[cfg.dataset.removesuffix("-lt")]
        images, test_images = (torch.from_numpy(d.data).to(device).permute(0, 3, 1, 2).contiguous()   # NHWC -> NCHW
                               for d in (train, test))
        labels, test_labels = (torch.as_tensor(d.targets).to(device) for d in (train, test))
        splits = (DeviceImages(images, labels, train_idx, stats, True, cfg.seed),
                  DeviceImages(images, labels, threshold_idx, stats, False),
                  DeviceImages(test_images, test_labels, range(len(test)), stats, False))
    else:
        augment, plain = folder_transforms(cfg.image_size) if cfg.dataset != "synthetic" else (None, None)
        splits = (Split(train, train_idx.tolist(), augment, cfg.seed), Split(train, threshold_idx.tolist(), plain),
                  Split(test, range(len(test)), plain))
    return Splits(*splits, holdout_indices=held, num_classes=num_classes, class_counts=class_counts,
                  threshold_source="holdout" if len(held) else "train", ignored=ignored)
