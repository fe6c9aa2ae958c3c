//! The ViT family's configuration: what a timm or Hugging Face ViT/DeiT checkpoint's config files
//! say, read into typed structs and checked against the shapes of its tensors.
//!
//! Tensor shapes are the ground truth for sizes (width, depth, patch, classes, token count); the
//! config files supply what shapes cannot tell (heads, LayerNorm eps, preprocessing, labels) and
//! every size they state must agree with the tensors, or loading fails naming the field.

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::checkpoint::Checkpoint;
use crate::model::config::{
    hf_labels, timm_labels, Format, HfConfig, HfPreprocessor, Preprocess, Size, TimmConfig,
    IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD,
};
use crate::model::weights::Weights;

/// Which ViT the checkpoint holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Vision Transformer with one \[CLS\] token.
    Vit,
    /// DeiT without a distillation head: timm `deit_*` (identical to ViT, one \[CLS\] token), or
    /// Hugging Face `deit` without teacher (\[CLS\] + \[DIST\] tokens, classifier on \[CLS\] only).
    Deit,
    /// DeiT with \[CLS\] and \[DIST\] tokens and the two heads averaged.
    DeitDistilled,
}

impl Variant {
    /// The name reports use (`Vit`, `Deit`, `DeitDistilled`).
    pub fn name(self) -> &'static str {
        match self {
            Variant::Vit => "Vit",
            Variant::Deit => "Deit",
            Variant::DeitDistilled => "DeitDistilled",
        }
    }
}

/// Everything read from a ViT checkpoint's configuration files, checked against its tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct VitConfig {
    /// Checkpoint layout.
    pub format: Format,
    /// Which ViT (decides prefix tokens and heads).
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
    /// Input size `(H, W)` the position embeddings were built for.
    pub input_size: (usize, usize),
    /// Number of output classes.
    pub num_classes: usize,
    /// Tokens before the patch tokens (\[CLS\], \[DIST\]).
    pub num_prefix_tokens: usize,
    /// LayerNorm epsilon (timm 1e-6, Hugging Face `layer_norm_eps`, default 1e-12).
    pub layer_norm_eps: f64,
    /// Whether the attention's qkv projection has a bias.
    pub qkv_bias: bool,
    /// How to preprocess images for this model.
    pub preprocess: Preprocess,
    /// Class names, one per output.
    pub labels: Vec<String>,
    /// Values that were assumed rather than read, for the user to check.
    pub notes: Vec<String>,
}

/// timm `model_args` of a `VisionTransformer` (the options vitcx reads or refuses).
#[derive(Debug, Default, Deserialize)]
struct TimmArgs {
    embed_dim: Option<usize>,
    depth: Option<usize>,
    num_heads: Option<usize>,
    patch_size: Option<usize>,
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
    qk_norm: Option<bool>,
}

/// Hugging Face `ViTConfig` / `DeiTConfig` (the fields vitcx reads).
#[derive(Debug, Deserialize)]
struct HfVitConfig {
    #[serde(flatten)]
    common: HfConfig,
    hidden_act: Option<String>,
    num_channels: Option<usize>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    intermediate_size: Option<usize>,
    patch_size: Option<usize>,
    num_attention_heads: Option<usize>,
    qkv_bias: Option<bool>,
    layer_norm_eps: Option<f64>,
    image_size: Option<Size>,
}

/// Sizes read off the tensors (timm names).
#[derive(Debug, Clone)]
struct TensorFacts {
    dim: usize,
    depth: usize,
    patch: usize,
    mlp_dim: usize,
    num_classes: usize,
    /// Tokens in `pos_embed` (prefix + patches).
    tokens: usize,
    has_dist: bool,
    has_head_dist: bool,
    qkv_bias: bool,
}

impl TensorFacts {
    fn read(w: &Weights) -> Result<Self> {
        let bad = |name: &str, dims: &[usize], expected: &str| {
            w.err(format!(
                "tensor '{}' has shape {dims:?}, expected {expected}",
                w.source_name(name)
            ))
        };
        let dim = match w.dims("cls_token")? {
            [1, 1, d] => *d,
            d => return Err(bad("cls_token", d, "[1, 1, dim]")),
        };
        let patch = match w.dims("patch_embed.proj.weight")? {
            [d, 3, p, q] if *d == dim && p == q => *p,
            d => {
                return Err(bad(
                    "patch_embed.proj.weight",
                    d,
                    &format!("[{dim}, 3, p, p]"),
                ))
            }
        };
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
        let num_classes = match w.dims("head.weight")? {
            [c, d] if *d == dim => *c,
            d => return Err(bad("head.weight", d, &format!("[num_classes, {dim}]"))),
        };
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
            tokens,
            has_dist: w.contains("dist_token"),
            has_head_dist: w.contains("head_dist.weight"),
            qkv_bias: w.contains("blocks.0.attn.qkv.bias"),
        })
    }
}

/// Fails unless the config's `field` (when present) equals the tensors' `actual`; `what`
/// describes the tensors' value, `{}` standing for it (e.g. `"{} blocks"`).
fn check(
    ckpt: &Checkpoint,
    field: &str,
    stated: Option<usize>,
    actual: usize,
    what: &str,
) -> Result<()> {
    match stated {
        Some(s) if s != actual => Err(ckpt.config_err(format!(
            "config.json {field} is {s} but the weights have {}",
            what.replace("{}", &actual.to_string())
        ))),
        _ => Ok(()),
    }
}

/// The configuration of `ckpt`, checked against its tensors `w` (timm names).
pub(crate) fn read(ckpt: &Checkpoint, w: &Weights) -> Result<VitConfig> {
    match ckpt.format {
        Format::Timm => timm(ckpt, w),
        Format::HuggingFace => hf(ckpt, w),
    }
}

/// Standard head count for a timm architecture name's size word.
fn standard_heads(arch: &str) -> Option<(usize, &'static str)> {
    arch.split(['_', '.', '-']).find_map(|w| match w {
        "tiny" => Some((3, "tiny")),
        "small" => Some((6, "small")),
        "base" => Some((12, "base")),
        "large" => Some((16, "large")),
        "huge" => Some((16, "huge")),
        _ => None,
    })
}

/// Fails unless the patch grid at `input` plus the prefix tokens matches `pos_embed`.
fn grid_check(
    w: &Weights,
    facts: &TensorFacts,
    input: (usize, usize),
    prefix: usize,
) -> Result<()> {
    let (h, wd) = input;
    let p = facts.patch;
    if h % p != 0 || wd % p != 0 || h == 0 || wd == 0 {
        return Err(w.err(format!(
            "input size {h}x{wd} is not a positive multiple of the patch size {p}"
        )));
    }
    let need = prefix + (h / p) * (wd / p);
    if need != facts.tokens {
        return Err(w.err(format!(
            "tensor '{}' has {} tokens but input {h}x{wd} with patch {p} and {prefix} prefix token(s) needs {need}",
            w.source_name("pos_embed"),
            facts.tokens
        )));
    }
    Ok(())
}

/// The square input size whose patch grid fills `pos_embed`, if any.
fn square_input(facts: &TensorFacts, prefix: usize) -> Option<(usize, usize)> {
    let n = facts.tokens.checked_sub(prefix)?;
    let g = (n as f64).sqrt().round() as usize;
    (g * g == n && g > 0).then_some((g * facts.patch, g * facts.patch))
}

fn timm(ckpt: &Checkpoint, w: &Weights) -> Result<VitConfig> {
    let c: TimmConfig = ckpt.parse()?;
    let args = ckpt.parse::<ModelArgs>()?.model_args.unwrap_or_default();
    let facts = TensorFacts::read(w)?;
    let mut notes = Vec::new();
    let arch = c.architecture.clone();

    // Variants of timm's VisionTransformer this model does not implement.
    let pool = args.global_pool.clone().or(c.global_pool.clone());
    if let Some(pool) = pool.filter(|p| p != "token") {
        return Err(Error::Unsupported(format!(
            "{arch}: global_pool '{pool}' (only 'token' pooling on [CLS] is supported)"
        )));
    }
    for (on, key, what) in [
        (
            args.no_embed_class,
            "no_embed_class",
            "position embeddings without prefix tokens",
        ),
        (args.pre_norm, "pre_norm", "pre-norm (CLIP-style norm_pre)"),
        (args.fc_norm, "fc_norm", "fc_norm pooling"),
        (args.qk_norm, "qk_norm", "qk_norm attention"),
    ] {
        if on == Some(true) {
            return Err(Error::Unsupported(format!("{arch}: {key} = true ({what})")));
        }
    }
    if args.class_token == Some(false) {
        return Err(Error::Unsupported(format!(
            "{arch}: class_token = false (models without a [CLS] token)"
        )));
    }
    if args.reg_tokens.unwrap_or(0) > 0 {
        return Err(Error::Unsupported(format!(
            "{arch}: register tokens (reg_tokens)"
        )));
    }
    if args.init_values.is_some_and(|v| v != 0.0) {
        return Err(Error::Unsupported(format!(
            "{arch}: layer scale (init_values)"
        )));
    }

    check(
        ckpt,
        "model_args.embed_dim",
        args.embed_dim,
        facts.dim,
        "width {}",
    )?;
    check(
        ckpt,
        "model_args.depth",
        args.depth,
        facts.depth,
        "{} blocks",
    )?;
    check(
        ckpt,
        "model_args.patch_size",
        args.patch_size,
        facts.patch,
        "patch size {}",
    )?;
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
    check(
        ckpt,
        "num_classes",
        stated_classes,
        facts.num_classes,
        "{} classes",
    )?;
    let qkv_bias = args.qkv_bias.unwrap_or(true);
    if qkv_bias != facts.qkv_bias {
        return Err(ckpt.config_err(format!(
            "config.json model_args.qkv_bias is {qkv_bias} but the weights {} 'blocks.0.attn.qkv.bias'",
            if facts.qkv_bias { "hold" } else { "lack" }
        )));
    }
    let heads = match args.num_heads {
        Some(h) => h,
        None => {
            let (h, size) = standard_heads(&arch).ok_or_else(|| {
                ckpt.config_err(format!(
                    "model_args.num_heads missing and architecture '{arch}' names no standard size (tiny/small/base/large/huge)"
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

    let is_deit = arch.starts_with("deit");
    let variant = if facts.has_dist {
        Variant::DeitDistilled
    } else if arch.contains("distilled") {
        // A distilled architecture without its [DIST] token.
        return Err(w.err(format!(
            "missing tensor 'dist_token' (architecture '{arch}' is distilled)"
        )));
    } else if is_deit {
        Variant::Deit
    } else {
        Variant::Vit
    };
    let prefix = 1 + usize::from(facts.has_dist);

    let pcfg = c.pretrained_cfg.clone().unwrap_or_default();
    let stated_input = pcfg.input_size.or(args.img_size).map(|Size(h, w)| (h, w));
    let input_size = match stated_input {
        Some(s) => s,
        None => {
            let s = square_input(&facts, prefix).ok_or_else(|| {
                ckpt.config_err(
                    "no pretrained_cfg.input_size and pos_embed is not a square grid".into(),
                )
            })?;
            notes.push(format!(
                "input size not in config.json; using {}x{} from the position embeddings",
                s.0, s.1
            ));
            s
        }
    };
    grid_check(w, &facts, input_size, prefix)?;

    let (def_mean, def_std) = if is_deit {
        (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    } else {
        (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD)
    };
    if pcfg.mean.is_none() || pcfg.std.is_none() {
        notes.push(format!(
            "mean/std not in config.json pretrained_cfg; using timm's default for {arch}: {def_mean:?} / {def_std:?}"
        ));
    }
    let labels = timm_labels(
        &ckpt.config_path,
        c.label_names.as_deref(),
        facts.num_classes,
    )?;

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
        num_prefix_tokens: prefix,
        // timm's VisionTransformer builds its norms with partial(nn.LayerNorm, eps=1e-6).
        layer_norm_eps: 1e-6,
        qkv_bias,
        preprocess: Preprocess {
            mean: pcfg.mean.unwrap_or(def_mean),
            std: pcfg.std.unwrap_or(def_std),
            input_size,
            interpolation: pcfg.interpolation,
            crop_pct: pcfg.crop_pct,
        },
        labels,
        notes,
    })
}

/// `model_args` nested under its own name, so that a bad field is named `model_args.x`.
#[derive(Debug, Deserialize)]
struct ModelArgs {
    #[serde(default)]
    model_args: Option<TimmArgs>,
}

fn hf(ckpt: &Checkpoint, w: &Weights) -> Result<VitConfig> {
    let c: HfVitConfig = ckpt.parse()?;
    let pre: Option<HfPreprocessor> = ckpt.parse_preprocessor()?;
    let model_type = c.common.model_type.clone();
    let facts = TensorFacts::read(w)?;
    let mut notes = Vec::new();
    let architecture = c.common.architecture();
    if let Some(act) = c.hidden_act.as_deref().filter(|a| *a != "gelu") {
        return Err(Error::Unsupported(format!(
            "hidden_act '{act}' (only exact 'gelu' is supported)"
        )));
    }
    check(ckpt, "num_channels", c.num_channels, 3, "{} input channels")?;
    check(ckpt, "hidden_size", c.hidden_size, facts.dim, "width {}")?;
    check(
        ckpt,
        "num_hidden_layers",
        c.num_hidden_layers,
        facts.depth,
        "{} layers",
    )?;
    check(
        ckpt,
        "intermediate_size",
        c.intermediate_size,
        facts.mlp_dim,
        "mlp width {}",
    )?;
    check(
        ckpt,
        "patch_size",
        c.patch_size,
        facts.patch,
        "patch size {}",
    )?;
    let heads = match c.num_attention_heads {
        Some(h) => h,
        None => {
            notes.push(
                "num_attention_heads not in config.json; using 12, transformers' default".into(),
            );
            12
        }
    };
    if heads == 0 || facts.dim % heads != 0 {
        return Err(ckpt.config_err(format!(
            "num_attention_heads {heads} does not divide hidden_size {}",
            facts.dim
        )));
    }
    let qkv_bias = c.qkv_bias.unwrap_or(true);
    if qkv_bias != facts.qkv_bias {
        return Err(ckpt.config_err(format!(
            "config.json qkv_bias is {qkv_bias} but the weights {} '{}'",
            if facts.qkv_bias { "hold" } else { "lack" },
            w.source_name("blocks.0.attn.qkv.bias")
        )));
    }
    let layer_norm_eps = match c.layer_norm_eps {
        Some(e) => e,
        None => {
            notes.push(
                "layer_norm_eps not in config.json; using 1e-12, transformers' default".into(),
            );
            1e-12
        }
    };

    let variant = match (model_type.as_str(), facts.has_dist, facts.has_head_dist) {
        ("vit", false, false) => Variant::Vit,
        ("vit", _, _) => {
            return Err(ckpt.config_err(
                "model_type 'vit' but the weights hold a distillation token or head (use model_type 'deit')"
                    .into(),
            ))
        }
        (_, false, _) => {
            return Err(w.err(format!(
                "missing tensor '{}'",
                w.source_name("dist_token")
            )))
        }
        (_, true, true) => Variant::DeitDistilled,
        (_, true, false) => {
            if architecture.ends_with("WithTeacher") {
                return Err(w.err("missing tensor 'distillation_classifier.weight'".into()));
            }
            Variant::Deit
        }
    };
    let prefix = 1 + usize::from(facts.has_dist);

    let input_size = match c.image_size {
        Some(Size(h, w)) => (h, w),
        None => {
            notes.push("image_size not in config.json; using 224, transformers' default".into());
            (224, 224)
        }
    };
    grid_check(w, &facts, input_size, prefix)?;

    let (def_mean, def_std) = if model_type == "deit" {
        (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    } else {
        (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD)
    };
    let (mut mean, mut std, mut interpolation) = (None, None, None);
    match &pre {
        Some(p) => {
            mean = p.image_mean;
            std = p.image_std;
            interpolation = p.interpolation();
            let crop = if p.do_center_crop.unwrap_or(false) {
                p.crop_size
            } else {
                None
            };
            if let Some(Size(h, w)) = crop.or(p.size).filter(|s| (s.0, s.1) != input_size) {
                notes.push(format!(
                    "preprocessor_config.json resizes to {h}x{w} but the model takes {}x{}; using {}x{}",
                    input_size.0, input_size.1, input_size.0, input_size.1
                ));
            }
        }
        None => notes.push("no preprocessor_config.json".into()),
    }
    if mean.is_none() || std.is_none() {
        notes.push(format!(
            "image_mean/image_std not given; using the {model_type} image processor default {def_mean:?} / {def_std:?}"
        ));
    }
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
        num_prefix_tokens: prefix,
        layer_norm_eps,
        qkv_bias,
        preprocess: Preprocess {
            mean: mean.unwrap_or(def_mean),
            std: std.unwrap_or(def_std),
            input_size,
            interpolation,
            crop_pct: None,
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
        assert_eq!(standard_heads("vit_medium_patch16_gap_256"), None);
    }
}
