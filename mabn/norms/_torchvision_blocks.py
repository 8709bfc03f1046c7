"""torchvision's ResNet blocks with one activation module per norm position (imported only when a model holds
torchvision blocks: ``activations.apply_norm_activations``). torchvision reuses one ``self.relu`` for every
position; these forwards call ``act1``/``act2`` after the norms and ``relu`` after the residual add. The
state dict is unchanged (activations hold no state)."""

from __future__ import annotations

from torch import Tensor
from torchvision.models.resnet import BasicBlock, Bottleneck


class NormActBasicBlock(BasicBlock):
    """torchvision's BasicBlock with its own activation after ``bn1`` (ReLU, or Identity after such a norm)."""

    act_positions = ("bn1",)
    tail_norms = ("bn2", "downsample.1")

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class NormActBottleneck(Bottleneck):
    """torchvision's Bottleneck with its own activations after ``bn1`` and ``bn2``."""

    act_positions = ("bn1", "bn2")
    tail_norms = ("bn3", "downsample.1")

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


NORM_ACT = {Bottleneck: NormActBottleneck, BasicBlock: NormActBasicBlock}
