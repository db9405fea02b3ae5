"""What would it take to bring the radiomics site AUC below 0.75? The price, measured.

After texture matching (`fingerprints: everywhere`) the demo's 4-site benchmark still
tells the sites apart (site AUC 0.951; the paired truth scores 0.495). No single feature
does it; site_b and site_d, whose detectors lost the finest detail (coarse sampling,
blur), stay recognizable. Their missing detail cannot be restored, only replaced. This
script measures the one lever that moves the site AUC a lot, as an experiment kept out of
the translator: replace what the blur of step 4 removes by random texture with the
reference site's *whole* ROI spectrum (anatomy included), instead of its noise.

    fill "noise" (the translator): noise drawn from the reference's fine band
    fill "texture": Gaussian texture with (1 - G^2) x the reference's ROI spectrum, G
        the blur's gain, so blurred image + texture has the reference's spectrum at every
        frequency, modulated by the noise model's std per intensity level

each at blur sigmas of 1, 1.5 and 2 px. Per variant: radiomics site AUC after
(`harmonize shift-report`, the phantom masks), texture effect size, SSIM to the paired
truth (non-reference images), and the finding-contrast audit (`finding_contrast_audit`).
Runs on the benchmark `eval/fingerprint_site_auc.py` generates (it reuses OUT/synth).

    python eval/texture_fill_frontier.py --data eval_out/site_auc/synth --out eval_out/fill

Writes OUT/frontier.csv. About 30 s per variant on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from harmonize.apply import apply_translator
from harmonize.data.manifest import load_manifest
from harmonize.data.texture import (
    RING_CENTERS,
    NoiseModel,
    _ring_index,
    radial_log_power,
)
from harmonize.evaluation.audit import finding_contrast_audit
from harmonize.evaluation.fidelity import mean_ci, score_files
from harmonize.fit import fit_and_save
from harmonize.radiomics.shift_report import run_shift_report
from harmonize.translators import TextureMatching

TEXTURE_FAMILIES = ("glcm", "glrlm", "glszm", "gldm", "ngtdm")


class TextureFill(NoiseModel):
    """The experiment: fill with the reference's whole ROI spectrum (see the docstring)."""

    def fit(self, images):
        pairs = list(images)
        super().fit(pairs)
        self.total_log_power_ = np.mean([radial_log_power(x, r) for x, r in pairs], axis=0)
        return self

    def sample(self, coarse: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _, r = _ring_index(coarse.shape)
        kept = np.exp(-2 * (np.pi * self.sigma) ** 2 * 0.5 * r**2)  # the blur's gain
        power = (1 - kept**2) * np.interp(r, RING_CENTERS, np.exp(self.total_log_power_))
        white = rng.standard_normal(coarse.shape)
        shaped = np.fft.irfft2(np.fft.rfft2(white) * np.sqrt(power), s=coarse.shape)
        level = np.interp(coarse, self.levels_, self.std_)
        return shaped * level / np.sqrt(np.mean(self.std_**2))


class TextureFilled(TextureMatching):
    """Texture matching with `TextureFill` in step 4 (in memory only: not for saving)."""

    def fit_reference(self, rows, reference_site):
        super().fit_reference(rows, reference_site)
        prepared = self._prepared_rows(rows, reference_site)
        self.noise_model_ = TextureFill(self.noise_sigma).fit((y, r) for y, r, _ in prepared)
        return self._site_statistics(prepared, reference_site)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="eval_out/site_auc/synth",
                   help="the benchmark eval/fingerprint_site_auc.py wrote (OUT/synth)")
    p.add_argument("--out", default="eval_out/fill")
    p.add_argument("--sigmas", default="1,1.5,2")
    args = p.parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    manifest = data / "manifest.csv"
    df = load_manifest(manifest)
    others = df[df["site"] != "site_a"]
    rows = []
    for fill, cls in (("noise", TextureMatching), ("texture", TextureFilled)):
        for sigma in (float(s) for s in args.sigmas.split(",")):
            name = f"{fill}-sigma{sigma:g}"
            started = time.perf_counter()
            translator = cls(fingerprints="everywhere", spectrum="site", noise_sigma=sigma)
            fit_and_save(translator, df, manifest, "site_a", out / "models" / name,
                         progress=False)
            folder = out / "harmonized" / name
            apply_translator(translator, manifest, folder, progress=False)
            shift = run_shift_report(manifest, out / "reports" / name, compare_with=folder,
                                     reference_site="site_a", progress=False, label=name)
            after = shift["after"]
            fidelity = score_files(others, data, {name: lambda rec, f=folder: f / rec["relpath"]})
            audit = finding_contrast_audit(others, data, lambda rec, f=folder: f / rec["relpath"])
            rows.append({
                "fill": fill, "sigma": sigma, "site_auc": after["site_auc"],
                "shifted_features": after["shifted_feature_share"],
                "texture_effect_size": float(np.mean(
                    [after["shift_by_family"][f]["mean_epsilon_sq"] for f in TEXTURE_FAMILIES])),
                "ssim": mean_ci(fidelity["ssim"])["mean"],
                **{k: audit[k] for k in ("findings_erased", "findings_exaggerated",
                                         "finding_contrast_vs_truth")},
                "seconds": time.perf_counter() - started})
            print(", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in rows[-1].items()), flush=True)
    pd.DataFrame(rows).to_csv(out / "frontier.csv", index=False, float_format="%.4f")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
