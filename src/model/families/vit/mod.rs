//! The ViT family: every plain pre-norm ViT, with a forward pass numerically as timm's
//! `VisionTransformer` (and `VisionTransformerDistilled`) with its options (class token or none,
//! registers, `no_embed_class`, `pre_norm`, `fc_norm`, token/avg/max/map pooling, LayerScale,
//! qk-norm, GELU/QuickGELU/tanh-GELU, any patch and input size) and as transformers' ViT, DeiT,
//! DINOv2 (with registers), CLIP and SigLIP image classifiers in eval mode.
//!
//! ViT: Dosovitskiy et al., <https://arxiv.org/abs/2010.11929>; DeiT: Touvron et al.,
//! <https://arxiv.org/abs/2012.12877>; DeiT III: <https://arxiv.org/abs/2204.07118>; DINOv2:
//! <https://arxiv.org/abs/2304.07193>; registers: <https://arxiv.org/abs/2309.16588>; CLIP:
//! <https://arxiv.org/abs/2103.00020>; SigLIP: <https://arxiv.org/abs/2303.15343>.
//! One pass returns the logits and, when asked, one tap's
//! patch tokens as feature maps `(B, D, gh, gw)`, which is what ViT-CX turns into masks. The taps
//! are named as timm names the modules: `blocks.N.norm1` (the first LayerNorm of block `N`, the
//! reference's target layer) and `blocks.N` (the block's output).

mod config;
mod names;
pub mod random;

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::model::backbone::{
    Attention as AttentionMaps, Backbone, Forward, Precision, Spec, TapGradient, TapInfo,
};
use crate::model::checkpoint::{Checkpoint, Family};
use crate::model::config::Format;
use crate::model::layers::{Activation, LayerNorm, Linear};
use crate::model::weights::Weights;

pub use config::{Act, Pool, Resample, Variant, VitConfig};

/// The family's registry entry.
pub const FAMILY: Family = Family {
    name: "vit",
    covers: "plain-block ViTs: ViT, DeiT, DeiT III, DINOv2 (+registers), CLIP, SigLIP, avg-pool fine-tunes (timm vit_*, deit_*, deit3_*; Hugging Face model_type vit, deit, dinov2, dinov2_with_registers, clip, siglip)",
    claims,
    build,
};

/// timm architectures whose name starts with `vit_` or `deit`; Hugging Face `vit`, `deit`,
/// `dinov2`, `dinov2_with_registers`, `clip` and `siglip`.
fn claims(format: Format, config: &Value) -> bool {
    match format {
        Format::Timm => config
            .get("architecture")
            .and_then(Value::as_str)
            .is_some_and(|a| a.starts_with("vit_") || a.starts_with("deit")),
        Format::HuggingFace => config
            .get("model_type")
            .and_then(Value::as_str)
            .is_some_and(|t| names::Dialect::of(t).is_some()),
    }
}

fn build(ckpt: Checkpoint, device: &Device) -> Result<Box<dyn Backbone>> {
    Ok(Box::new(VisionTransformer::from_checkpoint(ckpt, device)?))
}

/// A tap of this family, parsed from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tap {
    /// `blocks.N.norm1`: output of the first LayerNorm of block `N` (0-based).
    Norm1(usize),
    /// `blocks.N`: output of block `N` (the residual stream after the block).
    Block(usize),
}

impl Tap {
    fn layer(self) -> usize {
        match self {
            Tap::Norm1(l) | Tap::Block(l) => l,
        }
    }
}

/// Multi-head self-attention with a fused qkv projection (timm `Attention`), with optional
/// LayerNorms of each head's queries and keys (timm `qk_norm`).
#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    q_norm: Option<LayerNorm>,
    k_norm: Option<LayerNorm>,
    proj: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    /// `(B, T, D)` -> `(B, T, D)`, and the attention probabilities `(B, H, T, T)` if `keep`;
    /// with `rows`, the output of the first `rows` tokens only `(B, rows, D)` (every token is
    /// still attended to).
    fn forward(
        &self,
        xs: &Tensor,
        keep: bool,
        rows: Option<usize>,
        precision: Precision,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let mut qkv = self.qkv.forward(xs, precision)?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            // Per head over its own width, before the scale, as timm's Attention does.
            let (b, t, d3) = qkv.dims3()?;
            let hd = d3 / 3 / self.heads;
            let parts = qkv.reshape((b, t, 3, self.heads, hd))?;
            let q = qn.forward(&parts.narrow(2, 0, 1)?.contiguous()?)?;
            let k = kn.forward(&parts.narrow(2, 1, 1)?.contiguous()?)?;
            let v = parts.narrow(2, 2, 1)?;
            qkv = Tensor::cat(&[&q, &k, &v], 2)?.reshape((b, t, d3))?;
        }
        let (out, attn) = if keep {
            let (out, attn) = crate::model::kernels::attention::composed(&qkv, self.heads, self.scale)?;
            (out, Some(attn))
        } else {
            let out = crate::model::kernels::attention::self_attention(&qkv, self.heads, self.scale)?;
            (out, None)
        };
        let out = match rows {
            Some(r) => out.narrow(1, 0, r)?,
            None => out,
        };
        Ok((self.proj.forward(&out, precision)?, attn))
    }
}

/// MLP: fc1 -> activation -> fc2.
#[derive(Debug, Clone)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Act,
}

impl Mlp {
    fn new(w: &mut Weights, name: &str, d: usize, m: usize, act: Act) -> Result<Self> {
        Ok(Mlp {
            fc1: Linear::new_opt(w, &format!("{name}.fc1"), m, d)?,
            fc2: Linear::new_opt(w, &format!("{name}.fc2"), d, m)?,
            act,
        })
    }

    fn forward(&self, xs: &Tensor, precision: Precision) -> Result<Tensor> {
        let h = self.fc1.forward_act(xs, activation(self.act), precision)?;
        self.fc2.forward(&h, precision)
    }
}

/// The kernel's activation for the configuration's.
fn activation(act: Act) -> Activation {
    match act {
        Act::Gelu => Activation::Gelu,
        Act::QuickGelu => Activation::QuickGelu,
        Act::GeluTanh => Activation::GeluTanh,
    }
}

/// `x * gamma` on a residual branch (timm `LayerScale`, DINOv2 `layer_scale`), when present.
fn scaled(xs: Tensor, gamma: &Option<Tensor>) -> Result<Tensor> {
    Ok(match gamma {
        Some(g) => xs.broadcast_mul(g)?,
        None => xs,
    })
}

/// One pre-norm transformer block (timm `Block`, Hugging Face `ViTLayer`, `Dinov2Layer`,
/// `CLIPEncoderLayer`).
#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    attn: Attention,
    ls1: Option<Tensor>,
    norm2: LayerNorm,
    mlp: Mlp,
    ls2: Option<Tensor>,
}

impl Block {
    fn new(w: &mut Weights, i: usize, cfg: &VitConfig) -> Result<Self> {
        let p = format!("blocks.{i}");
        let (d, m) = (cfg.dim, cfg.mlp_dim);
        let eps = cfg.layer_norm_eps;
        let hd = d / cfg.heads;
        let (q_norm, k_norm) = if cfg.qk_norm {
            (
                Some(LayerNorm::new(w, &format!("{p}.attn.q_norm"), hd, eps)?),
                Some(LayerNorm::new(w, &format!("{p}.attn.k_norm"), hd, eps)?),
            )
        } else {
            (None, None)
        };
        let ls = |w: &mut Weights, name: &str| -> Result<Option<Tensor>> {
            cfg.layer_scale
                .then(|| w.take(&format!("{p}.{name}.gamma"), &[d]))
                .transpose()
        };
        Ok(Block {
            norm1: LayerNorm::new(w, &format!("{p}.norm1"), d, eps)?,
            attn: Attention {
                qkv: Linear::new(w, &format!("{p}.attn.qkv"), 3 * d, d, cfg.qkv_bias)?,
                q_norm,
                k_norm,
                proj: Linear::new_opt(w, &format!("{p}.attn.proj"), d, d)?,
                heads: cfg.heads,
                scale: (hd as f64).powf(-0.5),
            },
            ls1: ls(w, "ls1")?,
            norm2: LayerNorm::new(w, &format!("{p}.norm2"), d, eps)?,
            mlp: Mlp::new(w, &format!("{p}.mlp"), d, m, cfg.act)?,
            ls2: ls(w, "ls2")?,
        })
    }

    /// `(B, T, D)` -> (block output, norm1 output), both `(B, T, D)`; with `rows`, the output
    /// of the first `rows` tokens only, `(B, rows, D)`: the last block of a model whose head
    /// reads the prefix tokens alone runs its projection and MLP, three quarters of its
    /// products, on those rows only (each row's result is the same).
    fn forward(
        &self,
        xs: &Tensor,
        rows: Option<usize>,
        precision: Precision,
    ) -> Result<(Tensor, Tensor)> {
        let n1 = self.norm1.forward(xs)?;
        let (a, _) = self.attn.forward(&n1, false, rows, precision)?;
        let xs = match rows {
            Some(r) => xs.narrow(1, 0, r)?,
            None => xs.clone(),
        };
        let out = self.after_attention(xs, a, precision)?;
        Ok((out, n1))
    }

    /// The block from its input `xs` and `n1 = norm1(xs)` on: the output, and the attention
    /// probabilities if `keep`. Split here so a gradient can be taken at `n1`.
    fn after_norm1(
        &self,
        xs: &Tensor,
        n1: &Tensor,
        keep: bool,
        precision: Precision,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (a, attn) = self.attn.forward(n1, keep, None, precision)?;
        Ok((self.after_attention(xs.clone(), a, precision)?, attn))
    }

    /// The residual of the attention output `a`, then the MLP and its residual.
    fn after_attention(&self, xs: Tensor, a: Tensor, precision: Precision) -> Result<Tensor> {
        let xs = (xs + scaled(a, &self.ls1)?)?;
        let m = self.mlp.forward(&self.norm2.forward(&xs)?, precision)?;
        Ok((&xs + scaled(m, &self.ls2)?)?)
    }
}

/// Attention pooling with a learned latent query (timm `AttentionPoolLatent`, as
/// `VisionTransformer` builds it for `global_pool='map'`: the model's heads, MLP ratio, norm and
/// activation, one latent, token pooling).
#[derive(Debug, Clone)]
struct AttnPool {
    latent: Tensor,
    q: Linear,
    kv: Linear,
    proj: Linear,
    norm: LayerNorm,
    mlp: Mlp,
    heads: usize,
}

impl AttnPool {
    fn new(w: &mut Weights, cfg: &VitConfig) -> Result<Self> {
        let d = cfg.dim;
        let latent = w.take("attn_pool.latent", &[1, 1, d])?;
        let m = w.dims("attn_pool.mlp.fc1.weight")?.first().copied().unwrap_or(0);
        Ok(AttnPool {
            latent,
            q: Linear::new_opt(w, "attn_pool.q", d, d)?,
            kv: Linear::new_opt(w, "attn_pool.kv", 2 * d, d)?,
            proj: Linear::new_opt(w, "attn_pool.proj", d, d)?,
            norm: LayerNorm::new(w, "attn_pool.norm", d, cfg.layer_norm_eps)?,
            mlp: Mlp::new(w, "attn_pool.mlp", d, m, cfg.act)?,
            heads: cfg.heads,
        })
    }

    /// `(B, T, D)` -> `(B, D)`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, t, d) = xs.dims3()?;
        let (h, hd) = (self.heads, d / self.heads);
        let q = self
            .q
            .forward(&self.latent, Precision::F32)?
            .reshape((1, 1, h, hd))?
            .transpose(1, 2)?
            .broadcast_as((b, h, 1, hd))?
            .contiguous()?;
        let kv = self
            .kv
            .forward(xs, Precision::F32)?
            .reshape((b, t, 2, h, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let k = kv.get(0)?.contiguous()?;
        let v = kv.get(1)?.contiguous()?;
        let att = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?;
        // The differentiable softmax: Grad-CAM takes gradients through the pool
        // (candle's softmax_last_dim has no backward pass and would treat it as constant).
        let att = candle_nn::ops::softmax(&att, candle_core::D::Minus1)?;
        let x = att.matmul(&v)?.transpose(1, 2)?.reshape((b, 1, d))?;
        let x = self.proj.forward(&x, Precision::F32)?;
        let x = (&x + self.mlp.forward(&self.norm.forward(&x)?, Precision::F32)?)?;
        Ok(x.get_on_dim(1, 0)?)
    }
}

/// The position embedding: the prefix tokens with theirs already added, and the patches' at the
/// grid it was trained on, resampled (and cached) for another grid.
#[derive(Debug)]
struct PosEmbed {
    /// `(1, P, D)`: the prefix tokens, each plus its position embedding if it has one.
    prefix: Tensor,
    /// `(1, gh * gw, D)` at `grid`.
    patches: Tensor,
    grid: (usize, usize),
    resample: Resample,
    /// The last resampled grid.
    cache: Mutex<Option<((usize, usize), Tensor)>>,
}

impl Clone for PosEmbed {
    fn clone(&self) -> Self {
        PosEmbed {
            prefix: self.prefix.clone(),
            patches: self.patches.clone(),
            grid: self.grid,
            resample: self.resample,
            cache: Mutex::new(None),
        }
    }
}

impl PosEmbed {
    /// The patches' position embedding `(1, gh * gw, D)` at `grid`.
    fn at(&self, grid: (usize, usize)) -> Result<Tensor> {
        if grid == self.grid {
            return Ok(self.patches.clone());
        }
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| Error::invalid("position embedding cache poisoned"))?;
        if let Some((g, t)) = cache.as_ref() {
            if *g == grid {
                return Ok(t.clone());
            }
        }
        let d = self.patches.dim(2)?;
        // (1, gh*gw, D) -> planes (D, gh, gw), resampled, and back.
        let planes = self
            .patches
            .squeeze(0)?
            .t()?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let out = crate::resample::torch_bicubic(
            &planes,
            d,
            self.grid,
            grid,
            self.resample == Resample::Antialiased,
        );
        let t = Tensor::from_vec(out, (d, grid.0 * grid.1), self.patches.device())?
            .t()?
            .contiguous()?
            .unsqueeze(0)?;
        *cache = Some((grid, t.clone()));
        Ok(t)
    }
}

/// A plain-block Vision Transformer loaded from a timm or Hugging Face checkpoint; see
/// [`crate::model::load()`].
#[derive(Debug, Clone)]
pub struct VisionTransformer {
    config: VitConfig,
    spec: Spec,
    grid: (usize, usize),
    device: Device,
    /// Patch projection `(3 * p * p, D)`, rows in (channel, y, x) order like the conv kernel.
    patch_wt: Tensor,
    patch_b: Option<Tensor>,
    pos: PosEmbed,
    norm_pre: Option<LayerNorm>,
    blocks: Vec<Block>,
    norm: Option<LayerNorm>,
    attn_pool: Option<AttnPool>,
    fc_norm: Option<LayerNorm>,
    head: Linear,
    head_dist: Option<Linear>,
}

impl VisionTransformer {
    /// Builds the model from a checkpoint: its configuration checked against its tensors, every
    /// tensor used.
    pub fn from_checkpoint(mut ckpt: Checkpoint, device: &Device) -> Result<Self> {
        let tensors = std::mem::take(&mut ckpt.tensors);
        let model_type = ckpt
            .config
            .get("model_type")
            .and_then(Value::as_str)
            .map(str::to_string);
        let mut w = names::weights(&ckpt.weights_path, ckpt.format, model_type.as_deref(), tensors)?;
        let config = config::read(&ckpt, &w)?;
        let cfg = &config;
        let (d, p) = (cfg.dim, cfg.patch);
        let grid = (cfg.input_size.0 / p, cfg.input_size.1 / p);
        let patch_wt = crate::model::kernels::transpose::transpose(
            &w.take("patch_embed.proj.weight", &[d, 3, p, p])?
                .reshape((d, 3 * p * p))?,
        )?;
        let patch_b = cfg
            .patch_bias
            .then(|| w.take("patch_embed.proj.bias", &[d]))
            .transpose()?;
        let pos_tokens = cfg.pos_prefix + cfg.pos_grid.0 * cfg.pos_grid.1;
        let pos_embed = w.take("pos_embed", &[1, pos_tokens, d])?;
        let mut prefix = Vec::new();
        if cfg.class_token() {
            prefix.push(w.take("cls_token", &[1, 1, d])?);
        }
        if cfg.dist_token() {
            prefix.push(w.take("dist_token", &[1, 1, d])?);
        }
        let regs = cfg.num_prefix_tokens() - prefix.len();
        if regs > 0 {
            prefix.push(w.take("reg_token", &[1, regs, d])?);
        }
        let mut prefix = if prefix.is_empty() {
            Tensor::zeros((1, 0, d), DType::F32, device)?
        } else {
            Tensor::cat(&prefix, 1)?
        };
        if cfg.pos_prefix > 0 {
            let k = cfg.pos_prefix;
            let with = prefix.narrow(1, 0, k)?.broadcast_add(&pos_embed.narrow(1, 0, k)?)?;
            let rest = prefix.narrow(1, k, cfg.num_prefix_tokens() - k)?;
            prefix = Tensor::cat(&[&with, &rest], 1)?;
        }
        let pos = PosEmbed {
            prefix,
            patches: pos_embed
                .narrow(1, cfg.pos_prefix, pos_tokens - cfg.pos_prefix)?
                .contiguous()?,
            grid: cfg.pos_grid,
            resample: cfg.resample,
            cache: Mutex::new(None),
        };
        let eps = cfg.layer_norm_eps;
        let norm_pre = cfg
            .pre_norm
            .then(|| LayerNorm::new(&mut w, "norm_pre", d, eps))
            .transpose()?;
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(&mut w, i, cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = cfg
            .final_norm
            .then(|| LayerNorm::new(&mut w, "norm", d, eps))
            .transpose()?;
        let attn_pool = (cfg.pool == Pool::Map)
            .then(|| AttnPool::new(&mut w, cfg))
            .transpose()?;
        let fc_norm = cfg
            .fc_norm
            .then(|| LayerNorm::new(&mut w, "fc_norm", d, eps))
            .transpose()?;
        let head = Linear::new(&mut w, "head", cfg.num_classes, cfg.head_in(), true)?;
        let head_dist = cfg
            .distilled()
            .then(|| Linear::new(&mut w, "head_dist", cfg.num_classes, d, true))
            .transpose()?;
        w.finish(
            "a plain-block ViT",
            "relative position bias, rotary embeddings, gated MLPs and other block variants are not supported",
        )?;
        // A fixed-size model's embedding was checked against the input grid by config::read;
        // a dynamic one is resampled now, once, for the size it runs at.
        pos.at(grid)?;
        let spec = spec(cfg, grid);
        Ok(VisionTransformer {
            config,
            spec,
            grid,
            device: device.clone(),
            patch_wt,
            patch_b,
            pos,
            norm_pre,
            blocks,
            norm,
            attn_pool,
            fc_norm,
            head,
            head_dist,
        })
    }

    /// Everything read from the checkpoint's config files, with the family's own sizes.
    pub fn config(&self) -> &VitConfig {
        &self.config
    }

    /// Patch embedding + prefix tokens + position embedding (+ `norm_pre`):
    /// `(B, 3, H, W)` -> `(B, T, D)`. The stride-p conv is written as a reshape and one matmul.
    fn embed(&self, px: &Tensor, grid: (usize, usize)) -> Result<Tensor> {
        let (b, _, _, _) = px.dims4()?;
        let p = self.config.patch;
        let (gh, gw) = grid;
        let d = self.config.dim;
        let patches = px
            .reshape((b, 3, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b * gh * gw, 3 * p * p))?
            .matmul(&self.patch_wt)?;
        let patches = match &self.patch_b {
            Some(bias) => patches.broadcast_add(bias)?,
            None => patches,
        };
        let patches = patches
            .reshape((b, gh * gw, d))?
            .broadcast_add(&self.pos.at(grid)?)?;
        let prefix = self
            .pos
            .prefix
            .broadcast_as((b, self.config.num_prefix_tokens(), d))?;
        let xs = Tensor::cat(&[&prefix, &patches], 1)?;
        Ok(match &self.norm_pre {
            Some(n) => n.forward(&xs)?,
            None => xs,
        })
    }

    /// Final norm, pooling, `fc_norm` and head(s): `(B, T, D)` -> `(B, C)`.
    fn logits(&self, xs: &Tensor) -> Result<Tensor> {
        let cfg = &self.config;
        let k = cfg.num_prefix_tokens();
        let norm = |x: &Tensor| -> Result<Tensor> {
            match &self.norm {
                Some(n) => n.forward(x),
                None => Ok(x.clone()),
            }
        };
        let patches = |x: &Tensor| -> Result<Tensor> {
            let t = x.dim(1)?;
            Ok(x.narrow(1, k, t - k)?)
        };
        if cfg.pool == Pool::Token {
            // Only the prefix tokens reach the heads: norm just those.
            let pre = norm(&xs.narrow(1, 0, k)?)?;
            let cls = self.pooled_head(&pre.get_on_dim(1, 0)?)?;
            return match &self.head_dist {
                // timm eval mode / HF WithTeacher: average of the [CLS] and [DIST] heads.
                Some(hd) => {
                    let dist = hd.forward(&pre.get_on_dim(1, 1)?, Precision::F32)?;
                    Ok(((cls + dist)? / 2.0)?)
                }
                None => Ok(cls),
            };
        }
        let x = norm(xs)?;
        let pooled = match cfg.pool {
            Pool::Token => unreachable!("handled above"),
            Pool::Avg => patches(&x)?.mean(1)?,
            Pool::Max => patches(&x)?.max(1)?,
            Pool::AvgMax => ((patches(&x)?.mean(1)? + patches(&x)?.max(1)?)? * 0.5)?,
            Pool::Map => match &self.attn_pool {
                Some(ap) => ap.forward(&x)?,
                None => return Err(Error::invalid("map pooling without its weights")),
            },
            Pool::ClsAndMean => Tensor::cat(&[&x.get_on_dim(1, 0)?, &patches(&x)?.mean(1)?], 1)?,
        };
        self.pooled_head(&pooled)
    }

    /// `fc_norm` (when present) and the head on a pooled `(B, D)`.
    fn pooled_head(&self, pooled: &Tensor) -> Result<Tensor> {
        let x = match &self.fc_norm {
            Some(n) => n.forward(pooled)?,
            None => pooled.clone(),
        };
        self.head.forward(&x, Precision::F32)
    }

    /// Patch tokens `(B, T, D)` -> feature maps `(B, D, gh, gw)`, prefix dropped.
    fn to_maps(&self, tokens: &Tensor, grid: (usize, usize)) -> Result<Tensor> {
        let (b, _, d) = tokens.dims3()?;
        let (gh, gw) = grid;
        Ok(tokens
            .narrow(1, self.config.num_prefix_tokens(), gh * gw)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, d, gh, gw))?)
    }
}

impl Backbone for VisionTransformer {
    fn spec(&self) -> &Spec {
        &self.spec
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn forward(&self, px: &Tensor, tap: Option<&str>) -> Result<Forward> {
        let tap = tap.map(|t| self.parse_tap(t)).transpose()?;
        self.run(px, tap, Precision::F32)
    }

    fn logits_at(&self, px: &Tensor, precision: Precision) -> Result<Tensor> {
        Ok(self.run(px, None, precision)?.logits)
    }

    fn attention(&self, px: &Tensor) -> Result<AttentionMaps> {
        let grid = self.check(px)?;
        let mut xs = self.embed(&px.to_dtype(DType::F32)?, grid)?;
        let mut maps = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let n1 = block.norm1.forward(&xs)?;
            let (out, attn) = block.after_norm1(&xs, &n1, true, Precision::F32)?;
            maps.extend(attn);
            xs = out;
        }
        Ok(AttentionMaps {
            logits: self.logits(&xs)?,
            maps,
            prefix_tokens: self.config.num_prefix_tokens(),
            grid,
        })
    }

    fn tap_gradient(
        &self,
        px: &Tensor,
        tap: &str,
        score: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<TapGradient> {
        let tap = self.parse_tap(tap)?;
        let grid = self.check(px)?;
        // The weights are plain tensors, so the graph starts at the tapped tokens: only the
        // blocks after the tap are differentiated.
        let mut xs = self.embed(&px.to_dtype(DType::F32)?, grid)?;
        let mut tapped = None;
        for (i, block) in self.blocks.iter().enumerate() {
            xs = match tap {
                Tap::Norm1(l) if l == i => {
                    let n1 = Var::from_tensor(&block.norm1.forward(&xs)?.detach())?;
                    let (out, _) = block.after_norm1(&xs, n1.as_tensor(), false, Precision::F32)?;
                    tapped = Some(n1);
                    out
                }
                Tap::Block(l) if l == i => {
                    let out = Var::from_tensor(&block.forward(&xs, None, Precision::F32)?.0.detach())?;
                    let t = out.as_tensor().clone();
                    tapped = Some(out);
                    t
                }
                _ => block.forward(&xs, None, Precision::F32)?.0,
            };
        }
        // parse_tap only accepts layers below the depth, so the loop reached the tap.
        let tapped = tapped.ok_or_else(|| Error::invalid("tap not reached"))?;
        let logits = self.logits(&xs)?;
        let grads = score(&logits)?.backward()?;
        let g = grads
            .get(tapped.as_tensor())
            .ok_or_else(|| Error::Unsupported("no gradient reached the tapped tokens".into()))?;
        Ok(TapGradient {
            logits: logits.detach(),
            features: self.to_maps(&tapped.as_tensor().detach(), grid)?,
            gradients: self.to_maps(g, grid)?,
        })
    }
}

/// What the model tells methods and commands: labels, preprocessing, and its taps (every
/// block's first norm and output, each on the same grid, at the same width).
fn spec(cfg: &VitConfig, grid: (usize, usize)) -> Spec {
    let tap = |name: String, layer: usize| TapInfo {
        name,
        layer,
        grid,
        dim: cfg.dim,
        prefix_tokens: cfg.prefix.clone(),
    };
    let taps = (0..cfg.depth)
        .flat_map(|i| {
            [
                tap(format!("blocks.{i}.norm1"), i),
                tap(format!("blocks.{i}"), i),
            ]
        })
        .collect();
    let details = json!({
        "dim": cfg.dim,
        "heads": cfg.heads,
        "mlp_dim": cfg.mlp_dim,
        "patch": cfg.patch,
        "grid": grid,
        "num_prefix_tokens": cfg.num_prefix_tokens(),
        "pos_embed": position_embedding(cfg),
        "pool": cfg.pool.name(),
        "norms": norms(cfg),
        "layer_scale": cfg.layer_scale,
        "qk_norm": cfg.qk_norm,
        "activation": cfg.act.name(),
        "layer_norm_eps": cfg.layer_norm_eps,
        "qkv_bias": cfg.qkv_bias,
        "kernels": kernels(cfg),
    });
    Spec {
        family: cfg.variant.name().to_string(),
        format: cfg.format,
        architecture: cfg.architecture.clone(),
        input_size: cfg.input_size,
        num_classes: cfg.num_classes,
        labels: cfg.labels.clone(),
        preprocess: cfg.preprocess.clone(),
        depth: cfg.depth,
        layer_taps: (0..cfg.depth)
            .map(|i| format!("blocks.{i}.norm1"))
            .collect(),
        taps,
        notes: cfg.notes.clone(),
        details: match details {
            Value::Object(m) => m,
            _ => serde_json::Map::new(),
        },
    }
}

/// Which tokens the position embedding covers, its grid, and how it is resampled.
fn position_embedding(cfg: &VitConfig) -> String {
    let covers = match (cfg.pos_prefix, cfg.num_prefix_tokens()) {
        (0, 0) => "patches".to_string(),
        (0, _) => "patches only (not the prefix tokens)".to_string(),
        (k, n) if k == n => "prefix tokens and patches".to_string(),
        (k, _) => format!("the first {k} prefix token(s) and patches"),
    };
    let rule = match cfg.resample {
        Resample::Antialiased => "bicubic antialiased",
        Resample::Plain => "bicubic",
    };
    let (gh, gw) = cfg.pos_grid;
    if cfg.dynamic {
        format!("{covers}, {gh} x {gw}; any input size, resampled {rule}")
    } else {
        format!("{covers}, {gh} x {gw}; fixed input size")
    }
}

/// The LayerNorms outside the blocks, in order.
fn norms(cfg: &VitConfig) -> String {
    let mut n = Vec::new();
    if cfg.pre_norm {
        n.push("norm_pre");
    }
    n.push("blocks");
    if cfg.final_norm {
        n.push("norm");
    }
    if cfg.fc_norm {
        n.push("fc_norm");
    }
    n.join(" -> ")
}

/// Which parts run on vitcx's fused CPU kernels, and which fall back to composed ops.
fn kernels(cfg: &VitConfig) -> String {
    let mut composed = Vec::new();
    if cfg.layer_scale {
        composed.push("LayerScale (one multiply per branch)".to_string());
    }
    if cfg.qk_norm {
        composed.push("qk-norm (the LayerNorm kernel on q and k, then a copy)".to_string());
    }
    if cfg.pool == Pool::Map {
        composed.push("the attention pool (once per image)".to_string());
    }
    let fused = format!("attention, LayerNorm, linear, bias+{}", cfg.act.name());
    if composed.is_empty() {
        format!("fused: {fused}")
    } else {
        format!("fused: {fused}; composed: {}", composed.join(", "))
    }
}

impl VisionTransformer {
    /// One forward pass at `precision`: logits, and the tapped tokens if asked.
    fn run(&self, px: &Tensor, tap: Option<Tap>, precision: Precision) -> Result<Forward> {
        let grid = self.check(px)?;
        let px = px.to_dtype(DType::F32)?;
        let mut xs = self.embed(&px, grid)?;
        let mut features = None;
        // With token pooling the head reads the prefix tokens alone: unless the last block's
        // output is tapped, that block finishes only those rows.
        let last = self.blocks.len().saturating_sub(1);
        let prefix_only = self.config.pool == Pool::Token
            && !matches!(tap, Some(Tap::Block(l)) if l == last);
        for (i, block) in self.blocks.iter().enumerate() {
            let rows = (prefix_only && i == last).then(|| self.config.num_prefix_tokens());
            let (out, n1) = block.forward(&xs, rows, precision)?;
            match tap {
                Some(Tap::Norm1(l)) if l == i => features = Some(self.to_maps(&n1, grid)?),
                Some(Tap::Block(l)) if l == i => features = Some(self.to_maps(&out, grid)?),
                _ => {}
            }
            xs = out;
        }
        Ok(Forward {
            logits: self.logits(&xs)?,
            features,
        })
    }

    /// The patch grid of `px`, which must be `(B, 3, H, W)` at the model's size, or, for a
    /// model with a dynamic input size, at any multiple of the patch.
    fn check(&self, px: &Tensor) -> Result<(usize, usize)> {
        let (h, w) = self.config.input_size;
        let p = self.config.patch;
        match px.dims() {
            [b, 3, ph, pw] if *b > 0 && (*ph, *pw) == (h, w) => Ok(self.grid),
            [b, 3, ph, pw] if *b > 0 && self.config.dynamic && ph % p == 0 && pw % p == 0 && *ph > 0 && *pw > 0 => {
                Ok((ph / p, pw / p))
            }
            dims if self.config.dynamic => Err(Error::invalid(format!(
                "input has shape {dims:?}, expected (B, 3, H, W) with B >= 1 and H, W positive multiples of the patch {p}"
            ))),
            dims => Err(Error::invalid(format!(
                "input has shape {dims:?}, expected (B, 3, {h}, {w}) with B >= 1"
            ))),
        }
    }

    /// `blocks.N.norm1` or `blocks.N`, with `N` below the depth.
    fn parse_tap(&self, name: &str) -> Result<Tap> {
        let tap = name.strip_prefix("blocks.").and_then(|rest| {
            let (n, role) = rest.split_once('.').unwrap_or((rest, ""));
            let n: usize = n.parse().ok()?;
            match role {
                "norm1" => Some(Tap::Norm1(n)),
                "" => Some(Tap::Block(n)),
                _ => None,
            }
        });
        match tap {
            Some(t) if t.layer() < self.config.depth => Ok(t),
            Some(t) => Err(Error::invalid(format!(
                "layer {} out of range; model has {} blocks",
                t.layer(),
                self.config.depth
            ))),
            None => Err(self.spec.tap(name).err().unwrap_or_else(|| {
                Error::invalid(format!("tap '{name}' is not a tap of this ViT"))
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::random::{random_vit, Arch, ArchOptions};
    use super::*;

    /// The last block finishing only the prefix rows gives the logits of the whole block (the
    /// path a tap of the last block's output takes), at every precision, with registers too.
    #[test]
    fn prefix_rows_of_the_last_block_give_the_same_logits() {
        for reg_tokens in [0, 2] {
            let arch = Arch {
                dim: 64,
                depth: 2,
                heads: 2,
                mlp_dim: 128,
                patch: 16,
                image_size: 64,
                num_classes: 10,
                layer_norm_eps: 1e-6,
                options: ArchOptions {
                    reg_tokens,
                    ..ArchOptions::default()
                },
            };
            let m = random_vit(&arch, "vit_test", 3, &Device::Cpu).unwrap();
            let v: Vec<f32> = (0..3 * 3 * 64 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
            let px = Tensor::from_vec(v, (3, 3, 64, 64), &Device::Cpu).unwrap();
            for p in Precision::ALL {
                let short = m.run(&px, None, p).unwrap();
                let full = m.run(&px, Some(Tap::Block(1)), p).unwrap();
                assert_eq!(full.features.unwrap().dims(), &[3, 64, 4, 4]);
                let d = crate::model::kernels::max_abs_diff(&short.logits, &full.logits);
                assert!(d < 1e-5, "registers {reg_tokens}, {p:?}: {d}");
            }
        }
    }
}
