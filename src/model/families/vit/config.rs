//! The ViT family's configuration: what a timm or Hugging Face checkpoint of a plain-block ViT
//! says, read into typed structs and checked against the shapes of its tensors.
//!
//! Tensor shapes are the ground truth for structure and sizes (width, depth, patch, classes,
//! prefix tokens, which norms and layer scales exist); the config files supply what tensors
//! cannot tell (heads, LayerNorm eps, activation, pooling, preprocessing, labels), and every
//! size or option they state must agree with the tensors, or loading fails naming the field.
//! timm architectures set some options in code rather than in `model_args` (CLIP's LayerNorm eps
//! 1e-5 and QuickGELU, some SigLIP's tanh GELU): [`timm_hidden_defaults`] holds them.

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::checkpoint::{check, check_flag, Checkpoint};
use crate::model::config::{
    hf_image_size, hf_labels, timm_labels, Format, HfConfig, HfPreprocessing, HfPreprocessor, Preprocess, Size, TimmConfig,
    IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD,
};
use crate::model::weights::{grid_of, Weights};

/// OpenAI CLIP's mean (timm `OPENAI_CLIP_MEAN`).
const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP's std.
const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// Which ViT the checkpoint holds: a name for reports; what runs is decided by the options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Vision Transformer (timm `vit_*`, Hugging Face `vit`).
    Vit,
    /// DeiT without a distillation head: timm `deit_*` (identical to ViT, one \[CLS\] token), or
    /// Hugging Face `deit` without teacher (\[CLS\] + \[DIST\] tokens, classifier on \[CLS\] only).
    Deit,
    /// DeiT with \[CLS\] and \[DIST\] tokens and the two heads averaged.
    DeitDistilled,
    /// DeiT III (timm `deit3_*`: LayerScale, position embedding without the \[CLS\] token).
    Deit3,
    /// DINOv2, with or without registers.
    Dinov2,
    /// CLIP's image tower (pre-norm).
    Clip,
    /// SigLIP's image tower (no class token).
    Siglip,
}

impl Variant {
    /// The name reports use (`Vit`, `Deit`, `DeitDistilled`, `Deit3`, `Dinov2`, `Clip`, `Siglip`).
    pub fn name(self) -> &'static str {
        match self {
            Variant::Vit => "Vit",
            Variant::Deit => "Deit",
            Variant::DeitDistilled => "DeitDistilled",
            Variant::Deit3 => "Deit3",
            Variant::Dinov2 => "Dinov2",
            Variant::Clip => "Clip",
            Variant::Siglip => "Siglip",
        }
    }
}

/// How the tokens become the classifier's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// The first token (\[CLS\]); timm `global_pool='token'`.
    Token,
    /// Mean of the patch tokens (prefix tokens excluded); timm `avg`, CLIP/SigLIP classifiers.
    Avg,
    /// Max of the patch tokens; timm `max`.
    Max,
    /// Half the sum of mean and max; timm `avgmax`.
    AvgMax,
    /// Attention pooling with a learned latent query (timm `map`, SigLIP).
    Map,
    /// \[CLS\] and the mean of the patch tokens, concatenated (Hugging Face DINOv2 classifiers).
    ClsAndMean,
}

impl Pool {
    /// timm's name (`token`, `avg`, ...; `cls+avg` for DINOv2's concatenation).
    pub fn name(self) -> &'static str {
        match self {
            Pool::Token => "token",
            Pool::Avg => "avg",
            Pool::Max => "max",
            Pool::AvgMax => "avgmax",
            Pool::Map => "map",
            Pool::ClsAndMean => "cls+avg",
        }
    }
}

/// The MLP's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// Exact (erf) GELU.
    Gelu,
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP).
    QuickGelu,
    /// GELU with the tanh approximation.
    GeluTanh,
}

impl Act {
    /// timm's name.
    pub fn name(self) -> &'static str {
        match self {
            Act::Gelu => "gelu",
            Act::QuickGelu => "quick_gelu",
            Act::GeluTanh => "gelu_tanh",
        }
    }

    /// timm's `act_layer` or Hugging Face's `hidden_act` name, if vitcx implements it.
    fn parse(name: &str) -> Option<Act> {
        match name {
            "gelu" => Some(Act::Gelu),
            "quick_gelu" => Some(Act::QuickGelu),
            "gelu_tanh" | "gelu_pytorch_tanh" | "gelu_new" => Some(Act::GeluTanh),
            _ => None,
        }
    }
}

/// How the position embedding is resampled to a grid other than the one it was trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// Bicubic with antialiasing (Keys a = -0.5): timm's `resample_abs_pos_embed`,
    /// transformers' DINOv2 with registers.
    Antialiased,
    /// Bicubic without antialiasing (a = -0.75): transformers' `interpolate_pos_encoding`.
    Plain,
}

/// Everything read from a ViT checkpoint's configuration files, checked against its tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct VitConfig {
    /// Checkpoint layout.
    pub format: Format,
    /// Which ViT (a name; the options below decide what runs).
    pub variant: Variant,
    /// timm `architecture`, or Hugging Face `architectures[0]` (else `model_type`).
    pub architecture: String,
    /// Token width.
    pub dim: usize,
    /// Number of transformer blocks.
    pub depth: usize,
    /// Attention heads per block.
    pub heads: usize,
    /// Hidden width of each block's MLP.
    pub mlp_dim: usize,
    /// Patch side in pixels.
    pub patch: usize,
    /// Input size `(H, W)` the model runs at.
    pub input_size: (usize, usize),
    /// Number of output classes.
    pub num_classes: usize,
    /// The tokens before the patch tokens, in order (`[CLS]`, `[DIST]`, `[REG0]`, ...).
    pub prefix: Vec<String>,
    /// How many of the leading prefix tokens have a position embedding (timm `no_embed_class`:
    /// none; DINOv2 with registers: the \[CLS\] but not the registers).
    pub pos_prefix: usize,
    /// The patch grid the position embedding holds.
    pub pos_grid: (usize, usize),
    /// How the position embedding is resampled for another grid.
    pub resample: Resample,
    /// Whether inputs of other sizes are accepted (timm `dynamic_img_size`, DINOv2 in
    /// transformers); otherwise only `input_size`.
    pub dynamic: bool,
    /// Whether the patch projection has a bias (CLIP's has none).
    pub patch_bias: bool,
    /// Whether the attention's qkv projection has a bias.
    pub qkv_bias: bool,
    /// LayerNorm after the embedding (timm `pre_norm`, CLIP's `pre_layrnorm`).
    pub pre_norm: bool,
    /// LayerNorm of every token after the last block (timm `norm`).
    pub final_norm: bool,
    /// LayerNorm of the pooled vector (timm `fc_norm`).
    pub fc_norm: bool,
    /// How tokens are pooled for the classifier.
    pub pool: Pool,
    /// LayerScale on both residual branches (timm `init_values`, DINOv2 `layerscale_value`).
    pub layer_scale: bool,
    /// LayerNorm of each head's queries and keys (timm `qk_norm`).
    pub qk_norm: bool,
    /// The MLP's activation.
    pub act: Act,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// How to preprocess images for this model.
    pub preprocess: Preprocess,
    /// Class names, one per output.
    pub labels: Vec<String>,
    /// Values that were assumed rather than read, for the user to check.
    pub notes: Vec<String>,
}

impl VitConfig {
    /// Prefix tokens: \[CLS\], \[DIST\] and registers.
    pub fn num_prefix_tokens(&self) -> usize {
        self.prefix.len()
    }

    /// Whether the model has a \[CLS\] token.
    pub fn class_token(&self) -> bool {
        self.prefix.first().is_some_and(|p| p == "[CLS]")
    }

    /// Whether the model has a \[DIST\] token (Hugging Face DeiT has one even without its head).
    pub fn dist_token(&self) -> bool {
        self.prefix.iter().any(|p| p == "[DIST]")
    }

    /// Whether the model has a \[DIST\] token and head.
    pub fn distilled(&self) -> bool {
        self.variant == Variant::DeitDistilled
    }

    /// The classifier's input width (twice the width for DINOv2's \[CLS\] + mean).
    pub fn head_in(&self) -> usize {
        match self.pool {
            Pool::ClsAndMean => 2 * self.dim,
            _ => self.dim,
        }
    }
}

/// Structure and sizes read off the tensors (timm names).
#[derive(Debug, Clone)]
struct TensorFacts {
    dim: usize,
    depth: usize,
    patch: usize,
    mlp_dim: usize,
    num_classes: usize,
    head_in: usize,
    /// Tokens in `pos_embed` (prefix tokens with a position + patches).
    tokens: usize,
    cls: bool,
    dist: bool,
    regs: usize,
    has_head_dist: bool,
    patch_bias: bool,
    qkv_bias: bool,
    pre_norm: bool,
    final_norm: bool,
    fc_norm: bool,
    layer_scale: bool,
    qk_norm: bool,
    attn_pool: bool,
}

impl TensorFacts {
    fn read(w: &Weights) -> Result<Self> {
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
        let token = |name: &str| -> Result<usize> {
            if !w.contains(name) {
                return Ok(0);
            }
            match w.dims(name)? {
                [1, n, d] if *d == dim => Ok(*n),
                d => Err(bad(name, d, &format!("[1, n, {dim}]"))),
            }
        };
        let cls = token("cls_token")?;
        let dist = token("dist_token")?;
        let regs = token("reg_token")?;
        if cls > 1 || dist > 1 {
            return Err(w.err(format!(
                "'{}' holds {cls} tokens and '{}' {dist}; expected one each",
                w.source_name("cls_token"),
                w.source_name("dist_token")
            )));
        }
        let depth = w.layer_count("blocks.", "norm1.weight")?;
        if depth == 0 {
            return Err(w.err(format!(
                "no transformer blocks found (no '{}')",
                w.source_name("blocks.0.norm1.weight")
            )));
        }
        let mlp_dim = match w.dims("blocks.0.mlp.fc1.weight")? {
            [m, d] if *d == dim => *m,
            d => {
                return Err(bad(
                    "blocks.0.mlp.fc1.weight",
                    d,
                    &format!("[mlp_dim, {dim}]"),
                ))
            }
        };
        if let Ok([d, m]) = w.dims("blocks.0.mlp.fc2.weight") {
            if *d == dim && 2 * m == mlp_dim {
                return Err(Error::Unsupported(
                    "a gated (SwiGLU) MLP: fc2 takes half of fc1's outputs (DINOv2 giant and similar)"
                        .into(),
                ));
            }
        }
        let (num_classes, head_in) = match w.dims("head.weight")? {
            [c, k] if *c > 0 && (*k == dim || *k == 2 * dim) => (*c, *k),
            [0, _] => {
                return Err(w.err(format!(
                    "tensor '{}' has 0 classes",
                    w.source_name("head.weight")
                )))
            }
            d => {
                return Err(bad(
                    "head.weight",
                    d,
                    &format!("[num_classes, {dim}]"),
                ))
            }
        };
        if !w.contains("pos_embed") {
            return Err(Error::Unsupported(format!(
                "no absolute position embedding ('{}'); vitcx's ViT needs one",
                w.source_name("pos_embed")
            )));
        }
        let tokens = match w.dims("pos_embed")? {
            [1, t, d] if *d == dim => *t,
            d => return Err(bad("pos_embed", d, &format!("[1, tokens, {dim}]"))),
        };
        Ok(TensorFacts {
            dim,
            depth,
            patch,
            mlp_dim,
            num_classes,
            head_in,
            tokens,
            cls: cls == 1,
            dist: dist == 1,
            regs,
            has_head_dist: w.contains("head_dist.weight"),
            patch_bias: w.contains("patch_embed.proj.bias"),
            qkv_bias: w.contains("blocks.0.attn.qkv.bias"),
            pre_norm: w.contains("norm_pre.weight"),
            final_norm: w.contains("norm.weight"),
            fc_norm: w.contains("fc_norm.weight"),
            layer_scale: w.contains("blocks.0.ls1.gamma"),
            qk_norm: w.contains("blocks.0.attn.q_norm.weight"),
            attn_pool: w.contains("attn_pool.latent"),
        })
    }

    /// Prefix token names in the model's order: \[CLS\], \[DIST\], registers.
    fn prefix(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.cls {
            p.push("[CLS]".to_string());
        }
        if self.dist {
            p.push("[DIST]".to_string());
        }
        p.extend((0..self.regs).map(|i| format!("[REG{i}]")));
        p
    }
}



/// The configuration of `ckpt`, checked against its tensors `w` (timm names).
pub(crate) fn read(ckpt: &Checkpoint, w: &Weights) -> Result<VitConfig> {
    let mut cfg = match ckpt.format {
        Format::Timm => timm(ckpt, w)?,
        Format::HuggingFace => hf(ckpt, w)?,
    };
    if let Some(size) = ckpt.input_size {
        at_size(&mut cfg, w, size)?;
    }
    let path = match (&ckpt.preprocessor, cfg.format) {
        (Some((p, _)), Format::HuggingFace) => p.as_path(),
        _ => ckpt.config_path.as_path(),
    };
    cfg.preprocess.check(path)?;
    Ok(cfg)
}

/// The model built for another input size, as timm's `create_model(..., img_size=size)` builds
/// it from a checkpoint (the position embedding resampled once, at load) and transformers'
/// `interpolate_pos_encoding` runs it. The checkpoint's own resize and crop keep their ratio.
fn at_size(cfg: &mut VitConfig, w: &Weights, size: (usize, usize)) -> Result<()> {
    let grid = grid_of(w, size, cfg.patch)?;
    if size == cfg.input_size {
        return Ok(());
    }
    let rule = match cfg.resample {
        Resample::Antialiased => "bicubic, antialiased",
        Resample::Plain => "bicubic",
    };
    let (gh, gw) = cfg.pos_grid;
    cfg.notes.push(format!(
        "input size {}x{} asked for instead of {}x{}; position embedding resampled from {gh}x{gw} to {}x{} ({rule})",
        size.0, size.1, cfg.input_size.0, cfg.input_size.1, grid.0, grid.1
    ));
    let pre = &mut cfg.preprocess;
    if let (Some(e), Some((ch, _))) = (pre.resize_shortest, pre.crop) {
        pre.resize_shortest = Some((e as f64 * size.0 as f64 / ch as f64).floor() as usize);
        pre.crop = Some(size);
    }
    pre.input_size = size;
    cfg.input_size = size;
    Ok(())
}

/// Standard head count for a timm architecture name's size word.
fn standard_heads(arch: &str) -> Option<(usize, &'static str)> {
    arch.split(['_', '.', '-']).find_map(|w| match w {
        "tiny" => Some((3, "tiny")),
        "small" => Some((6, "small")),
        "medium" => Some((8, "medium")),
        "base" => Some((12, "base")),
        "large" => Some((16, "large")),
        "huge" => Some((16, "huge")),
        "so400m" => Some((16, "so400m")),
        _ => None,
    })
}

/// timm SigLIP architectures built with `act_layer='gelu_tanh'` (SigLIP 2 and some
/// SigLIP sizes; the others use exact GELU), from timm 1.0's `vision_transformer.py`.
const TIMM_GELU_TANH: &[&str] = &[
    "vit_base_patch32_siglip_256",
    "vit_large_patch16_siglip_512",
    "vit_so400m_patch16_siglip_256",
    "vit_so400m_patch16_siglip_384",
    "vit_so400m_patch16_siglip_512",
    "vit_giantopt_patch16_siglip_256",
    "vit_giantopt_patch16_siglip_384",
    "vit_base_patch32_siglip_gap_256",
    "vit_large_patch16_siglip_gap_512",
    "vit_so400m_patch16_siglip_gap_256",
    "vit_so400m_patch16_siglip_gap_384",
    "vit_so400m_patch16_siglip_gap_512",
    "vit_giantopt_patch16_siglip_gap_256",
    "vit_giantopt_patch16_siglip_gap_384",
];

/// timm architectures whose blocks differ from the plain block in ways the tensors do not show.
const TIMM_REFUSED: &[(&str, &str)] = &[
    ("_rpn_", "post-norm residual blocks (ResPostBlock)"),
    ("_xp_", "parallel blocks with RMSNorm"),
    ("_18x2_", "parallel blocks"),
    ("relpos", "relative position embeddings"),
    ("_rope", "rotary position embeddings"),
    ("tipsv2", "TIPSv2 blocks"),
    ("radio", "RADIO"),
    ("naflex", "NaFlex variable-resolution embedding"),
];

/// What a timm architecture sets in code rather than in `model_args`: (LayerNorm eps, act).
fn timm_hidden_defaults(arch: &str) -> (f64, Act) {
    let base = arch.split('.').next().unwrap_or(arch);
    // CLIP architectures build their norms with partial(LayerNorm, eps=1e-5).
    let eps = if base.contains("_clip_") { 1e-5 } else { 1e-6 };
    let act = if base.contains("quickgelu") {
        Act::QuickGelu
    } else if TIMM_GELU_TANH.contains(&base) {
        Act::GeluTanh
    } else {
        Act::Gelu
    };
    (eps, act)
}

/// The variant's name for a timm architecture.
fn timm_variant(arch: &str, distilled: bool) -> Variant {
    if distilled {
        Variant::DeitDistilled
    } else if arch.starts_with("deit3") {
        Variant::Deit3
    } else if arch.starts_with("deit") {
        Variant::Deit
    } else if arch.contains("dinov2") {
        Variant::Dinov2
    } else if arch.contains("siglip") {
        Variant::Siglip
    } else if arch.contains("clip") {
        Variant::Clip
    } else {
        Variant::Vit
    }
}

/// The position embedding's layout: how many leading prefix tokens it covers (one of
/// `candidates`) and its grid, from the stated grid when there is one, else the square grid
/// that fills it.
fn pos_layout(
    w: &Weights,
    facts: &TensorFacts,
    candidates: &[usize],
    stated: Option<(usize, usize)>,
) -> Result<(usize, (usize, usize))> {
    let t = facts.tokens;
    for &k in candidates {
        let Some(n) = t.checked_sub(k) else { continue };
        let grid = match stated {
            Some(g) if g.0 * g.1 == n => Some(g),
            Some(_) => None,
            None => {
                let g = (n as f64).sqrt().round() as usize;
                (g * g == n && g > 0).then_some((g, g))
            }
        };
        if let Some(g) = grid {
            return Ok((k, g));
        }
    }
    let k = candidates.first().copied().unwrap_or(0);
    Err(w.err(match stated {
        Some((gh, gw)) => format!(
            "tensor '{}' has {t} tokens but a {gh}x{gw} patch grid (input {}x{}, patch {}) with {k} prefix token(s) needs {}",
            w.source_name("pos_embed"),
            gh * facts.patch,
            gw * facts.patch,
            facts.patch,
            k + gh * gw
        ),
        None => format!(
            "tensor '{}' has {t} tokens, which is not {k} prefix token(s) and a square patch grid",
            w.source_name("pos_embed")
        ),
    }))
}


/// timm `model_args` of a `VisionTransformer` (the options vitcx reads; see
/// [`TIMM_ARGS_IGNORED`] for the rest it accepts).
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
    global_pool: Option<String>,
    class_token: Option<bool>,
    reg_tokens: Option<usize>,
    init_values: Option<f64>,
    no_embed_class: Option<bool>,
    pre_norm: Option<bool>,
    fc_norm: Option<bool>,
    final_norm: Option<bool>,
    qk_norm: Option<bool>,
    act_layer: Option<String>,
    dynamic_img_size: Option<bool>,
    dynamic_img_pad: Option<bool>,
    pos_embed: Option<String>,
}

/// `model_args` that change nothing at inference (dropout rates, initialisation).
const TIMM_ARGS_IGNORED: &[&str] = &[
    "drop_rate",
    "pos_drop_rate",
    "patch_drop_rate",
    "proj_drop_rate",
    "attn_drop_rate",
    "drop_path_rate",
    "weight_init",
    "fix_init",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
];

/// `model_args` that [`TimmArgs`] reads.
const TIMM_ARGS_READ: &[&str] = &[
    "embed_dim",
    "depth",
    "num_heads",
    "patch_size",
    "in_chans",
    "mlp_ratio",
    "num_classes",
    "img_size",
    "qkv_bias",
    "global_pool",
    "class_token",
    "reg_tokens",
    "init_values",
    "no_embed_class",
    "pre_norm",
    "fc_norm",
    "final_norm",
    "qk_norm",
    "act_layer",
    "dynamic_img_size",
    "dynamic_img_pad",
    "pos_embed",
];

/// `model_args` nested under its own name, so that a bad field is named `model_args.x`.
#[derive(Debug, Deserialize)]
struct ModelArgs {
    #[serde(default)]
    model_args: Option<TimmArgs>,
}

fn timm(ckpt: &Checkpoint, w: &Weights) -> Result<VitConfig> {
    let c: TimmConfig = ckpt.parse()?;
    let arch = c.architecture.clone();
    let base = arch.split('.').next().unwrap_or(&arch).to_string();
    if let Some((_, what)) = TIMM_REFUSED.iter().find(|(k, _)| base.contains(k)) {
        return Err(Error::Unsupported(format!("{arch}: {what}")));
    }
    if let Some(Value::Object(m)) = ckpt.config.get("model_args") {
        let mut unknown: Vec<&str> = m
            .keys()
            .map(String::as_str)
            .filter(|k| !TIMM_ARGS_READ.contains(k) && !TIMM_ARGS_IGNORED.contains(k))
            .collect();
        unknown.sort_unstable();
        if let Some(k) = unknown.first() {
            return Err(Error::Unsupported(format!(
                "{arch}: model_args.{k} = {} (vitcx implements timm's plain VisionTransformer options only)",
                m[*k]
            )));
        }
    }
    let args = ckpt.parse::<ModelArgs>()?.model_args.unwrap_or_default();
    let facts = TensorFacts::read(w)?;
    let mut notes = Vec::new();

    if let Some(p) = args.pos_embed.as_deref().filter(|p| *p != "learn") {
        return Err(Error::Unsupported(format!(
            "{arch}: model_args.pos_embed = '{p}' (only learned absolute position embeddings)"
        )));
    }
    if args.dynamic_img_pad == Some(true) {
        return Err(Error::Unsupported(format!(
            "{arch}: model_args.dynamic_img_pad = true (padding inputs to the patch size)"
        )));
    }
    check(ckpt, "model_args.in_chans", args.in_chans, 3, "{} input channels")?;
    check(ckpt, "model_args.embed_dim", args.embed_dim, facts.dim, "width {}")?;
    check(ckpt, "model_args.depth", args.depth, facts.depth, "{} blocks")?;
    check(ckpt, "model_args.patch_size", args.patch_size, facts.patch, "patch size {}")?;
    if let Some(r) = args.mlp_ratio {
        let stated = (r * facts.dim as f64).round() as usize;
        check(
            ckpt,
            "model_args.mlp_ratio x embed_dim",
            Some(stated),
            facts.mlp_dim,
            "mlp width {}",
        )?;
    }
    let stated_classes = c.num_classes.or(args.num_classes);
    check(ckpt, "num_classes", stated_classes, facts.num_classes, "{} classes")?;
    if facts.head_in != facts.dim {
        return Err(w.err(format!(
            "tensor 'head.weight' takes {} inputs, expected the width {}",
            facts.head_in, facts.dim
        )));
    }
    check_flag(ckpt, w, "model_args.qkv_bias", args.qkv_bias, facts.qkv_bias, "blocks.0.attn.qkv.bias")?;
    check_flag(ckpt, w, "model_args.class_token", args.class_token, facts.cls, "cls_token")?;
    check(ckpt, "model_args.reg_tokens", args.reg_tokens, facts.regs, "{} register tokens")?;
    check_flag(ckpt, w, "model_args.pre_norm", args.pre_norm, facts.pre_norm, "norm_pre.weight")?;
    check_flag(ckpt, w, "model_args.qk_norm", args.qk_norm, facts.qk_norm, "blocks.0.attn.q_norm.weight")?;
    let stated_ls = args.init_values.map(|v| v != 0.0);
    check_flag(ckpt, w, "model_args.init_values", stated_ls, facts.layer_scale, "blocks.0.ls1.gamma")?;
    if args.final_norm == Some(false) && (facts.final_norm || facts.fc_norm) {
        return Err(ckpt.config_err(format!(
            "config.json model_args.final_norm is false but the weights hold '{}'",
            if facts.final_norm { "norm.weight" } else { "fc_norm.weight" }
        )));
    }
    if facts.final_norm && facts.fc_norm {
        return Err(w.err(
            "the weights hold both 'norm.weight' and 'fc_norm.weight'; timm uses one or the other"
                .into(),
        ));
    }

    let pool_name = args
        .global_pool
        .clone()
        .or(c.global_pool.clone())
        .unwrap_or_else(|| if facts.attn_pool { "map".into() } else { "token".into() });
    let pool = match pool_name.as_str() {
        "token" if facts.cls => Pool::Token,
        "token" => {
            return Err(ckpt.config_err(
                "global_pool is 'token' but the model has no class token".into(),
            ))
        }
        "avg" => Pool::Avg,
        "max" => Pool::Max,
        "avgmax" => Pool::AvgMax,
        "map" => Pool::Map,
        other => {
            return Err(Error::Unsupported(format!(
                "{arch}: global_pool '{other}' (supported: token, avg, max, avgmax, map)"
            )))
        }
    };
    // timm: `fc_norm` (which replaces the final norm) defaults to true for avg/max pooling, but
    // architectures override it in code (SigLIP's `*_gap_*`: false); the tensors decide unless
    // the config states it.
    if let Some(stated) = args.fc_norm {
        if stated != facts.fc_norm || (stated && facts.final_norm) {
            let (want, held) = if stated { ("fc_norm", "norm") } else { ("norm", "fc_norm") };
            return Err(w.err(format!(
                "model_args.fc_norm is {stated}, so timm norms with '{want}', but the weights hold '{held}.weight'"
            )));
        }
    }
    if (pool == Pool::Map) != facts.attn_pool {
        return Err(w.err(format!(
            "global_pool is '{pool_name}' but the weights {} 'attn_pool.latent'",
            if facts.attn_pool { "hold" } else { "lack" }
        )));
    }
    if facts.has_head_dist != facts.dist {
        return Err(w.err(format!(
            "the weights hold {} but not {}",
            if facts.dist { "'dist_token'" } else { "'head_dist.weight'" },
            if facts.dist { "'head_dist.weight'" } else { "'dist_token'" },
        )));
    }
    if facts.dist && (facts.regs > 0 || pool != Pool::Token) {
        return Err(Error::Unsupported(format!(
            "{arch}: a distillation token with registers or '{pool_name}' pooling"
        )));
    }
    if !facts.dist && base.contains("distilled") {
        return Err(w.err(format!(
            "missing tensor 'dist_token' (architecture '{arch}' is distilled)"
        )));
    }

    let (eps, hidden_act) = timm_hidden_defaults(&arch);
    let act = match args.act_layer.as_deref() {
        None => hidden_act,
        Some(a) => Act::parse(a).ok_or_else(|| {
            Error::Unsupported(format!(
                "{arch}: model_args.act_layer = '{a}' (supported: gelu, quick_gelu, gelu_tanh)"
            ))
        })?,
    };

    let heads = match args.num_heads {
        Some(h) => h,
        None => {
            let (h, size) = standard_heads(&arch).ok_or_else(|| {
                ckpt.config_err(format!(
                    "model_args.num_heads missing and architecture '{arch}' names no standard size (tiny/small/medium/base/large/huge/so400m)"
                ))
            })?;
            notes.push(format!(
                "num_heads not in config.json; using {h}, the standard value for {}_{size}_*",
                arch.split('_').next().unwrap_or("vit")
            ));
            h
        }
    };
    if heads == 0 || facts.dim % heads != 0 {
        return Err(ckpt.config_err(format!(
            "num_heads {heads} does not divide the width {}",
            facts.dim
        )));
    }

    let prefix = facts.prefix();
    let n_prefix = prefix.len();
    let pcfg = c.pretrained_cfg.clone().unwrap_or_default();
    let built = args.img_size.map(|Size(h, w)| (h, w));
    let stated_grid = built.map(|s| grid_of(w, s, facts.patch)).transpose()?;
    // timm `no_embed_class`: the position embedding covers the patches only.
    let candidates: Vec<usize> = match args.no_embed_class {
        Some(true) => vec![0],
        Some(false) => vec![n_prefix],
        None => vec![n_prefix, 0],
    };
    let (pos_prefix, pos_grid) = match (stated_grid, pcfg.input_size) {
        (None, Some(Size(h, wd))) => {
            // The data config's size, when it fits the embedding; else a square grid.
            let g = grid_of(w, (h, wd), facts.patch)?;
            pos_layout(w, &facts, &candidates, Some(g))
                .or_else(|e| pos_layout(w, &facts, &candidates, None).map_err(|_| e))?
        }
        (g, _) => pos_layout(w, &facts, &candidates, g)?,
    };
    if built.is_none() && pcfg.input_size.is_none() {
        notes.push(format!(
            "input size not in config.json; using {}x{} from the position embeddings",
            pos_grid.0 * facts.patch,
            pos_grid.1 * facts.patch
        ));
    }
    let dynamic = args.dynamic_img_size == Some(true);
    let input_size = match pcfg.input_size {
        Some(Size(h, wd)) => (h, wd),
        None => (pos_grid.0 * facts.patch, pos_grid.1 * facts.patch),
    };
    let grid = grid_of(w, input_size, facts.patch)?;
    if grid != pos_grid && !dynamic {
        return Err(w.err(format!(
            "tensor '{}' has {} tokens but input {}x{} with patch {} and {} prefix token(s) needs {} (and model_args.dynamic_img_size is not true)",
            w.source_name("pos_embed"),
            facts.tokens,
            input_size.0,
            input_size.1,
            facts.patch,
            pos_prefix,
            pos_prefix + grid.0 * grid.1
        )));
    }

    let variant = timm_variant(&arch, facts.dist);
    let (def_mean, def_std) = match variant {
        Variant::Deit | Variant::DeitDistilled | Variant::Deit3 | Variant::Dinov2 => {
            (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        }
        Variant::Clip => (CLIP_MEAN, CLIP_STD),
        Variant::Vit | Variant::Siglip => (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD),
    };
    if pcfg.mean.is_none() || pcfg.std.is_none() {
        notes.push(format!(
            "mean/std not in config.json pretrained_cfg; using timm's default for {arch}: {def_mean:?} / {def_std:?}"
        ));
    }
    let labels = timm_labels(&ckpt.config_path, c.label_names.as_deref(), facts.num_classes)?;
    // timm's eval transform: shortest edge to floor(size / crop_pct), then a centre crop.
    let (resize_shortest, crop) = match pcfg.crop_pct {
        Some(p) if p > 0.0 && input_size.0 == input_size.1 => (
            Some((input_size.0 as f64 / p).floor() as usize),
            Some(input_size),
        ),
        _ => (None, None),
    };

    Ok(VitConfig {
        format: Format::Timm,
        variant,
        architecture: arch,
        dim: facts.dim,
        depth: facts.depth,
        heads,
        mlp_dim: facts.mlp_dim,
        patch: facts.patch,
        input_size,
        num_classes: facts.num_classes,
        prefix,
        pos_prefix,
        pos_grid,
        resample: Resample::Antialiased,
        dynamic,
        patch_bias: facts.patch_bias,
        qkv_bias: facts.qkv_bias,
        pre_norm: facts.pre_norm,
        final_norm: facts.final_norm,
        fc_norm: facts.fc_norm,
        pool,
        layer_scale: facts.layer_scale,
        qk_norm: facts.qk_norm,
        act,
        layer_norm_eps: eps,
        preprocess: Preprocess {
            mean: pcfg.mean.unwrap_or(def_mean),
            std: pcfg.std.unwrap_or(def_std),
            input_size,
            interpolation: pcfg.interpolation,
            crop_pct: pcfg.crop_pct,
            resize_shortest,
            crop,
        },
        labels,
        notes,
    })
}

/// The image-tower fields of a Hugging Face ViT, DeiT, DINOv2, CLIP or SigLIP config (CLIP and
/// SigLIP nest them under `vision_config`).
#[derive(Debug, Default, Deserialize)]
struct HfVision {
    hidden_act: Option<String>,
    num_channels: Option<usize>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    intermediate_size: Option<usize>,
    mlp_ratio: Option<f64>,
    patch_size: Option<usize>,
    num_attention_heads: Option<usize>,
    qkv_bias: Option<bool>,
    layer_norm_eps: Option<f64>,
    image_size: Option<Size>,
    num_register_tokens: Option<usize>,
    use_swiglu_ffn: Option<bool>,
}

/// A Hugging Face `config.json`: the common fields and the image tower's.
#[derive(Debug, Deserialize)]
struct HfVitConfig {
    #[serde(flatten)]
    common: HfConfig,
    #[serde(flatten)]
    vision: HfVision,
    #[serde(default)]
    vision_config: Option<HfVision>,
}

/// transformers' defaults for a model type: (heads, LayerNorm eps, act, image size, patch).
fn hf_defaults(model_type: &str) -> (usize, f64, &'static str, usize, usize) {
    match model_type {
        "dinov2" | "dinov2_with_registers" => (12, 1e-6, "gelu", 224, 14),
        "clip" => (12, 1e-5, "quick_gelu", 224, 32),
        "siglip" => (12, 1e-6, "gelu_pytorch_tanh", 224, 16),
        _ => (12, 1e-12, "gelu", 224, 16),
    }
}

fn hf(ckpt: &Checkpoint, w: &Weights) -> Result<VitConfig> {
    let c: HfVitConfig = ckpt.parse()?;
    let pre: Option<HfPreprocessor> = ckpt.parse_preprocessor()?;
    let model_type = c.common.model_type.clone();
    let nested = matches!(model_type.as_str(), "clip" | "siglip");
    let (v, field) = if nested {
        (c.vision_config.unwrap_or_default(), "vision_config.")
    } else {
        (c.vision, "")
    };
    let f = |name: &str| format!("{field}{name}");
    let mut notes = Vec::new();
    let architecture = c.common.architecture();
    let (def_heads, def_eps, def_act, def_image, def_patch) = hf_defaults(&model_type);
    if v.use_swiglu_ffn == Some(true) {
        return Err(Error::Unsupported(format!(
            "{architecture}: use_swiglu_ffn = true (a gated MLP, DINOv2 giant)"
        )));
    }
    let act_name = v.hidden_act.clone().unwrap_or_else(|| def_act.to_string());
    let act = Act::parse(&act_name).ok_or_else(|| {
        Error::Unsupported(format!(
            "{}hidden_act '{act_name}' (supported: gelu, quick_gelu, gelu_pytorch_tanh, gelu_new)",
            field
        ))
    })?;
    let facts = TensorFacts::read(w)?;
    check(ckpt, &f("num_channels"), v.num_channels, 3, "{} input channels")?;
    check(ckpt, &f("hidden_size"), v.hidden_size, facts.dim, "width {}")?;
    check(ckpt, &f("num_hidden_layers"), v.num_hidden_layers, facts.depth, "{} layers")?;
    check(ckpt, &f("intermediate_size"), v.intermediate_size, facts.mlp_dim, "mlp width {}")?;
    if let Some(r) = v.mlp_ratio {
        let stated = (r * facts.dim as f64).round() as usize;
        check(ckpt, &f("mlp_ratio x hidden_size"), Some(stated), facts.mlp_dim, "mlp width {}")?;
    }
    check(ckpt, &f("patch_size"), v.patch_size, facts.patch, "patch size {}")?;
    if v.patch_size.is_none() && facts.patch != def_patch {
        notes.push(format!(
            "patch_size not in config.json; using {} from the weights",
            facts.patch
        ));
    }
    let heads = match v.num_attention_heads {
        Some(h) => h,
        None => {
            notes.push(format!(
                "num_attention_heads not in config.json; using {def_heads}, transformers' default"
            ));
            def_heads
        }
    };
    if heads == 0 || facts.dim % heads != 0 {
        return Err(ckpt.config_err(format!(
            "num_attention_heads {heads} does not divide hidden_size {}",
            facts.dim
        )));
    }
    let qkv_stated = v.qkv_bias.or(nested.then_some(true));
    check_flag(ckpt, w, &f("qkv_bias"), qkv_stated, facts.qkv_bias, "blocks.0.attn.qkv.bias")?;
    let layer_norm_eps = match v.layer_norm_eps {
        Some(e) => e,
        None => {
            notes.push(format!(
                "layer_norm_eps not in config.json; using {def_eps:e}, transformers' default for {model_type}"
            ));
            def_eps
        }
    };
    let expect = |what: &str, ok: bool| -> Result<()> {
        if ok {
            Ok(())
        } else {
            Err(w.err(format!("{model_type} checkpoint: {what}")))
        }
    };

    // The token layout and head of each model type.
    let (variant, pool, dynamic) = match model_type.as_str() {
        "vit" | "deit" => {
            let variant = match (model_type.as_str(), facts.dist, facts.has_head_dist) {
                ("vit", false, false) => Variant::Vit,
                ("vit", _, _) => {
                    return Err(ckpt.config_err(
                        "model_type 'vit' but the weights hold a distillation token or head (use model_type 'deit')"
                            .into(),
                    ))
                }
                (_, false, _) => {
                    return Err(w.err(format!("missing tensor '{}'", w.source_name("dist_token"))))
                }
                (_, true, true) => Variant::DeitDistilled,
                (_, true, false) => {
                    if architecture.ends_with("WithTeacher") {
                        return Err(w.err("missing tensor 'distillation_classifier.weight'".into()));
                    }
                    Variant::Deit
                }
            };
            expect("missing the [CLS] token", facts.cls)?;
            (variant, Pool::Token, false)
        }
        "dinov2" | "dinov2_with_registers" => {
            expect("missing the [CLS] token", facts.cls)?;
            let regs = v.num_register_tokens.unwrap_or(0);
            check(ckpt, "num_register_tokens", Some(regs), facts.regs, "{} register tokens")?;
            (Variant::Dinov2, Pool::ClsAndMean, true)
        }
        "clip" => {
            expect("missing the class embedding", facts.cls)?;
            (Variant::Clip, Pool::Avg, false)
        }
        "siglip" => (Variant::Siglip, Pool::Avg, false),
        other => {
            return Err(Error::Unsupported(format!("Hugging Face model_type '{other}'")))
        }
    };
    let want_head_in = if pool == Pool::ClsAndMean { 2 * facts.dim } else { facts.dim };
    if facts.head_in != want_head_in {
        return Err(w.err(format!(
            "tensor '{}' takes {} inputs, expected {want_head_in}",
            w.source_name("head.weight"),
            facts.head_in
        )));
    }
    let prefix = facts.prefix();
    // Registers carry no position embedding in transformers; [CLS] and [DIST] do.
    let pos_prefix_candidates = [prefix.len() - facts.regs];
    let stated = Some(hf_image_size(v.image_size, def_image, &mut notes));
    let stated_grid = stated.map(|s| grid_of(w, s, facts.patch)).transpose()?;
    let (pos_prefix, pos_grid) = pos_layout(w, &facts, &pos_prefix_candidates, stated_grid)?;
    let built = (pos_grid.0 * facts.patch, pos_grid.1 * facts.patch);

    let (def_mean, def_std) = match variant {
        Variant::Deit | Variant::DeitDistilled | Variant::Dinov2 => {
            (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        }
        Variant::Clip => (CLIP_MEAN, CLIP_STD),
        _ => (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD),
    };
    let pre = HfPreprocessing::read(pre.as_ref(), ckpt.preprocessor.as_ref().map(|(_, v)| v), &mut notes);
    let mut input_size = built;
    match pre.seen {
        // DINOv2 interpolates its position embedding to whatever the processor gives.
        Some(seen) if dynamic && seen != built => {
            grid_of(w, seen, facts.patch)?;
            input_size = seen;
        }
        _ => pre.note_other_size(built, &mut notes),
    }
    pre.note_missing_stats(
        &format!("the {model_type} image processor default {def_mean:?} / {def_std:?}"),
        &mut notes,
    );
    let HfPreprocessing {
        mean,
        std,
        interpolation,
        crop,
        resize_shortest,
        ..
    } = pre;
    let labels = hf_labels(
        &ckpt.config_path,
        c.common.id2label.as_ref(),
        facts.num_classes,
        &w.source_name("head.weight"),
    )?;

    Ok(VitConfig {
        format: Format::HuggingFace,
        variant,
        architecture,
        dim: facts.dim,
        depth: facts.depth,
        heads,
        mlp_dim: facts.mlp_dim,
        patch: facts.patch,
        input_size,
        num_classes: facts.num_classes,
        prefix,
        pos_prefix,
        pos_grid,
        resample: if model_type == "dinov2_with_registers" {
            Resample::Antialiased
        } else {
            Resample::Plain
        },
        dynamic,
        patch_bias: facts.patch_bias,
        qkv_bias: facts.qkv_bias,
        pre_norm: facts.pre_norm,
        final_norm: facts.final_norm,
        fc_norm: facts.fc_norm,
        pool,
        layer_scale: facts.layer_scale,
        qk_norm: facts.qk_norm,
        act,
        layer_norm_eps,
        preprocess: Preprocess {
            mean: mean.unwrap_or(def_mean),
            std: std.unwrap_or(def_std),
            input_size,
            interpolation,
            crop_pct: None,
            resize_shortest,
            crop,
        },
        labels,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_heads_from_names() {
        assert_eq!(standard_heads("vit_tiny_patch16_224"), Some((3, "tiny")));
        assert_eq!(
            standard_heads("deit_small_distilled_patch16_224"),
            Some((6, "small"))
        );
        assert_eq!(
            standard_heads("vit_base_patch16_224.augreg_in21k"),
            Some((12, "base"))
        );
        assert_eq!(standard_heads("vit_large_patch16_224"), Some((16, "large")));
        assert_eq!(standard_heads("vit_huge_patch14_224"), Some((16, "huge")));
        assert_eq!(
            standard_heads("vit_medium_patch16_gap_256"),
            Some((8, "medium"))
        );
        assert_eq!(standard_heads("vit_betwixt_patch16_gap_256"), None);
    }
}
