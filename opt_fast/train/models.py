"""Plain networks for opt_fast.train. No biases; BN(eps, momentum) after each conv; the final classifier
is named ``score`` (an ordinary layer: excluded from OPT conversion, docs/training.md)."""
import math

import torch
from torch import nn

from .guards import fail

MODELS = ("cnn6", "cnn6-cp", "resnet18", "small")


def _bn(c, eps, momentum):
    return nn.BatchNorm2d(c, eps=eps, momentum=momentum)


def _he_(w):
    fan_in = w[0].numel()
    with torch.no_grad():
        w.normal_(0.0, math.sqrt(2.0 / fan_in))


class VGGish(nn.Module):
    """The released CNN-6 (docs/training.md): stages of two 3x3 conv-BN-ReLU then 2x2 max-pool; fc6 = VALID
    conv over the remaining map (no BN, no ReLU); score = 1x1 conv, He init, no bias."""

    def __init__(self, widths, fc, num_classes, in_ch, size, eps, momentum):
        super().__init__()
        layers, c = [], in_ch
        for w in widths:
            for _ in range(2):
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), _bn(w, eps, momentum), nn.ReLU(inplace=True)]
                c = w
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            size = (size + 1) // 2
        self.features = nn.Sequential(*layers)
        self.fc6 = nn.Conv2d(c, fc, size, bias=False)
        self.score = nn.Conv2d(fc, num_classes, 1, bias=False)
        _he_(self.score.weight)

    def forward(self, x):
        return self.score(self.fc6(self.features(x))).flatten(1)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, eps, momentum):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = _bn(cout, eps, momentum)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = _bn(cout, eps, momentum)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout, eps, momentum))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18 (3x3 stem, no max-pool, stages 64/128/256/512 of two BasicBlocks)."""

    def __init__(self, num_classes, in_ch, eps, momentum):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, 64, 3, 1, 1, bias=False)
        self.bn1 = _bn(64, eps, momentum)
        blocks, c = [], 64
        for w, s in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(c, w, s, eps, momentum), BasicBlock(w, w, 1, eps, momentum)]
            c = w
        self.layers = nn.Sequential(*blocks)
        self.score = nn.Linear(512, num_classes, bias=False)
        _he_(self.score.weight)

    def forward(self, x):
        x = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.score(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build(name, num_classes, shape, bn_eps=1e-3, bn_momentum=1e-3) -> nn.Module:
    c, h, w = shape
    if name in ("cnn6", "cnn6-cp") and (h, w) != (32, 32):
        fail(f"--model {name} needs 32x32 inputs, the dataset has {h}x{w}; "
             f"use --model small for 8x8 digits")
    if name == "cnn6":
        return VGGish((64, 64, 64), 64, num_classes, c, h, bn_eps, bn_momentum)
    if name == "cnn6-cp":
        return VGGish((32, 64, 128), 128, num_classes, c, h, bn_eps, bn_momentum)
    if name == "small":
        return VGGish((32, 64), 64, num_classes, c, h, bn_eps, bn_momentum)
    if name == "resnet18":
        return ResNet18(num_classes, c, bn_eps, bn_momentum)
    fail(f"unknown --model {name!r}; choose one of {', '.join(MODELS)}")
