//! What a BEiT or EVA-02 checkpoint says, read into one typed struct and checked against its
//! tensors (timm names; Hugging Face's are renamed first, [`super::names`]).
//!
//! The tensors decide the structure (width, depth, patch, classes, which position embeddings,
//! biases, norms, LayerScales and which MLP exist); the config files supply what tensors cannot
//! tell (heads, LayerNorm eps, pooling, the rotary embedding's reference grid, preprocessing,
//! labels), and every size or option they state must agree with the tensors.

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::checkpoint::{check, check_flag, Checkpoint};
use crate::model::config::{
    hf_image_size, hf_labels, timm_labels, Format, HfConfig, HfPreprocessing, HfPreprocessor, Preprocess, Size, TimmConfig,
    IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD,
};
use crate::model::weights::{grid_of, Weights};

/// OpenAI CLIP's mean (timm `OPENAI_CLIP_MEAN`), EVA-02's default.
const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP's std.
const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// Which of the two families a checkpoint belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// BEiT and BEiT v2 (timm `beit*`, Hugging Face `beit`).
    Beit,
    /// EVA-02 (timm `eva02_*`).
    Eva02,
}

impl Kind {
    /// The name reports use.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Beit => "Beit",
            Kind::Eva02 => "Eva02",
        }
    }
}

/// The MLP of each block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpKind {
    /// `fc2(GELU(fc1 x))` (BEiT).
    Gelu,
    /// `fc2(SiLU(gate) * x)` with `[gate; x] = fc1 x` (timm `GluMlp`, EVA-02 tiny/small) or
    /// `fc1_g`, `fc1_x` (timm `SwiGLU`, EVA-02 base/large), packed into one product at load.
    SwiGlu,
}

/// The rotary position embedding (timm `RotaryEmbeddingCat`, `rope_type='cat'`, interleaved).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    /// The grid the positions are scaled to (timm `ref_feat_shape`); `None`: token indices.
    pub ref_grid: Option<(usize, usize)>,
    /// timm `rope_temperature`.
    pub temperature: f64,
}

/// How tokens become the classifier's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// Mean of the patch tokens (timm `avg`, Hugging Face `use_mean_pooling`).
    Avg,
    /// The \[CLS\] token.
    Token,
}

/// Everything read from a BEiT or EVA-02 checkpoint, checked against its tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct BeitConfig {
    /// Checkpoint layout.
    pub format: Format,
    /// BEiT or EVA-02.
    pub kind: Kind,
    /// timm `architecture`, or Hugging Face `architectures[0]`.
    pub architecture: String,
    /// Token width.
    pub dim: usize,
    /// Transformer blocks.
    pub depth: usize,
    /// Attention heads per block.
    pub heads: usize,
    /// Hidden width of the MLP (of each half, for SwiGLU).
    pub mlp_dim: usize,
    /// Patch side in pixels.
    pub patch: usize,
    /// Input size `(H, W)`.
    pub input_size: (usize, usize),
    /// Output classes.
    pub num_classes: usize,
    /// A learned absolute position embedding (`pos_embed`).
    pub abs_pos: bool,
    /// One relative position bias table for all blocks (`rel_pos_bias`).
    pub shared_rel_pos: bool,
    /// A relative position bias table in every block.
    pub block_rel_pos: bool,
    /// The rotary embedding of q and k (EVA-02).
    pub rope: Option<RopeConfig>,
    /// Separate q, k, v projections (timm `qkv_fused=False`, Hugging Face); else one `qkv`.
    pub separate_qkv: bool,
    /// Biases on q and v (k has none).
    pub qkv_bias: bool,
    /// The MLP.
    pub mlp: MlpKind,
    /// A LayerNorm inside the MLP before `fc2` (timm `scale_mlp`).
    pub mlp_norm: bool,
    /// A LayerNorm of the attention output before `proj` (timm `scale_attn_inner`).
    pub attn_norm: bool,
    /// LayerScale on both branches (`gamma_1`, `gamma_2`).
    pub layer_scale: bool,
    /// Pooling.
    pub pool: Pool,
    /// LayerNorm of every token after the last block (`norm`).
    pub final_norm: bool,
    /// LayerNorm of the pooled vector (`fc_norm`).
    pub fc_norm: bool,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// How to preprocess images.
    pub preprocess: Preprocess,
    /// Class names.
    pub labels: Vec<String>,
    /// Values assumed rather than read.
    pub notes: Vec<String>,
}

impl BeitConfig {
    /// The patch grid.
    pub fn grid(&self) -> (usize, usize) {
        (self.input_size.0 / self.patch, self.input_size.1 / self.patch)
    }
}

/// Structure and sizes read off the tensors.
#[derive(Debug, Clone)]
struct Facts {
    dim: usize,
    depth: usize,
    patch: usize,
    mlp_dim: usize,
    num_classes: usize,
    pos_tokens: Option<usize>,
    shared_rows: Option<usize>,
    block_rows: Option<usize>,
    separate_qkv: bool,
    qkv_bias: bool,
    mlp: MlpKind,
    mlp_norm: bool,
    attn_norm: bool,
    layer_scale: bool,
    final_norm: bool,
    fc_norm: bool,
}

fn facts(w: &Weights) -> Result<Facts> {
    let bad = |name: &str, dims: &[usize], expected: &str| {
        w.err(format!(
            "tensor '{}' has shape {dims:?}, expected {expected}",
            w.source_name(name)
        ))
    };
    let (dim, patch) = match w.dims("patch_embed.proj.weight")? {
        [d, 3, p, q] if p == q && *d > 0 && *p > 0 => (*d, *p),
        d => return Err(bad("patch_embed.proj.weight", d, "[dim, 3, p, p]")),
    };
    match w.dims("cls_token")? {
        [1, 1, d] if *d == dim => {}
        d => return Err(bad("cls_token", d, &format!("[1, 1, {dim}]"))),
    }
    let depth = w.layer_count("blocks.", "norm1.weight")?;
    if depth == 0 {
        return Err(w.err(format!(
            "no transformer blocks found (no '{}')",
            w.source_name("blocks.0.norm1.weight")
        )));
    }
    let separate_qkv = w.contains("blocks.0.attn.q_proj.weight");
    let attn_in = if separate_qkv {
        "blocks.0.attn.q_proj.weight"
    } else {
        "blocks.0.attn.qkv.weight"
    };
    let want = if separate_qkv { dim } else { 3 * dim };
    match w.dims(attn_in)? {
        [o, i] if *o == want && *i == dim => {}
        d => {
            return Err(bad(
                attn_in,
                d,
                &format!("[{want}, {dim}] (an attention width other than the token width is not supported)"),
            ))
        }
    }
    let qkv_bias = w.contains("blocks.0.attn.q_bias") || w.contains("blocks.0.attn.q_proj.bias");
    let (mlp, mlp_dim) = if w.contains("blocks.0.mlp.fc1_g.weight") {
        match w.dims("blocks.0.mlp.fc1_g.weight")? {
            [m, d] if *d == dim => (MlpKind::SwiGlu, *m),
            d => return Err(bad("blocks.0.mlp.fc1_g.weight", d, &format!("[hidden, {dim}]"))),
        }
    } else {
        let m = match w.dims("blocks.0.mlp.fc1.weight")? {
            [m, d] if *d == dim => *m,
            d => return Err(bad("blocks.0.mlp.fc1.weight", d, &format!("[hidden, {dim}]"))),
        };
        match w.dims("blocks.0.mlp.fc2.weight")? {
            [d, h] if *d == dim && *h == m => (MlpKind::Gelu, m),
            [d, h] if *d == dim && 2 * *h == m => (MlpKind::SwiGlu, *h),
            d => return Err(bad("blocks.0.mlp.fc2.weight", d, &format!("[{dim}, {m}] or [{dim}, {}]", m / 2))),
        }
    };
    let num_classes = match w.dims("head.weight")? {
        [c, k] if *c > 0 && *k == dim => *c,
        [0, _] => {
            return Err(w.err(format!(
                "tensor '{}' has 0 classes (a backbone without a classifier; vitcx explains classifiers)",
                w.source_name("head.weight")
            )))
        }
        d => return Err(bad("head.weight", d, &format!("[num_classes, {dim}]"))),
    };
    let pos_tokens = if w.contains("pos_embed") {
        match w.dims("pos_embed")? {
            [1, t, d] if *d == dim => Some(*t),
            d => return Err(bad("pos_embed", d, &format!("[1, tokens, {dim}]"))),
        }
    } else {
        None
    };
    let rows = |name: &str| -> Result<Option<usize>> {
        if !w.contains(name) {
            return Ok(None);
        }
        match w.dims(name)? {
            [r, _] => Ok(Some(*r)),
            d => Err(bad(name, d, "[distances, heads]")),
        }
    };
    Ok(Facts {
        dim,
        depth,
        patch,
        mlp_dim,
        num_classes,
        pos_tokens,
        shared_rows: rows("rel_pos_bias.relative_position_bias_table")?,
        block_rows: rows("blocks.0.attn.relative_position_bias_table")?,
        separate_qkv,
        qkv_bias,
        mlp,
        mlp_norm: w.contains("blocks.0.mlp.norm.weight"),
        attn_norm: w.contains("blocks.0.attn.norm.weight"),
        layer_scale: w.contains("blocks.0.gamma_1"),
        final_norm: w.contains("norm.weight"),
        fc_norm: w.contains("fc_norm.weight"),
    })
}

/// Checks the position tables against the grid: the absolute embedding holds \[CLS\] + the
/// patches, a relative table `(2 gh - 1)(2 gw - 1) + 3` distances.
fn check_grid(w: &Weights, f: &Facts, grid: (usize, usize), input: (usize, usize)) -> Result<()> {
    let (gh, gw) = grid;
    if let Some(t) = f.pos_tokens {
        if t != 1 + gh * gw {
            return Err(w.err(format!(
                "tensor '{}' has {t} tokens but input {}x{} with patch {} needs {} ([CLS] + {gh}x{gw})",
                w.source_name("pos_embed"),
                input.0,
                input.1,
                f.patch,
                1 + gh * gw
            )));
        }
    }
    let want = (2 * gh - 1) * (2 * gw - 1) + 3;
    for (rows, name) in [
        (f.shared_rows, "rel_pos_bias.relative_position_bias_table"),
        (f.block_rows, "blocks.0.attn.relative_position_bias_table"),
    ] {
        if let Some(r) = rows.filter(|r| *r != want) {
            return Err(w.err(format!(
                "tensor '{}' has {r} relative distances but a {gh}x{gw} grid needs {want} (a table made for another input size is not resampled)",
                w.source_name(name)
            )));
        }
    }
    Ok(())
}




/// Standard head count for a timm architecture name's size word.
fn standard_heads(arch: &str) -> Option<usize> {
    arch.split(['_', '.', '-']).find_map(|w| match w {
        "tiny" => Some(3),
        "small" => Some(6),
        "base" => Some(12),
        "large" => Some(16),
        _ => None,
    })
}

/// timm `model_args` of `Beit` and `Eva` that vitcx reads.
#[derive(Debug, Default, Deserialize)]
struct TimmArgs {
    embed_dim: Option<usize>,
    depth: Option<usize>,
    num_heads: Option<usize>,
    patch_size: Option<usize>,
    in_chans: Option<usize>,
    mlp_ratio: Option<f64>,
    num_classes: Option<usize>,
    img_size: Option<Size>,
    qkv_bias: Option<bool>,
    qkv_fused: Option<bool>,
    global_pool: Option<String>,
    init_values: Option<f64>,
    use_abs_pos_emb: Option<bool>,
    use_rel_pos_bias: Option<bool>,
    use_shared_rel_pos_bias: Option<bool>,
    use_fc_norm: Option<bool>,
    swiglu_mlp: Option<bool>,
    scale_mlp: Option<bool>,
    scale_attn_inner: Option<bool>,
    use_rot_pos_emb: Option<bool>,
    ref_feat_shape: Option<Size>,
    rope_temperature: Option<f64>,
}

/// `model_args` read above, and those that change nothing at inference.
const TIMM_ARGS_KNOWN: &[&str] = &[
    "embed_dim",
    "depth",
    "num_heads",
    "patch_size",
    "in_chans",
    "mlp_ratio",
    "num_classes",
    "img_size",
    "qkv_bias",
    "qkv_fused",
    "global_pool",
    "init_values",
    "use_abs_pos_emb",
    "use_rel_pos_bias",
    "use_shared_rel_pos_bias",
    "use_fc_norm",
    "swiglu_mlp",
    "scale_mlp",
    "scale_attn_inner",
    "use_rot_pos_emb",
    "ref_feat_shape",
    "rope_temperature",
    "drop_rate",
    "pos_drop_rate",
    "patch_drop_rate",
    "proj_drop_rate",
    "attn_drop_rate",
    "drop_path_rate",
    "head_init_scale",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
];

/// `model_args` whose non-default values vitcx does not implement, with the default.
const TIMM_ARGS_DEFAULT_ONLY: &[(&str, &str)] = &[
    ("class_token", "true"),
    ("num_reg_tokens", "0"),
    ("no_embed_class", "false"),
    ("dynamic_img_size", "false"),
    ("dynamic_img_pad", "false"),
    ("use_post_norm", "false"),
    ("use_pre_transformer_norm", "false"),
    ("qk_norm", "false"),
    ("attn_type", "\"eva\""),
    ("rope_type", "\"cat\""),
    ("rope_grid_offset", "0.0"),
    ("rope_grid_indexing", "\"ij\""),
    ("rope_rotate_half", "false"),
    ("gated_attn", "false"),
    ("attn_only_layer_scale", "false"),
    ("swiglu_align_to", "0"),
];

#[derive(Debug, Deserialize)]
struct ModelArgs {
    #[serde(default)]
    model_args: Option<TimmArgs>,
}

/// A timm `beit*` or `eva02_*` checkpoint's configuration.
pub(crate) fn timm(ckpt: &Checkpoint, w: &Weights, kind: Kind) -> Result<BeitConfig> {
    let c: TimmConfig = ckpt.parse()?;
    let arch = c.architecture.clone();
    if let Some(Value::Object(m)) = ckpt.config.get("model_args") {
        let mut keys: Vec<&String> = m.keys().collect();
        keys.sort();
        for k in keys {
            let v = &m[k];
            if TIMM_ARGS_KNOWN.contains(&k.as_str()) {
                continue;
            }
            let default = TIMM_ARGS_DEFAULT_ONLY.iter().find(|(n, _)| n == k);
            let is_default = default.is_some_and(|(_, d)| {
                serde_json::from_str::<Value>(d).is_ok_and(|d| {
                    d == *v || (d.as_f64().is_some() && d.as_f64() == v.as_f64())
                })
            });
            if !is_default {
                return Err(Error::Unsupported(format!(
                    "{arch}: model_args.{k} = {v} (vitcx implements {}'s default only)",
                    match default {
                        Some((_, d)) => d.to_string(),
                        None => "the option's absence".to_string(),
                    }
                )));
            }
        }
    }
    let args = ckpt.parse::<ModelArgs>()?.model_args.unwrap_or_default();
    let f = facts(w)?;
    let mut notes = Vec::new();
    check(ckpt, "model_args.in_chans", args.in_chans, 3, "{} input channels")?;
    check(ckpt, "model_args.embed_dim", args.embed_dim, f.dim, "width {}")?;
    check(ckpt, "model_args.depth", args.depth, f.depth, "{} blocks")?;
    check(ckpt, "model_args.patch_size", args.patch_size, f.patch, "patch size {}")?;
    check(ckpt, "num_classes", c.num_classes.or(args.num_classes), f.num_classes, "{} classes")?;
    if let Some(r) = args.mlp_ratio {
        let stated = (r * f.dim as f64) as usize;
        check(ckpt, "model_args.mlp_ratio x embed_dim", Some(stated), f.mlp_dim, "mlp width {}")?;
    }
    check_flag(ckpt, w, "model_args.qkv_bias", args.qkv_bias, f.qkv_bias, "blocks.0.attn.q_bias")?;
    check_flag(ckpt, w, "model_args.use_abs_pos_emb", args.use_abs_pos_emb, f.pos_tokens.is_some(), "pos_embed")?;
    check_flag(
        ckpt,
        w,
        "model_args.use_rel_pos_bias",
        args.use_rel_pos_bias,
        f.block_rows.is_some(),
        "blocks.0.attn.relative_position_bias_table",
    )?;
    check_flag(
        ckpt,
        w,
        "model_args.use_shared_rel_pos_bias",
        args.use_shared_rel_pos_bias,
        f.shared_rows.is_some(),
        "rel_pos_bias.relative_position_bias_table",
    )?;
    if let Some(fused) = args.qkv_fused {
        check_flag(ckpt, w, "model_args.qkv_fused", Some(fused), !f.separate_qkv, "blocks.0.attn.qkv.weight")?;
    }
    check_flag(ckpt, w, "model_args.scale_mlp", args.scale_mlp, f.mlp_norm, "blocks.0.mlp.norm.weight")?;
    check_flag(
        ckpt,
        w,
        "model_args.scale_attn_inner",
        args.scale_attn_inner,
        f.attn_norm,
        "blocks.0.attn.norm.weight",
    )?;
    if let Some(s) = args.swiglu_mlp {
        if s != (f.mlp == MlpKind::SwiGlu) {
            return Err(ckpt.config_err(format!(
                "config.json model_args.swiglu_mlp is {s} but the weights hold {} MLP",
                if s { "a plain" } else { "a gated (SwiGLU)" }
            )));
        }
    }
    check_flag(ckpt, w, "model_args.use_fc_norm", args.use_fc_norm, f.fc_norm, "fc_norm.weight")?;
    if let Some(v) = args.init_values {
        check_flag(ckpt, w, "model_args.init_values", Some(v > 0.0), f.layer_scale, "blocks.0.gamma_1")?;
    }
    let heads = match args.num_heads.or_else(|| standard_heads(&arch)) {
        Some(h) if h > 0 && f.dim % h == 0 => h,
        Some(h) => {
            return Err(ckpt.config_err(format!("{h} heads do not divide the width {}", f.dim)))
        }
        None => {
            return Err(ckpt.config_err(format!(
                "model_args.num_heads missing and '{arch}' names no standard size (tiny, small, base, large)"
            )))
        }
    };
    if args.num_heads.is_none() {
        notes.push(format!("num_heads not in model_args; {heads} from the name {arch}"));
    }
    let pool_name = args
        .global_pool
        .clone()
        .or(c.global_pool.clone())
        .unwrap_or_else(|| "avg".into());
    let pool = match pool_name.as_str() {
        "avg" => Pool::Avg,
        "token" => Pool::Token,
        other => {
            return Err(Error::Unsupported(format!(
                "{arch}: global_pool '{other}' (supported: avg, token)"
            )))
        }
    };
    let pcfg = c.pretrained_cfg.clone().unwrap_or_default();
    let input_size = match (args.img_size, pcfg.input_size) {
        (Some(Size(h, wd)), _) | (None, Some(Size(h, wd))) => (h, wd),
        (None, None) => {
            notes.push("input size not in config.json; using 224x224".into());
            (224, 224)
        }
    };
    let rope = match kind {
        Kind::Beit => None,
        Kind::Eva02 => {
            let base = arch.split('.').next().unwrap_or(&arch);
            let on = args.use_rot_pos_emb.unwrap_or(base.starts_with("eva02"));
            on.then(|| {
                let ref_grid = match args.ref_feat_shape {
                    Some(Size(h, wd)) => Some((h, wd)),
                    // Every timm eva02_* architecture sets ref_feat_shape=(16, 16) (224 / 14).
                    None if base.starts_with("eva02") => Some((16, 16)),
                    None => None,
                };
                RopeConfig {
                    ref_grid,
                    temperature: args.rope_temperature.unwrap_or(10000.0),
                }
            })
        }
    };
    if let Some(r) = &rope {
        let hd = f.dim / heads;
        if hd % 4 != 0 {
            return Err(Error::Unsupported(format!(
                "{arch}: a rotary embedding over a head width of {hd} (needs a multiple of 4)"
            )));
        }
        if r.ref_grid.is_some_and(|(h, w)| h == 0 || w == 0) {
            return Err(ckpt.config_err("model_args.ref_feat_shape must be positive".into()));
        }
    }
    let (def_mean, def_std) = match kind {
        Kind::Eva02 => (CLIP_MEAN, CLIP_STD),
        Kind::Beit if arch.starts_with("beitv2") => (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        Kind::Beit => (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD),
    };
    if pcfg.mean.is_none() || pcfg.std.is_none() {
        notes.push(format!(
            "mean/std not in config.json pretrained_cfg; using timm's default for {arch}: {def_mean:?} / {def_std:?}"
        ));
    }
    let labels = timm_labels(&ckpt.config_path, c.label_names.as_deref(), f.num_classes)?;
    let (resize_shortest, crop) = match pcfg.crop_pct {
        Some(p) if p > 0.0 && input_size.0 == input_size.1 => (
            Some((input_size.0 as f64 / p).floor() as usize),
            Some(input_size),
        ),
        _ => (None, None),
    };
    let preprocess = Preprocess {
        mean: pcfg.mean.unwrap_or(def_mean),
        std: pcfg.std.unwrap_or(def_std),
        input_size,
        interpolation: pcfg.interpolation.clone(),
        crop_pct: pcfg.crop_pct,
        resize_shortest,
        crop,
    };
    finish(ckpt, w, f, Format::Timm, kind, arch, heads, input_size, pool, 1e-6, rope, preprocess, labels, notes)
}

/// The fields of a Hugging Face `BeitConfig`.
#[derive(Debug, Deserialize)]
struct HfBeit {
    #[serde(flatten)]
    common: HfConfig,
    hidden_act: Option<String>,
    num_channels: Option<usize>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    intermediate_size: Option<usize>,
    patch_size: Option<usize>,
    num_attention_heads: Option<usize>,
    layer_norm_eps: Option<f64>,
    image_size: Option<Size>,
    use_mean_pooling: Option<bool>,
    use_relative_position_bias: Option<bool>,
    use_shared_relative_position_bias: Option<bool>,
    use_absolute_position_embeddings: Option<bool>,
    layer_scale_init_value: Option<f64>,
}

/// A Hugging Face `beit` checkpoint's configuration (`BeitForImageClassification`).
pub(crate) fn hf(ckpt: &Checkpoint, w: &Weights) -> Result<BeitConfig> {
    let c: HfBeit = ckpt.parse()?;
    let pre: Option<HfPreprocessor> = ckpt.parse_preprocessor()?;
    let arch = c.common.architecture();
    let mut notes = Vec::new();
    let act = c.hidden_act.as_deref().unwrap_or("gelu");
    if act != "gelu" {
        return Err(Error::Unsupported(format!("{arch}: hidden_act '{act}' (supported: gelu)")));
    }
    let f = facts(w)?;
    check(ckpt, "num_channels", c.num_channels, 3, "{} input channels")?;
    check(ckpt, "hidden_size", c.hidden_size, f.dim, "width {}")?;
    check(ckpt, "num_hidden_layers", c.num_hidden_layers, f.depth, "{} layers")?;
    check(ckpt, "intermediate_size", c.intermediate_size, f.mlp_dim, "mlp width {}")?;
    check(ckpt, "patch_size", c.patch_size, f.patch, "patch size {}")?;
    let rel = "blocks.0.attn.relative_position_bias_table";
    check_flag(ckpt, w, "use_relative_position_bias", Some(c.use_relative_position_bias.unwrap_or(false)), f.block_rows.is_some(), rel)?;
    let shared = "rel_pos_bias.relative_position_bias_table";
    check_flag(
        ckpt,
        w,
        "use_shared_relative_position_bias",
        Some(c.use_shared_relative_position_bias.unwrap_or(false)),
        f.shared_rows.is_some(),
        shared,
    )?;
    check_flag(
        ckpt,
        w,
        "use_absolute_position_embeddings",
        Some(c.use_absolute_position_embeddings.unwrap_or(false)),
        f.pos_tokens.is_some(),
        "pos_embed",
    )?;
    let ls = c.layer_scale_init_value.unwrap_or(0.1) > 0.0;
    check_flag(ckpt, w, "layer_scale_init_value > 0", Some(ls), f.layer_scale, "blocks.0.gamma_1")?;
    if f.mlp != MlpKind::Gelu || f.mlp_norm || f.attn_norm || !f.separate_qkv {
        return Err(w.err("a Hugging Face BEiT with tensors of another model".into()));
    }
    let mean_pool = c.use_mean_pooling.unwrap_or(true);
    let (pool, norm) = if mean_pool {
        (Pool::Avg, "fc_norm.weight")
    } else {
        (Pool::Token, "norm.weight")
    };
    if !w.contains(norm) {
        return Err(w.err(format!(
            "use_mean_pooling is {mean_pool} but '{}' is missing",
            w.source_name(norm)
        )));
    }
    let heads = match c.num_attention_heads {
        Some(h) => h,
        None => {
            notes.push("num_attention_heads not in config.json; using 12, transformers' default".into());
            12
        }
    };
    if heads == 0 || f.dim % heads != 0 {
        return Err(ckpt.config_err(format!(
            "num_attention_heads {heads} does not divide hidden_size {}",
            f.dim
        )));
    }
    let eps = match c.layer_norm_eps {
        Some(e) => e,
        None => {
            notes.push("layer_norm_eps not in config.json; using 1e-12, transformers' default".into());
            1e-12
        }
    };
    let built = hf_image_size(c.image_size, 224, &mut notes);
    let pre = HfPreprocessing::read(pre.as_ref(), ckpt.preprocessor.as_ref().map(|(_, v)| v), &mut notes);
    pre.note_other_size(built, &mut notes);
    pre.note_missing_stats("BeitImageProcessor's default 0.5 / 0.5", &mut notes);
    let HfPreprocessing {
        mean,
        std,
        interpolation,
        crop,
        resize_shortest,
        ..
    } = pre;
    let labels = hf_labels(&ckpt.config_path, c.common.id2label.as_ref(), f.num_classes, &w.source_name("head.weight"))?;
    let preprocess = Preprocess {
        mean: mean.unwrap_or(IMAGENET_INCEPTION_MEAN),
        std: std.unwrap_or(IMAGENET_INCEPTION_STD),
        input_size: built,
        interpolation,
        crop_pct: None,
        resize_shortest,
        crop,
    };
    finish(ckpt, w, f, Format::HuggingFace, Kind::Beit, arch, heads, built, pool, eps, None, preprocess, labels, notes)
}

/// The common end of both readers: the grid checked against the position tables.
#[allow(clippy::too_many_arguments)]
fn finish(
    ckpt: &Checkpoint,
    w: &Weights,
    f: Facts,
    format: Format,
    kind: Kind,
    architecture: String,
    heads: usize,
    input_size: (usize, usize),
    pool: Pool,
    layer_norm_eps: f64,
    rope: Option<RopeConfig>,
    preprocess: Preprocess,
    labels: Vec<String>,
    notes: Vec<String>,
) -> Result<BeitConfig> {
    if let Some(size) = ckpt.input_size.filter(|s| *s != input_size) {
        return Err(Error::Unsupported(format!(
            "input size {}x{} for a {} checkpoint made for {}x{} (its position tables are not resampled)",
            size.0,
            size.1,
            kind.name(),
            input_size.0,
            input_size.1
        )));
    }
    let grid = grid_of(w, input_size, f.patch)?;
    check_grid(w, &f, grid, input_size)?;
    let path = match (&ckpt.preprocessor, format) {
        (Some((p, _)), Format::HuggingFace) => p.clone(),
        _ => ckpt.config_path.clone(),
    };
    preprocess.check(&path)?;
    Ok(BeitConfig {
        format,
        kind,
        architecture,
        dim: f.dim,
        depth: f.depth,
        heads,
        mlp_dim: f.mlp_dim,
        patch: f.patch,
        input_size,
        num_classes: f.num_classes,
        abs_pos: f.pos_tokens.is_some(),
        shared_rel_pos: f.shared_rows.is_some(),
        block_rel_pos: f.block_rows.is_some(),
        rope,
        separate_qkv: f.separate_qkv,
        qkv_bias: f.qkv_bias,
        mlp: f.mlp,
        mlp_norm: f.mlp_norm,
        attn_norm: f.attn_norm,
        layer_scale: f.layer_scale,
        pool,
        final_norm: f.final_norm,
        fc_norm: f.fc_norm,
        layer_norm_eps,
        preprocess,
        labels,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_from_names() {
        assert_eq!(standard_heads("eva02_tiny_patch14_224"), Some(3));
        assert_eq!(standard_heads("eva02_base_patch14_448.mim_in22k_ft_in22k_in1k"), Some(12));
        assert_eq!(standard_heads("beit_large_patch16_512"), Some(16));
        assert_eq!(standard_heads("beit_huge"), None);
    }
}
