"""Model definitions of the nine registered networks (METHOD.md section 6)."""

from __future__ import annotations

from torch import nn

from releq_tvm.networks.registry import register_network


def _conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1, padding: int | None = None, groups: int = 1):
    if padding is None:
        padding = k // 2
    return [
        nn.Conv2d(cin, cout, k, stride=stride, padding=padding, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


def _vgg_features(cfg: list, in_channels: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += _conv_bn_relu(c, v)
            c = v
    return nn.Sequential(*layers)


@register_network(
    "lenet",
    input_shape=(1, 28, 28),
    dataset="mnist",
    num_classes=10,
    description="LeNet-5: conv6-conv16-fc120-fc84-fc10 (MNIST, 28x28 padded first conv)",
    published_bits=(8, 2, 2, 3, 2),
    checkpoint="lenet.pt",
)
def lenet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True),
        nn.Linear(120, 84), nn.ReLU(inplace=True),
        nn.Linear(84, 10),
    )


@register_network(
    "lenet4",
    input_shape=(1, 28, 28),
    dataset="mnist",
    num_classes=10,
    description="LeNet of the paper (Caffe variant): conv20-conv50-fc500-fc10 (MNIST)",
    published_bits=(2, 2, 3, 2),
)
def lenet4() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(50 * 4 * 4, 500), nn.ReLU(inplace=True),
        nn.Linear(500, 10),
    )


@register_network(
    "simplenet",
    input_shape=(3, 32, 32),
    dataset="cifar10",
    num_classes=10,
    description="Small CIFAR-10 net: 4 conv (32-64-128-128) + 1 fc",
    published_bits=(5, 5, 5, 5, 5),
)
def simplenet() -> nn.Module:
    return nn.Sequential(
        _vgg_features([32, "M", 64, "M", 128, "M", 128, "M"]),
        nn.Flatten(),
        nn.Linear(128 * 2 * 2, 10),
    )


@register_network(
    "svhn10",
    input_shape=(3, 32, 32),
    dataset="svhn",
    num_classes=10,
    description="SVHN-10: 8 conv (2x32, 2x64, 2x128, 2x256) + fc256 + fc10",
    published_bits=(8, 4, 4, 4, 4, 4, 4, 4, 4, 8),
)
def svhn10() -> nn.Module:
    return nn.Sequential(
        _vgg_features([32, 32, "M", 64, 64, "M", 128, 128, "M", 256, 256, "M"]),
        nn.Flatten(),
        nn.Linear(256 * 2 * 2, 256), nn.ReLU(inplace=True),
        nn.Linear(256, 10),
    )


@register_network(
    "vgg11",
    input_shape=(3, 32, 32),
    dataset="cifar10",
    num_classes=10,
    description="VGG-11 for CIFAR-10: 8 conv + 1 fc",
    published_bits=(8, 5, 8, 5, 6, 6, 6, 6, 8),
)
def vgg11() -> nn.Module:
    return nn.Sequential(
        _vgg_features([64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]),
        nn.Flatten(),
        nn.Linear(512, 10),
    )


@register_network(
    "vgg16",
    input_shape=(3, 32, 32),
    dataset="cifar10",
    num_classes=10,
    description="VGG-16 for CIFAR-10: 13 conv + fc512 + fc512 + fc10",
    published_bits=(8, 8, 8, 6, 8, 6, 8, 6, 8, 6, 8, 6, 8, 6, 8, 8),
)
def vgg16() -> nn.Module:
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    return nn.Sequential(
        _vgg_features(cfg),
        nn.Flatten(),
        nn.Linear(512, 512), nn.ReLU(inplace=True),
        nn.Linear(512, 512), nn.ReLU(inplace=True),
        nn.Linear(512, 10),
    )


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 projection shortcut where the shape changes (option B)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    def __init__(self, blocks_per_stage: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks_per_stage):
                stages.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.layers(x)).flatten(1)
        return self.fc(x)


@register_network(
    "resnet20",
    input_shape=(3, 32, 32),
    dataset="cifar10",
    num_classes=10,
    description="ResNet-20 for CIFAR-10 with 1x1 projection shortcuts (22 weight layers)",
    published_bits=(8, 2, 2, 3, 2, 2, 2, 3, 2, 3, 3, 3, 2, 2, 2, 3, 2, 2, 2, 2, 2, 8),
)
def resnet20() -> nn.Module:
    return ResNetCifar(3)


_MOBILENET_RAW = (8, 5, 6, 6, 4, 4, 7, 8, 4, 6, 8, 5, 5, 8, 6, 7, 7, 7, 6, 8, 6, 8, 8, 6, 7, 5, 5, 7, 8, 8)
# 28 weight layers: conv1, 13 x (depthwise, pointwise), fc. The published list has 30 entries.
# Mapping used everywhere: entries 1-27 go to the 27 conv layers in order, entry 30 to the fc
# layer; entries 28 and 29 (7, 8) have no layer in MobileNet-V1 and are dropped, and every
# report that uses the published MobileNet bits says so.
_MOBILENET_MAPPED = _MOBILENET_RAW[:27] + _MOBILENET_RAW[29:]


@register_network(
    "mobilenet_v1",
    input_shape=(3, 224, 224),
    dataset="imagenet",
    num_classes=1000,
    description="MobileNet-V1 (1.0, 224): conv + 13 depthwise/pointwise pairs + fc (28 weight layers)",
    published_bits=_MOBILENET_MAPPED,
    published_bits_raw=_MOBILENET_RAW,
    published_bits_note=(
        "published list has 30 entries for 28 weight layers: entries 1-27 -> the 27 conv layers, "
        "entry 30 -> fc, entries 28-29 (7,8) dropped"
    ),
)
def mobilenet_v1() -> nn.Module:
    cfg = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
    layers = _conv_bn_relu(3, 32, 3, stride=2)
    cin = 32
    for cout, stride in cfg:
        layers += _conv_bn_relu(cin, cin, 3, stride=stride, groups=cin)
        layers += _conv_bn_relu(cin, cout, 1)
        cin = cout
    return nn.Sequential(
        nn.Sequential(*layers),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(1024, 1000),
    )


@register_network(
    "alexnet",
    input_shape=(3, 224, 224),
    dataset="imagenet",
    num_classes=1000,
    description="AlexNet (torchvision single-tower variant): 5 conv + 3 fc",
    published_bits=(8, 4, 4, 4, 4, 4, 4, 8),
)
def alexnet() -> nn.Module:
    from torchvision.models import alexnet as tv_alexnet

    return tv_alexnet(weights=None, num_classes=1000)


#: Bitwidths of the ADMM-based method that the paper compares against (METHOD.md section 6).
ADMM_BITS: dict[str, tuple[int, ...]] = {
    "alexnet": (8, 5, 5, 5, 5, 3, 3, 8),
    "lenet4": (5, 3, 2, 3),
}
