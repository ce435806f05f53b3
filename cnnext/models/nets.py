"""The classic networks, as in "Dive into Deep Learning" (PyTorch edition).

Each builder takes (in_channels=1, num_classes=10, backend="cnnext") and writes the
architecture once against cnnext.models._layers.Layers, so backend="torch" and
backend="cnnext" build the same modules at the same places: identical state_dict keys,
and either loads the other's weights.
"""
import torch
from torch import nn

from ._layers import Layers


def lenet(in_channels=1, num_classes=10, backend="cnnext"):
    """LeNet-5 on 32x32 input, with ReLU and max pooling."""
    L = Layers(backend)
    return nn.Sequential(
        *L.conv_relu(in_channels, 6, 5), L.max_pool(2, 2),
        *L.conv_relu(6, 16, 5), L.max_pool(2, 2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes),
    )


def alexnet(in_channels=1, num_classes=10, backend="cnnext"):
    """AlexNet on 224x224 input (one tower, 96-256-384-384-256 channels)."""
    L = Layers(backend)
    return nn.Sequential(
        *L.conv_relu(in_channels, 96, 11, stride=4, padding=1), L.max_pool(3, 2),
        *L.conv_relu(96, 256, 5, padding=2), L.max_pool(3, 2),
        *L.conv_relu(256, 384, 3, padding=1),
        *L.conv_relu(384, 384, 3, padding=1),
        *L.conv_relu(384, 256, 3, padding=1), L.max_pool(3, 2),
        nn.Flatten(),
        nn.Linear(6400, 4096), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(4096, num_classes),
    )


VGG11_ARCH = ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))


def _vgg_block(L, num_convs, in_channels, out_channels):
    layers = []
    for _ in range(num_convs):
        layers += L.conv_relu(in_channels, out_channels, 3, padding=1)
        in_channels = out_channels
    return nn.Sequential(*layers, L.max_pool(2, 2))


def vgg(conv_arch=VGG11_ARCH, width_divisor=1, in_channels=1, num_classes=10, backend="cnnext"):
    """VGG on 224x224 input: for each (num_convs, channels) of conv_arch a block of 3x3
    pad-1 conv + ReLU layers and a 2x2/2 max pool; then three Linear layers. Channels
    (of the convolutions and of the hidden Linear layers) are divided by width_divisor."""
    if width_divisor < 1:
        raise ValueError(f"vgg: expected width_divisor to be at least 1, got {width_divisor}")
    L = Layers(backend)
    blocks = []
    for num_convs, channels in conv_arch:
        out_channels = channels // width_divisor
        blocks.append(_vgg_block(L, num_convs, in_channels, out_channels))
        in_channels = out_channels
    hidden = 4096 // width_divisor
    return nn.Sequential(
        *blocks, nn.Flatten(),
        nn.Linear(in_channels * 7 * 7, hidden), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(hidden, num_classes),
    )


def vgg11(in_channels=1, num_classes=10, backend="cnnext", width_divisor=1):
    """VGG-11 (conv_arch ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512)))."""
    return vgg(VGG11_ARCH, width_divisor, in_channels, num_classes, backend)


def _nin_block(L, in_channels, out_channels, kernel_size, stride, padding):
    return nn.Sequential(
        *L.conv_relu(in_channels, out_channels, kernel_size, stride, padding),
        *L.conv_relu(out_channels, out_channels, 1),
        *L.conv_relu(out_channels, out_channels, 1),
    )


def nin(in_channels=1, num_classes=10, backend="cnnext"):
    """Network in Network on 224x224 input; global average pooling replaces the dense layers."""
    L = Layers(backend)
    return nn.Sequential(
        _nin_block(L, in_channels, 96, 11, 4, 0), L.max_pool(3, 2),
        _nin_block(L, 96, 256, 5, 1, 2), L.max_pool(3, 2),
        _nin_block(L, 256, 384, 3, 1, 1), L.max_pool(3, 2),
        nn.Dropout(0.5),
        _nin_block(L, 384, num_classes, 3, 1, 1),
        L.global_avg_pool(), nn.Flatten(),
    )


class Inception(nn.Module):
    """Four parallel paths concatenated on channels: 1x1; 1x1 -> 3x3; 1x1 -> 5x5;
    3x3/1 max pool -> 1x1. ReLU after every convolution."""

    def __init__(self, in_channels, c1, c2, c3, c4, backend="cnnext"):
        super().__init__()
        L = Layers(backend)
        self.p1_1 = L.conv(in_channels, c1, 1)
        self.p2_1 = L.conv(in_channels, c2[0], 1)
        self.p2_2 = L.conv(c2[0], c2[1], 3, padding=1)
        self.p3_1 = L.conv(in_channels, c3[0], 1)
        self.p3_2 = L.conv(c3[0], c3[1], 5, padding=2)
        self.p4_1 = L.max_pool(3, 1, padding=1)
        self.p4_2 = L.conv(in_channels, c4, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        r = self.relu
        p1 = r(self.p1_1(x))
        p2 = r(self.p2_2(r(self.p2_1(x))))
        p3 = r(self.p3_2(r(self.p3_1(x))))
        p4 = r(self.p4_2(self.p4_1(x)))
        return torch.cat((p1, p2, p3, p4), dim=1)


def googlenet(in_channels=1, num_classes=10, backend="cnnext"):
    """GoogLeNet on 96x96 input: a stem, nine Inception blocks in three stages, global
    average pooling and one Linear layer."""
    L = Layers(backend)

    def inc(*args):
        return Inception(*args, backend=backend)

    b1 = nn.Sequential(*L.conv_relu(in_channels, 64, 7, stride=2, padding=3), L.max_pool(3, 2, padding=1))
    b2 = nn.Sequential(*L.conv_relu(64, 64, 1), *L.conv_relu(64, 192, 3, padding=1), L.max_pool(3, 2, padding=1))
    b3 = nn.Sequential(inc(192, 64, (96, 128), (16, 32), 32), inc(256, 128, (128, 192), (32, 96), 64),
                       L.max_pool(3, 2, padding=1))
    b4 = nn.Sequential(inc(480, 192, (96, 208), (16, 48), 64), inc(512, 160, (112, 224), (24, 64), 64),
                       inc(512, 128, (128, 256), (24, 64), 64), inc(512, 112, (144, 288), (32, 64), 64),
                       inc(528, 256, (160, 320), (32, 128), 128), L.max_pool(3, 2, padding=1))
    b5 = nn.Sequential(inc(832, 256, (160, 320), (32, 128), 128), inc(832, 384, (192, 384), (48, 128), 128),
                       L.global_avg_pool(), nn.Flatten())
    return nn.Sequential(b1, b2, b3, b4, b5, nn.Linear(1024, num_classes))


class Residual(nn.Module):
    """conv3x3 + BN + ReLU, conv3x3 + BN, plus the shortcut (identity, or a strided 1x1
    convolution when the shape changes), then ReLU. The conv + BN pairs are cnnext's
    fused op in the cnnext backend."""

    def __init__(self, in_channels, out_channels, use_1x1conv=False, stride=1, backend="cnnext"):
        super().__init__()
        L = Layers(backend)
        self.conv1 = L.conv_bn(in_channels, out_channels, 3, stride=stride, padding=1, relu=True)
        self.conv2 = L.conv_bn(out_channels, out_channels, 3, padding=1, relu=False)
        self.conv3 = L.conv(in_channels, out_channels, 1, stride=stride) if use_1x1conv else None
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.conv2(self.conv1(x))
        if self.conv3 is not None:
            x = self.conv3(x)
        return self.relu(y + x)


def _stem(L, in_channels):
    """7x7/2 conv 64 + BN + ReLU, 3x3/2 max pool (ResNet's and DenseNet's)."""
    return nn.Sequential(L.conv_bn(in_channels, 64, 7, stride=2, padding=3), L.max_pool(3, 2, padding=1))


def resnet18(in_channels=1, num_classes=10, backend="cnnext"):
    """ResNet-18 on 96x96 input: the stem, four stages of two residual blocks (64, 128,
    256, 512 channels; stages 2-4 halve the size), global average pooling, Linear."""
    L = Layers(backend)

    def stage(cin, cout, first):
        if first:
            return nn.Sequential(Residual(cin, cout, backend=backend), Residual(cout, cout, backend=backend))
        return nn.Sequential(Residual(cin, cout, use_1x1conv=True, stride=2, backend=backend),
                             Residual(cout, cout, backend=backend))

    return nn.Sequential(
        _stem(L, in_channels),
        stage(64, 64, True), stage(64, 128, False), stage(128, 256, False), stage(256, 512, False),
        L.global_avg_pool(), nn.Flatten(), nn.Linear(512, num_classes),
    )


def _dense_layer(L, in_channels, growth):
    """Pre-activation: BN, ReLU, 3x3 conv (stock BN in both backends)."""
    return nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(), L.conv(in_channels, growth, 3, padding=1))


class DenseBlock(nn.Module):
    """num_convs pre-activation layers; each one's output is concatenated to its input."""

    def __init__(self, num_convs, in_channels, growth, backend="cnnext"):
        super().__init__()
        L = Layers(backend)
        self.net = nn.Sequential(*(_dense_layer(L, in_channels + i * growth, growth) for i in range(num_convs)))

    def forward(self, x):
        for layer in self.net:
            x = torch.cat((x, layer(x)), dim=1)
        return x


def _transition(L, in_channels, out_channels):
    return nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(), L.conv(in_channels, out_channels, 1),
                         L.avg_pool(2, 2))


def densenet(in_channels=1, num_classes=10, backend="cnnext"):
    """DenseNet on 96x96 input: ResNet's stem, four dense blocks of four layers (growth 32)
    with halving transitions between them, BN, ReLU, global average pooling, Linear."""
    L = Layers(backend)
    growth, channels, layers = 32, 64, [_stem(L, in_channels)]
    for i, num_convs in enumerate((4, 4, 4, 4)):
        layers.append(DenseBlock(num_convs, channels, growth, backend=backend))
        channels += num_convs * growth
        if i != 3:
            layers.append(_transition(L, channels, channels // 2))
            channels //= 2
    return nn.Sequential(*layers, nn.BatchNorm2d(channels), nn.ReLU(), L.global_avg_pool(), nn.Flatten(),
                         nn.Linear(channels, num_classes))
