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
