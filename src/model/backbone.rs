//! The seam between models and explanation methods: the [`Backbone`] trait and what it says
//! about a model ([`Spec`], [`TapInfo`]).
//!
//! A method sees a model only through this trait: one forward pass that returns the logits and,
//! when asked, one tap's patch tokens already reshaped to a grid; the model states its own token
//! layout (prefix tokens such as \[CLS\], \[DIST\] or registers, the grid, the width) for every
//! tap, so no user ever writes a "reshape function" (the reference's top source of mistakes).

use candle_core::{Device, Tensor};
use serde::Serialize;

use super::config::{Format, Preprocess};
use crate::error::{Error, Result};

/// A point in the network whose tokens a method can read, as [`Spec::taps`] lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TapInfo {
    /// The module's name, as timm names it (`blocks.11.norm1`, `blocks.11`).
    pub name: String,
    /// The 0-based layer (block) it belongs to, which `--layer` counts.
    pub layer: usize,
    /// The token grid `(gh, gw)` of its patch tokens.
    pub grid: (usize, usize),
    /// The token width `D`.
    pub dim: usize,
    /// The tokens before the patch tokens, by name (`[CLS]`, `[DIST]`, `[REG0]`); dropped from
    /// the feature maps.
    pub prefix_tokens: Vec<String>,
}

/// What a model is and what it reads: everything a command or a method needs besides the
/// forward pass.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Spec {
    /// The detected family or variant, e.g. `Vit`, `Deit`, `DeitDistilled`.
    pub family: String,
    /// Checkpoint layout.
    pub format: Format,
    /// timm `architecture`, or Hugging Face `architectures[0]` (else `model_type`).
    pub architecture: String,
    /// Input resolution `(H, W)` the model was built for.
    pub input_size: (usize, usize),
    /// Number of output classes.
    pub num_classes: usize,
    /// Class names, one per output (`class_<i>` where the checkpoint has none).
    pub labels: Vec<String>,
    /// How to preprocess images for this model.
    pub preprocess: Preprocess,
    /// Number of layers `--layer` counts (transformer blocks).
    pub depth: usize,
    /// The tap `--layer L` stands for, one per layer: the first LayerNorm of block `L`, the
    /// reference's default target (`model.blocks[-1].norm1` for the last).
    pub layer_taps: Vec<String>,
    /// Every tap, in network order.
    pub taps: Vec<TapInfo>,
    /// Values that were assumed rather than read, for the user to check.
    pub notes: Vec<String>,
    /// Family-specific sizes for `inspect` (the ViT's `dim`, `heads`, `mlp_dim`, `patch`,
    /// `grid`, `num_prefix_tokens`, `layer_norm_eps`, `qkv_bias`).
    #[serde(flatten)]
    pub details: serde_json::Map<String, serde_json::Value>,
}

impl Spec {
    /// The tap named `name`, or an error listing a few of the model's taps.
    pub fn tap(&self, name: &str) -> Result<&TapInfo> {
        self.taps.iter().find(|t| t.name == name).ok_or_else(|| {
            let some: Vec<&str> = self.taps.iter().take(4).map(|t| t.name.as_str()).collect();
            Error::invalid(format!(
                "tap '{name}' not in this model; its {} taps are named like {}, ... \
                 (`vitcx inspect` lists them)",
                self.taps.len(),
                some.join(", ")
            ))
        })
    }

    /// The tap `--layer layer` stands for (negative counts from the end).
    pub fn layer_tap(&self, layer: i64) -> Result<&TapInfo> {
        let l = resolve_layer(layer, self.depth)?;
        let name = self.layer_taps.get(l).ok_or_else(|| {
            Error::invalid(format!(
                "layer {l} has no tap; model has {} blocks",
                self.depth
            ))
        })?;
        self.tap(name)
    }
}

/// Resolves a possibly negative layer index (Python style: -1 is the last block).
pub fn resolve_layer(layer: i64, depth: usize) -> Result<usize> {
    let d = depth as i64;
    let resolved = if layer < 0 { d + layer } else { layer };
    if resolved < 0 || resolved >= d {
        return Err(Error::invalid(format!(
            "layer {layer} out of range; model has {depth} blocks (valid: {} to {})",
            -d,
            d - 1
        )));
    }
    Ok(resolved as usize)
}

/// The arithmetic of a forward pass.
///
/// `Bf16` rounds the inputs and weights of the transformer blocks' linear layers to bf16 and
/// accumulates in f32; `Int8` quantises them to int8 and sums exactly, `Int16` to 14-bit inputs
/// and 12-bit weights; everything else stays f32. ViT-CX uses them for its perturbed passes,
/// where they trade a small, measured loss of fidelity for speed (bf16 on CPUs with
/// AVX512-BF16, int8 and int16 on CPUs with AVX512-VNNI).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout, as the reference runs.
    #[default]
    F32,
    /// bf16 products with f32 accumulation in the linear layers.
    Bf16,
    /// int8 products with exact i32 sums in the linear layers: weights quantised per output
    /// channel, inputs per token, as PyTorch's dynamic quantisation of `nn.Linear`.
    Int8,
    /// The same with 12-bit weights and 14-bit inputs in 16-bit products: half int8's speed,
    /// maps within float noise of f32's even where int8's are not (nearly flat maps).
    Int16,
}

impl Precision {
    /// Every precision, f32 first.
    pub const ALL: [Precision; 4] = [
        Precision::F32,
        Precision::Bf16,
        Precision::Int8,
        Precision::Int16,
    ];

    /// The reduced precisions (all but f32).
    pub const REDUCED: [Precision; 3] = [Precision::Bf16, Precision::Int8, Precision::Int16];

    /// The name used on the command line and in output files.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Int8 => "int8",
            Precision::Int16 => "int16",
        }
    }

    /// Parses `f32`, `bf16`, `int8` or `int16`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            "int8" | "qint8" => Ok(Precision::Int8),
            "int16" => Ok(Precision::Int16),
            other => Err(Error::invalid(format!(
                "unknown precision {other:?}; expected f32, bf16, int8 or int16"
            ))),
        }
    }

    /// Which f32 kernel the linear layers run on this CPU (`vitcx bench` reports it).
    pub fn f32_kernel() -> &'static str {
        if super::kernels::packed_f32::PackedF32::available() {
            "avx512f (weights packed at load, 8 x 48 tiles)"
        } else {
            "gemm (candle's matmul)"
        }
    }

    /// Which bf16 kernel this CPU runs (`vitcx bench` reports it).
    pub fn bf16_kernel() -> &'static str {
        super::kernels::bf16::Kernel::detect().name()
    }

    /// Which kernel this precision's linear layers run on this CPU.
    pub fn kernel(self) -> &'static str {
        match self {
            Precision::F32 => Self::f32_kernel(),
            Precision::Bf16 => Self::bf16_kernel(),
            Precision::Int8 => Self::int8_kernel(),
            Precision::Int16 => Self::int16_kernel(),
        }
    }

    /// Which int8 kernel this CPU runs (`vitcx bench` reports it).
    pub fn int8_kernel() -> &'static str {
        use super::kernels::integer::{Kernel, I8};
        Kernel::detect().name::<I8>()
    }

    /// Which int16 kernel this CPU runs (`vitcx bench` reports it).
    pub fn int16_kernel() -> &'static str {
        use super::kernels::integer::{Kernel, I16};
        Kernel::detect().name::<I16>()
    }

    /// Whether this CPU has the integer dot products (AVX512-VNNI), where `Int8` and `Int16`
    /// pay.
    pub fn int8_is_native() -> bool {
        use super::kernels::integer::Kernel;
        Kernel::detect() == Kernel::Vnni
    }

    /// Whether this precision runs integer products.
    pub fn is_integer(self) -> bool {
        matches!(self, Precision::Int8 | Precision::Int16)
    }

    /// Whether this CPU has a bf16 dot product (AVX512-BF16), the only case where `Bf16` is
    /// faster than `F32` on the CPU.
    pub fn bf16_is_native() -> bool {
        super::kernels::bf16::Kernel::detect() == super::kernels::bf16::Kernel::Avx512Bf16
    }
}

/// What one forward pass returns.
#[derive(Debug, Clone)]
pub struct Forward {
    /// Logits `(B, C)`.
    pub logits: Tensor,
    /// Patch tokens at the requested tap, prefix tokens dropped, as feature maps `(B, D, gh, gw)`.
    pub features: Option<Tensor>,
}

/// What [`Backbone::attention`] returns.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Logits `(B, C)` of the same pass.
    pub logits: Tensor,
    /// Attention probabilities `(B, heads, T, T)` of each block in order, prefix tokens included
    /// (rows: queries, columns: keys; each row sums to 1).
    pub maps: Vec<Tensor>,
    /// Tokens before the patch tokens in `T`.
    pub prefix_tokens: usize,
    /// The grid `(gh, gw)` of the `T - prefix_tokens` patch tokens.
    pub grid: (usize, usize),
}

/// What [`Backbone::tap_gradient`] returns.
#[derive(Debug, Clone)]
pub struct TapGradient {
    /// Logits `(B, C)` of the pass.
    pub logits: Tensor,
    /// The tap's patch tokens as feature maps `(B, D, gh, gw)`, prefix dropped.
    pub features: Tensor,
    /// `d score / d features`, `(B, D, gh, gw)`.
    pub gradients: Tensor,
}

/// The one interface explanation methods and commands use to talk to a model.
pub trait Backbone {
    /// What the model is: labels, preprocessing, input size, classes, taps.
    fn spec(&self) -> &Spec;

    /// The device the model's weights live on (inputs must be moved there).
    fn device(&self) -> &Device;

    /// Runs the model on normalised pixels `(B, 3, H, W)`; returns logits and, if `tap` (one of
    /// [`Spec::taps`]) is given, its patch tokens as feature maps, all from the same single pass.
    fn forward(&self, px: &Tensor, tap: Option<&str>) -> Result<Forward>;

    /// Softmax probabilities `(B, C)` for normalised pixels `(B, 3, H, W)`.
    fn probs(&self, px: &Tensor) -> Result<Tensor> {
        let out = self.forward(px, None)?;
        Ok(candle_nn::ops::softmax_last_dim(&out.logits)?)
    }

    /// Logits `(B, C)` computed at `precision`. Models without a reduced-precision path answer those
    /// with [`Error::Unsupported`].
    fn logits_at(&self, px: &Tensor, precision: Precision) -> Result<Tensor> {
        match precision {
            Precision::F32 => Ok(self.forward(px, None)?.logits),
            other => Err(Error::Unsupported(format!(
                "this model has no {} forward pass",
                other.name()
            ))),
        }
    }

    /// Softmax probabilities `(B, C)` computed at `precision`.
    fn probs_at(&self, px: &Tensor, precision: Precision) -> Result<Tensor> {
        match precision {
            Precision::F32 => self.probs(px),
            _ => Ok(candle_nn::ops::softmax_last_dim(
                &self.logits_at(px, precision)?,
            )?),
        }
    }

    /// The attention probabilities of every block, for methods that read attention (Attention
    /// Rollout). Models without token-to-token attention say so with [`Error::Unsupported`].
    fn attention(&self, px: &Tensor) -> Result<Attention> {
        let _ = px;
        Err(Error::Unsupported(
            "this model does not expose its attention".into(),
        ))
    }

    /// The gradient of a scalar score with respect to the tokens at `tap`, for gradient methods
    /// (Grad-CAM). `score` maps the pass's logits `(B, C)` to the scalar to differentiate (the
    /// caller decides which class of which image, e.g. with [`crate::target::Score::of`]).
    /// Models without a backward pass say so with [`Error::Unsupported`].
    fn tap_gradient(
        &self,
        px: &Tensor,
        tap: &str,
        score: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<TapGradient> {
        let _ = (px, tap, score);
        Err(Error::Unsupported("this model has no backward pass".into()))
    }
}

/// A boxed model is a model, so `&model` works the same whether [`crate::model::load()`] gave a
/// `Box<dyn Backbone>` or a family's own type was built.
impl<T: Backbone + ?Sized> Backbone for Box<T> {
    fn spec(&self) -> &Spec {
        (**self).spec()
    }

    fn device(&self) -> &Device {
        (**self).device()
    }

    fn forward(&self, px: &Tensor, tap: Option<&str>) -> Result<Forward> {
        (**self).forward(px, tap)
    }

    fn probs(&self, px: &Tensor) -> Result<Tensor> {
        (**self).probs(px)
    }

    fn logits_at(&self, px: &Tensor, precision: Precision) -> Result<Tensor> {
        (**self).logits_at(px, precision)
    }

    fn probs_at(&self, px: &Tensor, precision: Precision) -> Result<Tensor> {
        (**self).probs_at(px, precision)
    }

    fn attention(&self, px: &Tensor) -> Result<Attention> {
        (**self).attention(px)
    }

    fn tap_gradient(
        &self,
        px: &Tensor,
        tap: &str,
        score: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<TapGradient> {
        (**self).tap_gradient(px, tap, score)
    }
}

impl std::fmt::Debug for dyn Backbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.spec();
        f.debug_struct("Backbone")
            .field("family", &s.family)
            .field("architecture", &s.architecture)
            .field("input_size", &s.input_size)
            .field("num_classes", &s.num_classes)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_resolution() {
        assert_eq!(resolve_layer(-1, 12).unwrap(), 11);
        assert_eq!(resolve_layer(0, 12).unwrap(), 0);
        assert_eq!(resolve_layer(-12, 12).unwrap(), 0);
        let e = resolve_layer(12, 12).unwrap_err().to_string();
        assert!(
            e.contains("layer 12 out of range; model has 12 blocks"),
            "{e}"
        );
        assert!(resolve_layer(-13, 12).is_err());
    }
}
