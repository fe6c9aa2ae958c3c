#!/usr/bin/env python3
"""Times a whole ViT-CX explanation by the ORIGINAL reference code (Xie et al., IJCAI 2023,
https://github.com/vaynexie/CausalX-ViT, CC0) and by vitcx, side by side on the same random-weight
checkpoint, image and thread count, and prints both times, N and the correlation of the maps.

The reference is not part of this repository: fetch it yourself and give its folder (the one
holding ViT_CX/) with --reference or VITCX_REFERENCE. Run by hand (CI never runs it), after
`cargo build --release`:

    VITCX_REFERENCE=/tmp/cxref python scripts/bench_reference.py --vitcx target/release/vitcx
    python scripts/bench_reference.py --reference /tmp/cxref --noise 0 --repeats 3
    python scripts/bench_reference.py --reference /tmp/cxref --precision int8

Each repeat runs the reference, then vitcx (interleaved, so that a change in the machine's load
touches both); the script prints every pair, the medians and the ratio reference / vitcx, both
for the explanation alone (the reference's ViT_CX() call; vitcx's `seconds.total` in its JSON,
image decoding included) and for the whole vitcx process (model loading included).

The reference runs on the CPU in float32 with `.cuda()` made a no-op, as scripts/make_golden.py
runs it; with --noise 0.1 it draws its own noise (torch.randn, as it always does), so the two maps
differ by their noise draws and their correlation is below 1; with --noise 0 its noise is zeros
and the maps agree to float rounding. The image is prepared as in its Usage_Example.ipynb (cv2
bilinear resize to 224, ImageNet mean/std) and saved as a 224x224 PNG that vitcx reads, so both
see the same pixels (JPEG decoders differ by a grey level here and there).
"""

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_golden import (  # noqa: E402
    GPU_BATCH, THRESHOLD, Reference, load_timm, read_resized, reshape_for, to_input, write_timm)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, ".."))


@contextlib.contextmanager
def on_cpu():
    """The reference calls .cuda() throughout; on a CPU machine those return self."""
    t_cuda, m_cuda = torch.Tensor.cuda, torch.nn.Module.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = t_cuda, m_cuda


def run_reference(ref, model, layer, image, reshape, noise):
    """One ViT_CX() call, timed; returns (seconds, saliency, N)."""
    if noise == 0:
        out = ref.run(model, image, layer, reshape, noise=None)
        return out["seconds"], out["saliency"], int(out["masks"].shape[0])
    if noise != 0.1:
        sys.exit("the reference's noise is fixed at 0.1 (causal_score.py); use --noise 0.1 or 0")
    ref.capture.clear()
    with on_cpu():
        t0 = time.perf_counter()
        sal = ref.mod.ViT_CX(model, image, layer, target_category=None,
                             distance_threshold=THRESHOLD, gpu_batch=GPU_BATCH,
                             reshape_function=reshape)
        seconds = time.perf_counter() - t0
    return seconds, np.asarray(sal, dtype=np.float32), int(ref.capture["masks"].shape[0])


def run_vitcx(binary, ckpt, image_path, noise, threads, out, precision):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    cmd = [binary, "explain", image_path, "--model", ckpt, "--noise-std", str(noise),
           "--batch", str(GPU_BATCH), "--precision", precision, "--out", out, "--no-overlay",
           "--quiet"]
    # A fresh folder each time: in one that holds this image's results vitcx would resume, not
    # explain.
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    process = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"vitcx failed: {p.stderr.strip()}")
    stem = os.path.splitext(os.path.basename(image_path))[0]
    report = json.load(open(os.path.join(out, stem + ".json")))
    sal = np.load(os.path.join(out, stem + ".saliency.npy"))
    return report["seconds"]["total"], process, sal, int(report["n_masks"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", default=os.environ.get("VITCX_REFERENCE"),
                    help="the reference's folder (holding ViT_CX/); default $VITCX_REFERENCE")
    ap.add_argument("--vitcx", default=os.path.join(ROOT, "target", "release", "vitcx"))
    ap.add_argument("--arch", default="vit_base_patch16_224")
    ap.add_argument("--image", default=os.path.join(ROOT, "tests", "data", "images", "goldfish.jpg"))
    ap.add_argument("--noise", type=float, default=0.1, choices=[0.0, 0.1])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="f32", choices=["f32", "bf16", "int8", "int16"],
                    help="vitcx's perturbed passes (the reference is always float32)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    ap.add_argument("--json", action="store_true", help="print one JSON object at the end")
    a = ap.parse_args()
    if not a.reference:
        sys.exit("give the reference's folder with --reference or VITCX_REFERENCE")
    if not os.path.isfile(a.vitcx):
        sys.exit(f"no vitcx binary at {a.vitcx}; run `cargo build --release` or pass --vitcx")
    torch.set_num_threads(a.threads)
    ref = Reference(a.reference)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "model")
        os.makedirs(ckpt)
        write_timm(ckpt, a.seed, a.arch, {})
        model, layer, info = load_timm(ckpt)
        # Both read the same 224x224 PNG: JPEG decoders differ by a grey level here and there,
        # enough to move a merge height across the threshold on random weights.
        from PIL import Image
        rgb = read_resized(a.image)
        png = os.path.join(tmp, "image_224.png")
        Image.fromarray(rgb).save(png)
        image = to_input(rgb, info["mean"], info["std"])
        reshape = reshape_for(info["prefix"], *info["grid"])
        out = os.path.join(tmp, "out")
        rows = []
        for k in range(a.repeats):
            r_s, r_map, r_n = run_reference(ref, model, layer, image, reshape, a.noise)
            v_s, v_proc, v_map, v_n = run_vitcx(a.vitcx, ckpt, png, a.noise, a.threads, out,
                                               a.precision)
            r = float(np.corrcoef(r_map.ravel(), v_map.ravel())[0, 1])
            load = os.getloadavg()[0]
            rows.append((r_s, v_s, v_proc, r_n, v_n, r, load))
            print(f"repeat {k + 1}: reference {r_s:.2f} s (N={r_n}), vitcx {v_s:.2f} s "
                  f"({v_proc:.2f} s process, N={v_n}), map Pearson {r:.6f}, load {load:.2f}",
                  flush=True)

    med = lambda i: statistics.median(row[i] for row in rows)  # noqa: E731
    result = {
        "arch": a.arch, "noise": a.noise, "threads": a.threads, "repeats": a.repeats,
        "precision": a.precision,
        "torch": torch.__version__,
        "reference_s": med(0), "vitcx_s": med(1), "vitcx_process_s": med(2),
        "n_reference": rows[-1][3], "n_vitcx": rows[-1][4],
        "speedup": med(0) / med(1), "speedup_process": med(0) / med(2),
        "pearson": min(row[5] for row in rows),
        "load": [row[6] for row in rows],
    }
    print(f"median: reference {result['reference_s']:.2f} s, vitcx {result['vitcx_s']:.2f} s "
          f"({result['vitcx_process_s']:.2f} s process): {result['speedup']:.2f}x "
          f"({result['speedup_process']:.2f}x by process); N {result['n_reference']} vs "
          f"{result['n_vitcx']}; lowest map Pearson {result['pearson']:.6f}")
    if a.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
