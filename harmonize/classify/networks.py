"""The classifier zoo: a small CNN baseline, MONAI's ResNet18 / ResNet50 / DenseNet121,
a small ViT.

All take (B, 1, S, S) images in model space and return one logit per image (B,)
(binary: finding vs normal). They train from scratch, or the ResNets and the DenseNet
start from a local ImageNet file in torchvision's format (`classify/pretrained.py`);
`load_weights` takes a harmonize classifier's safetensors (nothing is downloaded).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

ARCHITECTURES = ("cnn", "resnet18", "resnet50", "densenet121", "vit")
PRETRAINABLE = ("resnet18", "resnet50", "densenet121")  # torchvision has ImageNet weights
# ImageNet's grey statistics (the means of its RGB means and stds, timm's convention for
# one channel): a backbone started from ImageNet weights sees inputs scaled like those
IMAGENET_GREY_MEAN, IMAGENET_GREY_STD = 0.449, 0.226


class SmallCNN(nn.Module):
    """Four conv blocks (conv-norm-ReLU-maxpool), global average pooling, one linear layer:
    the kind of baseline multi-site papers report next to the big networks. norm "group"
    (GroupNorm, 8 groups) has no batch statistics: a federated model then behaves the same
    in training (one site per batch) as at test (all sites), which BatchNorm does not."""

    def __init__(self, width: int = 16, norm: str = "batch") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for k in range(4):
            c_out = width * 2**k
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), _norm(norm, c_out),
                       nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"unknown norm '{kind}'; choose batch or group")


class Classifier(nn.Module):
    """Wraps a backbone so every architecture returns (B,) logits."""

    def __init__(self, arch: str, image_size: int, width: int = 16, norm: str = "batch",
                 imagenet_input: bool = False) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown classifier '{arch}'; choose one of {ARCHITECTURES}")
        self.arch = arch
        self.norm = norm
        self.imagenet_input = imagenet_input  # normalize as ImageNet weights expect
        if arch == "cnn":
            self.net = SmallCNN(width, norm)
            return
        # imported here: MONAI's networks package loads its data and transform stacks
        # (~2 s), which every federated node process and CLI call would otherwise pay
        from monai.networks.nets import DenseNet121, ViT, resnet18, resnet50

        if arch in ("resnet18", "resnet50"):
            # torchvision's layout (stride-2 stem, no bias in the shortcut convolution),
            # so that ImageNet weights load name for name
            make = resnet18 if arch == "resnet18" else resnet50
            self.net = make(spatial_dims=2, n_input_channels=1, num_classes=1,
                            conv1_t_stride=2, bias_downsample=False)
        elif arch == "densenet121":
            self.net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=1)
        else:
            patch = 8 if image_size % 8 == 0 else 4
            if image_size % patch:
                raise ValueError(f"vit: image_size {image_size} must be a multiple of 4")
            # small ViT (~0.3 M parameters at width 16): hidden 6*width, 4 layers, 4 heads
            hidden = 6 * width
            self.net = ViT(in_channels=1, img_size=(image_size, image_size),
                           patch_size=(patch, patch), hidden_size=hidden, mlp_dim=2 * hidden,
                           num_layers=4, num_heads=4, classification=True, num_classes=1,
                           spatial_dims=2, post_activation=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.imagenet_input:
            x = (x - IMAGENET_GREY_MEAN) / IMAGENET_GREY_STD
        out = self.net(x)
        if isinstance(out, tuple):  # MONAI ViT returns (logits, hidden states)
            out = out[0]
        return out.reshape(-1)

    def head_name(self) -> str:
        """The last (classification) layer: what FedPer keeps at each node."""
        return {"cnn": "net.head", "resnet18": "net.fc", "resnet50": "net.fc",
                "densenet121": "net.class_layers.out",
                "vit": "net.classification_head"}[self.arch]

    def gradcam_layer(self) -> str:
        """Name of the last convolutional stage (for Grad-CAM); '' for the ViT."""
        return {"cnn": "net.features.14", "resnet18": "net.layer4", "resnet50": "net.layer4",
                "densenet121": "net.features.denseblock4", "vit": ""}[self.arch]


def load_weights(model: Classifier, path: str | Path) -> None:
    """Load a local safetensors state dict; a mismatch names the file and the keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file (give a local .safetensors)")
    state = load_file(str(path))
    if state and not all(k.startswith("net.") for k in state):
        state = {f"net.{k}": v for k, v in state.items()}  # a bare backbone state dict
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).split("\n\t")[1] if "\n\t" in str(err) else str(err)
        raise ValueError(f"{path}: weights do not fit a '{model.arch}' classifier ({first}); "
                         "check model.arch, model.width and data.image_size") from None
