"""The CycleGAN objective as pure functions, one per half of the data.

The many-to-one CycleGAN loss is a sum of terms that each need only one domain's real
images (Song & Ye 2021; IGUANe 2025):

- source half (real images a of a non-reference site, its condition c):
  G's adversarial term against D_B, the cycle a -> G -> F -> a, F's identity on a and
  the structure term between a and G(a);
- reference half (real reference images b): F's adversarial term against D_A, the cycle
  b -> F -> G -> b, G's identity on b, the structure term between b and F(b);
- each discriminator: a real term (its own domain's images) and a fake term (pooled
  translations of the other domain).

CUT (`objective: patchnce`, `train_cut.py`) replaces the reverse generator and the cycle by
PatchNCE: a source node's terms are G's adversarial term and PatchNCE between a and G(a),
the reference node's the identity PatchNCE between b and G(b) and D_B's real term.

Central training (`train.py`) adds both halves every step; a federated node computes the
halves its own images allow (`harmonize.federated.cyclegan_task`). Same functions, so a
fix to a loss reaches both. Networks work in [-1, 1]; terms are returned in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from harmonize.translators.cyclegan.networks import local_ncc_loss, lsgan_loss

Terms = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LossWeights:
    cycle: float = 10.0
    identity: float = 0.5  # times `cycle`, as in the reference implementation
    structure: float = 0.0
    nce: float = 1.0  # CUT's PatchNCE weight (objective patchnce)
    nce_patches: int = 256
    nce_temperature: float = 0.07

    @classmethod
    def from_config(cls, loss) -> LossWeights:
        """From a `LossConfig` section."""
        return cls(loss.lambda_cycle, loss.lambda_identity, loss.lambda_structure,
                   loss.lambda_nce, loss.nce_patches, loss.nce_temperature)


def adversarial_term(d, fake: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
    """A generator's LSGAN term: its translations should be called real by `d`."""
    return lsgan_loss(d(fake, cond), True)


def cycle_term(rebuilt: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """L1 between an image and its round trip through both generators."""
    return F.l1_loss(rebuilt.float(), real.float())


def identity_term(net, real: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
    """L1 of a generator on images already in its target domain (should not change)."""
    return F.l1_loss(net(real, cond).float(), real.float())


def source_terms(g, f, d_b, real_a: torch.Tensor, cond: torch.Tensor | None,
                 w: LossWeights) -> tuple[Terms, torch.Tensor]:
    """Generator terms that need source images only; returns (terms, G(a))."""
    fake_b = g(real_a)
    terms = {"G_gan": adversarial_term(d_b, fake_b),
             "cycle": cycle_term(f(fake_b, cond), real_a)}
    if w.identity > 0:
        terms["idt"] = identity_term(f, real_a, cond)
    if w.structure > 0:
        terms["struct"] = local_ncc_loss(real_a, fake_b)
    return terms, fake_b


def reference_terms(g, f, d_a, real_b: torch.Tensor, cond: torch.Tensor | None,
                    w: LossWeights) -> tuple[Terms, torch.Tensor]:
    """Generator terms that need reference images only (F told which site to render
    them as by `cond`); returns (terms, F(b))."""
    fake_a = f(real_b, cond)
    terms = {"F_gan": adversarial_term(d_a, fake_a, cond),
             "cycle": cycle_term(g(fake_a), real_b)}
    if w.identity > 0:
        terms["idt"] = identity_term(g, real_b)
    if w.structure > 0:
        terms["struct"] = local_ncc_loss(real_b, fake_a)
    return terms, fake_a


def merge(*parts: Terms) -> Terms:
    """Terms of several halves with the same name added (e.g. both cycles)."""
    out: Terms = {}
    for part in parts:
        for key, value in part.items():
            out[key] = out[key] + value if key in out else value
    return out


def patchnce_term(g, h, source: torch.Tensor, output: torch.Tensor, w: LossWeights,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """PatchNCE (Park et al. 2020): a patch of the output should match the patch at the
    same place in the source (positive) better than the other sampled patches of that
    image (negatives), in the projection space of G's own encoder. Needs only the source
    and its translation, so a node computes it on its own images."""
    feats_src = g.encode(source)
    feats_out = g.encode(output)
    total = torch.zeros((), device=source.device)
    for layer, (fs, fo) in enumerate(zip(feats_src, feats_out, strict=True)):
        b, c, hh, ww = fs.shape
        n = min(w.nce_patches, hh * ww)
        idx = torch.randperm(hh * ww, generator=generator)[:n].to(fs.device)
        q = h(layer, fo.flatten(2)[:, :, idx].transpose(1, 2).float())  # (b, n, dim)
        k = h(layer, fs.flatten(2)[:, :, idx].transpose(1, 2).float()).detach()
        logits = q @ k.transpose(1, 2) / w.nce_temperature  # (b, n, n): diagonal = positive
        target = torch.arange(n, device=fs.device).expand(b, n)
        total = total + F.cross_entropy(logits.flatten(0, 1), target.flatten())
    return total / len(feats_src)


def cut_source_terms(g, h, d_b, real_a: torch.Tensor, w: LossWeights,
                     generator: torch.Generator | None = None) -> tuple[Terms, torch.Tensor]:
    """CUT's generator terms on source images: adversarial against D_B and PatchNCE
    between a and G(a); returns (terms, G(a))."""
    fake_b = g(real_a)
    return {"G_gan": adversarial_term(d_b, fake_b),
            "nce": patchnce_term(g, h, real_a, fake_b, w, generator)}, fake_b


def cut_reference_terms(g, h, real_b: torch.Tensor, w: LossWeights,
                        generator: torch.Generator | None = None) -> Terms:
    """CUT's identity PatchNCE on reference images: G(b) keeps b's patches."""
    return {"nce_idt": patchnce_term(g, h, real_b, g(real_b), w, generator)}


def generator_loss(terms: Terms, w: LossWeights) -> torch.Tensor:
    """The weighted generator objective of whatever terms are present."""
    weights = {"G_gan": 1.0, "F_gan": 1.0, "cycle": w.cycle, "idt": w.cycle * w.identity,
               "struct": w.structure, "nce": w.nce, "nce_idt": w.nce}
    return sum(weights[k] * v for k, v in terms.items())


def discriminator_real(d, real: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
    """Half of a discriminator's loss: its own domain's real images called real."""
    return 0.5 * lsgan_loss(d(real, cond), True)


def discriminator_fake(d, fake: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
    """The other half: (pooled, detached) translations called fake."""
    return 0.5 * lsgan_loss(d(fake.detach(), cond), False)
