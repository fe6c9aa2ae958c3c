//! The Swin family: timm's `SwinTransformer` (`swin_*`) and transformers'
//! `SwinForImageClassification` in eval mode: patch embedding with its LayerNorm, stages of
//! pre-norm blocks attending within windows (shifted every other block, with the relative
//! position bias and the shifted windows' mask), patch merging between stages, a final norm,
//! the average of the last stage's tokens, and the head.
//!
//! Swin: Liu et al., <https://arxiv.org/abs/2103.14030>. Swin V2 (cosine attention, a
//! continuous position bias MLP, post-norm blocks) is a different block and is refused.
//!
//! Taps are named as timm names the modules, for both formats: `layers.S.blocks.J.norm1` (the
//! first LayerNorm of block `J` of stage `S`, the reference's kind of target) and
//! `layers.S.blocks.J` (the block's output); each stage has its own grid and width. `--layer`
//! counts blocks across all stages. Swin has no prefix tokens, and its attention is over windows,
//! so there is no token-to-token matrix over the image for Attention Rollout to follow.

mod config;
mod names;
pub mod random;
mod window;


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

pub use config::{Stage, SwinConfig};

/// The family's registry entry.
pub const FAMILY: Family = Family {
    name: "swin",
    covers: "Swin Transformer (timm swin_*; Hugging Face model_type swin)",
    claims,
    build,
};

/// Why Attention Rollout cannot run on a Swin (the model's `attention` answer).
pub const NO_ROLLOUT: &str = "Swin attends within local windows (shifted every other block), so it has no token-to-token attention matrix over the image for Attention Rollout to multiply; use vitcx, rise or gradcam";

/// timm architectures `swin_*` and `swinv2_*`, Hugging Face `swin` and `swinv2` (V2 to refuse
/// it by name rather than as an unknown model).
fn claims(format: Format, config: &Value) -> bool {
    match format {
        Format::Timm => config
            .get("architecture")
            .and_then(Value::as_str)
            .is_some_and(|a| a.starts_with("swin")),
        Format::HuggingFace => config
            .get("model_type")
            .and_then(Value::as_str)
            .is_some_and(|t| t == "swin" || t == "swinv2"),
    }
}

fn build(ckpt: Checkpoint, device: &Device) -> Result<Box<dyn Backbone>> {
    Ok(Box::new(SwinTransformer::from_checkpoint(ckpt, device)?))
}

/// One Swin block (timm `SwinTransformerBlock`, Hugging Face `SwinLayer`).
#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    scale: f64,
    grid: (usize, usize),
    window: (usize, usize),
    /// `(0, 0)` for a block that does not shift.
    shift: (usize, usize),
    /// `(G, H, T, T)`: the relative position bias, plus the shifted windows' mask for a
    /// shifted block (`G` = windows per image; 1 otherwise).
    bias: Tensor,
}

impl Block {
    fn new(
        w: &mut Weights,
        s: usize,
        j: usize,
        stage: &Stage,
        eps: f64,
        qkv_bias: bool,
        device: &Device,
    ) -> Result<Self> {
        let p = format!("layers.{s}.blocks.{j}");
        let d = stage.dim;
        let m = w.dims(&format!("{p}.mlp.fc1.weight"))?.first().copied().unwrap_or(0);
        let (wh, ww) = stage.window;
        let rows = (2 * wh - 1) * (2 * ww - 1);
        let table = w
            .take(&format!("{p}.attn.relative_position_bias_table"), &[rows, stage.heads])?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let shift = if j % 2 == 1 { stage.shift } else { (0, 0) };
        let mask = (shift != (0, 0)).then(|| window::shift_mask(stage.grid, stage.window, shift));
        let (bias, groups) = window::block_bias(&table, stage.heads, stage.window, mask.as_deref());
        let t = wh * ww;
        let bias = Tensor::from_vec(bias, (groups, stage.heads, t, t), device)?;
        Ok(Block {
            norm1: LayerNorm::new(w, &format!("{p}.norm1"), d, eps)?,
            qkv: Linear::new(w, &format!("{p}.attn.qkv"), 3 * d, d, qkv_bias)?,
            proj: Linear::new(w, &format!("{p}.attn.proj"), d, d, true)?,
            norm2: LayerNorm::new(w, &format!("{p}.norm2"), d, eps)?,
            fc1: Linear::new(w, &format!("{p}.mlp.fc1"), m, d, true)?,
            fc2: Linear::new(w, &format!("{p}.mlp.fc2"), d, m, true)?,
            heads: stage.heads,
            scale: ((d / stage.heads) as f64).powf(-0.5),
            grid: stage.grid,
            window: stage.window,
            shift,
            bias,
        })
    }

    /// `(B, H, W, C)` -> (block output, norm1 output), both `(B, H, W, C)`.
    fn forward(&self, xs: &Tensor, precision: Precision) -> Result<(Tensor, Tensor)> {
        let n1 = self.norm1.forward(xs)?;
        let out = self.after_norm1(xs, &n1, precision)?;
        Ok((out, n1))
    }

    /// The block from its input `xs` and `n1 = norm1(xs)` on; split here so a gradient can be
    /// taken at `n1`. The window attention runs on all windows of all images as one batch.
    fn after_norm1(&self, xs: &Tensor, n1: &Tensor, precision: Precision) -> Result<Tensor> {
        let shifted = self.shift != (0, 0);
        let x = if shifted {
            window::roll(n1, self.shift, true)?
        } else {
            n1.clone()
        };
        let windows = window::partition(&x, self.window)?;
        let qkv = self.qkv.forward(&windows, precision)?;
        let a = crate::model::kernels::attention::self_attention_biased(
            &qkv, self.heads, self.scale, &self.bias,
        )?;
        let a = self.proj.forward(&a, precision)?;
        let a = window::reverse(&a, self.grid, self.window)?;
        let a = if shifted {
            window::roll(&a, self.shift, false)?
        } else {
            a
        };
        let xs = (xs + a)?;
        let h = self.fc1.forward_act(&self.norm2.forward(&xs)?, Activation::Gelu, precision)?;
        Ok((&xs + self.fc2.forward(&h, precision)?)?)
    }
}

/// Patch merging (timm `PatchMerging`): each 2x2 neighbourhood concatenated in timm's order
/// (`x[0::2, 0::2]`, `x[1::2, 0::2]`, `x[0::2, 1::2]`, `x[1::2, 1::2]`), normed, projected.
#[derive(Debug, Clone)]
struct Merge {
    norm: LayerNorm,
    reduction: Linear,
}

impl Merge {
    /// `(B, H, W, C)` -> `(B, ceil(H/2), ceil(W/2), C')`, an odd side padded with zeros first.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = xs.dims4()?;
        let xs = xs.pad_with_zeros(1, 0, h % 2)?.pad_with_zeros(2, 0, w % 2)?;
        let (h2, w2) = (h.div_ceil(2), w.div_ceil(2));
        let x = xs
            .reshape((b, h2, 2, w2, 2, c))?
            .permute((0, 1, 3, 4, 2, 5))?
            .contiguous()?
            .reshape((b, h2, w2, 4 * c))?;
        self.reduction.forward(&self.norm.forward(&x)?, Precision::F32)
    }
}

/// A tap of this family, by global block index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tap {
    /// `layers.S.blocks.J.norm1`.
    Norm1(usize),
    /// `layers.S.blocks.J`.
    Block(usize),
}

/// A Swin Transformer loaded from a timm or Hugging Face checkpoint; see
/// [`crate::model::load()`].
#[derive(Debug, Clone)]
pub struct SwinTransformer {
    config: SwinConfig,
    spec: Spec,
    device: Device,
    /// Patch projection `(3 * p * p, C)`, rows in (channel, y, x) order like the conv kernel.
    patch_wt: Tensor,
    patch_b: Tensor,
    patch_norm: LayerNorm,
    /// One per stage; `None` for the first.
    merges: Vec<Option<Merge>>,
    /// Every block in order, across stages.
    blocks: Vec<Block>,
    /// The stage of each block.
    stage_of: Vec<usize>,
    norm: LayerNorm,
    head: Linear,
}

impl SwinTransformer {
    /// Builds the model from a checkpoint: its configuration checked against its tensors, every
    /// tensor used.
    pub fn from_checkpoint(mut ckpt: Checkpoint, device: &Device) -> Result<Self> {
        let v2 = match ckpt.format {
            Format::Timm => ckpt
                .config
                .get("architecture")
                .and_then(Value::as_str)
                .is_some_and(|a| a.starts_with("swinv2")),
            Format::HuggingFace => {
                ckpt.config.get("model_type").and_then(Value::as_str) == Some("swinv2")
            }
        };
        if v2 {
            return Err(Error::Unsupported(
                "Swin V2 (cosine attention with a learned temperature, a continuous position bias MLP, post-norm blocks); vitcx reads Swin V1 only".into(),
            ));
        }
        let tensors = std::mem::take(&mut ckpt.tensors);
        let mut w = names::weights(&ckpt.weights_path, ckpt.format, tensors)?;
        let config = config::read(&ckpt, &w)?;
        let cfg = &config;
        let (p, d0) = (cfg.patch, cfg.stages[0].dim);
        let patch_wt = crate::model::kernels::transpose::transpose(
            &w.take("patch_embed.proj.weight", &[d0, 3, p, p])?
                .reshape((d0, 3 * p * p))?,
        )?;
        let patch_b = w.take("patch_embed.proj.bias", &[d0])?;
        let ln_eps = config::TORCH_LAYER_NORM_EPS;
        let patch_norm = LayerNorm::new(&mut w, "patch_embed.norm", d0, ln_eps)?;
        let mut merges = Vec::new();
        let mut blocks = Vec::new();
        let mut stage_of = Vec::new();
        for (s, stage) in cfg.stages.iter().enumerate() {
            merges.push(if s == 0 {
                None
            } else {
                let prev = cfg.stages[s - 1].dim;
                let name = format!("layers.{s}.downsample");
                Some(Merge {
                    norm: LayerNorm::new(&mut w, &format!("{name}.norm"), 4 * prev, ln_eps)?,
                    reduction: Linear::new(
                        &mut w,
                        &format!("{name}.reduction"),
                        stage.dim,
                        4 * prev,
                        false,
                    )?,
                })
            });
            for j in 0..stage.depth {
                blocks.push(Block::new(
                    &mut w,
                    s,
                    j,
                    stage,
                    cfg.layer_norm_eps,
                    cfg.qkv_bias,
                    device,
                )?);
                stage_of.push(s);
            }
        }
        let last = cfg.stages[cfg.stages.len() - 1].dim;
        let norm = LayerNorm::new(&mut w, "norm", last, cfg.layer_norm_eps)?;
        let head = Linear::new(&mut w, "head.fc", cfg.num_classes, last, true)?;
        w.finish(
            "a Swin Transformer",
            "absolute position embeddings, Swin V2 and other variants are not supported",
        )?;
        let spec = spec(cfg);
        Ok(SwinTransformer {
            config,
            spec,
            device: device.clone(),
            patch_wt,
            patch_b,
            patch_norm,
            merges,
            blocks,
            stage_of,
            norm,
            head,
        })
    }

    /// Everything read from the checkpoint's config files, with the family's own sizes.
    pub fn config(&self) -> &SwinConfig {
        &self.config
    }

    /// Patch embedding and its norm: `(B, 3, H, W)` -> `(B, gh, gw, C)`.
    fn embed(&self, px: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = px.dims4()?;
        let p = self.config.patch;
        let (gh, gw) = (h / p, w / p);
        let x = px
            .reshape((b, 3, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b * gh * gw, 3 * p * p))?;
        let x = crate::model::kernels::linear::linear(&x, &self.patch_wt, &self.patch_b)?;
        self.patch_norm
            .forward(&x.reshape((b, gh, gw, self.config.stages[0].dim))?)
    }

    /// Final norm, average of the tokens, head: `(B, H, W, C)` -> `(B, classes)`.
    fn logits(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = xs.dims4()?;
        let pooled = self.norm.forward(xs)?.reshape((b, h * w, c))?.mean(1)?;
        self.head.forward(&pooled, Precision::F32)
    }

    /// Runs the blocks, calling `at(i, block, xs)` for each to get its output; a merge runs
    /// before the first block of every stage after the first.
    fn run_blocks(
        &self,
        mut xs: Tensor,
        mut at: impl FnMut(usize, &Block, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        for (i, block) in self.blocks.iter().enumerate() {
            let s = self.stage_of[i];
            if i == 0 || self.stage_of[i - 1] != s {
                if let Some(m) = &self.merges[s] {
                    xs = m.forward(&xs)?;
                }
            }
            xs = at(i, block, &xs)?;
        }
        Ok(xs)
    }

    /// The input's shape, which must be `(B, 3, H, W)` at the model's input size (the windows
    /// and masks were built for its grids).
    fn check(&self, px: &Tensor) -> Result<()> {
        let (h, w) = self.config.input_size;
        match px.dims() {
            [b, 3, ph, pw] if *b > 0 && (*ph, *pw) == (h, w) => Ok(()),
            dims => Err(Error::invalid(format!(
                "input has shape {dims:?}, expected (B, 3, {h}, {w}) with B >= 1 (load the model with another input size for other sizes)"
            ))),
        }
    }

    /// `layers.S.blocks.J.norm1` or `layers.S.blocks.J` of an existing block.
    fn parse_tap(&self, name: &str) -> Result<Tap> {
        let parsed = name.strip_prefix("layers.").and_then(|rest| {
            let (s, rest) = rest.split_once(".blocks.")?;
            let (j, role) = rest.split_once('.').unwrap_or((rest, ""));
            let (s, j): (usize, usize) = (s.parse().ok()?, j.parse().ok()?);
            let stage = self.config.stages.get(s)?;
            if j >= stage.depth {
                return None;
            }
            let first: usize = self.config.stages[..s].iter().map(|st| st.depth).sum();
            match role {
                "norm1" => Some(Tap::Norm1(first + j)),
                "" => Some(Tap::Block(first + j)),
                _ => None,
            }
        });
        parsed.ok_or_else(|| {
            self.spec.tap(name).err().unwrap_or_else(|| {
                Error::invalid(format!("tap '{name}' is not a tap of this Swin"))
            })
        })
    }

    /// `(B, H, W, C)` -> feature maps `(B, C, H, W)`.
    fn to_maps(tokens: &Tensor) -> Result<Tensor> {
        Ok(tokens.permute((0, 3, 1, 2))?.contiguous()?)
    }
}

impl Backbone for SwinTransformer {
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
        let _ = px;
        Err(Error::Unsupported(NO_ROLLOUT.into()))
    }

    fn tap_gradient(
        &self,
        px: &Tensor,
        tap: &str,
        score: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<TapGradient> {
        self.gradient(px, tap, score)
    }
}

impl SwinTransformer {
    /// One forward pass at `precision` (bf16 in the blocks' linear layers): logits, and the
    /// tapped tokens if asked.
    fn run(&self, px: &Tensor, tap: Option<Tap>, precision: Precision) -> Result<Forward> {
        self.check(px)?;
        let xs = self.embed(&px.to_dtype(DType::F32)?)?;
        let mut features = None;
        let xs = self.run_blocks(xs, |i, block, xs| {
            let (out, n1) = block.forward(xs, precision)?;
            match tap {
                Some(Tap::Norm1(l)) if l == i => features = Some(Self::to_maps(&n1)?),
                Some(Tap::Block(l)) if l == i => features = Some(Self::to_maps(&out)?),
                _ => {}
            }
            Ok(out)
        })?;
        Ok(Forward {
            logits: self.logits(&xs)?,
            features,
        })
    }

    /// [`Backbone::tap_gradient`].
    fn gradient(
        &self,
        px: &Tensor,
        tap: &str,
        score: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<TapGradient> {
        let tap = self.parse_tap(tap)?;
        self.check(px)?;
        // The weights are plain tensors, so the graph starts at the tapped tokens: only the
        // blocks after the tap are differentiated.
        let xs = self.embed(&px.to_dtype(DType::F32)?)?;
        let mut tapped: Option<Var> = None;
        let xs = self.run_blocks(xs, |i, block, xs| match tap {
            Tap::Norm1(l) if l == i => {
                let n1 = Var::from_tensor(&block.norm1.forward(xs)?.detach())?;
                let out = block.after_norm1(xs, n1.as_tensor(), Precision::F32)?;
                tapped = Some(n1);
                Ok(out)
            }
            Tap::Block(l) if l == i => {
                let out = Var::from_tensor(&block.forward(xs, Precision::F32)?.0.detach())?;
                let t = out.as_tensor().clone();
                tapped = Some(out);
                Ok(t)
            }
            _ => Ok(block.forward(xs, Precision::F32)?.0),
        })?;
        // parse_tap only accepts existing blocks, so the loop reached the tap.
        let tapped = tapped.ok_or_else(|| Error::invalid("tap not reached"))?;
        let logits = self.logits(&xs)?;
        let grads = score(&logits)?.backward()?;
        let g = grads
            .get(tapped.as_tensor())
            .ok_or_else(|| Error::Unsupported("no gradient reached the tapped tokens".into()))?;
        Ok(TapGradient {
            logits: logits.detach(),
            features: Self::to_maps(&tapped.as_tensor().detach())?,
            gradients: Self::to_maps(g)?,
        })
    }
}

/// What the model tells methods and commands: labels, preprocessing, and its taps (each block's
/// first norm and output, at its stage's grid and width).
fn spec(cfg: &SwinConfig) -> Spec {
    let mut taps = Vec::new();
    let mut layer_taps = Vec::new();
    let mut layer = 0;
    for (s, stage) in cfg.stages.iter().enumerate() {
        for j in 0..stage.depth {
            let tap = |name: String| TapInfo {
                name,
                layer,
                grid: stage.grid,
                dim: stage.dim,
                prefix_tokens: Vec::new(),
            };
            let norm1 = format!("layers.{s}.blocks.{j}.norm1");
            layer_taps.push(norm1.clone());
            taps.push(tap(norm1));
            taps.push(tap(format!("layers.{s}.blocks.{j}")));
            layer += 1;
        }
    }
    let stages: Vec<String> = cfg
        .stages
        .iter()
        .map(|s| {
            format!(
                "{}x{} x {} ({} blocks, {} heads, {} windows of {}x{}, shift {}x{})",
                s.grid.0,
                s.grid.1,
                s.dim,
                s.depth,
                s.heads,
                s.windows(),
                s.window.0,
                s.window.1,
                s.shift.0,
                s.shift.1
            )
        })
        .collect();
    let details = json!({
        "embed_dim": cfg.stages[0].dim,
        "depths": cfg.stages.iter().map(|s| s.depth).collect::<Vec<_>>(),
        "heads": cfg.stages.iter().map(|s| s.heads).collect::<Vec<_>>(),
        "patch": cfg.patch,
        "window": cfg.window,
        "stages": stages.join("; "),
        "num_prefix_tokens": 0,
        "pool": "avg",
        "attention": "windowed, shifted every other block; relative position bias",
        "no_token_attention": "its attention is within local windows (shifted every other block)",
        "layer_norm_eps": cfg.layer_norm_eps,
        "qkv_bias": cfg.qkv_bias,
        "kernels": "fused: LayerNorm, linear, bias+gelu, bf16 linear; composed: windowed attention with its bias",
    });
    Spec {
        family: "Swin".to_string(),
        format: cfg.format,
        architecture: cfg.architecture.clone(),
        input_size: cfg.input_size,
        num_classes: cfg.num_classes,
        labels: cfg.labels.clone(),
        preprocess: cfg.preprocess.clone(),
        depth: cfg.depth(),
        layer_taps,
        taps,
        notes: cfg.notes.clone(),
        details: match details {
            Value::Object(m) => m,
            _ => serde_json::Map::new(),
        },
    }
}
