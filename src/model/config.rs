//! Model configuration: what a timm or Hugging Face checkpoint's config files say, checked
//! against the shapes of its tensors.
//!
//! Tensor shapes are the ground truth for sizes (width, depth, patch, classes, token count); the
//! config files supply what shapes cannot tell (heads, LayerNorm eps, preprocessing, labels) and
//! every size they state must agree with the tensors, or loading fails naming the field.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use super::weights::Weights;
use crate::error::{Error, Result};

/// Model family detected from a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Family {
    /// Vision Transformer with one \[CLS\] token.
    Vit,
    /// DeiT without a distillation head: timm `deit_*` (identical to ViT, one \[CLS\] token), or
    /// Hugging Face `deit` without teacher (\[CLS\] + \[DIST\] tokens, classifier on \[CLS\] only).
    Deit,
    /// DeiT with \[CLS\] and \[DIST\] tokens and the two heads averaged.
    DeitDistilled,
}

/// Checkpoint layout the model was loaded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Format {
    /// timm: `config.json` with `architecture`, tensors named `blocks.N.attn.qkv`, ...
    Timm,
    /// Hugging Face transformers: `config.json` with `model_type`, tensors named
    /// `vit.encoder.layer.N.attention.attention.query`, ...
    HuggingFace,
}

/// Preprocessing the checkpoint was trained with.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Preprocess {
    /// Per-channel mean (RGB) subtracted after scaling to [0, 1].
    pub mean: [f32; 3],
    /// Per-channel std (RGB) divided by after subtracting the mean.
    pub std: [f32; 3],
    /// Input size `(H, W)`.
    pub input_size: (usize, usize),
}

/// Everything read from a checkpoint's configuration files, checked against its tensors.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    /// Checkpoint layout.
    pub format: Format,
    /// Model family (decides prefix tokens and heads).
    pub family: Family,
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
    /// Class names, one per output (`class_<i>` where the checkpoint has none).
    pub labels: Vec<String>,
    /// Values that were assumed rather than read, for the user to check.
    pub notes: Vec<String>,
}

const IMAGENET_DEFAULT_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_DEFAULT_STD: [f32; 3] = [0.229, 0.224, 0.225];
const IMAGENET_INCEPTION_MEAN: [f32; 3] = [0.5, 0.5, 0.5];
const IMAGENET_INCEPTION_STD: [f32; 3] = [0.5, 0.5, 0.5];

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
        let bad = |name: &str, dims: &[usize], expected: &str| Error::Checkpoint {
            path: w.path().to_path_buf(),
            reason: format!(
                "tensor '{}' has shape {dims:?}, expected {expected}",
                w.source_name(name)
            ),
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
        let depth = w.block_count()?;
        if depth == 0 {
            return Err(Error::Checkpoint {
                path: w.path().to_path_buf(),
                reason: format!(
                    "no transformer blocks found (no '{}')",
                    w.source_name("blocks.0.norm1.weight")
                ),
            });
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

/// Reads a JSON file.
pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_json(path, &text)
}

/// Parses JSON read from `path` (a file, or the name of an in-memory buffer).
pub(crate) fn parse_json(path: &Path, bytes: &[u8]) -> Result<Value> {
    serde_json::from_slice(bytes).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        reason: format!("invalid json: {e}"),
    })
}

/// Tells the checkpoint format from `config.json`: `model_type` means Hugging Face,
/// `architecture` means timm.
pub(crate) fn detect_format(config_path: &Path, v: &Value) -> Result<Format> {
    if v.get("model_type").is_some() {
        Ok(Format::HuggingFace)
    } else if v.get("architecture").is_some() {
        Ok(Format::Timm)
    } else {
        Err(Error::Checkpoint {
            path: config_path.to_path_buf(),
            reason: "neither 'model_type' (Hugging Face) nor 'architecture' (timm) in config.json"
                .into(),
        })
    }
}

/// Builds the model configuration from `config.json` (and for Hugging Face the optional
/// `preprocessor_config.json`), checked against the tensors in `w`.
pub(crate) fn build(
    format: Format,
    config_path: &Path,
    v: &Value,
    preprocessor: Option<(&Path, &Value)>,
    w: &Weights,
) -> Result<ModelConfig> {
    match format {
        Format::Timm => timm(Cfg::new(config_path, v), w),
        Format::HuggingFace => {
            // model_type first: an unknown model's tensors would only give a confusing error.
            let model_type = Cfg::new(config_path, v)
                .str("model_type")?
                .unwrap_or_default();
            if model_type != "vit" && model_type != "deit" {
                return Err(Error::Unsupported(format!(
                    "model_type '{model_type}' in {} (supported: vit, deit)",
                    config_path.display()
                )));
            }
            hf(
                Cfg::new(config_path, v),
                preprocessor.map(|(p, v)| Cfg::new(p, v)),
                &model_type,
                w,
            )
        }
    }
}

/// A JSON object with typed getters whose errors name the file and field.
struct Cfg<'a> {
    path: &'a Path,
    v: &'a Value,
}

impl<'a> Cfg<'a> {
    fn new(path: &'a Path, v: &'a Value) -> Self {
        Cfg { path, v }
    }

    fn sub(&self, key: &str) -> Option<Cfg<'a>> {
        self.v
            .get(key)
            .filter(|v| v.is_object())
            .map(|v| Cfg { path: self.path, v })
    }

    fn err(&self, reason: String) -> Error {
        Error::Checkpoint {
            path: self.path.to_path_buf(),
            reason,
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.v.get(key).filter(|v| !v.is_null())
    }

    /// Field `key` converted by `conv`; `None` when absent, an error naming the field and
    /// `expected` when present with the wrong type.
    fn typed<T>(
        &self,
        key: &str,
        expected: &str,
        conv: impl Fn(&serde_json::Value) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(x) => conv(x)
                .map(Some)
                .ok_or_else(|| self.err(format!("field '{key}' is {x}, expected {expected}"))),
        }
    }

    fn usize(&self, key: &str) -> Result<Option<usize>> {
        self.typed(key, "an integer", |x| x.as_u64().map(|n| n as usize))
    }

    fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a number", |x| x.as_f64())
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "true or false", |x| x.as_bool())
    }

    fn str(&self, key: &str) -> Result<Option<String>> {
        self.typed(key, "a string", |x| x.as_str().map(str::to_string))
    }

    /// Three floats (mean / std).
    fn triple(&self, key: &str) -> Result<Option<[f32; 3]>> {
        let Some(x) = self.get(key) else {
            return Ok(None);
        };
        let vals: Option<Vec<f64>> = x
            .as_array()
            .map(|a| a.iter().filter_map(|e| e.as_f64()).collect());
        match vals {
            Some(v) if v.len() == 3 => Ok(Some([v[0] as f32, v[1] as f32, v[2] as f32])),
            _ => Err(self.err(format!("field '{key}' is {x}, expected 3 numbers"))),
        }
    }

    /// A size given as an int (square), `[H, W]`, `[C, H, W]` or `{height, width}`.
    fn size(&self, key: &str) -> Result<Option<(usize, usize)>> {
        let Some(x) = self.get(key) else {
            return Ok(None);
        };
        let bad = || self.err(format!("field '{key}' is {x}, expected a size"));
        if let Some(n) = x.as_u64() {
            return Ok(Some((n as usize, n as usize)));
        }
        if let Some(a) = x.as_array() {
            let n: Vec<usize> = a
                .iter()
                .filter_map(|e| e.as_u64())
                .map(|e| e as usize)
                .collect();
            return match n.as_slice() {
                [h, w] | [_, h, w] if n.len() == a.len() => Ok(Some((*h, *w))),
                _ => Err(bad()),
            };
        }
        if x.is_object() {
            let (h, w) = (x.get("height"), x.get("width"));
            if let (Some(h), Some(w)) = (h.and_then(|h| h.as_u64()), w.and_then(|w| w.as_u64())) {
                return Ok(Some((h as usize, w as usize)));
            }
            if let Some(s) = x.get("shortest_edge").and_then(|s| s.as_u64()) {
                return Ok(Some((s as usize, s as usize)));
            }
        }
        Err(bad())
    }

    /// Fails unless the config's `field` (when present) equals the tensors' `actual`; `what`
    /// describes the tensors' value, `{}` standing for it (e.g. `"{} blocks"`).
    fn check(&self, field: &str, stated: Option<usize>, actual: usize, what: &str) -> Result<()> {
        match stated {
            Some(s) if s != actual => Err(self.err(format!(
                "config.json {field} is {s} but the weights have {}",
                what.replace("{}", &actual.to_string())
            ))),
            _ => Ok(()),
        }
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
        return Err(Error::Checkpoint {
            path: w.path().to_path_buf(),
            reason: format!("input size {h}x{wd} is not a positive multiple of the patch size {p}"),
        });
    }
    let need = prefix + (h / p) * (wd / p);
    if need != facts.tokens {
        return Err(Error::Checkpoint {
            path: w.path().to_path_buf(),
            reason: format!(
                "tensor '{}' has {} tokens but input {h}x{wd} with patch {p} and {prefix} prefix token(s) needs {need}",
                w.source_name("pos_embed"),
                facts.tokens
            ),
        });
    }
    Ok(())
}

/// The square input size whose patch grid fills `pos_embed`, if any.
fn square_input(facts: &TensorFacts, prefix: usize) -> Option<(usize, usize)> {
    let n = facts.tokens.checked_sub(prefix)?;
    let g = (n as f64).sqrt().round() as usize;
    (g * g == n && g > 0).then_some((g * facts.patch, g * facts.patch))
}

fn default_labels(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("class_{i}")).collect()
}

fn timm(c: Cfg, w: &Weights) -> Result<ModelConfig> {
    let facts = TensorFacts::read(w)?;
    let mut notes = Vec::new();
    let arch = c
        .str("architecture")?
        .ok_or_else(|| c.err("missing field 'architecture'".into()))?;
    let empty = Value::Object(Default::default());
    let args = c.sub("model_args").unwrap_or(Cfg::new(c.path, &empty));

    // Variants of timm's VisionTransformer this model does not implement.
    let pool = args.str("global_pool")?.or(c.str("global_pool")?);
    if let Some(pool) = pool.filter(|p| p != "token") {
        return Err(Error::Unsupported(format!(
            "{arch}: global_pool '{pool}' (only 'token' pooling on [CLS] is supported)"
        )));
    }
    for (key, what) in [
        (
            "no_embed_class",
            "position embeddings without prefix tokens",
        ),
        ("pre_norm", "pre-norm (CLIP-style norm_pre)"),
        ("fc_norm", "fc_norm pooling"),
        ("qk_norm", "qk_norm attention"),
    ] {
        if args.bool(key)? == Some(true) {
            return Err(Error::Unsupported(format!("{arch}: {key} = true ({what})")));
        }
    }
    if args.bool("class_token")? == Some(false) {
        return Err(Error::Unsupported(format!(
            "{arch}: class_token = false (models without a [CLS] token)"
        )));
    }
    if args.usize("reg_tokens")?.unwrap_or(0) > 0 {
        return Err(Error::Unsupported(format!(
            "{arch}: register tokens (reg_tokens)"
        )));
    }
    if args.f64("init_values")?.is_some_and(|v| v != 0.0) {
        return Err(Error::Unsupported(format!(
            "{arch}: layer scale (init_values)"
        )));
    }

    args.check(
        "model_args.embed_dim",
        args.usize("embed_dim")?,
        facts.dim,
        "width {}",
    )?;
    args.check(
        "model_args.depth",
        args.usize("depth")?,
        facts.depth,
        "{} blocks",
    )?;
    args.check(
        "model_args.patch_size",
        args.usize("patch_size")?,
        facts.patch,
        "patch size {}",
    )?;
    if let Some(r) = args.f64("mlp_ratio")? {
        let stated = (r * facts.dim as f64).round() as usize;
        args.check(
            "model_args.mlp_ratio x embed_dim",
            Some(stated),
            facts.mlp_dim,
            "mlp width {}",
        )?;
    }
    let stated_classes = c.usize("num_classes")?.or(args.usize("num_classes")?);
    c.check(
        "num_classes",
        stated_classes,
        facts.num_classes,
        "{} classes",
    )?;
    let qkv_bias = args.bool("qkv_bias")?.unwrap_or(true);
    if qkv_bias != facts.qkv_bias {
        return Err(c.err(format!(
            "config.json model_args.qkv_bias is {qkv_bias} but the weights {} 'blocks.0.attn.qkv.bias'",
            if facts.qkv_bias { "hold" } else { "lack" }
        )));
    }
    let heads = match args.usize("num_heads")? {
        Some(h) => h,
        None => {
            let (h, size) = standard_heads(&arch).ok_or_else(|| {
                c.err(format!(
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
        return Err(c.err(format!(
            "num_heads {heads} does not divide the width {}",
            facts.dim
        )));
    }

    let is_deit = arch.starts_with("deit");
    let family = if facts.has_dist {
        Family::DeitDistilled
    } else if arch.contains("distilled") {
        // A distilled architecture without its [DIST] token.
        return Err(Error::Checkpoint {
            path: w.path().to_path_buf(),
            reason: format!("missing tensor 'dist_token' (architecture '{arch}' is distilled)"),
        });
    } else if is_deit {
        Family::Deit
    } else {
        Family::Vit
    };
    let prefix = 1 + usize::from(facts.has_dist);

    let pcfg = c.sub("pretrained_cfg");
    let stated_input = match &pcfg {
        Some(p) => p.size("input_size")?,
        None => None,
    }
    .or(args.size("img_size")?);
    let input_size = match stated_input {
        Some(s) => s,
        None => {
            let s = square_input(&facts, prefix).ok_or_else(|| {
                c.err("no pretrained_cfg.input_size and pos_embed is not a square grid".into())
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
    let mean = pcfg
        .as_ref()
        .map(|p| p.triple("mean"))
        .transpose()?
        .flatten();
    let std = pcfg
        .as_ref()
        .map(|p| p.triple("std"))
        .transpose()?
        .flatten();
    if mean.is_none() || std.is_none() {
        notes.push(format!(
            "mean/std not in config.json pretrained_cfg; using timm's default for {arch}: {def_mean:?} / {def_std:?}"
        ));
    }
    let labels = match c.get("label_names") {
        Some(Value::Array(a)) => {
            let l: Vec<String> = a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| x.to_string())
                })
                .collect();
            if l.len() != facts.num_classes {
                return Err(c.err(format!(
                    "config.json label_names has {} names but the head has {} classes",
                    l.len(),
                    facts.num_classes
                )));
            }
            l
        }
        _ => default_labels(facts.num_classes),
    };

    Ok(ModelConfig {
        format: Format::Timm,
        family,
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
            mean: mean.unwrap_or(def_mean),
            std: std.unwrap_or(def_std),
            input_size,
        },
        labels,
        notes,
    })
}

fn hf(c: Cfg, pre: Option<Cfg>, model_type: &str, w: &Weights) -> Result<ModelConfig> {
    let facts = TensorFacts::read(w)?;
    let mut notes = Vec::new();
    let architecture = match c.get("architectures").and_then(|a| a.get(0)) {
        Some(a) => a.as_str().unwrap_or(model_type).to_string(),
        None => model_type.to_string(),
    };
    if let Some(act) = c.str("hidden_act")?.filter(|a| a != "gelu") {
        return Err(Error::Unsupported(format!(
            "hidden_act '{act}' (only exact 'gelu' is supported)"
        )));
    }
    c.check(
        "num_channels",
        c.usize("num_channels")?,
        3,
        "{} input channels",
    )?;
    c.check(
        "hidden_size",
        c.usize("hidden_size")?,
        facts.dim,
        "width {}",
    )?;
    c.check(
        "num_hidden_layers",
        c.usize("num_hidden_layers")?,
        facts.depth,
        "{} layers",
    )?;
    c.check(
        "intermediate_size",
        c.usize("intermediate_size")?,
        facts.mlp_dim,
        "mlp width {}",
    )?;
    c.check(
        "patch_size",
        c.usize("patch_size")?,
        facts.patch,
        "patch size {}",
    )?;
    let heads = match c.usize("num_attention_heads")? {
        Some(h) => h,
        None => {
            notes.push(
                "num_attention_heads not in config.json; using 12, transformers' default".into(),
            );
            12
        }
    };
    if heads == 0 || facts.dim % heads != 0 {
        return Err(c.err(format!(
            "num_attention_heads {heads} does not divide hidden_size {}",
            facts.dim
        )));
    }
    let qkv_bias = c.bool("qkv_bias")?.unwrap_or(true);
    if qkv_bias != facts.qkv_bias {
        return Err(c.err(format!(
            "config.json qkv_bias is {qkv_bias} but the weights {} '{}'",
            if facts.qkv_bias { "hold" } else { "lack" },
            w.source_name("blocks.0.attn.qkv.bias")
        )));
    }
    let layer_norm_eps = match c.f64("layer_norm_eps")? {
        Some(e) => e,
        None => {
            notes.push(
                "layer_norm_eps not in config.json; using 1e-12, transformers' default".into(),
            );
            1e-12
        }
    };

    let family = match (model_type, facts.has_dist, facts.has_head_dist) {
        ("vit", false, false) => Family::Vit,
        ("vit", _, _) => {
            return Err(c.err(
                "model_type 'vit' but the weights hold a distillation token or head (use model_type 'deit')"
                    .into(),
            ))
        }
        (_, false, _) => {
            return Err(Error::Checkpoint {
                path: w.path().to_path_buf(),
                reason: format!("missing tensor '{}'", w.source_name("dist_token")),
            })
        }
        (_, true, true) => Family::DeitDistilled,
        (_, true, false) => {
            if architecture.ends_with("WithTeacher") {
                return Err(Error::Checkpoint {
                    path: w.path().to_path_buf(),
                    reason: "missing tensor 'distillation_classifier.weight'".into(),
                });
            }
            Family::Deit
        }
    };
    let prefix = 1 + usize::from(facts.has_dist);

    let input_size = match c.size("image_size")? {
        Some(s) => s,
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
    let (mut mean, mut std) = (None, None);
    match &pre {
        Some(p) => {
            mean = p.triple("image_mean")?;
            std = p.triple("image_std")?;
            let crop = if p.bool("do_center_crop")?.unwrap_or(false) {
                p.size("crop_size")?
            } else {
                None
            };
            if let Some(s) = crop.or(p.size("size")?).filter(|s| *s != input_size) {
                notes.push(format!(
                    "preprocessor_config.json resizes to {}x{} but the model takes {}x{}; using {}x{}",
                    s.0, s.1, input_size.0, input_size.1, input_size.0, input_size.1
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

    let labels = match c.get("id2label").and_then(|m| m.as_object()) {
        Some(map) => {
            if map.len() != facts.num_classes {
                return Err(c.err(format!(
                    "config.json id2label has {} labels but '{}' has {} rows",
                    map.len(),
                    w.source_name("head.weight"),
                    facts.num_classes
                )));
            }
            let mut labels = default_labels(facts.num_classes);
            for (k, v) in map {
                let i: usize = k
                    .parse()
                    .ok()
                    .filter(|i| *i < facts.num_classes)
                    .ok_or_else(|| {
                        c.err(format!(
                            "id2label key '{k}' is not a class index below {}",
                            facts.num_classes
                        ))
                    })?;
                labels[i] = v
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string());
            }
            labels
        }
        None => default_labels(facts.num_classes),
    };

    Ok(ModelConfig {
        format: Format::HuggingFace,
        family,
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

    #[test]
    fn sizes_in_all_spellings() {
        let v = serde_json::json!({
            "a": 224, "b": [3, 256, 192], "c": [384, 320], "d": {"height": 240, "width": 200},
            "e": {"shortest_edge": 256}, "f": "big", "g": [1, 2, 3, 4]
        });
        let c = Cfg::new(Path::new("config.json"), &v);
        assert_eq!(c.size("a").unwrap(), Some((224, 224)));
        assert_eq!(c.size("b").unwrap(), Some((256, 192)));
        assert_eq!(c.size("c").unwrap(), Some((384, 320)));
        assert_eq!(c.size("d").unwrap(), Some((240, 200)));
        assert_eq!(c.size("e").unwrap(), Some((256, 256)));
        assert_eq!(c.size("missing").unwrap(), None);
        for bad in ["f", "g"] {
            match c.size(bad) {
                Err(Error::Checkpoint { reason, .. }) => {
                    assert!(reason.contains(&format!("field '{bad}'")), "{reason}")
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn typed_getters_name_the_field() {
        let v = serde_json::json!({"depth": "four", "eps": 1e-6, "mean": [0.5, 0.5]});
        let c = Cfg::new(Path::new("config.json"), &v);
        match c.usize("depth") {
            Err(Error::Checkpoint { reason, .. }) => {
                assert_eq!(reason, "field 'depth' is \"four\", expected an integer")
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(c.f64("eps").unwrap(), Some(1e-6));
        assert!(c.triple("mean").is_err());
        assert!(c
            .check("model_args.depth", Some(4), 3, "{} blocks")
            .is_err_and(|e| e
                .to_string()
                .contains("model_args.depth is 4 but the weights have 3 blocks")));
        assert!(c.check("model_args.depth", None, 3, "{} blocks").is_ok());
    }

    #[test]
    fn format_detection() {
        let p = Path::new("config.json");
        let hf = serde_json::json!({"model_type": "vit"});
        let timm = serde_json::json!({"architecture": "vit_tiny_patch16_224"});
        assert_eq!(detect_format(p, &hf).unwrap(), Format::HuggingFace);
        assert_eq!(detect_format(p, &timm).unwrap(), Format::Timm);
        assert!(detect_format(p, &serde_json::json!({})).is_err());
    }
}
