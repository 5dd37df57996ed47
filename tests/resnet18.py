"""Basic-block ResNets (He et al. 2016) written out for tests and benchmarks.

:class:`ResNet18` is torchvision's ``resnet18`` layout (7×7 stride-2 stem, max pool, four
stages of two basic blocks, global average pool); :func:`cifar_resnet` gives the CIFAR
variants (3×3 stem, no max pool): ``cifar_resnet((16, 32, 64), 1)`` is the 8-layer ResNet,
``cifar_resnet((64, 128, 256, 512), 2)`` the CIFAR ResNet-18.
"""

from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Stem, stages ``layer1``, ``layer2``, … of basic blocks, global average pool, linear head.

    Parameters
    ----------
    widths : sequence of int
        Channels of each stage; every stage but the first starts with stride 2.
    blocks : int
        Basic blocks per stage.
    classes : int
    stem : {"imagenet", "cifar"}
        ``"imagenet"``: 7×7 stride-2 convolution and 3×3 stride-2 max pool (torchvision);
        ``"cifar"``: one 3×3 stride-1 convolution.
    """

    def __init__(self, widths=(64, 128, 256, 512), blocks=2, classes=1000, stem="imagenet"):
        super().__init__()
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        elif stem == "cifar":
            self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        cin = widths[0]
        self.stages = len(widths)
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            self.add_module(f"layer{i + 1}", nn.Sequential(
                BasicBlock(cin, width, stride), *[BasicBlock(width, width, 1) for _ in range(blocks - 1)]))
            cin = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.avgpool(x).flatten(1))


class ResNet18(ResNet):
    """torchvision's ``resnet18``: ``ResNet18(classes=10)`` for another head."""

    def __init__(self, classes=1000):
        super().__init__(classes=classes)


def cifar_resnet(widths, blocks, classes=10) -> ResNet:
    """A CIFAR ResNet: 3×3 stem of ``widths[0]`` channels, no max pool (see :class:`ResNet`)."""
    return ResNet(widths, blocks, classes, stem="cifar")


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics (variances in [0.5, 2], means N(0, 0.1²)), in place."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
            module.running_mean.normal_(0, 0.1)
    return model


def random_resnet18(seed: int = 0) -> ResNet18:
    """ResNet-18 in eval mode with torch's initial weights and random BatchNorm statistics."""
    import torch

    torch.manual_seed(seed)
    return randomize_batchnorm(ResNet18().eval())
