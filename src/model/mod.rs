//! Models and the seam between models and explanation methods.
//!
//! Explanation methods see a model only through [`Backbone`]: one forward pass that returns the
//! logits and, when asked, the patch tokens of one layer already reshaped to a grid. The model
//! states its own number of prefix tokens ([CLS], [DIST], registers) and its token grid, so no
//! user ever writes a "reshape function" (the reference's top source of mistakes).

use candle_core::{Device, Tensor};

use crate::error::Result;

pub mod config;
pub mod vit;
pub mod weights;

pub use config::{Family, ModelConfig, Preprocess};
pub use vit::VisionTransformer;

/// Shape facts about a model that explanation methods rely on.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    /// Model family, as detected from the checkpoint.
    pub family: Family,
    /// Number of transformer blocks.
    pub depth: usize,
    /// Token width (embedding dimension).
    pub dim: usize,
    /// Attention heads per block.
    pub heads: usize,
    /// Patch side in pixels.
    pub patch: usize,
    /// Input resolution `(H, W)` the model was built for.
    pub input_size: (usize, usize),
    /// Token grid `(gh, gw)` = input size / patch.
    pub grid: (usize, usize),
    /// Tokens before the patch tokens: 1 for ViT ([CLS]), 2 for DeiT-distilled ([CLS], [DIST]).
    pub num_prefix_tokens: usize,
    /// Number of output classes.
    pub num_classes: usize,
}

/// Where in the network to read tokens from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tap {
    /// Output of the first LayerNorm (`norm1` / `layernorm_before`) of block `layer` (0-based):
    /// the reference's default target layer (`model.blocks[-1].norm1`).
    Norm1(usize),
    /// Output of block `layer` (the residual stream after the block).
    Block(usize),
}

impl Tap {
    /// The 0-based block this tap reads from.
    pub fn layer(self) -> usize {
        match self {
            Tap::Norm1(l) | Tap::Block(l) => l,
        }
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

/// The one interface explanation methods use to talk to a model.
pub trait Backbone {
    /// Shape facts: depth, width, patch, grid, prefix tokens, classes.
    fn spec(&self) -> &Spec;

    /// The device the model's weights live on (inputs must be moved there).
    fn device(&self) -> &Device;

    /// Runs the model on normalised pixels `(B, 3, H, W)`; returns logits and, if `tap` is
    /// given, that layer's patch tokens as feature maps, all from the same single pass.
    fn forward(&self, px: &Tensor, tap: Option<Tap>) -> Result<Forward>;

    /// Softmax probabilities `(B, C)` for normalised pixels `(B, 3, H, W)`.
    fn probs(&self, px: &Tensor) -> Result<Tensor> {
        let out = self.forward(px, None)?;
        Ok(candle_nn::ops::softmax_last_dim(&out.logits)?)
    }
}
