//! Benchmarks: how fast the model and a whole explanation run on this machine.
//!
//! The model is a ViT with seeded random weights built in memory (no download,
//! [`crate::model::families::vit::random`]), so the benchmarked forward pass is exactly the one
//! `vitcx explain` runs. Times are wall-clock medians after a warm-up. Kept apart from the
//! library's pipeline: nothing but the `bench` command depends on it.

use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::eval::metrics::pearson;
use crate::methods::vitcx::{Noise, VitCx, VitCxParams};
use crate::methods::{NoProgress, Stage};
use crate::model::families::beit::random::RelArch;
use crate::model::families::beit::Kind;
use crate::model::families::swin::random::SwinArch;
use crate::model::families::vit::random::{Arch, ArchOptions};
use crate::model::{Backbone, Precision};
use crate::target::argmax;

/// Named benchmark architectures: the two ViT sizes, and each plain-block family at its base
/// size as timm builds it (`--arch NAME`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// ViT-Ti/16: dim 192, depth 12, 3 heads (quick runs and tests).
    Tiny,
    /// ViT-B/16: dim 768, depth 12, 12 heads, MLP 3072 (the model the speed goal is about).
    Base,
    /// DeiT III-B/16: LayerScale, position embedding on the patches only.
    Deit3,
    /// DINOv2 ViT-B/14 at 518 px (37x37 grid), LayerScale.
    Dinov2,
    /// DINOv2 ViT-B/14 with 4 registers at 518 px.
    Dinov2Reg4,
    /// CLIP ViT-B/16: pre-norm, no patch bias, LayerNorm eps 1e-5.
    Clip,
    /// CLIP ViT-B/16 with QuickGELU (OpenAI weights).
    ClipQuickgelu,
    /// SigLIP ViT-B/16: no class token, attention pooling.
    Siglip,
    /// ViT-B/16 with average pooling and `fc_norm` (MAE / BEiT-style fine-tunes).
    Avg,
    /// BEiT-B/16: relative position bias per block, LayerScale, mean pooling + `fc_norm`.
    BeitBase,
    /// EVA-02-B/14 at 224 px (16x16 grid): rotary embedding, separate q/k/v, SwiGLU with its
    /// inner norm.
    Eva02Base,
    /// Swin-T: patch 4, window 7, depths (2, 2, 6, 2), 224 px.
    SwinTiny,
}

/// Every preset, in the order `--help` and tables list them.
pub const PRESETS: [Preset; 12] = [
    Preset::Tiny,
    Preset::Base,
    Preset::Deit3,
    Preset::Dinov2,
    Preset::Dinov2Reg4,
    Preset::Clip,
    Preset::ClipQuickgelu,
    Preset::Siglip,
    Preset::Avg,
    Preset::BeitBase,
    Preset::Eva02Base,
    Preset::SwinTiny,
];

/// A preset's sizes: a plain-block ViT's or a Swin's.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum PresetArch {
    /// A plain-block ViT.
    Vit(Arch),
    /// A Swin Transformer.
    Swin(SwinArch),
}

impl PresetArch {
    /// Multiply-adds of one forward pass for one image.
    pub fn macs_per_image(&self) -> f64 {
        match self {
            PresetArch::Vit(a) => a.macs_per_image(),
            PresetArch::Swin(a) => a.macs_per_image(),
        }
    }

    /// Floating-point operations of one forward pass for one image (2 per multiply-add).
    pub fn flops_per_image(&self) -> f64 {
        2.0 * self.macs_per_image()
    }
}

impl Preset {
    /// The preset's sizes and options (1000 classes). For BEiT and EVA-02 the plain ViT of the
    /// same multiply-adds (EVA-02's three SwiGLU matrices of 2048 equal two of 3072), which
    /// [`Preset::rel_arch`] builds.
    pub fn arch(self) -> PresetArch {
        match self {
            Preset::SwinTiny => PresetArch::Swin(SwinArch::tiny()),
            _ => PresetArch::Vit(self.vit_arch()),
        }
    }

    /// A ViT preset's sizes (the Swin preset has none: [`Preset::arch`]).
    fn vit_arch(self) -> Arch {
        let (dim, heads) = match self {
            Preset::Tiny => (192, 3),
            _ => (768, 12),
        };
        let (patch, image_size) = match self {
            Preset::Dinov2 | Preset::Dinov2Reg4 => (14, 518),
            Preset::Eva02Base => (14, 224),
            _ => (16, 224),
        };
        let mut options = ArchOptions::default();
        match self {
            Preset::Tiny | Preset::Base | Preset::SwinTiny => {}
            Preset::Deit3 => {
                options.layer_scale = true;
                options.no_embed_class = true;
            }
            Preset::Dinov2 => options.layer_scale = true,
            Preset::Dinov2Reg4 => {
                options.layer_scale = true;
                options.reg_tokens = 4;
                options.no_embed_class = true;
            }
            Preset::Clip | Preset::ClipQuickgelu => options.pre_norm = true,
            Preset::Siglip => {
                options.class_token = false;
                options.pool = "map";
            }
            Preset::Avg | Preset::BeitBase | Preset::Eva02Base => options.pool = "avg",
        }
        Arch {
            dim,
            depth: 12,
            heads,
            mlp_dim: 4 * dim,
            patch,
            image_size,
            num_classes: 1000,
            layer_norm_eps: if options.pre_norm { 1e-5 } else { 1e-6 },
            options,
        }
    }

    /// The preset's short name (`tiny`, `base`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Base => "base",
            Preset::Deit3 => "deit3",
            Preset::Dinov2 => "dinov2",
            Preset::Dinov2Reg4 => "dinov2_reg4",
            Preset::Clip => "clip",
            Preset::ClipQuickgelu => "clip_quickgelu",
            Preset::Siglip => "siglip",
            Preset::Avg => "avg",
            Preset::BeitBase => "beit_base",
            Preset::Eva02Base => "eva02_base",
            Preset::SwinTiny => "swin_tiny",
        }
    }

    /// The timm architecture this preset mirrors.
    pub fn timm_name(self) -> &'static str {
        match self {
            Preset::Tiny => "vit_tiny_patch16_224",
            Preset::Base => "vit_base_patch16_224",
            Preset::Deit3 => "deit3_base_patch16_224",
            Preset::Dinov2 => "vit_base_patch14_dinov2",
            Preset::Dinov2Reg4 => "vit_base_patch14_reg4_dinov2",
            Preset::Clip => "vit_base_patch16_clip_224",
            Preset::ClipQuickgelu => "vit_base_patch16_clip_quickgelu_224",
            Preset::Siglip => "vit_base_patch16_siglip_224",
            Preset::Avg => "vit_base_patch16_224.mae",
            Preset::BeitBase => "beit_base_patch16_224",
            Preset::Eva02Base => "eva02_base_patch14_224",
            Preset::SwinTiny => "swin_tiny_patch4_window7_224",
        }
    }

    /// The BEiT or EVA-02 this preset builds, if it is one.
    pub fn rel_arch(self) -> Option<RelArch> {
        let kind = match self {
            Preset::BeitBase => Kind::Beit,
            Preset::Eva02Base => Kind::Eva02,
            _ => return None,
        };
        Some(RelArch {
            kind,
            dim: 768,
            depth: 12,
            heads: 12,
            mlp_dim: if kind == Kind::Beit { 3072 } else { 2048 },
            image_size: 224,
            num_classes: 1000,
        })
    }
}

impl std::str::FromStr for Preset {
    type Err = Error;

    /// A short name (`base`) or the timm architecture (`vit_base_patch16_clip_224`).
    fn from_str(s: &str) -> Result<Self> {
        PRESETS
            .iter()
            .copied()
            .find(|p| p.name() == s || p.timm_name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = PRESETS.iter().map(|p| p.timm_name()).collect();
                Error::invalid(format!(
                    "architecture '{s}' unknown; expected tiny, base or one of {}",
                    names.join(", ")
                ))
            })
    }
}

/// A ViT `preset` (a plain-block ViT, BEiT or EVA-02) with seeded random weights, built in
/// memory through the checkpoint loader's own config and weight checks (no file is read or
/// written).
pub fn random_vit(preset: Preset, seed: u64, device: &Device) -> Result<Box<dyn Backbone>> {
    if let Some(rel) = preset.rel_arch() {
        return Ok(Box::new(
            crate::model::families::beit::random::random_model(&rel, seed, device)?,
        ));
    }
    match preset.arch() {
        PresetArch::Vit(arch) => Ok(Box::new(crate::model::families::vit::random::random_vit(
            &arch,
            preset.timm_name(),
            seed,
            device,
        )?)),
        PresetArch::Swin(_) => Err(Error::invalid(format!(
            "{} is not a ViT; build it with random_model",
            preset.timm_name()
        ))),
    }
}

/// The model of any `preset` (a ViT, BEiT, EVA-02 or Swin) with seeded random weights, built
/// as [`random_vit`] builds a ViT.
pub fn random_model(preset: Preset, seed: u64, device: &Device) -> Result<Box<dyn Backbone>> {
    match preset.arch() {
        PresetArch::Swin(arch) => Ok(Box::new(crate::model::families::swin::random::random_swin(
            &arch,
            preset.timm_name(),
            seed,
            device,
        )?)),
        PresetArch::Vit(_) => random_vit(preset, seed, device),
    }
}

/// A fixed synthetic image `(3, H, W)` in normalised pixels for `mean`/`std`: smooth colour
/// gradients, a bright disk and a dark square, so that feature maps are not constant.
pub fn synthetic_image(size: (usize, usize), mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let (h, w) = size;
    let mut out = Vec::with_capacity(3 * h * w);
    for c in 0..3 {
        for y in 0..h {
            for x in 0..w {
                let (fy, fx) = (y as f32 / h as f32, x as f32 / w as f32);
                let mut v = match c {
                    0 => fx,
                    1 => fy,
                    _ => 0.5 + 0.5 * (6.0 * fx).sin() * (4.0 * fy).cos(),
                };
                let (dy, dx) = (fy - 0.4, fx - 0.35);
                if dy * dy + dx * dx < 0.04 {
                    v = 0.95;
                }
                if (0.6..0.85).contains(&fy) && (0.55..0.8).contains(&fx) {
                    v = 0.05;
                }
                out.push((v - mean[c]) / std[c]);
            }
        }
    }
    out
}

/// Median of `v` (mean of the middle two for an even count); NaN when empty.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
    }
}

/// Forward-pass timing at one batch size.
#[derive(Debug, Clone, Serialize)]
pub struct ForwardTiming {
    /// Images per forward pass.
    pub batch: usize,
    /// Seconds of each timed run (warm-up excluded).
    pub runs_s: Vec<f64>,
    /// Median seconds per run divided by the batch size.
    pub s_per_image: f64,
    /// Floating-point operations per second at the median (GFLOP/s).
    pub gflops: f64,
}

/// Times a forward pass at `precision` (probabilities only, no tap) on `batch` copies of `x`
/// `(3, H, W)`: one warm-up run, then `repeats` timed runs.
pub fn time_forward(
    model: &dyn Backbone,
    x: &[f32],
    batch: usize,
    repeats: usize,
    flops_per_image: f64,
    precision: Precision,
) -> Result<ForwardTiming> {
    if batch == 0 || repeats == 0 {
        return Err(Error::invalid(format!(
            "batch {batch} / repeats {repeats} out of range; expected at least 1 each"
        )));
    }
    let (h, w) = model.spec().input_size;
    if x.len() != 3 * h * w {
        return Err(Error::invalid(format!(
            "image has {} values, expected 3 x {h} x {w}",
            x.len()
        )));
    }
    let data: Vec<f32> = x.iter().copied().cycle().take(batch * x.len()).collect();
    let px = Tensor::from_vec(data, (batch, 3, h, w), model.device())?;
    let mut runs_s = Vec::with_capacity(repeats);
    for i in 0..=repeats {
        let t = Instant::now();
        let probs = model.probs_at(&px, precision)?;
        // Reading the result back makes sure the pass has finished on any device.
        let _ = probs.flatten_all()?.to_vec1::<f32>()?;
        if i > 0 {
            runs_s.push(t.elapsed().as_secs_f64());
        }
    }
    let s_per_image = median(&runs_s) / batch as f64;
    Ok(ForwardTiming {
        batch,
        runs_s,
        s_per_image,
        gflops: flops_per_image / s_per_image / 1e9,
    })
}

/// One linear layer's product timed alone, at the shapes of a model's forward pass.
#[derive(Debug, Clone, Serialize)]
pub struct LinearTiming {
    /// Which layer: `qkv`, `proj`, `fc1`, `fc2`.
    pub layer: &'static str,
    /// The product's precision.
    pub precision: Precision,
    /// `(rows, k, n)`: `rows = batch x tokens` inputs of `k` to outputs of `n`.
    pub shape: (usize, usize, usize),
    /// Seconds of each timed run (warm-up excluded).
    pub runs_s: Vec<f64>,
    /// Floating-point operations per second at the median (`2 rows k n`, bias excluded).
    pub gflops: f64,
    /// The kernel timed: the one the forward pass runs at this precision on this CPU.
    pub kernel: &'static str,
    /// f32 on the packed kernel only: `gemm` (candle's matmul path, the anchor) on the same
    /// operands, each run right after the packed one.
    pub gemm: Option<GemmAnchor>,
}

/// The same f32 product through `gemm`, timed pair by pair against the packed kernel.
#[derive(Debug, Clone, Serialize)]
pub struct GemmAnchor {
    /// Seconds of each timed run.
    pub runs_s: Vec<f64>,
    /// GFLOP/s at the median.
    pub gflops: f64,
    /// Median over the pairs of gemm's seconds / the packed kernel's.
    pub speedup: f64,
}

/// The linear layers of a plain-block ViT block at `batch` images: the fused q/k/v projection,
/// the attention's output projection and the MLP's two layers, as `(layer, rows, k, n)`.
pub fn vit_linear_shapes(arch: &Arch, batch: usize) -> Vec<(&'static str, usize, usize, usize)> {
    let (rows, d, m) = (batch * arch.tokens(), arch.dim, arch.mlp_dim);
    vec![
        ("qkv", rows, d, 3 * d),
        ("proj", rows, d, d),
        ("fc1", rows, d, m),
        ("fc2", rows, m, d),
    ]
}

/// Times the linear-layer product the forward pass runs at `precision` (`x @ wt + b` on the
/// CPU kernels, on weights packed beforehand as a model packs them once) at `(rows, k, n)` on
/// seeded random values: one warm-up run, then `repeats` timed runs. In f32 on the packed
/// kernel, each run is followed by one of `gemm` on the same operands (the anchor).
pub fn time_linear(
    layer: &'static str,
    (rows, k, n): (usize, usize, usize),
    precision: Precision,
    repeats: usize,
) -> Result<LinearTiming> {
    use crate::model::kernels::packed_f32::PackedF32;
    use crate::model::kernels::{
        bf16::PackedBf16,
        integer::{PackedI16, PackedI8},
        Packed,
    };
    use rand::{Rng, SeedableRng};
    if rows == 0 || k == 0 || n == 0 || repeats == 0 {
        return Err(Error::invalid(format!(
            "linear ({rows}, {k}) x ({k}, {n}) with {repeats} repeats out of range; expected at least 1 each"
        )));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut draw =
        |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
    let (xv, wv, bv) = (draw(rows * k), draw(k * n), draw(n));
    let dev = Device::Cpu;
    let x = Tensor::from_slice(&xv, (rows, k), &dev)?;
    let wt = Tensor::from_slice(&wv, (k, n), &dev)?;
    let b = Tensor::from_slice(&bv, n, &dev)?;
    // The packed product the forward pass runs at `precision`; `None` where that is `gemm`.
    type Product<'a> = Box<dyn Fn() -> candle_core::Result<Vec<f32>> + 'a>;
    fn packed<'a, P: Packed + 'a>(p: P, x: &'a [f32]) -> Product<'a> {
        Box::new(move || p.product(x, true, None))
    }
    let bias = Some(bv.clone());
    let product = match precision {
        Precision::Bf16 => Some(packed(PackedBf16::pack(&wv, k, n, bias)?, &xv)),
        Precision::Int8 => Some(packed(PackedI8::pack(&wv, k, n, bias)?, &xv)),
        Precision::Int16 => Some(packed(PackedI16::pack(&wv, k, n, bias)?, &xv)),
        Precision::F32 if PackedF32::available() => {
            Some(packed(PackedF32::pack(&wv, k, n, bias)?, &xv))
        }
        Precision::F32 => None,
    };
    // The anchor on f32: `gemm` right after each run of the packed kernel.
    let anchored = precision == Precision::F32 && product.is_some();
    let gemm = || -> Result<()> {
        let y = crate::model::kernels::linear::linear(&x, &wt, &b)?;
        drop(std::hint::black_box(y));
        Ok(())
    };
    let (mut runs_s, mut gemm_s) = (Vec::with_capacity(repeats), Vec::new());
    for i in 0..=repeats {
        let t = Instant::now();
        match &product {
            Some(p) => drop(std::hint::black_box(p()?)),
            None => gemm()?,
        }
        let first = t.elapsed().as_secs_f64();
        if anchored {
            let t = Instant::now();
            gemm()?;
            if i > 0 {
                gemm_s.push(t.elapsed().as_secs_f64());
            }
        }
        if i > 0 {
            runs_s.push(first);
        }
    }
    let flop = 2.0 * (rows * k * n) as f64;
    let gemm = anchored.then(|| {
        let ratios: Vec<f64> = gemm_s.iter().zip(&runs_s).map(|(g, p)| g / p).collect();
        GemmAnchor {
            gflops: flop / median(&gemm_s) / 1e9,
            speedup: median(&ratios),
            runs_s: gemm_s,
        }
    });
    let kernel = precision.kernel();
    Ok(LinearTiming {
        layer,
        precision,
        shape: (rows, k, n),
        gflops: flop / median(&runs_s) / 1e9,
        runs_s,
        kernel,
        gemm,
    })
}

/// Timing of one explanation of the synthetic image.
#[derive(Debug, Clone, Serialize)]
pub struct ExplainTiming {
    /// Seconds per stage (`forward`, `masks`, `similarity`, `clustering`, `perturbed_forward`,
    /// `aggregation`), as recorded in [`crate::Explanation::timings`].
    pub stages: Vec<(String, f64)>,
    /// Wall-clock seconds of the whole explanation.
    pub total_s: f64,
    /// Masks after clustering.
    pub n_masks_clustered: usize,
    /// Masks scored (N): all clustered masks, or the first `max_masks` of them.
    pub n_masks: usize,
    /// Images per perturbed forward pass.
    pub batch: usize,
    /// Perturbed-forward seconds / (2N): one masked or noisy image.
    pub perturbed_forward_s_per_image: f64,
    /// Total seconds / N.
    pub explain_s_per_mask: f64,
    /// Estimated seconds had every clustered mask been scored: the stages before scoring plus
    /// the per-mask time of the scoring stages times `n_masks_clustered`.
    pub projected_full_s: f64,
    /// The class explained (top-1 of the clean f32 pass).
    pub class: usize,
    /// The saliency map, for comparing precisions.
    #[serde(skip)]
    pub saliency: Vec<f32>,
}

/// Explains the top-1 class of `x` `(3, H, W)` with `params`, scoring at most `max_masks`
/// masks (the first ones after clustering) when given, and returns the stage times.
pub fn time_explanation(
    model: &dyn Backbone,
    x: &[f32],
    params: &VitCxParams,
    max_masks: Option<usize>,
) -> Result<ExplainTiming> {
    let method = VitCx::new(params, model)?;
    let t = Instant::now();
    let mut prepared = method.prepare(model, x, &mut NoProgress)?;
    let n_masks_clustered = prepared.masks.n;
    if let Some(k) = max_masks.filter(|&k| k < n_masks_clustered) {
        if k == 0 {
            return Err(Error::invalid(
                "max masks 0 out of range; expected at least 1",
            ));
        }
        let masks = &mut prepared.masks;
        masks.n = k;
        masks.data.truncate(k * masks.h * masks.w);
    }
    let classes = [argmax(&prepared.probs)];
    let noise = Noise::Seeded(params.seed);
    let ex = method.score(model, x, prepared, &classes, &noise, &mut NoProgress)?;
    let total_s = t.elapsed().as_secs_f64();
    let n = ex.count("n_masks").unwrap_or(0);
    let stage = |s: Stage| {
        ex.timings
            .iter()
            .filter(|(k, _)| *k == s)
            .map(|(_, v)| v)
            .sum::<f64>()
    };
    let perturbed = stage(Stage::PERTURBED_FORWARD);
    let scoring = perturbed + stage(Stage::AGGREGATION);
    let images_per_mask = if params.noise_std > 0.0 { 2 } else { 1 };
    Ok(ExplainTiming {
        stages: ex
            .timings
            .iter()
            .map(|(k, v)| (k.name().to_string(), *v))
            .collect(),
        total_s,
        n_masks_clustered,
        n_masks: n,
        batch: params.batch,
        perturbed_forward_s_per_image: perturbed / (images_per_mask * n).max(1) as f64,
        explain_s_per_mask: total_s / n.max(1) as f64,
        projected_full_s: total_s - scoring + scoring / n.max(1) as f64 * n_masks_clustered as f64,
        class: classes[0],
        saliency: ex.saliency.into_iter().next().unwrap_or_default(),
    })
}

/// How far reduced-precision (bf16, int8 or int16) perturbed passes move the answer on one image.
#[derive(Debug, Clone, Serialize)]
pub struct Fidelity {
    /// The precision compared with f32.
    pub precision: Precision,
    /// Pearson correlation of the f32 saliency map and the one at `precision`.
    pub saliency_pearson: f64,
    /// Top-1 class of an f32 pass over the clean image.
    pub top1_f32: usize,
    /// Top-1 class of a pass at `precision` over the clean image.
    pub top1: usize,
    /// Whether the two agree.
    pub same_top1: bool,
    /// Largest difference between the two passes' class probabilities.
    pub max_abs_prob_diff: f32,
    /// Relative L2 error of the logits at `precision` against f32, `|l - l32| / |l32|`.
    pub logits_rel_l2: f64,
}

/// Compares the f32 saliency map of `x` `(3, H, W)` with the one computed at `precision`, and
/// both precisions' clean pass.
pub fn fidelity(
    model: &dyn Backbone,
    x: &[f32],
    precision: Precision,
    saliency_f32: &[f32],
    saliency: &[f32],
) -> Result<Fidelity> {
    let (h, w) = model.spec().input_size;
    crate::methods::driver::check_input(x, (h, w))?;
    let px = Tensor::from_slice(x, (1, 3, h, w), model.device())?;
    // One pass per precision: the probabilities are the logits' softmax.
    let pass = |p| -> Result<(Vec<f32>, Vec<f32>)> {
        let logits = model.logits_at(&px, p)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?;
        Ok((
            logits.flatten_all()?.to_vec1::<f32>()?,
            probs.flatten_all()?.to_vec1::<f32>()?,
        ))
    };
    let ((l32, p32), (lp, pp)) = (pass(Precision::F32)?, pass(precision)?);
    let (top1_f32, top1) = (argmax(&p32), argmax(&pp));
    let err: f64 = l32
        .iter()
        .zip(&lp)
        .map(|(a, b)| f64::from(a - b).powi(2))
        .sum();
    let norm: f64 = l32.iter().map(|a| f64::from(*a).powi(2)).sum();
    Ok(Fidelity {
        precision,
        saliency_pearson: pearson(saliency_f32, saliency),
        top1_f32,
        top1,
        same_top1: top1_f32 == top1,
        max_abs_prob_diff: p32
            .iter()
            .zip(&pp)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max),
        logits_rel_l2: (err / norm.max(f64::MIN_POSITIVE)).sqrt(),
    })
}

/// This machine's f32 multiply-add peak in GFLOP/s on `threads` threads: each thread runs 24
/// independent chains of the widest FMA the CPU has (AVX-512, else AVX2) in registers; the best
/// of three runs of about a tenth of a second. The most a matrix product could reach, to read the forward pass's
/// GFLOP/s against. `None` where neither exists (or off x86-64).
pub fn fma_peak_gflops(threads: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        let lanes = match (avx512, avx2) {
            (true, _) => 16,
            (false, true) => 8,
            _ => return None,
        };
        const ITERS: usize = 20_000_000;
        let run = move || {
            // SAFETY: the features were detected above.
            unsafe {
                if avx512 {
                    peak::chains_avx512(ITERS)
                } else {
                    peak::chains_avx2(ITERS)
                }
            }
        };
        run(); // warm-up: clocks up, pages in
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let t = Instant::now();
            let handles: Vec<_> = (0..threads.max(1))
                .map(|_| std::thread::spawn(run))
                .collect();
            let mut sink = 0.0;
            for h in handles {
                sink += h.join().ok()?;
            }
            best = best.min(t.elapsed().as_secs_f64());
            std::hint::black_box(sink);
        }
        let flop = (threads.max(1) * ITERS * peak::CHAINS * lanes * 2) as f64;
        Some(flop / best / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = threads;
        None
    }
}

#[cfg(target_arch = "x86_64")]
mod peak {
    use std::arch::x86_64::*;

    /// Independent accumulators per thread: enough to cover the FMA latency on two ports.
    pub(super) const CHAINS: usize = 24;

    #[target_feature(enable = "avx512f")]
    pub(super) fn chains_avx512(iters: usize) -> f32 {
        let mut acc = [_mm512_set1_ps(0.0); CHAINS];
        let (a, b) = (_mm512_set1_ps(1.000_000_1), _mm512_set1_ps(0.999_999_9));
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        let mut s = _mm512_set1_ps(0.0);
        for v in acc {
            s = _mm512_add_ps(s, v);
        }
        _mm512_reduce_add_ps(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn chains_avx2(iters: usize) -> f32 {
        let mut acc = [_mm256_set1_ps(0.0); CHAINS];
        let (a, b) = (_mm256_set1_ps(1.000_000_1), _mm256_set1_ps(0.999_999_9));
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        let mut s = _mm256_set1_ps(0.0);
        for v in acc {
            s = _mm256_add_ps(s, v);
        }
        let mut out = [0f32; 8];
        // SAFETY: `out` holds 8 f32.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
        out.iter().sum()
    }
}

/// Peak resident memory of this process in bytes (`VmHWM` of `/proc/self/status`); `None`
/// where that file does not exist (not Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm(&status)
}

/// The `VmHWM:   1234 kB` line of a `/proc/<pid>/status` text, in bytes.
fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// What the benchmark ran on.
#[derive(Debug, Clone, Serialize)]
pub struct MachineInfo {
    /// `model name` of `/proc/cpuinfo` (None where unavailable).
    pub cpu_model: Option<String>,
    /// Logical CPUs listed in `/proc/cpuinfo` (None where unavailable).
    pub logical_cpus: Option<usize>,
    /// CPUs this process may use (`std::thread::available_parallelism`).
    pub available_parallelism: usize,
    /// Worker threads candle's CPU kernels use.
    pub candle_threads: usize,
    /// x86 features found at run time (`is_x86_feature_detected!`): avx2, fma, avx512f,
    /// avx512bw, avx512vl; plus `avx512_bf16` / `amx_bf16` from the cpuinfo flags.
    pub features: Vec<String>,
    /// Whether AVX-512 F is available.
    pub avx512: bool,
    /// `/proc/loadavg` when the report was made (the machine may be shared).
    pub loadavg: Option<String>,
}

/// Collects [`MachineInfo`] for this machine.
pub fn machine_info() -> MachineInfo {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok();
    let cpu_model = cpuinfo.as_deref().and_then(|c| {
        c.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    });
    let logical_cpus = cpuinfo
        .as_deref()
        .map(|c| c.lines().filter(|l| l.starts_with("processor")).count())
        .filter(|&n| n > 0);
    let flags: Vec<&str> = cpuinfo
        .as_deref()
        .and_then(|c| c.lines().find(|l| l.starts_with("flags")))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.split_whitespace().collect())
        .unwrap_or_default();
    let mut features: Vec<String> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        for (name, on) in [
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
            ("avx512bw", std::arch::is_x86_feature_detected!("avx512bw")),
            ("avx512vl", std::arch::is_x86_feature_detected!("avx512vl")),
        ] {
            if on {
                features.push(name.to_string());
            }
        }
    }
    // bf16/AMX detection macros need a newer Rust than the crate's minimum; cpuinfo says it too.
    for flag in ["avx512_bf16", "avx512_vnni", "amx_bf16"] {
        if flags.contains(&flag) {
            features.push(flag.to_string());
        }
    }
    MachineInfo {
        cpu_model,
        logical_cpus,
        available_parallelism: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        candle_threads: candle_core::utils::get_num_threads(),
        avx512: features.iter().any(|f| f == "avx512f"),
        features,
        loadavg: std::fs::read_to_string("/proc/loadavg")
            .ok()
            .map(|s| s.trim().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(model: &dyn Backbone, x: &[f32]) -> Vec<f32> {
        let px = Tensor::from_slice(x, (1, 3, 224, 224), &Device::Cpu).unwrap();
        model
            .forward(&px, None)
            .unwrap()
            .logits
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn random_model_is_deterministic() {
        let x = synthetic_image((224, 224), [0.5; 3], [0.5; 3]);
        let a = random_vit(Preset::Tiny, 7, &Device::Cpu).unwrap();
        let b = random_vit(Preset::Tiny, 7, &Device::Cpu).unwrap();
        let c = random_vit(Preset::Tiny, 8, &Device::Cpu).unwrap();
        let (la, lb, lc) = (logits(&a, &x), logits(&b, &x), logits(&c, &x));
        assert_eq!(la.len(), 1000);
        assert_eq!(la, lb);
        assert_ne!(la, lc);
        // Not a degenerate model: logits vary across classes.
        let spread =
            la.iter().fold(f32::MIN, |m, &v| m.max(v)) - la.iter().fold(f32::MAX, |m, &v| m.min(v));
        assert!(spread > 1e-3, "spread {spread}");
    }

    #[test]
    fn random_model_has_preset_shape() {
        let m = crate::model::families::vit::random::random_vit(
            &Preset::Tiny.vit_arch(),
            Preset::Tiny.timm_name(),
            0,
            &Device::Cpu,
        )
        .unwrap();
        let s = m.config();
        assert_eq!((s.dim, s.depth, s.heads, s.patch), (192, 12, 3, 16));
        assert_eq!((m.spec().taps[0].grid, s.num_classes), ((14, 14), 1000));
        assert_eq!(m.config().mlp_dim, 768);
        assert_eq!(m.config().layer_norm_eps, 1e-6);
        assert!(m.config().notes.is_empty(), "{:?}", m.config().notes);
    }

    #[test]
    fn vit_b16_flops() {
        let a = Preset::Base.arch();
        let gmacs = a.macs_per_image() / 1e9;
        assert!((gmacs - 17.56).abs() < 0.02, "{gmacs}");
        assert!((a.flops_per_image() / 1e9 - 35.1).abs() < 0.05);
        assert!(Preset::Tiny.arch().flops_per_image() < a.flops_per_image() / 10.0);
    }

    #[test]
    fn linear_shapes_and_timing() {
        let shapes = vit_linear_shapes(&Preset::Base.vit_arch(), 8);
        let want = [
            ("qkv", 1576, 768, 2304),
            ("proj", 1576, 768, 768),
            ("fc1", 1576, 768, 3072),
            ("fc2", 1576, 3072, 768),
        ];
        assert_eq!(shapes, want);
        // Their multiply-adds are the forward pass's linear layers (all but attention's
        // products, the patch embedding and the head).
        let a = Preset::Base.vit_arch();
        let macs: usize = shapes.iter().map(|(_, r, k, n)| r * k * n).sum();
        let (t, d) = (a.tokens() as f64, a.dim as f64);
        let (embed, head) = (196.0 * 768.0 * d, d * 1000.0);
        let per_block = (a.macs_per_image() - embed - head) / a.depth as f64 - 2.0 * t * t * d;
        assert!((macs as f64 / 8.0 / per_block - 1.0).abs() < 1e-9);
        for p in Precision::ALL {
            let l = time_linear("fc1", (10, 7, 5), p, 2).unwrap();
            assert_eq!((l.layer, l.shape, l.runs_s.len()), ("fc1", (10, 7, 5), 2));
            assert_eq!(l.precision, p);
            assert!(l.gflops > 0.0 && l.gflops.is_finite());
        }
        assert!(time_linear("fc1", (0, 7, 5), Precision::F32, 2).is_err());
    }

    #[test]
    fn median_and_hwm() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        let status = "Name:\tx\nVmPeak:\t  100 kB\nVmHWM:\t    2048 kB\nVmRSS:\t 1 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(2048 * 1024));
        assert_eq!(parse_vm_hwm("Name: x\n"), None);
    }

    #[test]
    fn preset_parse() {
        assert_eq!("tiny".parse::<Preset>().unwrap(), Preset::Tiny);
        assert_eq!("base".parse::<Preset>().unwrap(), Preset::Base);
        let e = "huge".parse::<Preset>().unwrap_err().to_string();
        assert!(e.contains("architecture 'huge' unknown"), "{e}");
    }

    #[test]
    fn forward_and_explanation_timings_are_positive() {
        let m = random_vit(Preset::Tiny, 0, &Device::Cpu).unwrap();
        let x = synthetic_image((224, 224), [0.5; 3], [0.5; 3]);
        for p in [Precision::F32, Precision::Bf16] {
            let f = time_forward(&m, &x, 2, 1, 1e9, p).unwrap();
            assert_eq!(f.runs_s.len(), 1);
            assert!(f.s_per_image > 0.0 && f.gflops > 0.0);
        }
        let e = time_explanation(&m, &x, &VitCxParams::default(), Some(3)).unwrap();
        assert!(e.n_masks <= 3 && e.n_masks >= 1);
        assert!(e.n_masks_clustered >= e.n_masks);
        let names: Vec<&str> = e.stages.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "forward",
                "similarity",
                "clustering",
                "masks",
                "perturbed_forward",
                "aggregation"
            ]
        );
        assert!(e.explain_s_per_mask > 0.0 && e.perturbed_forward_s_per_image > 0.0);
        assert!(e.projected_full_s >= e.total_s * 0.999);
    }

    #[test]
    fn every_preset_reads_back_as_its_family() {
        // BEiT and EVA-02 read back in their own family's tests (beit::random).
        for preset in PRESETS.into_iter().filter(|p| p.rel_arch().is_none()) {
            // The preset's options on a small model, through the loader with the timm name.
            let PresetArch::Vit(mut arch) = preset.arch() else {
                // Swin: its own test (families::swin::random) builds a small one.
                assert_eq!(preset.timm_name().parse::<Preset>().unwrap(), preset);
                continue;
            };
            arch.dim = 32;
            arch.heads = 2;
            arch.depth = 1;
            arch.mlp_dim = 64;
            arch.num_classes = 5;
            arch.image_size = 4 * arch.patch;
            let m = crate::model::families::vit::random::random_vit(
                &arch,
                preset.timm_name(),
                1,
                &Device::Cpu,
            )
            .unwrap_or_else(|e| panic!("{}: {e}", preset.name()));
            let spec = m.spec();
            let tap = spec.tap("blocks.0.norm1").unwrap();
            assert_eq!(
                tap.prefix_tokens.len(),
                arch.prefix_tokens(),
                "{}",
                preset.name()
            );
            assert_eq!(tap.grid, (4, 4));
            assert_eq!(spec.details["pool"], arch.options.pool, "{}", preset.name());
            assert_eq!(spec.details["layer_scale"], arch.options.layer_scale);
            let act = if preset == Preset::ClipQuickgelu {
                "quick_gelu"
            } else {
                "gelu"
            };
            assert_eq!(spec.details["activation"], act, "{}", preset.name());
            assert_eq!(spec.details["layer_norm_eps"], arch.layer_norm_eps);
            assert_eq!(preset.timm_name().parse::<Preset>().unwrap(), preset);
        }
    }
}
