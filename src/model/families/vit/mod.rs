//! The ViT family: ViT, DeiT and DeiT-distilled from timm or Hugging Face checkpoints, with a
//! forward pass numerically as timm's `VisionTransformer` and Hugging Face's
//! `ViTForImageClassification` / `DeiTForImageClassification[WithTeacher]` in eval mode.
//!
//! ViT: Dosovitskiy et al., <https://arxiv.org/abs/2010.11929>; DeiT: Touvron et al.,
//! <https://arxiv.org/abs/2012.12877>. One pass returns the logits and, when asked, one tap's
//! patch tokens as feature maps `(B, D, gh, gw)`, which is what ViT-CX turns into masks. The taps
//! are named as timm names the modules: `blocks.N.norm1` (the first LayerNorm of block `N`, the
//! reference's target layer) and `blocks.N` (the block's output).

mod config;
mod names;
pub mod random;

use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, Var};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::model::backbone::{
    Attention as AttentionMaps, Backbone, Forward, Precision, Spec, TapGradient, TapInfo,
};
use crate::model::checkpoint::{Checkpoint, Family};
use crate::model::config::Format;
use crate::model::kernels::bf16::{Bf16Linear, PackedBf16};
use crate::model::weights::Weights;

pub use config::{Variant, VitConfig};

/// The family's registry entry.
pub const FAMILY: Family = Family {
    name: "vit",
    covers: "ViT, DeiT, DeiT-distilled (timm vit_*, deit_*; Hugging Face model_type vit, deit)",
    claims,
    build,
};

/// timm architectures whose name starts with `vit_` or `deit`, Hugging Face `vit` and `deit`.
fn claims(format: Format, config: &Value) -> bool {
    match format {
        Format::Timm => config
            .get("architecture")
            .and_then(Value::as_str)
            .is_some_and(|a| a.starts_with("vit_") || a.starts_with("deit")),
        Format::HuggingFace => config
            .get("model_type")
            .and_then(Value::as_str)
            .is_some_and(|t| t == "vit" || t == "deit"),
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

/// A linear layer with its weight stored pre-transposed `(in, out)` and contiguous, and packed
/// for the bf16 product the first time a bf16 pass needs it.
#[derive(Debug, Clone)]
struct Linear {
    wt: Tensor,
    b: Option<Tensor>,
    packed: OnceLock<PackedBf16>,
}

impl Linear {
    fn new(w: &mut Weights, name: &str, out: usize, inp: usize, bias: bool) -> Result<Self> {
        let wt = w
            .take(&format!("{name}.weight"), &[out, inp])?
            .t()?
            .contiguous()?;
        let b = if bias {
            Some(w.take(&format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear {
            wt,
            b,
            packed: OnceLock::new(),
        })
    }

    /// `GELU(self(xs))`, the bias and the activation in one pass.
    fn forward_gelu(&self, xs: &Tensor, precision: Precision) -> Result<Tensor> {
        let mut dims = xs.dims().to_vec();
        let inp = dims.pop().unwrap_or(1);
        let rows = xs.elem_count() / inp.max(1);
        let xs = xs.reshape((rows, inp))?;
        let ys = match precision {
            Precision::F32 => xs.matmul(&self.wt)?,
            Precision::Bf16 => self.product_bf16(&xs, false)?,
        };
        let ys = match &self.b {
            Some(b) => crate::model::kernels::gelu::bias_gelu(&ys, b)?,
            None => ys.gelu_erf()?,
        };
        dims.push(self.wt.dim(1)?);
        Ok(ys.reshape(dims)?)
    }

    /// `(.., in)` -> `(.., out)`.
    fn forward(&self, xs: &Tensor, precision: Precision) -> Result<Tensor> {
        let mut dims = xs.dims().to_vec();
        let inp = dims.pop().unwrap_or(1);
        let rows = xs.elem_count() / inp.max(1);
        let xs = xs.reshape((rows, inp))?;
        let ys = match (precision, &self.b) {
            (Precision::Bf16, _) => self.product_bf16(&xs, true)?,
            (Precision::F32, Some(b)) => crate::model::kernels::linear::linear(&xs, &self.wt, b)?,
            (Precision::F32, None) => xs.matmul(&self.wt)?,
        };
        dims.push(self.wt.dim(1)?);
        Ok(ys.reshape(dims)?)
    }

    /// `xs (rows, in) @ wt` with bf16 products and f32 sums, plus the bias if `with_bias`. On the
    /// CPU this is [`crate::model::kernels::bf16`]'s kernel; elsewhere candle's bf16 matmul.
    fn product_bf16(&self, xs: &Tensor, with_bias: bool) -> Result<Tensor> {
        let bias = self.b.as_ref().filter(|_| with_bias);
        if !xs.device().is_cpu() {
            let ys = xs
                .to_dtype(DType::BF16)?
                .matmul(&self.wt.to_dtype(DType::BF16)?)?
                .to_dtype(DType::F32)?;
            return Ok(match bias {
                Some(b) => ys.broadcast_add(b)?,
                None => ys,
            });
        }
        let packed = match self.packed.get() {
            Some(p) => p,
            None => {
                let (k, n) = self.wt.dims2()?;
                let wt = self.wt.flatten_all()?.to_vec1::<f32>()?;
                let b = self.b.as_ref().map(|b| b.to_vec1::<f32>()).transpose()?;
                let p = PackedBf16::new(&wt, k, n, b)?;
                // Another thread may have packed it first; either copy is the same.
                let _ = self.packed.set(p);
                self.packed
                    .get()
                    .ok_or_else(|| Error::invalid("bf16 weights not packed"))?
            }
        };
        let op = Bf16Linear {
            packed,
            bias: with_bias,
        };
        Ok(xs.contiguous()?.apply_op1_no_bwd(&op)?)
    }
}

/// LayerNorm over the last dimension, two-pass (mean, then variance of the centred values) as
/// PyTorch does, in one fused op ([`crate::model::kernels::layer_norm`]).
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(w: &mut Weights, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.take(&format!("{name}.weight"), &[dim])?,
            bias: w.take(&format!("{name}.bias"), &[dim])?,
            eps,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(crate::model::kernels::layer_norm::layer_norm(
            xs,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}

/// Multi-head self-attention with a fused qkv projection (timm `Attention`).
#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    /// `(B, T, D)` -> `(B, T, D)`, and the attention probabilities `(B, H, T, T)` if `keep`.
    fn forward(
        &self,
        xs: &Tensor,
        keep: bool,
        precision: Precision,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let qkv = self.qkv.forward(xs, precision)?;
        let (out, attn) = if keep {
            let (out, attn) = crate::model::kernels::attention::composed(&qkv, self.heads, self.scale)?;
            (out, Some(attn))
        } else {
            let out = crate::model::kernels::attention::self_attention(&qkv, self.heads, self.scale)?;
            (out, None)
        };
        Ok((self.proj.forward(&out, precision)?, attn))
    }
}

/// MLP: fc1 -> exact (erf) GELU -> fc2.
#[derive(Debug, Clone)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn forward(&self, xs: &Tensor, precision: Precision) -> Result<Tensor> {
        let h = self.fc1.forward_gelu(xs, precision)?;
        self.fc2.forward(&h, precision)
    }
}

/// One pre-norm transformer block (timm `Block`, Hugging Face `ViTLayer`).
#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn new(w: &mut Weights, i: usize, cfg: &VitConfig) -> Result<Self> {
        let p = format!("blocks.{i}");
        let (d, m) = (cfg.dim, cfg.mlp_dim);
        let eps = cfg.layer_norm_eps;
        Ok(Block {
            norm1: LayerNorm::new(w, &format!("{p}.norm1"), d, eps)?,
            attn: Attention {
                qkv: Linear::new(w, &format!("{p}.attn.qkv"), 3 * d, d, cfg.qkv_bias)?,
                proj: Linear::new(w, &format!("{p}.attn.proj"), d, d, true)?,
                heads: cfg.heads,
                scale: ((d / cfg.heads) as f64).powf(-0.5),
            },
            norm2: LayerNorm::new(w, &format!("{p}.norm2"), d, eps)?,
            mlp: Mlp {
                fc1: Linear::new(w, &format!("{p}.mlp.fc1"), m, d, true)?,
                fc2: Linear::new(w, &format!("{p}.mlp.fc2"), d, m, true)?,
            },
        })
    }

    /// `(B, T, D)` -> (block output, norm1 output), both `(B, T, D)`.
    fn forward(&self, xs: &Tensor, precision: Precision) -> Result<(Tensor, Tensor)> {
        let n1 = self.norm1.forward(xs)?;
        let (out, _) = self.after_norm1(xs, &n1, false, precision)?;
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
        let (a, attn) = self.attn.forward(n1, keep, precision)?;
        let xs = (xs + a)?;
        let xs = (&xs + self.mlp.forward(&self.norm2.forward(&xs)?, precision)?)?;
        Ok((xs, attn))
    }
}

/// A Vision Transformer (ViT, DeiT, DeiT-distilled) loaded from a timm or Hugging Face
/// checkpoint; see [`crate::model::load()`].
#[derive(Debug, Clone)]
pub struct VisionTransformer {
    config: VitConfig,
    spec: Spec,
    grid: (usize, usize),
    device: Device,
    /// Patch projection `(3 * p * p, D)`, rows in (channel, y, x) order like the conv kernel.
    patch_wt: Tensor,
    patch_b: Tensor,
    /// `(1, P, D)`: \[CLS\] (and \[DIST\]).
    prefix: Tensor,
    /// `(1, T, D)`.
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    head: Linear,
    head_dist: Option<Linear>,
}

impl VisionTransformer {
    /// Builds the model from a checkpoint: its configuration checked against its tensors, every
    /// tensor used.
    pub fn from_checkpoint(mut ckpt: Checkpoint, device: &Device) -> Result<Self> {
        let tensors = std::mem::take(&mut ckpt.tensors);
        let mut w = names::weights(&ckpt.weights_path, ckpt.format, tensors)?;
        let config = config::read(&ckpt, &w)?;
        let cfg = &config;
        let (d, p) = (cfg.dim, cfg.patch);
        let grid = (cfg.input_size.0 / p, cfg.input_size.1 / p);
        let tokens = cfg.num_prefix_tokens + grid.0 * grid.1;
        let patch_wt = w
            .take("patch_embed.proj.weight", &[d, 3, p, p])?
            .reshape((d, 3 * p * p))?
            .t()?
            .contiguous()?;
        let patch_b = w.take("patch_embed.proj.bias", &[d])?;
        let mut prefix = vec![w.take("cls_token", &[1, 1, d])?];
        if cfg.num_prefix_tokens == 2 {
            prefix.push(w.take("dist_token", &[1, 1, d])?);
        }
        let prefix = Tensor::cat(&prefix, 1)?;
        let pos_embed = w.take("pos_embed", &[1, tokens, d])?;
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(&mut w, i, cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = LayerNorm::new(&mut w, "norm", d, cfg.layer_norm_eps)?;
        let head = Linear::new(&mut w, "head", cfg.num_classes, d, true)?;
        let head_dist = match cfg.variant {
            Variant::DeitDistilled => {
                Some(Linear::new(&mut w, "head_dist", cfg.num_classes, d, true)?)
            }
            Variant::Vit | Variant::Deit => None,
        };
        w.finish(
            "a plain ViT/DeiT",
            "register tokens, layer scale, pooling norms and similar variants are not supported",
        )?;
        let spec = spec(cfg, grid);
        Ok(VisionTransformer {
            config,
            spec,
            grid,
            device: device.clone(),
            patch_wt,
            patch_b,
            prefix,
            pos_embed,
            blocks,
            norm,
            head,
            head_dist,
        })
    }

    /// Everything read from the checkpoint's config files, with the family's own sizes.
    pub fn config(&self) -> &VitConfig {
        &self.config
    }

    /// Patch embedding + prefix tokens + position embedding: `(B, 3, H, W)` -> `(B, T, D)`.
    /// The 16x16 stride-16 conv is written as a reshape and one matmul.
    fn embed(&self, px: &Tensor) -> Result<Tensor> {
        let (b, _, _, _) = px.dims4()?;
        let p = self.config.patch;
        let (gh, gw) = self.grid;
        let d = self.config.dim;
        let patches = px
            .reshape((b, 3, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b * gh * gw, 3 * p * p))?
            .matmul(&self.patch_wt)?
            .broadcast_add(&self.patch_b)?
            .reshape((b, gh * gw, d))?;
        let prefix = self
            .prefix
            .broadcast_as((b, self.config.num_prefix_tokens, d))?;
        let xs = Tensor::cat(&[&prefix, &patches], 1)?;
        Ok(xs.broadcast_add(&self.pos_embed)?)
    }

    /// Final norm and head(s) on the prefix tokens: `(B, T, D)` -> `(B, C)`.
    fn logits(&self, xs: &Tensor) -> Result<Tensor> {
        let pre = self
            .norm
            .forward(&xs.narrow(1, 0, self.config.num_prefix_tokens)?)?;
        let cls = self.head.forward(&pre.get_on_dim(1, 0)?, Precision::F32)?;
        match &self.head_dist {
            // timm eval mode / HF WithTeacher: average of the [CLS] and [DIST] heads.
            Some(hd) => {
                let dist = hd.forward(&pre.get_on_dim(1, 1)?, Precision::F32)?;
                Ok(((cls + dist)? / 2.0)?)
            }
            None => Ok(cls),
        }
    }

    /// Patch tokens `(B, T, D)` -> feature maps `(B, D, gh, gw)`, prefix dropped.
    fn to_maps(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, _, d) = tokens.dims3()?;
        let (gh, gw) = self.grid;
        Ok(tokens
            .narrow(1, self.config.num_prefix_tokens, gh * gw)?
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

    fn probs_at(&self, px: &Tensor, precision: Precision) -> Result<Tensor> {
        let out = self.run(px, None, precision)?;
        Ok(candle_nn::ops::softmax_last_dim(&out.logits)?)
    }

    fn attention(&self, px: &Tensor) -> Result<AttentionMaps> {
        self.check(px)?;
        let mut xs = self.embed(&px.to_dtype(DType::F32)?)?;
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
            prefix_tokens: self.config.num_prefix_tokens,
            grid: self.grid,
        })
    }

    fn tap_gradient(
        &self,
        px: &Tensor,
        tap: &str,
        score: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<TapGradient> {
        let tap = self.parse_tap(tap)?;
        self.check(px)?;
        // The weights are plain tensors, so the graph starts at the tapped tokens: only the
        // blocks after the tap are differentiated.
        let mut xs = self.embed(&px.to_dtype(DType::F32)?)?;
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
                    let out = Var::from_tensor(&block.forward(&xs, Precision::F32)?.0.detach())?;
                    let t = out.as_tensor().clone();
                    tapped = Some(out);
                    t
                }
                _ => block.forward(&xs, Precision::F32)?.0,
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
            features: self.to_maps(&tapped.as_tensor().detach())?,
            gradients: self.to_maps(g)?,
        })
    }
}

/// What the model tells methods and commands: labels, preprocessing, and its taps (every
/// block's first norm and output, each on the same grid, at the same width).
fn spec(cfg: &VitConfig, grid: (usize, usize)) -> Spec {
    let prefix: Vec<String> = ["[CLS]", "[DIST]"][..cfg.num_prefix_tokens]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let tap = |name: String, layer: usize| TapInfo {
        name,
        layer,
        grid,
        dim: cfg.dim,
        prefix_tokens: prefix.clone(),
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
        "num_prefix_tokens": cfg.num_prefix_tokens,
        "layer_norm_eps": cfg.layer_norm_eps,
        "qkv_bias": cfg.qkv_bias,
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

impl VisionTransformer {
    /// One forward pass at `precision`: logits, and the tapped tokens if asked.
    fn run(&self, px: &Tensor, tap: Option<Tap>, precision: Precision) -> Result<Forward> {
        self.check(px)?;
        let px = px.to_dtype(DType::F32)?;
        let mut xs = self.embed(&px)?;
        let mut features = None;
        for (i, block) in self.blocks.iter().enumerate() {
            let (out, n1) = block.forward(&xs, precision)?;
            match tap {
                Some(Tap::Norm1(l)) if l == i => features = Some(self.to_maps(&n1)?),
                Some(Tap::Block(l)) if l == i => features = Some(self.to_maps(&out)?),
                _ => {}
            }
            xs = out;
        }
        Ok(Forward {
            logits: self.logits(&xs)?,
            features,
        })
    }

    /// Fails unless `px` is `(B, 3, H, W)` at the model's size.
    fn check(&self, px: &Tensor) -> Result<()> {
        let (h, w) = self.config.input_size;
        match px.dims() {
            [b, 3, ph, pw] if *b > 0 && (*ph, *pw) == (h, w) => Ok(()),
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
