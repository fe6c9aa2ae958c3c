//! The Swin family's tensor names: every layout mapped to timm's current one, in one place.
//!
//! The model code sees timm names only: `patch_embed.{proj,norm}.*`,
//! `layers.S.downsample.{norm,reduction}.*` (stage `S >= 1`: timm merges patches at the *start*
//! of a stage), `layers.S.blocks.J.{norm1,attn.qkv,attn.relative_position_bias_table,attn.proj,
//! norm2,mlp.fc1,mlp.fc2}.*`, `norm.*`, `head.fc.*`. Three layouts reach it:
//! - timm >= 0.9 (the above);
//! - the original Microsoft layout, which older timm kept: the merge at the *end* of a stage
//!   (`layers.0.downsample` exists) and the classifier as `head.*`; renamed as timm's
//!   `checkpoint_filter_fn` does;
//! - Hugging Face `SwinForImageClassification` (`swin.embeddings.*`, `swin.encoder.layers.S.
//!   blocks.J.{layernorm_before,attention.self.{query,key,value},...}`, and transformers 5's
//!   `attention.{q,k,v,o}_proj`), its separate query/key/value fused into timm's `qkv` (rows in
//!   q, k, v order) and its end-of-stage merges moved to the next stage.
//!
//! Buffers some files carry (`relative_position_index`, `attn_mask`) are recomputed, not read.
//! Error messages name tensors as the checkpoint spells them.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::model::config::Format;
use crate::model::weights::Weights;

/// Whether a tensor is a buffer that the model recomputes from its sizes.
fn is_buffer(name: &str) -> bool {
    name.ends_with("relative_position_index") || name.ends_with("attn_mask")
}

/// Moves `layers.S.downsample` to `layers.{S+1}.downsample` (merges at the end of a stage ->
/// at the start of the next).
fn shift_downsample(name: &str) -> Option<String> {
    let rest = name.strip_prefix("layers.")?;
    let (s, tail) = rest.split_once('.')?;
    let s: usize = s.parse().ok()?;
    tail.starts_with("downsample.")
        .then(|| format!("layers.{}.{tail}", s + 1))
}

/// Hugging Face block-module names (after `blocks.J.`) and timm's, both transformers 4 and 5
/// spellings.
const HF_BLOCK: &[(&str, &str)] = &[
    ("layernorm_before", "norm1"),
    ("layernorm_after", "norm2"),
    ("attention.output.dense", "attn.proj"),
    ("attention.o_proj", "attn.proj"),
    (
        "attention.self.relative_position_bias_table",
        "attn.relative_position_bias_table",
    ),
    (
        "attention.relative_position_bias.relative_position_bias_table",
        "attn.relative_position_bias_table",
    ),
    ("intermediate.dense", "mlp.fc1"),
    ("output.dense", "mlp.fc2"),
    ("mlp.fc1", "mlp.fc1"),
    ("mlp.fc2", "mlp.fc2"),
];

/// The query, key and value projections of a Hugging Face block, in both spellings.
const HF_QKV: [[&str; 3]; 2] = [
    [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
    ],
    ["attention.q_proj", "attention.k_proj", "attention.v_proj"],
];

/// The timm name of a Hugging Face tensor that is not a query/key/value projection, or `None`
/// for one no Swin classifier has.
fn hf_to_timm(name: &str) -> Option<String> {
    let top = [
        (
            "swin.embeddings.patch_embeddings.projection.",
            "patch_embed.proj.",
        ),
        ("swin.embeddings.norm.", "patch_embed.norm."),
        ("swin.layernorm.", "norm."),
        ("classifier.", "head.fc."),
    ];
    for (hf, timm) in top {
        if let Some(p) = name.strip_prefix(hf) {
            return Some(format!("{timm}{p}"));
        }
    }
    if name == "swin.embeddings.position_embeddings" {
        return Some("absolute_pos_embed".into());
    }
    let rest = name.strip_prefix("swin.encoder.layers.")?;
    let (s, tail) = rest.split_once('.')?;
    let s: usize = s.parse().ok()?;
    if let Some(p) = tail.strip_prefix("downsample.") {
        return Some(format!("layers.{}.downsample.{p}", s + 1));
    }
    let rest = tail.strip_prefix("blocks.")?;
    let (j, module) = rest.split_once('.')?;
    let (module_name, param) = match module.rsplit_once('.') {
        Some((m, p)) if p == "weight" || p == "bias" => (m, Some(p)),
        _ => (module, None),
    };
    let (_, timm) = HF_BLOCK.iter().find(|(h, _)| *h == module_name)?;
    Some(match param {
        Some(p) => format!("layers.{s}.blocks.{j}.{timm}.{p}"),
        None => format!("layers.{s}.blocks.{j}.{timm}"),
    })
}

/// The checkpoint's tensors under timm's current names, with the map back to the checkpoint's
/// own names for errors.
pub(crate) fn weights(
    path: &Path,
    format: Format,
    tensors: HashMap<String, Tensor>,
) -> Result<Weights> {
    let mut out = HashMap::with_capacity(tensors.len());
    let mut source: HashMap<String, String> = HashMap::new();
    let mut put = |out: &mut HashMap<String, Tensor>, timm: String, src: String, t: Tensor| {
        source.insert(timm.clone(), src);
        out.insert(timm, t);
    };
    match format {
        Format::Timm => {
            let old = tensors.contains_key("layers.0.downsample.reduction.weight");
            for (k, t) in tensors {
                if is_buffer(&k) {
                    continue;
                }
                let name = if old {
                    match shift_downsample(&k) {
                        Some(n) => n,
                        None => match k.strip_prefix("head.") {
                            Some(p) if !p.starts_with("fc.") => format!("head.fc.{p}"),
                            _ => k.clone(),
                        },
                    }
                } else {
                    k.clone()
                };
                put(&mut out, name, k, t);
            }
        }
        Format::HuggingFace => {
            let mut tensors = tensors;
            // Fuse each block's query/key/value into timm's qkv.
            let mut qkv: Vec<(String, String, [String; 3])> = Vec::new();
            for k in tensors.keys() {
                for spelling in HF_QKV {
                    let Some(i) = k.find(spelling[0]) else { continue };
                    let (head, param) = (&k[..i], &k[i + spelling[0].len()..]);
                    // `swin.encoder.layers.S.blocks.J.` + `.weight` -> `layers.S.blocks.J.attn.qkv.weight`
                    let block = head.strip_prefix("swin.encoder.").unwrap_or(head);
                    let timm = format!("{block}attn.qkv{param}");
                    let names = spelling.map(|s| format!("{head}{s}{param}"));
                    qkv.push((k.clone(), timm, names));
                }
            }
            for (query, timm, names) in qkv {
                let parts = names
                    .iter()
                    .map(|n| {
                        tensors.remove(n).ok_or_else(|| Error::Checkpoint {
                            path: path.to_path_buf(),
                            reason: format!("missing tensor '{n}' (beside '{query}')"),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                put(&mut out, timm, query, Tensor::cat(&parts, 0)?);
            }
            for (k, t) in tensors {
                if is_buffer(&k) || k.starts_with("swin.pooler") {
                    continue;
                }
                // A name no Swin classifier has stays as it is, to be reported as unused.
                let name = hf_to_timm(&k).unwrap_or_else(|| k.clone());
                put(&mut out, name, k, t);
            }
        }
    }
    Ok(Weights::new(path, out, move |n| {
        source.get(n).cloned().unwrap_or_else(|| n.to_string())
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn z(n: usize) -> Tensor {
        Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn hugging_face_names_map_to_timm() {
        let cases = [
            (
                "swin.embeddings.patch_embeddings.projection.weight",
                "patch_embed.proj.weight",
            ),
            ("swin.embeddings.norm.bias", "patch_embed.norm.bias"),
            (
                "swin.encoder.layers.0.downsample.reduction.weight",
                "layers.1.downsample.reduction.weight",
            ),
            (
                "swin.encoder.layers.2.blocks.1.layernorm_before.weight",
                "layers.2.blocks.1.norm1.weight",
            ),
            (
                "swin.encoder.layers.1.blocks.0.attention.self.relative_position_bias_table",
                "layers.1.blocks.0.attn.relative_position_bias_table",
            ),
            (
                "swin.encoder.layers.1.blocks.0.output.dense.bias",
                "layers.1.blocks.0.mlp.fc2.bias",
            ),
            ("swin.layernorm.weight", "norm.weight"),
            ("classifier.bias", "head.fc.bias"),
        ];
        for (hf, timm) in cases {
            assert_eq!(hf_to_timm(hf).as_deref(), Some(timm), "{hf}");
        }
        assert_eq!(hf_to_timm("swin.encoder.layers.0.blocks.0.foo.weight"), None);
    }

    #[test]
    fn qkv_is_fused_and_old_timm_layout_shifted() {
        let p = "swin.encoder.layers.0.blocks.1.attention.self.";
        let t: HashMap<String, Tensor> = [
            (format!("{p}query.weight"), z(2)),
            (format!("{p}key.weight"), z(2)),
            (format!("{p}value.weight"), z(2)),
            (format!("{p}relative_position_index"), z(4)),
        ]
        .into();
        let w = weights(Path::new("m"), Format::HuggingFace, t).unwrap();
        assert_eq!(
            w.dims("layers.0.blocks.1.attn.qkv.weight").unwrap(),
            &[6]
        );
        assert_eq!(
            w.source_name("layers.0.blocks.1.attn.qkv.weight"),
            format!("{p}query.weight")
        );
        let t: HashMap<String, Tensor> = [
            ("layers.0.downsample.reduction.weight".to_string(), z(1)),
            ("head.weight".to_string(), z(1)),
            ("layers.0.blocks.0.attn_mask".to_string(), z(1)),
        ]
        .into();
        let w = weights(Path::new("m"), Format::Timm, t).unwrap();
        assert!(w.contains("layers.1.downsample.reduction.weight"));
        assert!(w.contains("head.fc.weight"));
        assert!(!w.contains("layers.0.blocks.0.attn_mask"));
        assert_eq!(w.source_name("head.fc.weight"), "head.weight");
    }
}
