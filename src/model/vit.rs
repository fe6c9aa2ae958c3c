//! ViT / DeiT forward pass (placeholder until the model module lands).

/// A Vision Transformer (ViT, DeiT, DeiT-distilled).
#[derive(Debug)]
pub struct VisionTransformer;
