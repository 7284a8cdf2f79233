"""L2W-DEN: Learning to Weight Samples for Dynamic Early-exiting Networks.

Han, Pu, Lai, Wang, Song, Cao, Huang, Deng, Huang. ECCV 2022. https://arxiv.org/abs/2209.08310

A multi-exit network answers at K depths; at test time a sample stops at the first exit that
is confident enough. L2W-DEN trains a small weight prediction network (WPN) by meta-learning
so that each training sample gets a weight at each exit, and the weighted training makes the
network do well under that early-exit regime. This file is the whole method: config, the
meta-learning iteration, anytime and budgeted evaluation (MSDNet's protocols), the training
loop with exact resume, and the CLI.

One iteration, as the authors released it ("step n" in the comments): the batch is split into
halves A and B, and for (train, meta) in ((A, B), (B, A)):
  1. L[i, k] = cross-entropy of train sample i at exit k;
  2. g = WPN(L), weights w = 1 + delta * (g - mean g);
  3. virtual step: theta' = SGD step on sum_k mean_i w[i,k] L[i,k], differentiable in the WPN;
  4. meta loss of theta' on the meta half, with samples assigned to exits as budgeted
     inference with exit fractions ~ q^k would assign them;
  5. Adam step of the WPN on the meta loss;
  6. real SGD step of the backbone, weighted by the updated WPN.

    pip install -r requirements.txt
    python l2w.py --dataset cifar10 --arch msdnet --exits 7          # the paper's setting
    python l2w.py --dataset synthetic --exits 3                      # one-minute offline demo
    python l2w.py --dataset cifar100 --method baseline               # plain multi-exit training
    python l2w.py --eval-only --resume runs/.../checkpoint.pt        # evaluate a checkpoint
    python l2w.py --bench --dataset cifar100 --exits 5 --batch-size 64
    python l2w.py --dataset cifar100 --imta pretrain --out runs/imta1          # IMTA, phase 1 (GE)
    python l2w.py --imta finetune --pretrained runs/imta1/checkpoint.pt       # phase 2 (ISC + OFA)
    torchrun --nproc_per_node 8 l2w.py --dataset imagenet --data-dir DIR --step 4

Tested with torch 2.14 on CPU (see README.md for what has been verified and what has not).
"""
import argparse
import dataclasses
import gc
import inspect
import itertools
import json
import math
import os
import random
import re
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import higher
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import data
from models import IMTANet, build_model, count_cost


# ============================================================================
# Config: one dataclass; per-dataset presets hold the paper's values (PAPER.md)
# ============================================================================

@dataclass
class Config:
    dataset: str = "cifar10"       # cifar10 | cifar100 | cifar10-lt | cifar100-lt | imagenet | folder | synthetic
    data_dir: str = "./data"       # CIFAR: torchvision downloads here; imagenet/folder: DIR/train, DIR/val
    image_size: int = 32           # 32 builds the CIFAR-style network, 224 the ImageNet one
    imbalance: float = 100.0       # long-tailed CIFAR: largest class / smallest class
    arch: str = "msdnet"           # backbone (models.py)
    exits: int = 5                 # number of exits K (the paper: 5 and 7 for MSDNet on CIFAR)
    step: int = 4                  # ImageNet MSDNet step s (the paper: 4, 6, 7); unused on CIFAR
    method: str = "l2w"            # l2w (learned weights) | baseline (all weights 1, no meta step)
    epochs: int = 300
    batch_size: int = 1024         # global batch, split into two halves, each one SGD update
    lr: float = 0.8                # backbone lr, cosine to 0; 0.1 x half-batch / 64 as released
    momentum: float = 0.9
    weight_decay: float = 1e-4
    wpn_lr: float = 1e-4           # Adam, cosine to 0
    wpn_weight_decay: float = 1e-4
    wpn_depth: int = 1             # hidden layers d of the WPN
    wpn_width: int = 500           # hidden width w of the WPN
    q: float = 0.75                # budget variable of the meta objective: exit fractions ~ q^k
    delta: float = 0.8             # perturbation: weights = 1 + delta * (g - mean g)
    constraint: str = "col"        # mean taken per sample ('col'), per exit ('row') or overall ('mat')
    meta_interval: int = 1         # the WPN is meta-updated every I iterations
    holdout: int = 5000            # training images held out for validation and thresholds
    synthetic_size: int = 2000     # training images of --dataset synthetic (test set: a third)
    seed: int = 0
    workers: int = 4               # data-loading processes per rank
    device: str = "auto"           # auto (cuda if available) | cpu | cuda | cuda:1 ...
    amp: bool = False              # bf16 autocast (fp16 + loss scaling where bf16 is unavailable)
    channels_last: bool = False    # NHWC memory format, faster convolutions on recent GPUs
    sync_bn: bool = False          # under torchrun: BatchNorm statistics over all ranks
    out: str = ""                  # run directory; default runs/<dataset>_<arch><exits>_<method>
    print_every: int = 20          # iterations between progress lines
    resume: str = ""               # checkpoint to continue from (or to evaluate with --eval-only)
    eval_only: bool = False        # evaluate --resume and write results.json, no training
    bench: bool = False            # time a plain and an L2W iteration, then exit
    bench_iters: int = 10          # timed iterations per method in --bench
    imta: str = ""                 # IMTA (Li et al. 2019) phase: pretrain (gradient equilibrium) | finetune (ISC + distillation)
    pretrained: str = ""           # --imta finetune: the --imta pretrain checkpoint whose network is frozen
    kd_temperature: float = 3.0    # --imta finetune: distillation temperature T (IMTA: 3 on CIFAR, 1 on ImageNet)
    kd_gamma: float = 0.9          # --imta finetune: share gamma of the distillation term (IMTA: 0.9 CIFAR, 0.1 ImageNet)
    kd_reduction: str = "mean"     # KL per sample: mean (IMTA: summed over classes / classes) | batchmean (summed)
    world_size: int = dataclasses.field(default=1, metadata={"cli": False})  # set by torchrun


# The released settings (PAPER.md, "Hyperparameters"). Precedence: defaults < preset < flags.
CIFAR = dict(epochs=300, batch_size=1024, lr=0.8, q=0.75, delta=0.8, constraint="col",
             meta_interval=1, holdout=5000, image_size=32)
PRESETS = {
    "cifar10": CIFAR,
    "cifar100": CIFAR,
    # long-tailed CIFAR keeps 12,406 / 10,847 images at imbalance 100: a smaller hold-out
    "cifar10-lt": {**CIFAR, "holdout": 1000},
    "cifar100-lt": {**CIFAR, "holdout": 1000},
    "imagenet": dict(epochs=100, batch_size=4096, lr=0.8, q=0.5, delta=0.3, constraint="mat",
                     meta_interval=100, holdout=50000, image_size=224, workers=8, print_every=50),
    # sized so that an epoch of L2W-DEN on a 3-exit MSDNet takes seconds on a laptop CPU
    "synthetic": dict(epochs=3, batch_size=128, lr=0.1, q=0.75, delta=0.8, constraint="col",
                      meta_interval=1, holdout=500, workers=0, print_every=5, image_size=32),
}
# IMTA's distillation settings (its released code), for --imta finetune; other data sets keep
# the Config defaults, IMTA's CIFAR values (T = 3, gamma = 0.9).
IMTA_PRESETS = {"imagenet": dict(kd_temperature=1.0, kd_gamma=0.1)}
# --imta finetune takes these from the --pretrained checkpoint: the network it freezes and the
# data it was trained on (its hold-out split too, so no phase trains on the hold-out images).
PRETRAINED_FIELDS = ("dataset", "imbalance", "synthetic_size", "holdout", "arch", "exits", "step", "image_size")


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def check_config(cfg):
    if cfg.dataset not in data.DATASETS:
        raise UsageError(f"unknown dataset '{cfg.dataset}' (choose {', '.join(data.DATASETS)})")
    if cfg.method not in ("l2w", "baseline"):
        raise UsageError(f"unknown method '{cfg.method}' (choose l2w or baseline)")
    if cfg.constraint not in ("col", "row", "mat"):
        raise UsageError(f"unknown constraint '{cfg.constraint}' (choose col, row or mat)")
    if cfg.batch_size < 2 or cfg.batch_size % (2 * cfg.world_size):
        raise UsageError(f"--batch-size must be even (it is split into two halves) and divisible by "
                         f"2 x {cfg.world_size} ranks, got {cfg.batch_size}")
    if cfg.q <= 0:
        raise UsageError(f"--q must be > 0, got {cfg.q}")
    if cfg.delta < 0:
        raise UsageError(f"--delta must be >= 0, got {cfg.delta}")
    if cfg.imbalance < 1:
        raise UsageError(f"--imbalance must be >= 1, got {cfg.imbalance}")
    if cfg.dataset not in ("imagenet", "folder") and cfg.image_size != 32:
        raise UsageError(f"{cfg.dataset} images are 32x32; --image-size {cfg.image_size} is for imagenet or folder")
    if cfg.eval_only and not cfg.resume:
        raise UsageError("--eval-only needs --resume PATH (the checkpoint to evaluate)")
    if cfg.meta_interval < 1 or cfg.epochs < 0 or cfg.wpn_depth < 0 or cfg.workers < 0:
        raise UsageError("--meta-interval must be >= 1, --epochs, --wpn-depth and --workers >= 0")
    if cfg.imta not in ("", "pretrain", "finetune"):
        raise UsageError(f"unknown --imta '{cfg.imta}' (choose pretrain or finetune)")
    if cfg.imta and cfg.arch != "msdnet":
        raise UsageError(f"--imta is built for msdnet (IMTA's techniques as released), not {cfg.arch}")
    if cfg.imta == "finetune" and not (cfg.pretrained or cfg.resume):
        raise UsageError("--imta finetune needs --pretrained PATH (a checkpoint of --imta pretrain)")
    if cfg.pretrained and cfg.imta != "finetune":
        raise UsageError("--pretrained is for --imta finetune")
    if cfg.kd_temperature <= 0:
        raise UsageError(f"--kd-temperature must be > 0, got {cfg.kd_temperature}")
    if not 0 <= cfg.kd_gamma <= 1:
        raise UsageError(f"--kd-gamma must be in [0, 1], got {cfg.kd_gamma}")
    if cfg.kd_reduction not in ("mean", "batchmean"):
        raise UsageError(f"unknown --kd-reduction '{cfg.kd_reduction}' (choose mean or batchmean)")
    try:
        build_model(cfg.arch, 10, cfg.exits, cfg.image_size, cfg.step, cfg.imta == "pretrain")
    except ValueError as e:
        raise UsageError(str(e)) from None


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_config(argv=None):
    """CLI generated from the Config fields (--batch-size 1024, --eval-only, ...), each with its
    comment as help. Returns (config, checkpoint state or None): with --resume the run continues
    with the config stored in the checkpoint, and flags given now still win."""
    comments = dict(re.findall(r"^    (\w+):.*?#\s*(.*)$", inspect.getsource(Config), re.M))
    parser = OneLineParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Config):
        if not f.metadata.get("cli", True):
            continue
        flag, help = "--" + f.name.replace("_", "-"), f"{comments.get(f.name, '')} (default: {f.default})"
        if f.type is bool:
            parser.add_argument(flag, action="store_true", help=help)
        else:
            parser.add_argument(flag, type=f.type, metavar=f.name.upper(), help=help)
    flags = vars(parser.parse_args(argv))
    state = load_checkpoint(flags["resume"]) if flags.get("resume") else None
    known = {f.name for f in dataclasses.fields(Config)}
    base = {k: v for k, v in state["config"].items() if k in known} if state else {}
    imta = flags.get("imta", base.get("imta", Config.imta))
    if imta == "finetune" and not state and flags.get("pretrained"):
        base = pretrained_fields(flags)
    dataset = flags.get("dataset", base.get("dataset", Config.dataset))
    imta_preset = IMTA_PRESETS.get(dataset, {}) if imta == "finetune" else {}
    cfg = Config(**{**PRESETS.get(dataset, {}), **imta_preset, **base, **flags})
    cfg.world_size = int(os.environ.get("WORLD_SIZE", 1))
    if not cfg.out:
        imta_suffix = f"_imta-{cfg.imta}" if cfg.imta else ""
        cfg.out = os.path.join("runs", f"{cfg.dataset}_{cfg.arch}{cfg.exits}_{cfg.method}{imta_suffix}")
    check_config(cfg)
    return cfg, state


def pretrained_fields(flags):
    """The PRETRAINED_FIELDS of the --pretrained checkpoint's config; a flag that contradicts
    one of them is an error (the frozen network cannot change)."""
    config = load_checkpoint(flags["pretrained"])["config"]
    if config.get("imta") == "finetune":
        raise UsageError(f"--pretrained '{flags['pretrained']}' is an --imta finetune checkpoint; "
                         "give the --imta pretrain one")
    fields = {k: config.get(k, getattr(Config, k)) for k in PRETRAINED_FIELDS}
    for k, v in fields.items():
        if k in flags and flags[k] != v:
            raise UsageError(f"--{k.replace('_', '-')} {flags[k]} does not match the pretrained network's {v} "
                             "(--imta finetune takes it from --pretrained)")
    return fields


# ============================================================================
# The method: WPN, sample weights, meta objective, one iteration
# ============================================================================

class WPN(nn.Module):
    """Weight prediction network (step 2): the K per-exit losses of a sample -> K values in (-1, 1).

    An MLP with `depth` hidden ReLU layers of `width` units and a tanh output.
    """

    def __init__(self, exits, depth=1, width=500):
        super().__init__()
        layers, d_in = [], exits
        for _ in range(depth):
            layers += [nn.Linear(d_in, width), nn.ReLU(inplace=True)]
            d_in = width
        self.net = nn.Sequential(*layers, nn.Linear(d_in, exits), nn.Tanh())

    def forward(self, losses):
        return self.net(losses)


def sample_weights(g, delta, constraint):
    """Weights w = 1 + delta * (g - mean(g)) (step 2): the mean is per sample over the exits
    ('col'), per exit over the batch ('row') or over the whole matrix ('mat'), so the weights
    average to 1 along that direction and only redistribute the loss."""
    dims = {"col": (1,), "row": (0,), "mat": (0, 1)}[constraint]
    return 1 + delta * (g - g.mean(dim=dims, keepdim=True))


def per_exit_losses(logits, targets):
    """L[i, k] = cross-entropy of sample i at exit k, shape (n, K)."""
    return torch.stack([F.cross_entropy(z, targets, reduction="none") for z in logits], dim=1)


def distillation_losses(logits, teacher, targets, temperature, gamma, reduction="mean"):
    """IMTA's one-for-all knowledge distillation (Sec. 3.3) per sample and exit, shape (n, K): the
    last exit learns from the labels, every other exit k from the labels and the last exit alike,
    (1 - gamma) CE + gamma T^2 KL(softmax(teacher / T) || softmax(z_k / T)).

    reduction 'mean' reproduces IMTA's nn.KLDivLoss() (the old default reduction, a mean over
    batch x classes): each sample's KL, summed over the classes, is divided by the number of
    classes; 'batchmean' keeps the true per-sample KL. Averaged over the batch, each column is
    IMTA's loss of that exit.
    """
    soft_teacher = F.log_softmax(teacher.detach() / temperature, dim=1)
    columns = []
    for z in logits[:-1]:
        kl = F.kl_div(F.log_softmax(z / temperature, dim=1), soft_teacher, reduction="none", log_target=True).sum(1)
        if reduction == "mean":
            kl = kl / z.shape[1]
        columns.append((1 - gamma) * F.cross_entropy(z, targets, reduction="none") + gamma * temperature ** 2 * kl)
    columns.append(F.cross_entropy(logits[-1], targets, reduction="none"))
    return torch.stack(columns, dim=1)


def exit_losses(model, images, targets, cfg):
    """Step 1: L[i, k] of a train half. Cross-entropy, except in IMTA's second phase (--imta
    finetune), where it is the one-for-all distillation loss of the new heads against the frozen
    network's last exit; the WPN weights whichever it is."""
    if cfg.imta == "finetune":
        logits, teacher = model(images, with_teacher=True)
        return distillation_losses(logits, teacher, targets, cfg.kd_temperature, cfg.kd_gamma, cfg.kd_reduction)
    return per_exit_losses(model(images), targets)


def trainable_parameters(net):
    """{name: parameter} of what the virtual and the real step move (and the optimizer holds):
    every parameter, except in IMTA's second phase, where the phase-1 network is frozen and only
    the new heads and ISC modules train."""
    return {name: p for name, p in net.named_parameters() if p.requires_grad}


def weighted_loss(losses, weights):
    """sum_k mean_i w[i,k] L[i,k]: the training objective of one half-batch (steps 3 and 6)."""
    return (weights * losses).mean(dim=0).sum()


def exit_fractions(q, exits):
    """Target share of samples leaving at each exit: f_k = q^k / sum_j q^j (MSDNet's budgets)."""
    f = torch.tensor([q ** k for k in range(1, exits + 1)], dtype=torch.float64)
    return f / f.sum()


def confidences(logits):
    """(K, n) max softmax probability of every sample at every exit."""
    return torch.stack([z.softmax(dim=1).amax(dim=1) for z in logits])


def fit_thresholds(confidence, fractions):
    """Per-exit confidence thresholds that send the share f_k of `confidence`'s samples to exit k
    (MSDNet's dynamic_eval_find_threshold). confidence: (K, n).

    Walking the exits in order, exit k's threshold is the confidence of the floor(n * f_k)-th
    most confident sample among those that have not exited; if that count is 0 or is not
    reached, nobody exits there (threshold +inf). The last exit takes everything (-inf).
    """
    exits, n = confidence.shape
    thresholds = torch.full((exits,), math.inf, dtype=confidence.dtype, device=confidence.device)
    exited = torch.zeros(n, dtype=torch.bool, device=confidence.device)
    for k in range(exits - 1):
        take = math.floor(n * fractions[k].item())
        remaining = confidence[k][~exited]
        if 1 <= take <= remaining.numel():
            thresholds[k] = remaining.topk(take).values[-1]
        exited |= confidence[k] >= thresholds[k]
    thresholds[-1] = -math.inf
    return thresholds


def exit_with_thresholds(confidence, thresholds):
    """Index of the first exit whose threshold each sample reaches, shape (n,)."""
    reached = confidence >= thresholds[:, None]
    return reached.to(torch.uint8).argmax(dim=0)   # first True; the last exit always reaches


def meta_loss_fn(logits, targets, q):
    """Meta objective (step 4): send the meta samples through budgeted exiting with fractions
    f_k ~ q^k, exactly as test-time inference would (thresholds fitted on these samples), then
    sum over exits the mean CE of the samples that leave there."""
    confidence = confidences([z.detach() for z in logits])
    exit_of = exit_with_thresholds(confidence, fit_thresholds(confidence, exit_fractions(q, len(logits))))
    total = 0.0
    for k, z in enumerate(logits):
        mine = exit_of == k
        if mine.any():
            total = total + F.cross_entropy(z[mine], targets[mine])
    return total


def half_step(model, wpn, optimizer, wpn_optimizer, images, targets, meta_images, meta_targets, cfg, meta,
              scaler=None):
    """Steps 1-6 on a (train half, meta half) pair; returns (loss, meta loss or None).

    The virtual step and the real step start from the same parameters and the same images, so
    one forward pass (and its graph) serves both: this changes no number the algorithm computes.
    Under torchrun, `model` and `wpn` are DistributedDataParallel: each rank takes its virtual
    step and meta objective on its own shard, and the real and the WPN gradients are averaged.
    """
    net = unwrap(model)
    meta_step = cfg.method == "l2w" and meta
    scale = 1.0 if scaler is None else scaler.get_scale()   # fp16 loss scaling, 1 otherwise
    # Under --amp, the forward pass whose graph the second-order meta-gradient goes through stays
    # in fp32: in bf16 that gradient is mostly rounding error (measured in test_l2w.py).
    with autocast(cfg, images.device, enabled=not meta_step):
        losses = exit_losses(model, images, targets, cfg)           # step 1: L[i, k]
    meta_loss = None
    if meta_step:
        # Step 3, the virtual step: theta' = SGD step on the WPN-weighted loss, with the
        # real optimizer's lr, momentum buffers and weight decay, differentiable in the WPN.
        # higher's differentiable SGD works on a copy of the optimizer state, so the real
        # optimizer is left exactly as it was. Only the trainable parameters move.
        trainable = trainable_parameters(net)
        virtual_sgd = higher.get_diff_optim(optimizer, trainable.values())
        weights = sample_weights(wpn(losses.detach()), cfg.delta, cfg.constraint)
        unscale = None if scaler is None else (lambda grads: [g / scale for g in grads])
        theta_virtual = virtual_sgd.step(weighted_loss(losses, weights) * scale, params=list(trainable.values()),
                                         grad_callback=unscale)

        # Step 4: meta objective on the meta half with theta'; step 5: the WPN's Adam step.
        # The virtual forward takes theta' for the trainable parameters, the frozen ones as they
        # are, and throw-away copies of the BN buffers: a train-mode BatchNorm normalises with
        # the batch statistics, as in any training forward, and updates only the copies; the
        # eval-mode frozen network of IMTA's phase 2 reads its running statistics. Only the WPN
        # receives gradients.
        state = dict(zip(trainable, theta_virtual))
        state.update({name: b.clone() for name, b in net.named_buffers()})
        with autocast(cfg, images.device):
            meta_loss = meta_loss_fn(functional_call(net, state, (meta_images,)), meta_targets, cfg.q)
        wpn_optimizer.zero_grad(set_to_none=True)
        (meta_loss * scale).backward(inputs=list(wpn.parameters()))
        grads = [p.grad for p in wpn.parameters()]
        if scaler is not None:
            torch._foreach_div_(grads, scale)
        if scaler is None or all(torch.isfinite(g).all() for g in grads):   # fp16 overflow: skip
            wpn_optimizer.step()
        meta_loss = meta_loss.item()

    # Step 6, the real step: weights from the updated WPN, no gradient into it.
    if cfg.method == "l2w":
        with torch.no_grad():
            weights = sample_weights(wpn(losses.detach()), cfg.delta, cfg.constraint)
    else:  # the paper's baseline: every sample weighs 1 at every exit
        weights = torch.ones_like(losses)
    loss = weighted_loss(losses, weights)
    sgd_step(loss, optimizer, scaler)
    return loss.item(), meta_loss


def sgd_step(loss, optimizer, scaler=None):
    """Backward and an optimizer step, through the fp16 loss scaler where there is one."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


def train_step(model, wpn, optimizer, wpn_optimizer, images, targets, cfg, meta=True, scaler=None):
    """One iteration: the batch is split into halves A and B; A trains with B as the meta set,
    then B with A. `meta=False` weights with the current WPN without updating it."""
    model.train()
    wpn.train()
    a, b = images.chunk(2), targets.chunk(2)
    if a[0].shape[0] != a[1].shape[0]:
        raise ValueError(f"batch of {images.shape[0]} cannot be split into two equal halves")
    first = half_step(model, wpn, optimizer, wpn_optimizer, a[0], b[0], a[1], b[1], cfg, meta, scaler)
    second = half_step(model, wpn, optimizer, wpn_optimizer, a[1], b[1], a[0], b[0], cfg, meta, scaler)
    metas = [m for m in (first[1], second[1]) if m is not None]
    return {"loss": (first[0] + second[0]) / 2, "meta_loss": sum(metas) / 2 if metas else None}


# ============================================================================
# Evaluation: anytime and budgeted (MSDNet's protocols, PAPER.md)
# ============================================================================

@torch.no_grad()
def predict(model, loader, device, cfg):
    """Logits of every exit for a whole split, in order: (list of K (n, classes) tensors, targets)
    on the CPU. Under torchrun each rank predicts its share of every batch and all get the whole."""
    net = unwrap(model).eval()
    batches = []
    for images, labels in loader:
        images, _ = to_device(images, labels, device, cfg)
        batches.append(([z.float().cpu() for z in net(images)], labels))
    if dist.is_initialized():   # rank r holds the r-th contiguous share of each batch
        shares = [None] * dist.get_world_size()
        dist.all_gather_object(shares, batches)
        batches = [part for parts in itertools.zip_longest(*shares) for part in parts if part is not None]
    return [torch.cat(z) for z in zip(*(b[0] for b in batches))], torch.cat([b[1] for b in batches])


def topk_accuracy(logits, targets, k):
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return 100.0 * (top == targets[:, None]).any(dim=1).float().mean().item()


def anytime_evaluate(logits, targets, flops, params):
    """Anytime protocol: top-1/top-5 of every exit with its cumulative Mul-Adds and params."""
    return [{"exit": k + 1, "acc1": topk_accuracy(z, targets, 1), "acc5": topk_accuracy(z, targets, 5),
             "flops": flops[k], "params": params[k]} for k, z in enumerate(logits)]


def dynamic_evaluate(val_logits, val_targets, test_logits, test_targets, flops):
    """Budgeted protocol (MSDNet's dynamic_evaluate): for q = p/20, p = 1..39, fit thresholds on
    the hold-out split, apply them to the test set, and report accuracy and expected Mul-Adds
    sum_k share_k * flops_k. Thresholds work as in the meta objective (`fit_thresholds`)."""
    val_conf, test_conf = confidences(val_logits), confidences(test_logits)
    correct = torch.stack([z.argmax(dim=1) == test_targets for z in test_logits])   # (K, n)
    n, exits = test_targets.numel(), len(test_logits)
    flops = torch.tensor(flops, dtype=torch.float64)
    curve = []
    for p in range(1, 40):
        q = p / 20
        thresholds = fit_thresholds(val_conf, exit_fractions(q, exits))
        exit_of = exit_with_thresholds(test_conf, thresholds)
        share = torch.bincount(exit_of, minlength=exits).double() / n
        acc = 100.0 * correct[exit_of, torch.arange(n)].float().mean().item()
        curve.append({"q": q, "acc": acc, "flops": float((share * flops).sum())})
    return curve


@torch.no_grad()
def early_exit_predict(model, image, thresholds):
    """Real early exiting for one image: run exits in order and stop computing at the first
    whose confidence reaches its threshold. Returns (predicted class, exit index)."""
    model.eval()
    for k, logits in enumerate(model.exits_iter(image[None])):
        confidence, label = logits.softmax(dim=1).max(dim=1)
        if confidence.item() >= thresholds[k]:
            return label.item(), k


# ============================================================================
# Training loop: cosine schedules, progress, atomic checkpoints, exact resume
# ============================================================================

def cosine(base, iteration, total):
    """Per-iteration cosine decay from `base` to 0 (as in the released MSDNet/L2W code)."""
    return 0.5 * base * (1 + math.cos(math.pi * iteration / total))


def atomic_write(path, write):
    """Write to a temporary file in the same directory, then rename: a crash never leaves a
    half-written checkpoint or results file behind."""
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        state["config"], state["model"], state["epoch"]
    except Exception as e:
        raise UsageError(f"checkpoint '{path}' is corrupt or not an l2w.py checkpoint ({type(e).__name__})") from None
    return state


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_loader(dataset, cfg, device, shuffle):
    """Loader over (epoch, index) batches from data.ShardedBatches: shuffling and augmentation
    are seeded by (seed, epoch), so a resumed epoch sees the same batches. Under torchrun each
    rank loads its share of every global batch."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    sampler = data.ShardedBatches(len(dataset), cfg.batch_size, cfg.seed, rank, cfg.world_size, shuffle)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.workers, pin_memory=device.type == "cuda",
                      persistent_workers=cfg.workers > 0)


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} asked for, but CUDA is not available here")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device '{name}'") from None


def setup_device(cfg):
    """Single process: the requested device. Under torchrun (WORLD_SIZE > 1): one process per
    rank, NCCL on GPUs (rank i on cuda:LOCAL_RANK), gloo on CPU."""
    device = resolve_device(cfg.device)
    if cfg.world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def log(*args):
    if is_main():
        print(*args, flush=True)


def unwrap(model):
    return model.module if isinstance(model, DDP) else model


def amp_dtype(device):
    """bf16 where the device has it (CPUs, Ampere and newer GPUs), else fp16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(cfg, device, enabled=True):
    return torch.autocast(device.type, dtype=amp_dtype(device), enabled=cfg.amp and enabled)


def build(cfg, num_classes, device):
    """Backbone, WPN and their optimizers as configured (PAPER.md, "Hyperparameters"), wrapped in
    DistributedDataParallel under torchrun, and the fp16 loss scaler where one is needed."""
    model = build_model(cfg.arch, num_classes, cfg.exits, cfg.image_size, cfg.step, cfg.imta == "pretrain")
    if cfg.imta == "finetune":   # IMTA's second phase: the network above frozen, new heads on it
        model = IMTANet(model, num_classes)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dist.is_initialized() and cfg.sync_bn:
        if device.type != "cuda":
            raise UsageError("--sync-bn needs GPUs (PyTorch's SyncBatchNorm works on CUDA only)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    wpn = WPN(cfg.exits, cfg.wpn_depth, cfg.wpn_width).to(device)
    optimizer = torch.optim.SGD(trainable_parameters(model).values(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    wpn_optimizer = torch.optim.Adam(wpn.parameters(), lr=cfg.wpn_lr, weight_decay=cfg.wpn_weight_decay)
    if dist.is_initialized():
        ids = [device.index] if device.type == "cuda" else None
        model, wpn = DDP(model, device_ids=ids), DDP(wpn, device_ids=ids)
    scaler = None
    if cfg.amp and amp_dtype(device) == torch.float16:
        scaler = torch.amp.GradScaler(device.type)
    return model, wpn, optimizer, wpn_optimizer, scaler


def format_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def to_device(images, targets, device, cfg):
    images = images.to(device, non_blocking=True)
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=True)


def replicas_identical(module):
    """Under torchrun: are this module's parameters bit-identical on every rank?"""
    flat = torch.cat([p.detach().flatten() for p in unwrap(module).parameters()])
    copies = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, flat)
    return all(torch.equal(c, flat) for c in copies)


def train(cfg, state=None, stop_after_epoch=None):
    """Train (or, with cfg.eval_only, only evaluate) and write results.json; returns the results.

    `state` is the loaded cfg.resume checkpoint, if already read. `stop_after_epoch` ends the
    run early as an interruption would (used to test resume).
    """
    device = setup_device(cfg)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.resume and state is None:
        state = load_checkpoint(cfg.resume)
    # IMTA's second phase starts from the phase-1 network and its hold-out split; a phase-2
    # checkpoint holds both, so a resumed run does not read the phase-1 file.
    pretrained = load_checkpoint(cfg.pretrained) if cfg.imta == "finetune" and not state else None
    splits = data.load(cfg, (state or pretrained or {}).get("holdout_indices"))
    model, wpn, optimizer, wpn_optimizer, scaler = build(cfg, splits.num_classes, device)
    if pretrained:
        try:
            unwrap(model).backbone.load_state_dict(pretrained["model"])
        except RuntimeError as e:
            raise UsageError(f"--pretrained '{cfg.pretrained}' does not fit this model ({str(e).splitlines()[0]})") from None
    start_epoch = 0
    if state:
        try:
            unwrap(model).load_state_dict(state["model"])
            unwrap(wpn).load_state_dict(state["wpn"])
            optimizer.load_state_dict(state["optimizer"])
            wpn_optimizer.load_state_dict(state["wpn_optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UsageError(f"checkpoint '{cfg.resume}' does not fit this model ({str(e).splitlines()[0]})") from None
        start_epoch = state["epoch"]
        set_rng_state(state["rng"])
        log(f"resumed from {cfg.resume} at epoch {start_epoch}")
    if is_main():
        os.makedirs(cfg.out, exist_ok=True)
        atomic_write(os.path.join(cfg.out, "holdout_indices.json"),
                     lambda p: open(p, "w").write(json.dumps(splits.holdout_indices.tolist())))
    flops, params = count_cost(unwrap(model), cfg.image_size)
    log(f"{cfg.arch} with {cfg.exits} exits: {params[-1]:,} parameters, {flops[-1] / 1e6:.2f}M Mul-Adds "
        f"through the last exit; {cfg.method} on {cfg.world_size} x {device.type}"
        f"{', amp ' + str(amp_dtype(device)).removeprefix('torch.') if cfg.amp else ''}")
    if cfg.imta == "pretrain":
        log("IMTA phase 1: gradient equilibrium in the backward pass")
    elif cfg.imta == "finetune":
        log(f"IMTA phase 2: the network of {cfg.pretrained or cfg.resume} frozen, "
            f"{sum(p.numel() for p in trainable_parameters(unwrap(model)).values()):,} parameters in the new heads and ISC")
    log(f"{len(splits.train)} training images, {len(splits.test)} test images; per class: {splits.class_counts}")
    if splits.threshold_source == "train":
        log("no hold-out split (--holdout 0): thresholds are fitted on the training images "
            "with test-time transforms; no per-epoch validation")

    train_loader = make_loader(splits.train, cfg, device, shuffle=True)
    val_loader = make_loader(splits.threshold_set, cfg, device, shuffle=False)
    n_batches = len(train_loader.batch_sampler)
    if not cfg.eval_only and cfg.epochs > start_epoch and n_batches == 0:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the {len(splits.train)} training images")
    total_iters = cfg.epochs * n_batches
    started, done_here, val = time.time(), 0, None
    for epoch in range(start_epoch, cfg.epochs) if not cfg.eval_only else ():
        train_loader.batch_sampler.set_epoch(epoch)
        for i, (images, targets) in enumerate(train_loader):
            iteration = epoch * n_batches + i
            for group in optimizer.param_groups:
                group["lr"] = cosine(cfg.lr, iteration, total_iters)
            for group in wpn_optimizer.param_groups:
                group["lr"] = cosine(cfg.wpn_lr, iteration, total_iters)
            images, targets = to_device(images, targets, device, cfg)
            out = train_step(model, wpn, optimizer, wpn_optimizer, images, targets, cfg,
                             meta=iteration % cfg.meta_interval == 0, scaler=scaler)
            done_here += 1
            if (i + 1) % cfg.print_every == 0 or i + 1 == n_batches:
                elapsed = time.time() - started
                meta = "-" if out["meta_loss"] is None else f"{out['meta_loss']:.4f}"
                eta = elapsed / done_here * (total_iters - iteration - 1)
                log(f"epoch {epoch + 1}/{cfg.epochs} iter {i + 1}/{n_batches} loss {out['loss']:.4f} "
                    f"meta {meta} lr {optimizer.param_groups[0]['lr']:.4f} "
                    f"{done_here * cfg.batch_size / elapsed:.0f} img/s ETA {format_time(eta)}")
        if splits.threshold_source == "holdout":
            val = predict(model, val_loader, device, cfg)   # the last epoch's also fits thresholds
            accs = " ".join(f"{topk_accuracy(z, val[1], 1):.2f}" for z in val[0])
            log(f"epoch {epoch + 1}/{cfg.epochs} hold-out top-1 per exit: {accs}")
        if is_main():
            checkpoint = {"model": unwrap(model).state_dict(), "wpn": unwrap(wpn).state_dict(),
                          "optimizer": optimizer.state_dict(), "wpn_optimizer": wpn_optimizer.state_dict(),
                          "epoch": epoch + 1, "rng": rng_state(), "config": dataclasses.asdict(cfg),
                          "holdout_indices": splits.holdout_indices}
            atomic_write(os.path.join(cfg.out, "checkpoint.pt"), lambda p: torch.save(checkpoint, p))
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            return None
    return evaluate(cfg, model, wpn, splits, device, val or predict(model, val_loader, device, cfg), flops, params)


def evaluate(cfg, model, wpn, splits, device, val, flops, params):
    """Both protocols on the test set; thresholds come from `val`, the (logits, targets) of the
    hold-out split (or of the training images with test-time transforms), never from the test
    set. Rank 0 reports and writes."""
    test_logits, test_targets = predict(model, make_loader(splits.test, cfg, device, False), device, cfg)
    val_logits, val_targets = val
    results = {"config": dataclasses.asdict(cfg), "threshold_source": splits.threshold_source,
               "class_counts": splits.class_counts}
    if dist.is_initialized():   # the averaged gradients must have kept every rank's copy equal
        results["replicas_identical"] = replicas_identical(model) and replicas_identical(wpn)
    if not is_main():
        return None
    anytime = anytime_evaluate(test_logits, test_targets, flops, params)
    dynamic = dynamic_evaluate(val_logits, val_targets, test_logits, test_targets, flops)
    log(f"\nanytime (test set, {len(test_targets)} images)\n exit   top-1   top-5   Mul-Adds (M)   params (M)")
    for row in anytime:
        log(f"{row['exit']:5d} {row['acc1']:7.2f} {row['acc5']:7.2f} {row['flops'] / 1e6:14.2f} "
            f"{row['params'] / 1e6:12.3f}")
    log(f"\nbudgeted (thresholds on the {splits.threshold_source} split, {len(val_targets)} images)"
        "\n    q   top-1   Mul-Adds (M)")
    for row in dynamic:
        log(f"{row['q']:5.2f} {row['acc']:7.2f} {row['flops'] / 1e6:14.2f}")
    results.update(anytime=anytime, dynamic=dynamic)
    path = os.path.join(cfg.out, "results.json")
    atomic_write(path, lambda p: open(p, "w").write(json.dumps(results, indent=1)))
    log(f"\nwrote {path}")
    return results


# ============================================================================
# Benchmark: cost of an L2W iteration relative to plain multi-exit training
# ============================================================================

def bench(cfg):
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    num_classes = data.DATASETS[cfg.dataset] or 1000
    model, wpn, optimizer, wpn_optimizer, scaler = build(cfg, num_classes, device)
    images, targets = to_device(torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size),
                                torch.randint(num_classes, (cfg.batch_size,)), device, cfg)

    def plain_step():  # one SGD step on the full batch, every exit weighted 1
        model.train()
        with autocast(cfg, device):
            loss = exit_losses(model, images, targets, cfg).mean(dim=0).sum()
        sgd_step(loss, optimizer, scaler)

    def l2w_step():
        train_step(model, wpn, optimizer, wpn_optimizer, images, targets, cfg, meta=True, scaler=scaler)

    def timed(step):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    print(f"bench: {cfg.arch} {cfg.exits} exits, {cfg.image_size}x{cfg.image_size} images, batch {cfg.batch_size}, "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{torch.get_num_threads()} threads, amp {cfg.amp}, channels-last {cfg.channels_last}, "
          f"median of {cfg.bench_iters}")
    # The two kinds of iteration alternate, so that a busy machine slows both alike.
    steps = {"plain": plain_step, "l2w": l2w_step}
    times, memory = {name: [] for name in steps}, {}
    for i in range(cfg.bench_iters + 2):   # two warm-up rounds
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times[name].append(timed(step))
            memory[name] = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    results = {name: statistics.median(t[2:]) for name, t in times.items()}
    for name, seconds in results.items():
        peak = f"   peak memory {memory[name] / 2**20:.0f} MiB" if memory[name] is not None else ""
        print(f"{name:6s} {seconds * 1000:9.1f} ms/iter {cfg.batch_size / seconds:9.1f} img/s{peak}")
    print(f"ratio  {results['l2w'] / results['plain']:.2f}x (L2W iteration / plain iteration)")
    if device.type == "cpu":
        print(f"peak memory of the process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")
    return results


# ============================================================================
# main
# ============================================================================

def main(argv=None):
    try:
        cfg, state = parse_config(argv)
        if cfg.bench:
            bench(cfg)
        else:
            train(cfg, state)
            if dist.is_initialized():   # let rank 0 finish writing before the group goes away
                dist.barrier()
    except (UsageError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            gc.collect()   # free the DDP wrappers while their process group still exists
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
