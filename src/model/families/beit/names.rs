//! Hugging Face BEiT's tensor names mapped to timm's, so one model code reads both.
//!
//! timm names the model code sees: `cls_token`, `pos_embed`, `patch_embed.proj.*`,
//! `rel_pos_bias.relative_position_bias_table`, `blocks.N.{norm1, attn.q_proj, attn.k_proj,
//! attn.v_proj, attn.relative_position_bias_table, attn.proj, gamma_1, norm2, mlp.fc1, mlp.fc2,
//! gamma_2}`, `norm.*`, `fc_norm.*`, `head.*` (Hugging Face's separate query/key/value become
//! timm EVA's separate `q_proj`/`k_proj`/`v_proj`, which the model packs into one product).
//! Error messages name tensors as the checkpoint spells them.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::model::config::Format;
use crate::model::weights::Weights;

/// Non-block tensors after `beit.` (Hugging Face name, timm name).
const TOP: &[(&str, &str)] = &[
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.patch_embeddings.projection.weight", "patch_embed.proj.weight"),
    ("embeddings.patch_embeddings.projection.bias", "patch_embed.proj.bias"),
    (
        "encoder.relative_position_bias.relative_position_bias_table",
        "rel_pos_bias.relative_position_bias_table",
    ),
    ("layernorm.weight", "norm.weight"),
    ("layernorm.bias", "norm.bias"),
    ("pooler.layernorm.weight", "fc_norm.weight"),
    ("pooler.layernorm.bias", "fc_norm.bias"),
];

/// Tensors inside `beit.encoder.layer.N.` (Hugging Face name, timm name after `blocks.N.`).
const BLOCK: &[(&str, &str)] = &[
    ("layernorm_before.weight", "norm1.weight"),
    ("layernorm_before.bias", "norm1.bias"),
    ("attention.attention.query.weight", "attn.q_proj.weight"),
    ("attention.attention.query.bias", "attn.q_proj.bias"),
    ("attention.attention.key.weight", "attn.k_proj.weight"),
    ("attention.attention.value.weight", "attn.v_proj.weight"),
    ("attention.attention.value.bias", "attn.v_proj.bias"),
    (
        "attention.attention.relative_position_bias.relative_position_bias_table",
        "attn.relative_position_bias_table",
    ),
    ("attention.output.dense.weight", "attn.proj.weight"),
    ("attention.output.dense.bias", "attn.proj.bias"),
    ("lambda_1", "gamma_1"),
    ("layernorm_after.weight", "norm2.weight"),
    ("layernorm_after.bias", "norm2.bias"),
    ("intermediate.dense.weight", "mlp.fc1.weight"),
    ("intermediate.dense.bias", "mlp.fc1.bias"),
    ("output.dense.weight", "mlp.fc2.weight"),
    ("output.dense.bias", "mlp.fc2.bias"),
    ("lambda_2", "gamma_2"),
];

/// Where the blocks are.
const BLOCKS: &str = "beit.encoder.layer.";

/// The classifier.
const HEAD: &[(&str, &str)] = &[("classifier.weight", "head.weight"), ("classifier.bias", "head.bias")];

/// Hugging Face name of a timm name (for errors), or `None` for names without one.
fn hf_name(timm: &str) -> Option<String> {
    if let Some((hf, _)) = HEAD.iter().find(|(_, t)| *t == timm) {
        return Some(hf.to_string());
    }
    if let Some((hf, _)) = TOP.iter().find(|(_, t)| *t == timm) {
        return Some(format!("beit.{hf}"));
    }
    let (n, rest) = timm.strip_prefix("blocks.")?.split_once('.')?;
    let (hf, _) = BLOCK.iter().find(|(_, t)| *t == rest)?;
    Some(format!("{BLOCKS}{n}.{hf}"))
}

/// timm name of a Hugging Face name, or `None` for a name outside the map.
fn timm_name(hf: &str) -> Option<String> {
    if let Some((_, t)) = HEAD.iter().find(|(h, _)| *h == hf) {
        return Some(t.to_string());
    }
    if let Some(rest) = hf.strip_prefix(BLOCKS) {
        let (n, inner) = rest.split_once('.')?;
        n.parse::<usize>().ok()?;
        let (_, t) = BLOCK.iter().find(|(h, _)| *h == inner)?;
        return Some(format!("blocks.{n}.{t}"));
    }
    let rest = hf.strip_prefix("beit.")?;
    TOP.iter().find(|(h, _)| *h == rest).map(|(_, t)| t.to_string())
}

/// The tensors of a checkpoint in `format`, under timm's names. Hugging Face's mask token
/// (masked-image-modelling only) is dropped; unknown names are kept (reported as unused later).
pub(crate) fn weights(path: &Path, format: Format, raw: HashMap<String, Tensor>) -> Result<Weights> {
    if format == Format::Timm {
        return Ok(Weights::new(path, raw, |n| n.to_string()));
    }
    let mut out = HashMap::with_capacity(raw.len());
    for (key, t) in raw {
        if key == "beit.embeddings.mask_token" {
            continue;
        }
        let name = timm_name(&key).unwrap_or_else(|| key.clone());
        if out.insert(name.clone(), t).is_some() {
            return Err(Error::Checkpoint {
                path: path.to_path_buf(),
                reason: format!("tensor '{key}' duplicates another tensor that maps to '{name}'"),
            });
        }
    }
    Ok(Weights::new(path, out, |n| hf_name(n).unwrap_or_else(|| n.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for hf in [
            "beit.embeddings.cls_token",
            "beit.encoder.relative_position_bias.relative_position_bias_table",
            "beit.encoder.layer.3.attention.attention.key.weight",
            "beit.encoder.layer.11.attention.attention.relative_position_bias.relative_position_bias_table",
            "beit.encoder.layer.0.lambda_2",
            "beit.pooler.layernorm.bias",
            "classifier.weight",
        ] {
            let t = timm_name(hf).unwrap();
            assert_eq!(hf_name(&t).as_deref(), Some(hf), "{t}");
        }
        assert_eq!(
            timm_name("beit.encoder.layer.2.intermediate.dense.weight").as_deref(),
            Some("blocks.2.mlp.fc1.weight")
        );
        assert_eq!(timm_name("beit.encoder.layer.x.lambda_1"), None);
        assert_eq!(timm_name("other.weight"), None);
    }
}
