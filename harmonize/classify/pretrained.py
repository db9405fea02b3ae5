"""Start a ResNet / DenseNet backbone from a local ImageNet weights file in torchvision's
format, as the field does (nothing is downloaded: the user gives the file).

torchvision's names map onto MONAI's networks (which harmonize builds in torchvision's
layout for this): ResNets keep every name; DenseNet's layers gain MONAI's `.layers`
level (both torchvision's current `norm1` and its published files' older `norm.1`
spelling are read). The RGB stem is summed over its three input channels, timm's
convention for a grey image (the response to a grey image equals the RGB network's on
that image repeated three times), and the classifier normalizes its input with
ImageNet's grey statistics. The 1000-class head is left out: the new one-logit head
starts fresh.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from harmonize.classify.networks import PRETRAINABLE, Classifier

# the first convolution (RGB in ImageNet weights) and the head (left out) per architecture
STEM = {"resnet18": "conv1.weight", "resnet50": "conv1.weight",
        "densenet121": "features.conv0.weight"}
TORCHVISION_HEAD = {"resnet18": "fc.", "resnet50": "fc.", "densenet121": "classifier."}
MONAI_HEAD = {"resnet18": "fc.", "resnet50": "fc.", "densenet121": "class_layers."}
# torchvision DenseNet layer names (current `norm1` or legacy `norm.1`) -> MONAI's
DENSE_LAYER = re.compile(r"^(.*denselayer\d+)\.(norm|relu|conv)\.?([12])\.(.+)$")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file, or a torch file holding a state dict (possibly under
    'state_dict' or 'model', as training scripts save it); tensors only, no pickled code."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ValueError(f"{path}: not a readable weights file ({type(err).__name__}: "
                         f"{err}); give torchvision's .pth or a .safetensors") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: holds no state dict of tensors (save one with "
                         "torch.save(model.state_dict(), path))")
    return obj


def torchvision_to_monai(state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """Rename to MONAI's keys, drop the ImageNet head, sum the RGB stem to one channel."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")  # saved from DataParallel / DDP
        if key.startswith(TORCHVISION_HEAD[arch]):
            continue
        if arch == "densenet121" and (match := DENSE_LAYER.match(key)):
            key = f"{match[1]}.layers.{match[2]}{match[3]}.{match[4]}"
        out[key] = value
    stem = out.get(STEM[arch])
    if stem is not None and stem.ndim == 4 and stem.shape[1] == 3:
        out[STEM[arch]] = stem.sum(dim=1, keepdim=True)
    return out


def load_imagenet_weights(model: Classifier, path: str | Path) -> int:
    """Load a torchvision-format ImageNet state dict into `model`'s backbone; every
    backbone tensor must come from the file (a mismatch names the file and the keys).
    Returns the number of tensors loaded."""
    path = Path(path)
    if model.arch not in PRETRAINABLE:
        raise ValueError(f"{path}: ImageNet weights start {', '.join(PRETRAINABLE)} only; "
                         f"'{model.arch}' trains from scratch (drop model.pretrained)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file (give a local torchvision "
                                f"{model.arch} .pth or .safetensors)")
    state = torchvision_to_monai(read_state_dict(path), model.arch)
    target = {k: v for k, v in model.net.state_dict().items()
              if not k.startswith(MONAI_HEAD[model.arch])}
    missing = sorted(set(target) - set(state))
    extra = sorted(set(state) - set(target))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in target.items() if k in state and state[k].shape != v.shape]
    if missing or extra or wrong:
        problems = [f"{len(missing)} missing, e.g. {missing[:3]}" if missing else "",
                    f"{len(extra)} unexpected, e.g. {extra[:3]}" if extra else "",
                    f"shapes differ: {wrong[:3]}" if wrong else ""]
        raise ValueError(f"{path}: not torchvision's {model.arch} weights "
                         f"({'; '.join(p for p in problems if p)})")
    model.net.load_state_dict({k: state[k].to(v.dtype) for k, v in target.items()},
                              strict=False)
    model.imagenet_input = True
    return len(target)
