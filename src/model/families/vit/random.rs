//! ViTs with seeded random weights, built in memory: the benchmark's model and the demo model's
//! starting point. A timm-named state dict of plain tensors (weights N(0, 0.02), biases 0,
//! LayerNorm weights 1) goes through the same config and weight checks as a checkpoint read
//! from disk, so the model is exactly the one `vitcx explain` would run.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::Serialize;

use super::VisionTransformer;
use crate::error::{Error, Result};
use crate::model::checkpoint::Checkpoint;

/// Standard deviation of the random weights (timm's `trunc_normal_(std=0.02)` initialisation).
pub const WEIGHT_STD: f32 = 0.02;

/// The sizes of a ViT built in code (the benchmark presets, the demo model).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Arch {
    /// Token width.
    pub dim: usize,
    /// Transformer blocks.
    pub depth: usize,
    /// Attention heads per block.
    pub heads: usize,
    /// Hidden width of the MLP.
    pub mlp_dim: usize,
    /// Patch side in pixels.
    pub patch: usize,
    /// Square input side in pixels.
    pub image_size: usize,
    /// Output classes.
    pub num_classes: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// The options of timm's VisionTransformer beyond the 2020 ViT.
    pub options: ArchOptions,
}

/// Options of a plain-block ViT beyond the 2020 ViT, as the random state dict holds them (the
/// loader reads them back from the tensors and the architecture name, as from any checkpoint).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ArchOptions {
    /// A \[CLS\] token.
    pub class_token: bool,
    /// Register tokens after the \[CLS\].
    pub reg_tokens: usize,
    /// The position embedding covers the patches only.
    pub no_embed_class: bool,
    /// LayerScale on both residual branches.
    pub layer_scale: bool,
    /// A LayerNorm after the embedding, and no patch bias (CLIP).
    pub pre_norm: bool,
    /// `token`, `avg` (with `fc_norm`) or `map`.
    pub pool: &'static str,
}

impl Default for ArchOptions {
    fn default() -> Self {
        ArchOptions {
            class_token: true,
            reg_tokens: 0,
            no_embed_class: false,
            layer_scale: false,
            pre_norm: false,
            pool: "token",
        }
    }
}

impl Arch {
    /// Tokens per image: the prefix tokens (\[CLS\], registers) + the patch grid.
    pub fn tokens(&self) -> usize {
        self.prefix_tokens() + (self.image_size / self.patch).pow(2)
    }

    /// \[CLS\] and registers.
    pub fn prefix_tokens(&self) -> usize {
        usize::from(self.options.class_token) + self.options.reg_tokens
    }

    /// Multiply-adds of one forward pass for one image: patch embedding, per block the qkv,
    /// attention (`QK^T` and `AV`), output projection and the two MLP matmuls, and the head
    /// (not the attention pool of `map` pooling, which is small). ViT-B/16 at 224 px: 17.56 G.
    pub fn macs_per_image(&self) -> f64 {
        let (t, d, m) = (self.tokens() as f64, self.dim as f64, self.mlp_dim as f64);
        let patches = t - self.prefix_tokens() as f64;
        let embed = patches * (3 * self.patch * self.patch) as f64 * d;
        let block = t * d * 3.0 * d // qkv
            + 2.0 * t * t * d // QK^T and AV over all heads
            + t * d * d // proj
            + 2.0 * t * d * m; // fc1 + fc2
        let head = d * self.num_classes as f64;
        embed + self.depth as f64 * block + head
    }

    /// Floating-point operations of one forward pass for one image (2 per multiply-add).
    /// ViT-B/16 at 224 px: 35.1 G.
    pub fn flops_per_image(&self) -> f64 {
        2.0 * self.macs_per_image()
    }
}

/// The tensors of a plan of `(name, shape, kind)`, filled in the plan's order from one ChaCha8
/// stream seeded by `seed` (so the same seed gives the same weights on every machine): kind `'n'`
/// N(0, [`WEIGHT_STD`]), `'o'` ones, `'s'` 0.1 (LayerScale), anything else zeros. Every family's
/// random weights are drawn through it.
pub(crate) fn materialise(
    plan: Vec<(String, Vec<usize>, char)>,
    seed: u64,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = HashMap::with_capacity(plan.len());
    for (name, shape, kind) in plan {
        let n: usize = shape.iter().product();
        let data = match kind {
            'n' => normal(&mut rng, n, WEIGHT_STD),
            'o' => vec![1.0; n],
            's' => vec![0.1; n],
            _ => vec![0.0; n],
        };
        out.insert(name, Tensor::from_vec(data, shape, device)?);
    }
    Ok(out)
}

/// Draws `n` values N(0, `std`) from `rng`.
pub(crate) fn normal(rng: &mut ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let z: f32 = StandardNormal.sample(rng);
            z * std
        })
        .collect()
}

/// A timm-named state dict of random tensors for `arch`: matrices, tokens and position
/// embeddings N(0, 0.02), biases 0, LayerNorm weights 1. Tensors are drawn in a fixed order from
/// one ChaCha8 stream, so the same seed gives the same weights on every machine.
pub fn random_state_dict(
    arch: &Arch,
    seed: u64,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let (d, m, p) = (arch.dim, arch.mlp_dim, arch.patch);
    // (name, shape, kind): kind 'n' normal, 'z' zeros, 'o' ones.
    let o = &arch.options;
    let grid = (arch.image_size / p).pow(2);
    let pos_tokens = grid + if o.no_embed_class { 0 } else { arch.prefix_tokens() };
    // (name, shape, kind): kind 'n' normal, 'z' zeros, 'o' ones.
    let mut plan: Vec<(String, Vec<usize>, char)> = Vec::new();
    if o.class_token {
        plan.push(("cls_token".into(), vec![1, 1, d], 'n'));
    }
    if o.reg_tokens > 0 {
        plan.push(("reg_token".into(), vec![1, o.reg_tokens, d], 'n'));
    }
    plan.extend([
        ("pos_embed".into(), vec![1, pos_tokens, d], 'n'),
        ("patch_embed.proj.weight".into(), vec![d, 3, p, p], 'n'),
    ]);
    if o.pre_norm {
        plan.push(("norm_pre.weight".into(), vec![d], 'o'));
        plan.push(("norm_pre.bias".into(), vec![d], 'z'));
    } else {
        plan.push(("patch_embed.proj.bias".into(), vec![d], 'z'));
    }
    for i in 0..arch.depth {
        let b = |s: &str| format!("blocks.{i}.{s}");
        plan.extend([
            (b("norm1.weight"), vec![d], 'o'),
            (b("norm1.bias"), vec![d], 'z'),
            (b("attn.qkv.weight"), vec![3 * d, d], 'n'),
            (b("attn.qkv.bias"), vec![3 * d], 'z'),
            (b("attn.proj.weight"), vec![d, d], 'n'),
            (b("attn.proj.bias"), vec![d], 'z'),
            (b("norm2.weight"), vec![d], 'o'),
            (b("norm2.bias"), vec![d], 'z'),
            (b("mlp.fc1.weight"), vec![m, d], 'n'),
            (b("mlp.fc1.bias"), vec![m], 'z'),
            (b("mlp.fc2.weight"), vec![d, m], 'n'),
            (b("mlp.fc2.bias"), vec![d], 'z'),
        ]);
        if o.layer_scale {
            plan.push((b("ls1.gamma"), vec![d], 'o'));
            plan.push((b("ls2.gamma"), vec![d], 'o'));
        }
    }
    let norm = if o.pool == "avg" { "fc_norm" } else { "norm" };
    plan.extend([
        (format!("{norm}.weight"), vec![d], 'o'),
        (format!("{norm}.bias"), vec![d], 'z'),
    ]);
    if o.pool == "map" {
        for (name, shape, kind) in [
            ("latent", vec![1, 1, d], 'n'),
            ("q.weight", vec![d, d], 'n'),
            ("q.bias", vec![d], 'z'),
            ("kv.weight", vec![2 * d, d], 'n'),
            ("kv.bias", vec![2 * d], 'z'),
            ("proj.weight", vec![d, d], 'n'),
            ("proj.bias", vec![d], 'z'),
            ("norm.weight", vec![d], 'o'),
            ("norm.bias", vec![d], 'z'),
            ("mlp.fc1.weight", vec![m, d], 'n'),
            ("mlp.fc1.bias", vec![m], 'z'),
            ("mlp.fc2.weight", vec![d, m], 'n'),
            ("mlp.fc2.bias", vec![d], 'z'),
        ] {
            plan.push((format!("attn_pool.{name}"), shape, kind));
        }
    }
    plan.extend([
        ("head.weight".into(), vec![arch.num_classes, d], 'n'),
        ("head.bias".into(), vec![arch.num_classes], 'z'),
    ]);
    materialise(plan, seed, device)
}

/// The timm `config.json` a checkpoint of `arch` would carry (mean/std 0.5, as timm's ViTs).
pub fn timm_config_json(arch: &Arch, architecture: &str) -> serde_json::Value {
    serde_json::json!({
        "architecture": architecture,
        "num_classes": arch.num_classes,
        "num_features": arch.dim,
        "global_pool": arch.options.pool,
        "model_args": {
            "embed_dim": arch.dim,
            "depth": arch.depth,
            "num_heads": arch.heads,
            "patch_size": arch.patch,
            "mlp_ratio": arch.mlp_dim as f64 / arch.dim as f64,
            "num_classes": arch.num_classes,
        },
        "pretrained_cfg": {
            "input_size": [3, arch.image_size, arch.image_size],
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "num_classes": arch.num_classes,
        },
    })
}

/// A ViT of `arch` with weights drawn from `seed` ([`random_state_dict`]), named `architecture`
/// in its configuration, built through the checkpoint loader's own config and weight checks (no
/// file is read or written).
pub fn random_vit(
    arch: &Arch,
    architecture: &str,
    seed: u64,
    device: &Device,
) -> Result<VisionTransformer> {
    let model = in_memory(
        timm_config_json(arch, architecture),
        random_state_dict(arch, seed, device)?,
        device,
    )?;
    let cfg = model.config();
    if cfg.layer_norm_eps != arch.layer_norm_eps || cfg.mlp_dim != arch.mlp_dim {
        return Err(Error::invalid(format!(
            "random model config (eps {}, mlp {}) differs from the sizes asked for (eps {}, mlp {})",
            cfg.layer_norm_eps, cfg.mlp_dim, arch.layer_norm_eps, arch.mlp_dim
        )));
    }
    Ok(model)
}

/// A ViT from a timm `config.json` and a timm-named state dict held in memory.
pub fn in_memory(
    config: serde_json::Value,
    state: HashMap<String, Tensor>,
    device: &Device,
) -> Result<VisionTransformer> {
    // The paths only name the source in error messages.
    let ckpt = Checkpoint::from_parts(
        std::path::Path::new("<in-memory>/config.json"),
        config,
        None,
        std::path::Path::new("<in-memory>/model.safetensors"),
        state,
    )?;
    VisionTransformer::from_checkpoint(ckpt, device)
}
