#!/usr/bin/env bash
# One prepared GPU check (issue "One training core, GPU-correct"), under 8 minutes on one
# GPU. Prints one table: step, seconds, exit status, the result line of each step.
#
#   1. the test suite's GPU-marked tests (pytest -m gpu: tests/test_device.py)
#   2. the reference CycleGAN training step, fp32 vs bf16 (bench_train_cyclegan.py)
#   3. apply throughput at 256 and 1024 px (bench_apply.py)
#   4. DDIB at 20 DDIM steps, SSIM and seconds per image (bench_diffusion_steps.py)
#   5. a 3-node federated simulation with GPU shares (harmonize federated)
#
# Usage on a GPU machine, from the repository root:
#   eval/bench/gpu_check.sh [OUT]            (OUT default: eval_out/gpu_check)
# On the lent device machine, which has PyTorch but not this project's other packages,
# first put their wheels in .whl/ here (eval/bench/gpu_wheels.sh) and carry .whl; the
# script installs them into /tmp/site when it finds .whl/.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-${OUT:-eval_out/gpu_check}}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

TABLE="$OUT/table.tsv"
printf 'step\tseconds\tstatus\tresult\n' > "$TABLE"
step() {  # step NAME LIMIT_S PATTERN COMMAND...: run, time, keep the result line
  local name=$1 limit=$2 pattern=$3; shift 3
  local log="$OUT/$name.log" start=$SECONDS
  timeout "$limit" "$@" > "$log" 2>&1
  local rc=$?
  local result
  result=$(grep -E "$pattern" "$log" | tail -n 3 | tr '\n' ' ' | cut -c1-220)
  printf '%s\t%s\t%s\t%s\n' "$name" $((SECONDS - start)) "$rc" "$result" >> "$TABLE"
  echo "== $name: rc $rc, $((SECONDS - start)) s"
}

step gpu_tests 150 "passed|failed|error" \
  "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_device.py
step train_cyclegan_fp32_vs_bf16 120 "bf16 / fp32|s/step|step" \
  "$PY" eval/bench/bench_train_cyclegan.py --out "$OUT" --timed-steps 20 --curve-steps 0
step apply_256_1024 90 "images/s|bf16|share|px" \
  "$PY" eval/bench/bench_apply.py --out "$OUT" --images 64 --sides 256 1024
step ddib_20_steps 120 "ddib 20 steps|sdedit 20 steps" \
  "$PY" eval/bench/bench_diffusion_steps.py --out "$OUT" --per-site 24 --images 8 \
  --train-steps 200
"$PY" -m harmonize.cli synth "$OUT/fed_data" --sites 3 --per-site 24 --size 64 -q > /dev/null 2>&1
step federated_3_nodes_gpu_share 90 "AUC|round|wrote|saved" \
  "$PY" -m harmonize.cli federated --config configs/federated/classifier-quick.yaml \
  --data "$OUT/fed_data/manifest.csv" --reference-site site_a --out "$OUT/federated" \
  --set rounds=3 --set parallel_nodes=3

echo
column -t -s $'\t' "$TABLE" 2>/dev/null || cat "$TABLE"
