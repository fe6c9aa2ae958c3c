#!/usr/bin/env python3
"""Writes tests/data/zoo/<case>/: small random-weight ViT/DeiT checkpoints saved exactly as timm and
transformers save them, plus PyTorch's outputs for them, so vitcx's loader and forward pass can be
checked against the reference libraries on more shapes than the golden cases.

Run by hand (never by CI), from the repository root:

    pip install torch timm transformers safetensors numpy
    python scripts/make_fixtures.py            # all cases
    python scripts/make_fixtures.py --only timm_vit_d80_h5_c1000

Deterministic: every case seeds torch with its own fixed seed; re-running rewrites identical
weights and references (the .npy files are bit-identical on the same torch build).
See scripts/README.md for the file format and what each case checks.
"""

import argparse
import json
import math
import os
import shutil
import sys

import numpy as np
import torch

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
HALF = [0.5, 0.5, 0.5]

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "zoo")


def labels(n):
    return [f"class_{i:03d}" for i in range(n)]


def randomise(model, head_names, head_gain=3.0):
    """Re-draws every weight so that attention and MLPs matter (timm/HF inits are ~0.02 and would
    leave the blocks nearly an identity): Linear/Conv weights ~ N(0, 1/fan_in), LayerNorm weight
    1 + N(0, 0.1), biases N(0, 0.1), class/distillation/position embeddings N(0, 0.5). Heads get
    `head_gain` times that, so predictions are peaked as in a trained model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            is_norm = ("norm" in name.lower()) and p.dim() == 1
            if is_norm and leaf == "weight":
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif leaf == "bias" or p.dim() == 1:
                p.copy_(0.1 * torch.randn_like(p))
            elif p.dim() >= 2 and any(k in name for k in ("weight",)):
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) / math.sqrt(fan_in))
            else:
                # cls_token, dist_token, pos_embed, position_embeddings, distillation_token
                p.copy_(0.5 * torch.randn_like(p))
        for head in head_names:
            w = model.get_submodule(head).weight
            w.mul_(head_gain)


def make_input(h, w, mean, std):
    """Two images in [0, 1]: uniform noise, and a smooth colour ramp with a little noise; then
    normalised with the case's mean/std. Shape (2, 3, H, W), float32."""
    a = torch.rand(3, h, w)
    ys = torch.linspace(0, 1, h).view(1, h, 1)
    xs = torch.linspace(0, 1, w).view(1, 1, w)
    ramp = torch.cat([ys.expand(1, h, w), xs.expand(1, h, w), (0.5 * (ys + xs)).expand(1, h, w)], 0)
    b = (0.8 * ramp + 0.2 * torch.rand(3, h, w)).clamp(0, 1)
    x = torch.stack([a, b])
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return ((x - m) / s).float().contiguous()


def run_reference(model, norm_module, x):
    """Logits (2, C) and the output of `norm_module` (2, T, D), all tokens including the prefix."""
    captured = {}

    def hook(_module, _inp, out):
        captured["tokens"] = out.detach().clone()

    handle = norm_module.register_forward_hook(hook)
    with torch.no_grad():
        out = model(x)
    handle.remove()
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return logits.float().numpy(), captured["tokens"].float().numpy()


def write_reference(case_dir, x, logits, tokens, meta):
    ref = os.path.join(case_dir, "reference")
    os.makedirs(ref, exist_ok=True)
    np.save(os.path.join(ref, "input.npy"), x.numpy().astype(np.float32))
    np.save(os.path.join(ref, "logits.npy"), logits.astype(np.float32))
    np.save(os.path.join(ref, "tokens.npy"), tokens.astype(np.float32))
    gh, gw = meta["grid"]
    assert tokens.shape == (2, meta["num_prefix_tokens"] + gh * gw, meta["dim"]), tokens.shape
    assert logits.shape == (2, meta["num_classes"]), logits.shape
    with open(os.path.join(ref, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


def fresh_dir(name):
    d = os.path.join(ROOT, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    return d


# ---------------------------------------------------------------- timm


def timm_case(name, seed, arch, model_args, mean, std, family, config_model_args=None,
              num_features_in_config=True):
    """A timm model created from `arch` + `model_args`, saved as timm's hub format: the state dict
    in model.safetensors and a config.json with architecture, model_args, pretrained_cfg, label
    names (mirroring tests/data/vit_timm/config.json). `config_model_args` overrides what is written
    as model_args (to write an incomplete one as real configs do)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, **model_args).eval()
    heads = ["head"] + (["head_dist"] if family == "deit_distilled" else [])
    randomise(model, heads)

    d = fresh_dir(name)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(d, "model.safetensors"))

    img = model_args.get("img_size", 224)
    h, w = (img, img) if isinstance(img, int) else tuple(img)
    n_cls = model.num_classes
    config = {
        "architecture": arch,
        "num_classes": n_cls,
        "num_features": model.num_features if num_features_in_config else None,
        "global_pool": model.global_pool,
        "model_args": config_model_args if config_model_args is not None else model_args,
        "pretrained_cfg": {
            "input_size": [3, h, w],
            "mean": mean,
            "std": std,
            "interpolation": "bicubic",
            "crop_pct": 0.9,
            "num_classes": n_cls,
        },
        "label_names": labels(n_cls),
    }
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
        f.write("\n")

    x = make_input(h, w, mean, std)
    logits, tokens = run_reference(model, model.blocks[-1].norm1, x)
    gh, gw = model.patch_embed.grid_size
    meta = {
        "family": family,
        "format": "timm",
        "num_prefix_tokens": int(model.num_prefix_tokens),
        "grid": [int(gh), int(gw)],
        "depth": len(model.blocks),
        "heads": int(model.blocks[0].attn.num_heads),
        "num_classes": int(n_cls),
        "layer_norm_eps": float(model.blocks[0].norm1.eps),
        "dim": int(model.embed_dim),
        "patch_size": int(model.patch_embed.patch_size[0]),
        "image_size": [h, w],
    }
    write_reference(d, x, logits, tokens, meta)
    return d


# ---------------------------------------------------------------- transformers


def hf_save_weights(model, d, safetensors):
    """model.save_pretrained(d); for the .bin case, what transformers 4.x's
    save_pretrained(safe_serialization=False) wrote: torch.save of the state dict, under the Hub's
    (original) tensor names, as pytorch_model.bin. transformers 5 dropped that option and renamed
    modules internally (vit.layers.N.attention.q_proj), converting back to the original names
    (vit.encoder.layer.N.attention.attention.query) only when saving, so the .bin is written from
    the saved safetensors file, not from model.state_dict()."""
    from safetensors.torch import load_file

    model.save_pretrained(d)
    st = os.path.join(d, "model.safetensors")
    if safetensors:
        return
    state = load_file(st)
    os.remove(st)
    torch.save(state, os.path.join(d, "pytorch_model.bin"))


def hf_layers(backbone):
    """The block list: `layers` in transformers >= 5, `encoder.layer` before."""
    if hasattr(backbone, "layers"):
        return backbone.layers
    return backbone.encoder.layer


def hf_case(name, seed, kind, dim, heads, depth, n_labels, image_size, eps, mean, std,
            safetensors=True):
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(
        hidden_size=dim,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=4 * dim,
        image_size=image_size,
        patch_size=16,
        layer_norm_eps=eps,
        id2label={i: l for i, l in enumerate(labels(n_labels))},
        label2id={l: i for i, l in enumerate(labels(n_labels))},
    )
    if kind == "vit":
        config = tf.ViTConfig(**common)
        model = tf.ViTForImageClassification(config).eval()
        heads_names, layers, family, prefix = ["classifier"], hf_layers(model.vit), "vit", 1
        processor = tf.ViTImageProcessor(
            size={"height": image_size, "width": image_size}, image_mean=mean, image_std=std
        )
    elif kind == "deit_distilled":
        config = tf.DeiTConfig(**common)
        model = tf.DeiTForImageClassificationWithTeacher(config).eval()
        heads_names = ["cls_classifier", "distillation_classifier"]
        layers, family, prefix = hf_layers(model.deit), "deit_distilled", 2
        processor = tf.DeiTImageProcessor(
            size={"height": image_size * 8 // 7, "width": image_size * 8 // 7},
            crop_size={"height": image_size, "width": image_size},
            image_mean=mean,
            image_std=std,
        )
    else:
        raise ValueError(kind)
    randomise(model, heads_names)

    d = fresh_dir(name)
    hf_save_weights(model, d, safetensors)
    processor.save_pretrained(d)

    x = make_input(image_size, image_size, mean, std)
    logits, tokens = run_reference(model, layers[-1].layernorm_before, x)
    g = image_size // 16
    meta = {
        "family": family,
        "format": "hf",
        "num_prefix_tokens": prefix,
        "grid": [g, g],
        "depth": depth,
        "heads": heads,
        "num_classes": n_labels,
        "layer_norm_eps": eps,
        "dim": dim,
        "patch_size": 16,
        "image_size": [image_size, image_size],
    }
    write_reference(d, x, logits, tokens, meta)
    return d


# ---------------------------------------------------------------- cases

CASES = {
    # (a) odd head count (5 heads of 16), 1000 ImageNet-sized classes, timm eps 1e-6.
    "timm_vit_d80_h5_c1000": lambda: timm_case(
        "timm_vit_d80_h5_c1000", 101, "vit_tiny_patch16_224",
        dict(embed_dim=80, depth=2, num_heads=5, num_classes=1000), HALF, HALF, "vit"),
    # (b) HF ViT, eps 1e-12, ImageNet mean/std in preprocessor_config.json.
    "hf_vit_d96_h3_c7": lambda: hf_case(
        "hf_vit_d96_h3_c7", 102, "vit", 96, 3, 2, 7, 224, 1e-12, IMAGENET_MEAN, IMAGENET_STD),
    # (c) HF DeiT with teacher: [CLS] + [DIST] tokens, two classifiers averaged. 112 px (7x7
    # grid) to keep the fixture small.
    "hf_deit_distilled_img112_d64_h2_c5": lambda: hf_case(
        "hf_deit_distilled_img112_d64_h2_c5", 103, "deit_distilled", 64, 2, 2, 5, 112, 1e-12,
        IMAGENET_MEAN, IMAGENET_STD),
    # (d) HF ViT with pytorch_model.bin only (no safetensors), 112 px.
    "hf_vit_bin_img112_d64_h4_c3": lambda: hf_case(
        "hf_vit_bin_img112_d64_h4_c3", 104, "vit", 64, 4, 2, 3, 112, 1e-12, HALF, HALF,
        safetensors=False),
    # (e) timm deit_tiny_distilled with model_args lacking embed_dim/num_heads (taken from the
    # architecture name: tiny = 192 dim, 3 heads) and num_features null, as in
    # tests/data/deit_distilled_timm/config.json. img_size 112 in model_args overrides the "_224"
    # of the architecture name (and keeps the fixture small).
    "timm_deit_distilled_tiny_img112_d1_c6": lambda: timm_case(
        "timm_deit_distilled_tiny_img112_d1_c6", 105, "deit_tiny_distilled_patch16_224",
        dict(depth=1, num_classes=6, img_size=112), IMAGENET_MEAN, IMAGENET_STD, "deit_distilled",
        num_features_in_config=False),
    # (f) non-224 inputs: the grid must come from the config.
    "timm_vit_img160_d48_h3_c4": lambda: timm_case(
        "timm_vit_img160_d48_h3_c4", 106, "vit_tiny_patch16_224",
        dict(img_size=160, embed_dim=48, depth=2, num_heads=3, num_classes=4), HALF, HALF, "vit"),
    "hf_vit_img96_d48_h3_c4": lambda: hf_case(
        "hf_vit_img96_d48_h3_c4", 107, "vit", 48, 3, 2, 4, 96, 1e-12, HALF, HALF),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="case names (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = args.only or list(CASES)
    for n in names:
        if n not in CASES:
            sys.exit(f"unknown case '{n}'; expected one of {', '.join(CASES)}")
        d = CASES[n]()
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)
        print(f"{n}: {size / 1e6:.2f} MB -> {os.path.relpath(d)}")


if __name__ == "__main__":
    main()
