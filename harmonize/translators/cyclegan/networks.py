"""The CycleGAN networks, spelled out: ResNet generator, 70x70 PatchGAN, LSGAN loss, image pool.

Follows the reference implementation (Zhu et al. 2017, pytorch-CycleGAN-and-pix2pix) with
three changes for single-channel medical images:

- Upsampling is resize-convolution (nearest or bilinear upsample, then a 3x3 convolution)
  instead of a transposed convolution: a stride-2 transposed convolution overlaps its
  kernels unevenly and prints a checkerboard pattern (Odena et al. 2016, Distill).
- An optional condition (one-hot site code) is broadcast to constant input planes; the
  reverse generator and the source-domain discriminator use it (see `translator`).
- The generator may add its output to its input (``residual=True``): it starts as the
  identity, which is what harmonization mostly is, and converges in fewer steps.
  ``residual="additive"`` adds in network space without a final tanh and starts the 7x7
  head at zero, so the untrained generator is exactly the identity (the histogram-residual
  translator relies on that: at step 0 it is histogram matching).

Networks work in [-1, 1]; the translator converts from and to model space [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int) -> nn.Module:
    # as in the reference: no affine parameters, no running statistics
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


class ReflectionPad(nn.ReflectionPad2d):
    """Reflection padding in the input's own precision. CPU autocast lists reflection_pad2d
    among its fp32 ops, so under bf16 every pad would cast to fp32 and the next convolution
    back to bf16 (measured: ~8% of a bf16 training step); padding only copies values, so
    bf16 loses nothing here."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x)


def _with_condition(x: torch.Tensor, condition: torch.Tensor | None, n: int) -> torch.Tensor:
    """Append a (B, n) condition as n constant planes to the image batch."""
    if n == 0:
        return x
    if condition is None or condition.shape != (x.shape[0], n):
        got = None if condition is None else tuple(condition.shape)
        raise ValueError(f"this network needs a ({x.shape[0]}, {n}) condition, got {got}")
    planes = condition.to(x.dtype)[:, :, None, None].expand(-1, -1, *x.shape[-2:])
    return torch.cat([x, planes], dim=1)


class ResnetBlock(nn.Module):
    """x + conv-norm-relu-conv-norm(x), reflection padded."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            ReflectionPad(1), nn.Conv2d(channels, channels, 3), _norm(channels), nn.ReLU(True),
            ReflectionPad(1), nn.Conv2d(channels, channels, 3), _norm(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """7x7 stem, two stride-2 downsamplings, n residual blocks, two resize-convolutions,
    7x7 head, tanh. Height and width must be multiples of 4 (the translator pads)."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, ngf: int = 64,
                 n_blocks: int = 9, n_conditions: int = 0, upsample: str = "nearest",
                 residual: bool | str = False) -> None:
        super().__init__()
        if upsample not in ("nearest", "bilinear"):
            raise ValueError(f"upsample='{upsample}': use 'nearest' or 'bilinear'")
        if residual not in (False, True, "additive"):
            raise ValueError(f"residual={residual!r}: use false, true or 'additive'")
        if residual and in_channels != out_channels:
            raise ValueError("residual=True needs in_channels == out_channels")
        self.n_conditions = n_conditions
        self.residual = residual
        self.stem = nn.Sequential(
            ReflectionPad(3), nn.Conv2d(in_channels + n_conditions, ngf, 7), _norm(ngf),
            nn.ReLU(True),
        )
        self.down = nn.Sequential(
            nn.Conv2d(ngf, 2 * ngf, 3, stride=2, padding=1), _norm(2 * ngf), nn.ReLU(True),
            nn.Conv2d(2 * ngf, 4 * ngf, 3, stride=2, padding=1), _norm(4 * ngf), nn.ReLU(True),
        )
        self.blocks = nn.Sequential(*[ResnetBlock(4 * ngf) for _ in range(n_blocks)])
        up_kwargs = {"align_corners": False} if upsample == "bilinear" else {}
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2, mode=upsample, **up_kwargs),
            ReflectionPad(1), nn.Conv2d(4 * ngf, 2 * ngf, 3), _norm(2 * ngf), nn.ReLU(True),
            nn.Upsample(scale_factor=2, mode=upsample, **up_kwargs),
            ReflectionPad(1), nn.Conv2d(2 * ngf, ngf, 3), _norm(ngf), nn.ReLU(True),
        )
        self.head = nn.Sequential(ReflectionPad(3), nn.Conv2d(ngf, out_channels, 7))
        if residual == "additive":  # the untrained generator is exactly the identity
            head = self.head[-1]
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
            head.zero_init = True  # init_weights leaves it at zero

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-2] % 4 or x.shape[-1] % 4:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of 4; "
                             "pad it first (the translator does)")
        h = self.stem(_with_condition(x, condition, self.n_conditions))
        h = self.head(self.up(self.blocks(self.down(h))))
        if self.residual == "additive":
            return x + h.to(x.dtype)
        if self.residual:
            # add in the unbounded domain, so an output of zero means "keep the input"
            return torch.tanh(h + torch.atanh(x.clamp(-0.995, 0.995)))
        return torch.tanh(h)


    def encode(self, x: torch.Tensor, condition: torch.Tensor | None = None
               ) -> list[torch.Tensor]:
        """Encoder features for PatchNCE (CUT): after the stem, after each downsampling,
        after the first and the middle residual block (cf. CUT's layers 0, 4, 8, 12, 16)."""
        h = self.stem(_with_condition(x, condition, self.n_conditions))
        feats = [h]
        h = self.down[:3](h)
        feats.append(h)
        h = self.down[3:](h)
        feats.append(h)
        for k, block in enumerate(self.blocks):
            h = block(h)
            if k in (0, len(self.blocks) // 2):
                feats.append(h)
        return feats

    def feature_channels(self) -> list[int]:
        """Channels of each `encode` feature map, in order."""
        ngf = self.stem[1].out_channels
        n = len(self.blocks)
        return [ngf, 2 * ngf, 4 * ngf] + [4 * ngf] * len({0, n // 2} if n else set())


class PatchProjection(nn.Module):
    """CUT's projection heads: one 2-layer MLP per encoder layer mapping sampled patch
    features to unit vectors, where PatchNCE compares them."""

    def __init__(self, channels: list[int], dim: int = 256) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(c, dim), nn.ReLU(True), nn.Linear(dim, dim))
            for c in channels)

    def forward(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.heads[layer](features), dim=-1)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: with n_layers=3 each output scores a 70x70 receptive field."""

    def __init__(self, in_channels: int = 1, ndf: int = 64, n_layers: int = 3,
                 n_conditions: int = 0) -> None:
        super().__init__()
        self.n_conditions = n_conditions
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels + n_conditions, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1),
                       _norm(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(_with_condition(x, condition, self.n_conditions))


def init_weights(net: nn.Module) -> nn.Module:
    """Reference initialization: N(0, 0.02) convolutions (and linear layers), zero biases;
    returns `net`."""
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and not getattr(module, "zero_init",
                                                                       False):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return net


def min_discriminator_size(n_layers: int) -> int:
    """Smallest input side for which the PatchGAN still gives a 2x2 score map.

    n_layers stride-2 4x4 convolutions halve the side, the two stride-1 ones take a pixel
    each: out = side / 2**n_layers - 2.
    """
    return (2 + 2) * 2**n_layers


def lsgan_loss(prediction: torch.Tensor, target_is_real: bool) -> torch.Tensor:
    """Least-squares GAN loss (Mao et al. 2017): MSE against 1 (real) or 0 (fake)."""
    target = torch.ones_like(prediction) if target_is_real else torch.zeros_like(prediction)
    return F.mse_loss(prediction.float(), target.float())


def local_ncc_loss(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> torch.Tensor:
    """1 - local normalized cross-correlation of 2x-downsampled a and b.

    Invariant to any local affine change of intensity (what a style change may do),
    sensitive to moved, added or erased edges (what it must not do). Downsampling first
    keeps pixel noise, which a translator should be free to remove, out of the score.
    """
    a = F.avg_pool2d(a.float(), 2)
    b = F.avg_pool2d(b.float(), 2)
    pad = window // 2

    def mean(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.pad(t, (pad, pad, pad, pad), mode="reflect"), window, stride=1)

    ma, mb = mean(a), mean(b)
    cov = mean(a * b) - ma * mb
    var_a = (mean(a * a) - ma * ma).clamp_min(0)
    var_b = (mean(b * b) - mb * mb).clamp_min(0)
    ncc = cov / torch.sqrt(var_a * var_b + 1e-4)
    return 1.0 - ncc.mean()


class ImagePool:
    """History of generated images (Shrivastava et al. 2017): the discriminator sees a
    mix of current and past fakes, which damps oscillation. Conditions travel along.
    Images stay on their device (no copy to the host per step); the random choices use
    a CPU generator, which needs no device sync."""

    def __init__(self, size: int = 50, seed: int = 0) -> None:
        self.size = size
        self.images: list[torch.Tensor] = []
        self.conditions: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)

    def query(self, images: torch.Tensor, conditions: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.size == 0:
            return images, conditions
        if conditions is None:
            conditions = images.new_zeros(images.shape[0], 0)
        out_images, out_conds = [], []
        for image, cond in zip(images.detach(), conditions.detach(), strict=True):
            if len(self.images) < self.size:
                self.images.append(image)
                self.conditions.append(cond)
                out_images.append(image)
                out_conds.append(cond)
            elif torch.rand((), generator=self.generator) < 0.5:
                k = int(torch.randint(self.size, (), generator=self.generator))
                out_images.append(self.images[k].to(image.device, image.dtype))
                out_conds.append(self.conditions[k].to(cond.device))
                self.images[k], self.conditions[k] = image, cond
            else:
                out_images.append(image)
                out_conds.append(cond)
        conds = torch.stack(out_conds)
        return torch.stack(out_images), (conds if conds.shape[1] else None)

    def state_dict(self) -> dict:
        return {"images": [t.cpu() for t in self.images],
                "conditions": [t.cpu() for t in self.conditions],
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.images = list(state["images"])
        self.conditions = list(state["conditions"])
        self.generator.set_state(state["generator"])
