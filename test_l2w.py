"""Tests for the L2W-DEN reference implementation (CPU, a few minutes in all).

Each test compares against something independent: a published figure, a second computation
of the same quantity (torch.func, finite differences, a literal loop), or a hand-worked case.
"""
import ast
import contextlib
import copy
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import pickle
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

import data
import l2w
import models

HERE = os.path.dirname(os.path.abspath(__file__))


def small_cfg(**overrides):
    base = dict(dataset="synthetic", exits=3, epochs=1, batch_size=32, lr=0.1, holdout=60,
                synthetic_size=300, workers=0, print_every=100, device="cpu")
    return l2w.Config(**{**base, **overrides})


def run_cli(*args, cwd=None):
    """l2w.py's command line in a process of its own."""
    return subprocess.run([sys.executable, os.path.join(HERE, "l2w.py"), *args], capture_output=True,
                          text=True, cwd=cwd or HERE, timeout=600)


def cli(*args):
    """The same command line through l2w.main in this process (no interpreter start-up and
    imports): its exit code and what it printed, as run_cli gives them."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            l2w.main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


# ----------------------------------------------------------------------------
# models.py: published figures (MSDNet's and L2W-DEN's papers, README "Models and their cost")
# ----------------------------------------------------------------------------

def test_msdnet_cifar100_matches_published_figures():
    model = models.build_model("msdnet", 100, 5)
    flops, params = models.count_cost(model, 32)
    assert [round(f / 1e6, 2) for f in flops] == [6.86, 14.35, 27.54, 41.71, 58.48]
    assert params[-1] == 2_078_924 == sum(p.numel() for p in model.parameters())


def test_msdnet_imagenet_step4_matches_published_figures():
    model = models.build_model("msdnet", 1000, 5, image_size=224, step=4)
    flops, params = models.count_cost(model, 224)
    assert [round(p / 1e6, 2) for p in params] == [4.24, 8.77, 13.07, 16.75, 23.96]
    assert [round(f / 1e9, 2) for f in flops] == [0.34, 0.69, 1.01, 1.25, 1.36]


def test_msdnet_imagenet_step7_base7_matches_msdnet_pytorchs_released_model():
    # MSDNet-PyTorch's released ImageNet model msdnet-step=7-block=5 (first block of 7 layers too):
    # the costs its op counter prints for it (MSDNet-PyTorch issue 10), Mul-Adds (M) and params (M)
    model = models.build_model("msdnet", 1000, 5, image_size=224, step=7, base=7)
    flops, params = models.count_cost(model, 224)
    assert [round(f / 1e6, 2) for f in flops] == [615.69, 1436.39, 2283.21, 2967.42, 3253.79]
    assert [round(p / 1e6, 2) for p in params] == [8.76, 20.15, 31.73, 41.86, 62.31]


def test_msdnet_cifar_layer_layout_and_any_exit_count():
    # block k holds k layers, so exit k follows layer 1 + ... + k (15 layers for 5 exits, 28 for 7)
    for exits in (1, 2, 5, 7, 9):
        model = models.build_model("msdnet", 10, exits)
        n_layers = sum(isinstance(m, models.MSDLayer) for m in model.modules())
        assert n_layers == exits * (exits + 1) // 2
        outputs = model(torch.randn(2, 3, 32, 32))
        assert len(outputs) == exits and all(z.shape == (2, 10) for z in outputs)
    with pytest.raises(ValueError):
        models.build_model("msdnet", 10, 0)


def test_readme_cost_table_is_what_count_cost_gives():
    readme = open(os.path.join(HERE, "README.md")).read()
    table = readme.split("<!-- begin cost table -->\n")[1].split("\n<!-- end cost table -->")[0]
    assert table == models.cost_table()


def test_count_cost_hand_worked_on_a_tiny_network():
    # conv 3->4 3x3 on 8x8: 3*4*9*64 = 6912; ReLU 4*64 = 256; avgpool 2: 4*16*4 = 256;
    # linear 64->2: 128 + 2. Params: conv 108, BN 8, linear 130.
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = models.conv_bn_relu(3, 4)
            self.head = torch.nn.Sequential(torch.nn.AvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(64, 2))

        def forward(self, x):
            return [self.head(self.body(x))]

    flops, params = models.count_cost(Tiny(), 8)
    assert flops == [6912 + 256 + 256 + 130] and params == [108 + 8 + 130]


class Branches(torch.nn.Module):
    """Three exits on 8x8 images, computed last exit first and returned stacked: exit 3 alone
    reads `wide`; exits 2 and 3 read `down`."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU())
        self.wide = nn.Conv2d(4, 8, 1)
        self.down = nn.Sequential(nn.Conv2d(4, 2, 3, stride=2, padding=1, bias=False), nn.AvgPool2d(2))
        self.heads = nn.ModuleList([nn.Linear(4, 5), nn.Linear(8, 5), nn.Linear(16, 5)])

    def forward(self, x, stack=torch.stack):
        s = self.stem(x)
        wide, down = self.wide(s), self.down(s).flatten(1)
        z3 = self.heads[2](torch.cat([wide.mean((2, 3)), down], 1))
        return stack([self.heads[0](s.mean((2, 3))), self.heads[1](down), z3])


def test_count_cost_charges_each_exit_what_computing_it_needs():
    # The README's TwoExitNet runs block 2 before exit 1's head reads block 1. Exit 1 needs conv1
    # 3*16*9*32*32 = 442,368, its ReLU 16*32*32 = 16,384 and Linear(16, 10) 170: 458,922; exit 2
    # adds conv2 (stride 2) 16*32*9*16*16 = 1,179,648, its ReLU 32*16*16 = 8,192 and Linear(32, 10)
    # 330: 1,647,092. Parameters: conv1 432 + 16, BN 32, linear 170: 650; + conv2 4,608 + 32, BN 64,
    # linear 330: 5,684. The README's example states these figures.
    readme = open(os.path.join(HERE, "README.md")).read()
    example = readme.split("<!-- begin own-project example -->\n```python\n")[1].split("```")[0]
    namespace = {"nn": torch.nn, "torch": torch}
    exec(example[example.index("class TwoExitNet"):example.index("\nmodel, wpn = ")], namespace)
    assert 442_368 + 16_384 + 170 == 458_922 and 458_922 + 1_179_648 + 8_192 + 330 == 1_647_092
    assert models.count_cost(namespace["TwoExitNet"](), 32) == ([458_922, 1_647_092], [650, 5_684])
    assert ("class TwoExitNet(nn.Module):   # models.count_cost(TwoExitNet(), 32): Mul-Adds 458,922 / 1,647,092, "
            "params 650 / 5,684\n") in example
    # Branches (8x8): exit 1: conv 3*4*9*64 = 6,912, ReLU 4*64 = 256, Linear(4, 5) 25; exit 2: conv
    # (stride 2) 4*2*9*16 = 1,152, avg-pool 2*2*2 outputs x 4 = 32, Linear(8, 5) 45; exit 3: the 1x1
    # conv 4*8*64 = 2,048, Linear(16, 5) 85. Parameters: 108 + 25; 72 + 45; 32 + 8 + 85.
    flops, params = models.count_cost(Branches(), 8)
    exit1 = 6_912 + 256 + 25
    assert flops == [exit1, exit1 + 1_152 + 32 + 45, exit1 + 1_152 + 32 + 45 + 2_048 + 85]
    assert params == [108 + 25, 108 + 25 + 72 + 45, 108 + 25 + 72 + 45 + 32 + 8 + 85]

    class Concatenated(Branches):   # the same (3, n, 5) tensor, not made by torch.stack: no exits to follow
        def forward(self, x):
            return super().forward(x, stack=lambda logits: torch.cat([z[None] for z in logits]))

    with pytest.raises(ValueError, match=r"a list or tuple of them \(or torch.stack of them\), got a tensor of shape "
                                         r"\(3, 1, 5\) not made by torch.stack"):
        models.count_cost(Concatenated(), 8)


# ----------------------------------------------------------------------------
# RANet (Yang et al., CVPR 2020): Model-C-1 (6 exits) and Model-C-2 (8 exits)
# ----------------------------------------------------------------------------

# Model-C-1 on CIFAR-10, the published figures: cumulative Mul-Adds (M, 3 decimals)
# and parameters (M, 4 decimals) per exit, and the exact total.
C1_CIFAR10_MADDS = [8.361, 21.765, 32.844, 41.524, 53.226, 58.921]
C1_CIFAR10_PARAMS = [0.3471, 0.8767, 1.2702, 1.7543, 2.1301, 2.5476]
C1_CIFAR10_TOTAL = 2_547_601

# Exact cumulative (Mul-Adds, params) per exit of the released architecture
# (yangle15/RANet-pytorch, models/RANet.py; C-1: --scale-list 1-2-3 --grFactor/--bnFactor 4-2-1,
# C-2: 1-2-2-3 and 4-2-2-1; --step 2 --stepmode lg, 16 channels, growth 6), counted with
# `count_cost`'s rule on a separate transcription of that code. That transcription also gives
# C-1 CIFAR-10 exactly the figures above.
RELEASED = {
    (6, 100): ([8372324, 21788360, 32878892, 41570192, 53283828, 58990680],
               [358660, 899880, 1304995, 1800711, 2188193, 2617261]),
    (8, 10): ([10728202, 24132628, 35211550, 43891240, 93010226, 114607676, 163942086, 175650768],
              [356330, 885940, 1279445, 1763551, 2659597, 3616119, 4381329, 5094107]),
    (8, 100): ([10739812, 24155848, 35246380, 43937680, 93068276, 114677336, 164023356, 175743648],
               [367940, 909160, 1314275, 1809991, 2717647, 3685779, 4462599, 5186987]),
}


def test_ranet_c1_cifar10_matches_the_stated_figures():
    model = models.build_model("ranet", 10, 6)
    madds, params = models.count_cost(model, 32)
    assert [round(m / 1e6, 3) for m in madds] == C1_CIFAR10_MADDS
    assert [round(p / 1e6, 4) for p in params] == C1_CIFAR10_PARAMS
    assert params[-1] == C1_CIFAR10_TOTAL == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("exits, num_classes", sorted(RELEASED))
def test_ranet_costs_match_the_released_architecture(exits, num_classes):
    model = models.build_model("ranet", num_classes, exits)
    madds, params = models.count_cost(model, 32)
    assert (madds, params) == RELEASED[exits, num_classes]
    assert params[-1] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("exits, num_classes", [(6, 10), (8, 100)])
def test_ranet_forward_gives_one_logit_tensor_per_exit_and_trains_every_parameter(exits, num_classes):
    torch.manual_seed(0)
    model = models.build_model("ranet", num_classes, exits)
    outputs = model(torch.randn(2, 3, 32, 32))
    assert isinstance(outputs, list) and len(outputs) == exits
    assert all(out.shape == (2, num_classes) for out in outputs)
    sum(out.logsumexp(dim=1).sum() for out in outputs).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_ranet_exits_iter_equals_forward_in_eval_mode():
    torch.manual_seed(0)
    model = models.build_model("ranet", 10, 8).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for streamed, full in zip(list(model.exits_iter(x)), model(x), strict=True):
            assert torch.equal(streamed, full)


def test_ranet_first_exit_runs_no_finer_sub_network():
    model = models.build_model("ranet", 10, 6).eval()
    ran = []
    for s, sub_network in enumerate(model.subnets):
        for block in sub_network:
            block.register_forward_hook(lambda *_, s=s: ran.append(s))
    with torch.no_grad():
        next(model.exits_iter(torch.randn(1, 3, 32, 32)))
    assert ran == [0]  # only block 1 of the lowest-resolution sub-network


@pytest.mark.parametrize("exits", [0, 5, 7, 9])
def test_ranet_other_exit_counts_are_refused_naming_the_two_models(exits):
    with pytest.raises(ValueError, match=r"6 exits \(Model-C-1\) or 8 exits \(Model-C-2\)"):
        models.build_model("ranet", 10, exits)


def test_ranet_resize_equals_bilinear_interpolation_in_values_and_gradients_and_keeps_channels_last():
    # matrix products, whose backward is deterministic on GPUs, in place of F.interpolate's
    torch.manual_seed(0)
    for shape, size in (((2, 3, 8, 8), (16, 16)), ((2, 3, 32, 32), (16, 16)), ((1, 2, 7, 5), (3, 11)), ((1, 1, 1, 1), (4, 4))):
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        got, want = models.resize(x, size), F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        assert got.shape == want.shape and torch.allclose(got, want, rtol=0, atol=1e-13)
        grad = torch.randn_like(want)
        assert torch.allclose(*(torch.autograd.grad(y, x, grad)[0] for y in (got, want)), rtol=0, atol=1e-13)
        x = x.detach().float().contiguous(memory_format=torch.channels_last)
        assert models.resize(x, size).is_contiguous(memory_format=torch.channels_last)
    # and take(), which cuts the state carried to later exits in real early exit
    x = torch.randn(5, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    kept = models.take([x, [x]], torch.tensor([4, 1]))
    assert all(t.is_contiguous(memory_format=torch.channels_last) and torch.equal(t, x[[4, 1]]) for t in (kept[0], kept[1][0]))


def test_ranet_only_cifar_sized_images():
    with pytest.raises(ValueError, match="image_size 224"):
        models.build_model("ranet", 10, 6, image_size=224)


def test_the_sizes_the_input_check_skips_fit_and_it_judges_the_others():
    # check_input_size skips 32 and 224: each variant takes them (shapes only, on the meta device)
    with torch.device("meta"):
        for arch, exits, size in (("msdnet", 2, 32), ("msdnet", 2, 224), ("ranet", 6, 32), ("ranet", 8, 32)):
            logits = models.build_model(arch, 10, exits, size).eval()(torch.zeros(1, 3, size, size))
            assert [tuple(z.shape) for z in logits] == [(1, 10)] * exits
    models.check_input_size("msdnet", 3, 160)   # other sizes are run: 160 fits, 64 does not
    with pytest.raises(ValueError, match="cannot reduce 64x64 images"):
        models.check_input_size("msdnet", 3, 64)


@pytest.mark.parametrize("exits, meta_grad", [(6, "higher"), (8, "jvp")])   # jvp = higher: tested below
def test_ranet_trains_through_train_step_on_the_synthetic_set(exits, meta_grad):
    torch.manual_seed(0)
    cfg = small_cfg(arch="ranet", exits=exits, batch_size=4, meta_grad=meta_grad)
    model, wpn, optimizer, wpn_optimizer, _ = l2w.build(cfg, 10, torch.device("cpu"))
    images, labels = data.synthetic(4, seed=0)[0].tensors
    before = copy.deepcopy((model.state_dict(), wpn.state_dict()))
    out = l2w.train_step(model, wpn, optimizer, wpn_optimizer, images, labels, cfg)
    assert math.isfinite(out["loss"]) and math.isfinite(out["meta_loss"])
    changed = [not torch.equal(v, before[0][k]) for k, v in model.state_dict().items() if "num_batches" not in k]
    assert all(changed)                       # every parameter and BN statistic was updated
    assert all(not torch.equal(v, before[1][k]) for k, v in wpn.state_dict().items())


@pytest.mark.parametrize("exits", [6])   # C-2 (8 exits): train_step and early exit above, costs below
def test_ranet_cli_run_writes_results_json(tmp_path, exits):
    out = tmp_path / f"ranet{exits}"
    # the baseline: RANet's L2W-DEN iteration is tested through train_step above
    result = cli("--dataset", "synthetic", "--arch", "ranet", "--exits", str(exits), "--epochs", "1",
                 "--synthetic-size", "22", "--holdout", "6", "--batch-size", "8", "--method", "baseline",
                 "--out", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    flops, params = models.count_cost(models.build_model("ranet", 10, exits), 32)
    assert [r["flops"] for r in results["anytime"]] == flops and [r["params"] for r in results["anytime"]] == params
    assert len(results["dynamic"]) == 39 and results["config"]["arch"] == "ranet"


# ----------------------------------------------------------------------------
# The authors' released weights (MSDNet-PyTorch / L2W-DEN checkpoints)
# ----------------------------------------------------------------------------

def released_keys(exits, imagenet, step=4, base=4):
    """The state_dict keys MSDNet-PyTorch's model code (models/msdnet.py) gives an MSDNet, in its
    registration order, following its builder: blocks of `steps` MSDNLayers ('max' pruning,
    interval ceil(layers / scales)), a transition (ParallelModule `m`) after each layer that drops
    a scale, the first layer as module 0 of block 0; then all classifiers. Written from their
    module tree, not from models.py."""
    n_scales = 4 if imagenet else 3
    steps = [base] + [step] * (exits - 1) if imagenet else [1 + b for b in range(exits)]   # even / lin_grow
    bn = lambda p: [f"{p}.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    basic = lambda p: [f"{p}.net.0.weight"] + bn(f"{p}.net.1")                            # ConvBasic
    conv_bn = lambda p: [f"{p}.net.0.weight"] + bn(f"{p}.net.1") + [f"{p}.net.3.weight"] + bn(f"{p}.net.4")
    keys, heads, layer, interval = [], [], 0, math.ceil(sum(steps) / n_scales)
    for b, n_layers in enumerate(steps):
        i = 0
        if b == 0:   # MSDNFirstLayer; ImageNet's scale 0 is a bare Sequential(conv with bias, BN, ReLU, max pool)
            keys += (["blocks.0.0.layers.0.0.weight", "blocks.0.0.layers.0.0.bias"] + bn("blocks.0.0.layers.0.1")
                     if imagenet else basic("blocks.0.0.layers.0"))
            keys += [k for s in range(1, n_scales) for k in basic(f"blocks.0.0.layers.{s}")]
            i = 1
        for _ in range(n_layers):
            layer += 1
            in_scales = n_scales - max(0, layer - 2) // interval
            out_scales = n_scales - (layer - 1) // interval
            for j in range(out_scales):   # ConvNormal for the finest kept scale unless one is discarded
                if j > 0 or in_scales > out_scales:
                    keys += conv_bn(f"blocks.{b}.{i}.layers.{j}.conv_down")
                keys += conv_bn(f"blocks.{b}.{i}.layers.{j}.conv_normal")
            i += 1
            if in_scales > out_scales:
                keys += [k for j in range(out_scales) for k in basic(f"blocks.{b}.{i}.m.{j}")]
                i += 1
        heads += basic(f"classifier.{b}.m.0") + basic(f"classifier.{b}.m.1")
        heads += [f"classifier.{b}.linear.weight", f"classifier.{b}.linear.bias"]
    return keys + heads   # `blocks` is registered before `classifier`


def released_checkpoint(model, path, imagenet, step=4, prefix="", wpn=None, base=4):
    """Write `model` as MSDNet-PyTorch saves it (with L2W-DEN's meta_state_dict for `wpn`)."""
    values = list(model.state_dict().values())
    keys = released_keys(len(model.exits), imagenet, step, base)
    assert len(keys) == len(values)
    checkpoint = {"state_dict": {prefix + k: v for k, v in zip(keys, values)}, "epoch": 100, "arch": "msdnet",
                  "best_prec1": 73.93, "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "params": [0]}]}}
    if wpn is not None:
        linears = [m for m in wpn.modules() if isinstance(m, torch.nn.Linear)]
        names = (["first_hidden_layer.fc"] + [f"rest_hidden_layers.{i}.fc" for i in range(len(linears) - 2)]
                 + ["output_layer"])
        checkpoint["meta_state_dict"] = {f"{n}.{p}": getattr(m, p).detach().clone()
                                         for n, m in zip(names, linears) for p in ("weight", "bias")}
        checkpoint["meta_optimizer"] = {"state": {}, "param_groups": []}
    torch.save(checkpoint, path)


def randomise_bn_statistics(model, seed):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.mark.parametrize("classes,exits,imagenet,step,base,prefix,with_wpn", [
    (10, 3, False, None, None, "", True), (100, 5, False, None, None, "module.", False),
    (1000, 2, True, 4, None, "", True), (100, 3, True, 6, None, "module.", False), (10, 2, True, 7, 7, "module.", False)])
def test_released_checkpoints_load_and_give_the_same_logits(tmp_path, classes, exits, imagenet, step, base, prefix,
                                                           with_wpn):
    size = 160 if imagenet else 32   # the ImageNet network on fewer pixels: its weights do not depend on it
    torch.manual_seed(0)
    source = models.build_model("msdnet", classes, exits, size, step, base=base)
    randomise_bn_statistics(source, 0)
    source_wpn = l2w.WPN(exits, 2 if with_wpn else 1, 7)
    path = tmp_path / "released.pth.tar"
    released_checkpoint(source, path, imagenet, step or 4, prefix, source_wpn if with_wpn else None, base or 4)
    torch.manual_seed(1)
    target, target_wpn = models.build_model("msdnet", classes, exits, size, step, base=base), l2w.WPN(exits, 2, 7)
    info = models.load_released(target, path, target_wpn)
    assert info == {"epoch": 100, "arch": "msdnet", "best_prec1": 73.93, "wpn": with_wpn}
    x, losses = torch.randn(1, 3, size, size), torch.rand(4, exits)
    with torch.no_grad():
        for theirs, ours in zip(source.eval()(x), target.eval()(x), strict=True):
            assert torch.equal(theirs, ours)
        assert torch.equal(source_wpn(losses), target_wpn(losses)) == with_wpn


@pytest.mark.parametrize("built,message", [
    (("msdnet", 10, 4, 32, None), "exits 3 in the file, 4 here"),
    (("msdnet", 100, 3, 32, None), "classes 10 in the file, 100 here"),
    (("msdnet", 10, 3, 224, 4), "image size CIFAR in the file, ImageNet here"),
    (("ranet", 10, 6, 32, None), "released checkpoints are MSDNets; this model is a RANet")])
def test_released_checkpoint_that_does_not_fit_names_what_differs(tmp_path, built, message):
    path = tmp_path / "released.pth.tar"
    released_checkpoint(models.build_model("msdnet", 10, 3), path, imagenet=False)
    with pytest.raises(ValueError) as error:
        models.load_released(models.build_model(*built), path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_released_imagenet_checkpoint_of_another_step_names_the_step(tmp_path):
    path = tmp_path / "released.pth.tar"
    released_checkpoint(models.build_model("msdnet", 1000, 2, 224, 6), path, imagenet=True, step=6)
    with pytest.raises(ValueError, match=r"does not fit this MSDNet: step \(layers in block 2\) 6 in the file, 4 here$"):
        models.load_released(models.build_model("msdnet", 1000, 2, 224, 4), path)
    # MSDNet-PyTorch's released step-7 model has 7 layers in its first block as well
    released_checkpoint(models.build_model("msdnet", 1000, 2, 224, 7, base=7), path, imagenet=True, step=7, base=7)
    with pytest.raises(ValueError, match=r"does not fit this MSDNet: base \(layers in block 1\) 7 in the file, "
                                         r"4 here$"):
        models.load_released(models.build_model("msdnet", 1000, 2, 224, 7), path)
    wpn_path = tmp_path / "wpn.pth.tar"
    released_checkpoint(models.build_model("msdnet", 10, 3), wpn_path, imagenet=False, wpn=l2w.WPN(3, 1, 500))
    with pytest.raises(ValueError, match=r"its WPN \(depth 1, width 500, exits 3\) does not fit this one "
                                         r"\(depth 1, width 100, exits 3\)"):
        models.load_released(models.build_model("msdnet", 10, 3), wpn_path, l2w.WPN(3, 1, 100))


def test_a_file_without_state_dict_is_no_released_checkpoint(tmp_path):
    path = tmp_path / "ours.pt"
    torch.save({"model": models.build_model("msdnet", 10, 3).state_dict(), "epoch": 1}, path)   # l2w.py's layout
    with pytest.raises(ValueError, match="has no 'state_dict': not a checkpoint of MSDNet-PyTorch or L2W-DEN"):
        models.load_released(models.build_model("msdnet", 10, 3), path)


def test_cli_weights_evaluates_a_released_checkpoint_and_refuses_one_that_does_not_fit(tmp_path):
    torch.manual_seed(0)
    source = models.build_model("msdnet", 10, 3)
    randomise_bn_statistics(source, 0)
    path = tmp_path / "released.pth.tar"
    released_checkpoint(source, path, imagenet=False, prefix="module.", wpn=l2w.WPN(3, 1, 500))
    args = ["--dataset", "synthetic", "--exits", "3", "--synthetic-size", "300", "--holdout", "60", "--device", "cpu"]
    result = cli(*args, "--eval-only", "--weights", str(path), "--out", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr
    assert "and its WPN" in result.stdout
    # the anytime table is the source network's own accuracy on the test split
    test = data.load(small_cfg()).test
    images = torch.stack([test[i][0] for i in range(len(test))])
    labels = torch.tensor([test[i][1] for i in range(len(test))])
    with torch.no_grad():
        expected = [l2w.topk_accuracy(z, labels, 1) for z in source.eval()(images)]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [r["acc1"] for r in results["anytime"]] == pytest.approx(expected, abs=1e-9)
    for flags, message in [(["--exits", "4"], "does not fit this MSDNet: exits 3 in the file, 4 here"),
                           (["--wpn-width", "100"], "its WPN (depth 1, width 500, exits 3) does not fit"),
                           (["--resume", str(path)], "give one of them"),
                           (["--arch", "ranet", "--exits", "6"], "this model is a RANet")]:   # no hint: none helps
        bad = cli(*args, "--eval-only", "--weights", str(path), *flags, "--out", str(tmp_path / "bad"))
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and message in lines[0], bad.stderr
    assert lines[0].endswith("released checkpoints are MSDNets; this model is a RANet"), lines


# ----------------------------------------------------------------------------
# The method: weights, meta objective, one iteration
# ----------------------------------------------------------------------------

def test_weight_constraints_hand_worked():
    g = torch.tensor([[1.0, -1.0], [0.5, 0.5]])
    assert torch.allclose(l2w.sample_weights(g, 0.5, "col"), torch.tensor([[1.5, 0.5], [1.0, 1.0]]))
    assert torch.allclose(l2w.sample_weights(g, 0.5, "row"), torch.tensor([[1.125, 0.625], [0.875, 1.375]]))
    assert torch.allclose(l2w.sample_weights(g, 0.5, "mat"), torch.tensor([[1.375, 0.375], [1.125, 1.125]]))
    g = torch.rand(16, 5) * 2 - 1
    assert torch.allclose(l2w.sample_weights(g, 0.8, "col").mean(dim=1), torch.ones(16))
    assert torch.allclose(l2w.sample_weights(g, 0.8, "row").mean(dim=0), torch.ones(5))
    assert torch.allclose(l2w.sample_weights(g, 0.8, "mat").mean(), torch.tensor(1.0))


def test_wpn_is_the_papers_mlp():
    # d hidden ReLU layers of width w, K outputs, tanh (README, "What the method does", step 2), written out by hand
    wpn = l2w.WPN(5, depth=2, width=7).double()
    (w1, b1), (w2, b2), (w3, b3) = [(m.weight, m.bias) for m in wpn.modules() if isinstance(m, torch.nn.Linear)]
    assert (w1.shape, w2.shape, w3.shape) == ((7, 5), (7, 7), (5, 7))
    losses = torch.rand(4, 5, dtype=torch.float64) * 10
    by_hand = torch.tanh(torch.relu(torch.relu(losses @ w1.T + b1) @ w2.T + b2) @ w3.T + b3)
    assert torch.allclose(wpn(losses), by_hand, rtol=1e-12, atol=0)
    assert len(list(l2w.WPN(3, depth=0).parameters())) == 2   # d = 0: a linear map and tanh


def test_meta_exit_assignment_hand_worked():
    confidence = torch.tensor([[0.9, 0.8, 0.3, 0.2, 0.1],
                               [0.1, 0.9, 0.8, 0.2, 0.7],
                               [0.5, 0.5, 0.5, 0.5, 0.5]])
    # n=5, fractions (0.4, 0.4, 0.2): exit 0 takes 2 (samples 0, 1), exit 1 takes 2 of the rest
    # by its own confidence (samples 2, 4), the last exit gets sample 3.
    fractions = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)
    exit_of = l2w.exit_with_thresholds(confidence, l2w.fit_thresholds(confidence, fractions))
    assert exit_of.tolist() == [0, 0, 1, 2, 1]


def test_meta_objective_takes_exactly_floor_n_f_k_per_exit_even_when_confidences_tie():
    # Late in training softmax saturates at exactly 1.0 in fp32: a threshold (>=) would send every
    # tied sample to exit 1. The released code sorts and slices: floor(n f_k) per exit, no more.
    n, exits, q = 10, 3, 1.0
    logits = [torch.full((n, 4), -200.0) for _ in range(exits)]
    for z in logits:
        z[:, 0] = 200.0                                   # every sample certain at every exit
    confidence = l2w.confidences(logits)
    assert bool((confidence == 1.0).all())
    exit_of = l2w.meta_exit_assignment(confidence, l2w.exit_fractions(q, exits))
    assert torch.bincount(exit_of, minlength=exits).tolist() == [3, 3, 4]   # floor(10/3), floor(10/3), rest
    assert exit_of.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]               # ties: lower index first
    targets = torch.randint(4, (n,))
    logits = [z.clone().requires_grad_() for z in logits]
    assert l2w.meta_loss_fn(logits, targets, q).item() == pytest.approx(reference_meta_loss(logits, targets, q).item())
    # partial ties: two samples tie for the last place of exit 0; exactly one of them gets it
    confidence = torch.tensor([[0.9, 0.5, 0.5, 0.1], [0.2, 0.3, 0.4, 0.9]])
    assert l2w.meta_exit_assignment(confidence, torch.tensor([0.5, 0.5], dtype=torch.float64)).tolist() == [0, 0, 1, 1]


def reference_meta_loss(logits, targets, q):
    """Step 4 of the released algorithm (README, "What the method does"), as a plain loop over Python lists."""
    n, exits = targets.numel(), len(logits)
    fractions = [q ** k / sum(q ** j for j in range(1, exits + 1)) for k in range(1, exits + 1)]
    confidence = [z.detach().softmax(1).max(1).values.tolist() for z in logits]
    free, members = list(range(n)), []
    for k in range(exits - 1):
        chosen = sorted(free, key=lambda i: -confidence[k][i])[:math.floor(n * fractions[k])]
        members.append(chosen)
        free = [i for i in free if i not in chosen]
    members.append(free)
    return sum(F.cross_entropy(z[idx], targets[idx]) for z, idx in zip(logits, members) if idx)


def reference_ce_losses(model, state, images, targets, cfg):
    logits = functional_call(model, state, (images,))
    return torch.stack([F.cross_entropy(z, targets, reduction="none") for z in logits], 1)


def reference_virtual_meta_loss(model, wpn_params, wpn, optimizer, images, targets, meta_images,
                                meta_targets, cfg, exit_losses=reference_ce_losses):
    """Meta loss after a virtual SGD step, built with torch.func and the SGD formula by hand
    (no `higher`): theta' = theta - lr * (momentum * buf + grad + wd * theta). Only parameters
    that require gradients move (IMTA's second phase freezes the others)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    losses = exit_losses(model, {**params, **buffers}, images, targets, cfg)
    g = functional_call(wpn, wpn_params, (losses.detach(),))
    weights = 1 + cfg.delta * (g - g.mean(dim=1, keepdim=True))      # 'col'
    grads = torch.autograd.grad((weights * losses).mean(0).sum(), list(params.values()), create_graph=True)
    group = optimizer.param_groups[0]
    virtual = {}
    for (name, p), grad in zip(params.items(), grads):
        d = grad + group["weight_decay"] * p
        buf = optimizer.state[p].get("momentum_buffer")
        virtual[name] = p - group["lr"] * (d if buf is None else group["momentum"] * buf + d)
    meta_logits = functional_call(model, {**virtual, **{n: b.clone() for n, b in model.named_buffers()}},
                                  (meta_images,))
    return reference_meta_loss(meta_logits, meta_targets, cfg.q)


def reference_train_step(model, wpn, optimizer, wpn_optimizer, images, targets, cfg):
    """One iteration (README, "What the method does") built independently of l2w.py's half_step,
    with the meta-gradient from torch.func."""
    halves = list(zip(images.chunk(2), targets.chunk(2)))
    for (x, y), (xm, ym) in (halves, halves[::-1]):
        wpn_params = dict(wpn.named_parameters())
        meta = reference_virtual_meta_loss(model, wpn_params, wpn, optimizer, x, y, xm, ym, cfg)
        for p, g in zip(wpn_params.values(), torch.autograd.grad(meta, list(wpn_params.values()))):
            p.grad = g
        wpn_optimizer.step()
        losses = torch.stack([F.cross_entropy(z, y, reduction="none") for z in model(x)], 1)
        with torch.no_grad():
            g = wpn(losses)
            weights = 1 + cfg.delta * (g - g.mean(dim=1, keepdim=True))
        optimizer.zero_grad()
        (weights * losses).mean(0).sum().backward()
        optimizer.step()


def double_setup(seed=0, batch=8, exits=3, lr=0.5, **overrides):
    """A float64 MSDNet, WPN and optimizers with momentum buffers already filled."""
    torch.manual_seed(seed)
    cfg = small_cfg(exits=exits, lr=lr, batch_size=batch, **overrides)
    model, wpn, optimizer, wpn_optimizer, _ = l2w.build(cfg, 10, torch.device("cpu"))
    model.double()
    wpn.double()
    images = torch.randn(batch, 3, 32, 32, dtype=torch.float64)
    targets = torch.randint(10, (batch,))
    l2w.train_step(model, wpn, optimizer, wpn_optimizer, images.flip(0), targets.flip(0), cfg,
                   **l2w.method_options(cfg, torch.device("cpu")))
    return cfg, model, wpn, optimizer, wpn_optimizer, images, targets


def state_of(model, wpn, optimizer):
    momentum = [optimizer.state[p]["momentum_buffer"] for p in model.parameters()
                if "momentum_buffer" in optimizer.state.get(p, {})]
    return list(model.state_dict().values()) + list(wpn.state_dict().values()) + momentum


@pytest.mark.parametrize("meta_grad", ["higher", "jvp"])
def test_train_step_matches_independent_torch_func_computation(meta_grad):
    cfg, model, wpn, optimizer, wpn_optimizer, images, targets = double_setup()
    cfg = dataclasses.replace(cfg, meta_grad=meta_grad)
    ref = copy.deepcopy((model, wpn, optimizer, wpn_optimizer))   # one deepcopy keeps optimizer links
    recorded = []
    step = wpn_optimizer.step
    wpn_optimizer.step = lambda: (recorded.append([p.grad.clone() for p in wpn.parameters()]), step())[1]
    out = l2w.train_step(model, wpn, optimizer, wpn_optimizer, images, targets, cfg)
    assert out["meta_loss"] is not None and len(recorded) == 2

    # the first half's meta-gradient, independently
    rmodel, rwpn, ropt, rwopt = ref
    x, xm = images.chunk(2)
    y, ym = targets.chunk(2)
    wpn_params = dict(rwpn.named_parameters())
    meta = reference_virtual_meta_loss(rmodel, wpn_params, rwpn, ropt, x, y, xm, ym, cfg)
    expected = torch.autograd.grad(meta, list(wpn_params.values()))
    for got, want in zip(recorded[0], expected):
        assert torch.allclose(got, want, rtol=1e-8, atol=1e-12)
    assert max(g.abs().max() for g in expected) > 1e-6   # the gradient is not trivially zero

    # the whole iteration: parameters, BN statistics, momentum buffers, WPN
    ref = copy.deepcopy(ref)
    reference_train_step(*ref, images, targets, cfg)
    for got, want in zip(state_of(model, wpn, optimizer), state_of(*ref[:3])):
        assert torch.allclose(got.double(), want.double(), rtol=1e-8, atol=1e-10)


class Reverse(torch.autograd.Function):
    """Gradient reversal, with a backward and no forward-mode rule."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return -grad


class OwnNetwork(torch.nn.Module):
    """A user's own two-exit network, not from models.py: a residual added in place (torchvision's
    ResNet idiom), in-place LeakyReLU, SiLU and Hardswish, dropout, BatchNorm and GroupNorm, a
    layer the forward skips, and a tuple of logits, cheapest exit first."""

    def __init__(self, dropout=0.0, classes=5):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8),
                                   nn.LeakyReLU(0.1, inplace=True), nn.Conv2d(8, 8, 3, padding=1))
        self.act, self.drop = nn.SiLU(inplace=True), nn.Dropout(dropout)
        self.head1 = nn.Linear(8, classes)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16),
                                  nn.Hardswish(inplace=True))
        self.head2 = nn.Linear(16, classes)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        x = self.stem(x)
        out = self.block(x)
        out += x
        out = self.act(out)
        z1 = self.head1(self.drop(out.mean((2, 3))))
        return z1, self.head2(self.drop(self.down(out).mean((2, 3))))


def own_network_setup(dropout=0.0, dtype=torch.float32, seed=0, constraint="col", meta_grad="higher",
                      wpn_class=l2w.WPN):
    torch.manual_seed(seed)
    model = OwnNetwork(dropout).to(dtype)
    wpn = wpn_class(2, 1, 16).to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-4)
    wpn_optimizer = torch.optim.Adam(wpn.parameters(), lr=1e-3)
    knobs = types.SimpleNamespace(method="l2w", delta=0.8, constraint=constraint, q=0.75, meta_grad=meta_grad)
    images, targets = torch.randn(8, 3, 8, 8, dtype=dtype), torch.randint(5, (8,))
    return knobs, model, wpn, optimizer, wpn_optimizer, images, targets


def method_section_source():
    text = open(os.path.join(HERE, "l2w.py")).read()
    start = text.index("# The method")
    start = text.rindex("# ====", 0, start)
    end = text.index("# ====", text.index("\n", text.index("# ====", start + 10)) + 1)
    return text[start:end]


@pytest.mark.parametrize("meta_grad", ["higher", "jvp"])
def test_the_method_section_copied_alone_trains_a_users_network_as_l2w_does(meta_grad):
    # What a user copies: the section from its banner to the next, run in a namespace holding
    # nothing but what it imports itself (the standard library, torch, higher).
    source = method_section_source()
    imported = {name.split(".")[0] for node in ast.walk(ast.parse(source))
                for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else
                             [node.module] if isinstance(node, ast.ImportFrom) else [])}
    assert imported <= set(sys.stdlib_module_names) | {"torch", "higher"}, imported
    copied = {"__name__": "copied"}
    exec(compile(source, "copied_method.py", "exec"), copied)
    runs = []
    for train_step, wpn_class in ((copied["train_step"], copied["WPN"]), (l2w.train_step, l2w.WPN)):
        knobs, model, wpn, optimizer, wpn_optimizer, images, targets = own_network_setup(
            dropout=0.2, meta_grad=meta_grad, wpn_class=wpn_class)
        torch.manual_seed(1)
        outs = [train_step(model, wpn, optimizer, wpn_optimizer, images, targets, knobs) for _ in range(2)]
        runs.append((outs, state_of(model, wpn, optimizer)))
    (copied_outs, copied_state), (l2w_outs, l2w_state) = runs
    assert copied_outs == l2w_outs and copied_outs[0]["meta_loss"] is not None
    assert all(torch.equal(a, b) for a, b in zip(copied_state, l2w_state))


def with_knobs(cfg, **knobs):
    """A Config or SimpleNamespace of knobs with some replaced."""
    return dataclasses.replace(cfg, **knobs) if dataclasses.is_dataclass(cfg) else types.SimpleNamespace(**{**vars(cfg), **knobs})


JVP_SETUPS = {
    "own network": lambda: own_network_setup(dtype=torch.float64),
    "own network with dropout": lambda: own_network_setup(dropout=0.3, dtype=torch.float64),
    "msdnet col": lambda: double_setup(seed=5),
    "msdnet row": lambda: double_setup(seed=5, constraint="row"),
    "msdnet mat": lambda: double_setup(seed=5, constraint="mat"),
    "ranet": lambda: double_setup(seed=5, batch=4, arch="ranet", exits=6),
    "imta pretrain": lambda: double_setup(seed=5, imta="pretrain"),
    "imta finetune": lambda: double_setup(seed=6, imta="finetune"),
}


# the first iteration's virtual step (SGD without momentum buffers) on networks of every kind
WITHOUT_MOMENTUM_TOO = ("own network", "own network with dropout", "msdnet col", "imta finetune")


@pytest.mark.parametrize("name", JVP_SETUPS)
def test_jvp_meta_gradient_iteration_equals_higher(name):
    # The first-order path (one backward at theta', one forward-mode JVP) takes the same whole
    # iteration as the second-order one (float64), with momentum buffers and, on the first
    # iteration (WITHOUT_MOMENTUM_TOO), without; with dropout too, since the JVP replays step 1's
    # random draws and the random stream then goes on as with `higher`.
    cfg, model, wpn, optimizer, wpn_optimizer, images, targets = JVP_SETUPS[name]()
    options = l2w.method_options(cfg, torch.device("cpu")) if isinstance(cfg, l2w.Config) else {}
    setups = [(model, wpn, optimizer, wpn_optimizer)]
    if name in WITHOUT_MOMENTUM_TOO:   # as on the first iteration: no momentum buffers yet
        setups.append(copy.deepcopy(setups[0]))
        setups[1][2].state.clear()
    for setup in setups:
        jvp = copy.deepcopy(setup)
        before = [t.clone() for t in setup[1].state_dict().values()]
        torch.manual_seed(2)
        l2w.train_step(*setup, images, targets, with_knobs(cfg, meta_grad="higher"), **options)
        higher_draw = torch.rand(1)
        torch.manual_seed(2)
        l2w.train_step(*jvp, images, targets, with_knobs(cfg, meta_grad="jvp"), **options)
        assert torch.equal(torch.rand(1), higher_draw)   # the stream continues as with higher
        assert all(not torch.equal(a, b) for a, b in zip(setup[1].state_dict().values(), before))   # the WPN moved
        for got, want in zip(state_of(*jvp[:3]), state_of(*setup[:3]), strict=True):
            assert torch.allclose(got.double(), want.double(), rtol=1e-9, atol=1e-12)


def test_jvp_without_replaying_the_draws_would_differ_with_dropout(monkeypatch):
    # The dropout case above can fail: a JVP forward with draws other than step 1's gives another
    # meta-gradient.
    cfg, *setup, images, targets = own_network_setup(dropout=0.3, dtype=torch.float64, meta_grad="jvp")
    runs = []
    for other_draws in (False, True):
        if other_draws:
            monkeypatch.setattr(l2w, "random_state", lambda device: (device, torch.Generator().manual_seed(7).get_state(), None))
        model, wpn, optimizer, wpn_optimizer = copy.deepcopy(setup)
        torch.manual_seed(2)
        l2w.train_step(model, wpn, optimizer, wpn_optimizer, images, targets, cfg)
        runs.append(list(wpn.parameters()))
    assert not all(torch.allclose(a, b, rtol=1e-6) for a, b in zip(*runs))


def test_readme_own_project_example_runs_and_the_readme_stays_for_users(capsys):
    readme = open(os.path.join(HERE, "README.md")).read()
    example = readme.split("<!-- begin own-project example -->\n```python\n")[1].split("```")[0]
    exec(compile(example, "README example", "exec"), {"__name__": "example"})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and all(math.isfinite(float(line.split()[-1])) for line in printed)
    assert len(readme.splitlines()) <= 350 and "## Using the method in your own project" in readme
    for name in ("README.md", "l2w.py", "models.py", "data.py", "test_l2w.py", "run.sh"):
        assert "PAPER" ".md" not in open(os.path.join(HERE, name)).read(), name


@pytest.mark.parametrize("misuse, error", [
    (dict(knobs=dict(method="L2W")), "unknown method 'L2W' (choose l2w, baseline)"),
    (dict(knobs=dict(method="l2w-den")), "unknown method 'l2w-den'"),
    (dict(knobs=dict(meta_grad="JVP")), "unknown meta_grad 'JVP' (choose higher, jvp)"),
    (dict(knobs=dict(meta_grad="first-order")), "unknown meta_grad 'first-order'"),
    (dict(knobs=dict(constraint="column")), "unknown constraint 'column' (choose col, row, mat)"),
    (dict(adam=True), "needs torch.optim.SGD, got Adam (use 'higher')"),
    (dict(frozen_out=True), "the optimizer does not hold head2.weight and 1 more"),
    (dict(forward=lambda z: z[1]), r"per-exit logits.*got a tensor of shape \(4, 5\)"),
    (dict(forward=lambda z: {"exit1": z[0]}), "per-exit logits.*got dict"),
    (dict(forward=lambda z: (Reverse.apply(z[0]), z[1]), jvp=True), "forward-mode AD .* use meta_grad 'higher'"),
    (dict(frozen_in=True), "meta_grad 'higher': the optimizer holds 1 frozen parameter(s) too (leave them out, or use meta_grad 'jvp')"),
    (dict(maximize=True), "maximize=True"),
    (dict(q=0.0), "q must be a finite number > 0 and delta one >= 0, got q 0.0 and delta 0.8"),
])
def test_the_api_refuses_what_it_cannot_do_in_one_line(misuse, error):
    knobs, model, wpn, optimizer, wpn_optimizer, images, targets = own_network_setup()
    knobs = types.SimpleNamespace(**{**vars(knobs), **misuse.get("knobs", {})})
    if "knobs" in misuse:   # the Config refuses on construction, train_step on use
        with pytest.raises(ValueError, match=re.escape(error)):
            l2w.Config(**misuse["knobs"])
    if misuse.get("adam"):   # `higher` can take the virtual step with Adam, `jvp` cannot
        optimizer, knobs.meta_grad = torch.optim.Adam(model.parameters()), "jvp"
    if misuse.get("frozen_out"):   # the head of exit 2 trains but is not in the optimizer
        optimizer = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("head2")], lr=0.1)
    if misuse.get("frozen_in"):   # frozen after the optimizer took it: `higher` cannot step it
        model.head2.bias.requires_grad_(False)
    if misuse.get("maximize"):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, maximize=True)
    if misuse.get("jvp"):
        knobs.meta_grad = "jvp"
    if "q" in misuse:
        knobs.q = misuse["q"]
    if "forward" in misuse:
        forward = model.forward
        model.forward = lambda x: misuse["forward"](forward(x))
    with pytest.raises((ValueError, TypeError, NotImplementedError)) as raised:
        l2w.train_step(model, wpn, optimizer, wpn_optimizer, images, targets, knobs)
    message = str(raised.value)
    assert re.search(error if "forward" in misuse else re.escape(error), message)
    assert "\n" not in message and "tensor(" not in message


@pytest.mark.parametrize("options", [dict(momentum=0.0), dict(momentum=0.9, dampening=0.3),
                                     dict(momentum=0.9, nesterov=True), dict(momentum=0.9, dampening=0.2)])
def test_virtual_sgd_step_is_torch_sgd_and_its_slope(options):
    # theta' must be exactly what torch.optim.SGD would do (with and without a momentum buffer, two
    # param groups with their own lr), and theta' must be affine in g with slope -a.
    torch.manual_seed(0)
    params = [torch.randn(3, 2, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    optimizer = torch.optim.SGD([{"params": params[:2], "lr": 0.3}, {"params": params[2:], "lr": 0.05}],
                                weight_decay=1e-2, **options)
    for warm_up in (False, True):
        if warm_up:                            # fill the momentum buffers with one real step
            for p in params:
                p.grad = torch.randn_like(p)
            optimizer.step()
        grads = [torch.randn_like(p) for p in params]
        with torch.no_grad():
            theta_virtual, slopes = l2w.virtual_sgd_step(optimizer, params, grads)
            shifted, _ = l2w.virtual_sgd_step(optimizer, params, [g + 1 for g in grads])
        real = copy.deepcopy((params, optimizer))
        for p, g in zip(real[0], grads):
            p.grad = g.clone()
        real[1].step()
        for p, virtual, moved, a in zip(real[0], theta_virtual, shifted, slopes):
            assert torch.allclose(virtual, p, rtol=1e-12, atol=1e-14)
            assert torch.allclose(virtual - moved, torch.full_like(p, a), rtol=1e-9)


def test_meta_gradient_matches_finite_differences():
    cfg, model, wpn, optimizer, wpn_optimizer, images, targets = double_setup(seed=1)
    x, xm = images.chunk(2)
    y, ym = targets.chunk(2)
    recorded = []
    step = wpn_optimizer.step
    wpn_optimizer.step = lambda: (recorded.append([p.grad.clone() for p in wpn.parameters()]), step())[1]
    snapshot = copy.deepcopy((model, wpn, optimizer))
    l2w.train_step(model, wpn, optimizer, wpn_optimizer, images, targets, cfg)

    rmodel, rwpn, ropt = snapshot
    names = [n for n, _ in rwpn.named_parameters()]
    last_bias = names.index("net.2.bias")
    eps = 1e-6
    for j in range(cfg.exits):
        losses = []
        for sign in (1, -1):
            params = {n: p.detach().clone() for n, p in rwpn.named_parameters()}
            params["net.2.bias"][j] += sign * eps
            losses.append(reference_virtual_meta_loss(rmodel, params, rwpn, ropt, x, y, xm, ym, cfg).item())
        finite_difference = (losses[0] - losses[1]) / (2 * eps)
        assert finite_difference == pytest.approx(recorded[0][last_bias][j].item(), rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("meta_grad", ["higher", "jvp"])
def test_virtual_step_leaves_model_optimizer_and_bn_untouched(meta_grad):
    # With delta = 0 every weight is 1 whatever the WPN says, so an L2W iteration must end in
    # exactly the state of a baseline iteration -- unless the virtual step leaked into the real
    # parameters, momentum buffers or BatchNorm running statistics.
    cfg, model, wpn, optimizer, wpn_optimizer, images, targets = double_setup(seed=2)
    base = copy.deepcopy((model, wpn, optimizer, wpn_optimizer))
    l2w.train_step(model, wpn, optimizer, wpn_optimizer, images, targets,
                   dataclasses.replace(cfg, delta=0.0, meta_grad=meta_grad))
    l2w.train_step(*base, images, targets, dataclasses.replace(cfg, method="baseline"))
    for got, want in zip(list(model.state_dict().values()) + [optimizer.state[p]["momentum_buffer"] for p in model.parameters()],
                         list(base[0].state_dict().values()) + [base[2].state[p]["momentum_buffer"] for p in base[0].parameters()]):
        assert torch.equal(got, want)
    assert any(not torch.equal(a, b) for a, b in zip(wpn.parameters(), base[1].parameters()))


def test_baseline_equals_plain_multi_exit_training():
    cfg, model, wpn, optimizer, wpn_optimizer, images, targets = double_setup(seed=3)
    plain_model = copy.deepcopy(model)
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    plain_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))   # load_state_dict aliases tensors
    wpn_before = copy.deepcopy(wpn.state_dict())
    l2w.train_step(model, wpn, optimizer, wpn_optimizer, images, targets, dataclasses.replace(cfg, method="baseline"))
    for x, y in zip(images.chunk(2), targets.chunk(2)):   # plain training: sum over exits of the mean CE
        plain_opt.zero_grad()
        sum(F.cross_entropy(z, y) for z in plain_model(x)).backward()
        plain_opt.step()
    for got, want in zip(model.state_dict().values(), plain_model.state_dict().values()):
        assert torch.allclose(got.double(), want.double(), rtol=1e-10, atol=1e-12)
    assert all(torch.equal(wpn.state_dict()[k], v) for k, v in wpn_before.items())


def test_meta_interval_weights_without_updating_the_wpn():
    cfg, model, wpn, optimizer, wpn_optimizer, images, targets = double_setup(seed=4)
    ref_model, ref_opt = copy.deepcopy((model, optimizer))
    wpn_before = copy.deepcopy(wpn.state_dict())
    out = l2w.train_step(model, wpn, optimizer, wpn_optimizer, images, targets, cfg, meta=False)
    assert out["meta_loss"] is None
    assert all(torch.equal(wpn.state_dict()[k], v) for k, v in wpn_before.items())
    for x, y in zip(images.chunk(2), targets.chunk(2)):
        losses = torch.stack([F.cross_entropy(z, y, reduction="none") for z in ref_model(x)], 1)
        with torch.no_grad():
            g = wpn(losses)
        ref_opt.zero_grad()
        ((1 + cfg.delta * (g - g.mean(1, keepdim=True))) * losses).mean(0).sum().backward()
        ref_opt.step()
    for got, want in zip(model.parameters(), ref_model.parameters()):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def masked_meta_loss(logits, targets, q):
    """The meta loss as l2w.py took it until it weighted every sample's CE: per exit, the mean CE of
    the samples a boolean mask picks out (an exit that takes none adds nothing)."""
    exit_of = l2w.meta_exit_assignment(l2w.confidences([z.detach() for z in logits]), l2w.exit_fractions(q, len(logits)))
    total = 0.0
    for k, z in enumerate(logits):
        mine = exit_of == k
        if mine.any():
            total = total + F.cross_entropy(z[mine], targets[mine])
    return total


def test_weighted_meta_loss_equals_the_masked_one_in_value_and_gradient():
    # float64; q = 0.1 leaves exit 2 without a sample (floor(10 * 0.09) = 0), q = 2 fills the last one
    torch.manual_seed(0)
    targets = torch.randint(5, (10,))
    for q, empty in ((0.1, [1]), (0.75, []), (2.0, [])):
        logits = torch.randn(3, 10, 5, dtype=torch.float64, requires_grad=True)   # stacked (K, n, classes)
        exit_of = l2w.meta_exit_assignment(l2w.confidences(logits.detach()), l2w.exit_fractions(q, 3))
        assert [k for k in range(3) if (exit_of == k).sum() == 0] == empty
        got, want = l2w.meta_loss_fn(logits, targets, q), masked_meta_loss(list(logits), targets, q)
        assert torch.allclose(got, want, rtol=1e-14, atol=0)
        for a, b in zip(torch.autograd.grad(got, logits), torch.autograd.grad(want, logits)):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-15) and a.abs().max() > 0


def without_batchnorm_and_relu(module):
    """`module` with its BatchNorm2d and ReLU layers replaced by the identity."""
    for name, child in module.named_children():
        if isinstance(child, (torch.nn.BatchNorm2d, torch.nn.ReLU)):
            setattr(module, name, torch.nn.Identity())
        else:
            without_batchnorm_and_relu(child)
    return module


@pytest.mark.parametrize("arch, exits", [("msdnet", 2), ("ranet", 6)])
def test_an_iteration_of_every_kind_reads_no_value_from_the_device(arch, exits):
    # On PyTorch's meta device tensors have shapes and no values: any read of a value by the host
    # (.item(), bool(), a boolean mask's size) raises. On a GPU each such read would make the host
    # wait until the GPU has drained its queue. The meta device refuses autocast: this is fp32
    # (bf16: test_meta_gradient_under_amp_is_close_to_fp32). BatchNorm and ReLU, torch's own
    # layers, read nothing, and their meta kernels are slow Python (8x this test's time): replaced
    # by the identity; the networks' own code (scales, fusion, resizing, heads) stays.
    with torch.device("meta"):
        model, wpn = without_batchnorm_and_relu(models.build_model(arch, 10, exits)), l2w.WPN(exits, 1, 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    wpn_optimizer = torch.optim.Adam(wpn.parameters(), lr=1e-4)
    images, targets = torch.empty(4, 3, 32, 32, device="meta"), torch.empty(4, dtype=torch.long, device="meta")
    cfg = small_cfg(arch=arch, exits=exits)
    for knobs, meta in ((dict(meta_grad="higher"), True), (dict(meta_grad="jvp"), True), ({}, False),
                        (dict(method="baseline"), True)):
        out = l2w.train_step(model, wpn, optimizer, wpn_optimizer, images, targets, dataclasses.replace(cfg, **knobs),
                             meta=meta)
        assert out["loss"].device.type == "meta" and out["wpn_skipped"] == 0
        assert (out["meta_loss"] is not None) == (meta and not knobs.get("method"))


def tf32_settings():
    """(cuDNN's fp32 convolutions, cuBLAS's fp32 matrix products): PyTorch's setting of each."""
    if hasattr(torch.backends.cudnn, "conv"):   # torch >= 2.9
        return torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


class SettingsAtEachProduct(TorchDispatchMode):
    """Records (operation, settings()) at every convolution and matrix product, forward and
    backward (and forward-mode tangents), and the markers appended to the same list."""

    OPS = ("convolution", "convolution_backward", "mm", "addmm", "bmm")

    def __init__(self, record, settings=tf32_settings):
        super().__init__()
        self.record, self.settings = record, settings

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.OPS:
            self.record.append((func.__name__.split(".")[0], self.settings()))
        return func(*args, **(kwargs or {}))


def mark_steps(monkeypatch, record, optimizer, wpn_optimizer):
    """Appends a marker to `record` at each WPN step (steps 1-5 done) and backbone step (real step done)."""
    for opt, marker in ((wpn_optimizer, "steps 1-5 done"), (optimizer, "real step done")):
        monkeypatch.setattr(opt, "step", lambda step=opt.step, marker=marker: (record.append(marker), step())[1])


def by_phase(record, meta):
    """[(phase, operation, settings)] of an iteration's `record` (SettingsAtEachProduct, mark_steps),
    phase 'meta' for steps 1-5 of each half (of a meta iteration) and 'real' for its real step."""
    halves = "".join("m" if r == "steps 1-5 done" else "r" if r == "real step done" else "." for r in record)
    assert re.fullmatch(r"(\.+m\.+r){2}" if meta else r"(\.+r){2}", halves), halves
    phase, phases = "meta" if meta else "real", []
    for r in record:
        if isinstance(r, str):
            phase = "real" if r == "steps 1-5 done" or not meta else "meta"
        else:
            phases.append((phase, *r))
    return phases


def per_operation_precisions():
    """torch >= 2.9's fp32 precision settings, each backend before its operations (torch < 2.9: none)."""
    b = torch.backends
    if not hasattr(b.cudnn, "conv"):
        return ()
    return b, b.cuda.matmul, b.cudnn, b.cudnn.conv, b.cudnn.rnn, b.mkldnn, b.mkldnn.matmul, b.mkldnn.conv, b.mkldnn.rnn


def fp32_precision_flags():
    """Every fp32 precision setting as PyTorch reads it back: the older flags (a message where the
    read raises) and the precision of each backend and operation."""
    def read(get):
        try:
            return get()
        except RuntimeError as e:
            return "raises: " + str(e).split(",")[0]
    return ([read(get) for get in (torch.get_float32_matmul_precision, torch._C._get_cublas_allow_tf32,
                                   torch._C._get_cudnn_allow_tf32)],
            [m.fp32_precision for m in per_operation_precisions()])


@pytest.fixture
def fp32_precision_restored():
    """PyTorch's fp32 precision settings put back after the test as they were: the older flags, then
    (on torch >= 2.9) the precision of each backend and operation, which the older ones also set."""
    before, older = fp32_precision_flags(), (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    precisions = [m.fp32_precision for m in per_operation_precisions()]
    yield
    torch.set_float32_matmul_precision(older[0])
    torch.backends.cudnn.allow_tf32 = older[1]
    for module, precision in zip(per_operation_precisions(), precisions):
        module.fp32_precision = precision
    assert fp32_precision_flags() == before


def test_the_meta_gradient_is_taken_in_ieee_fp32_unless_tf32_is_allowed(monkeypatch, fp32_precision_restored):
    # Steps 1-5 of a meta iteration (step 1's forward, the virtual step, the meta forward and every
    # backward or tangent through them) run in IEEE fp32; the real step's backward, plain
    # iterations and the run with --tf32's option keep PyTorch's settings, read before.
    torch.set_float32_matmul_precision("high")   # a user's TF32 for matrix products too
    default = tf32_settings()
    ieee = ("ieee", "ieee") if hasattr(torch.backends.cudnn, "conv") else (False, False)
    assert default != ieee and all(a != b for a, b in zip(default, ieee))
    cfg, model, wpn, optimizer, wpn_optimizer, images, targets = own_network_setup()   # small, all kinds of layer
    record = []
    mark_steps(monkeypatch, record, optimizer, wpn_optimizer)
    for meta_grad, meta, options, expected in (("higher", True, {}, ieee), ("jvp", True, {}, ieee),
                                               ("jvp", False, {}, default),
                                               ("jvp", True, l2w.method_options(small_cfg(tf32=True),
                                                                                torch.device("cpu")), default)):
        record.clear()
        with SettingsAtEachProduct(record):
            l2w.train_step(model, wpn, optimizer, wpn_optimizer, images, targets,
                           with_knobs(cfg, meta_grad=meta_grad), meta=meta, **options)
        for phase, op, settings in by_phase(record, meta):
            assert settings == (expected if phase == "meta" else default), (meta_grad, meta, phase, op)
    # each phase holds convolutions' forwards and backwards and matrix products
    meta_ops = {r[0] for r in record[:record.index("steps 1-5 done")]}
    real_ops = {r[0] for r in record[record.index("steps 1-5 done") + 1:record.index("real step done")]}
    assert {"convolution", "convolution_backward", "addmm", "mm"} <= meta_ops
    assert {"convolution_backward", "mm"} <= real_ops


# A user's TF32 set with PyTorch's older switches (torch < 2.9's only ones), which on torch >= 2.9
# also set the per-operation precision
OLDER_TF32_SWITCHES = {
    "defaults": lambda: None,
    "set_float32_matmul_precision high": lambda: torch.set_float32_matmul_precision("high"),
    "matmul.allow_tf32 True": lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True),
    "set_float32_matmul_precision medium, cudnn.allow_tf32 False": lambda: (
        torch.set_float32_matmul_precision("medium"), setattr(torch.backends.cudnn, "allow_tf32", False)),
    "cudnn.allow_tf32 False": lambda: setattr(torch.backends.cudnn, "allow_tf32", False),
}


@pytest.mark.parametrize("switch", OLDER_TF32_SWITCHES)
def test_ieee_fp32_agrees_with_a_users_older_tf32_switches_at_every_product_and_gives_them_back(
        switch, monkeypatch, fp32_precision_restored):
    # torch >= 2.9 raises where its older flags and the per-operation precision disagree whenever
    # asked whether cuBLAS may use TF32 (and cuDNN, asked without naming an operation). Asked at every
    # product of a meta iteration, both answer: no in steps 1-5, the user's answer in the real step;
    # afterwards every setting reads as the user left it.
    OLDER_TF32_SWITCHES[switch]()
    users = fp32_precision_flags()
    asked = lambda: (torch._C._get_cublas_allow_tf32(), torch._C._get_cudnn_allow_tf32())
    users_answer = asked()
    cfg, model, wpn, optimizer, wpn_optimizer, images, targets = own_network_setup()
    record = []
    mark_steps(monkeypatch, record, optimizer, wpn_optimizer)
    for meta_grad in ("higher", "jvp"):
        record.clear()
        with SettingsAtEachProduct(record, asked):
            l2w.train_step(model, wpn, optimizer, wpn_optimizer, images, targets, with_knobs(cfg, meta_grad=meta_grad))
        for phase, op, answer in by_phase(record, meta=True):
            assert answer == ((False, False) if phase == "meta" else users_answer), (meta_grad, phase, op)
        assert fp32_precision_flags() == users, meta_grad


def test_ieee_fp32_leaves_the_older_flags_alone_where_a_user_set_the_per_operation_precision_alone(
        fp32_precision_restored):
    # A user who set only the per-operation precision, as torch >= 2.9 advises: the older flags
    # then disagree with it, and reading them raises. Inside, matrix products and convolutions are
    # IEEE all the same, cuBLAS's question is answered, and every setting is found back afterwards.
    if not per_operation_precisions():
        pytest.skip("torch < 2.9 has the older flags only")
    torch.backends.fp32_precision = "tf32"
    users = fp32_precision_flags()
    assert users[0][1].startswith("raises")
    with l2w.ieee_fp32():
        assert tf32_settings() == ("ieee", "ieee") and torch._C._get_cublas_allow_tf32() is False
    assert fp32_precision_flags() == users


# ----------------------------------------------------------------------------
# Evaluation: budgeted protocol (MSDNet) and real early exiting
# ----------------------------------------------------------------------------

def test_evaluation_predicts_in_ieee_fp32_whatever_the_tf32_settings():
    # the logits that fit the thresholds and those scored must not depend on a TF32 setting (nor on
    # cuDNN's benchmark mode: the training loop turns it off before predicting, checked below)
    seen = []
    class Recorder(torch.nn.Module):
        def forward(self, x):
            seen.append(tf32_settings())
            return [x.flatten(1)]
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        before = tf32_settings()
        loader = [(torch.randn(4, 1, 2, 2), torch.arange(4))]
        logits, targets = l2w.predict(Recorder(), loader, torch.device("cpu"), small_cfg())
        assert seen == [("ieee", "ieee") if hasattr(torch.backends.cudnn, "conv") else (False, False)]
        assert tf32_settings() == before and torch.equal(logits[0], loader[0][0].flatten(1))
    finally:
        torch.set_float32_matmul_precision(previous)


def test_fit_thresholds_hand_worked():
    confidence = torch.tensor([[0.9, 0.8, 0.3, 0.2],
                               [0.95, 0.5, 0.7, 0.6],
                               [0.1, 0.1, 0.1, 0.1]])
    # exit 0 takes floor(4 * 0.5) = 2 -> threshold 0.8; exit 1 takes 1 of samples {2, 3} -> 0.7
    thresholds = l2w.fit_thresholds(confidence, torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64))
    assert thresholds.tolist() == [pytest.approx(0.8), pytest.approx(0.7), -math.inf]
    # floor(4 * 0.1) = 0: nobody exits at exit 0
    thresholds = l2w.fit_thresholds(confidence, torch.tensor([0.1, 0.5, 0.4], dtype=torch.float64))
    assert thresholds[0] == math.inf and thresholds[1] == pytest.approx(0.7)
    test = torch.tensor([[0.85, 0.1, 0.1], [0.2, 0.75, 0.1], [0.3, 0.3, 0.3]])
    assert l2w.exit_with_thresholds(test, torch.tensor([0.8, 0.7, -math.inf])).tolist() == [0, 1, 2]


def test_accuracies_are_what_they_mean_without_float32_noise():
    # 73 of 100 right is 73.0 (a float32 mean gives 73.00000190734863); 2 of 3 is 66.6667 (to 1e-4)
    logits = torch.zeros(100, 4)
    logits[:73, 0] = logits[73:, 1] = 1.0
    targets = torch.zeros(100, dtype=torch.long)
    assert l2w.topk_accuracy(logits, targets, 1) == 73.0 and l2w.topk_accuracy(logits, targets, 5) == 100.0
    assert l2w.topk_accuracy(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), targets[:3], 1) == 66.6667
    correct = torch.tensor([[True] * 73 + [False] * 27, [False] * 100])
    acc, _ = l2w.budgeted_point(torch.tensor([0.5, -math.inf]), torch.ones(2, 100), correct, [1.0, 2.0])
    assert acc == 73.0


def msdnet_dynamic_eval_loop(val_logits, val_targets, test_logits, test_targets, flops):
    """MSDNet's dynamic_evaluate written as its per-sample loops (README, "What the method does");
    accuracies rounded to 1e-4, as results.json stores them."""
    val = [z.softmax(1).max(1) for z in val_logits]
    test = [z.softmax(1).max(1) for z in test_logits]
    exits, n_val, n_test = len(val), val_targets.numel(), test_targets.numel()
    curve = []
    for p in range(1, 40):
        q = p / 20
        fractions = [q ** k for k in range(1, exits + 1)]
        fractions = [f / sum(fractions) for f in fractions]
        order = [sorted(range(n_val), key=lambda i: -val[k].values[i].item()) for k in range(exits)]
        filtered, thresholds = [0] * n_val, [1e8] * exits
        for k in range(exits - 1):
            out_n, count = math.floor(n_val * fractions[k]), 0
            for i in order[k]:
                if filtered[i] == 0:
                    count += 1
                    if count == out_n:
                        thresholds[k] = val[k].values[i].item()
                        break
            for i in range(n_val):
                if val[k].values[i].item() >= thresholds[k]:
                    filtered[i] = 1
        thresholds[-1] = -1e8
        correct, taken = 0, [0] * exits
        for i in range(n_test):
            for k in range(exits):
                if test[k].values[i].item() >= thresholds[k]:
                    correct += int(test[k].indices[i].item() == test_targets[i].item())
                    taken[k] += 1
                    break
        curve.append((round(100.0 * correct / n_test, 4), sum(t / n_test * f for t, f in zip(taken, flops))))
    return curve


def test_dynamic_evaluate_matches_msdnet_loop():
    torch.manual_seed(0)
    classes = 5
    scale = torch.tensor([0.5, 1.0, 2.0, 3.0])  # later exits more confident on average
    val_logits = [torch.randn(120, classes) * s for s in scale]
    test_logits = [torch.randn(150, classes) * s for s in scale]
    val_targets, test_targets = torch.randint(classes, (120,)), torch.randint(classes, (150,))
    flops = [1e6, 2.5e6, 4e6, 7e6]
    curve = l2w.dynamic_evaluate((val_logits, val_targets), (test_logits, test_targets), flops)
    expected = msdnet_dynamic_eval_loop(val_logits, val_targets, test_logits, test_targets, flops)
    assert len(curve) == 39 and [c["q"] for c in curve] == [p / 20 for p in range(1, 40)]
    for row, (acc, exp_flops) in zip(curve, expected):
        assert row["acc"] == pytest.approx(acc) and row["flops"] == pytest.approx(exp_flops)
    assert curve[0]["flops"] < curve[-1]["flops"]


def calibrate_batchnorm(model, images):
    """Running statistics from one training-mode pass, so that a fresh network's activations and
    confidences are spread as a trained one's (else a deep RANet's logits reach 1e4)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None   # cumulative average: exactly this batch's statistics
    with torch.no_grad():
        model.train()(images)
    return model.eval()


@pytest.mark.parametrize("arch,exits", [("msdnet", 5), ("ranet", 6), ("ranet", 8)])
def test_early_exit_predict_equals_the_simulated_protocol_and_skips_computation(arch, exits):
    torch.manual_seed(0)
    model = calibrate_batchnorm(models.build_model(arch, 10, exits), torch.randn(64, 3, 32, 32))
    holdout, images = torch.randn(60, 3, 32, 32), torch.randn(15, 3, 32, 32)
    with torch.no_grad():
        thresholds = l2w.fit_thresholds(l2w.confidences(model(holdout)), l2w.exit_fractions(0.9, exits))
    # which exits' samples each block and head serves: the number of exits yielded before it runs
    order, exits_seen = {}, [0]
    blocks = list(model.blocks) if arch == "msdnet" else [b for subnet in model.subnets for b in subnet]

    def note_order(m, inputs):
        order.setdefault(m, exits_seen[0])

    hooks = [m.register_forward_pre_hook(note_order) for m in blocks]
    hooks += [h.register_forward_hook(lambda *_: exits_seen.__setitem__(0, exits_seen[0] + 1)) for h in model.exits]
    with torch.no_grad():
        model(images[:1])
    for h in hooks:
        h.remove()
    served = {m: 0 for m in [*blocks, *model.exits]}

    def count_samples(m, inputs):
        while not isinstance(inputs, torch.Tensor):   # MSDNet's blocks take the list of scales
            inputs = inputs[0]
        served[m] += inputs.shape[0]

    for m in served:
        m.register_forward_pre_hook(count_samples)
    for batch_size in (1, 4, 15):
        # the simulated protocol on the same batches: full forward pass, then the thresholds
        with torch.no_grad():
            logits = [torch.cat(z) for z in zip(*(model(b) for b in images.split(batch_size)))]
        expected_exits = l2w.exit_with_thresholds(l2w.confidences(logits), thresholds)
        expected_predictions = torch.stack(logits).argmax(dim=2)[expected_exits, torch.arange(len(images))]
        served.update({m: 0 for m in served})
        predictions, exit_of = map(torch.cat, zip(*(l2w.early_exit_predict(model, b, thresholds)
                                                    for b in images.split(batch_size))))
        assert torch.equal(exit_of, expected_exits) and torch.equal(predictions, expected_predictions), batch_size
        # every block and head ran for exactly the samples that had not left before it
        reached = [(exit_of >= k).sum().item() for k in range(exits)]
        assert [served[m] for m in blocks] == [reached[order[m]] for m in blocks]
        assert [served[h] for h in model.exits] == reached
    counts = torch.bincount(exit_of, minlength=exits)
    assert counts[0] > 0 and counts[-1] > 0 and reached[-1] < len(images) / 2   # the computation skipped is real


def fake_results(method, exits, early_exit=False):
    flops = [7e6 * (k + 1) for k in range(exits)]
    results = {"config": dataclasses.asdict(small_cfg(method=method, exits=exits)),
               "anytime": [{"exit": k + 1, "acc1": 80.0 + k, "acc5": 99.0, "flops": f, "params": 1e5}
                           for k, f in enumerate(flops)],
               "dynamic": [{"q": p / 20, "acc": 80.0 + p / 20, "flops": flops[0] + p * 1e5} for p in range(1, 40)]}
    if early_exit:
        results["early_exit"] = {"q": 0.5, "accuracy": 80.5, "flops": 9e6, "runs": [
            {"batch_size": 1, "ms_per_image": 4.0, "whole_ms_per_image": 9.0}]}
    return results


def test_plot_curves_writes_a_png_labelled_from_each_config(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps(fake_results("l2w", 3, early_exit=True)))
    (tmp_path / "baseline.json").write_text(json.dumps(fake_results("baseline", 5)))
    labels = l2w.plot_curves([str(tmp_path / "run"), str(tmp_path / "baseline.json")], tmp_path / "curves.png")
    assert labels == ["l2w msdnet3 synthetic", "baseline msdnet5 synthetic"]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the CLI: several paths, --out, and a one-line error for a path that holds no results
    result = cli("--plot", str(tmp_path / "run"), str(tmp_path / "baseline.json"), "--out", str(tmp_path / "c.png"))
    assert result.returncode == 0 and (tmp_path / "c.png").stat().st_size > 10_000, result.stderr
    bad = cli("--plot", str(tmp_path / "missing"))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: --plot: '{tmp_path / 'missing'}' is not a run directory or results.json (FileNotFoundError)"]


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    (tmp_path / "results.json").write_text(json.dumps(fake_results("l2w", 3)))
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # as if it were not installed
    with pytest.raises(l2w.UsageError, match="pip install matplotlib"):
        l2w.plot_curves([str(tmp_path)], tmp_path / "curves.png")


def summary_run(folder, method, seed, top1, curve):
    """A results.json of a finished synthetic run with these test figures; curve: [(Mul-Adds, acc)]."""
    results = fake_results(method, len(top1))
    results["config"]["seed"] = seed
    for row, acc in zip(results["anytime"], top1):
        row["acc1"] = acc
    results["dynamic"] = [{"q": (i + 1) / 20, "acc": acc, "flops": flops} for i, (flops, acc) in enumerate(curve)]
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(results))
    return str(folder)


def test_summary_groups_runs_by_seed_and_pairs_l2w_with_its_baseline_worked_by_hand(tmp_path, capsys):
    runs = [summary_run(tmp_path / "l2w0", "l2w", 0, [70, 80], [(10e6, 70), (15e6, 78), (20e6, 80)]),
            summary_run(tmp_path / "l2w1", "l2w", 1, [72, 84], [(10e6, 72), (20e6, 84)]),
            summary_run(tmp_path / "base0", "baseline", 0, [68, 79], [(10e6, 68), (20e6, 78)]),
            summary_run(tmp_path / "base1", "baseline", 1, [70, 80], [(12e6, 70), (20e6, 80), (20e6, 82)])]
    result = cli("--summary", *runs, "--out", tmp_path / "summary.json")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "summary.json").read_text())
    # every run's curve covers 12-20 M; at each of 101 budgets 12 + 0.08 i M a run scores its best point
    # within it: l2w0 70 at i = 0..37 (below 15 M), 78 at 38..99, 80 at 20 M; the others their first
    # point's accuracy below 20 M and their best at 20 M (base1 reaches 20 M twice: 82)
    assert report["range"] == [12e6, 20e6]
    budgeted = {"l2w0": (38 * 70 + 62 * 78 + 80) / 101, "l2w1": (100 * 72 + 84) / 101,
                "base0": (100 * 68 + 78) / 101, "base1": (100 * 70 + 82) / 101}
    l2w_group, baseline_group = report["groups"]
    assert (l2w_group["seeds"], baseline_group["seeds"]) == ([0, 1], [0, 1])
    assert l2w_group["top1_mean"] == [71, 82] and baseline_group["top1_mean"] == [69, 79.5]
    assert l2w_group["top1_std"] == pytest.approx([2 ** 0.5, 8 ** 0.5])
    assert l2w_group["budgeted_mean"] == pytest.approx((budgeted["l2w0"] + budgeted["l2w1"]) / 2)
    assert baseline_group["budgeted_std"] == pytest.approx(np.std([budgeted["base0"], budgeted["base1"]], ddof=1))
    [pair] = report["paired"]
    assert [d["seed"] for d in pair["per_seed"]] == [0, 1]
    assert [d["top1"] for d in pair["per_seed"]] == [[2, 1], [2, 4]]
    assert pair["per_seed"][1]["budgeted_mean"] == pytest.approx(budgeted["l2w1"] - budgeted["base1"])
    assert pair["top1_mean"] == [2, 2.5] and pair["top1_std"] == pytest.approx([0, 4.5 ** 0.5])
    assert pair["budgeted_mean"] == pytest.approx((budgeted["l2w0"] - budgeted["base0"]
                                                   + budgeted["l2w1"] - budgeted["base1"]) / 2)
    out = result.stdout
    assert "l2w msdnet2 synthetic minus baseline msdnet2 synthetic, paired by seed" in out
    assert re.search(r"baseline msdnet2 synthetic +2 +69\.00 ± 1\.41 +79\.50 ± 0\.71 +69\.11 ± 1\.43", out), out
    assert re.search(r"seed 1 +\+2\.00 +\+4\.00 +\+2\.00", out), out
    # a run given twice, and runs of networks whose curves share no range, end in one line
    twice = cli("--summary", runs[0], runs[0])
    assert twice.returncode == 2 and twice.stderr.count("\n") == 1 and "are the same run (seed 0)" in twice.stderr
    apart = summary_run(tmp_path / "other", "l2w", 2, [90, 95], [(30e6, 90), (40e6, 95)])
    result = cli("--summary", runs[0], apart)
    assert result.returncode == 2 and "share no range of Mul-Adds" in result.stderr
    # a curve listed out of cost order; a range whose last budget rounds a hair past its end
    low, high = 2906387.8, 14167348.6
    assert low + (high - low) * 100 / 100 > high
    shuffled = summary_run(tmp_path / "shuffled", "l2w", 3, [60, 70], [(high, 80), (low, 60), (8e6, 75)])
    assert cli("--summary", shuffled, "--out", tmp_path / "s.json").returncode == 0
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["range"] == [low, high]
    points = [(high, 80), (low, 60), (8e6, 75)]
    assert report["groups"][0]["budgeted_mean"] == pytest.approx(
        np.mean([max(acc for cost, acc in points if cost <= b) for b in np.linspace(low, high, 101)]))


def test_summary_labels_say_what_sets_groups_apart_and_phase2_runs_group_by_what_they_trained(tmp_path, capsys):
    # run.sh's Table 4 beside its baseline, as IMTA phase-2 runs: each seed starts from its own
    # phase-1 file, which is not what they trained; the WPN's width sets the L2W-DEN groups apart
    runs = []
    for seed in (0, 1):
        for method, width in (("baseline", 500), ("l2w", 500), ("l2w", 10)):
            folder = tmp_path / f"{method}{width}_{seed}"
            summary_run(folder, method, seed, [70 + seed + width / 100, 80], [(10e6, 70), (20e6, 80)])
            results = json.loads((folder / "results.json").read_text())
            results["config"].update(wpn_width=width, imta="finetune", pretrained=f"runs/phase1_{seed}/checkpoint.pt")
            (folder / "results.json").write_text(json.dumps(results))
            runs.append(str(folder))
    report = l2w.summarize(runs, str(tmp_path / "summary.json"))
    labels = ["baseline msdnet2 synthetic", "l2w msdnet2 synthetic wpn_width=500", "l2w msdnet2 synthetic wpn_width=10"]
    assert [g["label"] for g in report["groups"]] == labels and [g["seeds"] for g in report["groups"]] == [[0, 1]] * 3
    assert [(p["l2w"], p["baseline"]) for p in report["paired"]] == [(labels[1], labels[0]), (labels[2], labels[0])]
    assert [p["top1_mean"][0] for p in report["paired"]] == pytest.approx([0, -4.9])
    printed = capsys.readouterr().out
    assert f"{labels[2]} minus {labels[0]}, paired by seed" in printed and re.search(f"\n{labels[1]} +2 ", printed)
    assert json.loads((tmp_path / "summary.json").read_text())["groups"][2]["label"] == labels[2]


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------

def test_holdout_split_is_seeded_and_disjoint():
    targets = torch.arange(100) % 4
    train, held = data.holdout_split(targets, 10, seed=3)
    again_train, again_held = data.holdout_split(targets, 10, seed=3)
    assert torch.equal(held, again_held) and len(held) == 10 and len(train) == 90
    assert set(train.tolist()).isdisjoint(held.tolist()) and set(train.tolist()) | set(held.tolist()) == set(range(100))
    assert not torch.equal(held, data.holdout_split(targets, 10, seed=4)[1])
    # stratified: a long-tailed set (classes of 600, 200, 100, 100) gives 6, 2, 1, 1 of 10 held out
    targets = torch.tensor([0] * 600 + [1] * 200 + [2] * 100 + [3] * 100)[torch.randperm(1000)]
    _, held = data.holdout_split(targets, 10, seed=0)
    assert torch.bincount(targets[held], minlength=4).tolist() == [6, 2, 1, 1]


def test_sharded_batches_split_every_global_batch_between_ranks():
    single = list(data.ShardedBatches(103, 8, seed=1))
    ranks = [data.ShardedBatches(103, 8, seed=1, rank=r, world=4) for r in range(4)]
    assert len(single) == 12 and all(len(s) == 12 for s in ranks)
    for b, batch in enumerate(single):   # each global batch is the ranks' shares, in rank order
        assert sum((list(r)[b] for r in ranks), []) == batch and all(e == 0 for e, _ in batch)
    sampler = data.ShardedBatches(103, 8, seed=1)
    sampler.set_epoch(5)
    assert list(sampler) != single and all(e == 5 for batch in sampler for e, _ in batch)
    # evaluation: in order, nothing dropped, a short last batch shared as far as it goes
    shares = [[[i for _, i in b] for b in data.ShardedBatches(9, 4, rank=r, world=2, shuffle=False)]
              for r in range(2)]
    assert shares == [[[0, 1], [4, 5], [8]], [[2, 3], [6, 7]]]


def write_fake_cifar10(root, per_batch=20, n_test=20):
    """Tiny files in the on-disk format torchvision reads (cifar-10-batches-py)."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(0)

    def dump(name, obj):
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(obj, f)
        return [name, hashlib.md5(open(os.path.join(folder, name), "rb").read()).hexdigest()]

    batch = lambda n: {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
    train_list = [dump(f"data_batch_{i}", batch(per_batch)) for i in range(1, 6)]
    test_list = [dump("test_batch", batch(n_test))]
    meta = dump("batches.meta", {"label_names": [str(i) for i in range(10)]})
    return train_list, test_list, {"filename": "batches.meta", "key": "label_names", "md5": meta[1]}


def test_cifar_loading_on_files_in_torchvision_format(tmp_path, monkeypatch):
    import torchvision
    train_list, test_list, meta = write_fake_cifar10(str(tmp_path))
    for name, value in (("train_list", train_list), ("test_list", test_list), ("meta", meta)):
        monkeypatch.setattr(torchvision.datasets.CIFAR10, name, value)   # checksums of our tiny files
    cfg = small_cfg(dataset="cifar10", data_dir=str(tmp_path), holdout=10)
    splits = data.load(cfg)
    assert (len(splits.train), len(splits.threshold_set), len(splits.test)) == (90, 10, 20)
    assert splits.threshold_source == "holdout" and splits.num_classes == 10
    # hold-out images use test-time transforms: deterministic, normalised with the authors' stats
    raw = torchvision.datasets.CIFAR10(str(tmp_path), train=True).data[splits.holdout_indices[0].item()]
    mean, std = data.CIFAR_STATS["cifar10"]
    expected = (torch.tensor(raw).permute(2, 0, 1).float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert torch.allclose(splits.threshold_set[0][0], expected, atol=1e-6)
    assert torch.equal(splits.threshold_set[0][0], splits.threshold_set[0][0])
    # --holdout 0: thresholds from all training images, with test-time transforms
    splits = data.load(dataclasses.replace(cfg, holdout=0))
    assert splits.threshold_source == "train" and len(splits.train) == len(splits.threshold_set) == 100


def cifar_like(n, seed=0):
    """n random CIFAR-shaped uint8 images and labels, as DeviceImages keeps them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(10, (n,), generator=g)


def test_cifar_batches_are_cropped_and_flipped_as_torchvision_does(monkeypatch):
    # Each sample of a batch made on the device equals torchvision's RandomCrop(32, padding=4) and
    # RandomHorizontalFlip, ToTensor and Normalize on its PIL image, at that sample's offset and flip.
    import torchvision.transforms as T
    from PIL import Image
    images, labels = cifar_like(24)
    stats = data.CIFAR_STATS["cifar100"]
    split = data.DeviceImages(images, labels, range(4, 24), stats, augment=True, seed=4294967295)
    batch, batch_labels = split.batch([(3, i) for i in range(20)])
    offset, flip = split.augmentation(3)
    assert set(flip[4:].tolist()) == {False, True} and torch.equal(batch_labels, labels[4:])
    for i in range(4, 24):
        top, left = offset[i].tolist()
        monkeypatch.setattr(T.RandomCrop, "get_params", staticmethod(lambda image, size: (top, left, 32, 32)))
        torchvision_transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(p=float(flip[i])),
                                           T.ToTensor(), T.Normalize(*stats)])
        assert torch.equal(batch[i - 4], torchvision_transform(Image.fromarray(images[i].permute(1, 2, 0).numpy())))
    # the hold-out and test sets: normalised only
    plain = data.DeviceImages(images, labels, range(24), stats, augment=False)
    assert torch.equal(plain.batch([(3, 5)])[0][0], T.Normalize(*stats)(images[5].float() / 255))


def test_cifar_augmentation_draws_every_offset_and_flip_at_its_rate_from_seed_epoch_and_sample():
    n = 50_000
    split = data.DeviceImages(torch.zeros(1, 3, 32, 32, dtype=torch.uint8).expand(n, -1, -1, -1),
                              torch.zeros(n, dtype=torch.long), range(n), data.CIFAR_STATS["cifar10"], True, seed=7)
    offset, flip = (t.clone() for t in split.augmentation(0))
    counts = torch.bincount(offset[:, 0] * 9 + offset[:, 1], minlength=81).double()
    expected = n / 81
    assert len(counts) == 81 and ((counts - expected) ** 2 / expected).sum() < 140   # chi-square, 80 d.o.f.: p < 1e-4
    assert counts.min() > 0 and abs(flip.double().mean() - 0.5) < 5 * 0.5 / math.sqrt(n)
    again = data.DeviceImages(split.images[:n], split.labels, range(n), data.CIFAR_STATS["cifar10"], True, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(again.augmentation(0), (offset, flip)))   # (seed, epoch) alone
    other_epoch = split.augmentation(1)
    assert (other_epoch[0] != offset).any(dim=1).double().mean() > 0.95   # 80/81 differ, drawn anew


def test_cifar_batches_are_the_same_for_one_rank_and_two():
    images, labels = cifar_like(40)
    split = data.DeviceImages(images, labels, range(3, 40), data.CIFAR_STATS["cifar10"], True, seed=5)
    batches = lambda rank, world: [b for b in data.DeviceBatches(split, data.ShardedBatches(37, 8, 5, rank, world))]
    single, ranks = batches(0, 1), [batches(r, 2) for r in (0, 1)]
    assert len(single) == 4 and all(len(r) == 4 for r in ranks)
    for b, (x, y) in enumerate(single):
        assert torch.equal(x, torch.cat([ranks[0][b][0], ranks[1][b][0]]))
        assert torch.equal(y, torch.cat([ranks[0][b][1], ranks[1][b][1]]))


def test_synthetic_set_is_seeded_and_only_fine_detail_names_the_hard_half():
    train, test = data.synthetic(600, seed=0)
    again, _ = data.synthetic(600, seed=0)
    assert torch.equal(train.tensors[0], again.tensors[0]) and train.tensors[0].shape == (600, 3, 32, 32)
    assert len(test) == 200 and set(train.tensors[1].tolist()) == set(range(10))
    (x, y), (x_test, y_test) = train.tensors, test.tensors

    def nearest_class_mean(features):
        means = torch.stack([features(x[y == c]).mean(0) for c in range(10)])
        return (torch.cdist(features(x_test), means).argmin(1) == y_test).float().mean().item()

    # the coarse view (8x8-pixel means) names the easy half's class and guesses the hard half's
    coarse = nearest_class_mean(lambda images: F.avg_pool2d(images, 8).flatten(1))

    def texture_spectrum(images):   # shift-invariant: the power spectrum without its lowest frequencies
        power = torch.fft.fft2(images).abs().square()
        low = torch.tensor([0, 1, 2, -2, -1])
        power[..., low[:, None], low] = 0
        return power.log1p().flatten(1)

    # the fine texture, found at any shift (a nonlinear feature), names nearly every sample
    fine = nearest_class_mean(texture_spectrum)
    assert 0.5 <= coarse <= 0.75 and fine >= 0.95, (coarse, fine)


def test_a_checkpoint_without_the_wpns_start_resumes_and_says_nothing_of_how_far_it_moved(tmp_path, capsys):
    # (a checkpoint written before runs kept the WPN's starting point): the profile is taken, but
    # "moved" is unknown, not measured from where the resumed run happened to start
    cfg = small_cfg(exits=2, synthetic_size=80, holdout=16, out=str(tmp_path / "run"))
    l2w.train(cfg)
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    assert state["wpn_init"] is not None
    del state["wpn_init"]
    torch.save(state, path)
    results = l2w.train(dataclasses.replace(cfg, epochs=2, resume=str(path)))
    first, second = (h["weights"] for h in results["history"])
    assert first["moved"] is not None and second["moved"] is None and len(second["spearman"]) == 2
    assert "weights moved" not in capsys.readouterr().out.split("epoch 2/2 hold-out")[1]


# ----------------------------------------------------------------------------
# End to end through the CLI
# ----------------------------------------------------------------------------

def test_cli_end_to_end_writes_results_json(tmp_path):
    out = tmp_path / "run"
    # (in this process: the demo runs the command line in a process of its own)
    result = cli("--dataset", "synthetic", "--exits", "3", "--epochs", "1", "--synthetic-size", "150",
                 "--holdout", "30", "--batch-size", "32", "--out", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "ETA" in result.stdout and "hold-out top-1 per exit" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"config", "anytime", "dynamic"}
    assert results["config"]["exits"] == 3 and results["config"]["batch_size"] == 32
    flops, params = models.count_cost(models.build_model("msdnet", 10, 3), 32)
    assert [r["flops"] for r in results["anytime"]] == flops and [r["params"] for r in results["anytime"]] == params
    assert all(0 <= r["acc1"] <= r["acc5"] <= 100 for r in results["anytime"])
    assert len(results["dynamic"]) == 39
    assert all(flops[0] <= r["flops"] <= flops[-1] for r in results["dynamic"])
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and state["config"] == results["config"] and len(state["holdout_indices"]) == 30
    assert json.loads((out / "holdout_indices.json").read_text()) == state["holdout_indices"].tolist()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "holdout_indices.json", "results.json"]

    # --eval-only on the checkpoint reproduces the numbers, in its own folder; --early-exit runs
    # the budget q = 0.5 for real, at batch 1 and at the run's batch size, and gets the budgeted
    # protocol's exits and accuracy
    finished = {p.name: p.read_bytes() for p in out.iterdir()}
    again = cli("--eval-only", "--resume", str(out / "checkpoint.pt"), "--early-exit", "--q", "0.5")
    assert again.returncode == 0, again.stderr
    evaluated = json.loads((out / "eval" / "results.json").read_text())
    assert evaluated["anytime"] == results["anytime"] and evaluated["dynamic"] == results["dynamic"]
    early, at_q = evaluated["early_exit"], results["dynamic"][9]
    assert at_q["q"] == early["q"] == 0.5 and early["accuracy"] == early["budgeted_accuracy"] == at_q["acc"]
    assert early["flops"] == pytest.approx(at_q["flops"]) and early["whole_flops"] == flops[-1]
    assert [run["batch_size"] for run in early["runs"]] == [1, 32]
    assert all(run["same_as_budgeted"] == 50 and run["accuracy"] == early["accuracy"] for run in early["runs"])
    accuracies = ([r[k] for r in evaluated["anytime"] for k in ("acc1", "acc5")] + [early["accuracy"]]
                  + [r["acc"] for r in evaluated["dynamic"] + evaluated["holdout_dynamic"]])
    assert all(acc == round(acc, 4) for acc in accuracies)   # counts / n to 1e-4, without float32 noise
    assert "share of the Mul-Adds speedup" in again.stdout

    # the same command again must not start over on top of the finished run
    again = cli("--dataset", "synthetic", "--exits", "3", "--out", str(out), "--device", "cpu")
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert f"--resume {out / 'checkpoint.pt'}" in again.stderr and "another --out" in again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == finished


def test_cli_meta_grad_jvp_takes_the_meta_gradient_higher_does(tmp_path, monkeypatch, capsys):
    # A run of the CLI with each meta-gradient (one epoch on the synthetic set, in this process):
    # each run takes only its own path, and their first WPN gradients agree up to float32 rounding.
    # (The later ones part ways by more: Adam's first step is about lr * sign(g), so rounding in
    # WPN gradients near zero moves the WPN differently; float64 equality is tested above.)
    recorded = {"higher": [], "jvp": []}
    for name in recorded:
        def record(wpn, *args, original=getattr(l2w, f"{name}_meta_gradient"), name=name, **kwargs):
            meta_loss = original(wpn, *args, **kwargs)
            recorded[name].append(torch.cat([p.grad.flatten() for p in wpn.parameters()]))
            return meta_loss
        monkeypatch.setattr(l2w, f"{name}_meta_gradient", record)
    for meta_grad in ("higher", "jvp"):
        l2w.main(["--dataset", "synthetic", "--exits", "2", "--epochs", "1", "--synthetic-size", "120",
                  "--holdout", "24", "--batch-size", "48", "--lr", "0.1", "--meta-interval", "2",
                  "--meta-grad", meta_grad, "--out", str(tmp_path / meta_grad), "--device", "cpu"])
        assert json.loads((tmp_path / meta_grad / "results.json").read_text())["config"]["meta_grad"] == meta_grad
        assert len(recorded[meta_grad]) == 2      # one meta iteration (of two): its two halves
    assert len(recorded["higher"]) == 2
    higher, jvp = recorded["higher"][0], recorded["jvp"][0]
    assert higher.abs().max() > 1e-4 and torch.allclose(jvp, higher, rtol=1e-4, atol=1e-5 * higher.abs().max())
    assert "epoch 1/1 iter 2/2" in capsys.readouterr().out


def test_default_run_directories_keep_the_papers_runs_apart():
    runs = [["--dataset", "imagenet", "--step", s, "--method", m] for s in ("4", "6", "7") for m in ("l2w", "baseline")]
    runs += [["--dataset", "cifar100", "--q", q] for q in ("0.5", "0.75", "1")]
    runs += [["--dataset", "cifar100", "--seed", s] for s in ("1", "2")]
    runs += [["--dataset", "cifar10-lt", "--imbalance", i] for i in ("100", "50")]
    runs += [["--dataset", "cifar100", "--exits", "7"], ["--dataset", "cifar100", "--arch", "ranet", "--exits", "6"]]
    runs += [["--dataset", "imagenet", "--step", "7", "--base", "7"]]    # MSDNet-PyTorch's released s=7 network
    outs = [l2w.parse_config(args)[0].out for args in runs]
    assert len(set(outs)) == len(outs)
    assert outs[0] == os.path.join("runs", "imagenet_msdnet5_s4_l2w_q0.5_seed0")
    assert outs[-1] == os.path.join("runs", "imagenet_msdnet5_s7_b7_l2w_q0.5_seed0")


def test_atomic_write_never_leaves_a_half_written_file(tmp_path):
    path = tmp_path / "results.json"
    l2w.write_json(str(path), {"a": 1})
    def fails(f):
        f.write(b"{ half")
        raise OSError("disk full")
    with pytest.raises(l2w.UsageError, match=f"cannot write '{path}' \\(disk full; .* MiB free there\\); the last one "
                                             "written is intact"):
        l2w.atomic_write(str(path), fails)
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["results.json"]


def test_a_checkpoint_that_cannot_be_written_ends_in_one_line_and_the_last_one_resumes(tmp_path):
    # A file-size limit makes torch.save's write fail as on a full disk (a RuntimeError from its zip
    # writer, not an OSError): one error line saying the last checkpoint is intact, no temporary file
    # left, and a resume from that checkpoint finishes the run.
    out = tmp_path / "run"
    assert cli(*TINY, "--epochs", "1", "--out", out).returncode == 0
    before = (out / "checkpoint.pt").read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 4, hard))
    try:
        proc = cli("--resume", out / "checkpoint.pt", "--epochs", "2")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"error: cannot write '{out / 'checkpoint.pt'}' (") and lines[0].endswith(
        "MiB free there); the last one written is intact"), lines
    assert (out / "checkpoint.pt").read_bytes() == before and sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt", "holdout_indices.json", "results.json"]
    assert cli("--resume", out / "checkpoint.pt", "--epochs", "2").returncode == 0
    assert len(json.loads((out / "results.json").read_text())["history"]) == 2


def test_checkpoints_load_without_running_code_from_them(tmp_path):
    marker = tmp_path / "payload_ran"
    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    evil = tmp_path / "evil.pt"
    torch.save({"config": {}, "model": Payload()}, evil)
    for args in (["--resume", str(evil)], ["--eval-only", "--resume", str(evil)]):
        result = cli(*args)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "is corrupt, unsafe or not of l2w.py (UnpicklingError)" in result.stderr
    assert not marker.exists()


def fake_cifar10_cfg(tmp_path, monkeypatch, **overrides):
    """small_cfg on CIFAR-10 files the test writes (120 training images, augmentation on)."""
    import torchvision
    train_list, test_list, meta = write_fake_cifar10(str(tmp_path / "cifar"), per_batch=24, n_test=30)
    for name, value in (("train_list", train_list), ("test_list", test_list), ("meta", meta)):
        monkeypatch.setattr(torchvision.datasets.CIFAR10, name, value)   # checksums of our tiny files
    return small_cfg(**{"dataset": "cifar10", "data_dir": str(tmp_path / "cifar"), "holdout": 20, "exits": 2,
                        "batch_size": 16, "epochs": 2, "workers": 2, **overrides})


def stop_at_call(monkeypatch, call):
    """SIGTERM arrives during the `call`-th iteration (train_step) of l2w.train from now on."""
    calls, train_step = [0], l2w.train_step
    def interrupted_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(*args, **kwargs)
    monkeypatch.setattr(l2w, "train_step", interrupted_step)


def test_resume_mid_epoch_after_sigterm_is_exact(tmp_path, monkeypatch):
    # CIFAR-format files, random crops and flips (made on the device), the largest seed the command
    # line takes: a run stopped by SIGTERM in the middle of its second epoch and resumed must end
    # bit-identical to the straight run.
    cfg = fake_cifar10_cfg(tmp_path, monkeypatch, seed=2 ** 32 - 1)
    straight = l2w.train(dataclasses.replace(cfg, out=str(tmp_path / "straight")))

    saved, train_step = [], l2w.train_step
    stop_at_call(monkeypatch, 9)   # SIGTERM arrives during iteration 3 of epoch 2
    write = l2w.atomic_write
    monkeypatch.setattr(l2w, "atomic_write", lambda path, fn: (saved.append(os.path.basename(path)), write(path, fn)))
    split = dataclasses.replace(cfg, out=str(tmp_path / "split"), save_every=2)
    with pytest.raises(SystemExit, match=str(128 + signal.SIGTERM)):
        l2w.train(split)
    state = l2w.load_checkpoint(str(tmp_path / "split" / "checkpoint.pt"))
    assert (state["epoch"], state["batch"]) == (1, 3)   # 100 training images: 6 iterations per epoch
    assert saved.count("checkpoint.pt") == 5            # --save-every 2: (0,2) (0,4) end of epoch 1, (1,2); signal: (1,3)
    monkeypatch.setattr(l2w, "train_step", train_step)

    # the resumed run must take the hold-out split from the checkpoint, not recompute it
    monkeypatch.setattr(data, "holdout_split", lambda targets, holdout, seed: (torch.arange(20, len(targets)),
                                                                                torch.arange(20)))
    resumed = l2w.train(dataclasses.replace(split, resume=str(tmp_path / "split" / "checkpoint.pt")))
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert (a["epoch"], a["batch"]) == (b["epoch"], b["batch"]) == (2, 0)
    for key in ("model", "wpn"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    for key in ("optimizer", "wpn_optimizer"):
        for pa, pb in zip(a[key]["state"].values(), b[key]["state"].values()):
            assert all(torch.equal(torch.as_tensor(pa[k]), torch.as_tensor(pb[k])) for k in pa)
    assert straight["anytime"] == resumed["anytime"] and straight["dynamic"] == resumed["dynamic"]
    # the same history too, but for the times: the epoch's sums so far travel in the checkpoint
    timeless = lambda history: [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")} for h in history]
    assert [h["epoch"] for h in straight["history"]] == [1, 2] and all(h["weights"]["moved"] for h in straight["history"])
    assert timeless(resumed["history"]) == timeless(straight["history"])


def test_the_history_means_the_loss_over_every_iteration_and_the_meta_loss_over_the_meta_iterations(
        tmp_path, monkeypatch):
    # --meta-interval 2 with 3 iterations an epoch: meta steps at iterations 0 and 2 (epoch 1) and 4
    # (epoch 2; the interval counts across epochs). Each epoch's record holds the mean of what
    # train_step returned: the loss over all of its iterations, the meta loss over its meta ones.
    returned, train_step = [], l2w.train_step
    def recording_step(*args, **kwargs):
        out = train_step(*args, **kwargs)
        returned.append((out["loss"].item(), None if out["meta_loss"] is None else out["meta_loss"].item()))
        return out
    monkeypatch.setattr(l2w, "train_step", recording_step)
    cfg = small_cfg(exits=2, batch_size=16, synthetic_size=60, holdout=12, epochs=2, meta_interval=2,
                    out=str(tmp_path / "run"))
    history = l2w.train(cfg)["history"]
    assert [meta is not None for _, meta in returned] == [True, False, True, False, True, False]
    for record, epoch in zip(history, (returned[:3], returned[3:]), strict=True):
        assert record["loss"] == pytest.approx(statistics.fmean(loss for loss, _ in epoch), rel=1e-6)
        assert record["meta_loss"] == pytest.approx(statistics.fmean(m for _, m in epoch if m is not None), rel=1e-6)


def test_under_torchrun_the_ranks_agree_on_a_signal_an_iteration_later_without_waiting_for_it(monkeypatch):
    # one process: the handler's flag, read every iteration; under torchrun each iteration starts an
    # all_reduce of the flag on a CPU group without waiting for it, and reads the one of the iteration before
    stop = l2w.StopSignal()
    try:
        assert stop() == 0
        signal.raise_signal(signal.SIGTERM)   # to the handler it installed
        assert stop() == signal.SIGTERM
    finally:
        stop.close()
    started = []
    class Work:
        waited = False
        def wait(self):
            self.waited = True
    def all_reduce(flag, op, group, async_op):
        assert async_op and group == "gloo group" and flag.device.type == "cpu" and op == l2w.dist.ReduceOp.MAX
        started.append((flag.clone(), Work()))
        return started[-1][1]
    monkeypatch.setattr(l2w.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(l2w.dist, "new_group", lambda backend: f"{backend} group")
    monkeypatch.setattr(l2w.dist, "all_reduce", all_reduce)
    stop = l2w.StopSignal()
    try:
        assert stop() == 0 and len(started) == 1 and not started[0][1].waited
        signal.raise_signal(signal.SIGTERM)   # to the handler it installed
        assert stop() == 0 and started[0][1].waited   # the flag was 0 when that all_reduce started
        assert stop() == signal.SIGTERM and [int(f) for f, _ in started] == [0, signal.SIGTERM, signal.SIGTERM]
    finally:
        stop.close()
    assert started[-1][1].waited   # none left running


def test_cli_sigterm_writes_a_checkpoint_and_the_run_continues_from_it(tmp_path, monkeypatch):
    # (a SIGTERM from another process: the torchrun test below)
    out, train_step = tmp_path / "run", l2w.train_step
    stop_at_call(monkeypatch, 3)   # SLURM's warning arrives in the middle of an epoch
    result = cli("--dataset", "synthetic", "--exits", "2", "--epochs", "1", "--synthetic-size", "120", "--holdout", "24",
                 "--batch-size", "16", "--print-every", "1", "--out", out, "--device", "cpu")
    assert result.returncode == 128 + signal.SIGTERM and "Traceback" not in result.stderr, result.stderr
    assert "stopped by signal" in result.stdout and f"--resume {out / 'checkpoint.pt'}" in result.stdout
    state = l2w.load_checkpoint(str(out / "checkpoint.pt"))
    assert (state["epoch"], state["batch"]) == (0, 3) and not (out / "results.json").exists()
    monkeypatch.setattr(l2w, "train_step", train_step)
    result = cli("--resume", str(out / "checkpoint.pt"))
    assert result.returncode == 0, result.stderr
    assert f"at epoch 0, iteration {state['batch']}" in result.stdout and (out / "results.json").exists()


def test_fp16_resume_restores_both_loss_scalers(tmp_path, monkeypatch):
    monkeypatch.setattr(l2w, "amp_dtype", lambda device: torch.float16)
    cfg = small_cfg(exits=2, epochs=2, batch_size=8, synthetic_size=28, holdout=20, amp=True)
    l2w.train(dataclasses.replace(cfg, out=str(tmp_path / "straight")))
    stop_at_call(monkeypatch, 1)   # in the first epoch's only iteration
    with pytest.raises(SystemExit):
        l2w.train(dataclasses.replace(cfg, out=str(tmp_path / "split")))
    monkeypatch.undo()
    monkeypatch.setattr(l2w, "amp_dtype", lambda device: torch.float16)
    state = l2w.load_checkpoint(str(tmp_path / "split" / "checkpoint.pt"))
    assert set(state["scalers"]) == {"real", "meta"} and state["scalers"]["real"]["scale"] > 0
    l2w.train(dataclasses.replace(cfg, out=str(tmp_path / "split"), resume=str(tmp_path / "split" / "checkpoint.pt")))
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert a["scalers"] == b["scalers"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["wpn"][k], b["wpn"][k]) for k in a["wpn"])


def test_rank_zero_loads_data_before_the_other_ranks(tmp_path):
    # under torchrun rank 0 downloads CIFAR alone; the others start only when it has finished
    log = tmp_path / "order.txt"
    torch.multiprocessing.spawn(load_in_rank_order, args=(str(log), str(tmp_path / "store")), nprocs=2)
    assert log.read_text().split() == ["0-start", "0-end", "1-start", "1-end"]


def load_in_rank_order(rank, log, store):
    import time
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        def load():
            with open(log, "a") as f:
                f.write(f"{rank}-start\n")
            time.sleep(0.5)
            with open(log, "a") as f:
                f.write(f"{rank}-end\n")
        l2w.rank_zero_first(load)
    finally:
        dist.destroy_process_group()


def test_predict_under_two_ranks_scores_with_rank_zeros_statistics_and_gathers_to_rank_zero(tmp_path):
    # each rank updates its own BatchNorm statistics during training; evaluation must use rank
    # 0's (the checkpoint's) everywhere, and only rank 0 receives the logits
    torch.manual_seed(0)
    model = models.build_model("msdnet", 10, 2)
    images, labels = torch.randn(10, 3, 32, 32), torch.randint(10, (10,))
    expected = l2w.predict(model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels),
                                                              batch_size=4), torch.device("cpu"), small_cfg())
    torch.save({"model": model.state_dict(), "images": images, "labels": labels,
                "expected": expected[0]}, tmp_path / "setup.pt")
    torch.multiprocessing.spawn(predict_on_two_ranks, args=(str(tmp_path),), nprocs=2)
    assert (tmp_path / "rank0.ok").exists() and (tmp_path / "rank1.ok").exists()


def predict_on_two_ranks(rank, folder):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    try:
        setup = torch.load(os.path.join(folder, "setup.pt"), weights_only=True)
        model = models.build_model("msdnet", 10, 2)
        model.load_state_dict(setup["model"])
        if rank == 1:   # rank 1's running statistics drifted away from rank 0's
            for name, buffer in model.named_buffers():
                if "running" in name:
                    buffer.add_(1.0)
        dataset = torch.utils.data.TensorDataset(setup["images"], setup["labels"])
        loader = data.make_loader(dataset, small_cfg(batch_size=4, world_size=2), torch.device("cpu"), shuffle=False)
        loader = [(dataset[b][0], dataset[b][1]) for b in ([i for _, i in batch] for batch in loader.batch_sampler)]
        out = l2w.predict(model, loader, torch.device("cpu"), small_cfg())
        if rank == 0:
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out[0], setup["expected"], strict=True))
            assert torch.equal(out[1], setup["labels"])
        else:
            assert out is None
        open(os.path.join(folder, f"rank{rank}.ok"), "w").close()
    finally:
        dist.destroy_process_group()


def test_help_and_docstring_say_what_holds():
    # --lr 0 is refused, so the help says to leave --lr out for the paper's rule; the demo's time is
    # the README's; the per-image seed is what PyTorch's CPU generator uses, 32 bits
    parser_help = cli("--help").stdout
    lr_help = " ".join(parser_help.split("\n  --lr LR")[1].split("\n  --momentum")[0].split())
    assert "leave it out for the paper's" in lr_help and "default: 0.0" not in lr_help, lr_help
    readme = open(os.path.join(HERE, "README.md")).read()
    assert "## A demo in a minute\n" in readme and "offline demo, about a minute\n" in l2w.__doc__
    seeds = [data.seed_of(0, epoch, index) for epoch in range(3) for index in range(100)]
    assert all(0 <= seed < 2 ** 32 for seed in seeds) and "32-bit" in data.seed_of.__doc__
    draws = [torch.rand(4, generator=torch.Generator().manual_seed(seed)) for seed in (seeds[0], seeds[0] + 2 ** 32)]
    assert torch.equal(*draws)   # the bits above 32 were never used


def test_config_precedence_defaults_preset_flags():
    cfg, state = l2w.parse_config(["--dataset", "cifar100", "--exits", "7"])
    assert state is None and (cfg.batch_size, cfg.lr, cfg.epochs, cfg.q, cfg.delta) == (1024, 0.8, 300, 0.75, 0.8)
    assert cfg.exits == 7 and cfg.constraint == "col" and cfg.meta_interval == 1 and cfg.wpn_width == 500
    assert cfg.out == os.path.join("runs", "cifar100_msdnet7_l2w_q0.75_seed0")
    cfg, _ = l2w.parse_config(["--dataset", "synthetic", "--batch-size", "64", "--method", "baseline"])
    assert cfg.batch_size == 64 and cfg.epochs == l2w.PRESETS["synthetic"]["epochs"]
    assert cfg.method == "baseline" and cfg.momentum == l2w.Config.momentum


def test_bench_reports_the_three_iterations_and_their_ratios_and_the_data_pipeline(tmp_path, monkeypatch):
    # on a CIFAR-10 of 10,000 training images in torchvision's format (the preset holds out 5,000)
    import torchvision
    lists = write_fake_cifar10(str(tmp_path), per_batch=2_000, n_test=20)
    for name, value in zip(("train_list", "test_list", "meta"), lists):
        monkeypatch.setattr(torchvision.datasets.CIFAR10, name, value)   # checksums of our files
    result = cli("--bench", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--exits", "2", "--batch-size", "8",
                 "--bench-iters", "1", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^data +[\d.]+ img/s: the training data pipeline \(augmented on the device\)$", result.stdout,
                     re.M), result.stdout
    ms = {line.split()[0]: float(line.split()[1]) for line in result.stdout.splitlines()
          if line.startswith(("plain ", "higher ", "jvp "))}
    assert set(ms) == {"plain", "higher", "jvp"}
    ratios = dict(re.findall(r"(\S+/\S+) ([\d.]+)x", result.stdout.split("ratio")[1]))
    assert float(ratios["higher/plain"]) == pytest.approx(ms["higher"] / ms["plain"], rel=0.01, abs=0.01)
    assert float(ratios["jvp/plain"]) == pytest.approx(ms["jvp"] / ms["plain"], rel=0.01, abs=0.01)
    assert float(ratios["jvp/higher"]) == pytest.approx(ms["jvp"] / ms["higher"], rel=0.01, abs=0.01)
    assert ms["higher"] > ms["plain"] and ms["jvp"] > ms["plain"]   # the meta step costs
    # without the data the iterations (random images) are timed all the same; one line says why not the data
    result = cli("--bench", "--dataset", "folder", "--data-dir", str(tmp_path / "none"), "--image-size", "32",
                 "--exits", "2", "--batch-size", "8", "--bench-iters", "1", "--device", "cpu")
    assert result.returncode == 0 and "jvp/higher" in result.stdout, result.stderr
    assert re.search(r"^data   not timed: .*none", result.stdout, re.M), result.stdout


def test_bad_input_gives_one_line_and_nonzero_exit(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    phase1 = tmp_path / "phase1.pt"
    write_config_checkpoint(phase1, imta="pretrain")
    cases = {
        "unknown dataset": ["--dataset", "mnist"],
        "unknown arch": ["--arch", "resnet"],
        "--exits must be >= 1": ["--exits", "0"],
        "ranet builds 6 exits (Model-C-1) or 8 exits (Model-C-2), got 5": ["--arch", "ranet", "--exits", "5"],
        "--batch-size 7 must divide into two equal halves on each of 1 ranks": ["--batch-size", "7"],
        "--q must be a finite number > 0": ["--q", "0"],
        "--delta must be a finite number >= 0": ["--delta", "-0.1"],
        "unknown meta_grad 'exact'": ["--meta-grad", "exact"],
        "does not exist": ["--resume", str(tmp_path / "missing.pt")],
        "corrupt": ["--resume", str(corrupt)],
        "--eval-only needs --resume": ["--eval-only", "--dataset", "synthetic"],
        f"--weights '{tmp_path / 'none.pth'}' does not exist": ["--weights", str(tmp_path / "none.pth")],
        "invalid int value": ["--exits", "three"],
        f"cifar10 not found in '{tmp_path / 'empty'}'": ["--dataset", "cifar10", "--data-dir", str(tmp_path / "empty")],
        "unknown imta 'both' (choose pretrain, finetune)": ["--imta", "both"],
        "--imta is built for msdnet": ["--arch", "ranet", "--exits", "6", "--imta", "pretrain"],
        "--imta finetune needs --pretrained": ["--imta", "finetune"],
        "--pretrained is for --imta finetune": ["--pretrained", str(phase1)],
        "--exits 5 does not match the pretrained network's 3": ["--imta", "finetune", "--pretrained", str(phase1),
                                                                "--exits", "5"],
        "--kd-gamma must be in [0, 1]": ["--kd-gamma", "1.5"],
        "--kd-temperature must be a finite number > 0": ["--kd-temperature", "0"],
    }
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    partial = tmp_path / "partial.pt"
    torch.save({"config": {}, "model": {}, "wpn": {}, "optimizer": {}, "wpn_optimizer": {}, "epoch": 1, "batch": 0,
                "rng": {}}, partial)
    cases.update({
        "--print-every must be >= 1": ["--print-every", "0"],
        "--lr must be a finite number > 0": ["--lr", "-1"],
        "--q 1e+200 gives exit fractions": ["--q", "1e200"],
        "--q must be a finite number > 0, got nan": ["--q", "nan"],
        "--seed must be >= 0": ["--seed", "-1"],
        "is a file": ["--out", str(a_file)],
        "--synthetic-size must be >= 3": ["--synthetic-size", "-5"],
        "--bench-iters must be >= 1": ["--bench", "--bench-iters", "0"],
        "unknown device 'mps'": ["--device", "mps"],
        "--step must be >= 1": ["--step", "0"],
        "--base must be >= 1": ["--base", "0"],
        "--momentum must be in [0, 1)": ["--momentum", "1.5"],
        "--lr must be a finite number > 0 (leave it out": ["--lr", "0"],
        "--holdout-indices gives the hold-out split, and --holdout 0": ["--holdout-indices", str(a_file), "--holdout", "0"],
        "--meta-interval must be >= 1": ["--meta-interval", "0"],
        "--save-every must be >= 0": ["--save-every", "-1"],
        "lacks holdout_indices": ["--resume", str(partial)],
        **{f"cannot reduce {s}x{s} images": ["--dataset", "folder", "--image-size", str(s)] for s in (16, 56, 128)},
    })
    def one_line(msg, code, stderr):
        assert code != 0, msg
        assert "Traceback" not in stderr, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], (msg, stderr)

    # Three as a user meets them (a process of its own: exit code, what reaches stderr); the rest
    # through the same main() in this process (an exception other than the exit fails the test).
    in_processes = ("unknown dataset", "invalid int value", "corrupt")
    procs = {msg: subprocess.Popen([sys.executable, os.path.join(HERE, "l2w.py"), "--out", str(tmp_path / "o"),
                                    *cases[msg]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for msg in in_processes}
    for msg, args in cases.items():
        if msg not in in_processes:
            result = cli("--out", tmp_path / "o", *args)
            one_line(msg, result.returncode, result.stderr)
    for msg, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        one_line(msg, proc.returncode, stderr)
    assert not (tmp_path / "o").exists()   # nothing written


# ----------------------------------------------------------------------------
# Long-tailed CIFAR, image folders, mixed precision, torchrun
# ----------------------------------------------------------------------------

def test_long_tailed_counts_match_the_published_profile():
    cifar10 = torch.arange(50_000) % 10      # 5,000 images per class
    cifar100 = torch.arange(50_000) % 100    # 500 per class
    kept = data.long_tailed_indices(cifar10, 100)
    assert len(kept) == 12_406 and len(data.long_tailed_indices(cifar100, 100)) == 10_847
    counts = torch.bincount(cifar10[kept]).tolist()
    assert counts[0] == 5000 and counts[-1] == 50 and counts == sorted(counts, reverse=True)
    assert torch.equal(kept, data.long_tailed_indices(cifar10, 100, seed=0))
    assert len(data.long_tailed_indices(cifar10, 1)) == 50_000


def write_image_tree(root, classes, per_class=4, splits=("train", "val")):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            os.makedirs(os.path.join(root, split, c))
            for i in range(per_class):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, c, f"{i}.png"))


def test_folder_dataset_loads_and_trains_end_to_end(tmp_path, monkeypatch):
    # with the largest seed the command line takes (per-image seeds once overflowed above 1,844,665)
    write_image_tree(str(tmp_path), ["ant", "bee", "cat"], per_class=6)
    # files beside the class folders are ignored, as torchvision's ImageFolder ignores them
    strays = [tmp_path / "train" / ".DS_Store", tmp_path / "train" / "labels.csv", tmp_path / "val" / "README.txt"]
    for stray in strays:
        stray.write_text("not a class folder")
    cfg = small_cfg(dataset="folder", data_dir=str(tmp_path), image_size=32, holdout=3, seed=2 ** 32 - 1)
    splits = data.load(cfg)
    assert splits.ignored == tuple(str(stray) for stray in strays)
    assert splits.num_classes == 3 and splits.class_counts == [6, 6, 6]
    assert (len(splits.train), len(splits.threshold_set), len(splits.test)) == (15, 3, 18)
    image, label = splits.train[(2, 0)]
    assert image.shape == (3, 32, 32) and label in (0, 1, 2)
    assert torch.equal(splits.train[(2, 0)][0], image)          # augmentation seeded per (epoch, sample)
    assert not torch.equal(splits.train[(3, 0)][0], image)
    # an epoch draws each image's crop and flip from a generator of its own: no torch.manual_seed per
    # image (which also reseeds every GPU's generator)
    with monkeypatch.context() as m:
        seeded = []
        m.setattr(torch, "manual_seed", seeded.append)
        epoch = list(data.make_loader(splits.train, dataclasses.replace(cfg, batch_size=4), torch.device("cpu"), True))
        assert sum(len(y) for _, y in epoch) == 12 and seeded == []
    out = tmp_path / "run"
    result = cli("--dataset", "folder", "--data-dir", str(tmp_path), "--image-size", "32", "--exits", "2",
                 "--epochs", "1", "--batch-size", "4", "--holdout", "3", "--workers", "2", "--out", str(out),
                 "--device", "cpu", "--seed", str(2 ** 32 - 1))
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert len(results["anytime"]) == 2 and results["class_counts"] == [6, 6, 6]
    # no --lr: the paper's rule at this batch, 0.1 x 2 / 64, in the log and in results.json
    assert results["config"]["lr"] == 0.003125 and "; batch 4, lr 0.003125\n" in result.stdout
    said = [line for line in result.stdout.splitlines() if "not class folders" in line]
    assert said == [f"ignored 3 files that are not class folders: {', '.join(map(str, strays))}"]


def test_imagenet_style_crops_are_torchvisions_boxes_drawn_from_a_generator_of_their_own():
    # RandomResizedCrop's box, drawn from the image's own generator (torchvision's class draws from
    # the process's random stream): the same distribution as torchvision's boxes, and ImageNet's
    # test transform, resize to 256/224 of the size and centre crop, as torchvision's classes
    import torchvision.transforms as T
    from PIL import Image
    width, height, draws = 160, 90, 3000
    g = torch.Generator().manual_seed(0)
    ours = [data.resized_crop_box(width, height, g) for _ in range(draws)]
    torch.manual_seed(0)
    theirs = [T.RandomResizedCrop.get_params(Image.new("RGB", (width, height)), (0.08, 1.0), (3 / 4, 4 / 3))
              for _ in range(draws)]
    for boxes in (ours, theirs):
        assert all(0 <= top <= height - h and 0 <= left <= width - w for top, left, h, w in boxes)
    summary = lambda boxes: (statistics.fmean(h * w / (width * height) for _, _, h, w in boxes),
                             statistics.fmean(math.log(w / h) for _, _, h, w in boxes),
                             statistics.fmean((top + h / 2) / height for top, _, h, _ in boxes))
    for a, b in zip(summary(ours), summary(theirs)):
        assert abs(a - b) < 0.025, (summary(ours), summary(theirs))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 160, 3), dtype=np.uint8))
    expected = T.Compose([T.Resize(73), T.CenterCrop(64), T.ToTensor(), T.Normalize(*data.IMAGENET_STATS)])(image)
    train, test = data.folder_transforms(64)
    assert torch.equal(test(image, None), expected)
    assert train(image, torch.Generator().manual_seed(1)).shape == (3, 64, 64)
    assert torch.equal(train(image, torch.Generator().manual_seed(1)), train(image, torch.Generator().manual_seed(1)))
    # small folder images: resize, RandomCrop(size, padding=size/8), flip, as torchvision's classes at
    # the offset and flip the generator drew (in that order)
    train, _ = data.folder_transforms(32)
    flips = set()
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        (top, left), flip = torch.randint(9, (2,), generator=g).tolist(), torch.rand(1, generator=g).item() < 0.5
        with pytest.MonkeyPatch.context() as m:
            m.setattr(T.RandomCrop, "get_params", staticmethod(lambda image, size: (top, left, 32, 32)))
            expected = T.Compose([T.Resize((32, 32)), T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(float(flip)),
                                  T.ToTensor(), T.Normalize(*data.IMAGENET_STATS)])(image)
        assert torch.equal(train(image, torch.Generator().manual_seed(seed)), expected)
        flips.add(flip)
    assert flips == {False, True}


@pytest.mark.parametrize("layout, message", [
    ("no val", "no 'val' folder"),
    ("loose val images", "outside class folders"),
    ("classes differ", "'bee' has no folder in val"),
    ("not 1000 classes", "expected 1000 class folders"),
])
def test_image_folder_layout_errors(tmp_path, layout, message):
    from PIL import Image
    write_image_tree(str(tmp_path), ["ant", "bee"], per_class=1, splits=("train",))
    if layout == "loose val images":
        os.makedirs(tmp_path / "val")
        Image.new("RGB", (8, 8)).save(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG")
    elif layout == "classes differ":
        write_image_tree(str(tmp_path), ["ant", "dog"], per_class=1, splits=("val",))
    elif layout == "not 1000 classes":
        write_image_tree(str(tmp_path), ["ant", "bee"], per_class=1, splits=("val",))
    with pytest.raises(data.DataError, match=message):
        data.image_folders("imagenet", str(tmp_path), 1000)
    if layout == "not 1000 classes":   # and through the CLI: one line, non-zero exit
        result = cli("--dataset", "imagenet", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"))
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert result.stderr.strip().count("\n") == 0 and message in result.stderr


class Recorded(Exception):
    """Stops an iteration once the gradient a test wants is recorded."""


def first_meta_gradient(setup, cfg, scalers=None):
    """The WPN's gradient at its first step in a train_step on a copy of `setup` (the rest of the
    iteration is not run)."""
    model, wpn, optimizer, wpn_optimizer, images, targets = copy.deepcopy(setup)
    recorded = []

    def record():
        recorded.append(torch.cat([p.grad.flatten() for p in wpn.parameters()]))
        raise Recorded

    wpn_optimizer.step = record
    options = l2w.method_options(cfg, torch.device("cpu"))
    with pytest.raises(Recorded):
        l2w.train_step(model, wpn, optimizer, wpn_optimizer, images, targets, cfg, **{**options, "scalers": scalers})
    return recorded[0]


class NoHostReads(TorchDispatchMode):
    """Refuses the operations by which the host reads a tensor's values (.item(), bool(), a boolean
    mask's nonzero): what the meta device refuses, for runs on the CPU (it cannot see .tolist())."""

    READS = ("_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.READS:
            raise AssertionError(f"the host reads a value: {func}")
        return func(*args, **(kwargs or {}))


def tf32(x):
    """x rounded to TF32 (10 of fp32's 23 mantissa bits, to nearest): what cuDNN's TF32 kernels
    do to the operands of an fp32 convolution on Ampere and later GPUs."""
    return ((x.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)


class TF32Convolutions(TorchDispatchMode):
    """Every fp32 convolution (forward, backward, tangent) with its operands rounded to TF32."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        operands = {"convolution": 2, "convolution_backward": 3}.get(func.__name__.split(".")[0], 0)
        args = [tf32(a) if i < operands and a.dtype == torch.float32 else a for i, a in enumerate(args)]
        return func(*args, **(kwargs or {}))


def meta_gradient_precision(half=32, exits=3, meta_grad="higher", other_halves=3, seed=0, lr=0.1):
    """The WPN's meta-gradient at one state (MSDNet, `exits` exits, `half` images per half, momentum
    buffers filled): relative errors against float64 of fp32 and of fp32 with TF32 convolutions,
    and the batch-to-batch spread, the mean relative difference to the meta-gradients (float64)
    of the same state and train half with `other_halves` other meta halves. README, "--tf32"."""
    cfg, *setup = double_setup(seed, batch=2 * half, exits=exits, meta_grad=meta_grad, lr=lr)
    exact = first_meta_gradient(setup, cfg)
    model, wpn, optimizer, wpn_optimizer, images, targets = copy.deepcopy(setup)
    for buffer in optimizer.state.values():
        buffer["momentum_buffer"] = buffer["momentum_buffer"].float()
    fp32 = (model.float(), wpn.float(), optimizer, wpn_optimizer, images.float(), targets)
    with TF32Convolutions():
        tf32_gradient = first_meta_gradient(fp32, cfg)
    relative = lambda g: ((g.double() - exact).norm() / exact.norm()).item()
    g = torch.Generator().manual_seed(seed + 1)
    others = [first_meta_gradient((*setup[:4], torch.cat([images[:half], torch.randn(half, 3, 32, 32, generator=g,
                                                                                     dtype=torch.float64)]),
                                   torch.cat([targets[:half], torch.randint(10, (half,), generator=g)])), cfg)
              for _ in range(other_halves)]
    return {"fp32": relative(first_meta_gradient(fp32, cfg)), "tf32": relative(tf32_gradient),
            "spread": statistics.fmean(relative(o) for o in others) if others else None}


def tf32_error(halves=(32,), seeds=(0, 1, 2)):
    """The README's figures (`meta_gradient_precision`): MSDNet with 3 exits, both meta-gradients,
    the states of three seeds."""
    print("the WPN's meta-gradient, relative distance from float64 (MSDNet, 3 exits, random images, "
          "one iteration in): fp32, fp32 with TF32 convolutions, and another meta half")
    for half, meta_grad, seed in itertools.product(halves, ("higher", "jvp"), seeds):
        errors = meta_gradient_precision(half=half, meta_grad=meta_grad, seed=seed)
        print(f"{half} images per half, {meta_grad:6s} seed {seed}: fp32 {errors['fp32']:.1e}, TF32 {errors['tf32']:.1%}, "
              f"batch-to-batch {errors['spread']:.0%}", flush=True)


def test_meta_gradient_under_amp_is_close_to_fp32(monkeypatch):
    torch.manual_seed(0)
    cfg = small_cfg(lr=0.5, batch_size=16)
    model, wpn, optimizer, wpn_optimizer, _ = l2w.build(cfg, 10, torch.device("cpu"))
    images, targets = torch.randn(16, 3, 32, 32), torch.randint(10, (16,))
    l2w.train_step(model, wpn, optimizer, wpn_optimizer, images.flip(0), targets.flip(0), cfg)  # momentum
    setup = (model, wpn, optimizer, wpn_optimizer, images, targets)
    fp32 = first_meta_gradient(setup, cfg)
    jvp = dataclasses.replace(cfg, meta_grad="jvp")
    fp32_jvp = first_meta_gradient(setup, jvp)
    assert torch.allclose(fp32_jvp, fp32, rtol=1e-3, atol=1e-4 * fp32.abs().max())
    # TF32 convolutions (emulated), what --tf32 gives on Ampere and later GPUs: far from fp32, whose
    # two meta-gradients agree (here 28 % against 6e-7; README figures: t.tf32_error())
    with TF32Convolutions():
        tf32_distance = (fp32 - first_meta_gradient(setup, cfg)).norm()
    assert tf32_distance > 0.01 * fp32.norm() and tf32_distance > 1000 * (fp32_jvp - fp32).norm()
    error = {}
    for name, meta_grad in (("bf16", cfg), ("bf16 jvp", jvp)):
        with NoHostReads():   # steps 1-5 in bf16 read no value (the meta device, which reads none, refuses autocast)
            error[name] = (fp32 - first_meta_gradient(setup, dataclasses.replace(meta_grad, amp=True))).norm()
    # fp16 with loss scaling (what GPUs without bf16 get), run on the CPU
    monkeypatch.setattr(l2w, "amp_dtype", lambda device: torch.float16)
    for name, meta_grad in (("fp16", cfg), ("fp16 jvp", jvp)):
        amp = dataclasses.replace(meta_grad, amp=True)
        scalers = {"real": torch.amp.GradScaler("cpu"), "meta": torch.amp.GradScaler("cpu")}
        error[name] = (fp32 - first_meta_gradient(setup, amp, scalers)).norm()
    for name in ("bf16", "fp16"):
        assert error[name] < 0.3 * fp32.norm()
        # the first-order path is as close to fp32 as the second-order one
        assert error[name + " jvp"] < max(1.25 * error[name], 0.02 * fp32.norm())


def test_fp16_wpn_keeps_learning_when_the_backbone_scale_grows(monkeypatch):
    # In meta iterations the real step's forward is fp32, so the backbone's scaler never sees an
    # overflow and its scale keeps growing. The WPN's meta backward has its own scaler, which
    # lowers its scale when the scaled gradient overflows: the WPN must go on learning.
    monkeypatch.setattr(l2w, "amp_dtype", lambda device: torch.float16)
    torch.manual_seed(0)
    cfg = small_cfg(exits=2, lr=0.1, batch_size=8, amp=True)
    model, wpn, optimizer, wpn_optimizer, options = l2w.build(cfg, 10, torch.device("cpu"))
    scalers = options["scalers"] = {name: torch.amp.GradScaler("cpu", init_scale=2.0 ** start, growth_interval=1)
                                    for name, start in (("real", 40), ("meta", 20))}
    images, targets = torch.randn(8, 3, 32, 32), torch.randint(10, (8,))
    updated, skipped = [], 0
    for _ in range(6):   # the backbone's scale grows 4x an iteration: 2^40 -> 2^52
        before = [p.detach().clone() for p in wpn.parameters()]
        out = l2w.train_step(model, wpn, optimizer, wpn_optimizer, images, targets, cfg, **options)
        updated.append(any(not torch.equal(a, p) for a, p in zip(before, wpn.parameters())))
        skipped += out["wpn_skipped"]
    assert scalers["real"].get_scale() >= 2.0 ** 50   # the backbone's scale grew all along
    assert skipped > 0 and scalers["meta"].get_scale() < 2.0 ** 40   # overflows were seen and answered
    assert sum(updated[-4:]) >= 3   # ... and the WPN still takes steps at the end


def test_device_cuda_n_is_made_current_first_and_timing_synchronises_it(monkeypatch):
    # No GPU here: CUDA's functions record their calls; any other use of CUDA would raise. The run
    # stops where it would build the network on the card.
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name in ("set_device", "synchronize", "reset_peak_memory_stats", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None, name=name: calls.append((name, device)) or 0)
    monkeypatch.setattr(l2w, "build", lambda *args: (_ for _ in ()).throw(Recorded()))
    with pytest.raises(Recorded):
        l2w.main(["--bench", "--dataset", "synthetic", "--device", "cuda:1"])
    assert calls == [("set_device", torch.device("cuda", 1))]
    calls.clear()
    seconds, out, peak = l2w.timed(lambda: "done", None, torch.device("cuda", 1))   # as --bench and --early-exit time
    card = torch.device("cuda", 1)
    assert out == "done" and peak == 0 and calls == [("synchronize", card), ("reset_peak_memory_stats", card),
                                                     ("synchronize", card), ("max_memory_allocated", card)]


def test_progress_counts_training_time_only_and_cudnn_benchmarks_training_unless_deterministic(tmp_path, monkeypatch,
                                                                                               capsys):
    # A clock that moves 1 s per iteration and 1000 s per evaluation and per checkpoint: img/s and
    # the ETA must see the iterations only. cuDNN's benchmark mode (kernels timed once per shape)
    # is on for training, whose shapes repeat, off for evaluation and under --deterministic.
    now, seen = [0.0], []
    monkeypatch.setattr(l2w, "time", types.SimpleNamespace(time=lambda: now[0], perf_counter=time.perf_counter))
    for name, cost in (("train_step", 1), ("predict", 1000), ("atomic_write", 1000)):
        def timed_call(*args, real=getattr(l2w, name), name=name, cost=cost, **kwargs):
            now[0] += cost
            seen.append((name, torch.backends.cudnn.benchmark))
            return real(*args, **kwargs)
        monkeypatch.setattr(l2w, name, timed_call)
    cfg = small_cfg(exits=2, epochs=2, batch_size=8, synthetic_size=30, holdout=6, print_every=1, save_every=2)
    l2w.train(dataclasses.replace(cfg, out=str(tmp_path / "run")))
    progress = [line for line in capsys.readouterr().out.splitlines() if " img/s " in line]
    assert len(progress) == 6 and all(" 8 img/s ETA " in line for line in progress), progress
    assert [line.split("ETA ")[1] for line in progress] == [f"0:00:0{5 - i}" for i in range(6)]
    predicted = [b for name, b in seen if name == "predict"]   # hold-out after each epoch, then the test set
    assert {b for name, b in seen if name == "train_step"} == {True} and predicted == [False, False, False]
    assert torch.backends.cudnn.benchmark is False
    # --deterministic: deterministic kernels, asked for before CUDA starts, and no benchmark mode
    requested = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", requested.append)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen.clear()
    l2w.train(dataclasses.replace(cfg, epochs=1, deterministic=True, out=str(tmp_path / "det")))
    assert requested == [True] and torch.backends.cudnn.deterministic and os.environ["CUBLAS_WORKSPACE_CONFIG"]
    assert {b for name, b in seen if name == "train_step"} == {False}


def test_amp_picks_fp16_on_gpus_without_native_bf16(monkeypatch):
    # torch.cuda.is_bf16_supported() is True on pre-Ampere GPUs too (emulated, slow): not a criterion
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for capability, dtype in (((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert l2w.amp_dtype(torch.device("cuda", 0)) == dtype
    assert l2w.amp_dtype(torch.device("cpu")) == torch.bfloat16


def test_cli_amp_run_on_cpu(tmp_path):
    out = tmp_path / "amp"
    result = cli("--dataset", "synthetic", "--exits", "2", "--epochs", "1", "--synthetic-size", "200",
                 "--holdout", "40", "--batch-size", "32", "--amp", "--channels-last", "--out", str(out),
                 "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "amp bfloat16" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["amp"] is True and all(math.isfinite(r["acc1"]) for r in results["anytime"])


# torchrun runs this in place of l2w.py: at its SIGNAL_AT-th SGD step rank 0 sends SIGTERM to the
# launcher, as a scheduler would, and rank 0 writes its checkpoint only once the other ranks have
# left (or 2 s on); each rank notes at exit whether the checkpoint was there.
PREEMPTED_RANK = """
import atexit, os, runpy, signal, sys, time
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

rank, world, env = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), os.environ
steps = 0

def signal_the_launcher(optimizer, args, kwargs):
    global steps
    if rank == 0 and isinstance(optimizer, torch.optim.SGD):
        steps += 1
        if steps == int(env["SIGNAL_AT"]):
            os.kill(os.getppid(), signal.SIGTERM)
            time.sleep(0.5)   # time for the launcher to pass it on to every rank within this iteration

def save_once_the_others_left(obj, f, save=torch.save):
    deadline = time.time() + 2
    while time.time() < deadline and not all(os.path.exists(f"{env['LEFT']}.{r}") for r in range(1, world)):
        time.sleep(0.05)
    save(obj, f)

def note_leaving():
    with open(f"{env['LEFT']}.{rank}", "w") as f:
        f.write(str(os.path.exists(env["CHECKPOINT"])))

register_optimizer_step_pre_hook(signal_the_launcher)
torch.save = save_once_the_others_left
atexit.register(note_leaving)
sys.path.insert(0, os.path.dirname(env["L2W"]))
sys.argv[0] = env["L2W"]
runpy.run_path(env["L2W"], run_name="__main__")
"""


def test_sigterm_to_torchrun_stops_the_ranks_together_after_the_checkpoint_and_resume_is_exact(tmp_path):
    # torchrun passes SIGTERM on to its workers and kills them TORCH_ELASTIC_SHUTDOWN_TIMEOUT s later
    # (30 by default, 20 here): the ranks must agree to stop within an iteration or two, not at the next
    # progress line (here the epoch's end); none may leave before rank 0 has written the checkpoint;
    # and the resumed run must end bit-identical to the straight one. Three ranks: beyond two, how a
    # gradient is summed over the ranks depends on its place in DDP's buckets, which a resumed
    # process must lay out as the straight run did.
    args = ["--dataset", "synthetic", "--exits", "2", "--epochs", "1", "--synthetic-size", "80", "--holdout", "8",
            "--batch-size", "12", "--print-every", "1000", "--device", "cpu"]   # 6 iterations

    def torchrun(script, *args, **env):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3",
                               script, *args], capture_output=True, text=True, cwd=str(tmp_path), timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **env})

    l2w_py, straight, split = os.path.join(HERE, "l2w.py"), tmp_path / "straight", tmp_path / "split"
    result = torchrun(l2w_py, *args, "--out", str(straight))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1 and result.stdout.count("anytime (test set") == 1   # rank 0 alone
    assert sorted(p.name for p in straight.iterdir()) == ["checkpoint.pt", "holdout_indices.json", "results.json"]
    results = json.loads((straight / "results.json").read_text())
    assert results["config"]["world_size"] == 3 and len(results["dynamic"]) == 39 and len(results["anytime"]) == 2
    # the ranks scored with the checkpoint's weights and BatchNorm statistics: one process evaluating
    # the checkpoint gets the same numbers, number for number
    single = cli("--eval-only", "--resume", str(straight / "checkpoint.pt"), "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    evaluated = json.loads((tmp_path / "single" / "results.json").read_text())
    assert evaluated["anytime"] == results["anytime"] and evaluated["dynamic"] == results["dynamic"]
    (tmp_path / "preempted.py").write_text(PREEMPTED_RANK)
    result = torchrun(str(tmp_path / "preempted.py"), *args, "--out", str(split), TORCH_ELASTIC_SHUTDOWN_TIMEOUT="20",
                      L2W=l2w_py, SIGNAL_AT="4", LEFT=str(tmp_path / "left"), CHECKPOINT=str(split / "checkpoint.pt"))
    assert "forcefully exiting" not in result.stderr and "stopped by signal 15" in result.stdout, result.stderr[-3000:]
    assert [(tmp_path / f"left.{r}").read_text() for r in (1, 2)] == ["True", "True"], "a rank left before the checkpoint"
    state = l2w.load_checkpoint(str(split / "checkpoint.pt"))
    assert (state["epoch"], state["batch"]) in ((0, 3), (0, 4))   # the signal came in iteration 2
    result = torchrun(l2w_py, "--resume", str(split / "checkpoint.pt"))
    assert result.returncode == 0 and "resumed from" in result.stdout, result.stderr[-3000:]
    a, b = (torch.load(run / "checkpoint.pt", weights_only=True) for run in (straight, split))
    for key in ("model", "wpn"):
        differ = [k for k in a[key] if not torch.equal(a[key][k], b[key][k])]
        assert not differ, f"{len(differ)} of the {len(a[key])} {key} tensors differ from the straight run's"
    a, b = (json.loads((run / "results.json").read_text()) for run in (straight, split))
    assert a["anytime"] == b["anytime"] and a["dynamic"] == b["dynamic"]


# ----------------------------------------------------------------------------
# IMTA (Li et al., ICCV 2019): gradient equilibrium, ISC, one-for-all distillation
# ----------------------------------------------------------------------------

def plain_and_ge_msdnet(exits=3):
    """The same float64 MSDNet (same parameters) without and with gradient equilibrium."""
    torch.manual_seed(0)
    plain = models.build_model("msdnet", 10, exits).double()
    ge = models.build_model("msdnet", 10, exits, gradient_equilibrium=True).double()
    ge.load_state_dict(plain.state_dict())
    return plain, ge


def exit_gradients(model, images, targets, exits):
    """{name: gradient} of the summed CE of the given exits."""
    model.zero_grad()
    logits = model(images)
    sum(F.cross_entropy(logits[k], targets) for k in exits).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_gradient_equilibrium_keeps_the_forward_and_divides_exit_m_gradient_by_k_minus_m():
    plain, ge = plain_and_ge_msdnet(exits=3)
    images, targets = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(10, (4,))
    assert all(torch.equal(a, b) for a, b in zip(plain(images), ge(images), strict=True))
    for m in range(3):
        # exit m's loss reaches block m (and the stem, for m = 0) only through the tensor its
        # classifier reads, which GE scales by 1 / (K - m); its classifier sees the plain gradient
        want, got = exit_gradients(plain, images, targets, [m]), exit_gradients(ge, images, targets, [m])
        assert [n for n in want if want[n] is None] == [n for n in got if got[n] is None]
        # (finer-scale units of block m feed only block m + 1: no gradient from exit m)
        own_block = [n for n in want if want[n] is not None and
                     (n.startswith(f"blocks.{m}.") or (m == 0 and n.startswith("stem.")))]
        own_exit = [n for n in want if n.startswith(f"exits.{m}.")]
        assert own_block and own_exit
        for n in own_block:
            assert torch.allclose(got[n], want[n] / (3 - m), rtol=1e-10, atol=1e-14), n
        for n in own_exit:
            assert torch.allclose(got[n], want[n], rtol=1e-10, atol=1e-14), n
        assert max(want[n].abs().max() for n in own_block) > 1e-6


def test_gradient_equilibrium_equals_gradient_hooks_on_the_plain_network():
    # IMTA's rule written a second way, with tensor hooks on a plain MSDNet: after block k the
    # coarsest tensor's gradient is multiplied by 1 / (K - k) before exit k reads it and the
    # gradient from block k + 1 by K - k - 1.
    plain, ge = plain_and_ge_msdnet(exits=3)
    images, targets = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(10, (4,))

    def hooked_forward(x):
        features, n_exits, logits = plain.stem(x), len(plain.blocks), []
        for k, (block, head) in enumerate(zip(plain.blocks, plain.exits)):
            features = block(features)
            into_exit = features[-1].view_as(features[-1])
            into_exit.register_hook(lambda g, s=1 / (n_exits - k): g * s)
            logits.append(head(into_exit))
            onward = into_exit.view_as(into_exit)
            onward.register_hook(lambda g, s=n_exits - k - 1: g * s)
            features = features[:-1] + [onward]
        return logits

    plain.zero_grad()
    sum(F.cross_entropy(z, targets) for z in hooked_forward(images)).backward()
    got = exit_gradients(ge, images, targets, range(3))
    for n, p in plain.named_parameters():
        assert torch.allclose(got[n], p.grad, rtol=1e-10, atol=1e-14), n
    # and GE does change the gradient of the network's loss
    plain_grads = exit_gradients(plain, images, targets, range(3))
    assert not torch.allclose(got["stem.scales.0.0.weight"], plain_grads["stem.scales.0.0.weight"])


def test_gradient_equilibrium_is_msdnet_only():
    with pytest.raises(ValueError, match="gradient equilibrium .* msdnet, not ranet"):
        models.build_model("ranet", 10, 6, gradient_equilibrium=True)


def test_distillation_loss_hand_worked():
    # 2 classes, teacher logits (0, 0): p_teacher = (1/2, 1/2). Exit 1: z = (ln 3, 0), label 0,
    # softmax (3/4, 1/4): CE = ln(4/3), KL(p_teacher || p) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3).
    # Last exit: z = (0, ln 3), label 0: CE only, ln 4.
    z1, last = torch.tensor([[math.log(3), 0.0]]), torch.tensor([[0.0, math.log(3)]])
    teacher, label = torch.zeros(1, 2), torch.tensor([0])
    ce, kl = math.log(4 / 3), 0.5 * math.log(4 / 3)
    for reduction, kl_used in (("mean", kl / 2), ("batchmean", kl)):   # mean: KL / classes (IMTA)
        losses = models.distillation_losses([z1, last], teacher, label, 1.0, 0.5, reduction)
        assert losses[0].tolist() == pytest.approx([0.5 * ce + 0.5 * kl_used, math.log(4)], rel=1e-6)
    # T = 2: softmax(z / 2) = (sqrt 3, 1) / (1 + sqrt 3), KL = 1/2 ln((1 + sqrt 3)^2 / (4 sqrt 3)), times T^2
    kl_t2 = 0.5 * math.log((1 + math.sqrt(3)) ** 2 / (4 * math.sqrt(3)))
    losses = models.distillation_losses([z1, last], teacher, label, 2.0, 0.9, "mean")
    assert losses[0, 0].item() == pytest.approx(0.1 * ce + 0.9 * 4 * kl_t2 / 2, rel=1e-6)


def test_distillation_loss_averages_to_imtas_batch_loss():
    # Averaged over the batch, each exit's column is IMTA's loss of that exit: (1 - gamma) CE +
    # gamma T^2 nn.KLDivLoss() with the old default (elementwise) mean; the last exit CE alone.
    torch.manual_seed(0)
    logits, teacher, labels = [torch.randn(6, 5) for _ in range(3)], torch.randn(6, 5), torch.randint(5, (6,))
    temperature, gamma = 3.0, 0.9
    losses = models.distillation_losses(logits, teacher, labels, temperature, gamma, "mean")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch warns that 'mean' divides by the classes too
        kl_div = torch.nn.KLDivLoss(reduction="mean")
        for k in range(2):
            want = ((1 - gamma) * F.cross_entropy(logits[k], labels) + gamma * temperature ** 2 *
                    kl_div(F.log_softmax(logits[k] / temperature, 1), F.softmax(teacher / temperature, 1)))
            assert losses[:, k].mean().item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.allclose(losses[:, 2], F.cross_entropy(logits[2], labels, reduction="none"))


def test_phase2_network_adds_exactly_the_new_heads_and_isc_to_a_frozen_msdnet():
    torch.manual_seed(0)
    backbone = models.build_model("msdnet", 10, 3)
    before = copy.deepcopy(backbone.state_dict())
    net = models.IMTANet(backbone, 10).train()
    # new heads Linear(128, 10), Linear(256, 10) x 2; ISC Linear(10, 128) + BatchNorm1d(128) x 2
    new = (128 * 10 + 10) + 2 * (256 * 10 + 10) + 2 * (10 * 128 + 128 + 2 * 128)
    assert new == 9_758
    assert sum(p.numel() for p in l2w.trainable_parameters(net).values()) == new
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in backbone.parameters()) + new
    assert not any(p.requires_grad for p in backbone.parameters())
    assert not backbone.training and net.heads.training and net.isc.training   # frozen BN: running statistics
    net(torch.randn(4, 3, 32, 32))
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
    # cost: exit 1's new Linear(128, 10) replaces the old one; each later exit adds ISC's linear
    # (1,280 + 128 Mul-Adds), its ReLU (128) and the wider head (+1,280), params +1,408 +256 +1,280
    flops, params = models.count_cost(backbone, 32)
    new_flops, new_params = models.count_cost(net, 32)
    assert new_flops == [flops[0], flops[1] + 2816, flops[2] + 2 * 2816]
    assert new_params == [params[0], params[1] + 2944, params[2] + 2 * 2944]


def reference_distillation_losses(model, state, images, targets, cfg):
    """IMTA's loss per sample and exit, from the formula: KL summed over classes / classes."""
    logits, teacher = functional_call(model, state, (images,), {"with_teacher": True})
    t, gamma = cfg.kd_temperature, cfg.kd_gamma
    p = (teacher / t).softmax(1)
    columns = []
    for z in logits[:-1]:
        kl = (p * (p.log() - (z / t).log_softmax(1))).sum(1) / z.shape[1]
        columns.append((1 - gamma) * F.cross_entropy(z, targets, reduction="none") + gamma * t * t * kl)
    return torch.stack(columns + [F.cross_entropy(logits[-1], targets, reduction="none")], 1)


def first_half_meta_gradient_and_reference(cfg, model, wpn, optimizer, wpn_optimizer, images, targets,
                                           exit_losses=reference_ce_losses):
    """The WPN gradient of the first half of a train_step, and the same from the torch.func reference."""
    ref = copy.deepcopy((model, wpn, optimizer))
    recorded = []
    step = wpn_optimizer.step
    wpn_optimizer.step = lambda: (recorded.append([p.grad.clone() for p in wpn.parameters()]), step())[1]
    l2w.train_step(model, wpn, optimizer, wpn_optimizer, images, targets, cfg,
                   **l2w.method_options(cfg, torch.device("cpu")))
    rmodel, rwpn, ropt = ref
    (x, xm), (y, ym) = images.chunk(2), targets.chunk(2)
    wpn_params = dict(rwpn.named_parameters())
    meta = reference_virtual_meta_loss(rmodel, wpn_params, rwpn, ropt, x, y, xm, ym, cfg, exit_losses)
    return recorded[0], torch.autograd.grad(meta, list(wpn_params.values()))


@pytest.mark.parametrize("meta_grad", ["higher", "jvp"])
def test_meta_gradient_through_gradient_equilibrium_matches_torch_func(meta_grad):
    cfg, model, wpn, optimizer, wpn_optimizer, images, targets = double_setup(seed=5, imta="pretrain")
    cfg = dataclasses.replace(cfg, meta_grad=meta_grad)
    assert model.gradient_equilibrium
    plain, plain_optimizer = copy.deepcopy((model, optimizer))   # one deepcopy keeps optimizer links
    plain.gradient_equilibrium = False
    plain_meta = reference_virtual_meta_loss(plain, dict(wpn.named_parameters()), wpn, plain_optimizer,
                                             images.chunk(2)[0], targets.chunk(2)[0], images.chunk(2)[1],
                                             targets.chunk(2)[1], cfg)
    plain_grads = torch.autograd.grad(plain_meta, list(wpn.parameters()))
    got, want = first_half_meta_gradient_and_reference(cfg, model, wpn, optimizer, wpn_optimizer, images, targets)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, rtol=1e-8, atol=1e-12)
    assert max(w.abs().max() for w in want) > 1e-6
    # GE is on the second-order path: without it the meta-gradient is another one
    assert not all(torch.allclose(g, p, rtol=1e-3) for g, p in zip(got, plain_grads))


@pytest.mark.parametrize("meta_grad", ["higher", "jvp"])
def test_meta_gradient_through_phase2_heads_matches_torch_func_and_phase1_stays_bit_identical(meta_grad):
    cfg, model, wpn, optimizer, wpn_optimizer, images, targets = double_setup(seed=6, imta="finetune")
    cfg = dataclasses.replace(cfg, meta_grad=meta_grad)
    frozen = copy.deepcopy(model.backbone.state_dict())
    heads_before = copy.deepcopy(l2w.trainable_parameters(model))
    # the optimizer holds exactly the new heads and ISC, and only they have momentum buffers
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {id(p) for p in l2w.trainable_parameters(model).values()}
    assert set(map(id, optimizer.state)) <= {id(p) for p in l2w.trainable_parameters(model).values()}
    got, want = first_half_meta_gradient_and_reference(cfg, model, wpn, optimizer, wpn_optimizer, images, targets,
                                                       reference_distillation_losses)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, rtol=1e-8, atol=1e-12)
    assert max(w.abs().max() for w in want) > 1e-6
    # after two L2W-DEN iterations: every phase-1 parameter and BN statistic is bit-identical,
    # no frozen parameter has a gradient, every new parameter has moved
    assert all(torch.equal(v, frozen[k]) for k, v in model.backbone.state_dict().items())
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(not torch.equal(p, heads_before[n]) for n, p in l2w.trainable_parameters(model).items())


def test_phase2_network_exits_early_as_the_simulated_protocol():
    # the new heads and the ISC chain are cut to the remaining samples along with the frozen scales
    torch.manual_seed(0)
    net = calibrate_batchnorm(models.IMTANet(models.build_model("msdnet", 10, 3), 10), torch.randn(64, 3, 32, 32))
    holdout, images = torch.randn(40, 3, 32, 32), torch.randn(13, 3, 32, 32)
    with torch.no_grad():
        thresholds = l2w.fit_thresholds(l2w.confidences(net(holdout)), l2w.exit_fractions(0.9, 3))
        logits = net(images)
    expected = l2w.exit_with_thresholds(l2w.confidences(logits), thresholds)
    served = [0, 0, 0]
    for k, head in enumerate(net.heads):
        head.register_forward_pre_hook(lambda m, inputs, k=k: served.__setitem__(k, served[k] + inputs[0].shape[0]))
    predictions, exits = l2w.early_exit_predict(net, images, thresholds)
    assert torch.equal(exits, expected) and 0 < int((expected == 0).sum()) < 13
    assert torch.equal(predictions, torch.stack(logits).argmax(dim=2)[expected, torch.arange(13)])
    assert served == [13, int((expected > 0).sum()), int((expected > 1).sum())]


def write_config_checkpoint(path, **config):
    """A checkpoint that holds a config only (enough for the checks parse_config makes)."""
    torch.save({"config": dataclasses.asdict(small_cfg(**config)), "model": {}, "wpn": {}, "optimizer": {},
                "wpn_optimizer": {}, "epoch": 1, "batch": 0, "rng": {}, "holdout_indices": torch.arange(3)}, path)


def test_imta_presets_and_architecture_from_pretrained(tmp_path):
    write_config_checkpoint(tmp_path / "cifar.pt", dataset="cifar100", exits=5, imta="pretrain")
    cfg, _ = l2w.parse_config(["--imta", "finetune", "--pretrained", str(tmp_path / "cifar.pt")])
    assert (cfg.dataset, cfg.exits, cfg.batch_size, cfg.lr, cfg.q) == ("cifar100", 5, 1024, 0.8, 0.75)
    assert (cfg.kd_temperature, cfg.kd_gamma, cfg.kd_reduction) == (3.0, 0.9, "mean")
    # the folder names the phase-1 checkpoint and its 60-image hold-out (the preset holds out 5000)
    assert cfg.out == os.path.join("runs", "cifar100_msdnet5_l2w_q0.75_imta-finetune_seed0_holdout60_from-cifar")
    write_config_checkpoint(tmp_path / "imagenet.pt", dataset="imagenet", exits=5, step=4, image_size=224,
                            holdout=50000, imta="pretrain")
    cfg, _ = l2w.parse_config(["--imta", "finetune", "--pretrained", str(tmp_path / "imagenet.pt"), "--method", "baseline"])
    assert (cfg.kd_temperature, cfg.kd_gamma, cfg.delta, cfg.meta_interval) == (1.0, 0.1, 0.3, 100)
    assert (cfg.image_size, cfg.step) == (224, 4)
    cfg, _ = l2w.parse_config(["--dataset", "imagenet", "--imta", "pretrain"])   # phase 1: the dataset's preset
    assert cfg.delta == 0.3 and cfg.kd_gamma == l2w.Config.kd_gamma


@pytest.fixture(scope="module")
def imta_phase1(tmp_path_factory):
    """A phase-1 run (--imta pretrain) on the synthetic set through the CLI: its directory."""
    out = tmp_path_factory.mktemp("imta") / "phase1"
    result = cli("--dataset", "synthetic", "--exits", "3", "--epochs", "1", "--synthetic-size", "120",
                 "--holdout", "24", "--batch-size", "16", "--imta", "pretrain", "--out", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "IMTA phase 1: gradient equilibrium" in result.stdout
    return out


def test_imta_pretrain_then_finetune_through_the_cli(imta_phase1, tmp_path):
    assert json.loads((imta_phase1 / "results.json").read_text())["config"]["imta"] == "pretrain"
    phase1 = tmp_path / "phase1.pt"
    phase1.write_bytes((imta_phase1 / "checkpoint.pt").read_bytes())
    out = tmp_path / "phase2"
    result = cli("--imta", "finetune", "--pretrained", str(phase1), "--epochs", "1", "--batch-size", "16",
                 "--out", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "9,758 parameters in the new heads and ISC" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["imta"] == "finetune" and results["config"]["exits"] == 3
    assert (results["config"]["kd_temperature"], results["config"]["kd_gamma"]) == (3.0, 0.9)
    flops, params = models.count_cost(models.IMTANet(models.build_model("msdnet", 10, 3), 10), 32)
    assert [r["flops"] for r in results["anytime"]] == flops and [r["params"] for r in results["anytime"]] == params
    assert len(results["dynamic"]) == 39

    # the phase-2 checkpoint: the phase-1 network bit for bit, plus exactly the new heads and ISC
    first = torch.load(phase1, weights_only=True)
    second = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {k.removeprefix("backbone."): v for k, v in second["model"].items() if k.startswith("backbone.")}.keys() \
        == first["model"].keys()
    assert all(torch.equal(second["model"]["backbone." + k], v) for k, v in first["model"].items())
    new_parameters = {n for n, _ in models.IMTANet(models.build_model("msdnet", 10, 3), 10).named_parameters()
                      if not n.startswith("backbone.")}
    assert sum(second["model"][n].numel() for n in new_parameters) == 9_758
    assert all(isinstance(v, torch.Tensor) for v in second["model"].values())
    assert torch.equal(torch.as_tensor(second["holdout_indices"]), torch.as_tensor(first["holdout_indices"]))
    # the WPN's profile is taken on what it weighs in this phase: the hold-out's distillation losses
    cfg = l2w.Config(**second["config"])
    net = models.IMTANet(models.build_model("msdnet", 10, 3), 10).eval()
    net.load_state_dict(second["model"])
    wpn, start = l2w.WPN(3, cfg.wpn_depth, cfg.wpn_width), l2w.WPN(3, cfg.wpn_depth, cfg.wpn_width)
    wpn.load_state_dict(second["wpn"])
    start.load_state_dict(second["wpn_init"])
    images, targets = zip(*data.load(cfg, second["holdout_indices"]).threshold_set)
    with torch.no_grad():
        losses = models.imta_exit_losses(net, torch.stack(images), torch.tensor(targets), 3.0, 0.9)
    want, got = l2w.weight_profile(losses, wpn, cfg, start), results["history"][-1]["weights"]
    assert got["spearman"] == pytest.approx(want["spearman"]) and got["moved"] == pytest.approx(want["moved"])
    np.testing.assert_allclose(got["deciles"], want["deciles"], rtol=1e-6)

    # self-contained: evaluated without the phase-1 file, the same numbers
    phase1.unlink()
    again = cli("--eval-only", "--resume", str(out / "checkpoint.pt"), "--out", str(tmp_path / "eval"))
    assert again.returncode == 0, again.stderr
    evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert evaluated["anytime"] == results["anytime"] and evaluated["dynamic"] == results["dynamic"]


def test_phase2_resume_is_exact(imta_phase1, tmp_path, monkeypatch):
    phase1 = tmp_path / "phase1.pt"
    phase1.write_bytes((imta_phase1 / "checkpoint.pt").read_bytes())
    flags = ["--imta", "finetune", "--pretrained", str(phase1), "--epochs", "2", "--batch-size", "16", "--device", "cpu"]
    cfg, _ = l2w.parse_config(flags + ["--out", str(tmp_path / "straight")])
    l2w.train(cfg)
    cfg, _ = l2w.parse_config(flags + ["--out", str(tmp_path / "split")])
    stop_at_call(monkeypatch, 6)   # the last iteration of the first epoch (96 training images)
    with pytest.raises(SystemExit):
        l2w.train(cfg)
    monkeypatch.undo()
    phase1.unlink()   # the phase-2 checkpoint holds the frozen network
    l2w.train(*l2w.parse_config(["--resume", str(tmp_path / "split" / "checkpoint.pt")]))
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key in ("model", "wpn"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    for key in ("optimizer", "wpn_optimizer"):
        assert len(a[key]["state"]) == len(b[key]["state"]) > 0
        for pa, pb in zip(a[key]["state"].values(), b[key]["state"].values()):
            assert all(torch.equal(torch.as_tensor(pa[k]), torch.as_tensor(pb[k])) for k in pa)
    ra = json.loads((tmp_path / "straight" / "results.json").read_text())
    rb = json.loads((tmp_path / "split" / "results.json").read_text())
    assert ra["anytime"] == rb["anytime"] and ra["dynamic"] == rb["dynamic"]


# ----------------------------------------------------------------------------
# Tuning q on the hold-out, --budget, run folders
# ----------------------------------------------------------------------------

# A q sweep small enough for the suite: 2 exits, one meta-iteration, a hold-out of 80 (halves of 40)
SWEEP = ["--dataset", "synthetic", "--exits", "2", "--synthetic-size", "300", "--holdout", "80", "--epochs", "1",
         "--batch-size", "16", "--meta-interval", "100", "--print-every", "100", "--device", "cpu"]


@pytest.fixture(scope="module")
def q_sweep(tmp_path_factory):
    """{q: run folder} of three L2W-DEN runs that differ in --q only."""
    root = tmp_path_factory.mktemp("q_sweep")
    for q in ("0.25", "0.75", "1.5"):
        l2w.main([*SWEEP, "--q", q, "--out", str(root / q)])
    return {float(q): root / q for q in ("0.25", "0.75", "1.5")}


def recording_predict(monkeypatch):
    """Every (logits, targets) that l2w.predict returns from now on, in order."""
    recorded = []

    def record(*args, predict=l2w.predict):
        recorded.append(predict(*args))
        return recorded[-1]

    monkeypatch.setattr(l2w, "predict", record)
    return recorded


def one_line_error(argv):
    result = cli(*argv)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def hand_selection(curves):
    """--select-q's rule written out: at 101 budgets evenly spread over the Mul-Adds that every
    curve covers, a curve scores its best accuracy within the budget; the best mean wins."""
    low = max(min(p["flops"] for p in c) for c in curves.values())
    high = min(max(p["flops"] for p in c) for c in curves.values())
    budgets = [low + (high - low) * i / 100 for i in range(101)]
    means = {q: math.fsum(max(p["acc"] for p in c if p["flops"] <= b) for b in budgets) / 101
             for q, c in curves.items()}
    return max(sorted(means), key=means.get), means


def test_select_q_picks_what_the_hold_out_curves_say_and_reads_no_test_label(q_sweep, tmp_path, monkeypatch, capsys):
    results = {q: json.loads((folder / "results.json").read_text()) for q, folder in q_sweep.items()}
    chosen, means = hand_selection({q: r["holdout_dynamic"] for q, r in results.items()})
    assert len(set(means.values())) > 1   # the runs differ on the hold-out: the pick is no tie of all
    l2w.main(["--select-q", *(str(q_sweep[q]) for q in sorted(q_sweep)), "--out", str(tmp_path / "select.json")])
    selection = json.loads((tmp_path / "select.json").read_text())
    assert selection["chosen_q"] == chosen and f"chosen: q {chosen:g}" in capsys.readouterr().out
    assert {row["q"]: row["mean_acc"] for row in selection["rows"]} == pytest.approx(means)

    # The same checkpoints evaluated with every test label changed: the hold-out curves and the
    # choice stay, the test-set numbers do not.
    def other_test_labels(cfg, holdout_indices=None, load=data.load, **device):
        splits = load(cfg, holdout_indices, **device)
        images, labels = splits.test.base.tensors
        splits.test.base = torch.utils.data.TensorDataset(images, (labels + 1) % 10)
        return splits

    monkeypatch.setattr(data, "load", other_test_labels)
    recorded = recording_predict(monkeypatch)
    relabelled = {}
    for q, folder in sorted(q_sweep.items()):
        l2w.main(["--eval-only", "--resume", str(folder / "checkpoint.pt"), "--out", str(tmp_path / str(q))])
        relabelled[q] = json.loads((tmp_path / str(q) / "results.json").read_text())
        assert relabelled[q]["holdout_dynamic"] == results[q]["holdout_dynamic"]
    assert any(relabelled[q]["anytime"] != results[q]["anytime"] for q in results)
    l2w.main(["--select-q", *(str(tmp_path / str(q)) for q in sorted(q_sweep)), "--out", str(tmp_path / "again.json")])
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["chosen_q"] == chosen
    assert [(r["q"], r["acc"], r["mean_acc"]) for r in again["rows"]] == [
        (r["q"], r["acc"], r["mean_acc"]) for r in selection["rows"]]

    # the hold-out curve: thresholds fitted on the hold-out's even positions, scored on its odd
    # ones, as MSDNet's loop would score them on a test set
    (val_logits, val_targets), flops = recorded[0], [row["flops"] for row in results[0.25]["anytime"]]
    assert len(val_targets) == 80
    expected = msdnet_dynamic_eval_loop([z[0::2] for z in val_logits], val_targets[0::2],
                                        [z[1::2] for z in val_logits], val_targets[1::2], flops)
    curve = results[0.25]["holdout_dynamic"]
    assert [row["acc"] for row in curve] == pytest.approx([acc for acc, _ in expected])
    assert [row["flops"] for row in curve] == pytest.approx([cost for _, cost in expected])


def fake_sweep_run(folder, q, curve, **config):
    results = fake_results("l2w", 3)
    results["config"].update(q=q, **config)
    results["holdout_dynamic"] = curve and [{"q": 0.05 * i, "acc": acc, "flops": flops}
                                            for i, (flops, acc) in enumerate(curve)]
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(results))
    return str(folder)


def test_select_q_worked_by_hand_and_what_it_refuses(tmp_path, capsys):
    # Every run covers 5M..15M. q 0.5: 70 % at any budget. q 1: 60 % below 10M, 79.5 % from 10M
    # (and 90 % beyond the common range, which must not count): over 101 budgets it averages
    # (50 x 60 + 51 x 79.5) / 101 = 69.85 %, so q 0.5 wins (joined by lines, q 1 would average
    # about 74.6 % and win).
    flat = fake_sweep_run(tmp_path / "flat", 0.5, [(4e6, 10.0), (5e6, 70.0), (15e6, 70.0)])
    step = fake_sweep_run(tmp_path / "step", 1.0, [(5e6, 60.0), (10e6, 79.5), (15e6, 79.5), (16e6, 90.0)])
    l2w.main(["--select-q", step, flat, "--out", str(tmp_path / "s.json")])
    selection = json.loads((tmp_path / "s.json").read_text())
    assert selection["budgets"] == [5e6, 7.5e6, 10e6, 12.5e6, 15e6] and selection["chosen_q"] == 0.5
    assert [(r["q"], r["acc"]) for r in selection["rows"]] == [(0.5, [70.0] * 5), (1.0, [60.0, 60.0] + [79.5] * 3)]
    assert [r["mean_acc"] for r in selection["rows"]] == pytest.approx([70.0, (50 * 60 + 51 * 79.5) / 101])
    assert "chosen: q 0.5" in capsys.readouterr().out

    other = fake_sweep_run(tmp_path / "other", 0.25, [(5e6, 50.0), (15e6, 50.0)], exits=5)
    assert f"'{other}' is not of the sweep of '{flat}' (--exits 5, not 3)" in one_line_error(
        ["--select-q", flat, other])
    twice = fake_sweep_run(tmp_path / "twice", 0.5, [(5e6, 50.0), (15e6, 50.0)])
    assert "each with another --q" in one_line_error(["--select-q", flat, twice])
    none = fake_sweep_run(tmp_path / "none", 0.25, None)
    assert "has no hold-out curve" in one_line_error(["--select-q", flat, none])
    apart = fake_sweep_run(tmp_path / "apart", 0.25, [(20e6, 50.0), (30e6, 60.0)])
    assert "--select-q: the runs' budgeted curves share no range of Mul-Adds" in one_line_error(
        ["--select-q", flat, apart])
    assert "--select-q: " in one_line_error(["--select-q", flat, str(tmp_path / "missing")])


def cost_and_accuracy(thresholds, logits, targets, flops):
    """The budgeted protocol sample by sample: each leaves at the first exit whose threshold its
    confidence reaches. Returns (mean Mul-Adds, accuracy % to 1e-4, as results.json stores it)."""
    confidence = l2w.confidences(logits).tolist()
    predictions = [z.argmax(dim=1).tolist() for z in logits]
    thresholds, n = thresholds.tolist(), len(targets)
    exit_of = [next(k for k in range(len(flops)) if confidence[k][i] >= thresholds[k]) for i in range(n)]
    return (sum(flops[k] for k in exit_of) / n,
            round(100 * sum(predictions[k][i] == targets[i].item() for i, k in enumerate(exit_of)) / n, 4))


def assert_best_on_a_fine_grid(record, val_logits, val_targets, flops):
    """The thresholds of `record` (--budget's) cost at most the budget on the hold-out's odd
    positions (after fitting on its even ones), and no q of a grid of steps of 0.004 does better
    there within the budget (BUDGET_QS holds every q of that grid: the choice is best by
    construction)."""
    fit, score = [z[0::2] for z in val_logits], ([z[1::2] for z in val_logits], val_targets[1::2])
    cost, acc = cost_and_accuracy(torch.tensor(record["thresholds"]), *score, flops)
    assert cost <= record["budget"] and (cost, acc) == pytest.approx((record["holdout_flops"], record["holdout_acc"]))
    fitting = 0
    for q in [p / 250 for p in range(1, 501)]:
        c, a = cost_and_accuracy(l2w.fit_thresholds(l2w.confidences(fit), l2w.exit_fractions(q, len(flops))),
                                 *score, flops)
        assert c > record["budget"] or a <= acc, q
        fitting += c <= record["budget"]
    assert 0 < fitting < 500   # the budget cuts the grid


def test_budget_on_a_trained_run_fits_on_the_hold_out_and_runs_for_real(q_sweep, tmp_path, monkeypatch, capsys):
    run = q_sweep[0.75]
    anytime = json.loads((run / "results.json").read_text())["anytime"]
    flops = [row["flops"] for row in anytime]
    budget = round((flops[0] + flops[1]) / 2e6, 3)   # in M
    recorded = recording_predict(monkeypatch)
    evaluate = ["--eval-only", "--resume", str(run / "checkpoint.pt"), "--out", str(tmp_path / "b")]
    l2w.main([*evaluate, "--budget", f"{budget}M", "--early-exit"])
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    record, ((val_logits, val_targets), (test_logits, test_targets)) = results["budget"], recorded
    assert record["budget"] == pytest.approx(budget * 1e6) and record["q"] in l2w.BUDGET_QS
    assert_best_on_a_fine_grid(record, val_logits, val_targets, flops)
    # the test set's realised cost and accuracy at those thresholds, reported
    test_cost, test_acc = cost_and_accuracy(torch.tensor(record["thresholds"]), test_logits, test_targets, flops)
    assert (record["test_flops"], record["test_acc"]) == pytest.approx((test_cost, test_acc))
    assert f"test set ({len(test_targets)} images): top-1 {test_acc:.2f}, {test_cost / 1e6:.2f}M Mul-Adds" in printed
    # --early-exit runs them for real: every image leaves where the simulated protocol said
    early = results["early_exit"]
    assert early["q"] == record["q"] and early["accuracy"] == pytest.approx(test_acc)
    assert early["flops"] == pytest.approx(test_cost)
    assert all(run["same_as_budgeted"] == len(test_targets) for run in early["runs"])

    # out of range: below the first exit, an error; the whole network's cost or more, a line
    assert "below the first exit's" in one_line_error([*evaluate, "--budget", str(flops[0] * 0.9)])
    l2w.main([*evaluate, "--budget", str(flops[-1])])
    assert len([line for line in capsys.readouterr().out.splitlines() if "covers the whole network" in line]) == 1
    whole = json.loads((tmp_path / "b" / "results.json").read_text())["budget"]
    assert whole["thresholds"] == [math.inf, -math.inf] and whole["test_flops"] == flops[-1]
    assert whole["test_acc"] == pytest.approx(anytime[-1]["acc1"])


def test_budget_search_with_three_exits_is_best_on_a_fine_grid():
    torch.manual_seed(0)
    scale = torch.tensor([0.5, 1.5, 3.0])   # later exits more confident, and right more often
    targets = torch.randint(5, (300,))
    logits = [torch.randn(300, 5) * s + 2 * s * F.one_hot(targets, 5) * (torch.rand(300, 1) < 0.4 + 0.2 * k)
              for k, s in enumerate(scale)]
    val, test = ([z[:200] for z in logits], targets[:200]), ([z[200:] for z in logits], targets[200:])
    record = l2w.budget_evaluate(2.2e6, val, test, [1e6, 2.5e6, 4e6])
    assert_best_on_a_fine_grid(record, *val, [1e6, 2.5e6, 4e6])


def test_budget_takes_mul_adds_as_users_write_them():
    assert l2w.mul_adds("20e6") == l2w.mul_adds("20M") == l2w.mul_adds("20000000") == 20e6
    assert l2w.mul_adds("1.5G") == 1.5e9 and l2w.mul_adds("500k") == 5e5
    assert "such as 20e6, 20M or 1.5G: '20X'" in one_line_error(["--budget", "20X"])
    assert "--budget is for a trained network: --eval-only --resume CKPT" in one_line_error(
        ["--dataset", "synthetic", "--budget", "20M"])


def test_plot_marks_a_budget_runs_point(tmp_path, monkeypatch):
    results = fake_results("l2w", 3)
    results["budget"] = {"budget": 12e6, "q": 0.4, "thresholds": [0.9, 0.8, -math.inf], "test_acc": 81.0,
                         "test_flops": 11.5e6}
    (tmp_path / "results.json").write_text(json.dumps(results))
    import matplotlib.figure
    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda figure, *args, **kwargs: drawn.extend(
        (line.get_label(), list(line.get_xdata()), list(line.get_ydata())) for line in figure.axes[0].lines))
    l2w.plot_curves([str(tmp_path)], tmp_path / "curves.png")
    assert ("l2w msdnet3 synthetic: --budget 12M (dotted), test set", [11.5], [81.0]) in drawn
    assert any(x == [12.0, 12.0] for _, x, _ in drawn)   # the budget, a vertical line


def test_run_sh_names_the_q_sweep_its_selection_and_table_4_each_in_a_folder_of_its_own(tmp_path, monkeypatch):
    shutil.copy(os.path.join(HERE, "run.sh"), tmp_path)   # a folder without runs: every run would start
    env = {k: v for k, v in os.environ.items() if k != "IMAGENET"}
    dry = subprocess.run(["bash", str(tmp_path / "run.sh")], env={**env, "DRY_RUN": "1"}, capture_output=True,
                         text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert os.listdir(tmp_path) == ["run.sh"]   # a dry run writes nothing
    commands = [shlex.split(line)[2:] for line in dry.stdout.splitlines() if line.startswith("  python l2w.py ")]
    selections = [args for args in commands if "--select-q" in args]
    runs = [args for args in commands if "--select-q" not in args]
    folders = [args[args.index("--out") + 1] for args in runs]
    assert len(runs) > 30 and len(set(folders)) == len(folders)   # no two runs write into one folder

    # the CIFAR-100 MSDNet-5 runs (where the sweep and Table 4 must be) as l2w.py reads their flags
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(l2w, "check_config", lambda cfg: None)   # the configs only (its checks take 1 s a run)
    configs = {}
    for args in runs:
        if " ".join(args).startswith("--dataset cifar100 --arch msdnet --exits 5 "):
            config = dataclasses.asdict(l2w.parse_config(args)[0])
            configs[config.pop("out")] = config
    assert len({json.dumps(c, sort_keys=True) for c in configs.values()}) == len(configs)   # none made twice
    preset = dataclasses.asdict(l2w.parse_config(["--dataset", "cifar100", "--arch", "msdnet", "--exits", "5"])[0])
    del preset["out"]

    def folder_of(**changes):   # the one run that is the preset, but for `changes`
        [folder] = [f for f, c in configs.items() if c == {**preset, **changes}]
        return folder

    sweep = [folder_of(q=q) for q in (0.25, 0.5, 0.75, 1.0)]
    assert selections == [["--select-q", *sweep, "--out", "runs/cifar100_msdnet5_select_q.json"]]
    table4 = [folder_of(method="baseline")] + [folder_of(wpn_depth=d, wpn_width=w) for d, w in
                                               ((1, 10), (1, 100), (1, 500), (1, 1000), (2, 500), (4, 500))]
    assert len(set(table4)) == 7


def test_run_sh_miniature_runs_the_demo_for_both_methods_over_five_seeds_then_summarizes_them(tmp_path, monkeypatch):
    shutil.copy(os.path.join(HERE, "run.sh"), tmp_path)
    dry = subprocess.run(["bash", str(tmp_path / "run.sh"), "miniature"], env={**os.environ, "DRY_RUN": "1"},
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0 and os.listdir(tmp_path) == ["run.sh"], dry.stderr
    commands = [shlex.split(line)[2:] for line in dry.stdout.splitlines() if line.startswith("  python l2w.py ")]
    *runs, summary = commands
    demo = dataclasses.asdict(l2w.Config(**l2w.PRESETS["synthetic"], dataset="synthetic", exits=3))
    monkeypatch.setattr(l2w, "check_config", lambda cfg: None)   # the configs only
    configs = [dataclasses.asdict(l2w.parse_config(args)[0]) for args in runs]
    assert sorted((c["method"], c["seed"]) for c in configs) == sorted(
        (m, s) for m in ("baseline", "l2w") for s in range(5))
    ignored = ("method", "seed", "out")
    assert all({k: v for k, v in c.items() if k not in ignored} == {k: v for k, v in demo.items() if k not in ignored}
               for c in configs)
    assert summary == ["--summary", *(args[args.index("--out") + 1] for args in runs),
                       "--out", "runs/miniature/summary.json"]


def test_default_run_folders_differ_in_every_field_that_changes_training(monkeypatch):
    monkeypatch.setattr(l2w, "check_config", lambda cfg: None)   # the configs only (its checks take 1 s a run)
    # two CLI runs that differ in --wpn-width only; the paper's run keeps its short name
    preset = l2w.parse_config(["--dataset", "cifar100"])[0]
    assert preset.out == os.path.join("runs", "cifar100_msdnet5_l2w_q0.75_seed0")
    assert (l2w.parse_config(["--dataset", "cifar100", "--wpn-width", "10"])[0].out
            == os.path.join("runs", "cifar100_msdnet5_l2w_q0.75_seed0_wpn-width10"))

    def out(**changes):
        return l2w.default_out(dataclasses.replace(preset, **changes))

    changed = [{}, dict(wpn_width=10), dict(wpn_width=100), dict(wpn_depth=2), dict(delta=0.3), dict(constraint="mat"),
               dict(meta_interval=100), dict(meta_grad="jvp"), dict(lr=0.1), dict(lr=0.1000001), dict(epochs=200),
               dict(batch_size=512), dict(momentum=0.5), dict(weight_decay=5e-4), dict(wpn_lr=1e-3),
               dict(holdout=1000), dict(amp=True), dict(seed=1), dict(q=0.5), dict(method="baseline"),
               dict(method="baseline", lr=0.1), dict(exits=7), dict(imta="pretrain"),
               dict(holdout_indices="/released/index.pth"), dict(holdout_indices="/runs/a/holdout_indices.json")]
    outs = [out(**c) for c in changed]
    assert len(set(outs)) == len(outs)
    assert outs[-2:] == [outs[0] + "_split-index", outs[0] + "_split-a"]
    # a preset's value, or a field that does not change what is trained, adds nothing; nor does a
    # WPN field to a baseline, which trains no WPN
    for same in (dict(wpn_width=500), dict(delta=0.8), dict(workers=2), dict(print_every=5), dict(device="cpu"),
                 dict(data_dir="/elsewhere"), dict(save_every=100)):
        assert out(**same) == outs[0], same
    assert out(method="baseline", wpn_width=10) == out(method="baseline")


def test_lr_follows_the_papers_rule_for_the_batch_size_unless_given(monkeypatch):
    monkeypatch.setattr(l2w, "check_config", lambda cfg: None)   # the configs only
    parsed = lambda *args: l2w.parse_config(list(args))[0]
    # 0.1 x batch / 64 (CIFAR) or / 256 (ImageNet), applied to the half-batch of each update as released
    assert parsed("--dataset", "cifar100", "--batch-size", "128").lr == 0.1 * 64 / 64
    assert parsed("--dataset", "cifar100").lr == 0.1 * 512 / 64 == 0.8 == parsed("--dataset", "imagenet").lr
    assert parsed("--dataset", "imagenet", "--batch-size", "512").lr == 0.1 * 256 / 256
    assert parsed("--dataset", "folder", "--image-size", "224", "--batch-size", "256").lr == 0.1 * 128 / 256
    assert parsed("--dataset", "cifar10-lt", "--batch-size", "256").lr == 0.1 * 128 / 64
    assert parsed("--dataset", "cifar100", "--batch-size", "128", "--lr", "0.5").lr == 0.5   # given: it wins
    assert parsed("--dataset", "synthetic", "--batch-size", "128").lr == l2w.PRESETS["synthetic"]["lr"]
    assert l2w.Config(batch_size=256).lr == 0.1 * 128 / 64   # a Config built in Python holds the lr used too
    # a run folder names --lr only where it differs from what the rule gives at the run's batch size
    paper = os.path.join("runs", "cifar100_msdnet5_l2w_q0.75_seed0")
    assert parsed("--dataset", "cifar100", "--batch-size", "128").out == paper + "_batch-size128"
    assert parsed("--dataset", "cifar100", "--batch-size", "128", "--lr", "0.1").out == paper + "_batch-size128"
    assert parsed("--dataset", "cifar100", "--batch-size", "128", "--lr", "0.8").out == paper + "_batch-size128_lr0.8"
    assert parsed("--dataset", "cifar100", "--lr", "0.8").out == paper


def test_loader_workers_are_at_most_the_cpus_unless_given(monkeypatch):
    monkeypatch.setattr(l2w, "check_config", lambda cfg: None)   # the configs only
    parsed = lambda *args: l2w.parse_config(list(args))[0]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)   # this process may use 2 CPUs
    assert parsed("--dataset", "imagenet").workers == 2 == parsed("--dataset", "cifar100").workers
    assert parsed("--dataset", "imagenet", "--workers", "8").workers == 8 and parsed("--dataset", "synthetic").workers == 0
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)   # where it does not exist: the CPUs of the machine
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert parsed("--dataset", "imagenet").workers == 6 and parsed("--dataset", "cifar100").workers == 4


# ----------------------------------------------------------------------------
# Reliability: resume, --weights, bad input
# ----------------------------------------------------------------------------

TINY = ["--dataset", "synthetic", "--exits", "2", "--synthetic-size", "60", "--holdout", "12", "--batch-size", "8",
        "--lr", "0.1", "--workers", "0", "--device", "cpu"]


def folder_hashes(folder):
    """SHA-256 of every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def edited_checkpoint(run, path, **config):
    """A copy of `run`'s checkpoint at `path` with some of its config changed."""
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["config"].update(config)
    torch.save(state, path)
    return str(path)


@pytest.fixture(scope="module")
def weights_run(tmp_path_factory):
    """A tiny run started from a released file (network and WPN), one epoch through the CLI in
    this process; the released file is moved away afterwards, as a user may do. Its folder."""
    root = tmp_path_factory.mktemp("weights_run")
    torch.manual_seed(0)
    source = models.build_model("msdnet", 10, 2)
    randomise_bn_statistics(source, 0)
    released_checkpoint(source, root / "model_best.pth.tar", imagenet=False, wpn=l2w.WPN(2, 1, 500))
    result = cli(*TINY, "--epochs", "1", "--weights", root / "model_best.pth.tar", "--out", root / "run")
    assert result.returncode == 0, result.stderr
    (root / "log.txt").write_text(result.stdout)
    (root / "model_best.pth.tar").rename(root / "moved.pth.tar")
    return root / "run"


def test_eval_only_resume_of_a_run_from_weights_reproduces_its_results(weights_run, tmp_path, capsys):
    trained = json.loads((weights_run / "results.json").read_text())
    assert trained["config"]["weights"].endswith("model_best.pth.tar")   # where the run started, recorded
    l2w.main(["--eval-only", "--resume", str(weights_run / "checkpoint.pt"), "--out", str(tmp_path / "eval"),
              "--print-every", "7", "--holdout", "12"])   # one flag that may change, one that does not
    evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert evaluated["anytime"] == trained["anytime"] and evaluated["dynamic"] == trained["dynamic"]
    assert evaluated["config"]["print_every"] == 7 and "loaded the released" not in capsys.readouterr().out


def test_a_moved_run_from_weights_resumes_beside_its_checkpoint_without_the_released_file(weights_run, tmp_path,
                                                                                         capsys):
    # weights_run's folder stands for a new run started where this one was: the config in the
    # moved checkpoint still names that folder, and the released file is gone
    moved = tmp_path / "backup" / "run"
    shutil.copytree(weights_run, moved)
    before = folder_hashes(weights_run)
    l2w.main(["--resume", str(moved / "checkpoint.pt"), "--epochs", "2"])
    out = capsys.readouterr().out
    assert "resumed from" in out and "loaded the released" not in out
    assert torch.load(moved / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert json.loads((moved / "results.json").read_text())["config"]["out"] == str(moved)
    assert folder_hashes(weights_run) == before


def test_resume_refuses_a_flag_that_changes_the_data_the_split_or_the_network(weights_run):
    # --batch-size too: the checkpoint's position in the epoch counts batches of its size (a resume
    # mid-epoch with another size would repeat or skip images), and so does the lr schedule
    changed = {"dataset": "cifar10", "imbalance": "50", "synthetic_size": "300", "holdout": "40", "arch": "ranet",
               "exits": "3", "step": "6", "base": "7", "image_size": "224", "seed": "1", "imta": "pretrain",
               "wpn_depth": "2", "wpn_width": "100", "holdout_indices": "index.pth", "batch_size": "16"}
    assert set(changed) == set(l2w.RESUME_FIELDS)
    saved = torch.load(weights_run / "checkpoint.pt", weights_only=True)["config"]
    before = folder_hashes(weights_run)
    for field, value in changed.items():
        flag = "--" + field.replace("_", "-")
        line = one_line_error(["--resume", str(weights_run / "checkpoint.pt"), flag, value])
        old = repr(saved[field]) if isinstance(saved[field], str) else saved[field]
        assert line.startswith(f"error: {flag} {float(value) if field == 'imbalance' else value} does not match "
                               f"the checkpoint's {old} (a resumed run keeps"), line
    assert folder_hashes(weights_run) == before


def test_holdout_indices_from_either_file_and_the_warning_says_what_holds_for_released_weights(weights_run, tmp_path,
                                                                                               monkeypatch):
    # Released weights: thresholds fitted on images the network trained on are optimistic, and the
    # authors' L2W-DEN models trained on every training image, so no split can help them; a split
    # file serves a network trained without those images. One warning, whatever the split.
    log = (weights_run.parent / "log.txt").read_text()
    warning = "warning: thresholds fitted on images a network trained on are optimistic (the authors' L2W-DEN "
    assert log.count(warning) == 1 and "this hold-out is drawn from --seed; --holdout-indices gives a network's own" in log
    # MSDNet-PyTorch's and L2W-DEN's index.pth: a permutation of the 60 training images whose last
    # 12 (--holdout) are the hold-out; the warning still says what holds, not that the split is drawn
    order = torch.randperm(60, generator=torch.Generator().manual_seed(1))
    torch.save(order, tmp_path / "index.pth")
    result = cli(*TINY, "--eval-only", "--weights", weights_run.parent / "moved.pth.tar", "--holdout-indices",
                 tmp_path / "index.pth", "--out", tmp_path / "eval")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(warning) == 1 and "drawn from --seed" not in result.stdout
    # no hold-out (--holdout 0): nothing to warn of, and no advice of a flag that --holdout 0 refuses
    result = cli(*TINY, "--eval-only", "--weights", weights_run.parent / "moved.pth.tar", "--holdout", "0",
                 "--out", tmp_path / "eval0")
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stdout and "--holdout-indices" not in result.stdout
    assert json.loads((tmp_path / "eval" / "holdout_indices.json").read_text()) == order[48:].tolist()
    # ours, a run's holdout_indices.json: the list of hold-out indices itself
    held = [59, 0, 7, 14, 21, 28, 35, 42, 49, 56, 3, 10]
    (tmp_path / "holdout_indices.json").write_text(json.dumps(held))
    splits = data.load(small_cfg(synthetic_size=60, holdout=12, holdout_indices=str(tmp_path / "holdout_indices.json")))
    assert splits.holdout_indices.tolist() == splits.threshold_set.indices == held
    assert sorted(splits.train.indices) == sorted(set(range(60)) - set(held))
    # what does not fit the data set: one line each, before anything is written
    files = {"dict.json": {"held": held}, "floats.json": [float(i) for i in held], "range.json": held[:-1] + [60],
             "repeats.json": held[:-1] + [59], "short.json": held[:5], "broken.json": "[1, 2",
             "partial.pth": torch.arange(59), "floats.pth": order.double(), "table.pth": order.view(6, 10),
             "text.pth": "not a tensor"}
    for name, content in files.items():
        if torch.is_tensor(content):
            torch.save(content, tmp_path / name)
        else:
            (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    errors = {"dict.json": "is not a JSON list of indices into the 60 training images",
              "floats.json": "is not a JSON list of indices", "range.json": "is not a JSON list of indices",
              "repeats.json": "repeats indices", "short.json": "holds 5 hold-out indices, not --holdout 12: give "
              "--holdout 5", "broken.json": "cannot be read as JSON (JSONDecodeError)",
              "partial.pth": "is not a permutation of the 60 training images",
              "floats.pth": "is not a permutation", "table.pth": "is not a permutation",
              "text.pth": "cannot be read as a torch-saved tensor (UnpicklingError)"}
    for name, message in errors.items():
        with pytest.raises(data.DataError) as error:
            data.read_holdout_indices(str(tmp_path / name), 12, torch.arange(60), 60)
        assert str(error.value).startswith(f"--holdout-indices '{tmp_path / name}' ") and message in str(error.value)
    with pytest.raises(data.DataError, match="gives the hold-out split, and --holdout 0 asks for none"):
        data.read_holdout_indices(str(tmp_path / "index.pth"), 0, torch.arange(60), 60)
    # through the command line: one line, before anything is written
    for name, message in (("missing.pth", "does not exist"), ("short.json", errors["short.json"])):
        line = one_line_error([*TINY, "--holdout-indices", str(tmp_path / name), "--out", str(tmp_path / "o")])
        assert line == f"error: --holdout-indices '{tmp_path / name}' {message}", line
    assert not (tmp_path / "o").exists()
    # long-tailed CIFAR: the hold-out must be among the images the long-tailed set keeps
    cfg = fake_cifar10_cfg(tmp_path, monkeypatch, dataset="cifar10-lt", holdout=2)
    targets = torch.tensor(data.cifar("cifar10", cfg.data_dir)[0].targets)
    kept = data.long_tailed_indices(targets, cfg.imbalance, cfg.seed).tolist()
    dropped = next(i for i in range(len(targets)) if i not in kept)
    (tmp_path / "lt.json").write_text(json.dumps([kept[0], dropped]))
    with pytest.raises(data.DataError, match="holds indices of images that are not in this long-tailed set"):
        data.load(dataclasses.replace(cfg, holdout_indices=str(tmp_path / "lt.json")))


def test_resume_never_writes_into_another_runs_folder(weights_run, tmp_path):
    other = tmp_path / "other"   # another run's folder (a copy's files are another run's)
    shutil.copytree(weights_run, other)
    before, ours = folder_hashes(other), folder_hashes(weights_run)
    line = one_line_error(["--resume", str(weights_run / "checkpoint.pt"), "--out", str(other)])
    assert f"'{other}' already holds a run's checkpoint" in line
    assert folder_hashes(other) == before and folder_hashes(weights_run) == ours


def test_evaluations_never_replace_each_others_results(weights_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for seed, folder in ((0, "a"), (1, "b")):   # MSDNet-PyTorch names every file model_best.pth.tar
        torch.manual_seed(seed)
        (tmp_path / folder).mkdir()
        released_checkpoint(models.build_model("msdnet", 10, 2), tmp_path / folder / "model_best.pth.tar",
                            imagenet=False)
    l2w.main([*TINY, "--eval-only", "--weights", "a/model_best.pth.tar"])
    first = folder_hashes(tmp_path / "runs" / "eval_model_best")
    l2w.main([*TINY, "--eval-only", "--weights", "b/model_best.pth.tar"])
    assert folder_hashes(tmp_path / "runs" / "eval_model_best") == first
    second = json.loads((tmp_path / "runs" / "eval_model_best-2" / "results.json").read_text())
    assert second["config"]["weights"] == "b/model_best.pth.tar"
    # a checkpoint evaluated twice: eval, then eval-2
    (tmp_path / "run").mkdir()
    shutil.copy(weights_run / "checkpoint.pt", tmp_path / "run")
    l2w.main(["--eval-only", "--resume", str(tmp_path / "run" / "checkpoint.pt")])
    first = folder_hashes(tmp_path / "run" / "eval")
    l2w.main(["--eval-only", "--resume", str(tmp_path / "run" / "checkpoint.pt")])
    assert folder_hashes(tmp_path / "run" / "eval") == first and (tmp_path / "run" / "eval-2" / "results.json").exists()
    assert "eval-2/results.json" in capsys.readouterr().out


def test_budgeted_point_takes_logits_on_another_device_than_its_thresholds():
    # A GPU's logits with the CPU's thresholds and Mul-Adds: on the meta device (no values) a CPU
    # operand in an operation raises; what is left to raise is what needs values: bincount's size.
    confidence, correct = torch.rand(3, 10, device="meta"), torch.ones(3, 10, dtype=torch.bool, device="meta")
    with pytest.raises(NotImplementedError, match="bincount"):
        l2w.budgeted_point(torch.tensor([0.5, 0.5, -math.inf]), confidence, correct, [1.0, 2.0, 3.0])


def test_a_sample_that_reaches_no_threshold_runs_to_the_last_exit_in_both_protocols():
    torch.manual_seed(0)
    model = models.build_model("msdnet", 10, 3).eval()
    images = torch.randn(6, 3, 32, 32)
    images[0] = math.nan   # every confidence of sample 0 is NaN
    with torch.no_grad():
        confidence = l2w.confidences(model(images))
    assert confidence[:, 0].isnan().all() and not confidence[:, 1:].isnan().any()
    inf, nan = math.inf, math.nan
    for thresholds, expected in [([0.0, 0.0, -inf], [2, 0, 0, 0, 0, 0]), ([nan, inf, -inf], [2] * 6),
                                 ([0.0, nan, nan], [2, 0, 0, 0, 0, 0]), ([inf, inf, inf], [2] * 6)]:
        thresholds = torch.tensor(thresholds)
        simulated = l2w.exit_with_thresholds(confidence, thresholds)
        _, exit_of = l2w.early_exit_predict(model, images, thresholds)
        assert simulated.tolist() == exit_of.tolist() == expected
    # the budgeted protocol on all-NaN logits charges the whole network
    logits, targets = [torch.full((4, 10), nan)] * 3, torch.zeros(4, dtype=torch.long)
    curve = l2w.dynamic_evaluate((logits, targets), (logits, targets), [1.0, 2.0, 3.0])
    assert {point["flops"] for point in curve} == {3.0}


def test_released_files_without_batchnorm_counters_load_bit_identically(tmp_path):
    torch.manual_seed(0)
    source = models.build_model("msdnet", 10, 2)
    randomise_bn_statistics(source, 0)
    released_checkpoint(source, tmp_path / "new.pth.tar", imagenet=False)
    checkpoint = torch.load(tmp_path / "new.pth.tar", weights_only=True)
    counters = [k for k in checkpoint["state_dict"] if k.endswith("num_batches_tracked")]
    assert len(counters) == 32
    for k in counters:   # as PyTorch before 0.4.1 (MSDNet's original checkpoints) saved them
        del checkpoint["state_dict"][k]
    torch.save(checkpoint, tmp_path / "old.pth.tar")
    target = models.build_model("msdnet", 10, 2)
    models.load_released(target, tmp_path / "old.pth.tar")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(source.eval()(x), target.eval()(x), strict=True))


def test_bad_paths_and_environments_give_one_line_before_anything_is_written(weights_run, tmp_path, monkeypatch):
    phase1 = tmp_path / "phase1.pt"
    write_config_checkpoint(phase1, imta="pretrain")
    unfinished = tmp_path / "unfinished.pt"
    write_config_checkpoint(unfinished, imta="pretrain", epochs=3)   # 1 epoch of 3 done
    phase2 = tmp_path / "phase2.pt"
    write_config_checkpoint(phase2, imta="finetune")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    (tmp_path / "one_class" / "train" / "ant").mkdir(parents=True)
    (tmp_path / "one_class" / "val" / "ant").mkdir(parents=True)
    out, run = tmp_path / "o", str(weights_run)
    cases = {
        f"checkpoint '{run}' is a folder, not a file; the run's checkpoint in it is '{run}/checkpoint.pt'":
            ["--resume", run],
        f"--weights '{run}' is a folder, not a file": ["--weights", run],
        f"checkpoint '{tmp_path}' is a folder, not a file": ["--imta", "finetune", "--pretrained", str(tmp_path)],
        f"--pretrained '{unfinished}' is unfinished (1 of 3 epochs done)": ["--imta", "finetune", "--pretrained",
                                                                            str(unfinished)],
        "--imta finetune needs --batch-size >= 4 x 1 ranks": ["--imta", "finetune", "--pretrained", str(phase1),
                                                              "--batch-size", "2"],
        "--exits must be at most 32, got 100": ["--exits", "100"],
        "--exits must be at most 32, got 1000": ["--exits", "1000"],
        "--wpn-depth must be at most 8, got 100000": ["--wpn-depth", "100000"],
        "--wpn-width must be at most 4096, got 1000000": ["--wpn-width", "1000000"],
        "--out '/proc/l2w_test/run' cannot be written": ["--out", "/proc/l2w_test/run", "--dataset", "cifar10",
                                                  "--data-dir", str(tmp_path / "empty")],
        f"--out '{a_file}/run' cannot be written: Not a directory": ["--out", f"{a_file}/run"],
        f"expected at least two class folders in '{tmp_path / 'one_class'}', the same in train and val; found 1 in "
        "train and 1 in val": [
            "--dataset", "folder", "--data-dir", str(tmp_path / "one_class")],
    }
    for message, args in cases.items():
        line = one_line_error(["--out", str(out), *args])
        assert message in line, (message, line)
    # l2w.py's own checkpoints given to --weights say what they are for
    for path in (weights_run / "checkpoint.pt", phase2):
        message = (f"'{path}' has no 'state_dict': not a checkpoint of MSDNet-PyTorch or L2W-DEN (l2w.py's own: "
                   "--resume, IMTA phase 1's: --pretrained)")
        assert message in one_line_error([*TINY, "--eval-only", "--weights", str(path), "--out", str(out)])
    # --plot: a folder that does not exist; a name without extension is written as given (PNG)
    results = tmp_path / "results.json"
    results.write_text(json.dumps(fake_results("l2w", 3)))
    line = one_line_error(["--plot", str(results), "--out", str(tmp_path / "missing" / "c.png")])
    assert f"--out '{tmp_path / 'missing' / 'c.png'}' cannot be written (" in line
    # --summary (and --select-q) write through atomic_write, which names a missing folder in one line
    missing = tmp_path / "missing" / "summary.json"
    assert one_line_error(["--summary", str(results), "--out", str(missing)]) == (
        f"error: cannot write '{missing}' (No such file or directory); nothing was written")
    # WORLD_SIZE without torchrun
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert "WORLD_SIZE='2' in the environment without RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT: start the " \
           "processes with torchrun" in one_line_error(["--out", str(out)])
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert "WORLD_SIZE='two'" in one_line_error(["--out", str(out)])
    assert not out.exists() and not os.path.exists("/proc/l2w_test")


def test_plot_says_the_path_it_wrote(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps(fake_results("l2w", 3)))
    (tmp_path / "figures").mkdir()
    for out, written in [(tmp_path / "figures", tmp_path / "figures" / "curves.png"), (tmp_path / "c", tmp_path / "c")]:
        l2w.main(["--plot", str(tmp_path / "results.json"), "--out", str(out)])
        assert capsys.readouterr().out.strip() == f"wrote {written}"
        assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_start_up_checks_take_no_longer_with_more_exits(tmp_path):
    l2w.parse_config(["--dataset", "synthetic", "--exits", "2", "--out", str(tmp_path)])   # the first is slower
    started = time.perf_counter()
    l2w.parse_config(["--dataset", "synthetic", "--exits", "32", "--out", str(tmp_path)])   # 528 layers
    assert time.perf_counter() - started < 3


def test_checkpoint_that_does_not_fit_its_config_device_fallback_and_a_pretrained_run_without_ge(
        weights_run, tmp_path, capsys):
    # a config that does not describe the network in the file names both
    wrong = edited_checkpoint(weights_run, tmp_path / "wrong.pt", exits=3)
    line = one_line_error(["--eval-only", "--resume", wrong, "--out", str(tmp_path / "o")])
    assert "does not fit the msdnet with 3 exits that its config describes (Missing key(s) in state_dict: " in line
    # trained on a GPU this machine lacks: evaluated on what it has, unless --device asks
    gpu = edited_checkpoint(weights_run, tmp_path / "gpu.pt", device="cuda:99")
    l2w.main(["--eval-only", "--resume", gpu, "--out", str(tmp_path / "gpu")])
    assert json.loads((tmp_path / "gpu" / "results.json").read_text())["config"]["device"] == "auto"
    assert "--device cuda:99 asked for" in one_line_error(["--eval-only", "--resume", gpu, "--device", "cuda:99",
                                                              "--out", str(tmp_path / "o")])
    # phase 2 on a network trained without gradient equilibrium: a warning, then it runs
    l2w.main(["--imta", "finetune", "--pretrained", str(weights_run / "checkpoint.pt"), "--epochs", "0",
              "--out", str(tmp_path / "phase2")])
    assert (f"warning: --pretrained '{weights_run / 'checkpoint.pt'}' was trained without gradient equilibrium"
            in capsys.readouterr().out)


def test_an_unreadable_image_is_named_and_the_last_checkpoint_stays(tmp_path):
    write_image_tree(str(tmp_path / "data"), ["ant", "bee"], per_class=5)
    out = tmp_path / "run"
    l2w.main(["--dataset", "folder", "--data-dir", str(tmp_path / "data"), "--image-size", "32", "--exits", "2",
              "--batch-size", "4", "--holdout", "2", "--method", "baseline", "--epochs", "1", "--workers", "0",
              "--device", "cpu", "--out", str(out)])   # 8 training images: every one is read each epoch
    before = folder_hashes(out)
    broken = tmp_path / "data" / "train" / "bee" / "3.png"
    broken.write_bytes(broken.read_bytes()[:60])   # cut short, as an interrupted copy leaves it
    line = one_line_error(["--resume", str(out / "checkpoint.pt"), "--epochs", "2", "--workers", "1"])
    assert line == f"error: cannot read the image '{broken}' (OSError: image file is truncated)"
    assert folder_hashes(out) == before


# ----------------------------------------------------------------------------
# The README's demo, run as a user runs it
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def demo_process(request, tmp_path_factory):
    """The README's demo as a user runs it (`python l2w.py --dataset synthetic --exits 3`), the slowest part of the
    suite, started with the first test if a test below asks for it. In one thread at the lowest priority it runs
    on what the other tests leave of the CPUs (start-ups, single-threaded Python): two threads would stall each
    other whenever one of them waits for a core. Yields (process, run folder, its stderr) or None."""
    if not any("demo" in item.fixturenames for item in request.session.items):
        yield None
        return
    folder = tmp_path_factory.mktemp("demo")
    with open(folder / "stderr", "w") as stderr:
        process = subprocess.Popen([sys.executable, os.path.join(HERE, "l2w.py"), "--dataset", "synthetic", "--exits",
                                    "3", "--out", str(folder / "run"), "--device", "cpu"], cwd=HERE,
                                   stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.setpriority(os.PRIO_PROCESS, process.pid, 19)   # (not preexec_fn: the torch threads here make it unsafe)
    yield process, folder / "run", folder / "stderr"
    if process.poll() is None:   # the session ended before the demo's tests ran (-x, an interrupt)
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def demo(demo_process):
    """The demo's (config, results, run folder), once it has finished."""
    process, out, stderr = demo_process
    assert process.wait(timeout=900) == 0, stderr.read_text()[-3000:]
    results = json.loads((out / "results.json").read_text())
    return l2w.Config(**results["config"]), results, out


def test_demo_the_wpn_moves_and_no_exit_saturates_as_the_readme_says(demo):
    # The README's claims, which held for seeds 0-3 with 2 threads and hold here with 1: the WPN's
    # weights on the hold-out's losses moved from its starting point's by 0.1 or more on average
    # (weights average 1), and the losses keep a spread: on the hold-out no exit reaches 95 % and
    # the last exit beats the first.
    cfg, results, _ = demo
    last = results["history"][-1]
    assert statistics.fmean(last["weights"]["moved"]) >= 0.1, last["weights"]
    assert max(last["holdout_top1"]) < 95 and last["holdout_top1"][-1] > last["holdout_top1"][0], last


def numpy_ranks(x):
    """Ranks 1..n, ties given the mean of the ranks they span: (below + 1 + at or below) / 2."""
    ordered = np.sort(x)
    return (np.searchsorted(ordered, x, "left") + 1 + np.searchsorted(ordered, x, "right")) / 2


def test_the_wpn_weights_in_the_history_are_what_the_checkpoint_gives_recomputed_with_numpy(demo):
    # The last epoch's record recomputed from the run's checkpoint: the network over the hold-out
    # in eval mode (its own loop, in the loader's batches), the WPN's MLP and every statistic in numpy.
    # The WPN in float64, as the profile takes it: in float32, numpy's BLAS and torch round it
    # differently (by a few 1e-7), and the demo's weights hold pairs closer than that (two
    # 4e-9 apart at exit 1), whose order, and so the Spearman value, rounding would decide.
    cfg, results, out = demo
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    model = models.build_model("msdnet", 10, cfg.exits).eval()
    model.load_state_dict(state["model"])
    holdout = data.load(cfg, state["holdout_indices"]).threshold_set
    losses = []
    with torch.no_grad():
        for start in range(0, len(holdout), cfg.batch_size):
            images, targets = zip(*(holdout[i] for i in range(start, min(start + cfg.batch_size, len(holdout)))))
            logits = model(torch.stack(images))
            losses.append(torch.stack([F.cross_entropy(z, torch.tensor(targets), reduction="none") for z in logits], 1))
    losses = torch.cat(losses).double().numpy()

    def weights(wpn):   # d = 1 hidden layer, tanh output, w = 1 + delta (g - mean over the exits)
        w1, b1, w2, b2 = (wpn[k].double().numpy() for k in ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"))
        g = np.tanh(np.maximum(losses @ w1.T + b1, 0) @ w2.T + b2)
        return 1 + cfg.delta * (g - g.mean(axis=1, keepdims=True))

    w, start = weights(state["wpn"]), weights(state["wpn_init"])
    record = results["history"][-1]["weights"]
    assert cfg.constraint == "col" and record["mean"] == pytest.approx(w.mean(0), abs=1e-12)
    assert record["moved"] == pytest.approx(np.abs(w - start).mean(0), abs=1e-12)
    for k in range(cfg.exits):
        assert record["spearman"][k] == pytest.approx(np.corrcoef(numpy_ranks(w[:, k]), numpy_ranks(losses[:, k]))[0, 1],
                                                      abs=1e-12)
        tenths = np.array_split(w[np.argsort(losses[:, k], kind="stable"), k], 10)
        assert record["deciles"][k] == pytest.approx([t.mean() for t in tenths], abs=1e-12)
    assert len(results["history"]) == cfg.epochs and [h["epoch"] for h in results["history"]] == [1, cfg.epochs]


def test_readme_reads_the_weights_off_a_checkpoint_as_the_history_has_them(demo, capsys):
    cfg, results, out = demo
    readme = open(os.path.join(HERE, "README.md")).read()
    example = readme.split("<!-- begin weights example -->\n```python\n")[1].split("```")[0]
    example = example.replace("runs/synthetic_msdnet3_l2w_q0.75_seed0", str(out))
    assert example.count(str(out)) == 1
    exec(compile(example, "README weights example", "exec"), {"__name__": "example"})
    printed = ast.literal_eval(capsys.readouterr().out)
    for key, value in results["history"][-1]["weights"].items():
        assert np.allclose(printed[key], value, atol=1e-6), key


def test_numpy_ranks_average_ties_as_spearman_does():
    x = np.array([3.0, 1.0, 3.0, 2.0, 3.0])
    assert list(numpy_ranks(x)) == [4, 1, 4, 2, 4]
    assert l2w.average_ranks(torch.tensor(x)).tolist() == [4, 1, 4, 2, 4]


def drawn_panels(monkeypatch, paths):
    """The figure --plot draws for `paths`: {panel title: [(line label, x, y)]}, in panel order."""
    import matplotlib.figure
    panels = {}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda figure, *args, **kwargs: panels.update(
        {a.get_title(): [(line.get_label(), list(line.get_xdata()), list(line.get_ydata())) for line in a.lines]
         for a in figure.axes}))
    l2w.plot_curves([str(p) for p in paths], "curves.png")
    return panels


def test_plot_draws_the_holdout_accuracy_by_epoch_and_the_wpn_weights_of_each_l2w_run(demo, tmp_path, monkeypatch):
    cfg, results, out = demo
    baseline = tmp_path / "baseline"
    l2w.main([*TINY, "--method", "baseline", "--epochs", "2", "--out", str(baseline)])
    history, label = results["history"], "l2w msdnet3 synthetic"
    alone = drawn_panels(monkeypatch, [out])
    assert list(alone) == ["test set", "hold-out, each exit, by epoch", f"{label}: WPN weights"]
    assert alone["hold-out, each exit, by epoch"][cfg.exits - 1] == (
        f"{label}: exit {cfg.exits}", [1, 2], [h["holdout_top1"][-1] for h in history])
    weights = alone[f"{label}: WPN weights"]   # the line at weight 1, then exit by exit: first and last epoch
    for k in range(cfg.exits):
        for h, (name, x, y) in zip((history[0], history[-1]), weights[1 + 2 * k:3 + 2 * k]):
            assert name.startswith(f"exit {k + 1}, epoch {h['epoch']} (Spearman") and x == list(range(1, 11))
            assert y == h["weights"]["deciles"][k]
    # a baseline run weighs every sample 1: no weight panel; two runs: one panel of weights
    assert list(drawn_panels(monkeypatch, [baseline])) == ["test set", "hold-out, each exit, by epoch"]
    both = drawn_panels(monkeypatch, [out, baseline])
    assert list(both) == list(alone) and len(both["hold-out, each exit, by epoch"]) == cfg.exits + 2
    monkeypatch.undo()
    assert cli("--plot", out, baseline, "--out", tmp_path / "both.png").returncode == 0
    assert (tmp_path / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------
# CUDA (run where a GPU is present: `pytest -k cuda`; skipped elsewhere)
# ----------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def gpu():
    """The CUDA tests' device. Their bodies take it as an argument so that, where there is no GPU,
    they can be run on "cpu" (with this fixture overridden) to check their logic."""
    return "cuda"


def on_device(setup, device):
    """A copy of (model, wpn, optimizer, wpn_optimizer) on `device`, the optimizers' state too."""
    setup = copy.deepcopy(setup)   # one deepcopy keeps the optimizers' links to the parameters
    for module in setup[:2]:
        module.to(device)
    for optimizer in setup[2:]:   # loading its own state moves it to where the parameters are
        optimizer.load_state_dict(optimizer.state_dict())
    return setup


def l2w_script(folder, cifar=None, group=None):
    """The path of a script that runs l2w.py's command line as `python l2w.py` does, in a process
    of its own, after what no flag can set up: torchvision's CIFAR-10 checksums made those of the
    files write_fake_cifar10 wrote (`cifar`, what it returned; fake_cifar10_cfg patches them in this
    process only), and a process group of backend `group` from torchrun's variables (l2w builds one
    for two ranks or more)."""
    lines = ["import sys", f"sys.path.insert(0, {HERE!r})", "import torch", "import l2w"]
    if cifar:
        lines += ["import torchvision"] + [f"torchvision.datasets.CIFAR10.{name} = {value!r}"
                                           for name, value in zip(("train_list", "test_list", "meta"), cifar)]
    if group:
        lines += [f"torch.distributed.init_process_group({group!r})"]
    path = os.path.join(folder, "l2w_run.py")
    with open(path, "w") as f:
        f.write("\n".join(lines + ["l2w.main()"]) + "\n")
    return path


def sigterm_at(command, progress, cwd=None):
    """Run `command` and send it SIGTERM, as a scheduler about to preempt a job does, once it
    prints a line holding `progress`: its CompletedProcess, with the output after that line."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
    for line in proc.stdout:
        if progress in line:
            proc.send_signal(signal.SIGTERM)
            break
    stdout, stderr = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def bit_identical(a, b):
    """Nested dicts, lists and tensors equal, the tensors bit for bit and of one dtype."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(bit_identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(bit_identical(x, y) for x, y in zip(a, b))
    return a == b


def assert_evaluated_alike(got, want, images):
    """results.json's anytime and budgeted figures of one network evaluated twice on a GPU in
    batches of other shapes (torchrun's shares of each batch, one process's whole batches): every
    accuracy the same count of the `images` test images give or take one image, every budgeted
    Mul-Adds figure the same give or take one image's exit.

    Not equal: cuDNN picks its kernels by batch shape, so the logits differ by float32 rounding
    (~1e-6 of their size, evaluated in IEEE fp32), and an image whose two best logits, or whose
    confidence and an exit's threshold, lie that close may change its prediction or its exit. Such
    near ties are rare (of the order of 1e-5 of the images), so one in a figure is unlikely and two
    far more so. A real error (a share of the images lost or counted twice, other BatchNorm
    statistics, logits paired with other images' targets) moves many images, or leaves a
    percentage that is no count of `images`."""
    def count(percent):
        right = percent * images / 100
        assert abs(right - round(right)) < 1e-3, f"{percent}% is no count of {images} images"
        return round(right)

    costs = lambda results: [(r["exit"], r["flops"], r["params"]) for r in results["anytime"]]
    assert costs(got) == costs(want) and len(got["dynamic"]) == len(want["dynamic"]) > 0
    for a, b in zip(got["anytime"], want["anytime"]):
        assert all(abs(count(a[k]) - count(b[k])) <= 1 for k in ("acc1", "acc5")), (a, b)
    flops = [r["flops"] for r in want["anytime"]]
    for a, b in zip(got["dynamic"], want["dynamic"]):
        assert a["q"] == b["q"] and abs(count(a["acc"]) - count(b["acc"])) <= 1, (a, b)
        assert abs(a["flops"] - b["flops"]) * images <= (flops[-1] - flops[0]) * (1 + 1e-9), (a, b)


@cuda
@pytest.mark.parametrize("meta_grad", ["higher", "jvp"])
def test_cuda_l2w_iteration_equals_the_cpu_one(gpu, meta_grad):
    cfg, *setup, images, targets = double_setup(seed=6, meta_grad=meta_grad)
    on_gpu = on_device(setup, gpu)
    l2w.train_step(*setup, images, targets, cfg)
    l2w.train_step(*on_gpu, images.to(gpu), targets.to(gpu), cfg)
    for got, want in zip(state_of(*on_gpu[:3]), state_of(*setup[:3]), strict=True):
        assert torch.allclose(got.cpu().double(), want.double(), rtol=1e-7, atol=1e-9)


@cuda
def test_cuda_jvp_replays_the_gpus_dropout_draws_and_takes_highers_iteration(gpu):
    # Dropout draws from the GPU's random stream: jvp's forward-mode pass must replay step 1's
    # draws from it and leave it as higher does (float64, so that only rounding differs).
    knobs, *setup, images, targets = own_network_setup(dropout=0.3, dtype=torch.float64)
    higher, jvp = on_device(setup, gpu), on_device(setup, gpu)
    images, targets = images.to(gpu), targets.to(gpu)
    torch.manual_seed(2)
    l2w.train_step(*higher, images, targets, with_knobs(knobs, meta_grad="higher"))
    higher_draw = torch.rand(1, device=gpu)
    torch.manual_seed(2)
    l2w.train_step(*jvp, images, targets, with_knobs(knobs, meta_grad="jvp"))
    assert torch.equal(torch.rand(1, device=gpu), higher_draw)
    assert not all(torch.equal(a, b.to(gpu)) for a, b in zip(higher[1].parameters(), setup[1].parameters()))
    for got, want in zip(state_of(*jvp[:3]), state_of(*higher[:3]), strict=True):
        assert torch.allclose(got.double(), want.double(), rtol=1e-9, atol=1e-12)


@cuda
def test_cuda_cifar_batches_made_on_the_gpu_are_the_cpus(gpu):
    # Crops, flips and normalisation of whole batches on the GPU, against the same on the CPU
    # (checked against torchvision above); not bit for bit: CUDA divides by a scalar as a product
    # with its reciprocal, which may differ in the last bit. A wrong offset or flip differs by O(1).
    images, labels = cifar_like(40, seed=3)
    batches = {}
    for device in ("cpu", gpu):
        split = data.DeviceImages(images.to(device), labels.to(device), range(3, 40), data.CIFAR_STATS["cifar10"],
                                  augment=True, seed=5)
        sampler = data.ShardedBatches(len(split), 8, seed=5)
        sampler.set_epoch(2)
        batches[device] = list(data.DeviceBatches(split, sampler))
    assert len(batches[gpu]) == len(batches["cpu"]) == 4
    for (x, y), (x_cpu, y_cpu) in zip(batches[gpu], batches["cpu"]):
        assert x.device.type == torch.device(gpu).type and torch.equal(y.cpu(), y_cpu)
        assert torch.allclose(x.cpu(), x_cpu, rtol=0, atol=1e-5)


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_one_synthetic_epoch_trains_and_evaluates(tmp_path, monkeypatch, gpu, precision):
    if precision == "fp16":
        monkeypatch.setattr(l2w, "amp_dtype", lambda device: torch.float16)
    elif precision == "bf16" and l2w.amp_dtype(torch.device(gpu)) != torch.bfloat16:
        pytest.skip("this GPU has no native bf16")
    cfg = small_cfg(device=gpu, amp=precision != "fp32", out=str(tmp_path / precision), synthetic_size=600)
    results = l2w.train(cfg)
    assert all(math.isfinite(r["acc1"]) and r["acc1"] > 10 for r in results["anytime"])   # above chance
    state = l2w.load_checkpoint(str(tmp_path / precision / "checkpoint.pt"))
    assert (state["scalers"] is not None) == (precision == "fp16") and state["rng"]["cuda"] is not None
    again = l2w.train(dataclasses.replace(cfg, eval_only=True, resume=str(tmp_path / precision / "checkpoint.pt"),
                                          out=str(tmp_path / "eval")))
    # batches of the same shapes: the same kernels, the same logits
    assert again["anytime"] == results["anytime"] and again["dynamic"] == results["dynamic"]


@cuda
def test_cuda_bench_prints_times_peak_memory_and_the_on_device_cifar_pipeline(tmp_path, monkeypatch, gpu):
    cfg = fake_cifar10_cfg(tmp_path, monkeypatch)   # CIFAR-10 files written here: the pipeline is timed offline
    result = cli("--bench", "--dataset", "cifar10", "--data-dir", cfg.data_dir, "--holdout", "20", "--exits", "5",
                 "--batch-size", "16", "--bench-iters", "2", "--device", gpu)
    assert result.returncode == 0, result.stderr
    peaks = dict(re.findall(r"^(plain|higher|jvp) .* ms/iter .* peak memory (\d+) MiB$", result.stdout, re.M))
    assert len(peaks) == 3 and int(peaks["higher"]) > int(peaks["plain"]) > 0, result.stdout   # a second-order graph
    assert "ratio  higher/plain" in result.stdout
    assert re.search(r"^data +[\d.]+ img/s: the training data pipeline \(augmented on the device\)$", result.stdout,
                     re.M), result.stdout


@cuda
def test_cuda_deterministic_cifar_run_stopped_by_sigterm_resumes_bit_identically(tmp_path, gpu):
    # --deterministic promises a bit-identical resume on a GPU too. Its settings must be in place
    # before cuBLAS starts, so each run is a process of its own, on CIFAR-10 files written here
    # (each batch cropped and flipped on the GPU); the jvp meta-gradient and --channels-last come along.
    script = l2w_script(tmp_path, cifar=write_fake_cifar10(str(tmp_path / "cifar"), per_batch=24, n_test=30))
    command = [sys.executable, script, "--dataset", "cifar10", "--data-dir", str(tmp_path / "cifar"), "--holdout",
               "20", "--exits", "2", "--epochs", "2", "--batch-size", "16", "--lr", "0.1", "--meta-grad", "jvp",
               "--deterministic", "--channels-last", "--print-every", "1", "--device", gpu]
    straight, split = tmp_path / "straight", tmp_path / "split"
    result = subprocess.run(command + ["--out", str(straight)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # SIGTERM in the second epoch (100 training images: 6 iterations an epoch)
    result = sigterm_at(command + ["--out", str(split)], "epoch 2/2 iter 1/6")
    assert result.returncode == 128 + signal.SIGTERM, (result.stdout, result.stderr[-3000:])
    state = l2w.load_checkpoint(str(split / "checkpoint.pt"))
    assert state["epoch"] == 1 and 1 <= state["batch"] < 6 and not (split / "results.json").exists()
    result = subprocess.run([sys.executable, script, "--resume", str(split / "checkpoint.pt")], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = (torch.load(folder / "checkpoint.pt", weights_only=True) for folder in (straight, split))
    assert all(bit_identical(a[k], b[k]) for k in ("epoch", "batch", "model", "wpn", "optimizer", "wpn_optimizer"))
    assert bit_identical(a["rng"]["cuda"], b["rng"]["cuda"])   # the stream the GPU's dropout draws from
    ra, rb = (json.loads((folder / "results.json").read_text()) for folder in (straight, split))
    assert ra["anytime"] == rb["anytime"] and ra["dynamic"] == rb["dynamic"]
    timeless = lambda history: [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")} for h in history]
    assert timeless(ra["history"]) == timeless(rb["history"]) and len(ra["history"]) == 2


@cuda
def test_cuda_imta_pretrain_then_finetune_exits_early_as_the_budgeted_protocol(tmp_path, gpu):
    phase1, phase2 = tmp_path / "phase1", tmp_path / "phase2"
    result = cli("--dataset", "synthetic", "--exits", "3", "--epochs", "1", "--synthetic-size", "300", "--holdout",
                 "60", "--batch-size", "32", "--imta", "pretrain", "--out", phase1, "--device", gpu)
    assert result.returncode == 0, result.stderr
    result = cli("--imta", "finetune", "--pretrained", phase1 / "checkpoint.pt", "--epochs", "1", "--batch-size", "32",
                 "--meta-grad", "jvp", "--channels-last", "--early-exit", "--q", "0.5", "--out", phase2,
                 "--device", gpu)
    assert result.returncode == 0, result.stderr
    first, second = (l2w.load_checkpoint(str(folder / "checkpoint.pt")) for folder in (phase1, phase2))
    assert second["config"]["imta"] == "finetune" and min(second["history"][0]["weights"]["moved"]) > 0
    assert all(torch.equal(second["model"]["backbone." + k], v) for k, v in first["model"].items())   # frozen
    # Real early exit runs on batches cut to the images still running: other shapes than the
    # budgeted protocol's whole batches, so its exits and predictions are that protocol's give or
    # take one image (assert_evaluated_alike says why).
    results = json.loads((phase2 / "results.json").read_text())
    early, images = results["early_exit"], 100   # --synthetic-size 300: 100 test images
    assert early["budgeted_accuracy"] == next(r["acc"] for r in results["dynamic"] if r["q"] == 0.5)
    assert [run["batch_size"] for run in early["runs"]] == [1, 32]
    for run in early["runs"]:
        assert run["same_as_budgeted"] >= images - 1, run
        assert abs(run["accuracy"] - early["budgeted_accuracy"]) <= 100 / images + 1e-9, run


@cuda
def test_cuda_torchrun_over_nccl_stops_on_sigterm_resumes_and_evaluates_as_one_process(tmp_path, gpu):
    # l2w builds a process group for two ranks or more: NCCL, rank i on cuda:i. NCCL refuses two
    # ranks on one GPU, so one GPU runs one rank, in a group its script builds (l2w_script): DDP,
    # l2w's collectives (BatchNorm buffers broadcast before evaluation, predictions gathered, the
    # stop signal agreed on, the replicas compared) and the last barrier then run over NCCL as on
    # many GPUs; only the sharding of the batches, which knows no device, is left to the two-rank
    # CPU test. (gloo could put two ranks on one GPU, but l2w never pairs gloo with GPUs.)
    ranks = 2 if gpu == "cuda" and torch.cuda.device_count() >= 2 else 1
    group = "nccl" if gpu == "cuda" else "gloo"   # as l2w chooses (gloo: to check this test's logic on the CPU)
    script = os.path.join(HERE, "l2w.py") if ranks > 1 else l2w_script(tmp_path, group=group)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), script]
    out = tmp_path / "ddp"
    # 540 training images: 16 iterations an epoch; torchrun passes a SIGTERM on to its ranks
    flags = ["--dataset", "synthetic", "--exits", "3", "--epochs", "2", "--synthetic-size", "600", "--holdout", "60",
             "--batch-size", "32", "--amp", "--channels-last", "--print-every", "1", "--out", str(out), "--device", gpu]
    result = sigterm_at(torchrun + flags, "epoch 1/2 iter 2/16", cwd=tmp_path)
    assert "stopped by signal" in result.stdout, (result.stdout, result.stderr[-3000:])
    state = l2w.load_checkpoint(str(out / "checkpoint.pt"))
    assert state["epoch"] == 0 and 2 <= state["batch"] < 16 and not (out / "results.json").exists()
    result = subprocess.run(torchrun + ["--resume", str(out / "checkpoint.pt")], capture_output=True, text=True,
                            timeout=600, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("resumed from") == 1 and f"at epoch 0, iteration {state['batch']}" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["world_size"] == ranks
    assert [h["epoch"] for h in results["history"]] == [1, 2]
    single = run_cli("--eval-only", "--resume", str(out / "checkpoint.pt"), "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    assert_evaluated_alike(json.loads((tmp_path / "single" / "results.json").read_text()), results, images=200)
