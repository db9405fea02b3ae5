"""Shared fixtures: the real two-site chest X-ray set, pydicom's bundled DICOMs, and a
small synthetic federation."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from pydicom.data import get_testdata_file

TB_CXR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tb_cxr_2site"


@pytest.fixture(scope="module")
def synth3(tmp_path_factory) -> Path:
    """3 synthetic sites x 16 patients at 32 px, balanced labels (federated tests)."""
    from harmonize.synth import generate

    out = tmp_path_factory.mktemp("synth3") / "synth"
    generate(out, sites=3, per_site=16, size=32, seed=0, progress=False,
             prevalence=[0.5, 0.5, 0.5], finding_scale=2.5)
    return out


@pytest.fixture(scope="session")
def tb_cxr() -> Path:
    if not (TB_CXR / "manifest.csv").is_file():
        pytest.skip(f"real data not found at {TB_CXR} (../shared/data/tb_cxr_2site)")
    return TB_CXR


def dicom_file(name: str) -> Path:
    """A DICOM file that ships inside pydicom (never downloaded)."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not bundled")
    return Path(path)


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """Real bone-scan DICOMs (JPEG extended, 12-bit, one with a broken scan header),
    a 16-bit PNG, a 12-bit TIFF, an int16 NIfTI with spacing, and a real chest X-ray."""
    root = tmp_path / "in"
    (root / "nm").mkdir(parents=True)
    for name in ("JPGExtended.dcm", "JPEG-lossy.dcm"):
        shutil.copy(dicom_file(name), root / "nm" / name)
    rng = np.random.default_rng(0)
    png = sitk.GetImageFromArray(rng.integers(0, 65535, (64, 48)).astype(np.uint16))
    png.SetSpacing((0.15, 0.15))
    sitk.WriteImage(png, str(root / "x16.png"))
    tifffile.imwrite(root / "x12.tif", rng.integers(0, 4096, (50, 70)).astype(np.uint16))
    nii = sitk.GetImageFromArray(rng.integers(-1000, 3000, (1, 40, 30)).astype(np.int16))
    nii.SetSpacing((0.7, 0.6, 2.5))
    sitk.WriteImage(nii, str(root / "vol.nii.gz"))
    if (TB_CXR / "shenzhen").is_dir():
        src = sorted((TB_CXR / "shenzhen" / "tb").glob("*.png"))[0]
        shutil.copy(src, root / "cxr.png")
    return root


@pytest.fixture(scope="session")
def two_sites(tb_cxr):
    """16 + 16 real chest X-rays in model space with their site: (image, site) pairs."""
    import pandas as pd

    from harmonize.data.intensity import IntensityPolicy
    from harmonize.data.io import read_image

    df = pd.read_csv(tb_cxr / "manifest.csv")
    policy = IntensityPolicy()
    picked = pd.concat([g.head(16) for _, g in df.groupby("site")])
    return [(policy.to_model(read_image(tb_cxr / p))[0], s)
            for p, s in zip(picked["path"], picked["site"], strict=True)]


def assert_same_run(a, b, atol: float = 1e-4) -> None:
    """Two runs of the same seeded computation: bit-exact on the CPU; on a GPU within
    `atol` (cuDNN may pick other reduction orders from run to run)."""
    import torch

    a, b = (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            for x in (a, b))
    if torch.cuda.is_available():
        np.testing.assert_allclose(a, b, atol=atol)
    else:
        np.testing.assert_array_equal(a, b)

