#!/usr/bin/env python3
"""Writes tests/data/vit_timm/eval/: an independent PyTorch reference of vitcx's evaluation
metrics (src/eval/metrics.rs) on the golden `vit_timm` checkpoint, so that they can be checked number
for number: deletion and insertion curves with their AUC (Petsiuk et al., "RISE", BMVC 2018;
eclique/RISE evaluation.py, CausalMetric), the pointing game (Zhang et al. 2016) and the
energy-based pointing game (Wang et al., "Score-CAM", 2020).

Run by hand (never by CI; the generated files are committed), from the repository root, with a
virtual environment outside the repository:

    python3 -m venv /tmp/fixenv
    /tmp/fixenv/bin/pip install torch timm safetensors numpy pillow
    /tmp/fixenv/bin/python scripts/make_eval_fixtures.py            # about 10 s on 2 threads
    /tmp/fixenv/bin/python scripts/make_eval_fixtures.py --check    # compute, write nothing
    md5sum tests/data/vit_timm/eval/*.npy                              # rerun: same sums

It reads (never writes) tests/data/vit_timm/{config.json, model.safetensors, input.npy,
probs.npy, manifest.json, saliency_sigma0.npy} and checks that the loaded model reproduces
probs.npy (max abs diff <= 1e-5), that manifest.json's `target` is the argmax of probs.npy, and
the self-checks listed below, before writing anything. The model: timm, eval mode, float32, CPU,
`torch.set_num_threads(2)`, explicit attention softmax (as make_method_fixtures.py), batches of
32 images.

Files written in tests/data/vit_timm/eval/ (float32 little-endian; k = manifest target = 2):

    object_mask.png          224x224 8-bit grey, 0 / 255: two hand-chosen rectangles, one holding
                             some (not all) of the tied saliency maxima -> pointing game TRUE
    off_mask.png             224x224 8-bit grey, 0 / 255: two rectangles, one just below the
                             maxima, none holding a maximum -> pointing game FALSE
    deletion.npy             (225,) p_k after deleting, step 224, deletion baseline zero
    insertion.npy            (225,) p_k after inserting, step 224, insertion baseline blur(11, 5)
    deletion_step6277.npy    (9,)   as deletion.npy with step 224*28+5 = 6277 (partial last step)
    insertion_step6277.npy   (9,)   as insertion.npy with step 6277
    metrics.json             settings, AUCs, pointing games, x grids, checks, versions

The protocol (written from this description, not from the Rust code; vitcx's departures from
RISE are marked *):

  * Saliency S = saliency_sigma0.npy (224, 224); image X = input.npy (3, 224, 224), already
    normalised; HW = 224*224 = 50176.
  * Ranking: most salient first, ties by lower row-major index*
    (order = np.argsort(-S.ravel(), kind="stable"); RISE's np.flip(np.argsort(S)) breaks ties by
    higher index). S has exact ties (43857 distinct values; the maximum is tied over 8 pixels),
    so the tie rule matters here. (Not an issue for this S, which is positive everywhere: numpy
    treats -0.0 == 0.0, Rust's total_cmp puts 0.0 before -0.0.)
  * step pixels change per step; n_steps = ceil(HW / step); points k = 0..n_steps; point k has
    the first min(k*step, HW) ranked pixels from END and the others from START, all 3 channels
    of a pixel together. Built as RISE does, incrementally (copy order[k*step:(k+1)*step] from
    END into a running image; the slice is shorter on a partial last step), and checked bit for
    bit against the closed form where(rank < min(k*step, HW), END, START).
  * Deletion: START = X, END = deletion baseline. Insertion: START = insertion baseline, END = X.
  * Zero baseline: all zeros in normalised space (the dataset mean).
  * Blur baseline*: per channel, in normalised space, separable Gaussian of 11 taps, sigma 5,
    w_i = exp(-(i-5)^2 / (2 sigma^2)) normalised to sum 1 in float64, stored float32; borders
    padded by reflection without repeating the edge pixel (torch's F.pad mode="reflect", numpy's
    "reflect": d c b | a b c d | c b a); horizontal pass first, then vertical; float32 conv2d.
    (RISE pads with zeros.) Checked against a float64 numpy version (max abs diff in metrics.json).
  * y_k = softmax(model(image_k))[k_class], float32.
  * x_k = min(k*step, HW) / HW*; AUC = sum_k (x_{k+1} - x_k) (y_k + y_{k+1}) / 2 in float64
    (np.trapezoid; RISE's auc() assumes equal widths, identical when step divides HW, as 224
    does: both are recorded).
  * Pointing game: true iff some pixel with the maximal saliency (NaN ignored) has mask != 0.
  * Energy pointing game: sum of max(S, 0) inside the mask / sum of max(S, 0), float64; 0 if
    there is no positive mass.

Deterministic (no randomness at all): re-running on the same versions and machine rewrites
byte-identical .npy files (checked with md5sum). The PNGs are written by Pillow (zlib), so their
bytes may depend on its version, but not their pixels.
"""

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import sys

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CASE = "vit_timm"
DATA = os.path.join(ROOT, "tests", "data", CASE)
OUT = os.path.join(DATA, "eval")

SIZE = 224
HW = SIZE * SIZE
BATCH = 32
THREADS = 2
BLUR_KERNEL, BLUR_SIGMA = 11, 5.0
ZERO = {"kind": "zero"}
BLUR = {"kind": "blur", "kernel": BLUR_KERNEL, "sigma": BLUR_SIGMA}
# (name, step, deletion baseline, insertion baseline, deletion file, insertion file)
SETTINGS = [
    ("default", 224, ZERO, BLUR, "deletion.npy", "insertion.npy"),
    ("step6277", 224 * 28 + 5, ZERO, BLUR, "deletion_step6277.npy", "insertion_step6277.npy"),
]
# Rectangles [y0, y1) x [x0, x1), rows then columns, end exclusive. The saliency maximum of
# saliency_sigma0.npy is tied over the 8 pixels (y, 56), y = 0..7.
OBJECT_RECTS = [
    [4, 68, 32, 96],  # holds (4..7, 56): 4 of the 8 tied maxima -> pointing game true
    [104, 152, 80, 160],  # a second high region, mid image
]
OFF_RECTS = [
    [8, 72, 40, 104],  # just below the maxima (starts at row 8): no maximum inside -> false
    [176, 224, 176, 224],  # bottom-right corner
]


# ---------------------------------------------------------------- model


def load_model():
    import timm
    from safetensors.torch import load_file

    with open(os.path.join(DATA, "config.json")) as f:
        cfg = json.load(f)
    timm.layers.set_fused_attn(False)
    model = timm.create_model(cfg["architecture"], pretrained=False, **cfg.get("model_args", {}))
    model.load_state_dict(load_file(os.path.join(DATA, "model.safetensors")), strict=True)
    model = model.float().eval()
    for blk in model.blocks:
        blk.attn.fused_attn = False
    return model


def class_probs(model, images, cls):
    """softmax(model(images))[:, cls] for (N, 3, H, W) float32, N at most BATCH at a time."""
    out = []
    with torch.no_grad():
        for i in range(0, images.shape[0], BATCH):
            out.append(torch.softmax(model(images[i:i + BATCH]), dim=1)[:, cls])
    return torch.cat(out).numpy().astype(np.float32)


# ---------------------------------------------------------------- baselines


def gaussian_weights(klen, sigma):
    i = np.arange(klen, dtype=np.float64)
    w = np.exp(-((i - klen // 2) ** 2) / (2.0 * sigma * sigma))
    return (w / w.sum()).astype(np.float32)


def blur_torch(img, klen=BLUR_KERNEL, sigma=BLUR_SIGMA):
    """(3, H, W) float32 -> (3, H, W): depthwise separable conv, reflect padding, rows first."""
    w = torch.from_numpy(gaussian_weights(klen, sigma))
    r = klen // 2
    x = img[None]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), w.view(1, 1, 1, klen).repeat(3, 1, 1, 1),
                 groups=3)  # horizontal
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), w.view(1, 1, klen, 1).repeat(3, 1, 1, 1),
                 groups=3)  # vertical
    return x[0].contiguous()


def blur_numpy64(img, klen=BLUR_KERNEL, sigma=BLUR_SIGMA):
    """The same blur in float64 with numpy's reflect padding, for checking."""
    w = gaussian_weights(klen, sigma).astype(np.float64)
    r = klen // 2
    x = img.astype(np.float64)
    p = np.pad(x, ((0, 0), (0, 0), (r, r)), mode="reflect")
    x = sum(w[j] * p[:, :, j:j + x.shape[2]] for j in range(klen))
    p = np.pad(x, ((0, 0), (r, r), (0, 0)), mode="reflect")
    return sum(w[j] * p[:, j:j + x.shape[1], :] for j in range(klen))


def substrate(spec, img):
    if spec["kind"] == "zero":
        return torch.zeros_like(img)
    return blur_torch(img, spec["kernel"], spec["sigma"])


# ---------------------------------------------------------------- causal metric


class CausalMetric:
    """RISE's CausalMetric (mode 'del' or 'ins') for one image, with vitcx's ranking, x grid and
    AUC; the perturbed images are sent through the model BATCH at a time."""

    def __init__(self, model, mode, step, baseline):
        assert mode in ("del", "ins")
        self.model, self.mode, self.step, self.baseline = model, mode, step, baseline

    def single_run(self, img, explanation, cls):
        """img (3, H, W) float32 tensor, explanation (H, W) numpy -> dict(probs, x, auc, ...)."""
        _, h, w = img.shape
        hw = h * w
        n_steps = (hw + self.step - 1) // self.step
        base = substrate(self.baseline, img)
        start, finish = (img.clone(), base) if self.mode == "del" else (base, img.clone())
        order = np.argsort(-explanation.reshape(-1), kind="stable")
        rank = np.empty(hw, dtype=np.int64)
        rank[order] = np.arange(hw)
        rank = torch.from_numpy(rank)
        changed = np.minimum(np.arange(n_steps + 1) * self.step, hw)

        cur = start.clone().view(3, hw)
        fin = finish.view(3, hw)
        s0, f0 = start.view(3, hw), finish.view(3, hw)
        probs, pending, closed_form_ok = [], [], True
        for i in range(n_steps + 1):
            # independent check of the incremental construction: the closed form
            ref = torch.where(rank[None] < int(changed[i]), f0, s0)
            closed_form_ok &= bool(torch.equal(cur, ref))
            pending.append(cur.clone().view(3, h, w))
            if len(pending) == BATCH or i == n_steps:
                probs.append(class_probs(self.model, torch.stack(pending), cls))
                pending = []
            if i < n_steps:
                coords = torch.from_numpy(order[self.step * i:self.step * (i + 1)])
                cur[:, coords] = fin[:, coords]
        probs = np.concatenate(probs)
        x = changed.astype(np.float64) / hw
        return {
            "probs": probs,
            "x": x,
            "n_steps": n_steps,
            "auc": float(np.trapezoid(probs.astype(np.float64), x)),
            "auc_by_hand": float(sum((x[j + 1] - x[j]) * (float(probs[j]) + float(probs[j + 1])) / 2
                                     for j in range(n_steps))),
            "rise_auc": float(rise_auc(probs.astype(np.float64))),
            "closed_form_ok": closed_form_ok,
            "start": start,
            "finish": finish,
        }


def rise_auc(arr):
    """eclique/RISE evaluation.py auc(): equal widths."""
    return (arr.sum() - arr[0] / 2 - arr[-1] / 2) / (arr.shape[0] - 1)


# ---------------------------------------------------------------- pointing games


def pointing_game(sal, mask):
    m = np.nanmax(sal)
    return bool(np.any((sal == m) & (mask != 0)))


def energy_pointing_game(sal, mask):
    pos = np.where(sal > 0, sal, 0).astype(np.float64)
    total = pos.sum()
    return float(pos[mask != 0].sum() / total) if total > 0 else 0.0


def rect_mask(rects):
    m = np.zeros((SIZE, SIZE), dtype=np.uint8)
    for y0, y1, x0, x1 in rects:
        m[y0:y1, x0:x1] = 255
    return m


# ---------------------------------------------------------------- main


def versions():
    import PIL
    import safetensors
    import timm

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }


def md5(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def save_npy(name, arr):
    arr = np.ascontiguousarray(arr, dtype=np.dtype(np.float32).newbyteorder("<"))
    np.save(os.path.join(OUT, name), arr)


def save_png(name, mask):
    from PIL import Image

    path = os.path.join(OUT, name)
    Image.fromarray(mask).save(path, optimize=False)
    back = np.asarray(Image.open(path))
    assert back.dtype == np.uint8 and back.shape == mask.shape and np.array_equal(back, mask), name


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compute and check, write nothing")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)  # nothing random is used; set for safety

    model = load_model()
    x_np = np.load(os.path.join(DATA, "input.npy")).astype(np.float32)
    sal = np.load(os.path.join(DATA, "saliency_sigma0.npy")).astype(np.float32)
    ref = np.load(os.path.join(DATA, "probs.npy"))
    with open(os.path.join(DATA, "manifest.json")) as f:
        cls = int(json.load(f)["target"])
    assert x_np.shape == (3, SIZE, SIZE) and sal.shape == (SIZE, SIZE)
    assert np.all(np.isfinite(sal))
    x = torch.from_numpy(x_np)

    with torch.no_grad():
        probs = torch.softmax(model(x[None]), dim=-1)[0].numpy()
    err = float(np.abs(probs - ref).max())
    if err > 1e-5:
        sys.exit(f"{CASE}: model does not reproduce probs.npy (max abs diff {err:.2e})")
    if cls != int(np.argmax(ref)) or cls != int(np.argmax(probs)):
        sys.exit(f"{CASE}: manifest target {cls} is not the argmax of probs.npy")

    checks = {"probs_max_abs_diff": err}
    problems = []

    # blur baseline: torch float32 vs numpy float64
    blurred = blur_torch(x)
    b64 = blur_numpy64(x_np)
    checks["blur_torch_vs_float64_max_abs_diff"] = float(np.abs(blurred.numpy() - b64).max())
    if checks["blur_torch_vs_float64_max_abs_diff"] > 1e-5:
        problems.append("blur disagrees with its float64 version")
    ones = blur_torch(torch.ones(3, SIZE, SIZE))
    checks["blur_of_ones_max_abs_dev"] = float((ones - 1).abs().max())

    # the curves
    results = {}
    single = lambda img: float(class_probs(model, img[None], cls)[0])  # noqa: E731
    p_clean = single(x)
    for name, step, del_base, ins_base, del_file, ins_file in SETTINGS:
        d = CausalMetric(model, "del", step, del_base).single_run(x, sal, cls)
        i = CausalMetric(model, "ins", step, ins_base).single_run(x, sal, cls)
        n_points = d["n_steps"] + 1
        for tag, c in (("deletion", d), ("insertion", i)):
            assert c["probs"].shape == (n_points,)
            if not c["closed_form_ok"]:
                problems.append(f"{name} {tag}: incremental images differ from the closed form")
            if abs(c["auc"] - c["auc_by_hand"]) > 1e-12:
                problems.append(f"{name} {tag}: trapezoid AUCs disagree")
        # end points, each image alone (batch 1) vs inside a batch of 32
        ends = {
            "deletion_first_vs_clean": abs(float(d["probs"][0]) - p_clean),
            "deletion_last_vs_baseline": abs(float(d["probs"][-1]) - single(d["finish"])),
            "insertion_first_vs_baseline": abs(float(i["probs"][0]) - single(i["start"])),
            "insertion_last_vs_clean": abs(float(i["probs"][-1]) - p_clean),
        }
        checks[f"{name}_endpoints_max_abs_diff"] = max(ends.values())
        if max(ends.values()) > 1e-5:
            problems.append(f"{name}: end points {ends}")
        results[name] = (step, del_base, ins_base, del_file, ins_file, d, i, n_points)

    # masks
    masks = {"object_mask.png": (OBJECT_RECTS, rect_mask(OBJECT_RECTS)),
             "off_mask.png": (OFF_RECTS, rect_mask(OFF_RECTS))}
    smax = float(np.nanmax(sal))
    at_max = np.argwhere(sal == smax)
    mask_report = {}
    for fname, (rects, m) in masks.items():
        mask_report[fname] = {
            "rectangles_y0_y1_x0_x1": rects,
            "pixels_inside": int((m != 0).sum()),
            "maxima_inside": int(sum(m[yy, xx] != 0 for yy, xx in at_max)),
            "pointing_game": pointing_game(sal, m),
            "energy_pointing_game": energy_pointing_game(sal, m),
        }
    if not mask_report["object_mask.png"]["pointing_game"]:
        problems.append("object mask: pointing game should be true")
    if mask_report["off_mask.png"]["pointing_game"]:
        problems.append("off mask: pointing game should be false")

    if problems:
        sys.exit(f"{CASE}: checks failed, nothing written: {problems}")

    # a few blurred values (corners and edges exercise the reflect padding), for a direct check
    probe = [[c, yy, xx, float(blurred[c, yy, xx])]
             for c in range(3) for yy, xx in [(0, 0), (0, 223), (223, 0), (2, 100), (100, 100)]]

    def curve_json(name):
        step, del_base, ins_base, del_file, ins_file, d, i, n_points = results[name]
        changed = [min(k * step, HW) for k in range(n_points)]
        out = {
            "step": step,
            "deletion_baseline": del_base,
            "insertion_baseline": ins_base,
            "n_steps": n_points - 1,
            "n_points": n_points,
            "last_step_pixels": changed[-1] - changed[-2],
            "x": "x_k = min(k*step, H*W) / (H*W), k = 0..n_points-1, H*W = 50176",
            "deletion_file": del_file,
            "insertion_file": ins_file,
            "deletion_auc": d["auc"],
            "insertion_auc": i["auc"],
            "rise_equal_width_auc": {"deletion": d["rise_auc"], "insertion": i["rise_auc"]},
            "deletion_first_last": [float(d["probs"][0]), float(d["probs"][-1])],
            "insertion_first_last": [float(i["probs"][0]), float(i["probs"][-1])],
        }
        if n_points <= 16:
            out["x_values"] = [c / HW for c in changed]
            out["changed_pixels"] = changed
        return out

    default = curve_json("default")
    meta = {
        "case": CASE,
        "class": cls,
        "class_from": "manifest.json target (= argmax of probs.npy)",
        "clean_prob": p_clean,
        "image": f"tests/data/{CASE}/input.npy (normalised, used as it is)",
        "saliency": f"tests/data/{CASE}/saliency_sigma0.npy",
        "inputs_md5": {f: md5(os.path.join(DATA, f))
                       for f in ["input.npy", "saliency_sigma0.npy", "model.safetensors"]},
        "ranking": "np.argsort(-saliency.ravel(), kind='stable'): most salient first, "
                   "ties by lower row-major index",
        "probability": "softmax(model(image))[class], float32, eval mode, CPU, batches of 32",
        "auc": "sum_k (x_{k+1} - x_k) * (y_k + y_{k+1}) / 2 in float64 over the float32 y_k",
        "batch": BATCH,
        **default,
        "partial_last_step": curve_json("step6277"),
        "saliency_max": {"value": smax, "count": int(len(at_max)),
                         "pixels_y_x": at_max.tolist()},
        "masks": mask_report,
        "mask_format": "224x224 8-bit grey PNG, 255 inside, 0 outside; inside = nonzero",
        "blur_weights": gaussian_weights(BLUR_KERNEL, BLUR_SIGMA).tolist(),
        "blur_probe_c_y_x_value": probe,
        "checks": checks,
        "versions": versions(),
        "threads": THREADS,
        "made_by": "scripts/make_eval_fixtures.py (see its docstring); run from the repository "
                   "root: /tmp/fixenv/bin/python scripts/make_eval_fixtures.py",
    }

    if args.check:
        print(json.dumps(meta, indent=1))
        return
    os.makedirs(OUT, exist_ok=True)
    for fname, (_, m) in masks.items():
        save_png(fname, m)
    for name in results:
        _, _, _, del_file, ins_file, d, i, _ = results[name]
        save_npy(del_file, d["probs"])
        save_npy(ins_file, i["probs"])
    with open(os.path.join(OUT, "metrics.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    summary = {k: meta[k] for k in ("class", "n_points", "deletion_auc", "insertion_auc")}
    summary["step6277"] = {k: meta["partial_last_step"][k]
                           for k in ("n_points", "deletion_auc", "insertion_auc")}
    summary["masks"] = {k: [v["pointing_game"], v["energy_pointing_game"]]
                        for k, v in mask_report.items()}
    summary["checks"] = checks
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
