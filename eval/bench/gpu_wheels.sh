#!/usr/bin/env bash
# Wheels of this project's packages that the lent GPU machine lacks (it has PyTorch,
# accelerate, numpy, scipy, pandas, scikit-learn, matplotlib, safetensors, tqdm, pyyaml,
# torchmetrics), for Python 3.12 x86-64, into .whl/ (git-ignored), for
# eval/bench/gpu_check.sh. Run here, where PyPI is reachable.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl \
  diffusers pydantic pydantic-core annotated-types typing-inspection SimpleITK pydicom \
  monai flwr ray tomli tomli-w cryptography pycryptodome iterators typer rich \
  click pathspec grpcio-health-checking opacus pylibjpeg pylibjpeg-libjpeg pyradiomics-bhklab
du -sh .whl
