//! The forward pass of BEiT and EVA-02: timm's `Beit` and `Eva` (and transformers'
//! `BeitForImageClassification`) in eval mode. Both are pre-norm ViTs with a \[CLS\] token whose
//! blocks differ from the plain ViT's in where position enters attention (BEiT: a learned
//! relative position bias added to the scores, shared by all blocks or one per block; EVA-02: a
//! rotary embedding of q and k) and in the MLP (EVA-02: SwiGLU, with a LayerNorm inside for
//! base and large), with q and v biases but none on k, LayerScale (`gamma_1`, `gamma_2`), and mean
//! pooling of the patch tokens followed by `fc_norm`.
//!
//! The q, k, v projections (fused or separate in the checkpoint) run as one product with the bias
//! `[q_bias, 0, v_bias]`, so attention reads one `(B, T, 3D)` tensor; the relative position bias
//! of each block (its own table plus the shared one) is expanded once at load to `(1, H, T, T)`
//! and added inside the fused attention kernel ([`crate::model::kernels::attention`]).


use candle_core::{DType, Device, Tensor, Var};
use serde_json::{json, Value};

use super::config::{BeitConfig, MlpKind, Pool};
use super::rope::Rope;
use crate::error::{Error, Result};
use crate::model::backbone::{
    Attention as AttentionMaps, Backbone, Forward, Precision, Spec, TapGradient, TapInfo,
};
use crate::model::kernels::attention;
use crate::model::layers::{Activation, LayerNorm, Linear};
use crate::model::weights::Weights;


/// BEiT's relative position index for a `grid` plus the \[CLS\] token (timm
/// `gen_relative_position_index`): patch `i` to patch `j` reads distance
/// `(yi - yj + gh - 1) * (2 gw - 1) + (xi - xj + gw - 1)`; the last three rows of the table are
/// \[CLS\] to patch, patch to \[CLS\], and \[CLS\] to \[CLS\].
fn relative_position_index(grid: (usize, usize)) -> Vec<usize> {
    let (gh, gw) = grid;
    let n = gh * gw;
    let t = n + 1;
    let distances = (2 * gh - 1) * (2 * gw - 1) + 3;
    let mut idx = vec![0usize; t * t];
    for i in 0..n {
        let (yi, xi) = (i / gw, i % gw);
        for j in 0..n {
            let (yj, xj) = (j / gw, j % gw);
            idx[(i + 1) * t + j + 1] = (yi + gh - 1 - yj) * (2 * gw - 1) + (xi + gw - 1 - xj);
        }
    }
    for j in 0..t {
        idx[j] = distances - 3;
        idx[j * t] = distances - 2;
    }
    idx[0] = distances - 1;
    idx
}

/// A relative position bias table `(distances, H)` expanded to `(1, H, T, T)`.
fn expand_table(table: &Tensor, grid: (usize, usize)) -> Result<Tensor> {
    let (_, h) = table.dims2()?;
    let idx = relative_position_index(grid);
    let t = grid.0 * grid.1 + 1;
    let rows = table.to_vec2::<f32>()?;
    let mut out = vec![0f32; h * t * t];
    for head in 0..h {
        for (k, &i) in idx.iter().enumerate() {
            out[head * t * t + k] = rows[i][head];
        }
    }
    Ok(Tensor::from_vec(out, (1, h, t, t), table.device())?)
}

/// Self-attention with q/k/v packed, optional rotary embedding, relative position bias and inner
/// norm (timm `beit.Attention`, `EvaAttention`).
#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    proj: Linear,
    norm: Option<LayerNorm>,
    bias: Option<Tensor>,
    heads: usize,
    scale: f64,
}

impl Attention {
    fn new(
        w: &mut Weights,
        p: &str,
        cfg: &BeitConfig,
        shared: Option<&Tensor>,
        grid: (usize, usize),
        dev: &Device,
    ) -> Result<Self> {
        let d = cfg.dim;
        let zeros = || Tensor::zeros(d, DType::F32, dev);
        let (weight, bias) = if cfg.separate_qkv {
            let q = w.take(&format!("{p}.attn.q_proj.weight"), &[d, d])?;
            let k = w.take(&format!("{p}.attn.k_proj.weight"), &[d, d])?;
            let v = w.take(&format!("{p}.attn.v_proj.weight"), &[d, d])?;
            let bias = if cfg.qkv_bias {
                let qb = w.take(&format!("{p}.attn.q_proj.bias"), &[d])?;
                let vb = w.take(&format!("{p}.attn.v_proj.bias"), &[d])?;
                Some(Tensor::cat(&[&qb, &zeros()?, &vb], 0)?)
            } else {
                None
            };
            (Tensor::cat(&[&q, &k, &v], 0)?, bias)
        } else {
            let qkv = w.take(&format!("{p}.attn.qkv.weight"), &[3 * d, d])?;
            let bias = if cfg.qkv_bias {
                let qb = w.take(&format!("{p}.attn.q_bias"), &[d])?;
                let vb = w.take(&format!("{p}.attn.v_bias"), &[d])?;
                Some(Tensor::cat(&[&qb, &zeros()?, &vb], 0)?)
            } else {
                None
            };
            (qkv, bias)
        };
        let distances = (2 * grid.0 - 1) * (2 * grid.1 - 1) + 3;
        let own = cfg
            .block_rel_pos
            .then(|| {
                let t = w.take(
                    &format!("{p}.attn.relative_position_bias_table"),
                    &[distances, cfg.heads],
                )?;
                expand_table(&t, grid)
            })
            .transpose()?;
        let bias_sum = match (own, shared) {
            (Some(o), Some(s)) => Some((o + s)?),
            (Some(o), None) => Some(o),
            (None, Some(s)) => Some(s.clone()),
            (None, None) => None,
        };
        Ok(Attention {
            qkv: Linear::from_parts(weight, bias)?,
            proj: Linear::new_opt(w, &format!("{p}.attn.proj"), d, d)?,
            norm: cfg
                .attn_norm
                .then(|| LayerNorm::new(w, &format!("{p}.attn.norm"), d, cfg.layer_norm_eps))
                .transpose()?,
            bias: bias_sum,
            heads: cfg.heads,
            scale: ((d / cfg.heads) as f64).powf(-0.5),
        })
    }

    /// `(B, T, D)` -> `(B, T, D)`, and the attention probabilities `(B, H, T, T)` if `keep`.
    fn forward(
        &self,
        xs: &Tensor,
        rope: Option<&Rope>,
        keep: bool,
        precision: Precision,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let mut qkv = self.qkv.forward(xs, precision)?;
        if let Some(r) = rope {
            qkv = r.apply(&qkv)?;
        }
        let (h, s) = (self.heads, self.scale);
        let (out, probs) = match (&self.bias, keep) {
            (Some(b), false) => (attention::self_attention_biased(&qkv, h, s, b)?, None),
            (Some(b), true) => {
                let (o, p) = attention::composed_biased(&qkv, h, s, b)?;
                (o, Some(p))
            }
            (None, false) => (attention::self_attention(&qkv, h, s)?, None),
            (None, true) => {
                let (o, p) = attention::composed(&qkv, h, s)?;
                (o, Some(p))
            }
        };
        let out = match &self.norm {
            Some(n) => n.forward(&out)?,
            None => out,
        };
        Ok((self.proj.forward(&out, precision)?, probs))
    }
}

/// The MLP: GELU or SwiGLU, with an optional LayerNorm before `fc2`.
#[derive(Debug, Clone)]
struct Mlp {
    kind: MlpKind,
    /// GELU: `fc1`; SwiGLU: `[gate; x]` packed.
    fc1: Linear,
    norm: Option<LayerNorm>,
    fc2: Linear,
    hidden: usize,
}

impl Mlp {
    fn new(w: &mut Weights, p: &str, cfg: &BeitConfig) -> Result<Self> {
        let (d, m) = (cfg.dim, cfg.mlp_dim);
        let fc1 = match cfg.mlp {
            MlpKind::Gelu => Linear::new_opt(w, &format!("{p}.mlp.fc1"), m, d)?,
            MlpKind::SwiGlu if w.contains(&format!("{p}.mlp.fc1_g.weight")) => {
                // timm SwiGLU: act(fc1_g x) * fc1_x x, packed as [g; x].
                let part = |w: &mut Weights, n: &str| -> Result<(Tensor, Option<Tensor>)> {
                    let wt = w.take(&format!("{p}.mlp.{n}.weight"), &[m, d])?;
                    let b = format!("{p}.mlp.{n}.bias");
                    let b = if w.contains(&b) { Some(w.take(&b, &[m])?) } else { None };
                    Ok((wt, b))
                };
                let (gw, gb) = part(w, "fc1_g")?;
                let (xw, xb) = part(w, "fc1_x")?;
                let b = match (gb, xb) {
                    (Some(g), Some(x)) => Some(Tensor::cat(&[&g, &x], 0)?),
                    (None, None) => None,
                    _ => return Err(w.err(format!("{p}.mlp: fc1_g and fc1_x differ in having a bias"))),
                };
                Linear::from_parts(Tensor::cat(&[&gw, &xw], 0)?, b)?
            }
            // timm GluMlp (gate_last=False): the first half is the gate.
            MlpKind::SwiGlu => Linear::new_opt(w, &format!("{p}.mlp.fc1"), 2 * m, d)?,
        };
        Ok(Mlp {
            kind: cfg.mlp,
            fc1,
            norm: cfg
                .mlp_norm
                .then(|| LayerNorm::new(w, &format!("{p}.mlp.norm"), m, cfg.layer_norm_eps))
                .transpose()?,
            fc2: Linear::new_opt(w, &format!("{p}.mlp.fc2"), d, m)?,
            hidden: m,
        })
    }

    fn forward(&self, xs: &Tensor, precision: Precision) -> Result<Tensor> {
        let h = match self.kind {
            MlpKind::Gelu => self.fc1.forward_act(xs, Activation::Gelu, precision)?,
            MlpKind::SwiGlu => {
                let y = self.fc1.forward(xs, precision)?;
                let last = y.rank() - 1;
                let gate = y.narrow(last, 0, self.hidden)?.silu()?;
                (gate * y.narrow(last, self.hidden, self.hidden)?)?
            }
        };
        let h = match &self.norm {
            Some(n) => n.forward(&h)?,
            None => h,
        };
        self.fc2.forward(&h, precision)
    }
}

/// `x * gamma` when the block has LayerScale.
fn scaled(xs: Tensor, gamma: &Option<Tensor>) -> Result<Tensor> {
    Ok(match gamma {
        Some(g) => xs.broadcast_mul(g)?,
        None => xs,
    })
}

/// One block (timm `beit.Block`, `EvaBlock`; transformers' `BeitLayer`).
#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    attn: Attention,
    gamma_1: Option<Tensor>,
    norm2: LayerNorm,
    mlp: Mlp,
    gamma_2: Option<Tensor>,
}

impl Block {
    fn new(
        w: &mut Weights,
        i: usize,
        cfg: &BeitConfig,
        shared: Option<&Tensor>,
        (grid, dev): ((usize, usize), &Device),
    ) -> Result<Self> {
        let p = format!("blocks.{i}");
        let (d, eps) = (cfg.dim, cfg.layer_norm_eps);
        let gamma = |w: &mut Weights, n: &str| -> Result<Option<Tensor>> {
            cfg.layer_scale.then(|| w.take(&format!("{p}.{n}"), &[d])).transpose()
        };
        Ok(Block {
            norm1: LayerNorm::new(w, &format!("{p}.norm1"), d, eps)?,
            attn: Attention::new(w, &p, cfg, shared, grid, dev)?,
            gamma_1: gamma(w, "gamma_1")?,
            norm2: LayerNorm::new(w, &format!("{p}.norm2"), d, eps)?,
            mlp: Mlp::new(w, &p, cfg)?,
            gamma_2: gamma(w, "gamma_2")?,
        })
    }

    /// The block from its input `xs` and `n1 = norm1(xs)` on: the output, and the attention
    /// probabilities if `keep`.
    fn after_norm1(
        &self,
        xs: &Tensor,
        n1: &Tensor,
        (rope, keep): (Option<&Rope>, bool),
        precision: Precision,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (a, probs) = self.attn.forward(n1, rope, keep, precision)?;
        let xs = (xs + scaled(a, &self.gamma_1)?)?;
        let m = self.mlp.forward(&self.norm2.forward(&xs)?, precision)?;
        Ok(((&xs + scaled(m, &self.gamma_2)?)?, probs))
    }
}

/// A tap: `blocks.N.norm1` or `blocks.N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tap {
    Norm1(usize),
    Block(usize),
}

/// A BEiT or EVA-02 classifier loaded from a timm or Hugging Face checkpoint.
#[derive(Debug, Clone)]
pub struct Beit {
    config: BeitConfig,
    spec: Spec,
    device: Device,
    /// Patch projection `(3 * p * p, D)`.
    patch_wt: Tensor,
    patch_b: Tensor,
    /// `(1, 1, D)`: \[CLS\] plus its position embedding.
    cls: Tensor,
    /// `(1, N, D)` patch position embedding, when there is one.
    pos: Option<Tensor>,
    rope: Option<Rope>,
    blocks: Vec<Block>,
    norm: Option<LayerNorm>,
    fc_norm: Option<LayerNorm>,
    head: Linear,
}

impl Beit {
    /// Builds the model from its checked configuration and timm-named weights; every tensor must
    /// be used.
    pub(crate) fn build(config: BeitConfig, mut w: Weights, device: &Device) -> Result<Self> {
        let cfg = &config;
        let (d, p) = (cfg.dim, cfg.patch);
        let grid = cfg.grid();
        let n = grid.0 * grid.1;
        let patch_wt = crate::model::kernels::transpose::transpose(
            &w.take("patch_embed.proj.weight", &[d, 3, p, p])?
                .reshape((d, 3 * p * p))?,
        )?;
        let patch_b = if w.contains("patch_embed.proj.bias") {
            w.take("patch_embed.proj.bias", &[d])?
        } else {
            Tensor::zeros(d, DType::F32, device)?
        };
        let mut cls = w.take("cls_token", &[1, 1, d])?;
        let pos = if cfg.abs_pos {
            let pe = w.take("pos_embed", &[1, n + 1, d])?;
            cls = (cls + pe.narrow(1, 0, 1)?)?;
            Some(pe.narrow(1, 1, n)?.contiguous()?)
        } else {
            None
        };
        let distances = (2 * grid.0 - 1) * (2 * grid.1 - 1) + 3;
        let shared = cfg
            .shared_rel_pos
            .then(|| {
                let t = w.take("rel_pos_bias.relative_position_bias_table", &[distances, cfg.heads])?;
                expand_table(&t, grid)
            })
            .transpose()?;
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(&mut w, i, cfg, shared.as_ref(), (grid, device)))
            .collect::<Result<Vec<_>>>()?;
        let eps = cfg.layer_norm_eps;
        let norm = cfg.final_norm.then(|| LayerNorm::new(&mut w, "norm", d, eps)).transpose()?;
        let fc_norm = cfg.fc_norm.then(|| LayerNorm::new(&mut w, "fc_norm", d, eps)).transpose()?;
        let head = Linear::new_opt(&mut w, "head", cfg.num_classes, d)?;
        w.finish(
            &format!("a {} model", cfg.kind.name()),
            "register tokens, qk-norm, gated attention and post-norm blocks are not supported",
        )?;
        let rope = cfg.rope.as_ref().map(|r| Rope::new(r, grid, d / cfg.heads, 1));
        let spec = spec(cfg, grid);
        Ok(Beit {
            config,
            spec,
            device: device.clone(),
            patch_wt,
            patch_b,
            cls,
            pos,
            rope,
            blocks,
            norm,
            fc_norm,
            head,
        })
    }

    /// Everything read from the checkpoint's config files.
    pub fn config(&self) -> &BeitConfig {
        &self.config
    }

    /// `(B, 3, H, W)` -> `(B, 1 + N, D)`.
    fn embed(&self, px: &Tensor) -> Result<Tensor> {
        let b = px.dim(0)?;
        let p = self.config.patch;
        let (gh, gw) = self.config.grid();
        let d = self.config.dim;
        let patches = px
            .reshape((b, 3, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b * gh * gw, 3 * p * p))?
            .matmul(&self.patch_wt)?
            .broadcast_add(&self.patch_b)?
            .reshape((b, gh * gw, d))?;
        let patches = match &self.pos {
            Some(pe) => patches.broadcast_add(pe)?,
            None => patches,
        };
        let cls = self.cls.broadcast_as((b, 1, d))?;
        Ok(Tensor::cat(&[&cls, &patches], 1)?)
    }

    /// Final norm, pooling, `fc_norm`, head.
    fn logits(&self, xs: &Tensor) -> Result<Tensor> {
        let x = match &self.norm {
            Some(n) => n.forward(xs)?,
            None => xs.clone(),
        };
        let t = x.dim(1)?;
        let pooled = match self.config.pool {
            Pool::Avg => x.narrow(1, 1, t - 1)?.mean(1)?,
            Pool::Token => x.get_on_dim(1, 0)?,
        };
        let pooled = match &self.fc_norm {
            Some(n) => n.forward(&pooled)?,
            None => pooled,
        };
        self.head.forward(&pooled, Precision::F32)
    }

    /// Patch tokens `(B, T, D)` -> `(B, D, gh, gw)`.
    fn to_maps(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, _, d) = tokens.dims3()?;
        let (gh, gw) = self.config.grid();
        Ok(tokens
            .narrow(1, 1, gh * gw)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, d, gh, gw))?)
    }

    fn check(&self, px: &Tensor) -> Result<Tensor> {
        let (h, w) = self.config.input_size;
        match px.dims() {
            [b, 3, ph, pw] if *b > 0 && (*ph, *pw) == (h, w) => Ok(px.to_dtype(DType::F32)?),
            dims => Err(Error::invalid(format!(
                "input has shape {dims:?}, expected (B, 3, {h}, {w}) with B >= 1"
            ))),
        }
    }

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
            Some(t @ (Tap::Norm1(l) | Tap::Block(l))) if l < self.config.depth => Ok(t),
            _ => Err(self.spec.tap(name).err().unwrap_or_else(|| {
                Error::invalid(format!("tap '{name}' is not a tap of this model"))
            })),
        }
    }

    /// One forward pass: logits, and the tapped tokens if asked.
    fn run(&self, px: &Tensor, tap: Option<Tap>, precision: Precision) -> Result<Forward> {
        let px = self.check(px)?;
        let mut xs = self.embed(&px)?;
        let rope = self.rope.as_ref();
        let mut features = None;
        for (i, block) in self.blocks.iter().enumerate() {
            let n1 = block.norm1.forward(&xs)?;
            let (out, _) = block.after_norm1(&xs, &n1, (rope, false), precision)?;
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
}

impl Backbone for Beit {
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
        let px = self.check(px)?;
        let mut xs = self.embed(&px)?;
        let mut maps = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let n1 = block.norm1.forward(&xs)?;
            let (out, probs) = block.after_norm1(&xs, &n1, (self.rope.as_ref(), true), Precision::F32)?;
            maps.extend(probs);
            xs = out;
        }
        Ok(AttentionMaps {
            logits: self.logits(&xs)?,
            maps,
            prefix_tokens: 1,
            grid: self.config.grid(),
        })
    }

    fn tap_gradient(
        &self,
        px: &Tensor,
        tap: &str,
        score: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<TapGradient> {
        const F32: Precision = Precision::F32;
        let tap = self.parse_tap(tap)?;
        let px = self.check(px)?;
        let rope = self.rope.as_ref();
        let mut xs = self.embed(&px)?;
        let mut tapped = None;
        for (i, block) in self.blocks.iter().enumerate() {
            let n1 = block.norm1.forward(&xs)?;
            xs = match tap {
                Tap::Norm1(l) if l == i => {
                    let v = Var::from_tensor(&n1.detach())?;
                    let (out, _) = block.after_norm1(&xs.detach(), v.as_tensor(), (rope, false), F32)?;
                    tapped = Some(v);
                    out
                }
                Tap::Block(l) if l == i => {
                    let (out, _) = block.after_norm1(&xs, &n1, (rope, false), F32)?;
                    let v = Var::from_tensor(&out.detach())?;
                    let t = v.as_tensor().clone();
                    tapped = Some(v);
                    t
                }
                _ => block.after_norm1(&xs, &n1, (rope, false), F32)?.0,
            };
        }
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

/// Labels, preprocessing and taps (every block's first norm and output).
fn spec(cfg: &BeitConfig, grid: (usize, usize)) -> Spec {
    let tap = |name: String, layer: usize| TapInfo {
        name,
        layer,
        grid,
        dim: cfg.dim,
        prefix_tokens: vec!["[CLS]".to_string()],
    };
    let taps = (0..cfg.depth)
        .flat_map(|i| [tap(format!("blocks.{i}.norm1"), i), tap(format!("blocks.{i}"), i)])
        .collect();
    let position = {
        let mut p = Vec::new();
        if cfg.abs_pos {
            p.push("absolute (learned)");
        }
        if cfg.shared_rel_pos {
            p.push("relative bias shared by all blocks");
        }
        if cfg.block_rel_pos {
            p.push("relative bias per block");
        }
        if cfg.rope.is_some() {
            p.push("rotary (q, k of the patches)");
        }
        p.join(" + ")
    };
    let mlp = match (cfg.mlp, cfg.mlp_norm) {
        (MlpKind::Gelu, false) => "gelu",
        (MlpKind::Gelu, true) => "gelu + inner norm",
        (MlpKind::SwiGlu, false) => "swiglu",
        (MlpKind::SwiGlu, true) => "swiglu + inner norm",
    };
    let mut norms = vec!["blocks"];
    if cfg.final_norm {
        norms.push("norm");
    }
    if cfg.fc_norm {
        norms.push("fc_norm");
    }
    let details = json!({
        "dim": cfg.dim,
        "heads": cfg.heads,
        "mlp_dim": cfg.mlp_dim,
        "patch": cfg.patch,
        "grid": grid,
        "num_prefix_tokens": 1,
        "pos_embed": position,
        "rope_ref_grid": cfg.rope.and_then(|r| r.ref_grid),
        "pool": match cfg.pool { Pool::Avg => "avg", Pool::Token => "token" },
        "norms": norms.join(" -> "),
        "layer_scale": cfg.layer_scale,
        "mlp": mlp,
        "qkv": if cfg.separate_qkv { "separate q, k, v" } else { "fused qkv" },
        "qkv_bias": cfg.qkv_bias,
        "layer_norm_eps": cfg.layer_norm_eps,
        "kernels": kernels(cfg),
    });
    Spec {
        family: cfg.kind.name().to_string(),
        format: cfg.format,
        architecture: cfg.architecture.clone(),
        input_size: cfg.input_size,
        num_classes: cfg.num_classes,
        labels: cfg.labels.clone(),
        preprocess: cfg.preprocess.clone(),
        depth: cfg.depth,
        layer_taps: (0..cfg.depth).map(|i| format!("blocks.{i}.norm1")).collect(),
        taps,
        notes: cfg.notes.clone(),
        details: match details {
            Value::Object(m) => m,
            _ => serde_json::Map::new(),
        },
    }
}

/// Which parts run on vitcx's fused CPU kernels.
fn kernels(cfg: &BeitConfig) -> String {
    let mut fused = vec!["attention", "LayerNorm", "linear"];
    if cfg.shared_rel_pos || cfg.block_rel_pos {
        fused[0] = "attention with the relative position bias";
    }
    if cfg.rope.is_some() {
        fused.push("rotary embedding");
    }
    if cfg.mlp == MlpKind::Gelu {
        fused.push("bias+gelu");
    }
    let mut composed = Vec::new();
    if cfg.layer_scale {
        composed.push("LayerScale (one multiply per branch)");
    }
    if cfg.mlp == MlpKind::SwiGlu {
        composed.push("SiLU gate (two ops)");
    }
    if composed.is_empty() {
        format!("fused: {}", fused.join(", "))
    } else {
        format!("fused: {}; composed: {}", fused.join(", "), composed.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_index_matches_timm_on_a_2x2_grid() {
        // timm gen_relative_position_index((2, 2)): 12 distances; [CLS] rows/columns last.
        let idx = relative_position_index((2, 2));
        let want = [
            [11, 9, 9, 9, 9],
            [10, 4, 3, 1, 0],
            [10, 5, 4, 2, 1],
            [10, 7, 6, 4, 3],
            [10, 8, 7, 5, 4],
        ];
        for (i, row) in want.iter().enumerate() {
            assert_eq!(&idx[i * 5..(i + 1) * 5], row, "row {i}");
        }
    }
}
