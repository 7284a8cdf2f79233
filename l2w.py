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
  5. Adam step of the WPN on the meta loss (its gradient: second-order through step 3, or the
     same numbers from one backward at theta' and one forward-mode JVP, --meta-grad jvp);
  6. real SGD step of the backbone, weighted by the updated WPN.

    pip install -r requirements.txt
    python l2w.py --dataset cifar10 --arch msdnet --exits 7          # the paper's setting
    python l2w.py --dataset synthetic --exits 3                      # one-minute offline demo
    python l2w.py --dataset cifar100 --method baseline               # plain multi-exit training
    python l2w.py --eval-only --resume runs/.../checkpoint.pt        # evaluate a checkpoint
    python l2w.py --dataset cifar10 --meta-grad jvp                  # same method, first-order meta-gradient
    python l2w.py --eval-only --resume runs/.../checkpoint.pt --early-exit --q 0.5   # real early exiting, timed
    python l2w.py --dataset imagenet --data-dir DIR --step 4 --eval-only --weights msdnet_step4.pth.tar
    python l2w.py --plot runs/synthetic_msdnet3_l2w runs/.../results.json --out curves.png
    python l2w.py --bench --dataset cifar100 --exits 5 --batch-size 64
    python l2w.py --dataset cifar100 --imta pretrain --out runs/imta1          # IMTA, phase 1 (GE)
    python l2w.py --imta finetune --pretrained runs/imta1/checkpoint.pt       # phase 2 (ISC + OFA)
    torchrun --nproc_per_node 8 l2w.py --dataset imagenet --data-dir DIR --step 4

Tested with torch 2.14 on CPU (see README.md for what has been verified and what has not).
"""
import argparse
import contextlib
import dataclasses
import gc
import hashlib
import inspect
import itertools
import json
import math
import os
import pickle
import re
import resource
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import higher
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.func import functional_call
from torch.overrides import TorchFunctionMode
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import data
from models import IMTANet, build_model, count_cost, load_released


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
    base: int = 4                  # ImageNet MSDNet: layers in the first block (MSDNet-PyTorch's released s=7 model: 7)
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
    meta_grad: str = "higher"      # higher (second-order backward, as taught) | jvp (same gradient, first-order; README)
    holdout: int = 5000            # training images held out for validation and thresholds
    synthetic_size: int = 2000     # training images of --dataset synthetic (test set: a third)
    seed: int = 0
    workers: int = 4               # data-loading processes per rank
    device: str = "auto"           # auto (cuda if available) | cpu | cuda | cuda:1 ...
    amp: bool = False              # bf16 autocast (fp16 + loss scaling where bf16 is unavailable)
    channels_last: bool = False    # NHWC memory format, faster convolutions on recent GPUs
    sync_bn: bool = False          # under torchrun: BatchNorm statistics over all ranks
    out: str = ""                  # run directory; default runs/<dataset>_<arch><exits>_<method>_<q>_<seed>
    print_every: int = 20          # iterations between progress lines
    save_every: int = 0            # iterations between checkpoints (0: each epoch); also on SIGTERM/SIGUSR1
    resume: str = ""               # checkpoint to continue from (or to evaluate with --eval-only)
    weights: str = ""              # released MSDNet-PyTorch / L2W-DEN checkpoint to start from (or to evaluate)
    eval_only: bool = False        # evaluate --resume or --weights and write results.json, no training
    early_exit: bool = False       # also run the test set with real early exiting at --q, timed vs the whole network
    bench: bool = False            # time plain, L2W (higher) and L2W (jvp) iterations, then exit
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
    # sized so that the demo (3 exits, L2W-DEN) takes about a minute on a laptop CPU; batch 64 and
    # lr 0.3 give the 46 updates of 2 epochs enough reach for the deeper exits to learn the textures
    "synthetic": dict(epochs=2, batch_size=64, lr=0.3, q=0.75, delta=0.8, constraint="col",
                      meta_interval=1, holdout=500, workers=0, print_every=5, image_size=32),
}
# IMTA's distillation settings (its released code), for --imta finetune; other data sets keep
# the Config defaults, IMTA's CIFAR values (T = 3, gamma = 0.9).
IMTA_PRESETS = {"imagenet": dict(kd_temperature=1.0, kd_gamma=0.1)}
# --imta finetune takes these from the --pretrained checkpoint: the network it freezes and the
# data it was trained on (its hold-out split too, so no phase trains on the hold-out images).
PRETRAINED_FIELDS = ("dataset", "imbalance", "synthetic_size", "holdout", "arch", "exits", "step", "base",
                     "image_size")
# --resume keeps these from the checkpoint: they fix the data (the seed draws the synthetic and the
# long-tailed sets), the hold-out split and the networks the checkpoint holds.
RESUME_FIELDS = PRETRAINED_FIELDS + ("seed", "imta", "wpn_depth", "wpn_width")
# Far beyond the papers' networks (5 to 8 exits, a WPN of 1 hidden layer of 500 units), and below
# the sizes that hang or exhaust memory (a CIFAR MSDNet of 32 exits has 528 layers, 324M parameters).
LIMITS = {"exits": 32, "wpn_depth": 8, "wpn_width": 4096}


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def check_config(cfg):
    """Every field's range and every combination that cannot run, checked before any data is
    loaded or any directory made."""
    def need(ok, message):
        if not ok:
            raise UsageError(message)

    def finite(name, low, low_ok=True):   # a number >= low (> low), not nan or inf
        value = getattr(cfg, name)
        need(math.isfinite(value) and (value >= low if low_ok else value > low),
             f"--{name.replace('_', '-')} must be a finite number {'>=' if low_ok else '>'} {low}, got {value}")

    choices = {"dataset": tuple(data.DATASETS), "arch": ("msdnet", "ranet"), "method": ("l2w", "baseline"),
               "constraint": ("col", "row", "mat"),
               "meta_grad": ("higher", "jvp"), "kd_reduction": ("mean", "batchmean")}
    for name, allowed in choices.items():
        need(getattr(cfg, name) in allowed,
             f"unknown {name} '{getattr(cfg, name)}' (choose {', '.join(allowed)})")
    for name in ("exits", "step", "base", "batch_size", "wpn_width", "meta_interval", "print_every", "bench_iters"):
        need(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("epochs", "wpn_depth", "holdout", "workers", "seed", "save_every"):
        need(getattr(cfg, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    for name, most in LIMITS.items():
        need(getattr(cfg, name) <= most, f"--{name.replace('_', '-')} must be at most {most}, got "
             f"{getattr(cfg, name)} (the papers' networks: 5 to 8 exits, a WPN of 1 hidden layer of 500 units)")
    need(cfg.seed < 2 ** 32, f"--seed must be below 2^32, got {cfg.seed}")
    need(cfg.batch_size % (2 * cfg.world_size) == 0,
         f"--batch-size must be even (it is split into two halves) and divisible by 2 x {cfg.world_size} ranks, "
         f"got {cfg.batch_size}")
    need(cfg.imta != "finetune" or cfg.eval_only or cfg.batch_size >= 4 * cfg.world_size,
         f"--imta finetune needs --batch-size >= 4 x {cfg.world_size} ranks (ISC's BatchNorm1d needs 2 samples "
         f"in each half-batch), got {cfg.batch_size}")
    finite("lr", 0, low_ok=False)
    finite("wpn_lr", 0)
    finite("weight_decay", 0)
    finite("wpn_weight_decay", 0)
    finite("delta", 0)
    finite("imbalance", 1)
    need(0 <= cfg.momentum < 1, f"--momentum must be in [0, 1), got {cfg.momentum}")
    finite("kd_temperature", 0, low_ok=False)
    need(0 <= cfg.kd_gamma <= 1, f"--kd-gamma must be in [0, 1], got {cfg.kd_gamma}")
    need(cfg.imta in ("", "pretrain", "finetune"), f"unknown --imta '{cfg.imta}' (choose pretrain or finetune)")
    need(not cfg.imta or cfg.arch == "msdnet",
         f"--imta is built for msdnet (IMTA's techniques as released), not {cfg.arch}")
    need(cfg.imta != "finetune" or cfg.pretrained or cfg.resume,
         "--imta finetune needs --pretrained PATH (a checkpoint of --imta pretrain)")
    need(not cfg.pretrained or cfg.imta == "finetune", "--pretrained is for --imta finetune")
    need(not (cfg.pretrained and cfg.weights), "--pretrained and --weights both give the network: give one of them")
    finite("q", 0, low_ok=False)
    try:   # q^k must neither overflow nor vanish
        fractions = exit_fractions(cfg.q, cfg.exits)
        fits = bool(torch.isfinite(fractions).all()) and fractions.min() > 0
    except OverflowError:
        fits = False
    need(fits,
         f"--q {cfg.q} gives exit fractions q^k / sum_j q^j that are 0 or not finite for {cfg.exits} exits")
    need(cfg.synthetic_size >= 3, f"--synthetic-size must be >= 3, got {cfg.synthetic_size}")
    need(cfg.image_size >= 1, f"--image-size must be >= 1, got {cfg.image_size}")
    need(cfg.dataset in ("imagenet", "folder") or cfg.image_size == 32,
         f"{cfg.dataset} images are 32x32; --image-size {cfg.image_size} is for imagenet or folder")
    need(not cfg.eval_only or cfg.resume or cfg.weights,
         "--eval-only needs --resume PATH or --weights PATH (the checkpoint to evaluate)")
    need(not (cfg.early_exit and cfg.world_size > 1),
         "--early-exit times inference in one process; run it without torchrun")
    if cfg.weights and not cfg.resume:   # read once, when the run starts
        check_file(cfg.weights, "--weights")
    need(not (cfg.bench and cfg.eval_only), "--bench and --eval-only cannot be combined")
    need(re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device) is not None,
         f"unknown device '{cfg.device}' (choose auto, cpu, cuda or cuda:N)")
    need(not missing_device(cfg.device), f"--device {cfg.device} asked for, but {missing_device(cfg.device)}")
    uses_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    need(not (cfg.sync_bn and cfg.world_size > 1 and not uses_cuda),
         "--sync-bn needs GPUs (PyTorch's SyncBatchNorm works on CUDA only)")
    need(not os.path.isfile(cfg.out), f"--out '{cfg.out}' is a file; it must be a directory (new or a run's)")
    checkpoint = os.path.join(cfg.out, "checkpoint.pt")
    if (not (cfg.bench or cfg.eval_only) and os.path.isfile(checkpoint)
            and not (cfg.resume and os.path.samefile(checkpoint, cfg.resume))):
        raise UsageError(f"'{cfg.out}' already holds a run's checkpoint; continue it with --resume {checkpoint}, "
                         f"or give another --out")
    if not cfg.bench:
        check_writable(cfg.out)
    # Shapes only: the network is built and run on the meta device, computing nothing. Every
    # MSDNet exit reads the same coarsest scale, so one exit tells whether the image size fits,
    # and the check takes no longer with more exits.
    try:
        with torch.device("meta"):
            model = build_model(cfg.arch, 10, cfg.exits if cfg.arch == "ranet" else 1, cfg.image_size, cfg.step,
                                base=cfg.base, gradient_equilibrium=cfg.imta == "pretrain").eval()
            model(torch.zeros(1, 3, cfg.image_size, cfg.image_size))
    except ValueError as e:
        raise UsageError(str(e)) from None
    except RuntimeError:
        raise UsageError(f"{cfg.arch} cannot reduce {cfg.image_size}x{cfg.image_size} images to its exits; "
                         f"use --image-size 32 (CIFAR-style network) or 224 (ImageNet-style)") from None


def check_file(path, what):
    """One line for a path that is not a file: missing, or a folder (naming the checkpoint in it)."""
    if os.path.isdir(path):
        inside = os.path.join(path, "checkpoint.pt")
        raise UsageError(f"{what} '{path}' is a folder, not a file"
                         + (f"; the run's checkpoint in it is '{inside}'" if os.path.isfile(inside) else ""))
    if not os.path.isfile(path):
        raise UsageError(f"{what} '{path}' does not exist")


def check_writable(folder):
    """`folder` exists or can be made, and files can be written in it; makes and leaves nothing."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing))
    except OSError as e:
        raise UsageError(f"--out '{folder}' cannot be written: {e.strerror} in '{existing}'") from None


def missing_device(device):
    """Why this machine cannot run on `device` (cuda, cuda:1, ...), or '' when it can."""
    if not device.startswith("cuda"):
        return ""
    if not torch.cuda.is_available():
        return "CUDA is not available here"
    if int(device.partition(":")[2] or 0) >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} CUDA devices"
    return ""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def default_out(cfg):
    """runs/<what keeps the paper's runs apart>: data (and imbalance), network (and ImageNet step and base),
    method (and q, which only L2W-DEN's meta objective reads; and the IMTA phase), seed."""
    data_name = cfg.dataset + (f"{cfg.imbalance:g}" if cfg.dataset.endswith("-lt") else "")
    imagenet_msdnet = cfg.arch == "msdnet" and cfg.image_size >= 64
    network = (f"{cfg.arch}{cfg.exits}" + (f"_s{cfg.step}" if imagenet_msdnet else "")
               + (f"_b{cfg.base}" if imagenet_msdnet and cfg.base != 4 else ""))
    method = cfg.method + (f"_q{cfg.q:g}" if cfg.method == "l2w" else "") + (f"_imta-{cfg.imta}" if cfg.imta else "")
    return os.path.join("runs", f"{data_name}_{network}_{method}_seed{cfg.seed}")


def parse_config(argv=None):
    """CLI generated from the Config fields (--batch-size 1024, --eval-only, ...), each with its
    comment as help. Returns (config, checkpoint state or None): with --resume the run continues
    beside the checkpoint, with the config stored in it; flags given now win, except those that
    would change its data, split or network (RESUME_FIELDS). --eval-only writes into
    <checkpoint's folder>/eval (or runs/eval_<weights file>) unless --out is given, never over a
    training run or an earlier evaluation (eval-2, eval-3, ... then)."""
    comments = dict(re.findall(r"^    (\w+):.*?#\s*(.*)$", inspect.getsource(Config), re.M))
    parser = OneLineParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS,
                           epilog="python l2w.py --plot PATH [PATH ...] [--out curves.png] draws finished runs")
    for f in dataclasses.fields(Config):
        if not f.metadata.get("cli", True):
            continue
        flag, help = "--" + f.name.replace("_", "-"), f"{comments.get(f.name, '')} (default: {f.default})"
        if f.type is bool:
            parser.add_argument(flag, action="store_true", help=help)
        else:
            parser.add_argument(flag, type=f.type, metavar=f.name.upper(), help=help)
    flags = vars(parser.parse_args(argv))
    if flags.get("resume") and flags.get("weights"):
        raise UsageError("--weights starts a run from released weights, --resume continues one: give one of them")
    state = load_checkpoint(flags["resume"]) if flags.get("resume") else None
    known = {f.name for f in dataclasses.fields(Config)}
    saved = {k: v for k, v in state["config"].items() if k in known} if state else {}
    saved.pop("eval_only", None)
    if state:
        kept_fields(flags, saved, RESUME_FIELDS, "the checkpoint's",
                    "a resumed run keeps the data, hold-out split and network it started with")
        if missing_device(saved.get("device", "auto")):   # trained on a device this machine lacks
            saved["device"] = "auto"
    imta = flags.get("imta", saved.get("imta", Config.imta))
    if imta == "finetune" and not state and flags.get("pretrained"):
        saved = pretrained_fields(flags)
    dataset = flags.get("dataset", saved.get("dataset", Config.dataset))
    imta_preset = IMTA_PRESETS.get(dataset, {}) if imta == "finetune" else {}
    cfg = Config(**{**PRESETS.get(dataset, {}), **imta_preset, **saved, **flags})
    cfg.world_size = torchrun_world_size()
    if cfg.eval_only and "out" not in flags:   # beside the checkpoint, or named after the weights
        cfg.out = unused_folder(os.path.join(os.path.dirname(os.path.abspath(cfg.resume)), "eval") if cfg.resume else
                                os.path.join("runs", "eval_" + os.path.basename(cfg.weights).split(".")[0]))
    elif state and "out" not in flags:   # where the checkpoint is now, wherever the run was moved or copied
        cfg.out = os.path.dirname(os.path.abspath(cfg.resume))
    elif not cfg.out:
        cfg.out = default_out(cfg)
    check_config(cfg)
    if cfg.eval_only and os.path.isfile(os.path.join(cfg.out, "checkpoint.pt")):
        raise UsageError(f"--eval-only writes results.json; '{cfg.out}' holds a training run, choose another --out")
    return cfg, state


def kept_fields(flags, config, fields, whose, why):
    """The `fields` of a checkpoint's config (Config's default where an older one lacks one); a
    flag that contradicts one of them is an error."""
    kept = {k: config.get(k, getattr(Config, k)) for k in fields}
    for k, v in kept.items():
        if k in flags and flags[k] != v:
            raise UsageError(f"--{k.replace('_', '-')} {flags[k]} does not match {whose} "
                             f"{repr(v) if isinstance(v, str) else v} ({why})")
    return kept


def pretrained_fields(flags):
    """The PRETRAINED_FIELDS of the --pretrained checkpoint's config, which must be a finished
    phase-1 run; a flag that contradicts one of them is an error (the frozen network cannot change)."""
    path = flags["pretrained"]
    state = load_checkpoint(path)
    config = state["config"]
    if config.get("imta") == "finetune":
        raise UsageError(f"--pretrained '{path}' is an --imta finetune checkpoint; give the --imta pretrain one")
    if state["batch"] or state["epoch"] < config.get("epochs", 0):
        raise UsageError(f"--pretrained '{path}' is unfinished ({state['epoch']} of {config.get('epochs')} epochs "
                         f"done) and phase 2 would freeze it as it is; finish it first with --resume {path}")
    return kept_fields(flags, config, PRETRAINED_FIELDS, "the pretrained network's",
                       "--imta finetune takes it from --pretrained")


def torchrun_world_size():
    """WORLD_SIZE as torchrun sets it, with the variables its rendezvous reads (1 without torchrun)."""
    world = os.environ.get("WORLD_SIZE", "1")
    if not (world.isdigit() and int(world) >= 1):
        raise UsageError(f"WORLD_SIZE={world!r} in the environment; torchrun sets it to the number of processes")
    unset = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if int(world) > 1 and unset:
        raise UsageError(f"WORLD_SIZE={world} in the environment without {', '.join(unset)}: start the processes "
                         "with torchrun (which sets them all), or unset WORLD_SIZE")
    return int(world)


def unused_folder(folder):
    """`folder`, or the first of folder-2, folder-3, ... that holds no results and no checkpoint."""
    taken = lambda f: any(os.path.exists(os.path.join(f, name)) for name in ("results.json", "checkpoint.pt"))
    return next(f for f in itertools.chain([folder], (f"{folder}-{i}" for i in itertools.count(2))) if not taken(f))


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


def meta_exit_assignment(confidence, fractions):
    """Exit of every meta sample (step 4), as the released code assigns them: walking the exits in
    order, exit k takes exactly floor(n f_k) of the samples not yet assigned, the most confident
    at exit k first (ties: lower index first); the last exit takes the rest. Sorting and slicing,
    not thresholds, so saturated confidences (softmax exactly 1.0) cannot push more than
    floor(n f_k) samples into an exit. confidence: (K, n); returns (n,) exit indices."""
    exits, n = confidence.shape
    exit_of = torch.full((n,), exits - 1, dtype=torch.long, device=confidence.device)
    free = torch.arange(n, device=confidence.device)
    for k in range(exits - 1):
        take = math.floor(n * fractions[k].item())
        order = confidence[k][free].sort(descending=True, stable=True).indices
        exit_of[free[order[:take]]] = k
        free = free[order[take:]].sort().values
    return exit_of


def meta_loss_fn(logits, targets, q):
    """Meta objective (step 4): assign the meta samples to exits with fractions f_k ~ q^k, as
    budgeted inference would, then sum over exits the mean CE of the samples that leave there."""
    confidence = confidences([z.detach() for z in logits])
    exit_of = meta_exit_assignment(confidence, exit_fractions(q, len(logits)))
    total = 0.0
    for k, z in enumerate(logits):
        mine = exit_of == k
        if mine.any():
            total = total + F.cross_entropy(z[mine], targets[mine])
    return total


def functional_forward(net, params, images, **kwargs):
    """The network's training forward with `params` (name -> tensor) in place of some of its own
    parameters. A train-mode BatchNorm normalises with the batch statistics, as in any training
    forward (under --sync-bn, this rank's batch: the virtual step is per rank), and updates
    throw-away copies of its buffers, so the real running statistics stay untouched; the
    eval-mode frozen network of IMTA's second phase reads its running statistics."""
    with per_rank_batchnorm(net):
        return functional_call(net, {**throwaway_buffers(net), **params}, (images,), kwargs)


def meta_backward(meta_loss, inputs, scaler=None):
    """Backward of the meta loss into `inputs` (their .grad), multiplied by the WPN's fp16 loss
    scale where there is one (the meta forward runs under autocast); the WPN's optimizer step
    divides it out again (`optimizer_step`). Both meta-gradient paths scale here."""
    (meta_loss if scaler is None else scaler.scale(meta_loss)).backward(inputs=inputs)


def higher_meta_gradient(net, wpn, optimizer, params, losses, meta_images, meta_targets, cfg, scaler=None):
    """Steps 3-5 as the method is taught: a differentiable virtual step and the second-order
    backward of the meta loss through it. `params`: {name: parameter} the virtual step moves.
    Leaves the WPN's gradient in its .grad; returns the meta loss."""
    # Step 3, the virtual step: theta' = SGD step on the WPN-weighted loss, with the real
    # optimizer's lr, momentum buffers and weight decay, differentiable in the WPN. higher's
    # differentiable SGD works on a copy of the optimizer state, so the real optimizer is left
    # exactly as it was. Its forward is fp32 under --amp too: no loss scaling.
    virtual_sgd = higher.get_diff_optim(optimizer, list(params.values()))
    weights = sample_weights(wpn(losses.detach()), cfg.delta, cfg.constraint)
    theta_virtual = virtual_sgd.step(weighted_loss(losses, weights), params=list(params.values()))
    # Step 4: meta objective on the meta half with theta'; step 5's gradient reaches the WPN
    # through theta' (a second-order backward through the virtual step's gradient).
    with autocast(cfg, meta_images.device):
        meta_loss = meta_loss_fn(functional_forward(net, dict(zip(params, theta_virtual)), meta_images),
                                 meta_targets, cfg.q)
    meta_backward(meta_loss, list(wpn.parameters()), scaler)
    return meta_loss


def virtual_sgd_step(optimizer, params, grads):
    """theta' = theta - lr (mu buf + g + wd theta) for each of `params`, with lr, momentum,
    dampening, Nesterov and weight decay from its param group and the optimizer's momentum
    buffer (torch.optim.SGD's formula; without a buffer yet, buf = the step itself). theta' is
    affine in g: returns (theta', a) with d theta'_p / d g_p = -a_p."""
    group_of = {p: group for group in optimizer.param_groups for p in group["params"]}
    theta_virtual, slopes = [], []
    for p, g in zip(params, grads):
        group = group_of[p]
        mu, dampening = group["momentum"], group["dampening"]
        step, slope = g.add(p, alpha=group["weight_decay"]), 1.0
        buf = optimizer.state[p].get("momentum_buffer") if mu else None
        if mu:
            buf, slope = (step, 1.0) if buf is None else (buf.mul(mu).add_(step, alpha=1 - dampening), 1 - dampening)
            step, slope = (step.add(buf, alpha=mu), 1 + mu * slope) if group["nesterov"] else (buf, slope)
        theta_virtual.append(p.add(step, alpha=-group["lr"]))
        slopes.append(group["lr"] * slope)
    return theta_virtual, slopes


def jvp_meta_gradient(net, wpn, optimizer, params, images, targets, losses, meta_images, meta_targets, cfg,
                      scaler=None, shared=None):
    """Steps 3-5 with the exact meta-gradient and no second-order backward (README, "The
    meta-gradient without the second-order backward"). `params`: {name: parameter} the virtual
    step moves. Leaves the WPN's gradient in its .grad; returns the meta loss.

    The WPN sees the losses detached, so theta' = theta - a (g(w) + const), with
    g(w) = grad_theta sum_k mean_i w_ik L_ik, is affine in the weights w, and
        dM / dw_ik = -(1/n) < a * grad_theta' M, grad_theta L_ik >:
    one backward of M at theta' (v) and one forward-mode Jacobian-vector product of
    theta -> L in the direction a * v give all n x K of them. `shared`: the SharedForward that
    recorded the forward of `losses` (without it, forward-mode AD computes that forward again;
    the numbers are the same).
    """
    weights = sample_weights(wpn(losses.detach()), cfg.delta, cfg.constraint)
    # Step 3, the virtual step, as plain numbers: the graph of `losses` is kept for the real step.
    grads = torch.autograd.grad(weighted_loss(losses, weights.detach()), list(params.values()), retain_graph=True)
    with torch.no_grad():
        theta_virtual, slopes = virtual_sgd_step(optimizer, params.values(), grads)
    theta_virtual = [t.requires_grad_() for t in theta_virtual]
    # Step 4: meta objective on the meta half with theta', and v = grad_theta' M.
    with autocast(cfg, meta_images.device):
        meta_loss = meta_loss_fn(functional_forward(net, dict(zip(params, theta_virtual)), meta_images),
                                 meta_targets, cfg.q)
    meta_backward(meta_loss, theta_virtual, scaler)
    # u = J(theta) (a v), J the Jacobian of the train half's (n, K) losses: the batched training
    # forward itself (BatchNorm couples the samples), in fp32 like the losses it differentiates.
    # (A parameter the meta loss does not reach, e.g. the classifier of an exit that no meta
    # sample leaves at, has v = 0.)
    direction = {p: torch.zeros_like(p) if t.grad is None else a * t.grad
                 for p, a, t in zip(params.values(), slopes, theta_virtual)}
    if shared:
        u = shared.jvp(losses, direction)
        u = torch.zeros_like(losses) if u is None else u
    else:   # eager forward-mode AD (dual numbers): torch.func.jvp's product without its wrappers
        with forward_ad.dual_level(), torch.no_grad():
            duals = {name: forward_ad.make_dual(p.detach(), direction[p]) for name, p in params.items()}
            u = forward_ad.unpack_dual(exit_losses(partial(functional_forward, net, duals), images, targets,
                                                   cfg)).tangent
    # Step 5's gradient: dM/dw = -u / n, back-propagated through w = 1 + delta (g - mean g) into the WPN.
    weights.backward(-u / len(targets), inputs=list(wpn.parameters()))
    return meta_loss


def half_step(model, wpn, optimizer, wpn_optimizer, images, targets, meta_images, meta_targets, cfg, meta,
              scalers=None):
    """Steps 1-6 on a (train half, meta half) pair; returns (loss, meta loss or None, WPN step
    skipped by fp16 overflow).

    The virtual step and the real step start from the same parameters and the same images, so
    one forward pass (and its graph) serves both: this changes no number the algorithm computes.
    Under torchrun, `model` and `wpn` are DistributedDataParallel: each rank takes its virtual
    step and meta objective on its own shard, and the real and the WPN gradients are averaged.
    `scalers` holds fp16's two loss scalers ("real" for the backbone, "meta" for the WPN), or None.
    """
    net = unwrap(model)
    meta_step = cfg.method == "l2w" and meta
    # SyncBatchNorm's backward cannot be differentiated again, nor its forward forward-mode; the
    # virtual step is per rank anyway, so under --sync-bn it takes a forward of its own (below)
    # that normalises with this rank's batch statistics.
    own_forward = meta_step and any(isinstance(m, nn.SyncBatchNorm) for m in net.modules())
    # --meta-grad jvp differentiates the virtual step's forward again, forward-mode: it records
    # that forward's values to reuse them.
    shared = SharedForward() if meta_step and cfg.meta_grad == "jvp" else None
    recorded = lambda virtual: shared if shared and virtual else contextlib.nullcontext()
    # Under --amp, the forward pass whose derivative the meta-gradient takes stays in fp32: in
    # bf16 that gradient is mostly rounding error (measured in test_l2w.py).
    with autocast(cfg, images.device, enabled=not meta_step), recorded(not own_forward):
        losses = exit_losses(model, images, targets, cfg)           # step 1: L[i, k]
    meta_loss, skipped = None, False
    if meta_step:
        virtual_losses = losses
        if own_forward:
            with recorded(True):
                virtual_losses = exit_losses(partial(functional_forward, net, {}), images, targets, cfg)
        # Steps 3-5. The virtual step moves the trainable parameters (in IMTA's second phase the
        # new heads only); the real optimizer, the parameters and the BatchNorm statistics are
        # left untouched. Only the WPN gets gradients.
        params = trainable_parameters(net)
        meta_scaler = scalers and scalers["meta"]
        wpn_optimizer.zero_grad(set_to_none=True)
        if cfg.meta_grad == "jvp":
            meta_loss = jvp_meta_gradient(net, wpn, optimizer, params, images, targets, virtual_losses,
                                          meta_images, meta_targets, cfg, meta_scaler, shared)
        else:
            meta_loss = higher_meta_gradient(net, wpn, optimizer, params, virtual_losses, meta_images,
                                             meta_targets, cfg, meta_scaler)
        skipped = optimizer_step(wpn_optimizer, meta_scaler)
        meta_loss = meta_loss.item()

    # Step 6, the real step: weights from the updated WPN, no gradient into it.
    if cfg.method == "l2w":
        with torch.no_grad():
            weights = sample_weights(wpn(losses.detach()), cfg.delta, cfg.constraint)
    else:  # the paper's baseline: every sample weighs 1 at every exit
        weights = torch.ones_like(losses)
    loss = weighted_loss(losses, weights)
    sgd_step(loss, optimizer, scalers and scalers["real"])
    return loss.item(), meta_loss, skipped


def throwaway_buffers(net):
    """Copies of the BatchNorm buffers for a forward pass whose statistics updates must be lost."""
    return {name: b.clone() for name, b in net.named_buffers()}


@contextlib.contextmanager
def per_rank_batchnorm(net):
    """SyncBatchNorm layers normalise with this rank's batch only (a one-rank process group)."""
    layers = [m for m in net.modules() if isinstance(m, nn.SyncBatchNorm)] if dist.is_initialized() else []
    saved = [m.process_group for m in layers]
    for m in layers:
        m.process_group = m.own_rank_group
    try:
        yield
    finally:
        for m, group in zip(layers, saved):
            m.process_group = group


def optimizer_step(optimizer, scaler=None):
    """optimizer.step(), through an fp16 loss scaler where there is one: the scaler divides the
    gradients by its scale, skips the step if they overflowed, and then lowers its scale.
    Returns whether the step was skipped."""
    if scaler is None:
        optimizer.step()
        return False
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() < scale


def sgd_step(loss, optimizer, scaler=None):
    """Backward and an optimizer step, through the fp16 loss scaler where there is one."""
    optimizer.zero_grad(set_to_none=True)
    (loss if scaler is None else scaler.scale(loss)).backward()
    return optimizer_step(optimizer, scaler)


def train_step(model, wpn, optimizer, wpn_optimizer, images, targets, cfg, meta=True, scalers=None):
    """One iteration: the batch is split into halves A and B; A trains with B as the meta set,
    then B with A. `meta=False` weights with the current WPN without updating it."""
    model.train()
    wpn.train()
    a, b = images.chunk(2), targets.chunk(2)
    if a[0].shape[0] != a[1].shape[0]:
        raise ValueError(f"batch of {images.shape[0]} cannot be split into two equal halves")
    halves = [half_step(model, wpn, optimizer, wpn_optimizer, a[i], b[i], a[1 - i], b[1 - i], cfg, meta, scalers)
              for i in (0, 1)]
    metas = [h[1] for h in halves if h[1] is not None]
    return {"loss": (halves[0][0] + halves[1][0]) / 2, "meta_loss": sum(metas) / 2 if metas else None,
            "wpn_skipped": sum(h[2] for h in halves)}


# ============================================================================
# --meta-grad jvp: the JVP replays step 1's forward, in tangents only (speed only)
# ============================================================================

class Record(NamedTuple):
    """One operation of step 1's forward, as SharedForward records it."""
    func: object
    rule: object         # its tangent rule (TANGENT_RULES), None: forward-mode AD
    args: tuple
    kwargs: dict
    inputs: list         # the tensors among args and kwargs
    before: list         # their versions (in-place counters) before the operation ...
    after: list          # ... and after it
    outputs: tuple
    versions: list       # the outputs' versions after it

    @property
    def name(self):
        return getattr(self.func, "__name__", str(self.func))


class SharedForward(TorchFunctionMode):
    """The train half's forward at theta, computed once for step 1 and for the JVP of
    jvp_meta_gradient.

    Forward-mode AD computes a forward's values next to their tangents, and step 1 has just
    computed these values. Entered around step 1's forward, this records every torch function
    the forward calls whose output requires grad, with its arguments and outputs: a tape. `jvp`
    then walks the tape once, computing tangents from the recorded values: conv(dx, W) +
    conv(x, dW) + db for a convolution, BatchNorm's with fused kernels and the batch statistics
    its backward saved, ReLU's and concatenation's directly; any other operation (pooling, the
    classifiers, the loss) by PyTorch's forward-mode AD on its recorded inputs, which computes
    that operation's value again. The network's Python does not run again. What cannot be
    replayed is refused, not replayed wrong: a value changed in place after it was recorded or
    read (a network that adds into a convolution's output), a tensor computed from the
    parameters outside the recorded operations (a custom autograd Function), random operations."""

    def __init__(self):
        super().__init__()
        self.tape = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = tensors_in((args, kwargs))
        before = [t._version for t in inputs]
        out = func(*args, **kwargs)
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        # Only what the backward differentiates: an output that does not require grad (detached,
        # computed without grad, or from frozen parameters only) is a constant for it too.
        if all(isinstance(o, torch.Tensor) for o in outputs) and any(o.requires_grad for o in outputs):
            rule = TANGENT_RULES.get(func)
            if func is F.batch_norm and out.grad_fn is not None and out.grad_fn.name() == "NativeBatchNormBackward0":
                # the batch statistics this BatchNorm normalised with, as its backward saved them
                rule = partial(rule, statistics=(out.grad_fn._saved_result1, out.grad_fn._saved_result2))
            self.tape.append(Record(func, rule, args, kwargs, inputs, before, [t._version for t in inputs],
                                    outputs, [o._version for o in outputs]))
        return out

    def jvp(self, output, tangents):
        """The tangent of `output`, a tensor the recorded forward computed, when the parameters move
        along `tangents` ({parameter: tangent}); None if it does not depend on them. Releases the tape."""
        tangent = {id(p): t for p, t in tangents.items()}

        def tangent_of(t):
            return tangent.get(id(t))

        produced = {id(o) for record in self.tape for o in record.outputs}
        last_use = {id(t): i for i, record in enumerate(self.tape) for t in record.inputs}
        version = {}   # the version of each tensor as the tape last left it
        try:
            if id(output) not in produced:
                raise RuntimeError("SharedForward.jvp: the output was not computed by the recorded forward")
            with forward_ad.dual_level(), torch.no_grad():
                for i, op in enumerate(self.tape):
                    check_replayable(op, tangent, produced, version)
                    version.update({id(t): v for t, v in zip(op.inputs, op.after)})
                    version.update({id(o): v for o, v in zip(op.outputs, op.versions)})
                    if not any(id(t) in tangent for t in op.inputs):
                        continue
                    if op.rule is None:
                        results = forward_mode(op, tangent)
                    else:
                        results = [op.rule(tangent_of, op.outputs[0], *op.args, **op.kwargs)]
                    for out, result in zip(op.outputs, results):
                        if result is not None:
                            tangent[id(out)] = result
                    for t in op.inputs:   # tangents nobody reads any more
                        if last_use[id(t)] == i and t is not output:
                            tangent.pop(id(t), None)
            return tangent_of(output)
        finally:
            self.tape = []


def check_replayable(op, tangent, produced, version):
    """Refuse to replay `op` if its tangent would be computed from values it did not see."""
    for t, before, after in zip(op.inputs, op.before, op.after):
        if t.grad_fn is not None and id(t) not in produced:
            raise RuntimeError(f"{op.name} read a tensor computed from the parameters outside the recorded operations "
                               "(a custom autograd Function?): SharedForward cannot replay this network")
        if id(t) in tangent and version.get(id(t), before) != before:
            raise RuntimeError(f"{op.name} read a tensor changed in place by an operation the tape did not record "
                               "(an assignment into it?): SharedForward cannot replay this network")
        # Everything the tangent reads must still hold the value the operation read; the one
        # exception is what the operation itself updated and nobody differentiates (BatchNorm's
        # running statistics, which a training-mode BatchNorm's tangent does not read).
        if t._version != after and (t.requires_grad or before == after):
            raise RuntimeError(f"a value that {op.name} read in step 1's forward was changed in place afterwards: "
                               "SharedForward cannot replay this network")


def tensors_in(args):
    """The tensors in a call's arguments: `args` and the lists, tuples and dicts in it, at any depth."""
    if isinstance(args, torch.Tensor):
        return [args]
    if isinstance(args, (list, tuple)):
        return [t for a in args for t in tensors_in(a)]
    if isinstance(args, dict):
        return tensors_in(list(args.values()))
    return []


# Their outputs cannot be computed again: the draw would differ from step 1's.
RANDOM = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, F.rrelu}


def forward_mode(op, tangent):
    """Tangents of an operation's outputs by PyTorch's forward-mode AD on its recorded inputs."""
    if op.before != op.after:
        raise RuntimeError(f"{op.name} changes its input in place: SharedForward has no rule for it")
    if op.func in RANDOM:
        raise RuntimeError(f"{op.name} is random: SharedForward cannot replay it")

    def dual(a):
        if isinstance(a, torch.Tensor):
            return forward_ad.make_dual(a.detach(), tangent[id(a)]) if id(a) in tangent else a.detach()
        if isinstance(a, (list, tuple)):
            return type(a)(dual(t) for t in a)
        if isinstance(a, dict):
            return {k: dual(v) for k, v in a.items()}
        return a

    out = op.func(*dual(op.args), **dual(op.kwargs))
    return [forward_ad.unpack_dual(o).tangent for o in (out if isinstance(out, (tuple, list)) else (out,))]


def conv2d_tangent(d, result, input, weight, bias=None, *args, **kwargs):
    """d conv(x, W, b) = conv(dx, W) + conv(x, dW) + db."""
    dx, dw, db = d(input), d(weight), d(bias)
    x, w = input.detach(), weight.detach()
    parts = [F.conv2d(dx, w, None, *args, **kwargs)] if dx is not None else []
    if dw is not None:
        parts.append(F.conv2d(x, dw, db, *args, **kwargs))
    elif db is not None:   # a bias that trains under a frozen weight
        parts.append(torch.zeros_like(result) + db[:, None, None])
    return parts[0] if len(parts) == 1 else parts[0].add_(parts[1])


def batch_norm_tangent(d, result, input, running_mean, running_var, weight=None, bias=None, training=False,
                       momentum=0.1, eps=1e-5, statistics=None):
    """d F.batch_norm, with fused kernels. Per channel, y = weight xhat + bias with
    xhat = (x - mean) invstd, so with a = weight invstd
        dy = a dx + dweight xhat + dbias                                   (eval mode),
        dy = a (dx - mean(dx) - xhat mean(dx xhat)) + dweight xhat + dbias  (training mode:
    the batch statistics move with x). Either way dy = a dx + c1 xhat + c0 with per-channel c1, c0:
    the two means come from BatchNorm's own backward kernel (its weight and bias gradients for
    the output gradient dx), c1 xhat + c0 is one eval-mode BatchNorm, and a dx is added in place.
    `statistics`: (mean, invstd) of the batch, as step 1's BatchNorm saved them for its backward
    (computed again without them)."""
    x = input.detach()
    dx, dw, db = d(input), d(weight), d(bias)
    if training:   # the batch statistics: recorded, or by BatchNorm's kernel (its output unused)
        mean, invstd = statistics or torch.native_batch_norm(x, None, None, None, None, True, 0.0, eps)[1:]
    else:
        mean, invstd = running_mean, (running_var + eps).rsqrt()
    c1 = torch.zeros_like(mean) if dw is None else dw
    c0 = torch.zeros_like(mean) if db is None else db
    if dx is not None:
        w = None if weight is None else weight.detach()
        a = invstd if w is None else w * invstd
        if training:
            _, sum_xhat, sum_one = torch.ops.aten.native_batch_norm_backward(
                dx, x, w, running_mean, running_var, mean, invstd, True, eps, [False, True, True])
            m = dx.numel() // dx.shape[1]
            c1, c0 = c1 - a * sum_xhat / m, c0 - a * sum_one / m
    dy = F.batch_norm(x, mean, invstd.pow(-2) - eps, c1, c0, False, 0.0, eps)
    if dx is not None:
        dy.addcmul_(a.view(-1, *[1] * (x.dim() - 2)), dx)
    return dy


def relu_tangent(d, result, input, inplace=False):
    """d relu(x) = dx where relu(x) > 0 (in place or not, `result` holds relu(x))."""
    return torch.ops.aten.threshold_backward(d(input), result.detach(), 0)


def cat_tangent(d, result, tensors, dim=0, axis=None):
    """d cat(xs) = cat(dxs), zeros where an input has no tangent."""
    return torch.cat([torch.zeros_like(t) if d(t) is None else d(t) for t in tensors], dim if axis is None else axis)


TANGENT_RULES = {F.conv2d: conv2d_tangent, F.batch_norm: batch_norm_tangent, F.relu: relu_tangent,
                 torch.cat: cat_tangent}


# ============================================================================
# Evaluation: anytime and budgeted (MSDNet's protocols, PAPER.md)
# ============================================================================

@torch.no_grad()
def predict(model, loader, device, cfg):
    """Logits of every exit for a whole split, in order: (list of K (n, classes) tensors, targets)
    on the CPU. Under torchrun each rank predicts its share of every batch with rank 0's weights
    and BatchNorm statistics (those the checkpoint holds); only rank 0 gets the whole (others None)."""
    net = unwrap(model).eval()
    if dist.is_initialized():
        # DDP copies rank 0's buffers into every rank at each training forward, after which each
        # rank updates them with its own shard: without this, ranks would score with different
        # running statistics.
        for buffer in net.buffers():
            dist.broadcast(buffer, 0)
    batches = []
    for images, labels in loader:
        images, _ = to_device(images, labels, device, cfg)
        batches.append(([z.float().cpu() for z in net(images)], labels))
    if dist.is_initialized():   # rank r holds the r-th contiguous share of each batch
        shares = [None] * dist.get_world_size() if is_main() else None
        dist.gather_object(batches, shares, dst=0)
        if not is_main():
            return None
        batches = [part for parts in itertools.zip_longest(*shares) for part in parts if part is not None]
    return [torch.cat(z) for z in zip(*(b[0] for b in batches))], torch.cat([b[1] for b in batches])


def topk_accuracy(logits, targets, k):
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return 100.0 * (top == targets[:, None]).any(dim=1).float().mean().item()


def anytime_evaluate(logits, targets, flops, params):
    """Anytime protocol: top-1/top-5 of every exit with its cumulative Mul-Adds and params."""
    return [{"exit": k + 1, "acc1": topk_accuracy(z, targets, 1), "acc5": topk_accuracy(z, targets, 5),
             "flops": flops[k], "params": params[k]} for k, z in enumerate(logits)]


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
    """Index of the first exit whose threshold each sample reaches, shape (n,). A sample that
    reaches none (a NaN confidence or threshold reaches nothing) runs to the last exit, as in
    `early_exit_predict`."""
    reached = confidence >= thresholds[:, None]
    reached[-1] = True
    return reached.to(torch.uint8).argmax(dim=0)   # the first True


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


@torch.inference_mode()
def early_exit_predict(model, images, thresholds):
    """Real early exiting for a batch: the network runs exit by exit, and at exit k the samples
    whose confidence reaches thresholds[k] leave with that exit's prediction; everything the
    later exits need is cut to the samples that remain, so no computation is spent on the ones
    that left. Gives what the budgeted protocol simulates from a full forward pass
    (`exit_with_thresholds`). Returns (predictions, exits), each of shape (n,)."""
    if model.training:   # not unconditionally: eval() walks every module, as long as a first exit at batch 1
        model.eval()
    n, device = images.shape[0], images.device
    predictions = torch.empty(n, dtype=torch.long, device=device)
    exit_of = torch.empty(n, dtype=torch.long, device=device)
    remaining = torch.arange(n, device=device)    # original index of every sample still running
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
        # nothing to cut when everyone stays (always the case for a single image)
        logits = stream.send(stay if len(stay) < len(leave) else None)
    stream.close()
    return predictions, exit_of


# ============================================================================
# Training loop: cosine schedules, progress, atomic checkpoints, exact resume
# ============================================================================

def cosine(base, iteration, total):
    """Per-iteration cosine decay from `base` to 0 (as in the released MSDNet/L2W code)."""
    return 0.5 * base * (1 + math.cos(math.pi * iteration / total))


def atomic_write(path, write):
    """`write(file)` into a uniquely named temporary file in the same directory, flushed to disk,
    then renamed over `path`: a crash or a second writer never leaves a half-written checkpoint
    or results file behind."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


CHECKPOINT_KEYS = ("config", "model", "wpn", "optimizer", "wpn_optimizer", "epoch", "batch", "rng",
                   "holdout_indices")


def load_checkpoint(path):
    """A checkpoint written by `train`. Loaded with weights_only=True: tensors, numbers, strings
    and containers only, so a file from elsewhere cannot run code."""
    check_file(path, "checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(e))
        if unsafe:
            raise UsageError(f"checkpoint '{path}' needs arbitrary code to load ({unsafe.group(1)}); refused, "
                             f"since loading it could run anything (l2w.py checkpoints hold only tensors)") from None
        raise UsageError(f"checkpoint '{path}' is corrupt or not an l2w.py checkpoint") from None
    except Exception as e:
        raise UsageError(f"checkpoint '{path}' is corrupt or not an l2w.py checkpoint ({type(e).__name__})") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise UsageError(f"checkpoint '{path}' is not an l2w.py checkpoint (it lacks {', '.join(missing)})")
    return state


def rng_state(device):
    """The RNG state of this process's devices, as tensors (nothing here draws from Python's or
    numpy's RNG: shuffling and augmentation are seeded per epoch and sample)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    """Restore what fits this machine: the CUDA state only on a CUDA device (a run saved on 8 GPUs
    may be resumed or evaluated on one, or on the CPU)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def make_loader(dataset, cfg, device, shuffle):
    """Loader over (epoch, index) batches from data.ShardedBatches: shuffling and augmentation
    are seeded by (seed, epoch), so a resumed epoch sees the same batches. Under torchrun each
    rank loads its share of every global batch."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    sampler = data.ShardedBatches(len(dataset), cfg.batch_size, cfg.seed, rank, cfg.world_size, shuffle)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.workers, pin_memory=device.type == "cuda",
                      persistent_workers=cfg.workers > 0)


def setup_device(cfg):
    """Single process: the requested device. Under torchrun (WORLD_SIZE > 1): one process per
    rank, NCCL on GPUs (rank i on cuda:LOCAL_RANK), gloo on CPU."""
    name = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if cfg.world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
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
    """bf16 where the device computes it natively (CPUs, Ampere and newer GPUs), else fp16.
    (`torch.cuda.is_bf16_supported()` also counts emulated bf16 on older GPUs: too slow.)"""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        return torch.float16
    return torch.bfloat16


def autocast(cfg, device, enabled=True):
    return torch.autocast(device.type, dtype=amp_dtype(device), enabled=cfg.amp and enabled)


def build(cfg, num_classes, device):
    """Backbone, WPN and their optimizers as configured (PAPER.md, "Hyperparameters"), wrapped in
    DistributedDataParallel under torchrun, and fp16's loss scalers where they are needed: one
    for the backbone's step and one for the WPN's meta step, whose gradients come through a
    different (fp32) graph and overflow at other scales."""
    model = build_model(cfg.arch, num_classes, cfg.exits, cfg.image_size, cfg.step, base=cfg.base,
                        gradient_equilibrium=cfg.imta == "pretrain")
    if cfg.imta == "finetune":   # IMTA's second phase: the network above frozen, new heads on it
        model = IMTANet(model, num_classes)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dist.is_initialized() and cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        own = [dist.new_group([r]) for r in range(dist.get_world_size())]   # every rank creates every group
        for m in model.modules():
            if isinstance(m, nn.SyncBatchNorm):
                m.own_rank_group = own[dist.get_rank()]   # read by per_rank_batchnorm
    wpn = WPN(cfg.exits, cfg.wpn_depth, cfg.wpn_width).to(device)
    optimizer = torch.optim.SGD(trainable_parameters(model).values(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    wpn_optimizer = torch.optim.Adam(wpn.parameters(), lr=cfg.wpn_lr, weight_decay=cfg.wpn_weight_decay)
    if dist.is_initialized():
        ids = [device.index] if device.type == "cuda" else None
        model, wpn = DDP(model, device_ids=ids), DDP(wpn, device_ids=ids)
    scalers = None
    if cfg.amp and amp_dtype(device) == torch.float16:
        scalers = {"real": torch.amp.GradScaler(device.type), "meta": torch.amp.GradScaler(device.type)}
    return model, wpn, optimizer, wpn_optimizer, scalers


def format_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def to_device(images, targets, device, cfg):
    images = images.to(device, non_blocking=True)
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=True)


def replicas_identical(*modules):
    """Under torchrun: are these modules' parameters and buffers bit-identical on every rank?
    Compares a SHA-256 of their bytes, not copies of the tensors."""
    digest = hashlib.sha256()
    for module in modules:
        for t in itertools.chain(unwrap(module).parameters(), unwrap(module).buffers()):
            digest.update(t.detach().flatten().view(torch.uint8).cpu().numpy().tobytes())
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest.hexdigest())
    return len(set(digests)) == 1


class Preemption:
    """SIGTERM and SIGUSR1 (what SLURM sends before it ends a job) ask the training loop to write a
    checkpoint after the current iteration and stop; under torchrun the ranks stop together."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, device):
        self.device, self.received = device, 0
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}

    def handle(self, signum, frame):
        self.received = signum

    def requested(self):
        """The signal number to stop for, agreed by all ranks (0: go on)."""
        if not dist.is_initialized():
            return self.received
        flag = torch.tensor([self.received], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def close(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Stopped(Exception):
    """Training stopped on a signal after writing its checkpoint; the exit code is 128 + signal."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def train(cfg, state=None, stop_after_epoch=None):
    """Train (or, with cfg.eval_only, only evaluate) and write results.json; returns the results.

    `state` is the loaded cfg.resume checkpoint, if already read. `stop_after_epoch` ends the
    run early as an interruption would (used to test resume).
    """
    device = setup_device(cfg)
    torch.manual_seed(cfg.seed)
    if cfg.resume and state is None:
        state = load_checkpoint(cfg.resume)
    # IMTA's second phase starts from the phase-1 network and its hold-out split; a phase-2
    # checkpoint holds both, so a resumed run does not read the phase-1 file.
    pretrained = load_checkpoint(cfg.pretrained) if cfg.imta == "finetune" and not state else None
    if pretrained and pretrained["config"].get("imta") != "pretrain":
        log(f"warning: --pretrained '{cfg.pretrained}' was trained without gradient equilibrium (not --imta "
            "pretrain); phase 2 runs on it, but IMTA's first phase trains with it")
    splits = rank_zero_first(lambda: data.load(cfg, (state or pretrained or {}).get("holdout_indices")))
    model, wpn, optimizer, wpn_optimizer, scalers = build(cfg, splits.num_classes, device)
    if pretrained:
        try:
            unwrap(model).backbone.load_state_dict(pretrained["model"])
        except RuntimeError as e:
            raise UsageError(f"--pretrained '{cfg.pretrained}' does not fit this model ({str(e).splitlines()[0]})") from None
    start_epoch = start_batch = 0
    if state:
        try:
            unwrap(model).load_state_dict(state["model"])
            unwrap(wpn).load_state_dict(state["wpn"])
            optimizer.load_state_dict(state["optimizer"])
            wpn_optimizer.load_state_dict(state["wpn_optimizer"])
            for name, scaler in (scalers or {}).items():
                if (state.get("scalers") or {}).get(name):
                    scaler.load_state_dict(state["scalers"][name])
        except (RuntimeError, ValueError, KeyError) as e:
            detail = re.search(r'(Missing|Unexpected) key\(s\) in state_dict: "[^"]+"|size mismatch for [\w.]+', str(e))
            raise UsageError(f"checkpoint '{cfg.resume}' does not fit the {cfg.arch} with {cfg.exits} exits that its "
                             f"config describes ({detail.group(0) if detail else str(e).splitlines()[0]})") from None
        start_epoch, start_batch = state["epoch"], state["batch"]
        set_rng_state(state["rng"], device)
        log(f"resumed from {cfg.resume} at epoch {start_epoch}" + (f", iteration {start_batch}" if start_batch else ""))

    train_loader = make_loader(splits.train, cfg, device, shuffle=True)
    val_loader = make_loader(splits.threshold_set, cfg, device, shuffle=False)
    n_batches = len(train_loader.batch_sampler)
    if not cfg.eval_only and cfg.epochs > start_epoch and n_batches == 0:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the {len(splits.train)} training images")
    if cfg.weights and not state:   # the run's starting point; once it has a checkpoint, never read again
        load_weights(cfg, unwrap(model), unwrap(wpn))
    if is_main():
        os.makedirs(cfg.out, exist_ok=True)
        write_json(os.path.join(cfg.out, "holdout_indices.json"), splits.holdout_indices.tolist())
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

    def save(epoch, batch):   # the position to continue from: `batch` iterations into `epoch`
        if is_main():
            checkpoint = {"model": unwrap(model).state_dict(), "wpn": unwrap(wpn).state_dict(),
                          "optimizer": optimizer.state_dict(), "wpn_optimizer": wpn_optimizer.state_dict(),
                          "scalers": {k: s.state_dict() for k, s in scalers.items()} if scalers else None,
                          "epoch": epoch, "batch": batch, "rng": rng_state(device),
                          "config": dataclasses.asdict(cfg), "holdout_indices": splits.holdout_indices}
            atomic_write(os.path.join(cfg.out, "checkpoint.pt"), lambda f: torch.save(checkpoint, f))

    total_iters = cfg.epochs * n_batches
    started, done_here, skipped, val = time.time(), 0, 0, None
    preemption = Preemption(device)
    try:
        for epoch in range(start_epoch, cfg.epochs) if not cfg.eval_only else ():
            skip = start_batch if epoch == start_epoch else 0
            train_loader.batch_sampler.set_epoch(epoch, skip)
            for i, (images, targets) in enumerate(train_loader, start=skip):
                iteration = epoch * n_batches + i
                for group in optimizer.param_groups:
                    group["lr"] = cosine(cfg.lr, iteration, total_iters)
                for group in wpn_optimizer.param_groups:
                    group["lr"] = cosine(cfg.wpn_lr, iteration, total_iters)
                images, targets = to_device(images, targets, device, cfg)
                out = train_step(model, wpn, optimizer, wpn_optimizer, images, targets, cfg,
                                 meta=iteration % cfg.meta_interval == 0, scalers=scalers)
                done_here, skipped = done_here + 1, skipped + out["wpn_skipped"]
                if (i + 1) % cfg.print_every == 0 or i + 1 == n_batches:
                    elapsed = time.time() - started
                    meta = "-" if out["meta_loss"] is None else f"{out['meta_loss']:.4f}"
                    eta = elapsed / done_here * (total_iters - iteration - 1)
                    log(f"epoch {epoch + 1}/{cfg.epochs} iter {i + 1}/{n_batches} loss {out['loss']:.4f} "
                        f"meta {meta} lr {optimizer.param_groups[0]['lr']:.4f} "
                        f"{done_here * cfg.batch_size / elapsed:.0f} img/s ETA {format_time(eta)}"
                        + (f" | WPN steps skipped on fp16 overflow: {skipped}" if skipped else ""))
                signum = preemption.requested()
                if signum or (cfg.save_every and (iteration + 1) % cfg.save_every == 0 and i + 1 < n_batches):
                    save(epoch, i + 1)
                if signum:
                    log(f"stopped by signal {signum} at epoch {epoch + 1}, iteration {i + 1}; continue with "
                        f"--resume {os.path.join(cfg.out, 'checkpoint.pt')}")
                    raise Stopped(signum)
            if splits.threshold_source == "holdout":
                val = predict(model, val_loader, device, cfg)   # the last epoch's also fits thresholds
                if is_main():
                    accs = " ".join(f"{topk_accuracy(z, val[1], 1):.2f}" for z in val[0])
                    log(f"epoch {epoch + 1}/{cfg.epochs} hold-out top-1 per exit: {accs}")
            save(epoch + 1, 0)
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                return None
    finally:
        preemption.close()
    trained_here = not cfg.eval_only and cfg.epochs > start_epoch and splits.threshold_source == "holdout"
    if not trained_here:
        val = predict(model, val_loader, device, cfg)
    return evaluate(cfg, model, wpn, splits, device, val, flops, params)


def load_weights(cfg, model, wpn):
    """--weights: a released MSDNet-PyTorch / L2W-DEN checkpoint into `model` (and its WPN, if it
    has one, into `wpn`)."""
    try:
        info = load_released(model, cfg.weights, wpn)
    except ValueError as e:
        try:   # one of l2w.py's own checkpoints? say what it is for
            config = load_checkpoint(cfg.weights)["config"]
        except UsageError:
            config = None
        if config is not None:
            raise UsageError(f"--weights '{cfg.weights}' is a checkpoint of l2w.py"
                             + (f" (--imta {config['imta']})" if config.get("imta") else "")
                             + ", not a released one: evaluate or continue it with --resume"
                             + ("; phase 2 starts from it with --imta finetune --pretrained"
                                if config.get("imta") == "pretrain" else "")) from None
        hint = ""
        if "does not fit this" in str(e):   # name the flags that choose the network
            hint = (" (--exits, --step, --base, --image-size and the data set choose the network; "
                    "--wpn-depth and --wpn-width the WPN)")
        raise UsageError(f"{e}{hint}") from None
    except Exception as e:   # not a file torch.load(weights_only=True) can read
        raise UsageError(f"--weights '{cfg.weights}' is not a readable checkpoint ({type(e).__name__})") from None
    log(f"loaded the released weights {cfg.weights} (epoch {info.get('epoch', '?')}"
        f"{', and its WPN' if info['wpn'] else ''})")


def evaluate(cfg, model, wpn, splits, device, val, flops, params):
    """Both protocols on the test set; thresholds come from `val`, the (logits, targets) of the
    hold-out split (or of the training images with test-time transforms), never from the test
    set. Rank 0 reports and writes."""
    test = predict(model, make_loader(splits.test, cfg, device, False), device, cfg)
    results = {"config": dataclasses.asdict(cfg), "threshold_source": splits.threshold_source,
               "class_counts": splits.class_counts}
    if dist.is_initialized():   # the averaged gradients must have kept every rank's copy equal
        results["replicas_identical"] = replicas_identical(model, wpn)
    if not is_main():
        return None
    (test_logits, test_targets), (val_logits, val_targets) = test, val
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
    if cfg.early_exit:
        results["early_exit"] = early_exit_evaluate(cfg, model, splits.test, device, val, (test_logits, test_targets),
                                                    flops)
    path = os.path.join(cfg.out, "results.json")
    write_json(path, results)
    log(f"\nwrote {path}")
    return results


def timed(step, images, device):
    """(seconds, step(images)) of one call, CUDA synchronised before and after (`images` None:
    step())."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = step() if images is None else step(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


@torch.inference_mode()
def early_exit_evaluate(cfg, model, test_set, device, val, test, flops):
    """--early-exit: the budgeted protocol at q = cfg.q, for real. Thresholds are fitted on the
    hold-out split as in `dynamic_evaluate`; then every test batch runs through the whole network
    and through `early_exit_predict`, in turn and in alternating order (so that load on the
    machine and warm caches favour neither), at batch size 1 and at --batch-size. Reports time per
    image, images/s, the average Mul-Adds of the exits taken and the accuracy, which must be the
    budgeted protocol's at q (`same_as_budgeted` counts the images whose exit and prediction are)."""
    net, exits, n = unwrap(model).eval(), len(flops), len(test[1])
    thresholds = fit_thresholds(confidences(val[0]), exit_fractions(cfg.q, exits))
    simulated = exit_with_thresholds(confidences(test[0]), thresholds)
    simulated_predictions = torch.stack(test[0]).argmax(dim=2)[simulated, torch.arange(n)]
    on_device = thresholds.to(device)
    steps = {"whole": net, "early": lambda images: early_exit_predict(net, images, on_device)}

    runs = []
    for batch_size in dict.fromkeys([1, cfg.batch_size]):
        loader = make_loader(test_set, dataclasses.replace(cfg, batch_size=batch_size), device, shuffle=False)
        seconds, predictions, exit_of = {"whole": 0.0, "early": 0.0}, [], []
        for i, (images, labels) in enumerate(loader):
            images, _ = to_device(images, labels, device, cfg)
            if i == 0:   # warm-up: the first calls allocate memory and pick kernels
                for step in steps.values():
                    timed(step, images, device)
            outputs = {}
            for name in ("whole", "early") if i % 2 == 0 else ("early", "whole"):
                elapsed, outputs[name] = timed(steps[name], images, device)
                seconds[name] += elapsed
            predictions.append(outputs["early"][0].cpu())
            exit_of.append(outputs["early"][1].cpu())
        predictions, exit_of = torch.cat(predictions), torch.cat(exit_of)
        runs.append({"batch_size": batch_size,
                     "ms_per_image": 1000 * seconds["early"] / n, "images_per_s": n / seconds["early"],
                     "whole_ms_per_image": 1000 * seconds["whole"] / n, "whole_images_per_s": n / seconds["whole"],
                     "speedup": seconds["whole"] / seconds["early"],
                     "accuracy": 100.0 * (predictions == test[1]).float().mean().item(),
                     "same_as_budgeted": int(((exit_of == simulated) & (predictions == simulated_predictions)).sum()),
                     "exit_shares": (torch.bincount(exit_of, minlength=exits).double() / n).tolist()})
    shares = torch.tensor(runs[0]["exit_shares"], dtype=torch.float64)
    average_flops = float((shares * torch.tensor(flops, dtype=torch.float64)).sum())
    result = {"q": cfg.q, "accuracy": runs[0]["accuracy"],
              "budgeted_accuracy": 100.0 * (simulated_predictions == test[1]).float().mean().item(),
              "flops": average_flops, "whole_flops": flops[-1], "flops_speedup": flops[-1] / average_flops,
              "runs": runs}
    log(f"\nearly exit at q {cfg.q:.2f} (test set, {n} images, run exit by exit and through the whole network)\n"
        f" top-1 {result['accuracy']:.2f} (budgeted protocol: {result['budgeted_accuracy']:.2f}), "
        f"{average_flops / 1e6:.2f}M Mul-Adds per image (whole network {flops[-1] / 1e6:.2f}M: "
        f"{result['flops_speedup']:.2f}x), exit shares {' '.join(f'{s:.3f}' for s in shares)}\n"
        " batch   early exit: ms/image  images/s   whole network: ms/image  images/s   speedup   "
        "share of the Mul-Adds speedup   same as budgeted")
    for run in runs:
        log(f"{run['batch_size']:6d} {run['ms_per_image']:21.3f} {run['images_per_s']:9.1f} "
            f"{run['whole_ms_per_image']:24.3f} {run['whole_images_per_s']:9.1f} {run['speedup']:8.2f}x "
            f"{100 * run['speedup'] / result['flops_speedup']:28.0f} % {run['same_as_budgeted']:11d}/{n}")
    return result


# ============================================================================
# Curves: accuracy against Mul-Adds, the figure of the paper's experiments
# ============================================================================

def read_results(path):
    """results.json of a run directory, or the file itself."""
    file = os.path.join(path, "results.json") if os.path.isdir(path) else path
    try:
        with open(file) as f:
            results = json.load(f)
        results["config"], results["anytime"], results["dynamic"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--plot: '{path}' is not a run directory or results.json ({type(e).__name__})") from None
    return results


def plot_curves(paths, out_png):
    """One figure of every run in `paths` (run directories or results.json files): the budgeted
    curve (accuracy against expected Mul-Adds per image), the anytime accuracy of each exit at
    its Mul-Adds, and, for --early-exit runs, the measured point with its time per image.
    Returns the curves' labels (method, arch, exits, dataset of each run's config)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot draws with matplotlib, which is not installed: pip install matplotlib") from None
    runs = [read_results(p) for p in paths]
    giga = max(r["anytime"][-1]["flops"] for r in runs) >= 1e9
    scale, unit = (1e9, "G") if giga else (1e6, "M")
    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    labels = []
    for results in runs:
        c = results["config"]
        label = f"{c['method']} {c['arch']}{c['exits']} {c['dataset']}"
        labels.append(label)
        curve, = axes.plot([d["flops"] / scale for d in results["dynamic"]], [d["acc"] for d in results["dynamic"]],
                           label=f"{label}: budgeted")
        axes.plot([a["flops"] / scale for a in results["anytime"]], [a["acc1"] for a in results["anytime"]], "o",
                  color=curve.get_color(), label=f"{label}: each exit")
        if "early_exit" in results:
            e, run = results["early_exit"], results["early_exit"]["runs"][0]
            axes.plot(e["flops"] / scale, e["accuracy"], "*", markersize=14, color=curve.get_color(),
                      label=f"{label}: early exit at q {e['q']:g}, measured")
            axes.annotate(f"{run['ms_per_image']:.1f} ms/image at batch {run['batch_size']}\n"
                          f"(whole network {run['whole_ms_per_image']:.1f})", (e["flops"] / scale, e["accuracy"]),
                          textcoords="offset points", xytext=(8, -24), fontsize=8)
    axes.set_xlabel(f"Mul-Adds per image ({unit})")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    try:   # in the format its name says, PNG if it says none, and always to exactly that path
        figure.savefig(out_png, format=os.path.splitext(out_png)[1][1:] or "png", dpi=100)
    except (OSError, ValueError) as e:
        raise UsageError(f"--out '{out_png}' cannot be written ({str(e).splitlines()[0]})") from None
    finally:
        plt.close(figure)
    return labels


# ============================================================================
# Benchmark: cost of an L2W iteration (both meta-gradients) relative to plain training
# ============================================================================

def bench(cfg):
    device = setup_device(cfg)
    torch.manual_seed(cfg.seed)
    num_classes = data.DATASETS[cfg.dataset] or 1000
    model, wpn, optimizer, wpn_optimizer, scalers = build(cfg, num_classes, device)
    images, targets = to_device(torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size),
                                torch.randint(num_classes, (cfg.batch_size,)), device, cfg)

    def plain_step():  # one SGD step on the full batch, every exit weighted 1
        model.train()
        with autocast(cfg, device):
            loss = exit_losses(model, images, targets, cfg).mean(dim=0).sum()
        sgd_step(loss, optimizer, scalers and scalers["real"])

    def l2w_step(meta_grad):
        train_step(model, wpn, optimizer, wpn_optimizer, images, targets, dataclasses.replace(cfg, meta_grad=meta_grad),
                   meta=True, scalers=scalers)

    print(f"bench: {cfg.arch} {cfg.exits} exits, {cfg.image_size}x{cfg.image_size} images, batch {cfg.batch_size}, "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{torch.get_num_threads()} threads, amp {cfg.amp}, channels-last {cfg.channels_last}, "
          f"median of {cfg.bench_iters}")
    # The three kinds of iteration alternate, so that a busy machine slows them alike, and take
    # turns at going first (here, the same iteration measured 2 % slower right after a `higher`
    # one than right after another). "higher" and "jvp" are the two ways of taking the same
    # meta-gradient (Config.meta_grad).
    steps = [("plain", plain_step), ("higher", lambda: l2w_step("higher")), ("jvp", lambda: l2w_step("jvp"))]
    times, memory = {name: [] for name, _ in steps}, {}
    for i in range(cfg.bench_iters + 2):   # two warm-up rounds
        for name, step in steps[i % 3:] + steps[:i % 3]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times[name].append(timed(step, None, device)[0])
            memory[name] = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    results = {name: statistics.median(t[2:]) for name, t in times.items()}
    for name, seconds in results.items():
        peak = f"   peak memory {memory[name] / 2**20:.0f} MiB" if memory[name] is not None else ""
        print(f"{name:6s} {seconds * 1000:9.1f} ms/iter {cfg.batch_size / seconds:9.1f} img/s{peak}")
    print(f"ratio  higher/plain {results['higher'] / results['plain']:.2f}x  jvp/plain "
          f"{results['jvp'] / results['plain']:.2f}x  jvp/higher {results['jvp'] / results['higher']:.2f}x")
    if device.type == "cpu":
        print(f"peak memory of the process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")
    return results


# ============================================================================
# main
# ============================================================================

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if "--plot" in argv:   # the one command that takes several values; not a training config
            parser = OneLineParser(prog="l2w.py --plot", description="accuracy against Mul-Adds of finished runs")
            parser.add_argument("--plot", nargs="+", required=True, metavar="PATH",
                                help="run directories or results.json files")
            parser.add_argument("--out", default="curves.png", help="the PNG to write (default: curves.png)")
            args = parser.parse_args(argv)
            out = os.path.join(args.out, "curves.png") if os.path.isdir(args.out) else args.out
            plot_curves(args.plot, out)
            print(f"wrote {out}")
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
    except Stopped as e:   # preempted: the checkpoint is written; the usual code of a signalled job
        sys.exit(128 + e.signum)
    finally:
        if dist.is_initialized():
            gc.collect()   # free the DDP wrappers while their process group still exists
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
