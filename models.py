"""Compact multi-exit networks and the cost counter used to report them.

MSDNet: Huang et al., "Multi-Scale Dense Networks for Resource Efficient Image Classification", ICLR 2018
(Sec. 4, Fig. 2). RANet: Yang et al., "Resolution Adaptive Networks for Efficient Inference", CVPR 2020
(Sec. 3, Fig. 2), as released (yangle15/RANet-pytorch) where the paper leaves details open.
IMTA: Li et al., "Improved Techniques for Training Adaptive Deep Networks", ICCV 2019: Gradient Equilibrium
(MSDNet(gradient_equilibrium=True)) for phase 1, Inline Subnetwork Collaboration (IMTANet) and One-for-all
distillation (`distillation_losses`) for phase 2.

Every network returns one logit tensor per exit, cheapest first, and offers `exits_iter(x)`: a generator of
the exits' logits to which early-exit inference may send the indices of the samples that go on, so that
later exits compute only for them. `count_cost` counts Mul-Adds and parameters with MSDNet's convention.
"""
import functools
import itertools
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn_relu(c_in, c_out, kernel=3, stride=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def bottleneck_conv(c_in, c_out, stride, width):
    """1x1 bottleneck to min(c_in, width * c_out) channels, then a 3x3 conv (MSDNet's ConvBN)."""
    inner = min(c_in, width * c_out)
    return nn.Sequential(conv_bn_relu(c_in, inner, 1), conv_bn_relu(inner, c_out, 3, stride))


def classifier(c_in, width, num_classes):
    """Exit head: two stride-2 3x3 conv-BN-ReLU, 2x2 average pool, linear."""
    return nn.Sequential(conv_bn_relu(c_in, width, 3, 2), conv_bn_relu(width, width, 3, 2), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(width, num_classes))


def init_msdnet(module):
    """MSDNet's initialisation: conv N(0, sqrt(2 / (k*k*out))), BN 1/0, linear bias 0."""
    if next(module.parameters()).is_meta:   # built for its shapes only (l2w's start-up checks)
        return
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2.0 / n))
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear):
            m.bias.data.zero_()


def take(tensors, keep):
    """The samples `keep` of every tensor in a nested list (indexing, unlike index_select, keeps channels_last)."""
    return tensors[keep] if isinstance(tensors, torch.Tensor) else [take(t, keep) for t in tensors]


def scale_gradient(x, scale):
    """Identity forward, gradient times `scale` backward; made of differentiable operations (no custom
    backward) because L2W-DEN's virtual step differentiates the gradient that passes through it."""
    return x.detach() + scale * (x - x.detach())


# ----------------------------------------------------------------------------
# MSDNet
# ----------------------------------------------------------------------------

class MSDNetStem(nn.Module):
    """First layer: features at every scale, each computed from the next finer one (Fig. 2, l=1)."""

    def __init__(self, channels, imagenet):
        super().__init__()
        if imagenet:
            first = nn.Sequential(nn.Conv2d(3, channels[0], 7, 2, 3), nn.BatchNorm2d(channels[0]),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        else:
            first = conv_bn_relu(3, channels[0], 3, 1)
        self.scales = nn.ModuleList([first] + [conv_bn_relu(channels[s - 1], channels[s], 3, 2)
                                               for s in range(1, len(channels))])

    def forward(self, x):
        features = []
        for conv in self.scales:
            x = conv(x)
            features.append(x)
        return features


class MSDScale(nn.Module):
    """New features at one scale: a strided conv of the finer scale (if there is one) and a
    regular conv of this scale, each giving half the growth, concatenated to the input."""

    def __init__(self, c_finer, c_here, growth, width_finer, width_here):
        super().__init__()
        self.down = None if c_finer is None else bottleneck_conv(c_finer, growth // 2, 2, width_finer)
        self.normal = bottleneck_conv(c_here, growth if c_finer is None else growth // 2, 1, width_here)

    def forward(self, finer, here):
        new = [self.normal(here)] if self.down is None else [self.down(finer), self.normal(here)]
        return torch.cat([here] + new, dim=1)


class MSDLayer(nn.Module):
    """One MSDNet layer over the scales it keeps; with 'max' pruning it may drop the finest one."""

    def __init__(self, base_in, growth, growth_factors, bottleneck_factors, in_scales, out_scales):
        super().__init__()
        n = len(growth_factors)
        self.drop = in_scales - out_scales
        self.units = nn.ModuleList()
        for s in range(n - out_scales, n):
            has_finer = s > n - out_scales or self.drop > 0
            self.units.append(MSDScale(
                base_in * growth_factors[s - 1] if has_finer else None, base_in * growth_factors[s],
                growth * growth_factors[s], bottleneck_factors[s - 1] if has_finer else None,
                bottleneck_factors[s]))

    def forward(self, features):   # unit j works on scale j + drop of the input
        return [unit(features[j + self.drop - 1] if unit.down is not None else None, features[j + self.drop])
                for j, unit in enumerate(self.units)]


class MSDTransition(nn.Module):
    """1x1 conv-BN-ReLU per kept scale that compresses the channels (after a scale is dropped)."""

    def __init__(self, base_in, base_out, growth_factors, out_scales):
        super().__init__()
        n = len(growth_factors)
        self.convs = nn.ModuleList([conv_bn_relu(base_in * growth_factors[s], base_out * growth_factors[s], 1)
                                    for s in range(n - out_scales, n)])

    def forward(self, features):
        return [conv(x) for conv, x in zip(self.convs, features)]


class MSDNet(nn.Module):
    """MSDNet with 'max' scale pruning, bottlenecks and transitions (compression 0.5). Block k holds steps[k] layers
    and ends in exit k, which reads the coarsest scale. `gradient_equilibrium`: IMTA's GE in the backward pass."""

    def __init__(self, num_classes, exits, imagenet=False, step=None, base=None, gradient_equilibrium=False):
        super().__init__()
        self.gradient_equilibrium = gradient_equilibrium
        if imagenet:  # ImageNet: 4 scales, a first block of `base` layers, then 'even' steps of `step`
            channels, growth, factors, widths = 32, 16, (1, 2, 4, 4), (1, 2, 4, 4)
            steps = [base or 4] + [step or 4] * (exits - 1)
        else:         # CIFAR: 3 scales, linear growth with base 1 and step 1 (block k has k layers)
            channels, growth, factors, widths = 16, 6, (1, 2, 4), (1, 2, 4)
            steps = [1 + k for k in range(exits)]
        n_scales, interval = len(factors), math.ceil(sum(steps) / len(factors))
        self.stem = MSDNetStem([channels * f for f in factors], imagenet)
        self.blocks, self.exits = nn.ModuleList(), nn.ModuleList()
        layer = 0
        for n_layers in steps:
            block = []
            for _ in range(n_layers):
                layer += 1
                in_scales = n_scales - (max(0, layer - 2) // interval)
                out_scales = n_scales - ((layer - 1) // interval)
                block.append(MSDLayer(channels, growth, factors, widths, in_scales, out_scales))
                channels += growth
                if in_scales > out_scales:
                    block.append(MSDTransition(channels, channels // 2, factors, out_scales))
                    channels //= 2
            self.blocks.append(nn.Sequential(*block))
            c_last = channels * factors[-1]
            self.exits.append(classifier(c_last, c_last if imagenet else 128, num_classes))
        init_msdnet(self)

    def exit_inputs(self, x):
        """Yield, block by block, the coarsest-scale tensor that exit k's classifier reads. Gradient Equilibrium
        (IMTA, Sec. 3.1): the gradient back from block k + 1 is multiplied by K - k - 1, added to exit k's, and
        the sum divided by K - k, so that block k gets the mean, not the sum, of its K - k exits' gradients."""
        features, n_exits = self.stem(x), len(self.blocks)
        for k, block in enumerate(self.blocks):
            features = block(features)
            if self.gradient_equilibrium:
                features[-1] = scale_gradient(features[-1], 1 / (n_exits - k))
            keep = yield features[-1]   # early exiting sends back the samples that go on
            if self.gradient_equilibrium and k + 1 < n_exits:
                features[-1] = scale_gradient(features[-1], n_exits - k - 1)
            if keep is not None:
                features = take(features, keep)

    def exits_iter(self, x):
        """Yield the logits of each exit in turn, computing only what that exit needs. Indices sent back
        (`stream.send(keep)`) cut every scale to those samples (real early exiting)."""
        inputs = self.exit_inputs(x)
        features = next(inputs)
        for k, head in enumerate(self.exits):
            keep = yield head(features)
            if k + 1 < len(self.exits):
                features = inputs.send(keep)

    def forward(self, x):
        return list(self.exits_iter(x))


# ----------------------------------------------------------------------------
# IMTA's second phase: new heads with ISC on a frozen MSDNet, one-for-all distillation
# ----------------------------------------------------------------------------

def isc(num_classes, width):
    """Inline Subnetwork Collaboration (IMTA, Sec. 3.2): the previous exit's logits become
    `width` features that the next exit's head reads next to its own."""
    return nn.Sequential(nn.Linear(num_classes, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True))


class IMTANet(nn.Module):
    """A frozen MSDNet with new heads on f_k, the pooled features of its exit k's classifier (all but the
    Linear): exit 1 reads f_1, exit k > 1 cat(f_k, ISC(z_{k-1})); its own last exit is the distillation teacher.
    The frozen network stays in eval mode, so f_k is the same function in training and at test and its
    BatchNorm statistics stay those of phase 1 (IMTA's release trains in train mode: they drift)."""

    def __init__(self, backbone, num_classes):
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        widths = [head[-1].in_features for head in backbone.exits]   # C_k
        self.heads = nn.ModuleList([nn.Linear(widths[0], num_classes)] +
                                   [nn.Linear(2 * c, num_classes) for c in widths[1:]])
        self.isc = nn.ModuleList([isc(num_classes, c) for c in widths[1:]])

    def train(self, mode=True):
        super().train(mode)
        self.backbone.eval()
        return self

    def features_and_exits(self, x):
        """Yield (f_k, new head's logits z_k) exit by exit. Indices sent back cut the frozen
        network's scales and the logits the next ISC reads (real early exiting)."""
        inputs, z = self.backbone.exit_inputs(x), None
        features = next(inputs)
        for k, old_head in enumerate(self.backbone.exits):
            f = old_head[:-1](features)
            z = self.heads[k](f if k == 0 else torch.cat([f, self.isc[k - 1](z)], dim=1))
            keep = yield f, z
            if k + 1 < len(self.heads):
                features = inputs.send(keep)
                z = z if keep is None else z.index_select(0, keep)

    def exits_iter(self, x):
        """The new heads' logits exit by exit, as MSDNet.exits_iter (indices sent back go on)."""
        stream = self.features_and_exits(x)
        _, z = next(stream)
        for _ in range(len(self.heads) - 1):
            _, z = stream.send((yield z))
        yield z

    def forward(self, x, with_teacher=False):
        """The new heads' logits per exit; `with_teacher` adds the frozen last exit's, detached (the KD target)."""
        features, logits = map(list, zip(*self.features_and_exits(x)))
        return (logits, self.backbone.exits[-1][-1](features[-1]).detach()) if with_teacher else logits


def distillation_losses(logits, teacher, targets, temperature, gamma, reduction="mean"):
    """IMTA's one-for-all distillation (Sec. 3.3) per sample and exit, (n, K): the last exit learns from the labels,
    exit k (1 - gamma) CE + gamma T^2 KL(teacher || z_k) at temperature T; 'mean' divides the KL by the classes,
    as IMTA's nn.KLDivLoss() does."""
    soft_teacher = F.log_softmax(teacher.detach() / temperature, dim=1)
    columns = []
    for z in logits[:-1]:
        kl = F.kl_div(F.log_softmax(z / temperature, dim=1), soft_teacher, reduction="none", log_target=True).sum(1)
        if reduction == "mean":
            kl = kl / z.shape[1]
        columns.append((1 - gamma) * F.cross_entropy(z, targets, reduction="none") + gamma * temperature ** 2 * kl)
    columns.append(F.cross_entropy(logits[-1], targets, reduction="none"))
    return torch.stack(columns, dim=1)


def imta_exit_losses(model, images, targets, temperature, gamma, reduction="mean"):
    """l2w.train_step's loss_fn in IMTA's second phase: the new heads against the frozen last exit."""
    logits, teacher = model(images, with_teacher=True)
    return distillation_losses(logits, teacher, targets, temperature, gamma, reduction)


# ----------------------------------------------------------------------------
# RANet
# ----------------------------------------------------------------------------

def resize(x, size):
    """Bilinear resize (align_corners=True, as released), free under the counting convention; as products
    rows @ x @ columns^T, whose backward, unlike F.interpolate's, is deterministic on GPUs (--deterministic)."""
    if x.shape[-2:] == size:
        return x
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    rows, columns = (interpolation_weights(n_out, n_in, x.dtype, x.device) for n_out, n_in in zip(size, x.shape[-2:]))
    out = rows @ x @ columns.T
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


@functools.lru_cache(maxsize=None)
def interpolation_weights(n_out, n_in, dtype, device):
    """(n_out, n_in) linear-interpolation weights. Cached: building them costs more than using them at small
    batches (real early exit); built outside inference mode, so that they serve training too."""
    with torch.inference_mode(False):
        source = torch.arange(n_out, dtype=dtype, device=device) * ((n_in - 1) / max(n_out - 1, 1))
        return (1 - (source[:, None] - torch.arange(n_in, dtype=dtype, device=device)).abs()).clamp(min=0)


class RANetStem(nn.Module):
    """Initial layer (Sec. 3): all base features up front, a chain of 3x3 conv-BN-ReLU strided where the resolution
    halves; run highest resolution first, returned lowest first, the order the sub-networks run in."""

    def __init__(self, channels, sizes):
        super().__init__()
        c_in, size_in, layers = 3, sizes[0], []
        for c_out, size in zip(channels, sizes):
            layers.append(conv_bn_relu(c_in, c_out, 3, size_in // size))
            c_in, size_in = c_out, size
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        features = []
        for conv in self.layers:
            x = conv(x)
            features.append(x)
        return features[::-1]


class RANetLayer(nn.Module):
    """Dense layer: `growth` new channels from a bottleneck conv pair, concatenated to the input. In a fusion
    block (Sec. 3, Fig. 2) a quarter of them come from the coarser sub-network's state, convolved at its low
    resolution and upsampled. With stride 2 the dense input is halved bilinearly, not pooled."""

    def __init__(self, c_in, growth, width, c_low=None, width_low=None, stride=1):
        super().__init__()
        growth_up = 0 if c_low is None else growth // 4
        self.up = None if c_low is None else bottleneck_conv(c_low, growth_up, 1, width_low)
        self.normal = bottleneck_conv(c_in, growth - growth_up, stride, width)

    def forward(self, x, low=None):
        new = self.normal(x)
        if self.up is None:
            return torch.cat([x, new], dim=1)
        size = new.shape[-2:]
        return torch.cat([resize(x, size), resize(self.up(low), size), new], dim=1)


class RANetBlock(nn.Module):
    """`n_layers` dense layers. Given `low_channels` (the state widths of the coarser sub-network's same block)
    it is a fusion block: layer i reads that block's state i, and its last state, squeezed to a quarter of the
    channels, is appended at the end. `down` halves the resolution in the last layer; `transition` halves the
    channels with a 1x1 conv. Returns the output and [input, after layer 1, ...], read by the finer sub-network."""

    def __init__(self, c_in, n_layers, growth, width, transition, low_channels=None, width_low=None, down=False):
        super().__init__()
        self.fusion = low_channels is not None
        self.state_channels = [c_in + i * growth for i in range(n_layers + 1)]
        self.layers = nn.ModuleList([
            RANetLayer(c, growth, width, low_channels[i] if self.fusion else None, width_low,
                       2 if down and i == n_layers - 1 else 1)
            for i, c in enumerate(self.state_channels[:-1])])
        c = self.state_channels[-1]
        self.squeeze = conv_bn_relu(low_channels[-1], c // 4, 1) if self.fusion else None
        c += c // 4 if self.fusion else 0
        self.transition = conv_bn_relu(c, c // 2, 1) if transition else None
        self.c_out = c // 2 if transition else c

    def forward(self, x, low_states=None):
        states = [x]
        for i, layer in enumerate(self.layers):
            x = layer(x, low_states[i] if self.fusion else None)
            states.append(x)
        if self.fusion:
            x = torch.cat([x, resize(self.squeeze(low_states[-1]), x.shape[-2:])], dim=1)
        if self.transition is not None:
            x = self.transition(x)
        return x, states


# The released CIFAR models (Sec. 4), per sub-network, lowest resolution first: the factor scales
# the base channels (16), the growth rate (6) and the bottleneck width; size is the base feature's.
RANET_CONFIGS = {
    6: dict(factors=(4, 2, 1), sizes=(8, 16, 32)),          # Model-C-1
    8: dict(factors=(4, 2, 2, 1), sizes=(8, 16, 16, 32)),   # Model-C-2
}


class RANet(nn.Module):
    """RANet with linear-growth blocks (transition compression 0.5, fusion share 0.25). Sub-network s (s = 0 the
    lowest resolution) has 2 + 2s blocks, block b (from 1) 2b layers. Its first 2s blocks fuse block b of
    sub-network s-1 (whose 2s blocks it thereby covers); its last two are plain blocks at 8x8, each with an exit."""

    def __init__(self, num_classes, factors, sizes, channels=16, growth=6):
        super().__init__()
        self.stem = RANetStem([channels * f for f in factors][::-1], sizes[::-1])
        self.subnets, self.exits = nn.ModuleList(), nn.ModuleList()
        for s, (factor, size) in enumerate(zip(factors, sizes)):
            n_blocks, halvings = 2 + 2 * s, int(math.log2(size // sizes[0]))
            # As released: transitions after blocks floor(j N / (halvings + 1)); the resolution
            # halves in the fusion blocks where the `halvings` nearest coarser sub-networks end
            # (blocks 2s, 2s - 2, ...); the two need not coincide (C-2, s = 2: after 3, in 4).
            transitions = {j * n_blocks // (halvings + 1) for j in range(1, halvings + 1)}
            downs = {2 * k for k in range(s + 1 - halvings, s + 1)}
            c, blocks = channels * factor, nn.ModuleList()
            for b in range(1, n_blocks + 1):
                low = self.subnets[s - 1][b - 1].state_channels if b <= 2 * s else None
                blocks.append(RANetBlock(c, 2 * b, growth * factor, factor, b in transitions,
                                         low, factors[s - 1], b in downs))
                c = blocks[-1].c_out
                if low is None:
                    self.exits.append(classifier(c, 128, num_classes))
            self.subnets.append(blocks)
        init_msdnet(self.subnets)  # the stem keeps PyTorch's default initialisation, as released
        init_msdnet(self.exits)

    def exits_iter(self, x):
        """Yield the logits of each exit in turn; no exit runs a finer sub-network than its own (the stem
        computes every base feature first, as released). Indices sent back cut the current state, this
        sub-network's states (the next one's fusion blocks read them) and the finer base features."""
        exits, low_states, base = iter(self.exits), None, self.stem(x)
        for s, blocks in enumerate(self.subnets):
            x, states = base[s], []
            for b, block in enumerate(blocks):
                x, block_states = block(x, low_states[b] if block.fusion else None)
                states.append(block_states)
                if not block.fusion:
                    keep = yield next(exits)(x)
                    if keep is not None:
                        x, states, base[s + 1:] = take([x, states, base[s + 1:]], keep)
            low_states = states

    def forward(self, x):
        return list(self.exits_iter(x))


# ----------------------------------------------------------------------------
# The authors' released weights (MSDNet-PyTorch's naming; L2W-DEN's WPN)
# ----------------------------------------------------------------------------

# MSDNet-PyTorch's module tree (also used by L2W-DEN) names the same layers as our MSDNet:
#   blocks.0.0.layers.s.*                first layer, scale s (ImageNet's scale 0 has no `.net`)
#   blocks.b.i.layers.j.conv_down.net.n  strided conv from the finer scale (conv_normal: same scale)
#   blocks.b.i.m.j.net.n                 transition, scale j
#   classifier.k.m.c.net.n / .linear     exit k
# Their ConvBN is one Sequential of six (1x1 conv, BN, ReLU, 3x3 conv, BN, ReLU), ours two of three;
# their block 0 holds the first layer (our stem) as module 0, so its later modules move down by one.
RELEASED_NAMES = [
    (r"blocks\.0\.0\.layers\.(\d+)\.(?:net\.)?(\d+)\.(\w+)", lambda s, n, p: f"stem.scales.{s}.{n}.{p}"),
    (r"blocks\.(\d+)\.(\d+)\.layers\.(\d+)\.conv_(down|normal)\.net\.(\d+)\.(\w+)",
     lambda b, i, j, kind, n, p: f"blocks.{b}.{int(i) - (b == '0')}.units.{j}.{kind}.{int(n) // 3}.{int(n) % 3}.{p}"),
    (r"blocks\.(\d+)\.(\d+)\.m\.(\d+)\.net\.(\d+)\.(\w+)",
     lambda b, i, j, n, p: f"blocks.{b}.{int(i) - (b == '0')}.convs.{j}.{n}.{p}"),
    (r"classifier\.(\d+)\.m\.(\d+)\.net\.(\d+)\.(\w+)", lambda k, c, n, p: f"exits.{k}.{c}.{n}.{p}"),
    (r"classifier\.(\d+)\.linear\.(\w+)", lambda k, p: f"exits.{k}.4.{p}"),
]


def released_name(key):
    """Our name for a key of MSDNet-PyTorch's state_dict; the key itself if it names no MSDNet layer."""
    for pattern, ours in RELEASED_NAMES:
        match = re.fullmatch(pattern, key)
        if match:
            return ours(*match.groups())
    return key


def msdnet_outline(state):
    """Image size, exits, layers in blocks 1 and 2, and classes of an MSDNet state_dict in our naming: what
    `load_released` names when a file does not fit (ImageNet's 7x7 first conv has a bias, CIFAR's 3x3 none)."""
    layers = lambda b: len({k.split(".")[2] for k in state if k.startswith(f"blocks.{b}.") and ".units." in k})
    exits = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("exits.")), default=-1)
    return ("ImageNet" if "stem.scales.0.0.bias" in state else "CIFAR", exits, layers(0) or None, layers(1) or None,
            state["exits.0.4.weight"].shape[0] if "exits.0.4.weight" in state else None)


def load_released(model, path, wpn=None):
    """Load an MSDNet-PyTorch or L2W-DEN checkpoint (`state_dict`, with DataParallel's `module.` or without)
    into our MSDNet, in place, and L2W-DEN's WPN (`meta_state_dict`) into `wpn` if given. Returns the file's
    epoch, arch and best_prec1, and whether a WPN was loaded; a file that does not fit is a one-line ValueError."""
    if not isinstance(model, MSDNet):
        raise ValueError(f"released checkpoints are MSDNets; this model is a {type(model).__name__}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"'{path}' has no 'state_dict': not a checkpoint of MSDNet-PyTorch or L2W-DEN")
    state = {released_name(k.removeprefix("module.")): v for k, v in checkpoint["state_dict"].items()}
    ours = model.state_dict()
    names = ("image size", "exits", "base (layers in block 1)", "step (layers in block 2)", "classes")
    diffs = [f"{n} {t} in the file, {m} here"
             for n, t, m in zip(names, msdnet_outline(state), msdnet_outline(ours)) if t != m]
    if diffs:
        raise ValueError(f"'{path}' does not fit this MSDNet: {'; '.join(diffs)}")
    for k, v in ours.items():   # PyTorch before 0.4.1 saved no BatchNorm counters; evaluation never reads them
        if k.endswith(".num_batches_tracked"):
            state.setdefault(k, torch.zeros_like(v))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:   # the same outline, yet other layers: the first line of PyTorch's list names them
        raise ValueError(f"'{path}' does not fit this MSDNet: {str(e).splitlines()[1].strip()}") from None
    loaded_wpn = wpn is not None and "meta_state_dict" in checkpoint
    if loaded_wpn:
        load_released_wpn(wpn, checkpoint["meta_state_dict"], path)
    return {**{k: checkpoint[k] for k in ("epoch", "arch", "best_prec1") if k in checkpoint}, "wpn": loaded_wpn}


def load_released_wpn(wpn, meta_state, path):
    """L2W-DEN's MLP_tanh (K -> width, ReLU, ... -> K, tanh) into `wpn`: its Linear layers in order."""
    meta_state = {k.removeprefix("module."): v for k, v in meta_state.items()}
    hidden = sorted({int(k.split(".")[1]) for k in meta_state if k.startswith("rest_hidden_layers.")})
    names = ["first_hidden_layer.fc"] + [f"rest_hidden_layers.{i}.fc" for i in hidden] + ["output_layer"]
    if any(f"{n}.{p}" not in meta_state for n in names for p in ("weight", "bias")):
        raise ValueError(f"'{path}': its meta_state_dict is not L2W-DEN's WPN (MLP_tanh)")
    theirs = [meta_state[f"{n}.weight"] for n in names]
    linears = [m for m in wpn.modules() if isinstance(m, nn.Linear)]
    shown = lambda weights: f"depth {len(weights) - 1}, width {weights[0].shape[0]}, exits {weights[0].shape[1]}"
    if [w.shape for w in theirs] != [m.weight.shape for m in linears]:
        raise ValueError(f"'{path}': its WPN ({shown(theirs)}) does not fit this one "
                         f"({shown([m.weight for m in linears])})")
    with torch.no_grad():
        for m, n in zip(linears, names):
            m.weight.copy_(meta_state[f"{n}.weight"])
            m.bias.copy_(meta_state[f"{n}.bias"])


# ----------------------------------------------------------------------------
# Builder and cost counter
# ----------------------------------------------------------------------------

def build_model(arch, num_classes, exits, image_size=32, step=None, base=None, gradient_equilibrium=False):
    """`image_size` 224 selects the ImageNet variant, 32 the CIFAR one. ImageNet MSDNet: `base` layers in the
    first block (default 4), `step` in each later one. `gradient_equilibrium`: IMTA's phase 1 (MSDNet only)."""
    if gradient_equilibrium and arch != "msdnet":
        raise ValueError(f"gradient equilibrium (IMTA) is built for msdnet, not {arch}")
    if arch == "ranet":  # the two released CIFAR models; `step` does not apply
        if exits not in RANET_CONFIGS:
            raise ValueError(f"ranet builds 6 exits (Model-C-1) or 8 exits (Model-C-2), got {exits}")
        if image_size != 32:
            raise ValueError(f"ranet is built for 32x32 CIFAR images, got image_size {image_size}")
        return RANet(num_classes, **RANET_CONFIGS[exits])
    if exits < 1:
        raise ValueError(f"{arch} needs at least 1 exit, got {exits}")
    if arch == "msdnet":
        return MSDNet(num_classes, exits, imagenet=image_size >= 64, step=step, base=base,
                      gradient_equilibrium=gradient_equilibrium)
    raise ValueError(f"unknown arch '{arch}' (choose msdnet or ranet)")


def check_input_size(arch, exits, image_size, step=None, base=None, gradient_equilibrium=False):
    """ValueError, in one line, where `build_model` cannot build the network or it cannot take `image_size`
    images: shapes only, on the meta device, and one MSDNet exit (all read the coarsest scale). 32 and 224, the
    sizes the networks were designed for, skip the run, whose first call costs ~2 s (meta kernels load)."""
    with torch.device("meta"):
        model = build_model(arch, 10, exits if arch == "ranet" else 1, image_size, step, base,
                            gradient_equilibrium).eval()
        if image_size in (32, 224):
            return
        try:
            model(torch.zeros(1, 3, image_size, image_size))
        except RuntimeError:
            raise ValueError(f"{arch} cannot reduce {image_size}x{image_size} images to its exits; use --image-size "
                             "32 (CIFAR-style network) or 224 (ImageNet-style)") from None


def count_cost(model, image_size):
    """Cumulative Mul-Adds and parameters per exit, MSDNet's convention (README, "Models and their cost"): conv
    C_in*C_out*k*k*H_out*W_out/groups, ReLU 1 and pooling k*k per output element, linear in*out + out; BN, concat
    and interpolation free. A module counts towards the first exit whose logits depend on its output (autograd
    graph) or that `exits_iter` hands out after it ran: real early exit pays for MSDNet's whole block."""
    in_stream = hasattr(model, "exits_iter")
    streamed, calls, seen = [], [], set()   # calls: (autograd node of the output, exits streamed before, cost)

    def hook(module, inputs, output):
        flops = 0
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            h_out, w_out = output.shape[-2:]
            flops = module.in_channels * module.out_channels * k * h_out * w_out // module.groups
        elif isinstance(module, nn.ReLU):
            flops = output[0].numel()
        elif isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)):
            k = module.kernel_size if isinstance(module.kernel_size, int) else module.kernel_size[0]
            flops = output[0].numel() * k * k
        elif isinstance(module, nn.Linear):
            flops = module.in_features * module.out_features + module.out_features
        params = 0 if module in seen else sum(p.numel() for p in module.parameters(recurse=False))
        seen.add(module)
        calls.append((getattr(output, "grad_fn", None), len(streamed), flops, params))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    was_training = model.training
    model.eval()
    try:
        # requires_grad: every module's output gets an autograd node, which tells the exits that depend on it
        image = torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device, requires_grad=True)
        with torch.enable_grad():
            if in_stream:   # one exit at a time: the hook reads how many were handed out before each module ran
                for z in model.exits_iter(image):
                    streamed.append(z)
            logits = streamed if in_stream else model(image)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if isinstance(logits, (list, tuple)) and all(torch.is_tensor(z) for z in logits):
        exits = [z.grad_fn for z in logits]
    elif torch.is_tensor(logits) and type(logits.grad_fn).__name__ == "StackBackward0":
        exits = [node for node, _ in logits.grad_fn.next_functions]   # the stacked tensors, in order
    else:
        got = f"a tensor of shape {tuple(logits.shape)} not made by torch.stack" if torch.is_tensor(logits) else \
            type(logits).__name__
        raise ValueError(f"count_cost needs per-exit logits: a forward that returns a list or tuple of them (or "
                         f"torch.stack of them), got {got}")
    first_exit = {}   # autograd node -> the first exit whose logits depend on it
    for k, node in enumerate(exits):
        stack = [node]
        while stack:   # a node that an earlier exit reached was walked then, with every node under it
            node = stack.pop()
            if node is not None and node not in first_exit:
                first_exit[node] = k
                stack.extend(n for n, _ in node.next_functions)
    last = len(exits) - 1
    flops, params = [0] * len(exits), [0] * len(exits)
    for node, before, f, p in calls:
        k = min(first_exit.get(node, last), before if in_stream else last)
        flops[k], params[k] = flops[k] + f, params[k] + p
    return list(itertools.accumulate(flops)), list(itertools.accumulate(params))


# The configurations of the papers' experiments: (arch, dataset, classes, exits, image size, step,
# base), and MSDNet-PyTorch's released ImageNet step-7 model, whose first block has 7 layers
PAPER_MODELS = [
    ("msdnet", "CIFAR-10", 10, 5, 32, None, None), ("msdnet", "CIFAR-10", 10, 7, 32, None, None),
    ("msdnet", "CIFAR-100", 100, 5, 32, None, None), ("msdnet", "CIFAR-100", 100, 7, 32, None, None),
    ("ranet", "CIFAR-10", 10, 6, 32, None, None), ("ranet", "CIFAR-10", 10, 8, 32, None, None),
    ("ranet", "CIFAR-100", 100, 6, 32, None, None), ("ranet", "CIFAR-100", 100, 8, 32, None, None),
    ("msdnet", "ImageNet", 1000, 5, 224, 4, None), ("msdnet", "ImageNet", 1000, 5, 224, 6, None),
    ("msdnet", "ImageNet", 1000, 5, 224, 7, None), ("msdnet", "ImageNet", 1000, 5, 224, 7, 7),
]


def cost_table(configurations=PAPER_MODELS):
    """Markdown table of cumulative Mul-Adds and parameters per exit, as counted by count_cost."""
    names = {("ranet", 6): "RANet C-1", ("ranet", 8): "RANet C-2"}
    rows = ["| model | data | cumulative Mul-Adds per exit | cumulative parameters per exit (M) |",
            "|---|---|---|---|"]
    for arch, dataset, classes, exits, size, step, base in configurations:
        flops, params = count_cost(build_model(arch, classes, exits, size, step, base=base), size)
        name = names.get((arch, exits), f"MSDNet, {exits} exits" + (f", s={step}" if step else "")
                         + (f", base {base}" if base else ""))
        unit, scale = ("G", 1e9) if size > 32 else ("M", 1e6)
        rows.append(f"| {name} | {dataset} | {' / '.join(f'{f / scale:.2f}' for f in flops)} {unit} | "
                    f"{' / '.join(f'{p / 1e6:.2f}' for p in params)} |")
    return "\n".join(rows)


if __name__ == "__main__":  # prints the cost table of README.md
    print(cost_table())

