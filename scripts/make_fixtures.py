#!/usr/bin/env python3
"""Writes tests/data/zoo/<case>/: small random-weight ViT-family checkpoints (ViT, DeiT, DeiT-3,
DINOv2, CLIP, SigLIP) saved exactly as timm and transformers save them, plus PyTorch's outputs for
them, so vitcx's loader and forward pass can be checked against the reference libraries on more
shapes and architectures than the golden cases.

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
    1 + N(0, 0.1) (also timm's per-head q_norm/k_norm), biases N(0, 0.1), class/distillation/
    register tokens, position embeddings, the attention-pool latent (timm `attn_pool.latent`, HF
    SigLIP `head.probe`) and mask tokens N(0, 0.5), LayerScale gammas (timm `ls1/ls2.gamma`, HF
    Dinov2 `layer_scale1/2.lambda1`) 0.5 + N(0, 0.2). Heads get `head_gain` times that, so
    predictions are peaked as in a trained model. The draws happen in `named_parameters` order, one
    per parameter, so the original cases (which have none of the newer parameter kinds) get the
    same weights as before these kinds were added."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            is_norm = ("norm" in name.lower()) and p.dim() == 1
            if leaf in ("gamma", "lambda1"):
                # LayerScale: large enough that the residual branches matter.
                p.copy_(0.5 + 0.2 * torch.randn_like(p))
            elif leaf == "class_embedding" or name.endswith("position_embedding.weight"):
                # HF CLIP's 1-d class token and CLIP/SigLIP's nn.Embedding position table.
                p.copy_(0.5 * torch.randn_like(p))
            elif is_norm and leaf == "weight":
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


def write_timm_config(d, arch, n_cls, num_features, global_pool, model_args, size, mean, std,
                      interpolation="bicubic", crop_pct=0.9):
    """config.json as timm's push_to_hf_hub writes it, with label names."""
    config = {
        "architecture": arch,
        "num_classes": n_cls,
        "num_features": num_features,
        "global_pool": global_pool,
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, size[0], size[1]],
            "mean": mean,
            "std": std,
            "interpolation": interpolation,
            "crop_pct": crop_pct,
            "num_classes": n_cls,
        },
        "label_names": labels(n_cls),
    }
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
        f.write("\n")


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
    write_timm_config(
        d, arch, n_cls, model.num_features if num_features_in_config else None, model.global_pool,
        config_model_args if config_model_args is not None else model_args, (h, w), mean, std)

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


# ---------------------------------------------------------------- newer families (timm)


def prefix_token_names(has_cls, n_reg):
    """Names of the prefix tokens in sequence order: "[CLS]" then "[REG0]", "[REG1]", ..."""
    return (["[CLS]"] if has_cls else []) + [f"[REG{i}]" for i in range(n_reg)]


def timm_arch_case(name, seed, arch, model_args, family, input_hw=None, mean=None, std=None,
                   note=None):
    """Like `timm_case` for the newer timm families (DeiT-3, DINOv2, CLIP, SigLIP, MAE-style,
    qk-norm): `timm.create_model(arch, pretrained=False, **model_args)`, and config.json's
    model_args are exactly those kwargs (the hidden defaults of the architecture function, e.g.
    CLIP's LayerNorm eps 1e-5 or `act_layer='quick_gelu'`, are not written, as on the Hub).
    pretrained_cfg takes mean/std/interpolation/crop_pct from timm's default cfg of `arch` (unless
    `mean`/`std` are given) and `input_size` from the built model. `input_hw` feeds the reference
    at another size than the model was built for (needs `dynamic_img_size=True`); meta's `grid`
    is the grid actually used, `input_size` the size the model was built for. Before writing the
    reference, the saved files are reloaded into a fresh model (strict) and must give the same
    logits bit for bit."""
    import timm
    from safetensors.torch import load_file, save_file

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, **model_args).eval()
    randomise(model, ["head"])

    d = fresh_dir(name)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(d, "model.safetensors"))

    bh, bw = (int(v) for v in model.patch_embed.img_size)
    ph, pw = (int(v) for v in model.patch_embed.patch_size)
    h, w = input_hw if input_hw is not None else (bh, bw)
    dcfg = model.pretrained_cfg
    mean = list(mean if mean is not None else dcfg["mean"])
    std = list(std if std is not None else dcfg["std"])
    n_cls = model.num_classes
    write_timm_config(
        d, arch, n_cls, model.num_features, model.global_pool, model_args, (bh, bw), mean, std,
        dcfg.get("interpolation", "bicubic"), dcfg.get("crop_pct", 0.9))

    x = make_input(h, w, mean, std)
    logits, tokens = run_reference(model, model.blocks[-1].norm1, x)
    if (h, w) != (bh, bw):
        check_resample_formulas()

    # Round trip: the files alone rebuild the same model.
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    again = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"]).eval()
    again.load_state_dict(load_file(os.path.join(d, "model.safetensors")), strict=True)
    with torch.no_grad():
        assert torch.equal(again(x), torch.from_numpy(logits)), "timm reload differs"

    n_reg = int(model.num_reg_tokens)
    norm1 = model.blocks[0].norm1
    meta = {
        "family": family,
        "format": "timm",
        "num_prefix_tokens": int(model.num_prefix_tokens),
        "prefix_tokens": prefix_token_names(model.has_class_token, n_reg),
        "grid": [h // ph, w // pw],
        "depth": len(model.blocks),
        "heads": int(model.blocks[0].attn.num_heads),
        "num_classes": int(n_cls),
        "layer_norm_eps": float(norm1.eps),
        "dim": int(model.embed_dim),
        "patch_size": ph,
        "image_size": [h, w],
        "input_size": [bh, bw],
        "global_pool": model.global_pool,
    }
    if note:
        meta["note"] = note
    write_reference(d, x, logits, tokens, meta)
    return d


def check_resample_formulas(seed=0):
    """Checks, against torch, the two position-embedding resamplings the fixtures use, written out
    so that a re-implementation can follow them (see scripts/README.md):
    - timm `resample_abs_pos_embed` (bicubic, antialias=True, align_corners=None): separable
      filter with PIL's cubic kernel (a = -0.5), support 2 * max(in/out, 1), weights normalised
      to sum 1, taps outside the input dropped (no border clamping);
    - HF Dinov2 (bicubic, align_corners=False, no antialias): Keys cubic with a = -0.75 at
      src = (dst + 0.5) * in/out - 0.5, 4 taps floor(src)-1 .. floor(src)+2 clamped to the border."""
    import torch.nn.functional as F

    def cubic(x, a):
        x = abs(x)
        if x < 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        if x < 2:
            return (((x - 5) * x + 8) * x - 4) * a
        return 0.0

    def aa_matrix(n_in, n_out):
        scale = n_in / n_out
        support = 2.0 * scale if scale >= 1.0 else 2.0
        inv = 1.0 / scale if scale >= 1.0 else 1.0
        m = np.zeros((n_out, n_in))
        for i in range(n_out):
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), n_in)
            ws = [cubic((j - center + 0.5) * inv, -0.5) for j in range(lo, hi)]
            tot = sum(ws)
            for j, wj in zip(range(lo, hi), ws):
                m[i, j] = wj / tot
        return m

    def keys_matrix(n_in, n_out):
        scale = n_in / n_out
        m = np.zeros((n_out, n_in))
        for i in range(n_out):
            src = (i + 0.5) * scale - 0.5
            f = math.floor(src)
            t = src - f
            for k in range(-1, 3):
                j = min(max(f + k, 0), n_in - 1)
                m[i, j] += cubic(t - k, -0.75)
        return m

    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for (ih, iw), (oh, ow) in [((8, 8), (9, 11)), ((8, 8), (6, 6)), ((9, 9), (5, 13))]:
        pe = torch.randn(1, 5, ih, iw, generator=g)
        for aa, mk in ((True, aa_matrix), (False, keys_matrix)):
            ref = F.interpolate(pe, size=(oh, ow), mode="bicubic", align_corners=False,
                                antialias=aa).numpy()
            mine = np.einsum("oh,chw,pw->cop", mk(ih, oh), pe[0].double().numpy(), mk(iw, ow))
            worst = max(worst, float(np.abs(mine - ref[0]).max()))
    assert worst < 1e-5, worst
    return worst


# ---------------------------------------------------------------- newer families (transformers)


def hf_arch_case(name, seed, kind, dim, heads, depth, n_labels, image_size, crop=None,
                 n_reg=0, note=None):
    """transformers models built from a small config with `Model(config)`: Dinov2 and
    Dinov2WithRegisters (patch 14, BitImageProcessor: shortest-edge resize, center crop),
    CLIPForImageClassification (CLIPImageProcessor) and SiglipForImageClassification
    (SiglipImageProcessor: plain resize), saved with `save_pretrained` plus the processor's
    `save_pretrained`. `image_size` is the config's (the position table), `crop` the processor's
    output size when it differs (Dinov2 then interpolates the position embeddings at run time);
    the reference input has the processor's output size. The saved folder is reloaded with
    `from_pretrained` and must give the same logits bit for bit."""
    import transformers as tf

    torch.manual_seed(seed)
    id2label = {i: l for i, l in enumerate(labels(n_labels))}
    label2id = {l: i for i, l in enumerate(labels(n_labels))}
    crop = crop or image_size
    if kind in ("dinov2", "dinov2_reg"):
        patch, eps = 14, 1e-6
        common = dict(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
                      image_size=image_size, patch_size=patch, layer_norm_eps=eps,
                      id2label=id2label, label2id=label2id)
        if kind == "dinov2":
            cls_ = tf.Dinov2ForImageClassification
            config = tf.Dinov2Config(**common)
            model = cls_(config).eval()
            backbone = model.dinov2
        else:
            cls_ = tf.Dinov2WithRegistersForImageClassification
            config = tf.Dinov2WithRegistersConfig(num_register_tokens=n_reg, **common)
            model = cls_(config).eval()
            backbone = model.dinov2_with_registers
        layers, norm_name = backbone.encoder.layer, "norm1"
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        # As facebook/dinov2-*: resize the shortest edge to 8/7 of the crop, bicubic, crop.
        processor = tf.BitImageProcessor(
            size={"shortest_edge": crop * 8 // 7}, crop_size={"height": crop, "width": crop},
            do_center_crop=True, resample=3, image_mean=mean, image_std=std)
        prefix = prefix_token_names(True, n_reg)
    elif kind == "clip":
        patch = 16
        vision = dict(hidden_size=dim, intermediate_size=4 * dim, num_hidden_layers=depth,
                      num_attention_heads=heads, image_size=image_size, patch_size=patch)
        # The text tower is not part of the *ForImageClassification model (only its config is).
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=1)
        config = tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32,
                               id2label=id2label, label2id=label2id)
        cls_ = tf.CLIPForImageClassification
        model = cls_(config).eval()
        layers, norm_name = model.vision_model.encoder.layers, "layer_norm1"
        eps = config.vision_config.layer_norm_eps
        mean = [0.48145466, 0.4578275, 0.40821073]
        std = [0.26862954, 0.26130258, 0.27577711]
        # As openai/clip-vit-*: shortest edge to the crop size, bicubic, center crop.
        processor = tf.CLIPImageProcessor(
            size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop},
            do_center_crop=True, resample=3, image_mean=mean, image_std=std)
        prefix = ["[CLS]"]
    elif kind == "siglip":
        patch = 16
        vision = dict(hidden_size=dim, intermediate_size=4 * dim, num_hidden_layers=depth,
                      num_attention_heads=heads, image_size=image_size, patch_size=patch)
        # The text tower is not part of the *ForImageClassification model (only its config is).
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=1)
        config = tf.SiglipConfig(text_config=text, vision_config=vision,
                                 id2label=id2label, label2id=label2id)
        cls_ = tf.SiglipForImageClassification
        model = cls_(config).eval()
        layers, norm_name = model.vision_model.encoder.layers, "layer_norm1"
        eps = config.vision_config.layer_norm_eps
        mean, std = HALF, HALF
        # As google/siglip-*: plain resize to (crop, crop), bicubic, no crop.
        processor = tf.SiglipImageProcessor(
            size={"height": crop, "width": crop}, resample=3, image_mean=mean, image_std=std)
        prefix = []
    else:
        raise ValueError(kind)
    randomise(model, ["classifier"])

    d = fresh_dir(name)
    model.save_pretrained(d)
    processor.save_pretrained(d)

    x = make_input(crop, crop, mean, std)
    logits, tokens = run_reference(model, getattr(layers[-1], norm_name), x)
    if crop != image_size:
        check_resample_formulas()

    again = cls_.from_pretrained(d).eval()
    with torch.no_grad():
        assert torch.equal(again(x).logits, torch.from_numpy(logits)), "HF reload differs"

    g = crop // patch
    meta = {
        "family": kind,
        "format": "hf",
        "num_prefix_tokens": len(prefix),
        "prefix_tokens": prefix,
        "grid": [g, g],
        "depth": depth,
        "heads": heads,
        "num_classes": n_labels,
        "layer_norm_eps": eps,
        "dim": dim,
        "patch_size": patch,
        "image_size": [crop, crop],
        "input_size": [image_size, image_size],
    }
    if note:
        meta["note"] = note
    write_reference(d, x, logits, tokens, meta)
    return d


# ---------------------------------------------------------------- BEiT and EVA-02


def relpos_randomise(model, head_names):
    """`randomise`, then LayerScale gammas (timm BEiT/EVA `gamma_1/2`, HF BEiT `lambda_1/2`) at
    0.5 + N(0, 0.2) so that both residual branches matter (randomise's 0.1 * N would all but switch
    them off). Relative position bias tables get randomise's N(0, 0.5) already."""
    randomise(model, head_names)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("gamma_1", "gamma_2", "lambda_1", "lambda_2"):
                p.copy_(0.5 + 0.2 * torch.randn_like(p))


def timm_relpos_case(name, seed, arch, model_args, family, note=None):
    """A timm `beit*` or `eva02*` model: as `timm_arch_case` (config.json's model_args are exactly
    the kwargs; the architecture function's own options, e.g. EVA-02's `ref_feat_shape=(16, 16)`,
    SwiGLU and rotary embedding, are not written, as on the Hub), with LayerScale drawn large.
    The saved files are reloaded into a fresh model (strict) and must give the same logits."""
    import timm
    from safetensors.torch import load_file, save_file

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, **model_args).eval()
    relpos_randomise(model, ["head"])

    d = fresh_dir(name)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(d, "model.safetensors"))
    h, w = (int(v) for v in model.patch_embed.img_size)
    ph, _ = (int(v) for v in model.patch_embed.patch_size)
    dcfg = model.pretrained_cfg
    mean, std = list(dcfg["mean"]), list(dcfg["std"])
    n_cls = model.num_classes
    write_timm_config(
        d, arch, n_cls, model.num_features, model.global_pool, model_args, (h, w), mean, std,
        dcfg.get("interpolation", "bicubic"), dcfg.get("crop_pct", 0.9))

    x = make_input(h, w, mean, std)
    logits, tokens = run_reference(model, model.blocks[-1].norm1, x)
    again = timm.create_model(arch, pretrained=False, **model_args).eval()
    again.load_state_dict(load_file(os.path.join(d, "model.safetensors")), strict=True)
    with torch.no_grad():
        assert torch.equal(again(x), torch.from_numpy(logits)), "timm reload differs"

    meta = {
        "family": family,
        "format": "timm",
        "num_prefix_tokens": int(model.num_prefix_tokens),
        "prefix_tokens": ["[CLS]"],
        "grid": [h // ph, w // ph],
        "depth": len(model.blocks),
        "heads": int(model.blocks[0].attn.num_heads),
        "num_classes": int(n_cls),
        "layer_norm_eps": float(model.blocks[0].norm1.eps),
        "dim": int(model.embed_dim),
        "patch_size": ph,
        "image_size": [h, w],
        "input_size": [h, w],
        "global_pool": model.global_pool,
    }
    if note:
        meta["note"] = note
    write_reference(d, x, logits, tokens, meta)
    return d


def hf_beit_case(name, seed, dim, heads, depth, n_labels, image_size, shared, mean_pool,
                 abs_pos, with_index, note=None):
    """transformers' BeitForImageClassification from a small config (patch 16, eps 1e-12 as
    transformers' default): per-block (`use_relative_position_bias`) or shared
    (`use_shared_relative_position_bias`) bias, mean pooling + `pooler.layernorm` or [CLS] +
    `layernorm`, optional absolute position embeddings. BeitImageProcessor as
    microsoft/beit-base-patch16-224 ships it (plain resize, mean/std 0.5). `with_index` adds the
    int64 `relative_position_index` buffers that transformers 4.x saved (and the Hub's BEiT files
    hold), which a loader must skip. The saved folder is reloaded with `from_pretrained` and must
    give the same logits bit for bit."""
    import transformers as tf
    from safetensors.torch import load_file, save_file

    torch.manual_seed(seed)
    config = tf.BeitConfig(
        hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
        intermediate_size=4 * dim, image_size=image_size, patch_size=16, layer_norm_eps=1e-12,
        use_relative_position_bias=not shared, use_shared_relative_position_bias=shared,
        use_absolute_position_embeddings=abs_pos, use_mean_pooling=mean_pool,
        layer_scale_init_value=0.1,
        id2label={i: l for i, l in enumerate(labels(n_labels))},
        label2id={l: i for i, l in enumerate(labels(n_labels))},
    )
    model = tf.BeitForImageClassification(config).eval()
    relpos_randomise(model, ["classifier"])
    mean, std = HALF, HALF
    processor = tf.BeitImageProcessor(
        do_resize=True, size={"height": image_size, "width": image_size}, resample=2,
        do_center_crop=False, image_mean=mean, image_std=std)

    d = fresh_dir(name)
    model.save_pretrained(d)
    processor.save_pretrained(d)
    x = make_input(image_size, image_size, mean, std)
    logits, tokens = run_reference(model, hf_layers(model.beit)[-1].layernorm_before, x)
    again = tf.BeitForImageClassification.from_pretrained(d).eval()
    with torch.no_grad():
        assert torch.equal(again(x).logits, torch.from_numpy(logits)), "HF reload differs"
    if with_index:
        st = os.path.join(d, "model.safetensors")
        state = load_file(st)
        g = image_size // 16
        index = tf.models.beit.modeling_beit.BeitRelativePositionBias.generate_relative_position_index((g, g))
        for k in list(state):
            if k.endswith("relative_position_bias_table"):
                state[k[: -len("relative_position_bias_table")] + "relative_position_index"] = \
                    index.clone().contiguous()
        save_file(state, st, metadata={"format": "pt"})

    g = image_size // 16
    meta = {
        "family": "beit",
        "format": "hf",
        "num_prefix_tokens": 1,
        "prefix_tokens": ["[CLS]"],
        "grid": [g, g],
        "depth": depth,
        "heads": heads,
        "num_classes": n_labels,
        "layer_norm_eps": 1e-12,
        "dim": dim,
        "patch_size": 16,
        "image_size": [image_size, image_size],
        "input_size": [image_size, image_size],
    }
    if note:
        meta["note"] = note
    write_reference(d, x, logits, tokens, meta)
    return d


RELPOS_CASES = {
    # BEiT (timm): shared relative position bias (as BEiT's self-supervised checkpoints), plus an
    # absolute position embedding, LayerScale, mean pooling + fc_norm; 112 px (7x7).
    "beit_timm_shared_abs_img112_d48_h3_c5": lambda: timm_relpos_case(
        "beit_timm_shared_abs_img112_d48_h3_c5", 121, "beit_base_patch16_224",
        dict(img_size=112, embed_dim=48, depth=2, num_heads=3, num_classes=5,
             use_rel_pos_bias=False, use_shared_rel_pos_bias=True, use_abs_pos_emb=True),
        "beit"),
    # BEiT v2 (timm): a relative position bias table per block, no absolute position embedding,
    # ImageNet mean/std; 96 px (6x6), depth 3.
    "beit_timm_v2_img96_d60_h5_c7": lambda: timm_relpos_case(
        "beit_timm_v2_img96_d60_h5_c7", 122, "beitv2_base_patch16_224",
        dict(img_size=96, embed_dim=60, depth=3, num_heads=5, num_classes=7), "beit"),
    # BEiT (HF BeitForImageClassification): per-block bias, mean pooling, the int64
    # relative_position_index buffers of the Hub's files; 96 px.
    "beit_hf_relpos_img96_d48_h3_c4": lambda: hf_beit_case(
        "beit_hf_relpos_img96_d48_h3_c4", 123, 48, 3, 2, 4, 96, shared=False, mean_pool=True,
        abs_pos=False, with_index=True),
    # BEiT (HF): shared bias, absolute position embedding, [CLS] pooling with the final layernorm.
    "beit_hf_shared_cls_img80_d48_h2_c3": lambda: hf_beit_case(
        "beit_hf_shared_cls_img80_d48_h2_c3", 124, 48, 2, 2, 3, 80, shared=True, mean_pool=False,
        abs_pos=True, with_index=False),
    # EVA-02 tiny/small layout (timm): fused qkv with q_bias/v_bias, packed SwiGLU (GluMlp), rotary
    # embedding with ref_feat_shape (16, 16) on an 8x8 grid (positions scaled by 2, as a 448 px
    # model), patch 14, 112 px.
    "eva02_timm_fused_img112_d48_h3_c5": lambda: timm_relpos_case(
        "eva02_timm_fused_img112_d48_h3_c5", 125, "eva02_tiny_patch14_224",
        dict(img_size=112, embed_dim=48, depth=2, num_heads=3, num_classes=5), "eva02"),
    # EVA-02 base/large layout (timm): separate q/k/v projections (k without bias), SwiGLU with
    # its inner LayerNorm (scale_mlp), rotary embedding on the 16x16 grid it was made for; 224 px.
    "eva02_timm_sep_img224_d48_h2_c3": lambda: timm_relpos_case(
        "eva02_timm_sep_img224_d48_h2_c3", 126, "eva02_base_patch14_224",
        dict(embed_dim=48, depth=2, num_heads=2, num_classes=3), "eva02"),
}


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
    # ---- newer families (timm). model_args are exactly the kwargs passed to create_model; the
    # architecture function's own defaults (layer scale, registers, no_embed_class, CLIP's eps
    # 1e-5 and pre-norm, quick_gelu, SigLIP's class_token=False / global_pool) are not written.
    # (g) DeiT-3: no_embed_class (pos_embed has no [CLS] row; added to the patches before the
    # [CLS] is prepended) and LayerScale (ls1/ls2.gamma); 112 px (7x7) to keep the zoo small.
    "timm_deit3_img112_d48_h3_c5": lambda: timm_arch_case(
        "timm_deit3_img112_d48_h3_c5", 108, "deit3_small_patch16_224",
        dict(img_size=112, embed_dim=48, depth=2, num_heads=3, num_classes=5), "deit3"),
    # (h) DINOv2 with 4 registers: patch 14, 126 px (9x9), [CLS] + 4 [REG], no_embed_class,
    # LayerScale.
    "timm_dinov2_reg4_img126_d48_h3_c4": lambda: timm_arch_case(
        "timm_dinov2_reg4_img126_d48_h3_c4", 109, "vit_small_patch14_reg4_dinov2",
        dict(img_size=126, embed_dim=48, depth=2, num_heads=3, num_classes=4), "dinov2"),
    # (i) DINOv2 built for 112 px (8x8 position table) with dynamic_img_size, run on a 126x154
    # input (9x11 grid): timm resamples the position table (bicubic, antialias) at run time.
    "timm_dinov2_dyn112_in126x154_d60_h5_c3": lambda: timm_arch_case(
        "timm_dinov2_dyn112_in126x154_d60_h5_c3", 110, "vit_small_patch14_dinov2",
        dict(img_size=112, dynamic_img_size=True, embed_dim=60, depth=2, num_heads=5,
             num_classes=3), "dinov2", input_hw=(126, 154),
        note="position table 8x8 resampled to 9x11 by timm resample_abs_pos_embed "
             "(bicubic, antialias=True, align_corners=None); [CLS] keeps its own row"),
    # (j) CLIP image tower with QuickGELU: pre-norm (norm_pre), LayerNorm eps 1e-5, patch
    # embedding without bias, OpenAI CLIP mean/std; 224 px from the name (no img_size).
    "timm_clip_quickgelu_d48_h3_c6": lambda: timm_arch_case(
        "timm_clip_quickgelu_d48_h3_c6", 111, "vit_base_patch16_clip_quickgelu_224",
        dict(embed_dim=48, depth=2, num_heads=3, num_classes=6), "clip"),
    # (k) CLIP image tower with exact GELU at 128 px (8x8).
    "timm_clip_img128_d48_h3_c4": lambda: timm_arch_case(
        "timm_clip_img128_d48_h3_c4", 112, "vit_base_patch16_clip_224",
        dict(img_size=128, embed_dim=48, depth=2, num_heads=3, num_classes=4), "clip"),
    # (l) SigLIP: no class token (0 prefix tokens), global_pool 'map' (AttentionPoolLatent).
    "timm_siglip_map_img96_d60_h5_c7": lambda: timm_arch_case(
        "timm_siglip_map_img96_d60_h5_c7", 113, "vit_base_patch16_siglip_224",
        dict(img_size=96, embed_dim=60, depth=2, num_heads=5, num_classes=7), "siglip"),
    # (m) SigLIP GAP: no class token, mean of all tokens after the final norm, no fc_norm.
    "timm_siglip_gap_img96_d48_h3_c8": lambda: timm_arch_case(
        "timm_siglip_gap_img96_d48_h3_c8", 114, "vit_base_patch16_siglip_gap_224",
        dict(img_size=96, embed_dim=48, depth=2, num_heads=3, num_classes=8), "siglip"),
    # (n) MAE-style: global_pool 'avg' -> no final norm, mean of the patch tokens, fc_norm.
    "timm_vit_gap_img112_d48_h3_c10": lambda: timm_arch_case(
        "timm_vit_gap_img112_d48_h3_c10", 115, "vit_base_patch16_224",
        dict(img_size=112, embed_dim=48, depth=2, num_heads=3, num_classes=10,
             global_pool="avg"), "vit", mean=IMAGENET_MEAN, std=IMAGENET_STD),
    # (o) qk_norm (per-head LayerNorm on q and k), no qkv bias, tanh-approximated GELU, depth 3.
    "timm_vit_qknorm_img96_d60_h5_c9": lambda: timm_arch_case(
        "timm_vit_qknorm_img96_d60_h5_c9", 116, "vit_small_patch16_224",
        dict(img_size=96, embed_dim=60, depth=3, num_heads=5, num_classes=9, qk_norm=True,
             qkv_bias=False, act_layer="gelu_tanh"), "vit"),
    # ---- newer families (transformers)
    # (p) Dinov2ForImageClassification: position table for 112 px (8x8), processor crops 84 px
    # (6x6), so the model interpolates the table at run time; head on [CLS ; mean(patches)].
    "hf_dinov2_img112_crop84_d48_h3_c5": lambda: hf_arch_case(
        "hf_dinov2_img112_crop84_d48_h3_c5", 117, "dinov2", 48, 3, 2, 5, 112, crop=84,
        note="position table 8x8 interpolated to 6x6 by HF Dinov2 (bicubic, align_corners=False, "
             "no antialias); [CLS] keeps its own row"),
    # (q) Dinov2WithRegisters: [CLS], 4 registers (no position embedding), then patches; 98 px.
    "hf_dinov2_reg4_img98_d48_h3_c4": lambda: hf_arch_case(
        "hf_dinov2_reg4_img98_d48_h3_c4", 118, "dinov2_reg", 48, 3, 2, 4, 98, n_reg=4),
    # (r) CLIPForImageClassification: pre_layrnorm, quick_gelu, eps 1e-5, mean of the patch
    # tokens of the last block's output (post_layernorm unused), 96 px.
    "hf_clip_img96_d60_h3_c6": lambda: hf_arch_case(
        "hf_clip_img96_d60_h3_c6", 119, "clip", 60, 3, 2, 6, 96),
    # (s) SiglipForImageClassification: no [CLS], post_layernorm, mean of all tokens,
    # gelu_pytorch_tanh, eps 1e-6 (vision head.* saved but unused), 96 px.
    "hf_siglip_img96_d48_h3_c3": lambda: hf_arch_case(
        "hf_siglip_img96_d48_h3_c3", 120, "siglip", 48, 3, 2, 3, 96),
}


# ---------------------------------------------------------------- Swin (tests/data/swin_zoo)

SWIN_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data",
                         "swin_zoo")


def swin_reference(model, last_norm1, first_block, x):
    """Logits (2, C), the last block's norm1 output and the output of stage 0's block 1 (a
    shifted block), both as tokens (2, H*W, C) in row-major grid order."""
    captured = {}

    def grab(key):
        def hook(_m, _i, out):
            out = out[0] if isinstance(out, tuple) else out
            captured[key] = out.detach().clone()
        return hook

    handles = [last_norm1.register_forward_hook(grab("norm1")),
               first_block.register_forward_hook(grab("block"))]
    with torch.no_grad():
        out = model(x)
    for h in handles:
        h.remove()
    logits = out if isinstance(out, torch.Tensor) else out.logits
    flat = []
    for key in ("norm1", "block"):
        t = captured[key]
        flat.append(t.reshape(t.shape[0], -1, t.shape[-1]).float().numpy())
    return logits.float().numpy(), flat[0], flat[1]


def write_swin_reference(d, x, logits, tokens, first, meta):
    ref = os.path.join(d, "reference")
    os.makedirs(ref, exist_ok=True)
    np.save(os.path.join(ref, "input.npy"), x.numpy().astype(np.float32))
    np.save(os.path.join(ref, "logits.npy"), logits.astype(np.float32))
    np.save(os.path.join(ref, "tokens.npy"), tokens.astype(np.float32))
    np.save(os.path.join(ref, "tokens_first.npy"), first.astype(np.float32))
    gh, gw = meta["grid"]
    assert tokens.shape == (2, gh * gw, meta["dim"]), tokens.shape
    with open(os.path.join(ref, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


def swin_timm_case(name, seed, model_args, n_cls, old_layout=False, other_size=None):
    """A timm SwinTransformer (`swin_tiny_patch4_window7_224` + `model_args`), saved as timm's hub
    format. `old_layout`: the state dict renamed to the original Microsoft layout (patch merging
    at the end of a stage, `layers.0.downsample`; classifier `head.*`), which timm's
    `checkpoint_filter_fn` converts back (checked here). `other_size`: also the logits of the
    same weights built at that input size (`create_model(img_size=...)`), in reference/at<S>/."""
    import timm
    from safetensors.torch import save_file
    from timm.models.swin_transformer import checkpoint_filter_fn

    arch = "swin_tiny_patch4_window7_224"
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=n_cls, **model_args).eval()
    randomise(model, ["head.fc"])
    d = fresh_dir_in(SWIN_ROOT, name)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if old_layout:
        import re
        old = {}
        for k, v in state.items():
            k = re.sub(r"layers\.(\d+)\.downsample",
                       lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
            k = k.replace("head.fc.", "head.")
            old[k] = v
        again = timm.create_model(arch, pretrained=False, num_classes=n_cls, **model_args).eval()
        again.load_state_dict(checkpoint_filter_fn(old, again))
        state_back = again.state_dict()
        assert all(torch.equal(state_back[k], v) for k, v in state.items())
        state = old
    save_file(state, os.path.join(d, "model.safetensors"))
    img = model_args["img_size"]
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    write_timm_config(
        d, arch, n_cls, model.num_features, "avg", dict(model_args, num_classes=n_cls), (img, img),
        mean, std)
    x = make_input(img, img, mean, std)
    last = model.layers[-1].blocks[-1]
    logits, tokens, first = swin_reference(model, last.norm1, model.layers[0].blocks[1], x)
    gh, gw = last.input_resolution
    meta = {
        "family": "swin",
        "format": "timm",
        "num_prefix_tokens": 0,
        "grid": [int(gh), int(gw)],
        "first_tap": "layers.0.blocks.1",
        "first_grid": [int(g) for g in model.layers[0].blocks[1].input_resolution],
        "first_dim": int(model.layers[0].blocks[1].dim),
        "depth": sum(len(s.blocks) for s in model.layers),
        "heads": [int(s.blocks[0].attn.num_heads) for s in model.layers],
        "num_classes": n_cls,
        "layer_norm_eps": float(last.norm1.eps),
        "dim": int(last.dim),
        "patch_size": int(model.patch_embed.patch_size[0]),
        "image_size": [img, img],
        "old_layout": old_layout,
    }
    write_swin_reference(d, x, logits, tokens, first, meta)
    if other_size:
        built = timm.create_model(arch, pretrained=False, num_classes=n_cls,
                                  **dict(model_args, img_size=other_size)).eval()
        built.load_state_dict(model.state_dict())
        xo = make_input(other_size, other_size, mean, std)
        with torch.no_grad():
            lo = built(xo).float().numpy()
        at = os.path.join(d, "reference", f"at{other_size}")
        os.makedirs(at)
        np.save(os.path.join(at, "input.npy"), xo.numpy().astype(np.float32))
        np.save(os.path.join(at, "logits.npy"), lo.astype(np.float32))
    return d


def swin_hf_case(name, seed, image_size, embed_dim, depths, heads, n_labels):
    """A transformers SwinForImageClassification saved with save_pretrained, plus its image
    processor."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.SwinConfig(
        image_size=image_size, patch_size=4, embed_dim=embed_dim, depths=depths,
        num_heads=heads, window_size=7,
        id2label={i: l for i, l in enumerate(labels(n_labels))},
        label2id={l: i for i, l in enumerate(labels(n_labels))},
    )
    model = tf.SwinForImageClassification(config).eval()
    randomise(model, ["classifier"])
    d = fresh_dir_in(SWIN_ROOT, name)
    hf_save_weights(model, d, True)
    tf.ViTImageProcessor(size={"height": image_size, "width": image_size},
                         image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(d)
    x = make_input(image_size, image_size, IMAGENET_MEAN, IMAGENET_STD)
    stages = model.swin.encoder.layers
    last = stages[-1].blocks[-1]
    logits, tokens, first = swin_reference(model, last.layernorm_before, stages[0].blocks[1], x)
    g = image_size // 4 // 2 ** (len(depths) - 1)
    meta = {
        "family": "swin",
        "format": "hf",
        "num_prefix_tokens": 0,
        "grid": [g, g],
        "first_tap": "layers.0.blocks.1",
        "first_grid": [image_size // 4, image_size // 4],
        "first_dim": embed_dim,
        "depth": sum(depths),
        "heads": list(heads),
        "num_classes": n_labels,
        "layer_norm_eps": float(config.layer_norm_eps),
        "dim": embed_dim * 2 ** (len(depths) - 1),
        "patch_size": 4,
        "image_size": [image_size, image_size],
    }
    write_swin_reference(d, x, logits, tokens, first, meta)
    return d


def fresh_dir_in(root, name):
    d = os.path.join(root, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    return d


SWIN_CASES = {
    # Four stages (56, 28, 14, 7 grids: patch 2 at 112 px), window 7 shrinking to nothing to
    # shift in the last stage, 3 heads everywhere (odd), MLP ratio 2 to keep it small.
    "timm_swin_p2_img112_d6_c5": lambda: swin_timm_case(
        "timm_swin_p2_img112_d6_c5", 201,
        dict(img_size=112, patch_size=2, embed_dim=6, depths=(2, 2, 2, 2),
             num_heads=(3, 3, 3, 3), window_size=7, mlp_ratio=2.0), 5),
    # Two stages (28, 14), heads (2, 5), saved in the original layout (merge at the end of a
    # stage, `head.*`); also run at 56 px (14, 7 grids: the second stage stops shifting).
    "timm_swin_old_img112_d20_c7": lambda: swin_timm_case(
        "timm_swin_old_img112_d20_c7", 202,
        dict(img_size=112, embed_dim=20, depths=(2, 2), num_heads=(2, 5), window_size=7), 7,
        old_layout=True, other_size=56),
    # Hugging Face SwinForImageClassification: three stages (28, 14, 7), 3 heads.
    "hf_swin_img112_d12_c6": lambda: swin_hf_case(
        "hf_swin_img112_d12_c6", 203, 112, 12, [2, 2, 2], [3, 3, 3], 6),
}
CASES.update(SWIN_CASES)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="case names (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    CASES.update(RELPOS_CASES)
    names = args.only or list(CASES)
    for n in names:
        if n not in CASES:
            sys.exit(f"unknown case '{n}'; expected one of {', '.join(CASES)}")
        d = CASES[n]()
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)
        print(f"{n}: {size / 1e6:.2f} MB -> {os.path.relpath(d)}")


if __name__ == "__main__":
    main()
