//! The ViT family's tensor names: Hugging Face's mapped to timm's, in one place.
//!
//! The model code sees timm names only: `cls_token`, `dist_token`, `pos_embed`,
//! `patch_embed.proj.*`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`, `norm.*`,
//! `head.*`, `head_dist.*`. Hugging Face's separate query/key/value projections are fused into
//! timm's `qkv` (rows in q, k, v order, as timm's `checkpoint_filter_fn` does), so both formats
//! run through the same code. Error messages name tensors as the checkpoint spells them.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::model::config::Format;
use crate::model::weights::Weights;

/// Hugging Face names (after the `vit.` / `deit.` prefix) of the embedding and final-norm tensors.
const HF_TOP: &[(&str, &str)] = &[
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.distillation_token", "dist_token"),
    ("embeddings.position_embeddings", "pos_embed"),
    (
        "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.weight",
    ),
    (
        "embeddings.patch_embeddings.projection.bias",
        "patch_embed.proj.bias",
    ),
    ("layernorm.weight", "norm.weight"),
    ("layernorm.bias", "norm.bias"),
];

/// Hugging Face classifier names (never prefixed) of the heads.
const HF_HEADS: &[(&str, &str)] = &[
    ("classifier.weight", "head.weight"),
    ("classifier.bias", "head.bias"),
    ("cls_classifier.weight", "head.weight"),
    ("cls_classifier.bias", "head.bias"),
    ("distillation_classifier.weight", "head_dist.weight"),
    ("distillation_classifier.bias", "head_dist.bias"),
];

/// Hugging Face module paths inside `encoder.layer.N.` and their timm names inside `blocks.N.`.
const HF_BLOCK: &[(&str, &str)] = &[
    ("layernorm_before", "norm1"),
    ("attention.output.dense", "attn.proj"),
    ("layernorm_after", "norm2"),
    ("intermediate.dense", "mlp.fc1"),
    ("output.dense", "mlp.fc2"),
];

/// Hugging Face's separate attention projections, fused in this order into timm's `attn.qkv`.
const HF_QKV: [&str; 3] = [
    "attention.attention.query",
    "attention.attention.key",
    "attention.attention.value",
];

/// Hugging Face tensors that a classifier never uses (pooler of `ViTModel`, MIM mask token).
fn hf_ignored(rest: &str) -> bool {
    rest.starts_with("pooler.") || rest == "embeddings.mask_token"
}

/// How the checkpoint spells tensor names, to report errors in its own terms.
#[derive(Debug, Clone)]
struct Naming {
    format: Format,
    /// `vit.`, `deit.` or empty (Hugging Face only).
    prefix: String,
    /// Hugging Face DeiT with teacher: heads are `cls_classifier` / `distillation_classifier`.
    teacher: bool,
}

impl Naming {
    /// The checkpoint's own name for the timm name `name`.
    fn source_name(&self, name: &str) -> String {
        if self.format == Format::Timm {
            return name.to_string();
        }
        let p = &self.prefix;
        if let Some((hf, _)) = HF_TOP.iter().find(|(_, t)| *t == name) {
            return format!("{p}{hf}");
        }
        if let Some(param) = name.strip_prefix("head.") {
            let head = if self.teacher {
                "cls_classifier"
            } else {
                "classifier"
            };
            return format!("{head}.{param}");
        }
        if let Some(param) = name.strip_prefix("head_dist.") {
            return format!("distillation_classifier.{param}");
        }
        if let Some(rest) = name.strip_prefix("blocks.") {
            if let Some((n, module)) = rest.split_once('.') {
                let (path, param) = split_param(module);
                if path == "attn.qkv" {
                    return format!(
                        "{p}encoder.layer.{n}.attention.attention.{{query,key,value}}.{param}"
                    );
                }
                if let Some((hf, _)) = HF_BLOCK.iter().find(|(_, t)| *t == path) {
                    return format!("{p}encoder.layer.{n}.{hf}.{param}");
                }
            }
        }
        name.to_string()
    }
}

/// Splits `attn.qkv.weight` into (`attn.qkv`, `weight`).
fn split_param(name: &str) -> (&str, &str) {
    name.rsplit_once('.').unwrap_or((name, ""))
}

/// The tensors of a checkpoint read from `path` in `format`, renamed to timm's names.
pub(crate) fn weights(
    path: &Path,
    format: Format,
    raw: HashMap<String, Tensor>,
) -> Result<Weights> {
    let mut naming = Naming {
        format,
        prefix: String::new(),
        teacher: false,
    };
    let tensors = match format {
        Format::Timm => raw,
        Format::HuggingFace => {
            naming.prefix = ["vit.", "deit."]
                .iter()
                .find(|p| raw.keys().any(|k| k.starts_with(*p)))
                .map(|p| p.to_string())
                .unwrap_or_default();
            naming.teacher = raw.keys().any(|k| k.starts_with("cls_classifier."));
            hf_to_timm(path, &naming.prefix, raw)?
        }
    };
    Ok(Weights::new(path, tensors, move |n| naming.source_name(n)))
}

/// Maps Hugging Face ViT/DeiT names to timm names, fusing query/key/value into `qkv`.
/// Unknown names are kept as they are (reported later as unsupported).
fn hf_to_timm(
    path: &Path,
    prefix: &str,
    raw: HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    let mut out: HashMap<String, Tensor> = HashMap::new();
    // (layer, param) -> [query, key, value]
    let mut qkv: BTreeMap<(String, String), [Option<Tensor>; 3]> = BTreeMap::new();
    let insert = |out: &mut HashMap<String, Tensor>, name: String, src: &str, t: Tensor| {
        if out.insert(name.clone(), t).is_some() {
            return Err(Error::Checkpoint {
                path: path.to_path_buf(),
                reason: format!("tensor '{src}' duplicates another tensor that maps to '{name}'"),
            });
        }
        Ok(())
    };
    for (key, t) in raw {
        if let Some((_, timm)) = HF_HEADS.iter().find(|(hf, _)| *hf == key) {
            insert(&mut out, timm.to_string(), &key, t)?;
            continue;
        }
        let rest = key.strip_prefix(prefix).unwrap_or(&key);
        if hf_ignored(rest) {
            continue;
        }
        if let Some((_, timm)) = HF_TOP.iter().find(|(hf, _)| *hf == rest) {
            insert(&mut out, timm.to_string(), &key, t)?;
            continue;
        }
        if let Some((n, module)) = rest
            .strip_prefix("encoder.layer.")
            .and_then(|r| r.split_once('.'))
            .filter(|(n, _)| n.parse::<usize>().is_ok())
        {
            let (mpath, param) = split_param(module);
            if let Some(i) = HF_QKV.iter().position(|q| *q == mpath) {
                // `i` is a position in the 3-element HF_QKV, so it indexes the 3 slots.
                qkv.entry((n.to_string(), param.to_string())).or_default()[i] = Some(t);
                continue;
            }
            if let Some((_, timm)) = HF_BLOCK.iter().find(|(hf, _)| *hf == mpath) {
                insert(&mut out, format!("blocks.{n}.{timm}.{param}"), &key, t)?;
                continue;
            }
        }
        insert(&mut out, key.clone(), &key, t)?;
    }
    for ((n, param), parts) in qkv {
        let mut found = Vec::with_capacity(3);
        for (i, part) in parts.into_iter().enumerate() {
            match part {
                Some(t) => found.push(t),
                None => {
                    return Err(Error::Checkpoint {
                        path: path.to_path_buf(),
                        reason: format!(
                            "missing tensor '{prefix}encoder.layer.{n}.{}.{param}'",
                            HF_QKV[i]
                        ),
                    })
                }
            }
        }
        let dims: Vec<&[usize]> = found.iter().map(|t| t.dims()).collect();
        if dims[0] != dims[1] || dims[0] != dims[2] {
            return Err(Error::Checkpoint {
                path: path.to_path_buf(),
                reason: format!(
                    "query/key/value {param} of layer {n} differ in shape: {:?}, {:?}, {:?}",
                    dims[0], dims[1], dims[2]
                ),
            });
        }
        let fused = Tensor::cat(&found, 0)?;
        out.insert(format!("blocks.{n}.attn.qkv.{param}"), fused);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn naming(format: Format, prefix: &str, teacher: bool) -> Naming {
        Naming {
            format,
            prefix: prefix.into(),
            teacher,
        }
    }

    #[test]
    fn source_names_round_trip_the_hub_names() {
        let hf = naming(Format::HuggingFace, "vit.", false);
        assert_eq!(hf.source_name("cls_token"), "vit.embeddings.cls_token");
        assert_eq!(
            hf.source_name("blocks.3.mlp.fc2.weight"),
            "vit.encoder.layer.3.output.dense.weight"
        );
        assert_eq!(
            hf.source_name("blocks.0.attn.proj.bias"),
            "vit.encoder.layer.0.attention.output.dense.bias"
        );
        assert_eq!(
            hf.source_name("blocks.1.attn.qkv.weight"),
            "vit.encoder.layer.1.attention.attention.{query,key,value}.weight"
        );
        assert_eq!(hf.source_name("head.weight"), "classifier.weight");
        let teacher = naming(Format::HuggingFace, "deit.", true);
        assert_eq!(teacher.source_name("head.bias"), "cls_classifier.bias");
        assert_eq!(
            teacher.source_name("head_dist.weight"),
            "distillation_classifier.weight"
        );
        assert_eq!(
            teacher.source_name("dist_token"),
            "deit.embeddings.distillation_token"
        );
        let timm = naming(Format::Timm, "", false);
        assert_eq!(
            timm.source_name("blocks.1.norm1.bias"),
            "blocks.1.norm1.bias"
        );
    }

    #[test]
    fn hf_names_map_to_timm_and_qkv_fuses_in_order() {
        let dev = Device::Cpu;
        let mut raw = HashMap::new();
        for (i, q) in ["query", "key", "value"].iter().enumerate() {
            let t = Tensor::full(i as f32, (2, 2), &dev).unwrap();
            raw.insert(
                format!("vit.encoder.layer.0.attention.attention.{q}.weight"),
                t,
            );
        }
        raw.insert(
            "vit.encoder.layer.0.output.dense.weight".into(),
            Tensor::zeros((2, 4), DType::F32, &dev).unwrap(),
        );
        raw.insert(
            "vit.encoder.layer.0.attention.output.dense.weight".into(),
            Tensor::zeros((2, 2), DType::F32, &dev).unwrap(),
        );
        raw.insert(
            "vit.pooler.dense.weight".into(),
            Tensor::zeros((2, 2), DType::F32, &dev).unwrap(),
        );
        let mut w = weights(Path::new("m.safetensors"), Format::HuggingFace, raw).unwrap();
        let qkv = w.take("blocks.0.attn.qkv.weight", &[6, 2]).unwrap();
        let col: Vec<f32> = qkv.get_on_dim(1, 0).unwrap().to_vec1().unwrap();
        assert_eq!(col, vec![0., 0., 1., 1., 2., 2.]);
        assert_eq!(w.dims("blocks.0.mlp.fc2.weight").unwrap(), &[2, 4]);
        assert_eq!(w.dims("blocks.0.attn.proj.weight").unwrap(), &[2, 2]);
        assert_eq!(w.layer_count("blocks.", "norm1.weight").unwrap(), 1);
        // The pooler is dropped, not reported as unused.
        w.take("blocks.0.mlp.fc2.weight", &[2, 4]).unwrap();
        w.take("blocks.0.attn.proj.weight", &[2, 2]).unwrap();
        assert!(w.finish("a ViT", "none").is_ok());
    }
}
