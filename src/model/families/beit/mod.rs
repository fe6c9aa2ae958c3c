//! The BEiT family: timm `beit*` (BEiT, BEiT v2) and transformers' `BeitForImageClassification`,
//! with a relative position bias shared by all blocks or one per block (or both), an optional
//! absolute position embedding, LayerScale, and mean pooling with `fc_norm` (or \[CLS\] pooling).
//!
//! BEiT: Bao et al., <https://arxiv.org/abs/2106.08254>; BEiT v2: <https://arxiv.org/abs/2208.06366>.
//! The model code ([`Beit`], `model.rs`) also runs EVA-02 (timm builds EVA on BEiT's block), which the `eva`
//! family registers with its own configuration reader. Taps are named as timm names the modules:
//! `blocks.N.norm1` (the reference's target layer) and `blocks.N`.

pub(crate) mod config;
pub(crate) mod model;
mod names;
pub mod random;
pub(crate) mod rope;

use candle_core::Device;
use serde_json::Value;

use crate::error::Result;
use crate::model::backbone::Backbone;
use crate::model::checkpoint::{Checkpoint, Family};
use crate::model::config::Format;

pub use config::{BeitConfig, Kind, MlpKind, Pool, RopeConfig};
pub use model::Beit;

/// The family's registry entry.
pub const FAMILY: Family = Family {
    name: "beit",
    covers: "BEiT and BEiT v2: relative position bias (shared or per block), LayerScale, mean pooling (timm beit_*, beitv2_*; Hugging Face model_type beit)",
    claims,
    build,
};

/// timm architectures starting with `beit`; Hugging Face `model_type` `beit`.
fn claims(format: Format, config: &Value) -> bool {
    match format {
        Format::Timm => config
            .get("architecture")
            .and_then(Value::as_str)
            .is_some_and(|a| a.starts_with("beit")),
        Format::HuggingFace => config.get("model_type").and_then(Value::as_str) == Some("beit"),
    }
}

fn build(ckpt: Checkpoint, device: &Device) -> Result<Box<dyn Backbone>> {
    Ok(Box::new(from_checkpoint(ckpt, device, Kind::Beit)?))
}

/// A BEiT (`Kind::Beit`) or EVA-02 (`Kind::Eva02`, timm only) model from a checkpoint.
pub(crate) fn from_checkpoint(mut ckpt: Checkpoint, device: &Device, kind: Kind) -> Result<Beit> {
    let tensors = std::mem::take(&mut ckpt.tensors);
    let w = names::weights(&ckpt.weights_path, ckpt.format, tensors)?;
    let cfg = match ckpt.format {
        Format::Timm => config::timm(&ckpt, &w, kind)?,
        Format::HuggingFace => config::hf(&ckpt, &w)?,
    };
    Beit::build(cfg, w, device)
}
