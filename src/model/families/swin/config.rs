//! The Swin family's configuration: what a timm or Hugging Face Swin checkpoint says, read into
//! typed structs and checked against its tensors.
//!
//! The tensors decide the structure: the width (`patch_embed.proj`), the stages and their blocks,
//! each stage's width (doubling at each merge), each block's heads (the columns of its relative
//! position bias table) and MLP width. The config files add the window size (else the first
//! stage's table tells it), the LayerNorm eps, preprocessing and labels; every size they state
//! must agree with the tensors.

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::checkpoint::Checkpoint;
use crate::model::config::{
    hf_image_size, hf_labels, timm_labels, Format, HfConfig, HfPreprocessing, HfPreprocessor, Preprocess, Size, TimmConfig,
    IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD,
};
use crate::model::weights::Weights;

/// LayerNorm eps of timm's `nn.LayerNorm` and of the norms transformers builds without
/// `layer_norm_eps` (patch embedding, patch merging).
pub const TORCH_LAYER_NORM_EPS: f64 = 1e-5;

/// One stage: its blocks run at one grid and width.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    /// Token width.
    pub dim: usize,
    /// Blocks in the stage.
    pub depth: usize,
    /// Attention heads of each block.
    pub heads: usize,
    /// The token grid `(gh, gw)` of the stage's blocks.
    pub grid: (usize, usize),
    /// The window `(wh, ww)` its blocks attend within (the configured window, shrunk to the grid
    /// where the grid is smaller, as timm and transformers do).
    pub window: (usize, usize),
    /// The cyclic shift `(sh, sw)` of its odd blocks (0 where the window covers the grid).
    pub shift: (usize, usize),
}

impl Stage {
    /// Windows per image.
    pub fn windows(&self) -> usize {
        (self.grid.0 / self.window.0) * (self.grid.1 / self.window.1)
    }
}

/// Everything read from a Swin checkpoint's configuration files, checked against its tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct SwinConfig {
    /// Checkpoint layout.
    pub format: Format,
    /// timm `architecture`, or Hugging Face `architectures[0]` (else `model_type`).
    pub architecture: String,
    /// Patch side in pixels.
    pub patch: usize,
    /// The configured window `(wh, ww)` (each stage may shrink it, [`Stage::window`]).
    pub window: (usize, usize),
    /// The stages in order.
    pub stages: Vec<Stage>,
    /// Input size `(H, W)` the model runs at.
    pub input_size: (usize, usize),
    /// Number of output classes.
    pub num_classes: usize,
    /// Whether the qkv projections have a bias.
    pub qkv_bias: bool,
    /// LayerNorm eps of the blocks and the final norm (the patch embedding's and the merges'
    /// norms use PyTorch's default, 1e-5).
    pub layer_norm_eps: f64,
    /// How to preprocess images for this model.
    pub preprocess: Preprocess,
    /// Class names, one per output.
    pub labels: Vec<String>,
    /// Values that were assumed rather than read, for the user to check.
    pub notes: Vec<String>,
}

impl SwinConfig {
    /// Blocks over all stages (what `--layer` counts).
    pub fn depth(&self) -> usize {
        self.stages.iter().map(|s| s.depth).sum()
    }
}

/// Structure read off the tensors (timm names): per stage (width, blocks, heads).
struct Facts {
    patch: usize,
    stages: Vec<(usize, usize, usize)>,
    /// Rows of the first block's relative position table.
    table_rows: usize,
    num_classes: usize,
    qkv_bias: bool,
}

impl Facts {
    fn read(w: &Weights) -> Result<Self> {
        let bad = |name: &str, dims: &[usize], expected: &str| {
            w.err(format!(
                "tensor '{}' has shape {dims:?}, expected {expected}",
                w.source_name(name)
            ))
        };
        let (dim0, patch) = match w.dims("patch_embed.proj.weight")? {
            [d, 3, p, q] if p == q && *d > 0 && *p > 0 => (*d, *p),
            d => return Err(bad("patch_embed.proj.weight", d, "[dim, 3, p, p]")),
        };
        if w.contains("absolute_pos_embed") {
            return Err(Error::Unsupported(format!(
                "an absolute position embedding ('{}', use_absolute_embeddings); vitcx's Swin has only the relative position bias",
                w.source_name("absolute_pos_embed")
            )));
        }
        let n_stages = w.layer_count("layers.", "blocks.0.norm1.weight")?;
        if n_stages == 0 {
            return Err(w.err(format!(
                "no Swin stages found (no '{}')",
                w.source_name("layers.0.blocks.0.norm1.weight")
            )));
        }
        let mut stages = Vec::with_capacity(n_stages);
        let mut dim = dim0;
        let mut table_rows = 0;
        for s in 0..n_stages {
            if s > 0 {
                let r = format!("layers.{s}.downsample.reduction.weight");
                dim = match w.dims(&r)? {
                    [o, i] if *i == 4 * dim && *o > 0 => *o,
                    d => return Err(bad(&r, d, &format!("[out, {}]", 4 * dim))),
                };
            }
            let depth = w.layer_count(&format!("layers.{s}.blocks."), "norm1.weight")?;
            let t = format!("layers.{s}.blocks.0.attn.relative_position_bias_table");
            let (rows, heads) = match w.dims(&t)? {
                [r, h] if *r > 0 && *h > 0 && dim % h == 0 => (*r, *h),
                d => return Err(bad(&t, d, &format!("[(2w-1)^2, heads dividing {dim}]"))),
            };
            if s == 0 {
                table_rows = rows;
            }
            stages.push((dim, depth, heads));
        }
        let num_classes = match w.dims("head.fc.weight")? {
            [c, k] if *c > 0 && *k == dim => *c,
            d => {
                return Err(bad(
                    "head.fc.weight",
                    d,
                    &format!("[num_classes > 0, {dim}]"),
                ))
            }
        };
        Ok(Facts {
            patch,
            stages,
            table_rows,
            num_classes,
            qkv_bias: w.contains("layers.0.blocks.0.attn.qkv.bias"),
        })
    }
}

/// A window size as timm and transformers write it: one integer, or `[h, w]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
enum Window {
    Square(usize),
    Rect([usize; 2]),
}

impl Window {
    fn hw(self) -> (usize, usize) {
        match self {
            Window::Square(n) => (n, n),
            Window::Rect([h, w]) => (h, w),
        }
    }
}

/// Fails unless the config's `field` (when present) equals the tensors' `actual`.
fn check<T: PartialEq + std::fmt::Debug>(
    ckpt: &Checkpoint,
    field: &str,
    stated: Option<T>,
    actual: T,
) -> Result<()> {
    match stated {
        Some(s) if s != actual => Err(ckpt.config_err(format!(
            "config.json {field} is {s:?} but the weights have {actual:?}"
        ))),
        _ => Ok(()),
    }
}

/// timm `model_args` of a `SwinTransformer` (those that change the model).
#[derive(Debug, Default, Deserialize)]
struct TimmArgs {
    img_size: Option<Size>,
    patch_size: Option<usize>,
    in_chans: Option<usize>,
    num_classes: Option<usize>,
    global_pool: Option<String>,
    embed_dim: Option<usize>,
    depths: Option<Vec<usize>>,
    num_heads: Option<Vec<usize>>,
    head_dim: Option<usize>,
    window_size: Option<Window>,
    always_partition: Option<bool>,
    mlp_ratio: Option<f64>,
    qkv_bias: Option<bool>,
}

/// `model_args` that [`TimmArgs`] reads, and those that change nothing at inference.
const TIMM_ARGS_KNOWN: &[&str] = &[
    "img_size",
    "patch_size",
    "in_chans",
    "num_classes",
    "global_pool",
    "embed_dim",
    "depths",
    "num_heads",
    "head_dim",
    "window_size",
    "always_partition",
    "mlp_ratio",
    "qkv_bias",
    "strict_img_size",
    "dynamic_img_size",
    "drop_rate",
    "proj_drop_rate",
    "attn_drop_rate",
    "drop_path_rate",
    "weight_init",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
];

#[derive(Debug, Deserialize)]
struct ModelArgs {
    #[serde(default)]
    model_args: Option<TimmArgs>,
}

/// The Hugging Face `SwinConfig` fields vitcx reads.
#[derive(Debug, Deserialize)]
struct HfSwin {
    #[serde(flatten)]
    common: HfConfig,
    image_size: Option<Size>,
    patch_size: Option<usize>,
    num_channels: Option<usize>,
    embed_dim: Option<usize>,
    depths: Option<Vec<usize>>,
    num_heads: Option<Vec<usize>>,
    window_size: Option<usize>,
    mlp_ratio: Option<f64>,
    qkv_bias: Option<bool>,
    hidden_act: Option<String>,
    use_absolute_embeddings: Option<bool>,
    layer_norm_eps: Option<f64>,
}

/// The configuration of `ckpt`, checked against its tensors `w` (timm names).
pub(crate) fn read(ckpt: &Checkpoint, w: &Weights) -> Result<SwinConfig> {
    let facts = Facts::read(w)?;
    let mut cfg = match ckpt.format {
        Format::Timm => timm(ckpt, w, &facts)?,
        Format::HuggingFace => hf(ckpt, w, &facts)?,
    };
    if let Some(size) = ckpt.input_size.filter(|s| *s != cfg.input_size) {
        cfg.notes.push(format!(
            "input size {}x{} asked for instead of {}x{}; attention masks rebuilt for its grids",
            size.0, size.1, cfg.input_size.0, cfg.input_size.1
        ));
        let pre = &mut cfg.preprocess;
        if let (Some(e), Some((ch, _))) = (pre.resize_shortest, pre.crop) {
            pre.resize_shortest = Some((e as f64 * size.0 as f64 / ch as f64).floor() as usize);
            pre.crop = Some(size);
        }
        pre.input_size = size;
        cfg.input_size = size;
    }
    cfg.stages = stages(ckpt.format, w, &facts, cfg.input_size, cfg.window)?;
    let path = match (&ckpt.preprocessor, cfg.format) {
        (Some((p, _)), Format::HuggingFace) => p.as_path(),
        _ => ckpt.config_path.as_path(),
    };
    cfg.preprocess.check(path)?;
    Ok(cfg)
}

/// Each stage's grid, window and shift at input size `size`, as timm (or transformers) builds
/// them: the grid halves (rounding up) at each merge, and a window larger than the grid shrinks
/// to it and stops shifting. A grid that the window does not tile is refused: timm and
/// transformers pad it, in different orders, and vitcx implements neither.
fn stages(
    format: Format,
    w: &Weights,
    facts: &Facts,
    size: (usize, usize),
    window: (usize, usize),
) -> Result<Vec<Stage>> {
    let p = facts.patch;
    if !size.0.is_multiple_of(p) || !size.1.is_multiple_of(p) || size.0 == 0 || size.1 == 0 {
        return Err(Error::invalid(format!(
            "input size {}x{} is not a positive multiple of the patch size {p}",
            size.0, size.1
        )));
    }
    let mut grid = (size.0 / p, size.1 / p);
    let mut out = Vec::with_capacity(facts.stages.len());
    for (s, &(dim, depth, heads)) in facts.stages.iter().enumerate() {
        if s > 0 {
            grid = (grid.0.div_ceil(2), grid.1.div_ceil(2));
        }
        let (gh, gw) = grid;
        let (win, shift) = match format {
            Format::Timm => {
                let clamp = |g: usize, w: usize| if g <= w { (g, 0) } else { (w, w / 2) };
                let ((wh, sh), (ww, sw)) = (clamp(gh, window.0), clamp(gw, window.1));
                ((wh, ww), (sh, sw))
            }
            Format::HuggingFace => {
                let m = gh.min(gw);
                if m < window.0 {
                    return Err(Error::Unsupported(format!(
                        "input size {}x{}: stage {s} has a {gh}x{gw} grid, smaller than the {}x{} window (transformers' Swin fails there too)",
                        size.0, size.1, window.0, window.0
                    )));
                }
                if m == window.0 {
                    ((m, m), (0, 0))
                } else {
                    (window, (window.0 / 2, window.1 / 2))
                }
            }
        };
        if gh % win.0 != 0 || gw % win.1 != 0 {
            return Err(Error::Unsupported(format!(
                "input size {}x{}: stage {s} has a {gh}x{gw} grid, which {}x{} windows do not tile (timm and transformers pad it; vitcx does not); choose a size whose stage grids are multiples of the window",
                size.0, size.1, win.0, win.1
            )));
        }
        let rows = (2 * win.0 - 1) * (2 * win.1 - 1);
        for j in 0..depth {
            let t = format!("layers.{s}.blocks.{j}.attn.relative_position_bias_table");
            match w.dims(&t)? {
                [r, h] if *r == rows && *h == heads => {}
                [r, h] if *h == heads => {
                    return Err(Error::Unsupported(format!(
                        "tensor '{}' has {r} rows (a window of another size) but stage {s} at input {}x{} attends within {}x{} windows, which need {rows}; vitcx does not resize the table",
                        w.source_name(&t),
                        size.0,
                        size.1,
                        win.0,
                        win.1
                    )))
                }
                d => {
                    return Err(w.err(format!(
                        "tensor '{}' has shape {d:?}, expected [{rows}, {heads}]",
                        w.source_name(&t)
                    )))
                }
            }
        }
        out.push(Stage {
            dim,
            depth,
            heads,
            grid,
            window: win,
            shift,
        });
    }
    Ok(out)
}

/// The square window whose table has `rows` rows, `(2w - 1)^2`.
fn window_of_table(rows: usize) -> Option<usize> {
    let side = (rows as f64).sqrt().round() as usize;
    (side * side == rows && side % 2 == 1).then_some(side.div_ceil(2))
}

/// The window from the config, else from the first stage's table (square).
fn window(
    w: &Weights,
    facts: &Facts,
    stated: Option<(usize, usize)>,
    notes: &mut Vec<String>,
) -> Result<(usize, usize)> {
    match stated {
        Some((h, wd)) if h > 0 && wd > 0 => Ok((h, wd)),
        Some(s) => Err(w.err(format!("window size {s:?} must be positive"))),
        None => {
            let n = window_of_table(facts.table_rows).ok_or_else(|| {
                w.err(format!(
                    "window size not in config.json, and '{}' has {} rows, not (2w-1)^2",
                    w.source_name("layers.0.blocks.0.attn.relative_position_bias_table"),
                    facts.table_rows
                ))
            })?;
            notes.push(format!(
                "window size not in config.json; using {n}x{n} from the first stage's relative position table"
            ));
            Ok((n, n))
        }
    }
}

/// The configured sizes checked against the tensors' per-stage facts.
fn check_stages(
    ckpt: &Checkpoint,
    facts: &Facts,
    prefix: &str,
    embed_dim: Option<usize>,
    depths: Option<Vec<usize>>,
    heads: Option<Vec<usize>>,
) -> Result<()> {
    check(ckpt, &format!("{prefix}embed_dim"), embed_dim, facts.stages[0].0)?;
    let actual: Vec<usize> = facts.stages.iter().map(|s| s.1).collect();
    check(ckpt, &format!("{prefix}depths"), depths, actual)?;
    let actual: Vec<usize> = facts.stages.iter().map(|s| s.2).collect();
    check(ckpt, &format!("{prefix}num_heads"), heads, actual)?;
    Ok(())
}

/// Fails unless a stated `mlp_ratio` gives each block's MLP width.
fn check_mlp(ckpt: &Checkpoint, w: &Weights, facts: &Facts, ratio: Option<f64>) -> Result<()> {
    let Some(r) = ratio else { return Ok(()) };
    for (s, &(dim, _, _)) in facts.stages.iter().enumerate() {
        let name = format!("layers.{s}.blocks.0.mlp.fc1.weight");
        let want = (r * dim as f64) as usize;
        match w.dims(&name)? {
            [m, d] if *m == want && *d == dim => {}
            d => {
                return Err(ckpt.config_err(format!(
                    "config.json mlp_ratio is {r} but '{}' has shape {d:?} (expected [{want}, {dim}])",
                    w.source_name(&name)
                )))
            }
        }
    }
    Ok(())
}

fn timm(ckpt: &Checkpoint, w: &Weights, facts: &Facts) -> Result<SwinConfig> {
    let c: TimmConfig = ckpt.parse()?;
    let arch = c.architecture.clone();
    if let Some(Value::Object(m)) = ckpt.config.get("model_args") {
        let mut unknown: Vec<&str> = m
            .keys()
            .map(String::as_str)
            .filter(|k| !TIMM_ARGS_KNOWN.contains(k))
            .collect();
        unknown.sort_unstable();
        if let Some(k) = unknown.first() {
            return Err(Error::Unsupported(format!(
                "{arch}: model_args.{k} = {} (vitcx implements timm's SwinTransformer defaults for it)",
                m[*k]
            )));
        }
    }
    let args = ckpt.parse::<ModelArgs>()?.model_args.unwrap_or_default();
    let mut notes = Vec::new();
    check(ckpt, "model_args.in_chans", args.in_chans, 3)?;
    check(ckpt, "model_args.patch_size", args.patch_size, facts.patch)?;
    check_stages(ckpt, facts, "model_args.", args.embed_dim, args.depths, args.num_heads)?;
    check_mlp(ckpt, w, facts, args.mlp_ratio)?;
    check(ckpt, "model_args.qkv_bias", args.qkv_bias, facts.qkv_bias)?;
    check(ckpt, "num_classes", c.num_classes.or(args.num_classes), facts.num_classes)?;
    if let Some(hd) = args.head_dim {
        for (s, &(dim, _, heads)) in facts.stages.iter().enumerate() {
            if hd * heads != dim {
                return Err(Error::Unsupported(format!(
                    "{arch}: model_args.head_dim = {hd}: stage {s} would attend in {} channels, not its width {dim}",
                    hd * heads
                )));
            }
        }
    }
    if args.always_partition == Some(true) {
        return Err(Error::Unsupported(format!(
            "{arch}: model_args.always_partition = true (windows larger than the grid)"
        )));
    }
    let pool = args.global_pool.or(c.global_pool).unwrap_or_else(|| "avg".into());
    if pool != "avg" {
        return Err(Error::Unsupported(format!(
            "{arch}: global_pool '{pool}' (vitcx's Swin averages the last stage's tokens, timm's default 'avg')"
        )));
    }
    let win = window(w, facts, args.window_size.map(Window::hw), &mut notes)?;
    let pcfg = c.pretrained_cfg.clone().unwrap_or_default();
    let input_size = match (pcfg.input_size, args.img_size) {
        (Some(Size(h, wd)), _) => (h, wd),
        (None, Some(Size(h, wd))) => (h, wd),
        (None, None) => {
            notes.push("input size not in config.json; using 224x224, timm's default".into());
            (224, 224)
        }
    };
    if pcfg.mean.is_none() || pcfg.std.is_none() {
        notes.push(format!(
            "mean/std not in config.json pretrained_cfg; using timm's default for Swin: {IMAGENET_DEFAULT_MEAN:?} / {IMAGENET_DEFAULT_STD:?}"
        ));
    }
    let labels = timm_labels(&ckpt.config_path, c.label_names.as_deref(), facts.num_classes)?;
    let (resize_shortest, crop) = match pcfg.crop_pct {
        Some(p) if p > 0.0 && input_size.0 == input_size.1 => (
            Some((input_size.0 as f64 / p).floor() as usize),
            Some(input_size),
        ),
        _ => (None, None),
    };
    Ok(SwinConfig {
        format: Format::Timm,
        architecture: arch,
        patch: facts.patch,
        window: win,
        stages: Vec::new(),
        input_size,
        num_classes: facts.num_classes,
        qkv_bias: facts.qkv_bias,
        layer_norm_eps: TORCH_LAYER_NORM_EPS,
        preprocess: Preprocess {
            mean: pcfg.mean.unwrap_or(IMAGENET_DEFAULT_MEAN),
            std: pcfg.std.unwrap_or(IMAGENET_DEFAULT_STD),
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

fn hf(ckpt: &Checkpoint, w: &Weights, facts: &Facts) -> Result<SwinConfig> {
    let c: HfSwin = ckpt.parse()?;
    let pre: Option<HfPreprocessor> = ckpt.parse_preprocessor()?;
    let architecture = c.common.architecture();
    let mut notes = Vec::new();
    if c.use_absolute_embeddings == Some(true) {
        return Err(Error::Unsupported(format!(
            "{architecture}: use_absolute_embeddings = true (an absolute position embedding)"
        )));
    }
    if let Some(a) = c.hidden_act.as_deref().filter(|a| *a != "gelu") {
        return Err(Error::Unsupported(format!(
            "{architecture}: hidden_act '{a}' (vitcx's Swin has exact GELU)"
        )));
    }
    check(ckpt, "num_channels", c.num_channels, 3)?;
    check(ckpt, "patch_size", c.patch_size, facts.patch)?;
    check_stages(ckpt, facts, "", c.embed_dim, c.depths, c.num_heads)?;
    check_mlp(ckpt, w, facts, c.mlp_ratio)?;
    check(ckpt, "qkv_bias", c.qkv_bias, facts.qkv_bias)?;
    let win = window(w, facts, c.window_size.map(|n| (n, n)), &mut notes)?;
    let layer_norm_eps = c.layer_norm_eps.unwrap_or_else(|| {
        notes.push("layer_norm_eps not in config.json; using 1e-5, transformers' default".into());
        TORCH_LAYER_NORM_EPS
    });
    let input_size = hf_image_size(c.image_size, 224, &mut notes);
    let pre = HfPreprocessing::read(pre.as_ref(), ckpt.preprocessor.as_ref().map(|(_, v)| v), &mut notes);
    pre.note_other_size(input_size, &mut notes);
    pre.note_missing_stats(
        &format!("ImageNet's {IMAGENET_DEFAULT_MEAN:?} / {IMAGENET_DEFAULT_STD:?}"),
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
        &w.source_name("head.fc.weight"),
    )?;
    Ok(SwinConfig {
        format: Format::HuggingFace,
        architecture,
        patch: facts.patch,
        window: win,
        stages: Vec::new(),
        input_size,
        num_classes: facts.num_classes,
        qkv_bias: facts.qkv_bias,
        layer_norm_eps,
        preprocess: Preprocess {
            mean: mean.unwrap_or(IMAGENET_DEFAULT_MEAN),
            std: std.unwrap_or(IMAGENET_DEFAULT_STD),
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
    fn window_from_table_rows() {
        assert_eq!(window_of_table(169), Some(7));
        assert_eq!(window_of_table(529), Some(12));
        assert_eq!(window_of_table(1), Some(1));
        assert_eq!(window_of_table(168), None);
        assert_eq!(window_of_table(16), None);
    }
}
