#!/usr/bin/env bash
# Checks `--device cuda` on a machine with an NVIDIA GPU and the CUDA toolkit (run by hand; CI
# has no GPU). Builds with the `cuda` feature, then:
#   1. explains the three golden cases on the GPU and on the CPU and prints the largest
#      difference between the two saliency maps (sigma 0, so both are deterministic);
#   2. times ViT-B/16 with random weights on the GPU (`vitcx bench --json`, f32 and bf16).
# CUDA_COMPUTE_CAP picks the PTX target of candle's kernels (e.g. 80 for A100, 90 for H100/H200;
# CUDA 11 has no 90a, so use 80 there).
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
cargo build --release --features cuda
bin=target/release/vitcx
out=$(mktemp -d)
for case in vit_timm deit_distilled_timm vit_hf; do
  for dev in cpu cuda; do
    "$bin" --device "$dev" explain "tests/data/$case/image_224.png" --model "tests/data/$case" \
      --noise-std 0 --no-overlay -q --out "$out/$case-$dev"
  done
  python3 - "$out/$case-cpu/image_224.saliency.npy" "$out/$case-cuda/image_224.saliency.npy" "$case" <<'EOF'
import sys
import numpy as np
a, b = np.load(sys.argv[1]), np.load(sys.argv[2])
r = float(a.max() - a.min())
print(f"{sys.argv[3]}: cuda vs cpu max diff {float(np.abs(a - b).max()):.3e} (range {r:.3e})")
EOF
done
"$bin" --device cuda bench --batch 32 --json
