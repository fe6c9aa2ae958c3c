//! The EVA-02 family: timm `eva02_*` classifiers (Fang et al., <https://arxiv.org/abs/2303.11331>):
//! a BEiT-style block with a rotary position embedding of q and k (after the \[CLS\] token,
//! positions scaled to the pre-training grid `ref_feat_shape`), a SwiGLU MLP (with a LayerNorm
//! inside for base and large), q and v biases on fused or separate projections, an absolute
//! position embedding, patch 14, mean pooling and `fc_norm`.
//!
//! The forward pass is BEiT's ([`super::beit::Beit`], which timm's `Eva` derives from); this
//! module is the registry entry and what sets it apart when reading a checkpoint
//! (the BEiT family's timm reader with `Kind::Eva02`: the rotary embedding, CLIP's mean/std).

use candle_core::Device;
use serde_json::Value;

use super::beit::{from_checkpoint, Kind};
use crate::error::{Error, Result};
use crate::model::backbone::Backbone;
use crate::model::checkpoint::{Checkpoint, Family};
use crate::model::config::Format;

/// The family's registry entry.
pub const FAMILY: Family = Family {
    name: "eva",
    covers: "EVA-02: rotary position embedding, SwiGLU MLP (with or without its inner norm), fused or separate q/k/v, patch 14 (timm eva02_*)",
    claims,
    build,
};

/// timm architectures starting with `eva02_`.
fn claims(format: Format, config: &Value) -> bool {
    format == Format::Timm
        && config
            .get("architecture")
            .and_then(Value::as_str)
            .is_some_and(|a| a.starts_with("eva02_"))
}

fn build(ckpt: Checkpoint, device: &Device) -> Result<Box<dyn Backbone>> {
    if ckpt.format != Format::Timm {
        return Err(Error::Unsupported("EVA-02 checkpoints in Hugging Face format".into()));
    }
    Ok(Box::new(from_checkpoint(ckpt, device, Kind::Eva02)?))
}
