"""L2W-DEN: Learning to Weight Samples for Dynamic Early-exiting Networks.

Han, Pu, Lai, Wang, Song, Cao, Huang, Deng, Huang. ECCV 2022. https://arxiv.org/abs/2209.08310

A multi-exit network answers at K depths; at test time a sample stops at the first exit that
is confident enough. L2W-DEN trains a small weight prediction network (WPN) by meta-learning
so that each training sample gets a weight at each exit, and the weighted training makes the
network do well under that early-exit regime.

One iteration, as the authors released it ("step n" in the comments): the batch is split into
halves A and B, and for (train, meta) in ((A, B), (B, A)):
  1. L[i, k] = loss of train sample i at exit k;
  2. g = WPN(L), weights w = 1 + delta * (g - mean g);
  3. virtual step: theta' = SGD step on sum_k mean_i w[i,k] L[i,k], differentiable in the WPN;
  4. meta loss of theta' on the meta half, with samples assigned to exits as budgeted
     inference with exit fractions ~ q^k would assign them;
  5. Adam step of the WPN on the meta loss;
  6. real SGD step of the backbone, weighted by the updated WPN.

The file reads in that order: config, the method (self-contained: copy it into your project),
evaluation (anytime, budgeted, real early exit), the training loop, then what a user looks
up rather than reads: the command line, curves and summaries, benchmark, main().

    python l2w.py --dataset cifar10 --arch msdnet --exits 7     # the paper's setting
    python l2w.py --dataset synthetic --exits 3                 # offline demo, about a minute
    python l2w.py --eval-only --resume runs/.../checkpoint.pt   # evaluate a checkpoint
    python l2w.py --select-q RUN RUN ...                        # q chosen on the hold-out
    python l2w.py --help                                        # every option; README.md for more
"""
import argparse
import copy
import dataclasses
import datetime
import gc
import inspect
import itertools
import json
import os
import re
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from models import (IMTANet, build_model, check_input_size, count_cost, distillation_losses, imta_exit_losses,
                    load_released)


# ============================================================================
# Config: one dataclass; per-dataset presets hold the paper's values
# ============================================================================

@dataclasses.dataclass
class Config:
    dataset: str = "cifar10"       # cifar10 | cifar100 | cifar10-lt | cifar100-lt | imagenet | folder | synthetic
    data_dir: str = "./data"       # CIFAR: torchvision downloads here; imagenet/folder: DIR/train, DIR/val
    image_size: int = 32           # 32 builds the CIFAR-style network, 224 the ImageNet one
    imbalance: float = 100.0       # long-tailed CIFAR: largest class / smallest class
    arch: str = "msdnet"           # backbone (models.py)
    exits: int = 5                 # number of exits K (the paper: 5 and 7 for MSDNet on CIFAR)
    step: int = 4                  # ImageNet MSDNet step s (the paper: 4, 6, 7); unused on CIFAR
    base: int = 4                  # ImageNet MSDNet: layers in the first block (MSDNet-PyTorch's released s=7 model: 7)
    method: str = "l2w"            # l2w (learned weights) | baseline (all weights 1, no meta step)
    epochs: int = 300
    batch_size: int = 1024         # global batch, split into two halves, each one SGD update
    lr: float = 0.0                # cosine to 0; leave it out for the paper's 0.1 x half-batch / 64 (/ 256 from 64 px)
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
    meta_grad: str = "higher"      # higher (second-order backward, as taught) | jvp (the same gradient, first-order)
    holdout: int = 5000            # training images held out for validation and thresholds
    holdout_indices: str = ""      # hold-out from a file: a run's holdout_indices.json, or index.pth's last --holdout
    synthetic_size: int = 1500     # training images of --dataset synthetic (test set: a third)
    seed: int = 0
    workers: int = 4               # loader processes per rank for folders and ImageNet (CIFAR: on the device)
    device: str = "auto"           # auto (cuda if available) | cpu | cuda | cuda:1 ...
    amp: bool = False              # bf16 autocast (fp16 + loss scaling where bf16 is unavailable)
    channels_last: bool = False    # NHWC memory format, faster convolutions on recent GPUs
    tf32: bool = False             # TF32 in the meta-gradient too: faster on recent GPUs, less exact
    deterministic: bool = False    # deterministic GPU kernels (slower), so that a resume is bit-identical on a GPU too
    out: str = ""                  # run folder, else runs/<data>_<arch><exits>_<method>[_q<q>]_seed<seed>[_<flag>...]
    print_every: int = 20          # iterations between progress lines
    save_every: int = 0            # checkpoints every N iterations too (0: epochs' ends only); also on SIGTERM/SIGUSR1
    resume: str = ""               # checkpoint to continue from (or to evaluate with --eval-only)
    weights: str = ""              # released MSDNet-PyTorch / L2W-DEN checkpoint to start from (or to evaluate)
    eval_only: bool = False        # evaluate --resume or --weights and write results.json, no training
    early_exit: bool = False       # also real early exit on the test set at --q or --budget, timed vs the whole network
    budget: float = 0.0            # --eval-only: the mean Mul-Adds per image to stay within, as 20M or 1.5G
    bench: bool = False            # time plain, L2W (higher) and L2W (jvp) iterations, then exit
    bench_iters: int = 10          # timed iterations per method in --bench
    imta: str = ""                 # IMTA phase: pretrain (gradient equilibrium) | finetune (ISC + distillation)
    pretrained: str = ""           # --imta finetune: the --imta pretrain checkpoint whose network is frozen
    kd_temperature: float = 3.0    # --imta finetune: distillation temperature T (IMTA: 3 on CIFAR, 1 on ImageNet)
    kd_gamma: float = 0.9          # --imta finetune: distillation's share gamma (IMTA: 0.9 CIFAR, 0.1 ImageNet)
    kd_reduction: str = "mean"     # KL per sample: mean (IMTA: summed over classes / classes) | batchmean (summed)
    world_size: int = dataclasses.field(default=1, metadata={"cli": False})  # set by torchrun

    def __post_init__(self):
        check_knobs(self)   # an unknown method, meta_grad or constraint must not train something else
        if not self.lr:   # the paper's rule, with the batch of each update (half the global batch, as released)
            self.lr = 0.1 * (self.batch_size / 2) / (256 if self.image_size >= 64 else 64)


# The released settings (the paper's implementation details and the authors' commands; README,
# "The paper's experiments"). Precedence: defaults < preset < flags.
CIFAR = dict(epochs=300, batch_size=1024, q=0.75, delta=0.8, constraint="col",   # lr: Config's rule, 0.8
             meta_interval=1, holdout=5000, image_size=32)
PRESETS = {
    "cifar10": CIFAR, "cifar100": CIFAR,
    # long-tailed CIFAR keeps 12,406 / 10,847 images at imbalance 100: a smaller hold-out
    "cifar10-lt": {**CIFAR, "holdout": 1000}, "cifar100-lt": {**CIFAR, "holdout": 1000},
    "imagenet": dict(epochs=100, batch_size=4096, q=0.5, delta=0.3, constraint="mat",
                     meta_interval=100, holdout=50000, image_size=224, workers=8, print_every=50),
    # the demo (3 exits), chosen on the hold-out: 2,000 training images seen twice keep the losses spread;
    # a meta step every 2nd iteration takes a minute; the WPN's Adam, at 20x the paper's lr, moves in 62 steps
    "synthetic": dict(epochs=2, batch_size=64, lr=0.3, wpn_lr=2e-3, q=0.75, delta=0.8, constraint="col",
                      meta_interval=2, holdout=500, synthetic_size=2500, workers=0, print_every=10, image_size=32),
}
# IMTA's distillation settings (its released code) for --imta finetune; elsewhere its CIFAR values.
IMTA_PRESETS = {"imagenet": dict(kd_temperature=1.0, kd_gamma=0.1)}
# Far beyond the papers' networks, below the sizes that hang or exhaust memory.
LIMITS = {"exits": 32, "wpn_depth": 8, "wpn_width": 4096}


# ============================================================================
# The method (arXiv:2209.08310, Sec. 3): WPN, sample weights, meta objective, one iteration
# ============================================================================
# Self-contained: copy it, banner to banner, with its imports (they serve the whole file); README, "Using the method".
import contextlib
import math
from functools import partial

import higher
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.func import functional_call

CHOICES = {"method": ("l2w", "baseline"), "meta_grad": ("higher", "jvp"), "constraint": ("col", "row", "mat")}


def check_knobs(cfg):
    """The knobs come from any object with these attributes: a misspelt one must not train something else."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"unknown {name} '{getattr(cfg, name)}' (choose {', '.join(allowed)})")


class WPN(nn.Module):
    """Weight prediction network (step 2): an MLP (`depth` ReLU layers of `width`), K losses -> (-1, 1)^K."""

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
    """Weights w = 1 + delta * (g - mean(g)) (step 2), the mean per sample over the exits ('col'), per exit
    ('row') or overall ('mat'): they average to 1 that way and only redistribute the loss."""
    dims = {"col": (1,), "row": (0,), "mat": (0, 1)}[constraint]
    return 1 + delta * (g - g.mean(dim=dims, keepdim=True))


def weighted_loss(losses, weights):
    """sum_k mean_i w[i,k] L[i,k]: the training objective of one half-batch (steps 3 and 6)."""
    return (weights * losses).mean(dim=0).sum()


def check_exit_logits(logits):
    """The model contract: forward returns per-exit logits, cheapest exit first."""
    if torch.is_tensor(logits) and logits.dim() == 3 or isinstance(logits, (list, tuple)) and len(logits) > 0 and all(
            torch.is_tensor(z) and z.dim() == 2 for z in logits):
        return logits
    got = f"a tensor of shape {tuple(logits.shape)}" if torch.is_tensor(logits) else type(logits).__name__
    raise TypeError("the model's forward must return per-exit logits: a list or tuple of (n, classes) tensors "
                    f"or a stacked (exits, n, classes) tensor; got {got}")


def exit_cross_entropy(logits, targets):
    """(n, K): the cross-entropy of every sample at every exit."""
    return torch.stack([F.cross_entropy(z, targets, reduction="none") for z in check_exit_logits(logits)], dim=1)


def cross_entropy_losses(model, images, targets):
    """Step 1: L[i, k], shape (n, K), the default per-exit loss; `model`: a module or a functional forward."""
    return exit_cross_entropy(model(images), targets)


def exit_fractions(q, exits):
    """Target share of samples leaving at each exit: f_k = q^k / sum_j q^j (MSDNet's budgets)."""
    f = torch.tensor([q ** k for k in range(1, exits + 1)], dtype=torch.float64)
    return f / f.sum()


def confidences(logits):
    """(K, n) max softmax probability of every sample at every exit."""
    return torch.stack([z.softmax(dim=1).amax(dim=1) for z in logits])


def meta_exit_assignment(confidence, fractions):
    """Exit of every meta sample (step 4), as released: exit k takes floor(n f_k) of those not yet assigned,
    the most confident at exit k first (ties: lower index first); the last exit the rest. confidence: (K, n)."""
    exits, n = confidence.shape
    exit_of = torch.full((n,), exits - 1, dtype=torch.long, device=confidence.device)
    free = torch.arange(n, device=confidence.device)
    for k, fraction in enumerate(fractions.tolist()[:-1]):   # host numbers, not device values
        take = math.floor(n * fraction)
        order = confidence[k][free].sort(descending=True, stable=True).indices
        exit_of[free[order[:take]]] = k
        free = free[order[take:]].sort().values
    return exit_of


def meta_loss_fn(logits, targets, q):
    """Meta objective (step 4): each meta sample goes to an exit as budgeted inference with fractions f_k ~ q^k
    would send it; the sum over exits of the mean CE of the samples there (one-hot weights 1 / count: boolean
    indexing would make the host wait for the GPU to count)."""
    logits = check_exit_logits(logits)
    exit_of = meta_exit_assignment(confidences([z.detach() for z in logits]), exit_fractions(q, len(logits)))
    losses = exit_cross_entropy(logits, targets)
    leaves = (exit_of[:, None] == torch.arange(len(logits), device=exit_of.device)).to(losses.dtype)   # one-hot
    return (losses * leaves / leaves.sum(dim=0).clamp(min=1)).sum()


def functional_forward(net, params, images, **kwargs):
    """The forward with `params` ({name: tensor}) for its own, on copies of its buffers (BatchNorm's stay)."""
    buffers = {name: b.clone() for name, b in net.named_buffers()}
    return functional_call(net, {**buffers, **params}, (images,), kwargs)


def trainable_parameters(net):
    """{name: parameter} of what the virtual and the real step move (in IMTA's phase 2: the new heads)."""
    return {name: p for name, p in net.named_parameters() if p.requires_grad}


def optimizer_step(optimizer, scaler=None):
    """optimizer.step(), through an fp16 loss scaler where there is one; returns whether it skipped (overflow)."""
    if scaler is None:
        optimizer.step()
        return False
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() < scale


def higher_meta_gradient(wpn, optimizer, params, losses, weights, meta_loss, scaler):
    """Steps 3-5 as the method is taught: a differentiable virtual step and the second-order
    backward of the meta loss through it. Leaves the WPN's gradient in its .grad."""
    # Step 3: theta' = SGD step on the weighted loss with the real optimizer's lr, momentum buffers and
    # weight decay, differentiable in the WPN; higher steps a copy of them, the real ones stay as they were.
    virtual_sgd = higher.get_diff_optim(optimizer, list(params.values()))
    theta_virtual = virtual_sgd.step(weighted_loss(losses, weights), params=list(params.values()))
    # Steps 4-5: the meta loss at theta', back-propagated through theta' into the WPN.
    m = meta_loss(dict(zip(params, theta_virtual)))
    (m if scaler is None else scaler.scale(m)).backward(inputs=list(wpn.parameters()))
    return m


def virtual_sgd_step(optimizer, params, grads):
    """theta' = theta - lr (mu buf + g + wd theta), torch.optim.SGD's formula with each parameter's group and
    momentum buffer (before SGD's first step: the step). Affine in g: returns (theta', a), d theta'_p / d g_p = -a_p."""
    group_of = {p: group for group in optimizer.param_groups for p in group["params"]}
    theta_virtual, slopes = [], []
    for p, g in zip(params, grads):
        group = group_of[p]
        mu, dampening = group["momentum"], group["dampening"]
        step, slope = g.add(p, alpha=group["weight_decay"]), 1.0
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if mu:   # SGD's buffer: mu buf + (1 - dampening) step, and at the first step the step itself
            buf, slope = (step, 1.0) if buf is None else (buf.mul(mu).add_(step, alpha=1 - dampening), 1 - dampening)
            step, slope = (step.add(buf, alpha=mu), 1 + mu * slope) if group["nesterov"] else (buf, slope)
        theta_virtual.append(p.add(step, alpha=-group["lr"]))
        slopes.append(group["lr"] * slope)
    return theta_virtual, slopes


def jvp_meta_gradient(wpn, optimizer, params, losses, weights, meta_loss, scaler, train_losses, draws):
    """Steps 3-5, the same meta-gradient with no second-order backward (README). The WPN sees the losses detached, so
    theta' = theta - a (g(w) + const), g(w) = grad_theta sum_k mean_i w_ik L_ik, is affine in w:
        dM / dw_ik = -(1/n) < a * grad_theta' M, grad_theta L_ik >,
    one backward of M at theta' (v) and one forward-mode JVP of theta -> L (`train_losses`, whose
    random draws were `draws`) in the direction a * v. Leaves the WPN's gradient in its .grad."""
    # Step 3 as plain numbers (SGD's formula); the graph of `losses` stays for the real step.
    grads = torch.autograd.grad(weighted_loss(losses, weights.detach()), list(params.values()), retain_graph=True,
                                allow_unused=True, materialize_grads=True)   # a layer the forward skips: g = 0
    with torch.no_grad():
        theta_virtual, slopes = virtual_sgd_step(optimizer, params.values(), grads)
    theta_virtual = [t.requires_grad_() for t in theta_virtual]
    # Step 4, and v = grad_theta' M.
    m = meta_loss(dict(zip(params, theta_virtual)))
    (m if scaler is None else scaler.scale(m)).backward(inputs=theta_virtual)
    # u = J(theta) (a v), J the Jacobian of the train half's (n, K) losses: forward-mode AD through the
    # batched forward (BatchNorm couples the samples) with its random draws (dropout). A parameter the
    # meta loss does not reach (an exit no meta sample leaves at) has v = 0.
    direction = {name: torch.zeros_like(p) if t.grad is None else a * t.grad
                 for (name, p), a, t in zip(params.items(), slopes, theta_virtual)}
    with replayed(draws), forward_ad.dual_level(), torch.no_grad():
        try:
            u = forward_ad.unpack_dual(train_losses({name: forward_ad.make_dual(p.detach(), direction[name])
                                                     for name, p in params.items()})).tangent
        except NotImplementedError as e:   # e.g. a custom autograd.Function without a jvp rule
            raise NotImplementedError(f"meta_grad 'jvp' needs forward-mode AD through the network, which fails "
                                      f"here ({str(e).splitlines()[0]}); use meta_grad 'higher'") from None
    # Step 5's gradient: dM/dw = -u / n, back-propagated through w = 1 + delta (g - mean g) into the WPN.
    weights.backward(-u / len(u), inputs=list(wpn.parameters()))
    return m


def random_state(device):   # what the random draws of a forward on `device` start from
    return device, torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def replayed(state):
    """Draw again from `state`; then the global stream goes on as if nothing had been drawn (as with `higher`)."""
    device, cpu, cuda = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


@contextlib.contextmanager
def ieee_fp32():
    """fp32 convolutions and matrix products in IEEE fp32, then the settings as they were: on Ampere
    and later GPUs cuDNN rounds fp32 convolutions' operands to TF32 by default (README, "--amp")."""
    cudnn = torch.backends.cudnn
    # torch >= 2.9 also keeps a precision per operation, which the older flags set too, and raises where
    # the two disagree (a user's set_float32_matmul_precision("high") and our "ieee"): both are set.
    per_op = ([torch.backends.cuda.matmul, torch.backends.mkldnn.matmul, cudnn.conv, cudnn.rnn]
              if hasattr(cudnn, "conv") else [])
    try:   # unreadable where a user set per-operation ones alone (they disagree already): left alone
        older = torch.get_float32_matmul_precision(), cudnn.allow_tf32
    except RuntimeError:
        older = None

    def put(flags, precisions):   # the older flags first: they set the per-operation ones too
        if flags:
            torch.set_float32_matmul_precision(flags[0])
            cudnn.allow_tf32 = flags[1]
        for module, precision in zip(per_op, precisions):
            module.fp32_precision = precision

    saved = older, [module.fp32_precision for module in per_op]
    put(("highest", False) if older else None, ["ieee"] * len(per_op))
    try:
        yield
    finally:
        put(*saved)


def half_step(model, wpn, optimizer, wpn_optimizer, images, targets, meta_images, meta_targets, cfg, meta,
              loss_fn, autocast, scalers, meta_precision):
    """Steps 1-6 on (train half, meta half): (loss, meta loss or None, whether fp16 skipped the WPN's step)."""
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    meta_step = cfg.method == "l2w" and meta
    meta_scaler, real_scaler = (scalers["meta"], scalers["real"]) if scalers else (None, None)
    draws = random_state(images.device) if meta_step else None   # what step 1's dropout draws from
    # Step 1: L[i, k]; on a meta step outside autocast (step 4 keeps it), and steps 1-5's fp32 in IEEE, not TF32
    # (`meta_precision`): bf16 or TF32 make the meta-gradient mostly rounding error. Its graph serves steps 3, 6.
    with (meta_precision if meta_step else autocast)():
        losses = loss_fn(model, images, targets)
    meta_loss, skipped = None, False
    if meta_step:
        params = trainable_parameters(net)   # steps 2-5 move only the WPN; the virtual step, what the real one moves

        def train_losses(theta):   # the train half's losses at `theta`
            return loss_fn(partial(functional_forward, net, theta), images, targets)

        def meta_loss_at(theta_virtual):   # step 4: the meta objective on the meta half
            with autocast():
                return meta_loss_fn(functional_forward(net, theta_virtual, meta_images), meta_targets, cfg.q)

        wpn_optimizer.zero_grad(set_to_none=True)
        with meta_precision():
            weights = sample_weights(wpn(losses.detach()), cfg.delta, cfg.constraint)   # step 2
            if cfg.meta_grad == "jvp":
                m = jvp_meta_gradient(wpn, optimizer, params, losses, weights, meta_loss_at, meta_scaler,
                                      train_losses, draws)
            else:
                m = higher_meta_gradient(wpn, optimizer, params, losses, weights, meta_loss_at, meta_scaler)
        skipped, meta_loss = optimizer_step(wpn_optimizer, meta_scaler), m.detach()   # step 5: Adam step of the WPN

    # Step 6, the real step: weights from the updated WPN, no gradient into it.
    if cfg.method == "l2w":
        with torch.no_grad():
            weights = sample_weights(wpn(losses.detach()), cfg.delta, cfg.constraint)
    else:  # the paper's baseline: every sample weighs 1 at every exit
        weights = torch.ones_like(losses)
    loss = weighted_loss(losses, weights)
    optimizer.zero_grad(set_to_none=True)
    (loss if real_scaler is None else real_scaler.scale(loss)).backward()
    optimizer_step(optimizer, real_scaler)
    return loss.detach(), meta_loss, skipped


def check_meta_step(model, optimizer, cfg):
    """What the virtual step needs, refused in one line where it is missing."""
    if not (math.isfinite(cfg.q) and cfg.q > 0 and math.isfinite(cfg.delta) and cfg.delta >= 0):
        raise ValueError(f"q must be a finite number > 0 and delta one >= 0, got q {cfg.q} and delta {cfg.delta}")
    trainable, groups = trainable_parameters(model), optimizer.param_groups
    held = {id(p) for group in groups for p in group["params"]}
    missing = [name for name, p in trainable.items() if id(p) not in held]
    if missing:   # the virtual step moves every parameter that requires grad
        raise ValueError(f"the optimizer does not hold {missing[0]}"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if cfg.meta_grad == "higher" and len(held) > len(trainable):
        raise ValueError(f"meta_grad 'higher': the optimizer holds {len(held) - len(trainable)} frozen parameter(s) "
                         "too (leave them out, or use meta_grad 'jvp')")
    if any(group.get("maximize") for group in groups):
        raise ValueError("the virtual step descends the weighted loss: an optimizer with maximize=True cannot take it")
    if cfg.meta_grad == "jvp" and type(optimizer) is not torch.optim.SGD:
        raise ValueError(f"meta_grad 'jvp' needs torch.optim.SGD, got {type(optimizer).__name__} (use 'higher')")


def train_step(model, wpn, optimizer, wpn_optimizer, images, targets, cfg, meta=True,
               loss_fn=cross_entropy_losses, autocast=contextlib.nullcontext, scalers=None, meta_precision=ieee_fp32):
    """One iteration, as the authors released it: the batch is split into halves A and B; A
    trains with B as the meta set, then B with A. Returns {"loss", "meta_loss" (None without a
    meta step): 0-dim tensors on the device, "wpn_skipped"}.

    model: its forward returns per-exit logits, cheapest exit first (DDP-wrapped or not); optimizer:
    the backbone's, holding every parameter that requires grad (SGD for `jvp`).
    cfg: any object with method, delta, constraint, q, meta_grad; meta=False: no meta step (the meta interval).
    loss_fn(model, images, targets) -> (n, K) per-exit losses, the ones the WPN weights.
    autocast: a context factory for the forwards that may run in low precision; scalers: fp16 loss
    scalers {"real": backbone's, "meta": WPN's}, or None.
    meta_precision: a context factory for steps 1-5 of a meta step (`contextlib.nullcontext`: TF32 allowed).
    """
    check_knobs(cfg)
    if cfg.method == "l2w" and meta:
        check_meta_step(model, optimizer, cfg)
    model.train()
    wpn.train()
    x, y = images.chunk(2), targets.chunk(2)   # half A: x[0], y[0]; half B: x[1], y[1]
    if len(x) != 2 or x[0].shape[0] != x[1].shape[0]:
        raise ValueError(f"a batch of {images.shape[0]} cannot be split into two equal halves")
    (loss_a, meta_a, skipped_a), (loss_b, meta_b, skipped_b) = (   # (train, meta) = (A, B), then (B, A)
        half_step(model, wpn, optimizer, wpn_optimizer, x[i], y[i], x[1 - i], y[1 - i], cfg, meta, loss_fn, autocast,
                  scalers, meta_precision) for i in (0, 1))
    return {"loss": (loss_a + loss_b) / 2, "meta_loss": None if meta_a is None else (meta_a + meta_b) / 2,
            "wpn_skipped": skipped_a + skipped_b}


# ============================================================================
# Evaluation: anytime and budgeted (MSDNet's protocols, Huang et al. ICLR 2018), real early exit
# ============================================================================

@torch.no_grad()
@ieee_fp32()   # the same checkpoint gives the same logits, whatever the TF32 settings
def predict(model, loader, device, cfg, with_teacher=False):
    """(K (n, classes) logits, targets) on the CPU, on rank 0 only; `with_teacher`: IMTA's teacher's appended."""
    net = unwrap(model).eval()
    if dist.is_initialized():   # each rank's running statistics have followed its own shard
        for buffer in net.buffers():
            dist.broadcast(buffer, 0)
    batches = []
    for images, labels in loader:
        images = to_device(images, labels, device, cfg)[0]
        logits = net(images, with_teacher=True) if with_teacher else net(images)
        logits = [*logits[0], logits[1]] if with_teacher else logits   # IMTA: (the new heads' logits, the teacher's)
        batches.append(([z.float().cpu() for z in logits], labels.cpu()))
    if dist.is_initialized():   # rank r holds the r-th contiguous share of each batch
        shares = [None] * dist.get_world_size() if is_main() else None
        dist.gather_object(batches, shares, dst=0)
        if not is_main():
            return None
        batches = [part for parts in itertools.zip_longest(*shares) for part in parts if part is not None]
    return [torch.cat(z) for z in zip(*(b[0] for b in batches))], torch.cat([b[1] for b in batches])


def percent(right):
    """The share of True in `right`, in %, rounded to 1e-4 (73.0, not float32's 73.0000019); NaN for none."""
    return round(100 * right.sum().item() / right.numel(), 4) if right.numel() else math.nan


def topk_accuracy(logits, targets, k):
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return percent((top == targets[:, None]).any(dim=1))


def fit_thresholds(confidence, fractions):
    """MSDNet's dynamic_eval_find_threshold: exit k's threshold is the confidence of the floor(n f_k)-th most
    confident sample not yet exited (+inf if that is 0 or not reached); the last exit takes the rest (-inf)."""
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
    """(n,) first exit whose threshold each sample reaches; none reached (NaN): the last exit."""
    reached = confidence >= thresholds[:, None]
    reached[-1] = True
    return reached.to(torch.uint8).argmax(dim=0)   # the first True


def budgeted_point(thresholds, confidence, correct, flops):
    """Top-1 (%) at each image's exit and mean Mul-Adds per image with these thresholds; confidence, correct: (K, n)."""
    exit_of = exit_with_thresholds(confidence, thresholds.to(confidence.device))
    share = torch.bincount(exit_of, minlength=len(flops)).double() / len(exit_of)
    return percent(correct.gather(0, exit_of[None])), float((share * share.new_tensor(flops)).sum())


def correctness(logits, targets):
    return torch.stack([z.argmax(dim=1) == targets for z in logits])


def dynamic_evaluate(val, test, flops, qs=tuple(p / 20 for p in range(1, 40))):
    """Budgeted protocol (MSDNet's dynamic_evaluate): at each q, thresholds fitted on `val`, scored on `test`."""
    val_conf, test_conf, correct, exits = confidences(val[0]), confidences(test[0]), correctness(*test), len(flops)
    points = (budgeted_point(fit_thresholds(val_conf, exit_fractions(q, exits)), test_conf, correct, flops) for q in qs)
    return [{"q": q, "acc": acc, "flops": cost} for q, (acc, cost) in zip(qs, points)]


def holdout_halves(logits, targets):
    """The hold-out's even and odd positions: --select-q and --budget fit on the first, score on the second."""
    return tuple(([z[half::2] for z in logits], targets[half::2]) for half in (0, 1))


# --budget's q: steps of 0.001 up to 2 (the protocol's 39 among them), then of 1 % up to 1000 (nearly all at the last).
BUDGET_QS = [p / 1000 for p in range(1, 2001)] + [2 * 1.01 ** j for j in range(1, 625)]


def budget_evaluate(budget, val, test, flops):
    """--budget: of the thresholds fitted at each q of BUDGET_QS on one half of the hold-out, the most accurate
    within `budget` on the other (then the cheapest). The test set is scored, never looked at to choose."""
    fit, score = holdout_halves(*val)
    if budget >= flops[-1]:
        log(f"--budget {budget / 1e6:.2f}M covers the whole network ({flops[-1] / 1e6:.2f}M Mul-Adds): no early exit")
        q, thresholds = None, torch.tensor([math.inf] * (len(flops) - 1) + [-math.inf])
    else:
        curve = dynamic_evaluate(fit, score, flops, BUDGET_QS)
        fitting = [row for row in curve if row["flops"] <= budget]
        if not fitting:
            raise UsageError(f"--budget {budget / 1e6:.2f}M: no thresholds meet it on the hold-out (the cheapest: "
                             f"{min(row['flops'] for row in curve) / 1e6:.2f}M Mul-Adds per image)")
        q = max(fitting, key=lambda row: (row["acc"], -row["flops"]))["q"]
        thresholds = fit_thresholds(confidences(fit[0]), exit_fractions(q, len(flops)))
    holdout_acc, holdout_flops = budgeted_point(thresholds, confidences(score[0]), correctness(*score), flops)
    test_acc, test_flops = budgeted_point(thresholds, confidences(test[0]), correctness(*test), flops)
    log(f"\nbudget {budget / 1e6:.2f}M Mul-Adds per image: {'the whole network' if q is None else f'q {q:.4g}'}, "
        f"thresholds {' '.join(f'{t:.4f}' for t in thresholds.tolist())}\n hold-out (fitted on {len(fit[1])} "
        f"images, scored on {len(score[1])}): top-1 {holdout_acc:.2f}, {holdout_flops / 1e6:.2f}M Mul-Adds per "
        f"image\n test set ({len(test[1])} images): top-1 {test_acc:.2f}, {test_flops / 1e6:.2f}M Mul-Adds per image")
    return {"budget": budget, "q": q, "thresholds": thresholds.tolist(), "holdout_acc": holdout_acc,
            "holdout_flops": holdout_flops, "test_acc": test_acc, "test_flops": test_flops}


@torch.inference_mode()
def early_exit_predict(model, images, thresholds):
    """Real early exiting: at exit k the samples whose confidence reaches thresholds[k] leave, and what later
    exits need is cut to those that remain. Returns (predictions, exits), as `exit_with_thresholds` simulates."""
    if model.training:   # not unconditionally: eval() walks every module, as long as a first exit at batch 1
        model.eval()
    remaining = torch.arange(len(images), device=images.device)    # original index of every sample still running
    predictions, exit_of = (torch.empty_like(remaining) for _ in range(2))
    stream = model.exits_iter(images)
    logits = next(stream)
    for k in range(len(thresholds)):
        leave = logits.softmax(dim=1).amax(dim=1) >= thresholds[k]   # as `confidences` computes it
        if k == len(thresholds) - 1:   # the last exit takes the rest, whatever its threshold
            leave.fill_(True)
        predictions[remaining] = logits.argmax(dim=1)   # those that stay are overwritten at a later exit
        exit_of[remaining] = k
        stay = (~leave).nonzero().flatten()   # the one synchronisation per exit: who goes on
        if len(stay) == 0:
            break
        remaining = remaining[stay]
        logits = stream.send(stay if len(stay) < len(leave) else None)   # None: all stay, nothing to cut
    stream.close()
    return predictions, exit_of


def timed(step, images, device):
    """(seconds, step(images) or step(), peak GPU memory in bytes or None), the GPU synchronised around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = step() if images is None else step(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


@torch.inference_mode()
@ieee_fp32()   # as `predict`, whose logits the budgeted protocol simulates from
def early_exit_evaluate(cfg, model, splits, device, val, test, flops, budget=None):
    """--early-exit: the thresholds at cfg.q (or --budget's) for real, at batch 1 and --batch-size, each test batch
    through the whole network and `early_exit_predict` in turn; `same_as_budgeted`: images that exit as simulated."""
    net, exits, n = unwrap(model).eval(), len(flops), len(test[1])
    q = budget["q"] if budget else cfg.q
    thresholds = (torch.tensor(budget["thresholds"]) if budget else
                  fit_thresholds(confidences(val[0]), exit_fractions(cfg.q, exits)))
    simulated = exit_with_thresholds(confidences(test[0]), thresholds)
    simulated_predictions = torch.stack(test[0]).argmax(dim=2)[simulated, torch.arange(n)]
    steps = {"whole": net, "early": partial(early_exit_predict, net, thresholds=thresholds.to(device))}
    runs = []
    for batch_size in dict.fromkeys([1, cfg.batch_size]):   # once if --batch-size is 1
        loader = data.make_loader(splits.test, dataclasses.replace(cfg, batch_size=batch_size), device, shuffle=False)
        seconds, early = {"whole": 0.0, "early": 0.0}, []
        for i, (images, labels) in enumerate(loader):
            images, _ = to_device(images, labels, device, cfg)
            if i == 0:   # warm-up: the first calls allocate memory and pick kernels
                for step in steps.values():
                    timed(step, images, device)
            for name in ("whole", "early") if i % 2 == 0 else ("early", "whole"):
                elapsed, out, _ = timed(steps[name], images, device)
                seconds[name] += elapsed
                if name == "early":
                    early.append([t.cpu() for t in out])
        predictions, exit_of = (torch.cat(t) for t in zip(*early))
        runs.append({"batch_size": batch_size,
                     "ms_per_image": 1000 * seconds["early"] / n, "images_per_s": n / seconds["early"],
                     "whole_ms_per_image": 1000 * seconds["whole"] / n, "whole_images_per_s": n / seconds["whole"],
                     "speedup": seconds["whole"] / seconds["early"], "accuracy": percent(predictions == test[1]),
                     "same_as_budgeted": int(((exit_of == simulated) & (predictions == simulated_predictions)).sum()),
                     "exit_shares": (torch.bincount(exit_of, minlength=exits).double() / n).tolist()})
    shares = torch.tensor(runs[0]["exit_shares"], dtype=torch.float64)
    mean_flops = float((shares * torch.tensor(flops, dtype=torch.float64)).sum())
    result = {"q": q, "accuracy": runs[0]["accuracy"], "budgeted_accuracy": percent(simulated_predictions == test[1]),
              "flops": mean_flops, "whole_flops": flops[-1], "flops_speedup": flops[-1] / mean_flops, "runs": runs}
    log(f"\nearly exit at {'the last exit' if q is None else f'q {q:.4g}'} (test set, {n} images)\n top-1 "
        f"{result['accuracy']:.2f} (budgeted protocol: {result['budgeted_accuracy']:.2f}), {mean_flops / 1e6:.2f}M "
        f"Mul-Adds per image (whole network {flops[-1] / 1e6:.2f}M: {result['flops_speedup']:.2f}x), exit shares "
        f"{' '.join(f'{s:.3f}' for s in shares)}\n batch   early exit: ms/image  images/s   whole network: ms/image  "
        "images/s   speedup   share of the Mul-Adds speedup   same as budgeted")
    for run in runs:
        log(f"{run['batch_size']:6d} {run['ms_per_image']:21.3f} {run['images_per_s']:9.1f} "
            f"{run['whole_ms_per_image']:24.3f} {run['whole_images_per_s']:9.1f} {run['speedup']:8.2f}x "
            f"{100 * run['speedup'] / result['flops_speedup']:28.0f} % {run['same_as_budgeted']:11d}/{n}")
    return result


def average_ranks(x):
    """Ranks 1..n of x's values, ties given the mean of the ranks they span (Spearman's rule)."""
    order = x.argsort(stable=True)
    _, tie_group, counts = torch.unique_consecutive(x[order], return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()
    ranks = torch.empty(len(x), dtype=torch.float64)
    ranks[order] = (last - (counts - 1) / 2)[tie_group]
    return ranks


@torch.no_grad()
def weight_profile(losses, wpn, cfg, initial_wpn=None):
    """What the WPN learned from held-out (n, K) losses, per exit: the `mean` weight; `spearman` of weight and loss
    (None if either is constant; the paper: < 0 at early exits, > 0 at late ones); `deciles`, the mean weight of
    each tenth by loss, easiest first; `moved`, the mean |w - w_start| against the WPN's start."""
    losses = losses.double().cpu()   # float64 (the WPNs on copies): float32's rounding would order close weights
    weigh = lambda net: sample_weights(copy.deepcopy(unwrap(net)).cpu().double()(losses), cfg.delta, cfg.constraint)
    weights = weigh(wpn)
    profile = {"mean": weights.mean(0).tolist(), "spearman": [], "deciles": [],
               "moved": None if initial_wpn is None else (weights - weigh(initial_wpn)).abs().mean(0).tolist()}
    for w, loss in zip(weights.T, losses.T):
        rank_w, rank_l = (ranks - ranks.mean() for ranks in (average_ranks(w), average_ranks(loss)))
        spread = (rank_w.square().sum() * rank_l.square().sum()).sqrt()
        profile["spearman"].append((rank_w @ rank_l / spread).item() if spread > 0 else None)
        profile["deciles"].append([part.mean().item() if len(part) else None
                                   for part in w[loss.argsort(stable=True)].tensor_split(10)])
    return profile


def evaluate(cfg, model, splits, device, val, flops, params, history):
    """Both protocols on the test set, thresholds from `val` (the hold-out's logits, targets); writes results.json."""
    test = predict(model, data.make_loader(splits.test, cfg, device, False), device, cfg)
    if not is_main():
        return None
    anytime = [{"exit": k + 1, "acc1": topk_accuracy(z, test[1], 1), "acc5": topk_accuracy(z, test[1], 5),
                "flops": flops[k], "params": params[k]} for k, z in enumerate(test[0])]   # anytime: every exit
    dynamic = dynamic_evaluate(val, test, flops)
    holdout = dynamic_evaluate(*holdout_halves(*val), flops) if splits.threshold_source == "holdout" else None
    log(f"\nanytime (test set, {len(test[1])} images)\n exit   top-1   top-5   Mul-Adds (M)   params (M)")
    for row in anytime:
        log(f"{row['exit']:5d} {row['acc1']:7.2f} {row['acc5']:7.2f} {row['flops'] / 1e6:14.2f} "
            f"{row['params'] / 1e6:12.3f}")
    log(f"\nbudgeted (thresholds on the {splits.threshold_source} split, {len(val[1])} images"
        + ("; hold-out columns: thresholds fitted on one half of it, scored on the other)" if holdout else ")")
        + "\n    q   top-1   Mul-Adds (M)" + ("   hold-out top-1   Mul-Adds (M)" if holdout else ""))
    for row, own in zip(dynamic, holdout or [None] * len(dynamic)):
        log(f"{row['q']:5.2f} {row['acc']:7.2f} {row['flops'] / 1e6:14.2f}"
            + (f" {own['acc']:16.2f} {own['flops'] / 1e6:14.2f}" if own else ""))
    results = {"config": dataclasses.asdict(cfg), "threshold_source": splits.threshold_source,
               "class_counts": splits.class_counts, "anytime": anytime, "dynamic": dynamic,
               "holdout_dynamic": holdout, "history": history}
    if cfg.budget:
        results["budget"] = budget_evaluate(cfg.budget, val, test, flops)
    if cfg.early_exit:
        results["early_exit"] = early_exit_evaluate(cfg, model, splits, device, val, test, flops, results.get("budget"))
    write_json(os.path.join(cfg.out, "results.json"), results)
    log(f"\nwrote {cfg.out}/results.json")
    return results


# ============================================================================
# Training loop: cosine schedules, progress, atomic checkpoints, exact resume
# ============================================================================

def cosine(base, iteration, total):
    """Per-iteration cosine decay from `base` to 0 (as in the released MSDNet/L2W code)."""
    return 0.5 * base * (1 + math.cos(math.pi * iteration / total))


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def atomic_write(path, write):
    """`write(file)` into path.tmp, synced, then renamed over `path`: a crash or a full disk leaves no half file."""
    try:
        with open(path + ".tmp", "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:   # torch.save reports a failed write as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        folder = os.path.dirname(path) or "."
        free = f"; {shutil.disk_usage(folder).free / 2 ** 20:.0f} MiB free there" if os.path.isdir(folder) else ""
        kept = "the last one written is intact" if os.path.exists(path) else "nothing was written"
        raise UsageError(f"cannot write '{path}' ({getattr(e, 'strerror', None) or str(e).splitlines()[0]}{free}); "
                         f"{kept}") from None


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def check_file(path, what):
    inside = os.path.join(path, "checkpoint.pt")
    need(not os.path.isdir(path), f"{what} '{path}' is a folder, not a file"
         + (f"; the run's checkpoint in it is '{inside}'" if os.path.isfile(inside) else ""))
    need(os.path.isfile(path), f"{what} '{path}' does not exist")


def load_checkpoint(path):
    """A checkpoint of `train`, loaded with weights_only=True: a file from elsewhere cannot run code."""
    check_file(path, "checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # weights_only refuses what would build anything but tensors and plain containers
        raise UsageError(f"checkpoint '{path}' is corrupt, unsafe or not of l2w.py ({type(e).__name__})") from None
    missing = [k for k in ("config", "model", "wpn", "optimizer", "wpn_optimizer", "epoch", "batch", "rng",
                           "holdout_indices") if not isinstance(state, dict) or k not in state]
    need(not missing, f"checkpoint '{path}' is not an l2w.py checkpoint (it lacks {', '.join(missing)})")
    return state


def setup_device(cfg):
    """The device, and under torchrun the process group (NCCL on GPUs, each rank on cuda:LOCAL_RANK; gloo on CPU)."""
    device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # read when cuBLAS starts
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
    if cfg.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if cfg.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def rank_zero_first(fn):
    """fn() under torchrun on rank 0 first, then on the others (a CIFAR download happens once)."""
    if dist.is_initialized() and not is_main():
        dist.barrier()
    result = fn()
    if dist.is_initialized() and is_main():
        dist.barrier()
    return result


def log(*args):
    if is_main():
        print(*args, flush=True)


def unwrap(model):
    return model.module if isinstance(model, DDP) else model


def amp_dtype(device):
    """bf16 where computed natively (CPUs, Ampere and newer GPUs; not `is_bf16_supported()`'s emulation), else fp16."""
    native = device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 8
    return torch.bfloat16 if native else torch.float16


def build(cfg, num_classes, device):
    """Backbone, WPN, their optimizers (the networks DDP-wrapped under torchrun), `train_step`'s options."""
    model = build_model(cfg.arch, num_classes, cfg.exits, cfg.image_size, cfg.step, base=cfg.base,
                        gradient_equilibrium=cfg.imta == "pretrain")
    if cfg.imta == "finetune":   # IMTA's second phase: the network above frozen, new heads on it
        model = IMTANet(model, num_classes)
    model = model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    wpn = WPN(cfg.exits, cfg.wpn_depth, cfg.wpn_width).to(device)
    optimizer = torch.optim.SGD(trainable_parameters(model).values(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    wpn_optimizer = torch.optim.Adam(wpn.parameters(), lr=cfg.wpn_lr, weight_decay=cfg.wpn_weight_decay)
    if dist.is_initialized():   # find_unused_parameters: DDP keeps its first gradient buckets (an exact resume
        # on 3+ ranks: they set the order of the ranks' sums) for a walk of the graph per forward (< 1 ms)
        ids = [device.index] if device.type == "cuda" else None
        model, wpn = (DDP(net, device_ids=ids, find_unused_parameters=True) for net in (model, wpn))
    return model, wpn, optimizer, wpn_optimizer, method_options(cfg, device)


def method_options(cfg, device):
    """`train_step`'s optional arguments: IMTA's loss, --amp, --tf32, fp16's loss scalers (the WPN's overflow apart)."""
    options = {"autocast": partial(torch.autocast, device.type, dtype=amp_dtype(device), enabled=cfg.amp)}
    if cfg.tf32:
        options["meta_precision"] = contextlib.nullcontext   # PyTorch's TF32 settings in steps 1-5 too
    if cfg.imta == "finetune":
        options["loss_fn"] = partial(imta_exit_losses, temperature=cfg.kd_temperature, gamma=cfg.kd_gamma,
                                     reduction=cfg.kd_reduction)
    if cfg.amp and amp_dtype(device) == torch.float16:
        options["scalers"] = {"real": torch.amp.GradScaler(device.type), "meta": torch.amp.GradScaler(device.type)}
    return options


def to_device(images, targets, device, cfg):
    layout = torch.channels_last if cfg.channels_last else torch.preserve_format
    return images.to(device, non_blocking=True, memory_format=layout), targets.to(device, non_blocking=True)


def load_weights(cfg, model, wpn):
    """--weights: a released MSDNet-PyTorch / L2W-DEN checkpoint into `model` (and its WPN into `wpn`)."""
    try:
        info = load_released(model, cfg.weights, wpn)
    except ValueError as e:   # another network or WPN than the flags build, or not a released file
        hints = {"does not fit this": "--exits, --step, --base, --image-size and the data choose the network, "
                                      "--wpn-depth and --wpn-width the WPN",
                 "no 'state_dict'": "l2w.py's own: --resume, IMTA phase 1's: --pretrained"}
        raise UsageError(str(e) + "".join(f" ({hint})" for key, hint in hints.items() if key in str(e))) from None
    except Exception as e:   # not a file torch.load(weights_only=True) can read
        raise UsageError(f"--weights '{cfg.weights}' is not a readable checkpoint ({type(e).__name__})") from None
    log(f"loaded {cfg.weights}{' and its WPN' if info['wpn'] else ''} (released, epoch {info.get('epoch', '?')})")


def starting_point(cfg, state, pretrained, splits, device, nets, scalers):
    """From --resume, --pretrained (IMTA 2), --weights or scratch: (epoch, iteration, history, tally, initial WPN)."""
    (net, wpn), optimizers = map(unwrap, nets[:2]), nets[2:]
    if not state:
        if pretrained:
            if pretrained["config"].get("imta") != "pretrain":
                log(f"warning: --pretrained '{cfg.pretrained}' was trained without gradient equilibrium (phase 1)")
            try:
                net.backbone.load_state_dict(pretrained["model"])
            except RuntimeError as e:
                raise UsageError(f"--pretrained '{cfg.pretrained}' does not fit this model ({str(e).splitlines()[0]})")
        if cfg.weights:
            load_weights(cfg, net, wpn)
            if splits.threshold_source == "holdout":
                log("warning: thresholds fitted on images a network trained on are optimistic (the authors' L2W-DEN "
                    "models trained on all); " + ("" if cfg.holdout_indices else "this hold-out is drawn from --seed; ")
                    + "--holdout-indices gives a network's own (MSDNet-PyTorch's index.pth, holdout_indices.json)")
        return 0, 0, [], None, copy.deepcopy(wpn)
    try:
        for module, key in ((net, "model"), (wpn, "wpn"), *zip(optimizers, ("optimizer", "wpn_optimizer"))):
            module.load_state_dict(state[key])
        for name, scaler in (scalers or {}).items():
            if (state.get("scalers") or {}).get(name):
                scaler.load_state_dict(state["scalers"][name])
    except (RuntimeError, ValueError, KeyError) as e:
        detail = re.search(r'(Missing|Unexpected) key\(s\) in state_dict: "[^"]+"|size mismatch for [\w.]+', str(e))
        raise UsageError(f"checkpoint '{cfg.resume}' does not fit the {cfg.arch} with {cfg.exits} exits that its "
                         f"config describes ({detail.group(0) if detail else str(e).splitlines()[0]})") from None
    torch.set_rng_state(state["rng"]["torch"])   # its CUDA part on a GPU only: a GPU's run may resume on the CPU
    if state["rng"]["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    log(f"resumed from {cfg.resume} at epoch {state['epoch']}"
        + (f", iteration {state['batch']}" if state["batch"] else ""))
    initial_wpn = None if state.get("wpn_init") is None else copy.deepcopy(wpn)   # None: written before runs kept it
    if initial_wpn is not None:
        initial_wpn.load_state_dict(state["wpn_init"])
    return state["epoch"], state["batch"], list(state.get("history", [])), state.get("tally"), initial_wpn


def start_up(cfg, splits, model, device, flops, params, n_batches, start_epoch):
    """What can be checked only with the data and the network, then the run in a few lines."""
    need(cfg.eval_only or cfg.epochs <= start_epoch or n_batches,
         f"--batch-size {cfg.batch_size} is larger than the {len(splits.train)} training images")
    need(not cfg.budget or cfg.budget >= flops[0],   # said before any image is predicted
         f"--budget {cfg.budget / 1e6:.2f}M is below the first exit's {flops[0] / 1e6:.2f}M Mul-Adds per image")
    heads = sum(p.numel() for p in trainable_parameters(unwrap(model)).values())
    imta = {"pretrain": "\nIMTA phase 1: gradient equilibrium in the backward pass",
            "finetune": f"\nIMTA phase 2: the network of {cfg.pretrained or cfg.resume} frozen, {heads:,} parameters "
                        "in the new heads and ISC"}.get(cfg.imta, "")
    amp = f", amp {str(amp_dtype(device)).removeprefix('torch.')}" if cfg.amp else ""
    log(f"{cfg.arch} with {cfg.exits} exits: {params[-1]:,} parameters, {flops[-1] / 1e6:.2f}M Mul-Adds through the "
        f"last exit; {cfg.method} on {cfg.world_size} x {device.type}{amp}; batch {cfg.batch_size}, lr {cfg.lr:g}{imta}"
        f"\n{len(splits.train)} training images, {len(splits.test)} test images; per class: {splits.class_counts}")
    if splits.ignored:
        log(f"ignored {len(splits.ignored)} files that are not class folders: {', '.join(splits.ignored[:5])}"
            + (f" and {len(splits.ignored) - 5} more" if len(splits.ignored) > 5 else ""))
    if splits.threshold_source == "train":
        log("no hold-out split (--holdout 0): thresholds are fitted on the training images, no per-epoch validation")
    if is_main():
        os.makedirs(cfg.out, exist_ok=True)
        write_json(os.path.join(cfg.out, "holdout_indices.json"), splits.holdout_indices.tolist())


class StopSignal:
    """SIGTERM and SIGUSR1 (SLURM's warning): a checkpoint after the iteration, then stop. Under torchrun the ranks
    agree without waiting for a GPU: each iteration starts an all_reduce of the flags on gloo, reads the last one's."""

    def __init__(self):
        self.received, self.pending = 0, None
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        handle = lambda signum, frame: setattr(self, "received", signum)
        self.previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGUSR1)}

    def __call__(self):   # the signal to stop for (0: go on), the same on every rank
        if self.group is None:
            return self.received
        if self.pending:   # started an iteration ago: on a loaded CPU, hardly ever still running
            self.pending[0].wait()
        agreed = int(self.pending[1]) if self.pending else 0
        flag = torch.tensor([self.received])
        self.pending = dist.all_reduce(flag, dist.ReduceOp.MAX, group=self.group, async_op=True), flag
        return agreed

    def close(self):
        if self.pending:
            self.pending[0].wait()
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def save_checkpoint(cfg, nets, scalers, splits, device, history, initial_wpn, epoch, batch, tally=None):
    """All a run needs to continue bit-identically from `batch` iterations into `epoch` (and the epoch's `tally`)."""
    if is_main():
        (net, wpn), (optimizer, wpn_optimizer) = map(unwrap, nets[:2]), nets[2:]
        checkpoint = {"model": net.state_dict(), "wpn": wpn.state_dict(), "optimizer": optimizer.state_dict(),
                      "wpn_optimizer": wpn_optimizer.state_dict(),
                      "scalers": {k: s.state_dict() for k, s in scalers.items()} if scalers else None,
                      "epoch": epoch, "batch": batch, "config": dataclasses.asdict(cfg),
                      "rng": {"torch": torch.get_rng_state(),
                              "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
                      "holdout_indices": splits.holdout_indices, "history": history, "tally": tally,
                      "wpn_init": None if initial_wpn is None else initial_wpn.state_dict()}
        atomic_write(os.path.join(cfg.out, "checkpoint.pt"), lambda f: torch.save(checkpoint, f))


def train(cfg, state=None):
    """Train (with cfg.eval_only: only evaluate), write results.json and return it; `state`: --resume's checkpoint."""
    device = setup_device(cfg)
    torch.manual_seed(cfg.seed)
    state = state or (load_checkpoint(cfg.resume) if cfg.resume else None)
    # IMTA's second phase starts from the phase-1 network and its hold-out split (a phase-2 checkpoint holds both)
    pretrained = load_checkpoint(cfg.pretrained) if cfg.imta == "finetune" and not state else None
    splits = rank_zero_first(lambda: data.load(cfg, (state or pretrained or {}).get("holdout_indices"), device=device))
    *nets, options = build(cfg, splits.num_classes, device)
    (model, wpn, optimizer, wpn_optimizer), scalers = nets, options.get("scalers")
    start_epoch, start_batch, history, tally, initial_wpn = starting_point(cfg, state, pretrained, splits, device,
                                                                           nets, scalers)
    train_loader = data.make_loader(splits.train, cfg, device, shuffle=True)
    val_loader = data.make_loader(splits.threshold_set, cfg, device, shuffle=False)
    n_batches = len(train_loader.batch_sampler)
    total_iters, (flops, params) = cfg.epochs * n_batches, count_cost(unwrap(model), cfg.image_size)
    start_up(cfg, splits, model, device, flops, params, n_batches, start_epoch)
    save = partial(save_checkpoint, cfg, nets, scalers, splits, device, history, initial_wpn)
    stop, skipped, val = StopSignal(), 0, None
    try:
        for epoch in range(start_epoch, start_epoch if cfg.eval_only else cfg.epochs):
            skip = start_batch if epoch == start_epoch else 0
            train_loader.batch_sampler.set_epoch(epoch, skip)
            # The epoch's loss and meta loss, summed on the device and read at progress lines only (a read makes
            # the host wait for the GPU), their counts and the epoch's seconds: a mid-epoch checkpoint carries them.
            tally = tally if skip and tally else {"sums": torch.zeros(2), "counts": [0, 0], "seconds": 0.0}
            sums, counts, started = tally["sums"].to(device), tally["counts"], time.time() - tally["seconds"]
            torch.backends.cudnn.benchmark = not cfg.deterministic   # training's shapes repeat: kernels timed once
            for i, (images, targets) in enumerate(train_loader, start=skip):
                iteration = epoch * n_batches + i
                optimizer.param_groups[0]["lr"] = cosine(cfg.lr, iteration, total_iters)
                wpn_optimizer.param_groups[0]["lr"] = cosine(cfg.wpn_lr, iteration, total_iters)
                images, targets = to_device(images, targets, device, cfg)
                out = train_step(*nets, images, targets, cfg, meta=iteration % cfg.meta_interval == 0, **options)
                for k, value in enumerate((out["loss"], out["meta_loss"])):
                    if value is not None:
                        sums[k] += value
                        counts[k] += 1
                skipped += out["wpn_skipped"]
                if (i + 1) % cfg.print_every == 0 or i + 1 == n_batches:
                    loss, meta = (s / c if c else None for s, c in zip(sums.tolist(), counts))   # the epoch's means
                    per_iteration = (time.time() - started) / (i + 1)   # over the epoch
                    log(f"epoch {epoch + 1}/{cfg.epochs} iter {i + 1}/{n_batches} loss {loss:.4f} meta "
                        f"{'-' if meta is None else f'{meta:.4f}'} lr {optimizer.param_groups[0]['lr']:.4f} "
                        f"{cfg.batch_size / per_iteration:.0f} img/s "
                        f"ETA {datetime.timedelta(seconds=int(per_iteration * (total_iters - iteration - 1)))}"
                        + (f" | WPN steps skipped on fp16 overflow: {skipped}" if skipped else ""))
                signum = stop()
                if signum or (cfg.save_every and (iteration + 1) % cfg.save_every == 0 and i + 1 < n_batches):
                    saving = time.time()   # training time only: not the checkpoint's
                    save(epoch, i + 1, {"sums": sums.cpu(), "counts": counts, "seconds": saving - started})
                    started += time.time() - saving
                if signum:
                    log(f"stopped by signal {signum} at epoch {epoch + 1}, iteration {i + 1}; continue with "
                        f"--resume {os.path.join(cfg.out, 'checkpoint.pt')}")
                    if dist.is_initialized():   # every rank leaves once the checkpoint is written
                        dist.barrier()
                    raise SystemExit(128 + signum)   # the usual exit code of a signalled job
            history.append(epoch_record(cfg, epoch, sums, counts, time.time() - started, optimizer, wpn_optimizer))
            torch.backends.cudnn.benchmark = False   # evaluation picks the same kernels every time
            if splits.threshold_source == "holdout":   # the last epoch's also fits the thresholds
                started = time.time()
                val = validate(cfg, model, wpn, val_loader, device, history[-1], initial_wpn)
                history[-1]["seconds"] += time.time() - started
            save(epoch + 1, 0)
    finally:
        stop.close()
        torch.backends.cudnn.benchmark = False
    if cfg.eval_only or cfg.epochs <= start_epoch or splits.threshold_source != "holdout":
        val = predict(model, val_loader, device, cfg)
    return evaluate(cfg, model, splits, device, val, flops, params, history)


def epoch_record(cfg, epoch, sums, counts, seconds, optimizer, wpn_optimizer):
    """results.json["history"]'s record of an epoch (`validate` adds the hold-out's accuracy and the WPN's weights)."""
    loss, meta_loss = (s / c if c else None for s, c in zip(sums.tolist(), counts))   # as the progress lines
    return {"epoch": epoch + 1, "loss": loss, "meta_loss": meta_loss, "lr": optimizer.param_groups[0]["lr"],
            "wpn_lr": wpn_optimizer.param_groups[0]["lr"], "holdout_top1": None, "seconds": seconds,
            "images_per_s": counts[0] * cfg.batch_size / seconds if seconds else None, "weights": None}


def validate(cfg, model, wpn, loader, device, record, initial_wpn):
    """The hold-out's top-1 per exit and the WPN's `weight_profile` into `record`; its (logits, targets) on rank 0."""
    distilled = cfg.method == "l2w" and cfg.imta == "finetune"   # IMTA's phase 2: the WPN weighs distillation losses
    val = predict(model, loader, device, cfg, with_teacher=distilled)
    if not is_main():
        return None
    if distilled:
        (*logits, teacher), targets = val
        val = logits, targets
        losses = distillation_losses(logits, teacher, targets, cfg.kd_temperature, cfg.kd_gamma, cfg.kd_reduction)
    record["holdout_top1"] = [topk_accuracy(z, val[1], 1) for z in val[0]]
    if cfg.method == "l2w":
        record["weights"] = weight_profile(losses if distilled else exit_cross_entropy(*val), wpn, cfg, initial_wpn)
    weights = record["weights"]
    log(f"epoch {record['epoch']}/{cfg.epochs} hold-out top-1 per exit: "
        + " ".join(f"{a:.2f}" for a in record["holdout_top1"])
        + ("" if weights is None else " | WPN weight vs loss, Spearman per exit: "
           + " ".join("-" if r is None else f"{r:+.2f}" for r in weights["spearman"])
           + ("" if weights["moved"] is None else
              f"; weights moved {statistics.fmean(weights['moved']):.2f} from the start")))
    return val


# ============================================================================
# The command line: checks, parsing, run folders
# ============================================================================

def mul_adds(text):
    """--budget's value: Mul-Adds per image as 20e6, 20M or 1.5G."""
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(text[-1:].upper(), 1)
    try:
        return float(text[:-1] if scale != 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected Mul-Adds per image such as 20e6, 20M or 1.5G: '{text}'") from None


def finite(low, strict=False):   # a float's range: nan and inf are out of every one
    return lambda v: math.isfinite(v) and (v > low if strict else v >= low)


# The range of every number, each rule stated once: (fields, whether a value is in it, what it must be[, why]).
RANGES = [
    (("exits", "step", "base", "batch_size", "wpn_width", "meta_interval", "print_every", "bench_iters",
      "image_size"), lambda v: v >= 1, "must be >= 1"),
    (("epochs", "wpn_depth", "holdout", "workers", "seed", "save_every"), lambda v: v >= 0, "must be >= 0"),
    (("synthetic_size",), lambda v: v >= 3, "must be >= 3"),
    (("seed",), lambda v: v < 2 ** 32, "must be below 2^32"),
    (("lr", "q", "kd_temperature"), finite(0, strict=True), "must be a finite number > 0"),
    (("wpn_lr", "weight_decay", "wpn_weight_decay", "delta", "budget"), finite(0), "must be a finite number >= 0"),
    (("imbalance",), finite(1), "must be a finite number >= 1"),
    (("momentum",), lambda v: 0 <= v < 1, "must be in [0, 1)"),
    (("kd_gamma",), lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    *[((name,), lambda v, most=most: v <= most, f"must be at most {most}",
       " (the papers' networks: 5 to 8 exits, a WPN of 1 hidden layer of 500 units)") for name, most in LIMITS.items()],
]
CLI_CHOICES = {"dataset": tuple(data.DATASETS), "arch": ("msdnet", "ranet"), "kd_reduction": ("mean", "batchmean"),
               "imta": ("", "pretrain", "finetune")}


def need(ok, message):
    if not ok:
        raise UsageError(message)


def check_config(cfg):
    """Every field's range and every combination that cannot run, before any data is loaded or written."""
    for name, allowed in CLI_CHOICES.items():
        choose = ", ".join(filter(None, allowed))
        need(getattr(cfg, name) in allowed, f"unknown {name} '{getattr(cfg, name)}' (choose {choose})")
    for names, ok, rule, *why in RANGES:
        for name in names:
            need(ok(getattr(cfg, name)), f"--{name.replace('_', '-')} {rule}, got {getattr(cfg, name)}{''.join(why)}")
    try:   # q^k must neither overflow nor vanish (each fraction is in [0, 1] or nan, and nan > 0 is false)
        fits = bool(exit_fractions(cfg.q, cfg.exits).min() > 0)
    except OverflowError:
        fits = False
    need(fits, f"--q {cfg.q} gives exit fractions q^k / sum_j q^j that are 0 or not finite for {cfg.exits} exits")
    ranks, finetune = f"{cfg.world_size} ranks", cfg.imta == "finetune"
    for ok, message in [
        (cfg.batch_size % (2 * cfg.world_size) == 0,
         f"--batch-size {cfg.batch_size} must divide into two equal halves on each of {ranks}"),
        (not finetune or cfg.eval_only or cfg.batch_size >= 4 * cfg.world_size,
         f"--imta finetune needs --batch-size >= 4 x {ranks} (ISC's BatchNorm1d: 2 samples a half-batch)"),
        (not cfg.imta or cfg.arch == "msdnet", f"--imta is built for msdnet (as IMTA released it), not {cfg.arch}"),
        (not finetune or cfg.pretrained or cfg.resume, "--imta finetune needs --pretrained PATH (of --imta pretrain)"),
        (not cfg.pretrained or finetune, "--pretrained is for --imta finetune"),
        (not (cfg.pretrained and cfg.weights), "--pretrained and --weights both give the network: give one of them"),
        (cfg.dataset in ("imagenet", "folder") or cfg.image_size == 32,
         f"{cfg.dataset} images are 32x32; --image-size {cfg.image_size} is for imagenet or folder"),
        (not cfg.eval_only or cfg.resume or cfg.weights, "--eval-only needs --resume PATH or --weights PATH"),
        (not cfg.budget or cfg.eval_only, "--budget is for a trained network: --eval-only --resume CKPT --budget"),
        (not cfg.budget or cfg.holdout > 0, "--budget fits the thresholds on the hold-out, and --holdout 0 has none"),
        (not cfg.holdout_indices or cfg.holdout > 0,
         "--holdout-indices gives the hold-out split, and --holdout 0 asks for none"),
        (not (cfg.early_exit and cfg.world_size > 1), "--early-exit times inference in one process, not torchrun"),
        (not (cfg.bench and cfg.eval_only), "--bench and --eval-only cannot be combined"),
        (re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device), f"unknown device '{cfg.device}' (auto, cpu, cuda, cuda:N)"),
        (not os.path.isfile(cfg.out), f"--out '{cfg.out}' is a file, not a folder"),
    ]:
        need(ok, message)
    for path, flag in ((cfg.weights, "--weights"), (cfg.holdout_indices, "--holdout-indices")):
        if path and not (cfg.resume or cfg.pretrained):   # read once, when the run starts
            check_file(path, flag)
    need(not missing_device(cfg.device), f"--device {cfg.device} asked for, but {missing_device(cfg.device)}")
    checkpoint = os.path.join(cfg.out, "checkpoint.pt")
    if os.path.isfile(checkpoint) and not cfg.bench:   # a run's folder: only its own --resume writes into it
        need(not cfg.eval_only, f"--eval-only writes results.json; '{cfg.out}' holds a training run: use another --out")
        need(cfg.resume and os.path.samefile(checkpoint, cfg.resume), f"'{cfg.out}' already holds a run's checkpoint; "
             f"continue it with --resume {checkpoint}, or give another --out")
    if not cfg.bench:   # `folder` exists or can be made, and files can be written in it; makes and leaves nothing
        existing = os.path.abspath(cfg.out)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        try:
            os.rmdir(tempfile.mkdtemp(dir=existing))
        except OSError as e:
            raise UsageError(f"--out '{cfg.out}' cannot be written: {e.strerror} in '{existing}'") from None
    try:
        check_input_size(cfg.arch, cfg.exits, cfg.image_size, cfg.step, cfg.base, cfg.imta == "pretrain")
    except ValueError as e:
        raise UsageError(str(e)) from None


def missing_device(device):
    """Why this machine cannot run on `device` (cuda, cuda:1, ...), or '' when it can."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "CUDA is not available here"
    if device.startswith("cuda") and int(device.partition(":")[2] or 0) >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} CUDA devices"
    return ""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


# Fields that do not change what a run trains (they name no run folder and may differ within a q
# sweep); those that only L2W-DEN's meta-learning reads, only IMTA's distillation, and files.
NOT_TRAINING = ("data_dir", "workers", "device", "channels_last", "deterministic", "out", "print_every", "save_every",
                "resume", "eval_only", "early_exit", "budget", "bench", "bench_iters", "world_size")
META_FIELDS = ("wpn_lr", "wpn_weight_decay", "wpn_depth", "wpn_width", "q", "delta", "constraint", "meta_interval",
               "meta_grad", "tf32")
KD_FIELDS = ("kd_temperature", "kd_gamma", "kd_reduction")
FILE_FIELDS = ("pretrained", "weights", "holdout_indices")
# --imta finetune takes from --pretrained the network it freezes, its data and its hold-out (no phase trains on it).
PRETRAINED_FIELDS = ("dataset", "imbalance", "synthetic_size", "holdout", "holdout_indices", "arch", "exits", "step",
                     "base", "image_size")
# --resume keeps these from the checkpoint: they fix the data (the seed draws the synthetic and the
# long-tailed sets), the hold-out split, the networks it holds and the batches its position counts.
RESUME_FIELDS = PRETRAINED_FIELDS + ("seed", "imta", "wpn_depth", "wpn_width", "batch_size")
FIELD_HELP = dict(re.findall(r"^    (\w+):.*?#\s*(.*)$", inspect.getsource(Config), re.M))   # each field's comment


def default_out(cfg):
    """runs/<data>_<network>_<method>_seed<seed>, then _<field><value> for every other field that changes training and
    differs from the preset (_wpn-width10, _from-<run or file>), so runs that train differently never share a folder."""
    # a number as the name shows it: short, and never the same text for two values
    number = lambda v: f"{v:g}" if isinstance(v, int) or float(f"{v:g}") == v else repr(v)
    data_name = cfg.dataset + (f"{cfg.imbalance:g}" if cfg.dataset.endswith("-lt") else "")
    if cfg.dataset == "folder":   # the data are the folder
        data_name += "-" + os.path.basename(os.path.abspath(cfg.data_dir))
    imagenet_msdnet = cfg.arch == "msdnet" and cfg.image_size >= 64
    network = (f"{cfg.arch}{cfg.exits}" + (f"_s{cfg.step}" if imagenet_msdnet else "")
               + (f"_b{cfg.base}" if imagenet_msdnet and cfg.base != 4 else ""))
    method = (cfg.method + (f"_q{number(cfg.q)}" if cfg.method == "l2w" else "")
              + (f"_imta-{cfg.imta}" if cfg.imta else ""))
    name = f"{data_name}_{network}_{method}_seed{cfg.seed}"
    finetune = cfg.imta == "finetune"
    preset = Config(**{**PRESETS.get(cfg.dataset, {}), **(IMTA_PRESETS.get(cfg.dataset, {}) if finetune else {})})
    preset.lr = dataclasses.replace(cfg, lr=PRESETS.get(cfg.dataset, {}).get("lr", 0.0)).lr   # the rule at this batch
    skip = {*NOT_TRAINING, "dataset", "imbalance", "arch", "exits", "step", "base", "method", "q", "imta", "seed",
            *(META_FIELDS if cfg.method == "baseline" else ()), *(() if finetune else KD_FIELDS),
            *(() if cfg.dataset == "synthetic" else ("synthetic_size",))}
    for f in dataclasses.fields(Config):
        value, flag = getattr(cfg, f.name), f.name.replace("_", "-")
        if f.name in skip or value == getattr(preset, f.name):
            continue
        if f.name in FILE_FIELDS:   # a run's file by its folder, another by its name
            folder, file = os.path.split(os.path.abspath(value))
            name += ("_split-" if f.name == "holdout_indices" else "_from-") + (
                os.path.basename(folder) if file in ("checkpoint.pt", "holdout_indices.json") else file.split(".")[0])
        else:
            name += f"_{flag}" + ("" if value is True else f"-{value}" if isinstance(value, str) else number(value))
    return os.path.join("runs", name)


def parse_config(argv=None):
    """The CLI, generated from the Config fields and their comments. Returns (config, checkpoint or None):
    --resume continues beside the checkpoint with its config, flags winning but RESUME_FIELDS'; --eval-only
    writes into <checkpoint's folder>/eval (or runs/eval_<file>), then eval-2, ..., never over results."""
    parser = OneLineParser(description=__doc__.split("\n\n")[0] + " --dataset's preset (the paper's settings, l2w.py's "
                           "PRESETS) replaces some of the defaults shown.", argument_default=argparse.SUPPRESS,
                           epilog="python l2w.py --plot PATH [PATH ...] [--out curves.png] draws finished runs; "
                                  "--select-q PATH [PATH ...] [--out select_q.json] picks q on their hold-out curves; "
                                  "--summary PATH [PATH ...] [--out summary.json] compares methods over seeds")
    for f in dataclasses.fields(Config):
        if f.metadata.get("cli", True):   # lr shows no default: its comment says the rule
            help = FIELD_HELP.get(f.name, "") + ("" if f.name == "lr" else f" (default: {f.default})")
            kind = ({"action": "store_true"} if f.type is bool else
                    {"type": mul_adds if f.name == "budget" else f.type, "metavar": f.name.upper()})
            parser.add_argument("--" + f.name.replace("_", "-"), help=help, **kind)
    flags = vars(parser.parse_args(argv))
    need(flags.get("lr") != 0, "--lr must be a finite number > 0 (leave it out for the paper's rule at the batch size)")
    need(not (flags.get("resume") and flags.get("weights")), "--weights and --resume: give one of them")
    state = load_checkpoint(flags["resume"]) if flags.get("resume") else None
    known = {f.name for f in dataclasses.fields(Config)}
    saved = {k: v for k, v in state["config"].items() if k in known and k != "eval_only"} if state else {}
    if state:
        kept_fields(flags, saved, RESUME_FIELDS, "the checkpoint's",
                    "a resumed run keeps the data, hold-out split, network and batch size it started with")
        if missing_device(saved.get("device", "auto")):   # trained on a device this machine lacks
            saved["device"] = "auto"
    imta = flags.get("imta", saved.get("imta", Config.imta))
    if imta == "finetune" and not state and flags.get("pretrained"):
        saved = pretrained_fields(flags)
    dataset = flags.get("dataset", saved.get("dataset", Config.dataset))
    try:
        cfg = Config(**{**PRESETS.get(dataset, {}), **(IMTA_PRESETS.get(dataset, {}) if imta == "finetune" else {}),
                        **saved, **flags})
    except ValueError as e:   # the method's knobs (check_knobs)
        raise UsageError(str(e)) from None
    world = os.environ.get("WORLD_SIZE", "1")   # torchrun sets it and the variables its rendezvous reads
    unset = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ and world != "1"]
    need(world.isdigit() and int(world) >= 1 and not unset, f"WORLD_SIZE={world!r} in the environment without "
         f"{', '.join(unset) or 'a number >= 1'}: start the processes with torchrun, or unset it")
    cfg.world_size = int(world)
    if "workers" not in flags:   # a default or preset asks for no more loader processes than CPUs (torch warns)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()   # not macOS
        cfg.workers = min(cfg.workers, cpus)
    if cfg.eval_only and "out" not in flags:   # beside the checkpoint, or named after the weights
        folder = (os.path.join(os.path.dirname(os.path.abspath(cfg.resume)), "eval") if cfg.resume else
                  os.path.join("runs", "eval_" + os.path.basename(cfg.weights).split(".")[0]))
        cfg.out = next(f for f in itertools.chain([folder], (f"{folder}-{i}" for i in itertools.count(2)))   # eval-2
                       if not any(os.path.exists(os.path.join(f, n)) for n in ("results.json", "checkpoint.pt")))
    elif state and "out" not in flags:   # where the checkpoint is now, wherever the run was moved or copied
        cfg.out = os.path.dirname(os.path.abspath(cfg.resume))
    elif not cfg.out:
        cfg.out = default_out(cfg)
    check_config(cfg)
    return cfg, state


def kept_fields(flags, config, fields, whose, why):
    """The `fields` of a checkpoint's config (else Config's default); a flag may not contradict them."""
    kept = {k: config.get(k, getattr(Config, k)) for k in fields}
    for k, v in kept.items():
        need(k not in flags or flags[k] == v,
             f"--{k.replace('_', '-')} {flags.get(k)} does not match {whose} {v!r} ({why})")
    return kept


def pretrained_fields(flags):
    """The PRETRAINED_FIELDS of the --pretrained checkpoint, which must be a finished phase-1 run."""
    path, state = flags["pretrained"], load_checkpoint(flags["pretrained"])
    config = state["config"]
    need(config.get("imta") != "finetune", f"--pretrained '{path}' is of --imta finetune; give the --imta pretrain one")
    need(not state["batch"] and state["epoch"] >= config.get("epochs", 0), f"--pretrained '{path}' is unfinished "
         f"({state['epoch']} of {config.get('epochs')} epochs done); finish it first with --resume {path}")
    return kept_fields(flags, config, PRETRAINED_FIELDS, "the pretrained network's",
                       "--imta finetune takes it from --pretrained")


# ============================================================================
# Curves: accuracy against Mul-Adds, the figure of the paper's experiments; q chosen on them
# ============================================================================

def read_results(path, command="--plot"):
    """results.json of a run directory, or the file itself."""
    try:
        with open(os.path.join(path, "results.json") if os.path.isdir(path) else path) as f:
            results = json.load(f)
        results["config"], results["anytime"], results["dynamic"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{command}: '{path}' is not a run directory or results.json ({type(e).__name__})") from None
    return results


def run_labels(configs, fields=("seed",)):
    """Each run's method, network and data, then those of `fields` that tell it apart (L2W-DEN's own: its runs only)."""
    differ = [k for k in fields if len({repr(c.get(k)) for c in configs}) > 1]
    return [f"{c['method']} {c['arch']}{c['exits']} {c['dataset']}" + "".join(
        f" {k}={c.get(k)}" for k in differ if not (c["method"] == "baseline" and k in META_FIELDS)) for c in configs]


def plot_curves(paths, out_png):
    """Finished runs' budgeted curves and exits, hold-out top-1 by epoch, WPN weights by loss decile; their labels."""
    try:   # a Figure of its own, not pyplot's: no GUI backend, nothing to close
        import matplotlib.figure
    except ImportError:
        raise UsageError("--plot draws with matplotlib, which is not installed: pip install matplotlib") from None
    runs = [read_results(p) for p in paths]
    labels = run_labels([r["config"] for r in runs])
    scale, unit = (1e9, "G") if max(r["anytime"][-1]["flops"] for r in runs) >= 1e9 else (1e6, "M")
    weighted = [(label, [h for h in r.get("history") or [] if h.get("weights")]) for label, r in zip(labels, runs)]
    weighted = [(label, h) for label, h in weighted if h]
    panels = 2 + len(weighted)
    columns, rows = min(3, panels), -(-panels // 3)
    figure = matplotlib.figure.Figure(figsize=(5.2 * columns, 4.4 * rows))
    axes, holdout_axes = figure.add_subplot(rows, columns, 1), figure.add_subplot(rows, columns, 2)
    for label, results in zip(labels, runs):
        color = axes.plot([d["flops"] / scale for d in results["dynamic"]], [d["acc"] for d in results["dynamic"]],
                          label=f"{label}: budgeted")[0].get_color()   # the run's color in the first two panels
        axes.plot([a["flops"] / scale for a in results["anytime"]], [a["acc1"] for a in results["anytime"]], "o",
                  color=color, label=f"{label}: each exit")
        if "early_exit" in results:
            e, run = results["early_exit"], results["early_exit"]["runs"][0]
            at = "the last exit" if e["q"] is None else f"q {e['q']:g}"
            axes.plot(e["flops"] / scale, e["accuracy"], "*", markersize=14, color=color, label=f"{label}: early exit "
                      f"at {at}, {run['ms_per_image']:.1f} ms/image at batch {run['batch_size']} (whole network "
                      f"{run['whole_ms_per_image']:.1f})")
        if "budget" in results:
            b = results["budget"]
            axes.axvline(b["budget"] / scale, color=color, linestyle=":", linewidth=1)
            axes.plot(b["test_flops"] / scale, b["test_acc"], "D", color=color,
                      label=f"{label}: --budget {b['budget'] / scale:g}{unit} (dotted), test set")
        history = [h for h in results.get("history") or [] if h.get("holdout_top1")]
        exits = len(history[0]["holdout_top1"]) if history else 0
        for k in range(exits):   # the deeper the exit, the darker its line
            holdout_axes.plot([h["epoch"] for h in history], [h["holdout_top1"][k] for h in history], "o-", color=color,
                              alpha=0.3 + 0.7 * (k + 1) / exits, markersize=3, label=f"{label}: exit {k + 1}")
    axes.set(xlabel=f"Mul-Adds per image ({unit})", ylabel="top-1 accuracy (%)", title="test set")
    holdout_axes.set(xlabel="epoch", ylabel="hold-out top-1 accuracy (%)", title="hold-out, each exit, by epoch")
    holdout_axes.xaxis.get_major_locator().set_params(integer=True)
    for panel, (label, history) in enumerate(weighted, start=3):
        weight_axes = figure.add_subplot(rows, columns, panel)
        weight_axes.axhline(1, color="gray", linewidth=0.8)   # every weight of the baseline
        exits = len(history[0]["weights"]["deciles"])
        for k in range(exits):
            color = matplotlib.colormaps["viridis"](k / max(exits - 1, 1) * 0.9)
            for h, style in ((history[0], "--"), (history[-1], "-")) if len(history) > 1 else ((history[0], "-"),):
                spearman = h["weights"]["spearman"][k]
                weight_axes.plot(range(1, 11), h["weights"]["deciles"][k], style, color=color, marker=".",
                                 label=f"exit {k + 1}, epoch {h['epoch']}"
                                       + ("" if spearman is None else f" (Spearman {spearman:+.2f})"))
        weight_axes.set(xlabel="tenth of the hold-out by the exit's loss (1: easiest)", ylabel="mean weight",
                        title=f"{label}: WPN weights", xticks=range(1, 11))
    for a in figure.axes:
        a.grid(alpha=0.3)
        if a.lines:
            a.legend(fontsize=7)
    figure.tight_layout()
    try:   # in the format its name says, PNG if it says none, and always to exactly that path
        figure.savefig(out_png, format=os.path.splitext(out_png)[1][1:] or "png", dpi=100)
    except (OSError, ValueError) as e:   # no such folder; a format matplotlib does not write
        raise UsageError(f"--out '{out_png}' cannot be written ({getattr(e, 'strerror', None) or e})") from None
    return labels


def select_q(paths, out_json, points=5):
    """--select-q (supplementary Sec. 1.3): of a q sweep, the q whose hold-out curve has the best `best_within` mean."""
    runs = [read_results(p, "--select-q") for p in paths]
    first = runs[0]["config"]
    same = [f.name for f in dataclasses.fields(Config) if f.name not in (*NOT_TRAINING, "q")]
    for path, results in zip(paths, runs):
        need(results.get("holdout_dynamic"), f"--select-q: '{path}' has no hold-out curve (--holdout 0)")
        differ = next((k for k in same if results["config"].get(k) != first.get(k)), "")
        need(not differ, f"--select-q: '{path}' is not of the sweep of '{paths[0]}' (--{differ.replace('_', '-')} "
                         f"{results['config'].get(differ)}, not {first.get(differ)}): give runs that differ in --q")
    qs = [r["config"]["q"] for r in runs]
    need(first["method"] == "l2w" and len(set(qs)) == len(qs), "--select-q takes L2W-DEN runs, each with another --q")
    budgets, scores = best_within([r["holdout_dynamic"] for r in runs], "--select-q")
    shown = [i * 100 // (points - 1) for i in range(points)]
    rows = [{"q": q, "run": path, "mean_acc": statistics.fmean(best), "acc": [best[i] for i in shown]}
            for q, path, best in sorted(zip(qs, paths, scores))]
    chosen = max(rows, key=lambda row: row["mean_acc"])
    print("hold-out top-1 (%) at each budget (Mul-Adds per image): the best point of the run's hold-out curve "
          "within it\n    q " + "".join(f"{budgets[i] / 1e6:9.2f}M" for i in shown) + "   mean over the range")
    for row in rows:
        print(f"{row['q']:5g} " + "".join(f"{a:10.2f}" for a in row["acc"]) + f"   {row['mean_acc']:.2f}")
    print(f"chosen: q {chosen['q']:g} ({chosen['run']})")
    write_json(out_json, {"budgets": [budgets[i] for i in shown], "range": [budgets[0], budgets[-1]], "rows": rows,
                          "chosen_q": chosen["q"], "chosen_run": chosen["run"]})
    return chosen["q"]


def best_within(curves, command, points=101):
    """`points` budgets over the Mul-Adds all budgeted curves cover, and per curve its best accuracy within each."""
    low, high = max(min(p["flops"] for p in c) for c in curves), min(max(p["flops"] for p in c) for c in curves)
    need(low <= high, f"{command}: the runs' budgeted curves share no range of Mul-Adds; give runs of one network")
    budgets = [low + (high - low) * i / (points - 1) for i in range(points - 1)] + [high]   # (no rounding past it)
    return budgets, [[max(p["acc"] for p in c if p["flops"] <= b) for b in budgets] for c in curves]


def summarize(paths, out_json):
    """--summary: per group of runs that differ only in the seed, mean and spread of each exit's test top-1 and of
    the `best_within` mean; L2W-DEN minus its baseline (if given), seed by seed. Test figures: it chooses nothing."""
    runs = [read_results(p, "--summary") for p in paths]
    budgets, scores = best_within([r["dynamic"] for r in runs], "--summary")
    # What a run trained: all but where and how it ran and the files it started from (each seed's own IMTA phase 1).
    trained = [f.name for f in dataclasses.fields(Config) if f.name not in (*NOT_TRAINING, *FILE_FIELDS)]
    key = lambda c, skip=(): tuple(repr(c.get(k)) for k in trained if k not in ("seed", *skip))
    groups = {}
    for path, results, best in zip(paths, runs, scores):
        seed = results["config"]["seed"]
        group = groups.setdefault(key(results["config"]), {"config": results["config"], "runs": {}})
        if seed in group["runs"]:
            raise UsageError(f"--summary: '{path}' and '{group['runs'][seed]['path']}' are the same run (seed {seed})")
        group["runs"][seed] = {"path": path, "top1": [a["acc1"] for a in results["anytime"]],
                               "budgeted_mean": statistics.fmean(best)}

    def over_seeds(rows):   # mean and standard deviation over the seeds' rows, per exit and budgeted
        std = lambda values: statistics.stdev(values) if len(values) > 1 else None
        top1, budgeted = list(zip(*(r["top1"] for r in rows))), [r["budgeted_mean"] for r in rows]
        return {"top1_mean": [statistics.fmean(c) for c in top1], "top1_std": [std(c) for c in top1],
                "budgeted_mean": statistics.fmean(budgeted), "budgeted_std": std(budgeted)}

    apart = [k for k in trained if k not in ("method", "arch", "exits", "dataset", "seed")]
    report = {"range": [budgets[0], budgets[-1]], "groups": [], "paired": []}
    for group, label in zip(groups.values(), run_labels([g["config"] for g in groups.values()], apart)):
        group["label"] = label
        per_seed = [group["runs"][seed] for seed in sorted(group["runs"])]
        report["groups"].append({"label": label, "seeds": sorted(group["runs"]),
                                 "runs": [r["path"] for r in per_seed], **over_seeds(per_seed)})
    methods_apart = ("method", *META_FIELDS)
    for group in groups.values():
        base = next((g for g in groups.values() if g["config"]["method"] == "baseline"
                     and key(g["config"], methods_apart) == key(group["config"], methods_apart)), None)
        if group["config"]["method"] != "l2w" or base is None:
            continue
        differences = [{"seed": s, "top1": [a - b for a, b in zip(group["runs"][s]["top1"], base["runs"][s]["top1"])],
                        "budgeted_mean": group["runs"][s]["budgeted_mean"] - base["runs"][s]["budgeted_mean"]}
                       for s in sorted(set(group["runs"]) & set(base["runs"]))]   # the seeds both have
        if differences:
            report["paired"].append({"l2w": group["label"], "baseline": base["label"], "per_seed": differences,
                                     **over_seeds(differences)})
    width = max(len(g["label"]) for g in report["groups"]) + 2
    show = lambda mean, std=None, sign="": f"{mean:{sign}8.2f}" + ("       " if std is None else f" ± {std:4.2f}")
    exits = max(len(g["top1_mean"]) for g in report["groups"])
    header = (f"{'':{width}}seeds" + "".join(f"{f'exit {k + 1}':>15}" for k in range(exits))
              + f"   budgeted: mean over {budgets[0] / 1e6:.2f}-{budgets[-1] / 1e6:.2f}M Mul-Adds")
    print(f"test top-1 (%), mean ± standard deviation over the seeds\n{header}")
    for g in report["groups"]:
        print(f"{g['label']:{width}}{len(g['seeds']):5d}" + "".join(map(show, g["top1_mean"], g["top1_std"]))
              + "   " + show(g["budgeted_mean"], g["budgeted_std"]))
    for pair in report["paired"]:
        print(f"\n{pair['l2w']} minus {pair['baseline']}, paired by seed\n{header}")
        for d in pair["per_seed"]:
            print(f"{'seed ' + str(d['seed']):{width + 5}}" + "".join(show(x, sign="+") for x in d["top1"])
                  + "   " + show(d["budgeted_mean"], sign="+"))
        print(f"{'mean ± std':{width + 5}}" + "".join(map(show, pair["top1_mean"], pair["top1_std"], "+" * exits))
              + "   " + show(pair["budgeted_mean"], pair["budgeted_std"], "+"))
    write_json(out_json, report)
    return report


# ============================================================================
# Benchmark: cost of an L2W iteration (both meta-gradients) relative to plain training
# ============================================================================

def bench(cfg):
    device = setup_device(cfg)
    torch.backends.cudnn.benchmark = not cfg.deterministic   # as in training
    torch.manual_seed(cfg.seed)
    num_classes = data.DATASETS[cfg.dataset] or 1000   # (the iterations take random images)
    model, wpn, optimizer, wpn_optimizer, options = build(cfg, num_classes, device)
    images, targets = to_device(torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size),
                                torch.randint(num_classes, (cfg.batch_size,)), device, cfg)
    iteration = partial(train_step, model, wpn, optimizer, wpn_optimizer, images, targets, **options)   # given a cfg
    print(f"bench: {cfg.arch} {cfg.exits} exits, {cfg.image_size}x{cfg.image_size} images, batch {cfg.batch_size}, "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, {torch.get_num_threads()} "
          f"threads, amp {cfg.amp}, channels-last {cfg.channels_last}, median of {cfg.bench_iters}")
    # The three kinds of iteration alternate (a busy machine slows them alike) and take turns at going first.
    steps = [("plain", partial(iteration, dataclasses.replace(cfg, method="baseline"))),   # baseline: every weight 1
             ("higher", partial(iteration, dataclasses.replace(cfg, method="l2w", meta_grad="higher"))),
             ("jvp", partial(iteration, dataclasses.replace(cfg, method="l2w", meta_grad="jvp")))]
    times, memory = {name: [] for name, _ in steps}, {}
    for i in range(cfg.bench_iters + 2):   # two warm-up rounds
        for name, step in steps[i % 3:] + steps[:i % 3]:
            seconds, _, memory[name] = timed(step, None, device)
            times[name].append(seconds)
    results = {name: statistics.median(t[2:]) for name, t in times.items()}
    for name, seconds in results.items():
        peak = f"   peak memory {memory[name] / 2**20:.0f} MiB" if memory[name] is not None else ""
        print(f"{name:6s} {seconds * 1000:9.1f} ms/iter {cfg.batch_size / seconds:9.1f} img/s{peak}")
    print(f"ratio  higher/plain {results['higher'] / results['plain']:.2f}x  jvp/plain "
          f"{results['jvp'] / results['plain']:.2f}x  jvp/higher {results['jvp'] / results['higher']:.2f}x")
    if device.type == "cpu":
        print(f"peak memory of the process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")
    if cfg.dataset == "synthetic":
        return results
    # Does the data pipeline or the iteration bound a run? Loaded last: the iterations' peak memory holds no images.
    try:
        splits = data.load(cfg, device=device)
    except data.DataError as e:
        print(f"data   not timed: {e}")
        return results
    batches = iter(data.make_loader(splits.train, cfg, device, shuffle=True))
    next(batches, None)   # warm-up: loader workers start
    load = lambda: sum(len(to_device(*batch, device, cfg)[0]) for batch in itertools.islice(batches, cfg.bench_iters))
    seconds, images_loaded, _ = timed(load, None, device)
    how = "augmented on the device" if isinstance(splits.train, data.DeviceImages) else f"{cfg.workers} loader workers"
    print(f"data   {images_loaded / seconds:9.1f} img/s: the training data pipeline ({how})")
    return results


# ============================================================================
# main
# ============================================================================

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        commands = {"--plot": (plot_curves, "curves.png", "accuracy vs Mul-Adds, hold-out accuracy, WPN weights"),
                    "--select-q": (select_q, "select_q.json", "q chosen on the hold-out curves of a q sweep"),
                    "--summary": (summarize, "summary.json", "runs that differ only in seed: mean and spread "
                                                             "per group, and L2W-DEN minus baseline per seed")}
        command = next((c for c in commands if c in argv), None)
        if command:   # the commands that take several runs; not a training config
            run, out, description = commands[command]
            parser = OneLineParser(prog=f"l2w.py {command}", description=description)
            parser.add_argument(command, nargs="+", required=True, metavar="PATH",
                                help="run directories or results.json files")
            parser.add_argument("--out", default=out, help=f"the file to write (default: {out})")
            args = parser.parse_args(argv)
            path = os.path.join(args.out, out) if os.path.isdir(args.out) else args.out   # a folder: out in it
            run(getattr(args, command[2:].replace("-", "_")), path)
            print(f"wrote {path}")
            return
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
