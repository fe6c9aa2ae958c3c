//! Model configuration (placeholder until the model module lands).

/// Model family detected from a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Vision Transformer with one [CLS] token.
    Vit,
    /// DeiT with [CLS] and [DIST] tokens and two heads averaged.
    DeitDistilled,
}

/// Preprocessing the checkpoint was trained with.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    /// Per-channel mean (RGB) subtracted after scaling to [0, 1].
    pub mean: [f32; 3],
    /// Per-channel std (RGB) divided by after subtracting the mean.
    pub std: [f32; 3],
    /// Input size `(H, W)`.
    pub input_size: (usize, usize),
}

/// Everything read from a checkpoint's configuration files.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// How to preprocess images for this model.
    pub preprocess: Preprocess,
    /// Class names, one per output.
    pub labels: Vec<String>,
}
