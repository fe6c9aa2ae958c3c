#!/usr/bin/env bash
# Trains the demo ViT on a lent GPU machine: run by hand through the device tool, never by CI.
# The device machine has no Rust: send a release build of vitcx as .devbin/vitcx.xz (ignored by
# git; `xz -9c target/release/vitcx > .devbin/vitcx.xz`, carry: [".devbin"]). It needs PyTorch,
# timm and safetensors there. It writes a pool of generated training images with `vitcx synth`
# (POOL processes x PER images, seeds 1000..), 2,000 validation images (seed 778), trains with
# scripts/probe_gpu.py for BUDGET seconds (token labelling, lr 1e-3, batch 128, cosine decay) and
# saves a timm checkpoint to $OUT/demo. Back here, measure it as the demo model is measured and
# install it:
#   cargo run --release --example train_demo -- --evaluate DIR   # 1,000 held-out images, candle
#   cp DIR/model.safetensors DIR/config.json models/demo/
set -euo pipefail
POOL=${POOL:-16}
PER=${PER:-8000}
BUDGET=${BUDGET:-420}
BIN=/tmp/vitcx-dev
DATA=/tmp/vitcx-demo-data
rm -rf "$DATA"
xz -dc .devbin/vitcx.xz > "$BIN"
chmod +x "$BIN"
for i in $(seq 0 $((POOL - 1))); do
  "$BIN" synth --count "$PER" --seed $((1000 + i)) --out "$DATA/tr$i" -q &
done
"$BIN" synth --count 2000 --seed 778 --out "$DATA/val" -q
wait
python3 scripts/probe_gpu.py train="$DATA/tr*" val="$DATA/val" seconds="$BUDGET" every=2000 decay=1 \
  runs=final:1:1e-3:128 save="${OUT:-/tmp}/demo"
