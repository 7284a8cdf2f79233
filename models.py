"""Compact multi-exit networks and the cost counter used to report them.

MSDNet: Huang et al., "Multi-Scale Dense Networks for Resource Efficient Image
Classification", ICLR 2018 (Sec. 4 and Fig. 2).

Every network here returns one logit tensor per exit, cheapest exit first, and
also offers `exits_iter(x)` so that early-exit inference can stop computing.
`count_cost` counts Mul-Adds and parameters with MSDNet's convention (PAPER.md).
"""
import math

import torch
import torch.nn as nn


def conv_bn_relu(c_in, c_out, kernel=3, stride=1):
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def bottleneck_conv(c_in, c_out, stride, width):
    """1x1 bottleneck to min(c_in, width * c_out) channels, then a 3x3 conv (MSDNet's ConvBN)."""
    inner = min(c_in, width * c_out)
    return nn.Sequential(conv_bn_relu(c_in, inner, 1), conv_bn_relu(inner, c_out, 3, stride))


def classifier(c_in, width, num_classes):
    """Exit head: two stride-2 3x3 conv-BN-ReLU, 2x2 average pool, linear."""
    return nn.Sequential(
        conv_bn_relu(c_in, width, 3, 2),
        conv_bn_relu(width, width, 3, 2),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )


def init_msdnet(module):
    """MSDNet's initialisation: conv N(0, sqrt(2 / (k*k*out))), BN 1/0, linear bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2.0 / n))
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear):
            m.bias.data.zero_()


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

    def forward(self, features):
        out = []
        for j, unit in enumerate(self.units):
            i = j + self.drop
            out.append(unit(features[i - 1] if unit.down is not None else None, features[i]))
        return out


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
    """MSDNet with 'max' scale pruning, bottlenecks and transitions (compression 0.5).

    Block k holds steps[k] layers and ends in exit k; the coarsest scale feeds the exit.
    """

    def __init__(self, num_classes, exits, imagenet=False, step=None):
        super().__init__()
        if imagenet:  # ImageNet: 4 scales, 'even' steps of `step` layers after a base of 4
            channels, growth, factors, widths, base = 32, 16, (1, 2, 4, 4), (1, 2, 4, 4), 4
            steps = [base] + [step or 4] * (exits - 1)
        else:         # CIFAR: 3 scales, linear growth with base 1 and step 1 (block k has k layers)
            channels, growth, factors, widths = 16, 6, (1, 2, 4), (1, 2, 4)
            steps = [1 + k for k in range(exits)]
        n_scales, total = len(factors), sum(steps)
        interval = math.ceil(total / n_scales)
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

    def exits_iter(self, x):
        """Yield the logits of each exit in turn, computing only what that exit needs."""
        features = self.stem(x)
        for block, head in zip(self.blocks, self.exits):
            features = block(features)
            yield head(features[-1])

    def forward(self, x):
        return list(self.exits_iter(x))


# ----------------------------------------------------------------------------
# Builder and cost counter
# ----------------------------------------------------------------------------

def build_model(arch, num_classes, exits, image_size=32, step=None):
    """`image_size` 224 selects the ImageNet variant; 32 the CIFAR one."""
    if exits < 1:
        raise ValueError(f"{arch} needs at least 1 exit, got {exits}")
    if arch == "msdnet":
        return MSDNet(num_classes, exits, imagenet=image_size >= 64, step=step)
    raise ValueError(f"unknown arch '{arch}' (choose msdnet)")


def count_cost(model, image_size):
    """Cumulative Mul-Adds and parameters per exit, with MSDNet's op-counter convention.

    Conv: C_in*C_out*k*k*H_out*W_out/groups; ReLU: one per element; pooling: k*k per output
    element; linear: in*out + out; BN, concat and interpolation are free. Each exit's figure
    counts every layer executed up to and including its classifier (earlier exits included),
    so the forward pass must run exits in order; an exit ends at its final nn.Linear.
    """
    flops, params, per_exit = [0], [0], []
    seen = set()

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            h_out, w_out = output.shape[-2:]
            flops[0] += module.in_channels * module.out_channels * k * h_out * w_out // module.groups
        elif isinstance(module, nn.ReLU):
            flops[0] += output[0].numel()
        elif isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)):
            k = module.kernel_size if isinstance(module.kernel_size, int) else module.kernel_size[0]
            flops[0] += output[0].numel() * k * k
        elif isinstance(module, nn.Linear):
            flops[0] += module.in_features * module.out_features + module.out_features
        if module not in seen:
            seen.add(module)
            params[0] += sum(p.numel() for p in module.parameters(recurse=False))
        if isinstance(module, nn.Linear):
            per_exit.append((flops[0], params[0]))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [f for f, _ in per_exit], [p for _, p in per_exit]
