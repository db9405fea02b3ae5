"""Seeded anatomical phantoms with a known binary finding.

Two anatomies, each returning an *ideal* map (what a perfect, noiseless detector would
record before any site-specific processing) plus a body ROI and a finding mask:

- ``xray``: a PA chest projection. The ideal map is the line integral of attenuation
  (air = 0, roughly 0..4); the finding is a lung nodule (a soft-tissue sphere).
- ``bonescan``: a whole-body anterior planar scintigram. The ideal map is relative tracer
  activity (normal bone about 1, bladder hotter); the finding is one to four focal hot
  spots in the axial skeleton (metastases).

Because the anatomy is known exactly, a renderer can image the same patient as any site
would have, which is what makes paired ground truth possible. Every shape jitters per
patient so no two phantoms are identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from harmonize.synth.shapes import curve, ellipsoid, segment, shell, smooth_noise, smoothstep, tubes

MODALITIES = ("xray", "bonescan")


@dataclass(frozen=True)
class Phantom:
    """One patient: ideal map (float32), body ROI (bool) and finding mask (bool, may be empty)."""

    ideal: np.ndarray
    roi: np.ndarray
    finding: np.ndarray
    modality: str

    @property
    def positive(self) -> bool:
        """True when the patient has the finding."""
        return bool(self.finding.any())


def make_phantom(modality: str, size: int, positive: bool, rng: np.random.Generator,
                 finding_scale: float = 1.0) -> Phantom:
    """Draw one phantom of ``modality`` ("xray" or "bonescan"), ``size`` x ``size`` pixels."""
    if modality == "xray":
        return chest_xray(size, positive, rng, finding_scale)
    if modality == "bonescan":
        return bone_scan(size, positive, rng, finding_scale)
    raise ValueError(f"unknown modality {modality!r}; choose one of {', '.join(MODALITIES)}")


# --------------------------------------------------------------------------- chest X-ray


def chest_xray(size: int, positive: bool, rng: np.random.Generator,
               finding_scale: float = 1.0) -> Phantom:
    """PA chest: body, shoulders, arms, lungs with vessels, heart, spine, ribs, clavicles."""
    u = rng.uniform
    sx, sy = u(0.92, 1.05), u(0.94, 1.05)  # habitus
    cx, dy = 0.5 + u(-0.02, 0.02), u(-0.025, 0.02)  # patient position
    thick = u(2.6, 3.3)  # soft-tissue attenuation through the trunk

    soft = np.zeros((size, size), np.float32)
    ellipsoid(soft, 0.64 + dy, cx, 0.60 * sy, 0.40 * sx, thick, combine="max")  # trunk
    ellipsoid(soft, 0.23 + dy, cx, 0.12, 0.45 * sx, 0.75 * thick, combine="max")  # shoulders
    ellipsoid(soft, 0.02 + dy, cx, 0.17, 0.085, 0.6 * thick, combine="max")  # neck
    for s in (-1, 1):
        ellipsoid(soft, 0.5 + dy, cx + s * 0.44 * sx, 0.4, 0.065, 0.45 * thick, combine="max")
    roi = soft > 0.02 * thick
    soft *= 1.0 + 0.03 * smooth_noise(size, 0.06, rng)

    # Lungs: ellipsoids cut by domed hemidiaphragms; the left lung (image right) is smaller.
    lung = np.zeros_like(soft)
    yy = (np.arange(size, dtype=np.float32)[:, None] + 0.5) / size
    xx = (np.arange(size, dtype=np.float32)[None, :] + 0.5) / size
    scale = u(0.92, 1.06)
    for s in (-1, 1):
        one = np.zeros_like(soft)
        lcx, lcy = cx + s * 0.175 * sx, 0.42 * sy + dy
        lry, lrx = 0.27 * sy * scale, (0.125 if s < 0 else 0.115) * sx * scale
        ellipsoid(one, lcy, lcx, lry, lrx)
        base = lcy + 0.85 * lry + (0.0 if s > 0 else -0.015) + u(-0.015, 0.015)
        dome = base - 0.07 * np.clip(1.0 - ((xx - lcx) / lrx) ** 2, 0.0, 1.0)
        lung += one * smoothstep((dome - yy) / 0.02)
    heart = np.zeros_like(soft)
    hs = u(0.9, 1.12)
    ellipsoid(heart, 0.54 * sy + dy, cx + 0.06 * sx, 0.12 * hs, 0.145 * sx * hs, angle=-0.5)
    air = lung * (1.0 - np.clip(1.6 * heart, 0.0, 1.0))

    # Pulmonary vessels: tapering random branches fanning out from each hilum.
    vessels = []
    for s in (-1, 1):
        for _ in range(rng.integers(9, 14)):
            ang = u(-1.1, 1.1) + (np.pi / 2 if s > 0 else -np.pi / 2)
            length = u(0.08, 0.24)
            t = np.linspace(0, 1, 24)
            bend = u(-0.3, 0.3) * t
            vy = 0.45 * sy + dy + u(-0.04, 0.04) - length * t * np.cos(ang + bend)
            vx = cx + s * 0.07 * sx + length * t * np.sin(ang + bend)
            vessels.append(curve(vy, vx, u(0.005, 0.008), 0.0015))
    dist, rad = tubes(size, vessels)
    vessel = 9.0 * shell(dist, rad, inner=0.0, marrow=1.0) * smoothstep(air / 0.3)

    # Bones: posterior ribs and clavicles (one pass), anterior ribs (fainter, second pass).
    spacing = 0.052 * sy * u(0.94, 1.06)
    lateral = np.array([0.20, 0.26, 0.30, 0.33, 0.35, 0.36, 0.36, 0.36, 0.35, 0.34]) * sx
    posterior, anterior = [], []
    t = np.linspace(0, 1, 48)
    for s in (-1, 1):
        for i, reach in enumerate(lateral):
            y0 = 0.155 * sy + dy + i * spacing
            ry = y0 - 0.03 * np.sin(np.pi * t) + 0.075 * t**3
            rx = cx + s * (0.028 + reach * t)
            posterior.append(curve(ry, rx, 0.0075 * sy, 0.0105 * sy))
            ay = ry[-1] + 0.13 * t - 0.02 * np.sin(np.pi * t)
            ax = cx + s * (0.028 + reach - (reach - 0.09) * t)
            anterior.append(curve(ay, ax, 0.010 * sy, 0.008 * sy))
        clav_t = np.linspace(0, 1, 32)
        posterior.append(curve(0.175 * sy + dy - 0.045 * clav_t + 0.01 * np.sin(2 * np.pi * clav_t),
                               cx + s * (0.035 + 0.27 * sx * clav_t), 0.011, 0.009))
    dist, rad = tubes(size, posterior)
    bone = 14.0 * shell(dist, rad)
    dist, rad = tubes(size, anterior)
    bone += 6.0 * shell(dist, rad)
    # Spine: a column of vertebral bodies with pedicles, seen through the mediastinum.
    vert = 0.043 * sy
    for k in range(-1, int(1.0 / vert) + 2):
        vy = dy + k * vert
        ellipsoid(bone, vy, cx, 0.017 * sy, 0.028 * (1 + 0.15 * vy), 0.22)
        for s in (-1, 1):
            ellipsoid(bone, vy - 0.004, cx + s * 0.022, 0.006, 0.005, 0.15)
    bone *= roi

    finding = np.zeros_like(roi)
    nodule = np.zeros_like(soft)
    if positive:
        # Centre the nodule well inside aerated lung (not on the heart or diaphragm edge),
        # so it is a finding a reader could see, not one hidden by the mediastinum.
        nr = u(0.018, 0.04) * finding_scale  # scale > 1: a finding visible at low resolution
        depth = ndimage.distance_transform_edt(air > 0.3 * air.max()) / size
        inner = np.flatnonzero((depth > nr + 0.025).ravel())
        if inner.size == 0:
            inner = np.flatnonzero((depth >= 0.5 * depth.max()).ravel())
        pick = inner[rng.integers(inner.size)]
        ny, nx = (np.array(divmod(pick, size)) + 0.5) / size
        peak = u(0.25, 0.4)
        ellipsoid(nodule, ny, nx, nr, nr * u(0.8, 1.2), peak, angle=u(0, np.pi))
        ellipsoid(nodule, ny + u(-0.5, 0.5) * nr, nx + u(-0.5, 0.5) * nr, 0.6 * nr, 0.6 * nr,
                  0.5 * peak)
        finding = (nodule > 0) & roi

    texture = 0.04 * smooth_noise(size, 0.008, rng) * air
    ideal = soft - 0.62 * thick * air + vessel + bone + texture + nodule
    ideal = np.clip(ideal, 0.0, None).astype(np.float32)
    return Phantom(ideal=ideal, roi=roi, finding=finding, modality="xray")


# --------------------------------------------------------------------------- bone scan


def bone_scan(size: int, positive: bool, rng: np.random.Generator,
              finding_scale: float = 1.0) -> Phantom:
    """Whole-body anterior bone scintigram: skeleton uptake, kidneys, bladder, soft tissue.

    The body is drawn in body units (head top = 0, soles = 1, x relative to the midline)
    and mapped into the square image, so the figure is tall and narrow as in real scans.
    """
    u = rng.uniform
    height = u(0.90, 0.96)
    top = (1.0 - height) / 2 + u(-0.015, 0.015)
    mid = 0.5 + u(-0.02, 0.02)
    wide = u(0.9, 1.1)  # build

    def at(y: float, x: float) -> tuple[float, float]:
        return top + y * height, mid + x * height * wide

    def rad(r: float) -> float:
        return r * height * wide

    def seg(p0: tuple[float, float], p1: tuple[float, float], r0: float, r1: float | None = None):
        return segment(at(*p0), at(*p1), rad(r0), None if r1 is None else rad(r1))

    elbow = 0.105 + u(0.0, 0.03)
    hand = elbow + u(0.0, 0.03)
    knee, ankle = 0.05 + u(-0.005, 0.015), 0.045 + u(-0.005, 0.02)

    # Soft tissue silhouette (also the ROI).
    soft = np.zeros((size, size), np.float32)
    for (y, x), ry, rx in (((0.065, 0), 0.072, 0.058), ((0.36, 0), 0.20, 0.125),
                           ((0.52, 0), 0.10, 0.118)):
        ellipsoid(soft, *at(y, x), rad(ry), rad(rx), combine="max")
    limbs = [seg((0.11, 0), (0.21, 0), 0.032)]
    for s in (-1, 1):
        limbs += [seg((0.21, s * 0.10), (0.37, s * elbow), 0.028, 0.024),
                  seg((0.37, s * elbow), (0.52, s * hand), 0.024, 0.018),
                  seg((0.52, s * hand), (0.56, s * hand), 0.018, 0.014),
                  seg((0.56, s * 0.062), (0.80, s * knee), 0.05, 0.032),
                  seg((0.80, s * knee), (0.96, s * ankle), 0.032, 0.02),
                  seg((0.96, s * ankle), (0.99, s * (ankle + 0.01)), 0.02, 0.015)]
    dist, radius = tubes(size, limbs)
    np.maximum(soft, np.sqrt(np.clip(1.0 - (dist / radius) ** 2, 0.0, None)), out=soft)
    roi = soft > 0.01

    # Skeleton uptake.
    bone = np.zeros_like(soft)
    joint = u(1.0, 1.6)  # growth plates / degenerative joints take up more tracer
    head_y, head_x = at(0.065, 0)
    ellipsoid(bone, head_y, head_x, rad(0.062), rad(0.05), 1.0)
    ellipsoid(bone, head_y + rad(0.004), head_x, rad(0.055), rad(0.044), -0.85)
    ellipsoid(bone, *at(0.118, 0), rad(0.02), rad(0.034), 0.35)  # mandible / face
    axial = []  # candidate centres for metastases
    for k in range(18):
        y = 0.195 + k * 0.0185
        ellipsoid(bone, *at(y, 0), rad(0.0078), rad(0.011 + 0.0003 * k), 1.0)
        axial.append(at(y, 0))
    ellipsoid(bone, *at(0.535, 0), rad(0.03), rad(0.026), 0.9)  # sacrum
    axial.append(at(0.53, 0))
    for s in (-1, 1):
        ellipsoid(bone, *at(0.515, s * 0.068), rad(0.045), rad(0.05), 0.9, angle=s * 0.4)
        ellipsoid(bone, *at(0.52, s * 0.07), rad(0.036), rad(0.04), -0.7, angle=s * 0.4)
        ellipsoid(bone, *at(0.60, s * 0.035), rad(0.022), rad(0.026), 0.7)  # pubis ring
        ellipsoid(bone, *at(0.60, s * 0.035), rad(0.015), rad(0.018), -0.55)
        ellipsoid(bone, *at(0.575, s * 0.078), rad(0.015), rad(0.015), joint)  # hips
        ellipsoid(bone, *at(0.205, s * 0.10), rad(0.014), rad(0.014), joint)  # shoulders
        ellipsoid(bone, *at(0.25, s * 0.075), rad(0.05), rad(0.035), 0.25)  # scapulae
        ellipsoid(bone, *at(0.805, s * knee), rad(0.015), rad(0.02), joint)  # knees
        ellipsoid(bone, *at(0.37, s * elbow), rad(0.01), rad(0.012), 0.8 * joint)  # elbows
        ellipsoid(bone, *at(0.535, s * hand), rad(0.02), rad(0.012), 0.7)  # hands
        ellipsoid(bone, *at(0.975, s * (ankle + 0.005)), rad(0.012), rad(0.02), 0.8)  # feet
        axial += [at(0.51, s * 0.07), at(0.49, s * 0.09), at(0.59, s * 0.09)]

    long_bones = [seg((0.14, 0), (0.19, 0), 0.009), seg((0.205, 0), (0.30, 0), 0.008)]
    t = np.linspace(0, 1, 40)
    for s in (-1, 1):
        long_bones += [seg((0.20, s * 0.012), (0.19, s * 0.088), 0.0065),  # clavicle
                       seg((0.21, s * 0.10), (0.365, s * elbow), 0.009),  # humerus
                       seg((0.375, s * (elbow - 0.006)), (0.52, s * (hand - 0.006)), 0.005),
                       seg((0.375, s * (elbow + 0.006)), (0.52, s * (hand + 0.006)), 0.005),
                       seg((0.58, s * 0.085), (0.795, s * knee), 0.012),  # femur
                       seg((0.82, s * knee), (0.965, s * ankle), 0.0095),  # tibia
                       seg((0.82, s * (knee + 0.016)), (0.955, s * (ankle + 0.014)), 0.004)]
        for i in range(10):
            y0 = 0.215 + i * 0.022
            reach = 0.06 + 0.035 * np.sin(np.pi * min((i + 2) / 12, 0.5))
            ry = top + (y0 - 0.012 * np.sin(np.pi * t) + 0.045 * t**2) * height
            rx = mid + s * (0.012 + reach * t) * height * wide
            long_bones.append(curve(ry, rx, rad(0.0045)))
            axial += [(ry[k], rx[k]) for k in (12, 24, 36)]
    dist, radius = tubes(size, long_bones)
    bone += 65.0 * shell(dist, radius, inner=0.6, marrow=0.4)
    bone = np.clip(bone, 0.0, None) * u(0.8, 1.2)

    organs = np.zeros_like(soft)
    for s in (-1, 1):
        ellipsoid(organs, *at(0.425, s * 0.048), rad(0.028), rad(0.016), u(0.2, 0.6),
                  angle=-s * 0.25)
    ellipsoid(organs, *at(0.585, 0), rad(0.02), rad(0.028) * u(0.8, 1.3), u(1.5, 4.0))

    finding = np.zeros_like(roi)
    hot = np.zeros_like(soft)
    if positive:
        gy = (np.arange(size, dtype=np.float32)[:, None] + 0.5) / size
        gx = (np.arange(size, dtype=np.float32)[None, :] + 0.5) / size
        for k in rng.choice(len(axial), size=rng.integers(1, 5), replace=False):
            cy, cx = axial[k]
            sigma = rad(u(0.006, 0.012)) * finding_scale
            r2 = (gy - cy) ** 2 + (gx - cx) ** 2
            hot += u(1.0, 2.2) * np.exp(-r2 / (2 * sigma**2))
            finding |= r2 <= max(1.7 * sigma, 1.5 / size) ** 2
        finding &= roi

    background = 0.12 * soft * (1.0 + 0.15 * smooth_noise(size, 0.05, rng))
    ideal = background + bone * roi + organs + hot
    ideal = ndimage.gaussian_filter(ideal, 0.4).astype(np.float32)  # finite resolution
    return Phantom(ideal=np.clip(ideal, 0.0, None), roi=roi, finding=finding, modality="bonescan")
