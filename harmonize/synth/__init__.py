"""Synthetic multi-site benchmark: seeded phantoms imaged through per-site acquisition models.

``generate(OUT)`` writes X-ray-like or bone-scan-like images for several sites, each
patient also rendered as the reference site would have acquired it (paired ground truth),
with body ROI and finding masks, a manifest and a synth.json summary. Building blocks:
:mod:`.phantom` (anatomy + finding), :mod:`.acquisition` (site style), :mod:`.benchmark`.
"""

from harmonize.synth.acquisition import SiteAcquisition, default_sites, render
from harmonize.synth.benchmark import cohort_sizes, generate
from harmonize.synth.phantom import Phantom, make_phantom

__all__ = ["Phantom", "SiteAcquisition", "cohort_sizes", "default_sites", "generate",
           "make_phantom", "render"]
