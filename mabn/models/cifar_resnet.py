"""CIFAR-style ResNet (He et al., CVPR 2016, Sec. 4.2): 3x3 stem, three stages of 2k basic blocks, 6k+2 layers."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn


class BasicBlock(nn.Module):
    """conv3x3-norm-act-conv3x3-norm + shortcut (1x1 conv + norm when the shape changes), ReLU after the add.

    ``act1`` is a ReLU, or Identity after a norm that carries its activation (``mabn.norms.activations``)."""

    act_positions = ("bn1",)  # norms followed by act1
    tail_norms = ("bn2", "downsample.1")  # norms with no activation after them

    def __init__(self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.act1 = nn.ReLU(inplace=True)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
    """ResNet-(6k+2) for small images; every norm comes from ``norm``."""

    def __init__(self, norm: Callable[[int], nn.Module], *, depth: int = 20, width: int = 16,
                 num_classes: int = 10, in_channels: int = 3, zero_init_residual: bool = False):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"cifar_resnet depth must be 6k+2 with k >= 1 (8, 14, 20, 32, ...), got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], width
        for stage in range(3):
            cout = width * 2**stage
            for b in range(blocks):
                layers.append(BasicBlock(cin, cout, 2 if stage and b == 0 else 1, norm))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock) and getattr(m.bn2, "weight", None) is not None:
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))
