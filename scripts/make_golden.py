#!/usr/bin/env python3
"""Writes golden cases tests/data/<case>/ by running the ORIGINAL ViT-CX reference code (Xie et al.,
IJCAI 2023, https://github.com/vaynexie/CausalX-ViT) on small random-weight checkpoints, on CPU.

The reference code is not part of this repository and is never copied into it: get it yourself and
pass its folder (the one holding `ViT_CX/` and `testing_image/`) with --reference:

    git clone https://github.com/vaynexie/CausalX-ViT /tmp/cxref
    # (or, from a bare mirror: git --git-dir=MIRROR archive HEAD | tar -x -C /tmp/cxref)

Run by hand (CI never runs it; the generated files are committed), from the repository root:

    pip install torch torchvision timm transformers safetensors numpy scikit-learn scikit-image \
        scipy opencv-python-headless pillow
    python scripts/make_golden.py --reference /tmp/cxref --validate   # harness check on vit_timm
    python scripts/make_golden.py --reference /tmp/cxref              # every new case
    python scripts/make_golden.py --reference /tmp/cxref --only siglip_timm

--validate regenerates the committed `vit_timm` case from its own checkpoint, image and stored
noise into a temporary folder, compares every file with the committed one and writes nothing into
the repository.

The reference is imported from --reference and patched at run time only (nothing on disk changes):
  * `torch.Tensor.cuda` and `torch.nn.Module.cuda` return `self` while it runs (CPU, float32);
  * `ttach` (imported by cam/base_cam.py, used only by its test-time augmentation, which ViT-CX never
    calls) is stubbed by an empty module if it is not installed;
  * `AgglomerativeClustering(..., affinity='precomputed')` in ViT_CX.py gets `metric=` instead
    (scikit-learn >= 1.4 removed `affinity`); the fitted object is kept to save labels and merge
    heights;
  * `torch.randn` inside causal_score.py returns the stored draw: for sigma 0 zeros, for sigma 0.1
    the float16 `noise.npy` [N,3,224,224] converted back to float32, so the reference computes its
    noise for mask i as `(noise[i] * 0.1) * (1 - M_i)`, in the order of `masks.npy`;
  * `get_feature_map` and `causal_score` are subclassed in ViT_CX.py's namespace only to record the
    feature maps, the clustered masks and class_p on their way through.
Everything else (the feature-map resize, normalisation, clustering, causal scores, the batch of
50) is the reference's own code. The image is prepared as in its Usage_Example.ipynb: read RGB
(plt.imread, i.e. PIL), `cv2.resize(img, (224, 224))` (bilinear), /255, ToTensor, Normalize with
the checkpoint's mean/std.

Deterministic: every case seeds torch with its own fixed seed (weights, then the noise draw); a
rerun rewrites identical files except `reference_seconds` in manifest.json. A seed whose merge
heights come closer than 9e-4 to the 0.1 threshold, or whose sigma-0 saliency spans less than 2e-2
(the Rust gate's 1e-5-of-range tolerance would fall to a few float32 ulps), is rejected: the next
seed in the case's list is used and the script says so. See scripts/README.md and tests/data/README.md.
"""

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import types

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import IMAGENET_MEAN, IMAGENET_STD, labels, randomise, relpos_randomise  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, "..", "tests", "data"))
IMAGES = os.path.join(DATA, "images")

THRESHOLD = 0.1
SIGMA = 0.1
MARGIN = 9e-4  # every merge height at least this far from THRESHOLD
# The Rust gate allows 1e-5 of the saliency's range. Two float32 forward passes (PyTorch's and
# vitcx's) differ by a few 1e-7 in each probability, and the saliency sums such differences, so a
# range under 2e-2 can leave less tolerance than that rounding (measured: dinov2_hf seed 315, range
# 1.26e-2, differed by 1.07e-5 of its range with the stored noise).
MIN_RANGE = 2e-2
GPU_BATCH = 50  # the reference's default in Usage_Example.ipynb
SIZE = 224
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
HALF = [0.5, 0.5, 0.5]
# What each checkpoint's config must carry (checked after writing it).
EXPECTED_MEAN_STD = {
    "deit3_timm": (IMAGENET_MEAN, IMAGENET_STD),
    "reg4_dinov2_timm": (IMAGENET_MEAN, IMAGENET_STD),
    "clip_timm": (CLIP_MEAN, CLIP_STD),
    "siglip_timm": (HALF, HALF),
    "dinov2_hf": (IMAGENET_MEAN, IMAGENET_STD),
    "beit_hf": (HALF, HALF),
    "eva02_timm": (CLIP_MEAN, CLIP_STD),
    "swin_timm": (IMAGENET_MEAN, IMAGENET_STD),
}


# ---------------------------------------------------------------- the reference, patched


class Reference:
    """The reference's ViT_CX() with the run-time patches described in the module docstring."""

    def __init__(self, ref_dir):
        vdir = os.path.join(ref_dir, "ViT_CX")
        if not os.path.isfile(os.path.join(vdir, "ViT_CX.py")):
            sys.exit(f"--reference {ref_dir}: no ViT_CX/ViT_CX.py there")
        try:
            import ttach  # noqa: F401
        except ImportError:
            sys.modules["ttach"] = types.ModuleType("ttach")
        # ViT_CX.py imports `cam` and `causal_score` as top-level modules (its own sys.path lines
        # are Windows paths relative to the working directory).
        sys.path.insert(0, vdir)
        spec = importlib.util.spec_from_file_location("vitcx_reference", os.path.join(vdir, "ViT_CX.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        import causal_score as cs_mod  # the module ViT_CX.py imported its class from

        self.mod, self.cs_mod = mod, cs_mod
        self.capture = {}
        cap = self.capture

        from sklearn.cluster import AgglomerativeClustering

        def agglomerative(**kw):
            if "affinity" in kw:
                kw["metric"] = kw.pop("affinity")
            c = AgglomerativeClustering(**kw)
            cap["cluster"] = c
            return c

        class RecordingFeatureMap(mod.get_feature_map):
            def __call__(self, *a, **k):
                out = super().__call__(*a, **k)
                cap["feature_map"] = self.featuremap_and_grads.featuremaps[0][0].detach().clone()
                return out

        class RecordingCausalScore(mod.causal_score):
            def forward(self, x, masks_input, class_p):
                cap["masks"] = masks_input.detach().clone()
                cap["class_p"] = class_p
                return super().forward(x, masks_input, class_p)

        mod.AgglomerativeClustering = agglomerative
        mod.get_feature_map = RecordingFeatureMap
        mod.causal_score = RecordingCausalScore

    @contextlib.contextmanager
    def _patched(self, noise):
        """CPU instead of .cuda(); causal_score's torch.randn returns `noise`."""
        t_cuda, m_cuda = torch.Tensor.cuda, torch.nn.Module.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self
        torch.nn.Module.cuda = lambda self, *a, **k: self

        class TorchWithStoredNoise(types.ModuleType):
            def __getattr__(self, name):
                return getattr(torch, name)

            def randn(self, *size, **kw):
                shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (list, tuple)) else size
                if noise is None:
                    return torch.zeros(shape)
                assert tuple(noise.shape) == tuple(shape), (noise.shape, shape)
                return noise.clone()

        self.cs_mod.torch = TorchWithStoredNoise("torch")
        try:
            yield
        finally:
            torch.Tensor.cuda, torch.nn.Module.cuda = t_cuda, m_cuda
            self.cs_mod.torch = torch

    def run(self, model, image, target_layer, reshape, noise=None):
        """One ViT_CX() call. `noise`: None (sigma 0) or float32 [N,3,H,W] standard normal."""
        self.capture.clear()
        kw = {} if reshape is None else {"reshape_function": reshape}
        with self._patched(noise):
            t0 = time.perf_counter()
            sal = self.mod.ViT_CX(model, image, target_layer, target_category=None,
                                  distance_threshold=THRESHOLD, gpu_batch=GPU_BATCH, **kw)
            seconds = time.perf_counter() - t0
        c = self.capture
        out = {
            "saliency": np.asarray(sal, dtype=np.float32),
            "feature_map": c["feature_map"].float().contiguous().numpy(),
            "masks": c["masks"].float().contiguous().numpy(),
            "class_p": float(c["class_p"]),
            "class_p32": np.float32(c["class_p"]),
            "labels": np.asarray(c["cluster"].labels_, dtype=np.int64),
            "distances": np.asarray(c["cluster"].distances_, dtype=np.float64),
            "seconds": seconds,
        }
        return out


# ---------------------------------------------------------------- image, as Usage_Example.ipynb


def read_resized(path):
    """plt.imread (PIL for JPEG) -> RGB uint8, then cv2.resize(img, (224, 224)) (bilinear)."""
    import cv2
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB"))
    return cv2.resize(np.ascontiguousarray(rgb), (SIZE, SIZE))


def to_input(rgb224, mean, std):
    from torchvision.transforms import Compose, Normalize, ToTensor

    img = np.float32(rgb224) / 255
    return Compose([ToTensor(), Normalize(mean=mean, std=std)])(img.copy()).unsqueeze(0)


def reshape_for(prefix, gh, gw):
    """What a user of the reference writes for this family (cf. reshape_function_vit)."""

    def reshape_transform(tensor, height=gh, width=gw):
        result = tensor[:, prefix:, :].reshape(tensor.size(0), height, width, tensor.size(2))
        result = result.transpose(2, 3).transpose(1, 2)
        return result

    return reshape_transform


# ---------------------------------------------------------------- models


class LogitsOf(torch.nn.Module):
    """Hugging Face models return an output object; the reference needs a tensor of logits."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(pixel_values=x).logits


def load_timm(d):
    import timm
    from safetensors.torch import load_file

    cfg = json.load(open(os.path.join(d, "config.json")))
    model = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"])
    model.load_state_dict(load_file(os.path.join(d, "model.safetensors")))
    model.eval()
    if hasattr(model, "layers"):
        # Swin: the last stage's last block's norm1, channels-last (B, H, W, C), no prefix.
        last = model.layers[-1].blocks[-1]
        gh, gw = last.input_resolution
        info = {
            "mean": list(cfg["pretrained_cfg"]["mean"]),
            "std": list(cfg["pretrained_cfg"]["std"]),
            "prefix": 0,
            "grid": [int(gh), int(gw)],
            "dim": int(last.dim),
            "channels_last": True,
        }
        return model, last.norm1, info
    gh, gw = model.patch_embed.grid_size
    info = {
        "mean": list(cfg["pretrained_cfg"]["mean"]),
        "std": list(cfg["pretrained_cfg"]["std"]),
        "prefix": int(model.num_prefix_tokens),
        "grid": [int(gh), int(gw)],
        "dim": int(model.embed_dim),
    }
    return model, model.blocks[-1].norm1, info


def load_hf(d):
    import transformers as tf

    model = tf.AutoModelForImageClassification.from_pretrained(d).eval()
    pp = json.load(open(os.path.join(d, "preprocessor_config.json")))
    cfg = model.config
    g = cfg.image_size // cfg.patch_size
    backbone = getattr(model, cfg.model_type)
    layers = backbone.layers if hasattr(backbone, "layers") else backbone.encoder.layer
    info = {
        "mean": list(pp["image_mean"]),
        "std": list(pp["image_std"]),
        "prefix": 1 + int(getattr(cfg, "num_register_tokens", 0) or 0),
        "grid": [g, g],
        "dim": int(cfg.hidden_size),
    }
    wrapped = LogitsOf(model).eval()
    # BEiT names the first norm of a layer `layernorm_before` (DINOv2: `norm1`).
    norm1 = layers[-1].layernorm_before if cfg.model_type == "beit" else layers[-1].norm1
    return wrapped, norm1, info


def timm_config(model, arch, model_args, n_cls):
    pc = model.pretrained_cfg
    return {
        "architecture": arch,
        "num_classes": n_cls,
        "num_features": int(model.num_features),
        "global_pool": model.global_pool,
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, SIZE, SIZE],
            "mean": [float(v) for v in pc["mean"]],
            "std": [float(v) for v in pc["std"]],
            "interpolation": pc.get("interpolation", "bicubic"),
            "crop_pct": float(pc.get("crop_pct", 0.9)),
            "num_classes": n_cls,
        },
        "label_names": labels(n_cls),
    }


def write_timm(d, seed, arch, model_args, head="head", head_gain=3.0):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, **model_args).eval()
    randomise(model, [head], head_gain=head_gain)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(d, "model.safetensors"))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(timm_config(model, arch, model_args, model.num_classes), f, indent=1)
        f.write("\n")


def write_dinov2_hf(d, seed, dim, depth, heads, n_labels):
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.Dinov2Config(
        hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, mlp_ratio=4,
        patch_size=14, image_size=SIZE, num_labels=n_labels,
        id2label={i: l for i, l in enumerate(labels(n_labels))},
        label2id={l: i for i, l in enumerate(labels(n_labels))},
    )
    model = tf.Dinov2ForImageClassification(config).eval()
    randomise(model, ["classifier"])
    model.save_pretrained(d, safe_serialization=True)
    # As facebook/dinov2-* ship it: resize shortest edge 256 (bicubic), centre crop 224.
    tf.BitImageProcessor(
        do_resize=True, size={"shortest_edge": 256}, resample=3, do_center_crop=True,
        crop_size={"height": SIZE, "width": SIZE}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, do_convert_rgb=True,
    ).save_pretrained(d)


def write_beit_hf(d, seed, dim, depth, heads, n_labels):
    """BeitForImageClassification as microsoft/beit-base-patch16-224 is built (a relative position
    bias per layer, LayerScale 0.1, mean pooling + pooler layernorm, eps 1e-12, patch 16), small;
    LayerScale drawn large (relpos_randomise) so that every branch matters."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.BeitConfig(
        hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
        intermediate_size=4 * dim, image_size=SIZE, patch_size=16,
        use_relative_position_bias=True, use_mean_pooling=True, layer_scale_init_value=0.1,
        id2label={i: l for i, l in enumerate(labels(n_labels))},
        label2id={l: i for i, l in enumerate(labels(n_labels))},
    )
    model = tf.BeitForImageClassification(config).eval()
    relpos_randomise(model, ["classifier"])
    model.save_pretrained(d)
    # As microsoft/beit-base-patch16-224 ships it: plain resize to 224 (bilinear), mean/std 0.5.
    tf.BeitImageProcessor(
        do_resize=True, size={"height": SIZE, "width": SIZE}, resample=2, do_center_crop=False,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=HALF,
        image_std=HALF,
    ).save_pretrained(d)


# ---------------------------------------------------------------- cases

SMALL = dict(embed_dim=96, depth=3, num_heads=3, num_classes=10)

# name -> (format, family, architecture, image, seeds to try, writer(d, seed))
CASES = {
    "deit3_timm": ("timm", "deit3", "deit3_small_patch16_224", "ILSVRC2012_val_00033147.JPEG",
                   [301, 311, 321, 331, 341, 351],
                   lambda d, s: write_timm(d, s, "deit3_small_patch16_224", dict(SMALL))),
    "reg4_dinov2_timm": ("timm", "dinov2_reg", "vit_small_patch14_reg4_dinov2",
                         "ILSVRC2012_val_00046969.JPEG", [302, 312, 322, 332],
                         lambda d, s: write_timm(d, s, "vit_small_patch14_reg4_dinov2",
                                                 dict(SMALL, img_size=SIZE))),
    "clip_timm": ("timm", "clip", "vit_base_patch16_clip_quickgelu_224",
                  "ILSVRC2012_val_00048864.JPEG", [303, 313, 323, 333],
                  lambda d, s: write_timm(d, s, "vit_base_patch16_clip_quickgelu_224", dict(SMALL))),
    "siglip_timm": ("timm", "siglip", "vit_base_patch16_siglip_224", "bittern.JPEG",
                    [304, 314, 324, 334],
                    lambda d, s: write_timm(d, s, "vit_base_patch16_siglip_224", dict(SMALL))),
    "dinov2_hf": ("hf", "dinov2", "Dinov2ForImageClassification", "white_stork1.JPEG",
                  [305, 315, 325, 335, 345, 355],
                  lambda d, s: write_dinov2_hf(d, s, 96, 3, 3, 10)),
    # BEiT (HF): relative position bias per layer, grid 14x14 after the [CLS].
    "beit_hf": ("hf", "beit", "BeitForImageClassification", "ILSVRC2012_val_00026771.JPEG",
                [306, 316, 326, 336, 346, 356],
                lambda d, s: write_beit_hf(d, s, 96, 3, 3, 10)),
    # EVA-02 (timm, tiny layout: fused qkv, packed SwiGLU, rotary embedding): patch 14, grid
    # 16x16 after the [CLS].
    "eva02_timm": ("timm", "eva02", "eva02_tiny_patch14_224", "ILSVRC2012_val_00028713.JPEG",
                   [307, 317, 327, 337, 347, 357],
                   lambda d, s: write_timm(d, s, "eva02_tiny_patch14_224", dict(SMALL))),
    # Swin: four stages (56, 28, 14, 7 grids), target layer layers.3.blocks.1.norm1 (7x7, 32
    # channels), timm's channels-last tokens permuted by the reshape function. Narrow (embed 4)
    # and a head gain of 8: wider random Swins average the image away (their sigma-0 saliency
    # ranged 1e-4 to 1e-2 over 60 seeds, below MIN_RANGE).
    "swin_timm": ("timm", "swin", "swin_tiny_patch4_window7_224", "ILSVRC2012_val_00033147.JPEG",
                  list(range(306, 406, 10)),
                  lambda d, s: write_timm(d, s, "swin_tiny_patch4_window7_224",
                                          dict(embed_dim=4, depths=(2, 2, 2, 2),
                                               num_heads=(1, 1, 2, 2), num_classes=10),
                                          head="head.fc", head_gain=8.0)),
}


def find_image(name, ref_dir):
    p = os.path.join(IMAGES, name)
    if os.path.isfile(p):
        return p
    src = os.path.join(ref_dir, "testing_image", name)
    if not os.path.isfile(src):
        sys.exit(f"image {name}: neither in {IMAGES} nor in {os.path.dirname(src)}")
    if os.path.getsize(src) >= 150_000:
        sys.exit(f"image {name} is {os.path.getsize(src)} bytes; pick one under 150 KB")
    shutil.copyfile(src, p)
    print(f"copied {name} into {os.path.relpath(IMAGES)}")
    return p


def margin(distances):
    return float(np.min(np.abs(distances - THRESHOLD)))


def run_case(ref, d, fmt, image_path, noise_seed, name, family, arch, stored_noise=None):
    """Runs the reference twice (sigma 0, sigma 0.1) on the checkpoint in `d` and writes the golden
    files there. Returns a summary dict, or None if the merge heights are too close to 0.1."""
    from PIL import Image

    model, layer, info = (load_timm if fmt == "timm" else load_hf)(d)
    gh, gw = info["grid"]
    rgb = read_resized(image_path)
    x = to_input(rgb, info["mean"], info["std"])
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)[0].float().numpy()
    # The reference's default reshape for a 14x14 grid with one [CLS] is what its notebook uses.
    default = info["prefix"] == 1 and info["grid"] == [14, 14] and name == "vit_timm"
    reshape = None if default else reshape_for(info["prefix"], gh, gw)
    if info.get("channels_last"):
        # What a user writes for timm's Swin: norm1 gives (B, H, W, C); ViT-CX wants (B, C, H, W).
        reshape = lambda t: t.permute(0, 3, 1, 2)  # noqa: E731

    r0 = ref.run(model, x, layer, reshape, noise=None)
    n = r0["masks"].shape[0]
    m = margin(r0["distances"])
    target = int(np.argmax(probs))
    assert r0["class_p32"] == probs[target], (r0["class_p32"], probs[target])
    assert n == 1 + int(np.sum(r0["distances"] >= THRESHOLD))
    assert not np.isnan(r0["masks"]).any() and not np.isnan(r0["saliency"]).any()
    rng = float(r0["saliency"].max() - r0["saliency"].min())
    if m < MARGIN:
        return {"rejected": f"a merge height is {m:.2e} from {THRESHOLD} (N {n})"}
    if rng < MIN_RANGE:
        return {"rejected": f"the sigma-0 saliency range is {rng:.2e} < {MIN_RANGE} (N {n})"}

    if stored_noise is None:
        g = torch.Generator().manual_seed(noise_seed)
        stored_noise = torch.randn((n, 3, SIZE, SIZE), generator=g).to(torch.float16).numpy()
    assert stored_noise.shape == (n, 3, SIZE, SIZE) and stored_noise.dtype == np.float16
    r1 = ref.run(model, x, layer, reshape, noise=torch.from_numpy(stored_noise.astype(np.float32)))
    assert np.array_equal(r1["labels"], r0["labels"]) and np.array_equal(r1["masks"], r0["masks"])

    Image.fromarray(rgb).save(os.path.join(d, "image_224.png"))
    assert np.array_equal(np.asarray(Image.open(os.path.join(d, "image_224.png"))), rgb)
    save = lambda f, a: np.save(os.path.join(d, f), a)  # noqa: E731
    save("input.npy", x[0].numpy().astype(np.float32))
    save("probs.npy", probs.astype(np.float32))
    save("feature_map.npy", r0["feature_map"])
    save("masks.npy", r0["masks"].reshape(n, SIZE, SIZE))
    save("cluster_labels.npy", r0["labels"])
    save("merge_distances.npy", r0["distances"])
    save("saliency_sigma0.npy", r0["saliency"])
    save("saliency_sigma0.1.npy", r1["saliency"])
    save("noise.npy", stored_noise)
    manifest = {
        "name": name,
        "format": fmt,
        "family": family,
        "architecture": arch,
        "image_source": os.path.basename(image_path),
        "mean": info["mean"],
        "std": info["std"],
        "distance_threshold": THRESHOLD,
        "noise_sigma": SIGMA,
        "target": target,
        "class_p": r0["class_p"],
        "num_tokens_skipped": info["prefix"],
        "grid": [gh, gw],
        "N_masks": n,
        "num_feature_maps": int(r0["feature_map"].shape[0]),
        "min_merge_margin": m,
        "reference_seconds": {"sigma0": r0["seconds"], "sigma0.1": r1["seconds"]},
    }
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return {"rejected": False, "N": n, "margin": m, "class_p": r0["class_p"], "target": target,
            "range_sigma0": rng, "range_sigma0.1": float(r1["saliency"].max() - r1["saliency"].min()),
            "prefix": info["prefix"], "grid": [gh, gw],
            "top2": sorted(probs.tolist())[-2:][::-1]}


def folder_size(d):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def make_case(ref, name, ref_dir, out_root):
    fmt, family, arch, image, seeds, writer = CASES[name]
    image_path = find_image(image, ref_dir)
    for seed in seeds:
        d = os.path.join(out_root, name)
        if os.path.isdir(d):
            shutil.rmtree(d)
        os.makedirs(d)
        writer(d, seed)
        for f in os.listdir(d):  # safetensors/transformers write 0600; keep the repository's 0644
            os.chmod(os.path.join(d, f), 0o644)
        s = run_case(ref, d, fmt, image_path, seed + 10_000, name, family, arch)
        if s["rejected"]:
            print(f"{name}: seed {seed} rejected: {s['rejected']}; trying the next seed")
            continue
        man = json.load(open(os.path.join(d, "manifest.json")))
        assert np.allclose(man["mean"], EXPECTED_MEAN_STD[name][0], atol=1e-7), man["mean"]
        assert np.allclose(man["std"], EXPECTED_MEAN_STD[name][1], atol=1e-7), man["std"]
        s.update(seed=seed, size=folder_size(d))
        print(f"{name}: seed {seed} N {s['N']} target {s['target']} class_p {s['class_p']:.4f} "
              f"(top-2 {s['top2'][0]:.4f}/{s['top2'][1]:.4f}) prefix {s['prefix']} grid {s['grid']} "
              f"min |h-0.1| {s['margin']:.2e} saliency range {s['range_sigma0']:.2e} size {s['size'] / 1e6:.2f} MB -> {os.path.relpath(d)}")
        return s
    sys.exit(f"{name}: every seed in {seeds} was rejected")


# ---------------------------------------------------------------- validation on vit_timm


def validate(ref):
    """Regenerates tests/data/vit_timm into a temporary folder and compares every file."""
    from PIL import Image

    src = os.path.join(DATA, "vit_timm")
    man = json.load(open(os.path.join(src, "manifest.json")))
    with tempfile.TemporaryDirectory() as d:
        for f in ("config.json", "model.safetensors"):
            shutil.copyfile(os.path.join(src, f), os.path.join(d, f))
        noise = np.load(os.path.join(src, "noise.npy"))
        run_case(ref, d, "timm", os.path.join(IMAGES, man["image_source"]), None, "vit_timm",
                 "vit", "vit_tiny_patch16_224", stored_noise=noise)
        load = lambda root, f: np.load(os.path.join(root, f))  # noqa: E731
        rows = []
        a = np.asarray(Image.open(os.path.join(d, "image_224.png")).convert("RGB")).astype(int)
        b = np.asarray(Image.open(os.path.join(src, "image_224.png")).convert("RGB")).astype(int)
        rows.append(("image_224.png (pixels)", np.abs(a - b).max()))
        for f in ("input.npy", "probs.npy", "feature_map.npy", "masks.npy", "merge_distances.npy",
                  "saliency_sigma0.npy", "saliency_sigma0.1.npy"):
            x, y = load(d, f), load(src, f)
            assert x.shape == y.shape, (f, x.shape, y.shape)
            rows.append((f, float(np.abs(x.astype(np.float64) - y).max())))
        x, y = load(d, "cluster_labels.npy"), load(src, "cluster_labels.npy")
        rows.append(("cluster_labels.npy (labels differing)", int((x != y).sum())))
        new = json.load(open(os.path.join(d, "manifest.json")))
        for k in ("target", "class_p", "num_tokens_skipped", "N_masks", "num_feature_maps"):
            rows.append((f"manifest {k}", f"{new[k]} vs committed {man[k]}"))
        rows.append(("min |merge height - 0.1|", new["min_merge_margin"]))
        for s in ("saliency_sigma0.npy", "saliency_sigma0.1.npy"):
            y = load(src, s)
            rows.append((f"{s} range", float(y.max() - y.min())))
    print("validation of the harness on vit_timm (regenerated vs committed, max abs diff):")
    for k, v in rows:
        print(f"  {k}: {v}")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True,
                    help="folder of the reference repository (holds ViT_CX/ and testing_image/)")
    ap.add_argument("--only", nargs="*", help="case names (default: all new cases)")
    ap.add_argument("--validate", action="store_true",
                    help="only regenerate vit_timm into a temporary folder and compare")
    ap.add_argument("--out", default=DATA, help="where the case folders go (default tests/data)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ref = Reference(os.path.abspath(args.reference))
    if args.validate:
        validate(ref)
        return
    names = args.only or list(CASES)
    for n in names:
        if n not in CASES:
            sys.exit(f"unknown case '{n}'; expected one of {', '.join(CASES)}")
    summary = {n: make_case(ref, n, os.path.abspath(args.reference), args.out) for n in names}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
