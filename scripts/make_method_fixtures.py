#!/usr/bin/env python3
"""Writes tests/data/<case>/methods/ for the golden cases: the three original ones (vit_timm,
vit_hf, deit_distilled_timm) and five more (deit3_timm, reg4_dinov2_timm, clip_timm, siglip_timm,
dinov2_hf): the reference outputs of three baseline explanation methods, computed with PyTorch on
the case's own checkpoint and input, so that vitcx's implementations of them can be checked number
for number:

  * Attention Rollout (Abnar & Zuidema 2020; jacobgil/vit-explain, head_fusion="mean", with the
    row renormalisation done correctly), discard ratios 0 and 0.9; only for models with a [CLS]
    token (skipped for siglip_timm, which has none; methods.json says so);
  * Grad-CAM from the pytorch-grad-cam package (target: the last block's first LayerNorm, class
    logit), plus the activations and gradients it is built from;
  * RISE (Petsiuk et al. 2018; eclique/RISE generate_masks + forward), s=8, p1=0.5, N=48, with the
    mask draws stored.

Run by hand (never by CI), from the repository root:

    /tmp/vitcx-fixenv/bin/pip install torch timm transformers safetensors numpy \
        grad-cam scikit-image opencv-python-headless
    /tmp/vitcx-fixenv/bin/python scripts/make_method_fixtures.py             # all eight cases
    /tmp/vitcx-fixenv/bin/python scripts/make_method_fixtures.py --only vit_hf
    /tmp/vitcx-fixenv/bin/python scripts/make_method_fixtures.py --new       # the five new ones

It reads (never writes) tests/data/<case>/{config.json, model.safetensors, input.npy, probs.npy}
and checks that the loaded model reproduces probs.npy before writing anything. Files written in
tests/data/<case>/methods/ (float32 little-endian C order unless said; k = argmax of the clean
softmax, P = number of prefix tokens ([CLS], distillation token, registers), G = the patch grid
side, 14 for patch 16 and 16 for patch 14 at 224 px, T = P + G * G):

    rollout_r0.npy, rollout_r0.9.npy             (224, 224) [CLS] row of the rollout over the patches, / max, bilinear (align_corners=False)
    rollout_matrix_r0.npy                        (T, T)     the full rollout product for r = 0
    gradcam.npy                                  (224, 224) pytorch-grad-cam's GradCAM output
    gradcam_activations.npy                      (D, G, G)  the target layer's patch tokens
    gradcam_gradients.npy                        (D, G, G)  d logit_k / d those tokens
    rise_grids.npy                               (48, 8, 8) the binary grids (0.0 / 1.0)
    rise_shifts.npy                              (48, 2) int64 [row offset, column offset]
    rise_masks_first2.npy                        (2, 224, 224) the first two upsampled masks (original three cases only)
    rise.npy                                     (224, 224) the RISE saliency of class k
    methods.json                                 class, prefix count, settings, package versions

The five new cases leave out the rollout files when the model has no [CLS] token (siglip_timm),
and rise_masks_first2.npy always: the RISE draw is the same in every case (same seed and sizes),
so that file would be a byte-identical 400 kB copy of vit_timm's; the script checks that it is
(and that the grids and shifts equal vit_timm's) instead of writing it. Their methods.json also
gives "grid", "num_tokens", "rollout": null plus "skipped" where rollout is skipped, the Grad-CAM
reshape, and where the first two masks are stored. The original three cases keep their files and
key set exactly as before, so a rerun of them stays byte-identical.

Deterministic: no randomness except RISE's numpy Generator (seed 0); re-running on the same
versions and machine rewrites byte-identical files (checked with md5sum; another CPU can differ
by float32 ulps). About 15 s for the original three, 30 s for the new five, on 2 CPU threads.
See scripts/README.md ("make_method_fixtures.py") for the exact algorithms.
"""

import argparse
import importlib.metadata
import json
import math
import os
import sys

import numpy as np
import torch

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data")
ORIGINAL = ["vit_timm", "vit_hf", "deit_distilled_timm"]
NEW = ["deit3_timm", "reg4_dinov2_timm", "clip_timm", "siglip_timm", "dinov2_hf"]
CASES = ORIGINAL + NEW
SHARED_MASKS = "vit_timm"  # where the new cases' RISE masks 0 and 1 are stored

SIZE = 224
DISCARD_RATIOS = [0.0, 0.9]
RISE_S, RISE_P1, RISE_N, RISE_SEED, RISE_BATCH = 8, 0.5, 48, 0, 16


# ---------------------------------------------------------------- loading


class Loaded:
    """model: a module mapping (B, 3, 224, 224) to logits (B, C); layer: the Grad-CAM target layer;
    layer_path: its name in the checkpoint model's named_modules(); prefix: P (prefix tokens
    before the patches: [CLS], distillation token, registers); grid: G (patch grid side);
    has_cls: whether token 0 is a [CLS] token (rollout needs one); attn(x): list of (1, h, T, T)."""


def check_layer_path(root, path, layer):
    assert dict(root.named_modules()).get(path) is layer, path


def load_timm(d):
    import timm
    from safetensors.torch import load_file

    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    timm.layers.set_fused_attn(False)
    model = timm.create_model(cfg["architecture"], pretrained=False, **cfg.get("model_args", {}))
    model.load_state_dict(load_file(os.path.join(d, "model.safetensors")), strict=True)
    model = model.float().eval()
    for blk in model.blocks:
        blk.attn.fused_attn = False  # explicit softmax, so attn_drop sees the probabilities

    out = Loaded()
    out.model = model
    out.prefix = int(model.num_prefix_tokens)  # [CLS] + distillation token + registers
    out.has_cls = bool(getattr(model, "has_class_token", model.cls_token is not None))
    gh, gw = model.patch_embed.grid_size
    assert gh == gw, (gh, gw)
    out.grid = int(gh)
    out.layer = model.blocks[-1].norm1
    out.layer_path = f"blocks.{len(model.blocks) - 1}.norm1"
    check_layer_path(model, out.layer_path, out.layer)

    def attn(x):
        caught = []
        hooks = [
            blk.attn.attn_drop.register_forward_pre_hook(
                lambda _m, inp: caught.append(inp[0].detach().clone()))
            for blk in model.blocks
        ]
        try:
            with torch.no_grad():
                model(x)
        finally:
            for h in hooks:
                h.remove()
        return caught

    out.attn = attn
    return out


class HFLogits(torch.nn.Module):
    """A transformers image classifier (ViT, DINOv2) with forward returning only the logits."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(pixel_values=x).logits


def load_hf(d):
    import transformers

    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    arch = cfg["architectures"][0]
    if arch not in ("ViTForImageClassification", "Dinov2ForImageClassification"):
        sys.exit(f"{d}: unsupported architecture {arch}")
    cls = getattr(transformers, arch)
    m = cls.from_pretrained(d, attn_implementation="eager").float().eval()
    name = m.base_model_prefix  # "vit" or "dinov2"
    trunk = getattr(m, name)
    # transformers >= 5 keeps ViT's blocks in vit.layers (checkpoint names stay
    # vit.encoder.layer.N); DINOv2 keeps dinov2.encoder.layer
    if hasattr(trunk, "layers"):
        layers, base = trunk.layers, f"{name}.layers"
    else:
        layers, base = trunk.encoder.layer, f"{name}.encoder.layer"
    # the block's first LayerNorm: ViTLayer.layernorm_before, Dinov2Layer.norm1
    norm = "layernorm_before" if hasattr(layers[-1], "layernorm_before") else "norm1"

    out = Loaded()
    out.model = HFLogits(m).eval()
    # [CLS] (+ registers, for a with-registers variant; plain DINOv2 and ViT have none)
    out.prefix = 1 + int(getattr(m.config, "num_register_tokens", 0) or 0)
    out.has_cls = True
    assert m.config.image_size == SIZE, m.config.image_size
    assert SIZE % m.config.patch_size == 0, m.config.patch_size
    out.grid = SIZE // m.config.patch_size
    out.layer = getattr(layers[-1], norm)
    out.layer_path = f"{base}.{len(layers) - 1}.{norm}"
    check_layer_path(m, out.layer_path, out.layer)

    def attn(x):
        with torch.no_grad():
            r = m(pixel_values=x, output_attentions=True)
        return [a.detach().clone() for a in r.attentions]

    out.attn = attn
    return out


def load_case(case):
    d = os.path.join(DATA, case)
    if os.path.exists(os.path.join(d, "preprocessor_config.json")):
        return load_hf(d)
    return load_timm(d)


# ---------------------------------------------------------------- attention rollout


def rollout(attentions, discard_ratio, prefix, grid):
    """vit-explain's rollout with head_fusion="mean", row renormalisation with keepdim=True.
    Returns (result (T, T), map (G, G) = [CLS] row over the patch columns / its max; the P
    prefix columns, [CLS] and any distillation or register tokens, are dropped)."""
    t = attentions[0].shape[-1]
    eye = torch.eye(t)
    result = torch.eye(t)
    with torch.no_grad():
        for a_l in attentions:
            fused = a_l[0].mean(dim=0)  # (T, T)
            flat = fused.view(-1)
            n = int(t * t * discard_ratio)
            if n > 0:
                _, idx = flat.topk(n, largest=False)
                idx = idx[idx != 0]  # never discard [CLS] -> [CLS]
                flat[idx] = 0  # edits `fused` in place, as vit-explain does
            a = (fused + eye) / 2
            a = a / a.sum(dim=-1, keepdim=True)  # vit-explain: a / a.sum(dim=-1) (wrong axis)
            result = a @ result
    m = result[0, prefix:].reshape(grid, grid)
    m = m / m.max()
    return result, m


def cut_gap(attentions, discard_ratio):
    """The smallest relative gap, over blocks, between the n-th and (n+1)-th smallest fused values:
    0 means an exact tie at the cut (ambiguous); tiny means a slightly different forward pass can
    swap entries across the cut."""
    gap = float("inf")
    for a_l in attentions:
        flat = a_l[0].mean(dim=0).reshape(-1).sort().values
        n = int(flat.numel() * discard_ratio)
        if 0 < n < flat.numel():
            gap = min(gap, float((flat[n] - flat[n - 1]) / flat[n]))
    return gap


def upsample(m):
    return torch.nn.functional.interpolate(
        m[None, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0]


# ---------------------------------------------------------------- Grad-CAM


def gradcam(ld, x, k):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    p, g = ld.prefix, ld.grid

    def reshape_transform(t):
        # drop the P prefix tokens; (B, G*G, D) -> (B, G, G, D) -> (B, D, G, G), a view
        b, _, d = t.shape
        return t[:, p:, :].reshape(b, g, g, d).permute(0, 3, 1, 2)

    # Not `with GradCAM(...) as cam:`: its __exit__ swallows IndexError (prints it, returns True).
    cam = GradCAM(model=ld.model, target_layers=[ld.layer], reshape_transform=reshape_transform)
    try:
        g = cam(input_tensor=x, targets=[ClassifierOutputTarget(k)])[0]
    finally:
        cam.activations_and_grads.release()  # remove its hooks from the model
    return np.ascontiguousarray(g, dtype=np.float32)


def layer_acts_grads(ld, x, k):
    """The target layer's output tokens and d logit_k / d them, prefix dropped, (D, G, G)."""
    caught = {}

    def hook(_m, _i, out):
        out.retain_grad()
        caught["out"] = out

    h = ld.layer.register_forward_hook(hook)
    try:
        ld.model.zero_grad()
        logits = ld.model(x)
        logits[0, k].backward()
    finally:
        h.remove()
    out = caught["out"]
    d = out.shape[-1]
    g = ld.grid
    acts = out.detach()[0, ld.prefix:].reshape(g, g, d).permute(2, 0, 1).contiguous()
    grads = out.grad[0, ld.prefix:].reshape(g, g, d).permute(2, 0, 1).contiguous()
    ld.model.zero_grad()
    return acts.numpy().astype(np.float32), grads.numpy().astype(np.float32)


def gradcam_by_hand(acts, grads):
    """What pytorch-grad-cam's GradCAM does for one image and one target layer."""
    import cv2

    def minmax(img):
        img = img - np.min(img)
        return img / (1e-7 + np.max(img))

    # Same shapes and memory layout as pytorch-grad-cam's arrays: (1, D, G, G) views of
    # channel-last (1, G, G, D) buffers (its reshape_transform permutes without copying). numpy
    # then sums in the same order and the result is bit-identical; from C-order (D, G, G)
    # arrays it differs by a few float32 ulps (about 4e-7).
    def channel_last_view(t):
        return np.ascontiguousarray(t.transpose(1, 2, 0))[None].transpose(0, 3, 1, 2)

    a, g = channel_last_view(acts), channel_last_view(grads)
    w = np.mean(g, axis=(2, 3))  # (1, D): the mean gradient of each channel
    cam = (w[:, :, None, None] * a).sum(axis=1)[0]  # (G, G)
    cam = np.maximum(cam, 0)
    cam14 = np.float32(minmax(cam))
    cam = cv2.resize(cam14, (SIZE, SIZE))  # (width, height); INTER_LINEAR, half-pixel centres
    return np.float32(minmax(np.maximum(cam, 0))), cam14, cam


# ---------------------------------------------------------------- RISE


def rise_masks():
    from skimage.transform import resize

    rng = np.random.default_rng(RISE_SEED)
    cell = int(math.ceil(SIZE / RISE_S))
    up = (RISE_S + 1) * cell
    grids = (rng.random((RISE_N, RISE_S, RISE_S)) < RISE_P1).astype(np.float32)
    shifts = np.zeros((RISE_N, 2), dtype=np.int64)
    masks = np.empty((RISE_N, SIZE, SIZE), dtype=np.float32)
    for i in range(RISE_N):
        x = int(rng.integers(0, cell))
        y = int(rng.integers(0, cell))
        shifts[i] = (x, y)
        big = resize(grids[i], (up, up), order=1, mode="reflect", anti_aliasing=False)
        masks[i] = big[x:x + SIZE, y:y + SIZE].astype(np.float32)
    return grids, shifts, masks, cell, up


def mirror_linear_upsample(g, up):
    """Independent check of skimage.transform.resize(order=1, mode='reflect', anti_aliasing=False)
    for upsampling: output pixel o samples input coordinate c = (o + 0.5) * n / up - 0.5
    (half-pixel centres), mirrored about the edge pixel centres (c < 0 -> -c; c > n-1 ->
    2(n-1) - c), then linear interpolation separably in rows and columns, in float64."""
    n = g.shape[0]
    c = (np.arange(up) + 0.5) * n / up - 0.5
    c = np.where(c < 0, -c, c)
    c = np.where(c > n - 1, 2 * (n - 1) - c, c)
    i0 = np.minimum(np.floor(c).astype(int), n - 2)
    f = c - i0
    wmat = np.zeros((up, n))
    wmat[np.arange(up), i0] = 1 - f
    wmat[np.arange(up), i0 + 1] += f
    return wmat @ g.astype(np.float64) @ wmat.T


def rise(ld, x, masks):
    m = torch.from_numpy(masks)  # (N, H, W)
    stack = m[:, None] * x  # (N, 3, H, W): masks broadcast over channels
    probs = []
    with torch.no_grad():
        for i in range(0, RISE_N, RISE_BATCH):
            probs.append(torch.softmax(ld.model(stack[i:i + RISE_BATCH]), dim=1))
    p = torch.cat(probs)  # (N, C)
    sal = (p.t() @ m.view(RISE_N, SIZE * SIZE)).view(-1, SIZE, SIZE) / RISE_N / RISE_P1
    return sal


# ---------------------------------------------------------------- main


def versions():
    import cv2
    import scipy
    import skimage
    import timm
    import transformers

    return {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "transformers": transformers.__version__,
        "grad-cam": importlib.metadata.version("grad-cam"),
        "scikit-image": skimage.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "opencv-python-headless": cv2.__version__,
    }


def save(d, name, arr, dtype=np.float32):
    arr = np.ascontiguousarray(np.asarray(arr), dtype=np.dtype(dtype).newbyteorder("<"))
    np.save(os.path.join(d, name), arr)
    return arr


def same_as_shared(name, arr):
    """Whether arr equals tests/data/<SHARED_MASKS>/methods/<name> bit for bit (None: not there)."""
    path = os.path.join(DATA, SHARED_MASKS, "methods", name)
    if not os.path.exists(path):
        return None
    ref = np.load(path)
    return bool(ref.shape == arr.shape and ref.dtype == arr.dtype
                and ref.tobytes() == np.ascontiguousarray(arr).tobytes())


def run_case(case, vers):
    d = os.path.join(DATA, case)
    new = case in NEW
    ld = load_case(case)
    x = torch.from_numpy(np.load(os.path.join(d, "input.npy")).astype(np.float32))[None]
    ref = np.load(os.path.join(d, "probs.npy"))
    with torch.no_grad():
        probs = torch.softmax(ld.model(x), dim=-1)[0].numpy()
    err = float(np.abs(probs - ref).max())
    if err > 1e-5:
        sys.exit(f"{case}: model does not reproduce probs.npy (max abs diff {err:.2e})")
    k = int(np.argmax(probs))
    assert k == int(np.argmax(ref))
    p, g = ld.prefix, ld.grid
    out = os.path.join(d, "methods")
    os.makedirs(out, exist_ok=True)
    report = {"case": case, "class": k, "P": p, "G": g, "probs_max_abs_diff": err}

    # Attention rollout (reads the [CLS] row, so only for models with a [CLS] token)
    attentions = ld.attn(x)
    t = attentions[0].shape[-1]
    assert t == p + g * g, (t, p, g)
    skipped = {}
    if ld.has_cls:
        for r in DISCARD_RATIOS:
            tag = f"r{r:g}"
            result, grid = rollout([a.clone() for a in attentions], r, p, g)
            save(out, f"rollout_{tag}.npy", upsample(grid).numpy())
            if r == 0.0:
                save(out, "rollout_matrix_r0.npy", result.numpy())
                rows = result.sum(dim=-1)
                report["rollout_matrix_row_sum_max_dev"] = float((rows - 1).abs().max())
            report[f"rollout_{tag}_grid_min"] = float(grid.min())
            if r > 0:
                report[f"rollout_{tag}_min_rel_gap_at_cut"] = cut_gap(attentions, r)
    else:
        assert p == 0, p
        skipped["rollout"] = ("no [CLS] token (P = 0; the classifier pools all tokens): rollout "
                              "explains through the [CLS] row, which this model does not have")
        report["rollout"] = "skipped"

    # Grad-CAM
    gc = save(out, "gradcam.npy", gradcam(ld, x, k))
    acts, grads = layer_acts_grads(ld, x, k)
    save(out, "gradcam_activations.npy", acts)
    save(out, "gradcam_gradients.npy", grads)
    mine, cam_g, cam224 = gradcam_by_hand(acts, grads)
    report["gradcam_min_max"] = [float(gc.min()), float(gc.max())]
    report["gradcam_by_hand_max_abs_diff"] = float(np.abs(mine - gc).max())
    if report["gradcam_by_hand_max_abs_diff"] > 1e-6:
        sys.exit(f"{case}: Grad-CAM recomputation disagrees with pytorch-grad-cam: {report}")
    # cv2's INTER_LINEAR upsampling vs torch bilinear (align_corners=False) of the same G x G map
    tup = upsample(torch.from_numpy(cam_g)).numpy()
    report["cv2_vs_torch_bilinear_max_abs_diff"] = float(np.abs(tup - cam224).max())

    # RISE
    grids, shifts, masks, cell, up = rise_masks()
    # skimage keeps float32 for a float32 grid (interpolating in float64 inside scipy, then
    # rounding); the float64 formula rounded to float32 should give the very same bits
    mm = max(float(np.abs(np.float32(mirror_linear_upsample(grids[i], up)[sx:sx + SIZE, sy:sy + SIZE])
                          - masks[i]).max()) for i, (sx, sy) in enumerate(shifts))
    report["rise_mask_formula_max_abs_diff"] = mm
    if mm > 1e-6:
        sys.exit(f"{case}: RISE mask formula disagrees with skimage: {mm}")
    sal = rise(ld, x, masks)
    save(out, "rise_grids.npy", grids)
    save(out, "rise_shifts.npy", shifts, np.int64)
    if new:
        # the same draw as every other case: check it against the stored copy, do not duplicate it
        for name, arr in [("rise_grids.npy", grids), ("rise_shifts.npy", shifts),
                          ("rise_masks_first2.npy", masks[:2])]:
            same = same_as_shared(name, arr)
            if same is False:
                sys.exit(f"{case}: RISE draw differs from {SHARED_MASKS}'s {name}")
            report[f"{name[:-4]}_same_as_{SHARED_MASKS}"] = same
    else:
        save(out, "rise_masks_first2.npy", masks[:2])
    rs = save(out, "rise.npy", sal[k].numpy())
    report["rise_min_max_mean"] = [float(rs.min()), float(rs.max()), float(rs.mean())]
    report["rise_all_classes_sum_mean"] = float(sal.sum(0).mean())  # = mean mask / p1

    rise_meta = {"s": RISE_S, "p1": RISE_P1, "n": RISE_N, "cell": cell}
    rollout_meta = {"head_fusion": "mean", "discard_ratios": DISCARD_RATIOS}
    gradcam_meta = {"layer": ld.layer_path, "target": "logit"}
    if not new:
        # the original three cases keep their original key set (a rerun stays byte-identical)
        meta = {"class": k, "num_prefix_tokens": p, "rollout": rollout_meta,
                "gradcam": gradcam_meta, "rise": rise_meta, "versions": vers}
    else:
        gradcam_meta["reshape"] = f"drop {p} prefix tokens, (1, {g * g}, D) -> (1, D, {g}, {g})"
        rise_meta["masks_first2"] = f"../../{SHARED_MASKS}/methods/rise_masks_first2.npy"
        meta = {"class": k, "num_prefix_tokens": p, "grid": [g, g], "num_tokens": t,
                "rollout": rollout_meta if ld.has_cls else None}
        if skipped:
            meta["skipped"] = skipped
        meta.update({"gradcam": gradcam_meta, "rise": rise_meta, "versions": vers})
    with open(os.path.join(out, "methods.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=CASES, action="append",
                    help="a case to write (repeatable); default: all eight")
    ap.add_argument("--new", action="store_true",
                    help="the five new cases: " + ", ".join(NEW))
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)  # nothing random in torch is used; set for safety
    vers = versions()
    cases = (args.only or []) + (NEW if args.new else [])
    for case in [c for c in CASES if c in cases] if cases else CASES:
        rep = run_case(case, vers)
        print(json.dumps(rep))


if __name__ == "__main__":
    main()
