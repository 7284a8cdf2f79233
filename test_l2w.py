"""Tests for the L2W-DEN reference implementation (CPU, a few minutes in all).

Each test compares against something independent: a published figure, a second computation
of the same quantity (torch.func, finite differences, a literal loop), or a hand-worked case.
"""
import copy
import dataclasses
import hashlib
import json
import math
import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import data
import l2w
import models

HERE = os.path.dirname(os.path.abspath(__file__))


def small_cfg(**overrides):
    base = dict(dataset="synthetic", exits=3, epochs=1, batch_size=32, lr=0.1, holdout=60,
                synthetic_size=300, workers=0, print_every=100, device="cpu")
    return l2w.Config(**{**base, **overrides})


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, os.path.join(HERE, "l2w.py"), *args], capture_output=True,
                          text=True, cwd=cwd or HERE, timeout=600)


# ----------------------------------------------------------------------------
# models.py: published figures (PAPER.md, "Published figures to match")
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


# ----------------------------------------------------------------------------
# RANet (Yang et al., CVPR 2020): Model-C-1 (6 exits) and Model-C-2 (8 exits)
# ----------------------------------------------------------------------------

# Model-C-1 on CIFAR-10, as the L2W-DEN issue states them: cumulative Mul-Adds (M, 3 decimals)
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


def test_ranet_only_cifar_sized_images():
    with pytest.raises(ValueError, match="image_size 224"):
        models.build_model("ranet", 10, 6, image_size=224)


@pytest.mark.parametrize("exits", [6, 8])
def test_ranet_trains_through_train_step_on_the_synthetic_set(exits):
    torch.manual_seed(0)
    cfg = small_cfg(arch="ranet", exits=exits, batch_size=8)
    model, wpn, optimizer, wpn_optimizer, _ = l2w.build(cfg, 10, torch.device("cpu"))
    images, labels = data.synthetic(8, seed=0)[0].tensors
    before = copy.deepcopy((model.state_dict(), wpn.state_dict()))
    out = l2w.train_step(model, wpn, optimizer, wpn_optimizer, images, labels, cfg)
    assert math.isfinite(out["loss"]) and math.isfinite(out["meta_loss"])
    changed = [not torch.equal(v, before[0][k]) for k, v in model.state_dict().items() if "num_batches" not in k]
    assert all(changed)                       # every parameter and BN statistic was updated
    assert all(not torch.equal(v, before[1][k]) for k, v in wpn.state_dict().items())


@pytest.mark.parametrize("exits", [6, 8])
def test_ranet_cli_run_writes_results_json(tmp_path, exits):
    out = tmp_path / f"ranet{exits}"
    result = run_cli("--dataset", "synthetic", "--arch", "ranet", "--exits", str(exits), "--epochs", "1",
                     "--synthetic-size", "30", "--holdout", "6", "--batch-size", "8", "--out", str(out),
                     "--device", "cpu")
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    flops, params = models.count_cost(models.build_model("ranet", 10, exits), 32)
    assert [r["flops"] for r in results["anytime"]] == flops and [r["params"] for r in results["anytime"]] == params
    assert len(results["dynamic"]) == 39 and results["config"]["arch"] == "ranet"


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


def test_wpn_shape_and_range():
    wpn = l2w.WPN(5, depth=2, width=7)
    assert sum(isinstance(m, torch.nn.Linear) for m in wpn.modules()) == 3
    out = wpn(torch.rand(4, 5) * 10)
    assert out.shape == (4, 5) and out.abs().max() < 1


def test_meta_exit_assignment_hand_worked():
    confidence = torch.tensor([[0.9, 0.8, 0.3, 0.2, 0.1],
                               [0.1, 0.9, 0.8, 0.2, 0.7],
                               [0.5, 0.5, 0.5, 0.5, 0.5]])
    # n=5, fractions (0.4, 0.4, 0.2): exit 0 takes 2 (samples 0, 1), exit 1 takes 2 of the rest
    # by its own confidence (samples 2, 4), the last exit gets sample 3.
    fractions = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)
    exit_of = l2w.exit_with_thresholds(confidence, l2w.fit_thresholds(confidence, fractions))
    assert exit_of.tolist() == [0, 0, 1, 2, 1]


def reference_meta_loss(logits, targets, q):
    """PAPER.md, Alg. step 4, written as a plain loop over Python lists."""
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
    """Alg. 1 built independently of l2w.py's half_step, with the meta-gradient from torch.func."""
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
    l2w.train_step(model, wpn, optimizer, wpn_optimizer, images.flip(0), targets.flip(0), cfg)
    return cfg, model, wpn, optimizer, wpn_optimizer, images, targets


def state_of(model, wpn, optimizer):
    momentum = [optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    return list(model.state_dict().values()) + list(wpn.state_dict().values()) + momentum


def test_train_step_matches_independent_torch_func_computation():
    cfg, model, wpn, optimizer, wpn_optimizer, images, targets = double_setup()
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


def test_virtual_step_leaves_model_optimizer_and_bn_untouched():
    # With delta = 0 every weight is 1 whatever the WPN says, so an L2W iteration must end in
    # exactly the state of a baseline iteration -- unless the virtual step leaked into the real
    # parameters, momentum buffers or BatchNorm running statistics.
    cfg, model, wpn, optimizer, wpn_optimizer, images, targets = double_setup(seed=2)
    base = copy.deepcopy((model, wpn, optimizer, wpn_optimizer))
    l2w.train_step(model, wpn, optimizer, wpn_optimizer, images, targets, dataclasses.replace(cfg, delta=0.0))
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


# ----------------------------------------------------------------------------
# Evaluation: budgeted protocol (MSDNet) and real early exiting
# ----------------------------------------------------------------------------

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


def msdnet_dynamic_eval_loop(val_logits, val_targets, test_logits, test_targets, flops):
    """MSDNet's dynamic_evaluate written as its per-sample loops (PAPER.md, "Evaluation protocols")."""
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
        curve.append((100.0 * correct / n_test, sum(t / n_test * f for t, f in zip(taken, flops))))
    return curve


def test_dynamic_evaluate_matches_msdnet_loop():
    torch.manual_seed(0)
    classes = 5
    scale = torch.tensor([0.5, 1.0, 2.0, 3.0])  # later exits more confident on average
    val_logits = [torch.randn(120, classes) * s for s in scale]
    test_logits = [torch.randn(150, classes) * s for s in scale]
    val_targets, test_targets = torch.randint(classes, (120,)), torch.randint(classes, (150,))
    flops = [1e6, 2.5e6, 4e6, 7e6]
    curve = l2w.dynamic_evaluate(val_logits, val_targets, test_logits, test_targets, flops)
    expected = msdnet_dynamic_eval_loop(val_logits, val_targets, test_logits, test_targets, flops)
    assert len(curve) == 39 and [c["q"] for c in curve] == [p / 20 for p in range(1, 40)]
    for row, (acc, exp_flops) in zip(curve, expected):
        assert row["acc"] == pytest.approx(acc) and row["flops"] == pytest.approx(exp_flops)
    assert curve[0]["flops"] < curve[-1]["flops"]


def test_dynamic_evaluate_is_fast_at_paper_scale():
    # 39 budgets on 5,000 + 10,000 samples, 7 exits, 100 classes (the authors' loop: ~17 s)
    import time
    val = [torch.randn(5000, 100) for _ in range(7)]
    test = [torch.randn(10000, 100) for _ in range(7)]
    start = time.perf_counter()
    l2w.dynamic_evaluate(val, torch.randint(100, (5000,)), test, torch.randint(100, (10000,)), list(range(1, 8)))
    assert time.perf_counter() - start < 5   # generous for a shared CI machine; ~0.3 s measured


def test_early_exit_predict_stops_computing_and_agrees_with_thresholds():
    torch.manual_seed(0)
    model = models.build_model("msdnet", 10, 3).eval()
    images = torch.randn(12, 3, 32, 32)
    with torch.no_grad():
        logits = model(images)
    confidence = l2w.confidences(logits)
    thresholds = l2w.fit_thresholds(confidence, l2w.exit_fractions(1.0, 3))
    expected = l2w.exit_with_thresholds(confidence, thresholds)
    heads_run = [0, 0, 0]
    for k, head in enumerate(model.exits):
        head.register_forward_hook(lambda m, i, o, k=k: heads_run.__setitem__(k, heads_run[k] + 1))
    for i in range(len(images)):
        label, k = l2w.early_exit_predict(model, images[i], thresholds)
        assert k == expected[i] and label == logits[k][i].argmax().item()
    counts = torch.bincount(expected, minlength=3).tolist()
    assert heads_run == [12, 12 - counts[0], counts[2]]   # later exits ran only for samples that reached them
    assert 0 < counts[0] < 12


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
    raw = splits.threshold_set.base.data[splits.holdout_indices[0].item()]
    mean, std = data.CIFAR_STATS["cifar10"]
    expected = (torch.tensor(raw).permute(2, 0, 1).float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert torch.allclose(splits.threshold_set[0][0], expected, atol=1e-6)
    assert torch.equal(splits.threshold_set[0][0], splits.threshold_set[0][0])
    # --holdout 0: thresholds from all training images, with test-time transforms
    splits = data.load(dataclasses.replace(cfg, holdout=0))
    assert splits.threshold_source == "train" and len(splits.train) == len(splits.threshold_set) == 100


def test_synthetic_set_is_seeded_learnable_and_graded():
    train, test = data.synthetic(600, seed=0)
    again, _ = data.synthetic(600, seed=0)
    assert torch.equal(train.tensors[0], again.tensors[0]) and train.tensors[0].shape == (600, 3, 32, 32)
    assert len(test) == 200 and set(train.tensors[1].tolist()) == set(range(10))
    # a nearest-prototype rule (class means of the training set) is far above chance on the test
    # set, and its margin spreads from easy to hard samples
    x, y = train.tensors
    means = torch.stack([x[y == c].mean(0) for c in range(10)]).flatten(1)
    distances = torch.cdist(test.tensors[0].flatten(1), means)
    assert (distances.argmin(1) == test.tensors[1]).float().mean() > 0.5
    margin = distances.sort(1).values[:, 1] - distances.min(1).values
    assert margin.quantile(0.9) > 3 * margin.quantile(0.1)


# ----------------------------------------------------------------------------
# End to end through the CLI
# ----------------------------------------------------------------------------

def test_cli_end_to_end_writes_results_json(tmp_path):
    out = tmp_path / "run"
    result = run_cli("--dataset", "synthetic", "--exits", "3", "--epochs", "1", "--synthetic-size", "300",
                     "--holdout", "60", "--batch-size", "32", "--out", str(out), "--device", "cpu")
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
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1 and state["config"] == results["config"] and len(state["holdout_indices"]) == 60
    assert json.loads((out / "holdout_indices.json").read_text()) == state["holdout_indices"].tolist()

    # --eval-only on the checkpoint reproduces the numbers
    again = run_cli("--eval-only", "--resume", str(out / "checkpoint.pt"), "--out", str(tmp_path / "eval"))
    assert again.returncode == 0, again.stderr
    evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert evaluated["anytime"] == results["anytime"] and evaluated["dynamic"] == results["dynamic"]


def test_resume_is_exact(tmp_path):
    cfg = small_cfg(epochs=2, out=str(tmp_path / "straight"))
    l2w.train(cfg)
    l2w.train(dataclasses.replace(cfg, out=str(tmp_path / "split")), stop_after_epoch=1)
    assert torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)["epoch"] == 1
    result = run_cli("--resume", str(tmp_path / "split" / "checkpoint.pt"))
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    for key in ("model", "wpn"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    for key in ("optimizer", "wpn_optimizer"):
        for pa, pb in zip(a[key]["state"].values(), b[key]["state"].values()):
            assert all(torch.equal(torch.as_tensor(pa[k]), torch.as_tensor(pb[k])) for k in pa)
    ra = json.loads((tmp_path / "straight" / "results.json").read_text())
    rb = json.loads((tmp_path / "split" / "results.json").read_text())
    assert ra["anytime"] == rb["anytime"] and ra["dynamic"] == rb["dynamic"]


def test_config_precedence_defaults_preset_flags():
    cfg, state = l2w.parse_config(["--dataset", "cifar100", "--exits", "7"])
    assert state is None and (cfg.batch_size, cfg.lr, cfg.epochs, cfg.q, cfg.delta) == (1024, 0.8, 300, 0.75, 0.8)
    assert cfg.exits == 7 and cfg.constraint == "col" and cfg.meta_interval == 1 and cfg.wpn_width == 500
    assert cfg.out == os.path.join("runs", "cifar100_msdnet7_l2w")
    cfg, _ = l2w.parse_config(["--dataset", "synthetic", "--batch-size", "64", "--method", "baseline"])
    assert cfg.batch_size == 64 and cfg.epochs == l2w.PRESETS["synthetic"]["epochs"]
    assert cfg.method == "baseline" and cfg.momentum == l2w.Config.momentum


def test_bench_reports_both_iterations_and_their_ratio():
    result = run_cli("--bench", "--dataset", "synthetic", "--exits", "2", "--batch-size", "8", "--bench-iters", "1",
                     "--device", "cpu")
    assert result.returncode == 0, result.stderr
    ms = {line.split()[0]: float(line.split()[1]) for line in result.stdout.splitlines()
          if line.startswith(("plain ", "l2w "))}
    ratio = float(result.stdout.split("ratio")[1].split("x")[0])
    assert ratio == pytest.approx(ms["l2w"] / ms["plain"], rel=0.01) and ratio > 1   # the meta step costs


def test_bad_input_gives_one_line_and_nonzero_exit(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    phase1 = tmp_path / "phase1.pt"
    write_config_checkpoint(phase1, imta="pretrain")
    cases = {
        "unknown dataset": ["--dataset", "mnist"],
        "unknown arch": ["--arch", "resnet"],
        "at least 1 exit": ["--exits", "0"],
        "ranet builds 6 exits (Model-C-1) or 8 exits (Model-C-2), got 5": ["--arch", "ranet", "--exits", "5"],
        "must be even": ["--batch-size", "7"],
        "--q must be > 0": ["--q", "0"],
        "--delta must be >= 0": ["--delta", "-0.1"],
        "does not exist": ["--resume", str(tmp_path / "missing.pt")],
        "corrupt": ["--resume", str(corrupt)],
        "--eval-only needs --resume": ["--eval-only", "--dataset", "synthetic"],
        "invalid int value": ["--exits", "three"],
        f"cifar10 not found in '{tmp_path / 'empty'}'": ["--dataset", "cifar10", "--data-dir", str(tmp_path / "empty")],
        "unknown --imta 'both'": ["--imta", "both"],
        "--imta is built for msdnet": ["--arch", "ranet", "--exits", "6", "--imta", "pretrain"],
        "--imta finetune needs --pretrained": ["--imta", "finetune"],
        "--pretrained is for --imta finetune": ["--pretrained", str(phase1)],
        "--exits 5 does not match the pretrained network's 3": ["--imta", "finetune", "--pretrained", str(phase1),
                                                                "--exits", "5"],
        "--kd-gamma must be in [0, 1]": ["--kd-gamma", "1.5"],
        "--kd-temperature must be > 0": ["--kd-temperature", "0"],
    }
    procs = {msg: subprocess.Popen([sys.executable, os.path.join(HERE, "l2w.py"), *args, "--out", str(tmp_path / "o")],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for msg, args in cases.items()}
    for msg, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode != 0, msg
        assert "Traceback" not in stderr, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], (msg, stderr)


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


def test_folder_dataset_loads_and_trains_end_to_end(tmp_path):
    write_image_tree(str(tmp_path), ["ant", "bee", "cat"], per_class=6)
    cfg = small_cfg(dataset="folder", data_dir=str(tmp_path), image_size=32, holdout=3)
    splits = data.load(cfg)
    assert splits.num_classes == 3 and splits.class_counts == [6, 6, 6]
    assert (len(splits.train), len(splits.threshold_set), len(splits.test)) == (15, 3, 18)
    image, label = splits.train[(2, 0)]
    assert image.shape == (3, 32, 32) and label in (0, 1, 2)
    assert torch.equal(splits.train[(2, 0)][0], image)          # augmentation seeded per (epoch, sample)
    assert not torch.equal(splits.train[(3, 0)][0], image)
    out = tmp_path / "run"
    result = run_cli("--dataset", "folder", "--data-dir", str(tmp_path), "--image-size", "32", "--exits", "2",
                     "--epochs", "1", "--batch-size", "4", "--holdout", "3", "--workers", "2", "--out", str(out),
                     "--device", "cpu")
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert len(results["anytime"]) == 2 and results["class_counts"] == [6, 6, 6]


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
        result = run_cli("--dataset", "imagenet", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"))
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert result.stderr.strip().count("\n") == 0 and message in result.stderr


def first_meta_gradient(setup, cfg, scaler=None):
    model, wpn, optimizer, wpn_optimizer, images, targets = copy.deepcopy(setup)
    recorded = []
    step = wpn_optimizer.step
    wpn_optimizer.step = lambda: (recorded.append(torch.cat([p.grad.flatten() for p in wpn.parameters()])), step())[1]
    l2w.train_step(model, wpn, optimizer, wpn_optimizer, images, targets, cfg, scaler=scaler)
    return recorded[0]


def test_meta_gradient_under_amp_is_close_to_fp32(monkeypatch):
    torch.manual_seed(0)
    cfg = small_cfg(lr=0.5, batch_size=16)
    model, wpn, optimizer, wpn_optimizer, _ = l2w.build(cfg, 10, torch.device("cpu"))
    images, targets = torch.randn(16, 3, 32, 32), torch.randint(10, (16,))
    l2w.train_step(model, wpn, optimizer, wpn_optimizer, images.flip(0), targets.flip(0), cfg)  # momentum
    setup = (model, wpn, optimizer, wpn_optimizer, images, targets)
    fp32 = first_meta_gradient(setup, cfg)
    bf16 = first_meta_gradient(setup, dataclasses.replace(cfg, amp=True))
    assert F.cosine_similarity(fp32, bf16, dim=0) > 0.95 and (fp32 - bf16).norm() < 0.3 * fp32.norm()
    # fp16 with loss scaling (what GPUs without bf16 get), run on the CPU
    monkeypatch.setattr(l2w, "amp_dtype", lambda device: torch.float16)
    fp16 = first_meta_gradient(setup, dataclasses.replace(cfg, amp=True), torch.amp.GradScaler("cpu"))
    assert F.cosine_similarity(fp32, fp16, dim=0) > 0.95 and (fp32 - fp16).norm() < 0.3 * fp32.norm()


def test_cli_amp_run_on_cpu(tmp_path):
    out = tmp_path / "amp"
    result = run_cli("--dataset", "synthetic", "--exits", "2", "--epochs", "1", "--synthetic-size", "200",
                     "--holdout", "40", "--batch-size", "32", "--amp", "--channels-last", "--out", str(out),
                     "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "amp bfloat16" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["amp"] is True and all(math.isfinite(r["acc1"]) for r in results["anytime"])


def test_torchrun_two_ranks_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             os.path.join(HERE, "l2w.py"), "--dataset", "synthetic", "--exits", "3", "--epochs", "1",
                             "--synthetic-size", "300", "--holdout", "60", "--batch-size", "32", "--out", str(out),
                             "--device", "cpu"], capture_output=True, text=True, env=env, timeout=600, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1 and result.stdout.count("anytime (test set") == 1
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "holdout_indices.json", "results.json"]
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["world_size"] == 2 and results["replicas_identical"] is True
    assert len(results["dynamic"]) == 39 and len(results["anytime"]) == 3
    # a distributed run resumes under torchrun (bit-exactness is checked single-process above)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             os.path.join(HERE, "l2w.py"), "--resume", str(out / "checkpoint.pt"), "--epochs", "2"],
                            capture_output=True, text=True, env=env, timeout=600, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("resumed from") == 1 and "epoch 2/2 iter 7/7" in result.stdout
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 2
    assert json.loads((out / "results.json").read_text())["replicas_identical"] is True


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
        losses = l2w.distillation_losses([z1, last], teacher, label, 1.0, 0.5, reduction)
        assert losses[0].tolist() == pytest.approx([0.5 * ce + 0.5 * kl_used, math.log(4)], rel=1e-6)
    # T = 2: softmax(z / 2) = (sqrt 3, 1) / (1 + sqrt 3), KL = 1/2 ln((1 + sqrt 3)^2 / (4 sqrt 3)), times T^2
    kl_t2 = 0.5 * math.log((1 + math.sqrt(3)) ** 2 / (4 * math.sqrt(3)))
    losses = l2w.distillation_losses([z1, last], teacher, label, 2.0, 0.9, "mean")
    assert losses[0, 0].item() == pytest.approx(0.1 * ce + 0.9 * 4 * kl_t2 / 2, rel=1e-6)


def test_distillation_loss_averages_to_imtas_batch_loss():
    # Averaged over the batch, each exit's column is IMTA's loss of that exit: (1 - gamma) CE +
    # gamma T^2 nn.KLDivLoss() with the old default (elementwise) mean; the last exit CE alone.
    torch.manual_seed(0)
    logits, teacher, labels = [torch.randn(6, 5) for _ in range(3)], torch.randn(6, 5), torch.randint(5, (6,))
    temperature, gamma = 3.0, 0.9
    losses = l2w.distillation_losses(logits, teacher, labels, temperature, gamma, "mean")
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
    l2w.train_step(model, wpn, optimizer, wpn_optimizer, images, targets, cfg)
    rmodel, rwpn, ropt = ref
    (x, xm), (y, ym) = images.chunk(2), targets.chunk(2)
    wpn_params = dict(rwpn.named_parameters())
    meta = reference_virtual_meta_loss(rmodel, wpn_params, rwpn, ropt, x, y, xm, ym, cfg, exit_losses)
    return recorded[0], torch.autograd.grad(meta, list(wpn_params.values()))


def test_meta_gradient_through_gradient_equilibrium_matches_torch_func():
    cfg, model, wpn, optimizer, wpn_optimizer, images, targets = double_setup(seed=5, imta="pretrain")
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


def test_meta_gradient_through_phase2_heads_matches_torch_func_and_phase1_stays_bit_identical():
    cfg, model, wpn, optimizer, wpn_optimizer, images, targets = double_setup(seed=6, imta="finetune")
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


def write_config_checkpoint(path, **config):
    """A checkpoint that holds a config only (enough for the checks parse_config makes)."""
    torch.save({"config": dataclasses.asdict(small_cfg(**config)), "model": {}, "epoch": 1}, path)


def test_imta_presets_and_architecture_from_pretrained(tmp_path):
    write_config_checkpoint(tmp_path / "cifar.pt", dataset="cifar100", exits=5, imta="pretrain")
    cfg, _ = l2w.parse_config(["--imta", "finetune", "--pretrained", str(tmp_path / "cifar.pt")])
    assert (cfg.dataset, cfg.exits, cfg.batch_size, cfg.lr, cfg.q) == ("cifar100", 5, 1024, 0.8, 0.75)
    assert (cfg.kd_temperature, cfg.kd_gamma, cfg.kd_reduction) == (3.0, 0.9, "mean")
    assert cfg.out == os.path.join("runs", "cifar100_msdnet5_l2w_imta-finetune")
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
    result = run_cli("--dataset", "synthetic", "--exits", "3", "--epochs", "1", "--synthetic-size", "120",
                     "--holdout", "24", "--batch-size", "16", "--imta", "pretrain", "--out", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "IMTA phase 1: gradient equilibrium" in result.stdout
    return out


def test_imta_pretrain_then_finetune_through_the_cli(imta_phase1, tmp_path):
    assert json.loads((imta_phase1 / "results.json").read_text())["config"]["imta"] == "pretrain"
    phase1 = tmp_path / "phase1.pt"
    phase1.write_bytes((imta_phase1 / "checkpoint.pt").read_bytes())
    out = tmp_path / "phase2"
    result = run_cli("--imta", "finetune", "--pretrained", str(phase1), "--epochs", "1", "--batch-size", "16",
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
    first = torch.load(phase1, weights_only=False)
    second = torch.load(out / "checkpoint.pt", weights_only=False)
    assert {k.removeprefix("backbone."): v for k, v in second["model"].items() if k.startswith("backbone.")}.keys() \
        == first["model"].keys()
    assert all(torch.equal(second["model"]["backbone." + k], v) for k, v in first["model"].items())
    new_parameters = {n for n, _ in models.IMTANet(models.build_model("msdnet", 10, 3), 10).named_parameters()
                      if not n.startswith("backbone.")}
    assert sum(second["model"][n].numel() for n in new_parameters) == 9_758
    assert all(isinstance(v, torch.Tensor) for v in second["model"].values())
    assert torch.equal(torch.as_tensor(second["holdout_indices"]), torch.as_tensor(first["holdout_indices"]))

    # self-contained: evaluated without the phase-1 file, the same numbers
    phase1.unlink()
    again = run_cli("--eval-only", "--resume", str(out / "checkpoint.pt"), "--out", str(tmp_path / "eval"))
    assert again.returncode == 0, again.stderr
    evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert evaluated["anytime"] == results["anytime"] and evaluated["dynamic"] == results["dynamic"]


def test_phase2_resume_is_exact(imta_phase1, tmp_path):
    phase1 = tmp_path / "phase1.pt"
    phase1.write_bytes((imta_phase1 / "checkpoint.pt").read_bytes())
    flags = ["--imta", "finetune", "--pretrained", str(phase1), "--epochs", "2", "--batch-size", "16", "--device", "cpu"]
    cfg, _ = l2w.parse_config(flags + ["--out", str(tmp_path / "straight")])
    l2w.train(cfg)
    cfg, _ = l2w.parse_config(flags + ["--out", str(tmp_path / "split")])
    l2w.train(cfg, stop_after_epoch=1)
    phase1.unlink()   # the phase-2 checkpoint holds the frozen network
    l2w.train(*l2w.parse_config(["--resume", str(tmp_path / "split" / "checkpoint.pt")]))
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
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
