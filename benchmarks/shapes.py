"""Layer shapes of the classic networks, as benchmarked (batch 8 on CPU).

name: (N, C, H, W, out_channels, kernel, stride, padding)
"""
CONV2D = {
    "alexnet_conv1": (8, 1, 224, 224, 96, 11, 4, 1),
    "alexnet_conv2": (8, 96, 26, 26, 256, 5, 1, 2),
    "alexnet_conv3": (8, 256, 12, 12, 384, 3, 1, 1),
    "vgg_conv3": (8, 128, 56, 56, 256, 3, 1, 1),
    "resnet_conv": (8, 64, 56, 56, 64, 3, 1, 1),
    "resnet_down": (8, 64, 56, 56, 128, 3, 2, 1),
    "resnet_shortcut": (8, 64, 56, 56, 128, 1, 2, 0),
    "resnet_1x1": (8, 256, 14, 14, 256, 1, 1, 0),
}

# Transposed convolutions of decoders and GANs (batch 8 on CPU).
# name: (N, C_in, H, W, out_channels, kernel, stride, padding, output_padding)
CONV_TRANSPOSE2D = {
    "upsample_k4s2": (8, 64, 28, 28, 32, 4, 2, 1, 0),      # 28x28 -> 56x56 (DCGAN-style)
    "upsample_k3s2op1": (8, 64, 28, 28, 32, 3, 2, 1, 1),   # 28x28 -> 56x56 (U-Net / FCN-style)
}

# The convolutions of the classic networks at the small sizes their training benchmarks use
# (ResNet-18 at 96x96, batch 4; LeNet-5 at 32x32, batch 64): small maps, where batching
# positions over samples and the GEMM orientation matter.
# name: (N, C, H, W, out_channels, kernel, stride, padding)
CONV2D_NETWORKS = {
    "resnet18_96_stem": (4, 3, 96, 96, 64, 7, 2, 3),
    "resnet18_96_l1": (4, 64, 24, 24, 64, 3, 1, 1),
    "resnet18_96_l2_down": (4, 64, 24, 24, 128, 3, 2, 1),
    "resnet18_96_l2": (4, 128, 12, 12, 128, 3, 1, 1),
    "resnet18_96_l3_down": (4, 128, 12, 12, 256, 3, 2, 1),
    "resnet18_96_l3": (4, 256, 6, 6, 256, 3, 1, 1),
    "resnet18_96_l4_down": (4, 256, 6, 6, 512, 3, 2, 1),
    "resnet18_96_l4": (4, 512, 3, 3, 512, 3, 1, 1),
    "resnet18_96_l4_shortcut": (4, 256, 6, 6, 512, 1, 2, 0),
    "lenet_conv1": (64, 1, 32, 32, 6, 5, 1, 2),
    "lenet_conv2": (64, 6, 14, 14, 16, 5, 1, 0),
}
