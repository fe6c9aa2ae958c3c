#!/usr/bin/env python3
"""Time the PyTorch reference ViT forward pass, for side-by-side comparison with `vitcx bench`.

Run by hand (CI never runs it). Needs torch and timm:

    python3 -m venv /tmp/fixenv && /tmp/fixenv/bin/pip install torch timm
    /tmp/fixenv/bin/python scripts/bench_pytorch.py                      # ViT-B/16, batch 1/8/32, f32 + bf16
    /tmp/fixenv/bin/python scripts/bench_pytorch.py --preset tiny --batch 1 --repeats 1
    /tmp/fixenv/bin/python scripts/bench_pytorch.py --arch vit_base_patch14_reg4_dinov2 --batch 8 \\
        --dtypes f32 --vitcx target/release/vitcx --vitcx-args --precision f32
    /tmp/fixenv/bin/python scripts/bench_pytorch.py --threads 2 \\
        --vitcx target/release/vitcx                                     # then runs `vitcx bench --json`

It builds timm's `vit_base_patch16_224` (or `vit_tiny_patch16_224` with `--preset tiny`) with
`pretrained=False` (random weights, as `vitcx bench`), in eval mode under `torch.inference_mode()`,
with `torch.set_num_threads(--threads)` (default 2), and times the forward pass at each batch size
in f32, under `torch.autocast("cpu", dtype=torch.bfloat16)` and with the blocks' Linear layers
dynamically quantised to int8 (`torch.ao.quantization.quantize_dynamic`, as `--precision int8`
leaves the patch embedding and head in f32): one warm-up run (`--warmup`), then
the median of `--repeats` runs (default 3), as seconds per image and GFLOP/s.

stdout gets one JSON object with the keys of `vitcx bench --json` (`forward_s_per_image`,
`forward_s_per_image_bf16`, `forward_gflops`, `explain_s_per_mask` (null: the reference's
explanation is not timed here), `peak_rss_bytes`, `machine`, ...). With `--vitcx PATH` it then runs
`PATH bench --json` with the same preset, batches and repeats, and prints
`{"pytorch": {...}, "vitcx": {...}, "speedup": {...}}` instead, where speedup = PyTorch seconds /
vitcx seconds per image (above 1: vitcx is faster), plus a table on stderr.
Progress goes to stderr. Timings on a shared machine are noisy: `machine.loadavg` records the load.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

PRESETS = {
    # name: (timm architecture, dim, depth, heads, mlp, patch, image, classes)
    "base": ("vit_base_patch16_224", 768, 12, 12, 3072, 16, 224, 1000),
    "tiny": ("vit_tiny_patch16_224", 192, 12, 3, 768, 16, 224, 1000),
}


def flops_per_image(dim, depth, mlp, patch, image, classes):
    """Same count as vitcx::bench::Arch::flops_per_image (2 per multiply-add)."""
    t = 1 + (image // patch) ** 2
    embed = (t - 1) * 3 * patch * patch * dim
    block = t * dim * 3 * dim + 2 * t * t * dim + t * dim * dim + 2 * t * dim * mlp
    return 2.0 * (embed + depth * block + dim * classes)


def peak_rss_bytes():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info(threads):
    cpu_model, logical, flags = None, None, []
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        lines = text.splitlines()
        logical = sum(1 for l in lines if l.startswith("processor")) or None
        for l in lines:
            if l.startswith("model name") and cpu_model is None:
                cpu_model = l.split(":", 1)[1].strip()
            if l.startswith("flags") and not flags:
                flags = l.split(":", 1)[1].split()
    except OSError:
        pass
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "amx_bf16"]
    try:
        loadavg = open("/proc/loadavg").read().strip()
    except OSError:
        loadavg = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": cpu_model or platform.processor() or None,
        "logical_cpus": logical,
        "available_parallelism": usable,
        "torch_threads": threads,
        "features": [f for f in wanted if f in flags],
        "avx512": "avx512f" in flags,
        "loadavg": loadavg,
    }


def per_batch(d):
    """One value for a single batch size, else a map "batch" -> value (as vitcx prints)."""
    return next(iter(d.values())) if len(d) == 1 else {str(k): v for k, v in d.items()}


# Short --arch names (as vitcx bench --arch takes them) for timm architectures.
ARCH_ALIASES = {"swin_tiny": "swin_tiny_patch4_window7_224"}


def swin_flops(model):
    """Same count as vitcx::model::families::swin::random::SwinArch::flops_per_image for a timm
    SwinTransformer: patch embedding, merges, per block qkv, windowed attention, proj, MLP, head."""
    patch = model.patch_embed.patch_size[0]
    image = model.patch_embed.img_size[0]
    g = image // patch
    macs = g * g * 3 * patch * patch * model.layers[0].blocks[0].dim
    prev = None
    for stage in model.layers:
        blk = stage.blocks[0]
        d = blk.dim
        g = blk.input_resolution[0]
        if prev is not None:
            macs += g * g * 4 * prev * d
        n, t, m = g * g, blk.window_size[0] * blk.window_size[1], blk.mlp.fc1.out_features
        macs += len(stage.blocks) * (n * d * 3 * d + 2 * n * t * d + n * d * d + 2 * n * d * m)
        prev = d
    return 2.0 * (macs + prev * model.num_classes), image


def arch_flops(model):
    """The same count for any timm VisionTransformer, BEiT or EVA (blocks, patch embedding and head; an
    attention pool is left out, as vitcx leaves it out), and its input side."""
    import torch

    dim, depth = model.embed_dim, len(model.blocks)
    # The MLP's weights as the hidden width of a plain two-matrix MLP (SwiGLU's three matrices of
    # EVA-02 count as they multiply; BEiT's and ViT's MLP is fc1.out_features).
    mlp = sum(m.in_features * m.out_features for m in model.blocks[0].mlp.modules()
              if isinstance(m, torch.nn.Linear)) // (2 * dim)
    patch = model.patch_embed.patch_size[0]
    image = model.patch_embed.img_size[0]
    grid = (image // patch) ** 2
    t = model.num_prefix_tokens + grid
    embed = grid * 3 * patch * patch * dim
    block = t * dim * 3 * dim + 2 * t * t * dim + t * dim * dim + 2 * t * dim * mlp
    return 2.0 * (embed + depth * block + dim * model.num_classes), image


def int8_model(torch, model):
    """The model with its blocks' Linear layers dynamically quantised with PyTorch's default
    dynamic qconfig (int8 weights per tensor, uint8 activations per tensor at run time), the
    patch embedding and the head left in f32 as vitcx's --precision int8 leaves them."""
    import copy
    q = copy.deepcopy(model)
    blocks = q.layers if hasattr(q, "layers") else q.blocks
    quantised = torch.ao.quantization.quantize_dynamic(blocks, {torch.nn.Linear}, dtype=torch.qint8)
    if hasattr(q, "layers"):
        q.layers = quantised
    else:
        q.blocks = quantised
    return q


def logits_rel_l2(torch, model, qmodel, image):
    """|l_int8 - l_f32| / |l_f32| on one random image, the error `vitcx bench` reports as
    int8_fidelity.logits_rel_l2."""
    x = torch.randn(1, 3, image, image, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = model(x), qmodel(x)
    return float((b - a).norm() / a.norm())


def time_forward(torch, model, batch, repeats, warmup, bf16, image=224):
    x = torch.randn(batch, 3, image, image, generator=torch.Generator().manual_seed(0))
    runs = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(warmup + repeats):
            t = time.perf_counter()
            model(x)
            if i >= warmup:
                runs.append(time.perf_counter() - t)
    return runs


def bench_pytorch(args):
    import timm
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.arch:
        name = ARCH_ALIASES.get(args.arch, args.arch)
        model = timm.create_model(name, pretrained=False, num_classes=1000).eval()
        flops, image = (swin_flops if hasattr(model, "layers") else arch_flops)(model)
    else:
        name, dim, depth, heads, mlp, patch, image, classes = PRESETS[args.preset]
        flops = flops_per_image(dim, depth, mlp, patch, image, classes)
        model = timm.create_model(name, pretrained=False).eval()
    print(f"pytorch: {name} ({flops / 1e9:.2f} GFLOP per image), {args.threads} threads", file=sys.stderr)
    res = {}
    qmodel = int8_model(torch, model) if "int8" in args.dtypes else None
    for dtype in args.dtypes:
        bf16 = dtype == "bf16"
        m = qmodel if dtype == "int8" else model
        s, g, r = {}, {}, {}
        for b in args.batch:
            runs = time_forward(torch, m, b, args.repeats, args.warmup, bf16, image)
            s[b] = statistics.median(runs) / b
            g[b] = flops / s[b] / 1e9
            r[str(b)] = runs
            print(f"  {dtype} batch {b:>3}: {s[b]:.4f} s/image, {g[b]:.1f} GFLOP/s", file=sys.stderr)
        res[dtype] = (s, g, r)
    out = {
        "tool": "pytorch",
        "version": f"torch {torch.__version__}, timm {timm.__version__}",
        "model": name,
        "preset": args.arch or args.preset,
        "gflop_per_image": flops / 1e9,
        "seed": args.seed,
        "repeats": args.repeats,
        "dtype": "f32",
        "threads": args.threads,
    }
    for dtype, suffix in (("f32", ""), ("bf16", "_bf16"), ("int8", "_int8")):
        if dtype in res:
            s, g, r = res[dtype]
            out[f"forward_s_per_image{suffix}"] = per_batch(s)
            out[f"forward_gflops{suffix}"] = per_batch(g)
            out[f"forward_runs_s{suffix}"] = r
        else:
            out[f"forward_s_per_image{suffix}"] = None
    out["bf16"] = 'torch.autocast("cpu", dtype=torch.bfloat16)' if "bf16" in res else "not run"
    out["int8"] = ("torch.ao.quantization.quantize_dynamic(blocks, {nn.Linear}, qint8)"
                   if "int8" in res else "not run")
    out["int8_fidelity"] = ({"logits_rel_l2": logits_rel_l2(torch, model, qmodel, image)}
                            if qmodel is not None else None)
    out["explain_s_per_mask"] = None
    out["explain"] = None
    out["peak_rss_bytes"] = peak_rss_bytes()
    out["machine"] = machine_info(args.threads)
    return out


def as_map(v, batches):
    """forward_s_per_image as a map batch -> seconds (None stays None)."""
    if v is None:
        return {}
    if isinstance(v, dict):
        return {int(k): x for k, x in v.items()}
    return {batches[0]: v}


def run_vitcx(args):
    which = ["--arch", args.arch] if args.arch else ["--preset", args.preset]
    cmd = [args.vitcx, "bench", "--json", *which, "--repeats", str(args.repeats)]
    if len(args.batch) == 1:
        cmd += ["--batch", str(args.batch[0])]
    elif sorted(args.batch) != [1, 8, 32]:
        sys.exit("--vitcx compares one batch size or the default 1 8 32")
    cmd += args.vitcx_args
    print("running: " + " ".join(cmd), file=sys.stderr)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, check=True)
    return json.loads(p.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="base")
    ap.add_argument("--arch", help="a timm architecture instead of --preset, built with random "
                    "weights and 1000 classes (vitcx bench --arch takes the same name)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtypes", nargs="+", choices=["f32", "bf16", "int8"],
                    default=["f32", "bf16", "int8"])
    ap.add_argument("--vitcx", metavar="PATH", help="vitcx binary to run right after, for ratios")
    ap.add_argument("--vitcx-args", nargs=argparse.REMAINDER, default=[],
                    help="extra arguments for `vitcx bench` (must come last)")
    args = ap.parse_args()
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1 or min(args.batch) < 1:
        sys.exit("repeats, threads and batch sizes must be at least 1, warmup at least 0")

    pt = bench_pytorch(args)
    if not args.vitcx:
        print(json.dumps(pt, indent=2))
        return
    vx = run_vitcx(args)
    pt32 = as_map(pt.get("forward_s_per_image"), args.batch)
    ptbf = as_map(pt.get("forward_s_per_image_bf16"), args.batch)
    vx32 = as_map(vx.get("forward_s_per_image"), args.batch)
    vxbf = as_map(vx.get("forward_s_per_image_bf16"), args.batch)
    pti8 = as_map(pt.get("forward_s_per_image_int8"), args.batch)
    vxi8 = as_map(vx.get("forward_s_per_image_int8"), args.batch)
    speedup = {}
    for name, a, b in (("f32_vs_pytorch_f32", pt32, vx32), ("f32_vs_pytorch_bf16", ptbf, vx32),
                       ("bf16_vs_pytorch_bf16", ptbf, vxbf), ("int8_vs_pytorch_int8", pti8, vxi8),
                       ("int8_vs_vitcx_f32", vx32, vxi8)):
        speedup[name] = {str(k): a[k] / b[k] for k in args.batch if a.get(k) and b.get(k)} or None
    print(json.dumps({"pytorch": pt, "vitcx": vx, "speedup": speedup}, indent=2))

    def cell(m, k):
        return f"{m[k]:.4f}" if m.get(k) else "-"

    print(f"\n{pt['model']}, s/image (median of {args.repeats}); speedup = PyTorch s / vitcx s; "
          f"load {pt['machine']['loadavg']}", file=sys.stderr)
    print(f"{'batch':>5} {'torch f32':>10} {'torch bf16':>10} {'torch int8':>10} {'vitcx f32':>10} "
          f"{'vitcx bf16':>10} {'vitcx int8':>10} {'f32 x':>7} {'bf16 x':>7} {'int8 x':>7} "
          f"{'i8/f32':>7}", file=sys.stderr)
    nan = float("nan")
    for k in args.batch:
        s1, s3, s4, s5 = (speedup[n] or {} for n in ("f32_vs_pytorch_f32", "bf16_vs_pytorch_bf16",
                                                       "int8_vs_pytorch_int8", "int8_vs_vitcx_f32"))
        print(f"{k:>5} {cell(pt32, k):>10} {cell(ptbf, k):>10} {cell(pti8, k):>10} {cell(vx32, k):>10} "
              f"{cell(vxbf, k):>10} {cell(vxi8, k):>10} {s1.get(str(k), nan):>7.2f} "
              f"{s3.get(str(k), nan):>7.2f} {s4.get(str(k), nan):>7.2f} {s5.get(str(k), nan):>7.2f}",
              file=sys.stderr)
    print("f32 x = PyTorch f32 s / vitcx f32 s; bf16 x = PyTorch bf16 autocast s / vitcx bf16 s; "
          "int8 x = PyTorch quantize_dynamic s / vitcx int8 s; i8/f32 = vitcx f32 s / vitcx int8 s",
          file=sys.stderr)
    for key, name in (("explain", "f32"), ("explain_bf16", "bf16"), ("explain_int8", "int8")):
        if vx.get(key):
            print(f"vitcx explanation, {name} perturbed passes: {vx[key]['explain_s_per_mask']:.4f} s/mask "
                  f"({vx[key]['n_masks']} masks)", file=sys.stderr)
    for p in ("bf16", "int8"):
        f = vx.get(f"{p}_fidelity")
        if f:
            print(f"vitcx {p} vs f32: saliency pearson {f['saliency_pearson']:.6f}, "
                  f"top-1 {f[f'top1_{p}']} vs {f['top1_f32']}, logits relative L2 error "
                  f"{f.get('logits_rel_l2', nan):.2e}", file=sys.stderr)
    if pt.get("int8_fidelity"):
        print(f"PyTorch quantize_dynamic vs f32: logits relative L2 error "
              f"{pt['int8_fidelity']['logits_rel_l2']:.2e}", file=sys.stderr)


if __name__ == "__main__":
    main()
