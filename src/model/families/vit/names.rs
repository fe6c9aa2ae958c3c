//! The ViT family's tensor names: Hugging Face's mapped to timm's, in one place.
//!
//! The model code sees timm names only: `cls_token`, `dist_token`, `reg_token`, `pos_embed`,
//! `patch_embed.proj.*`, `norm_pre.*`, `blocks.N.{norm1,attn.qkv,attn.q_norm,attn.k_norm,
//! attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}.*`, `norm.*`, `fc_norm.*`, `head.*`,
//! `head_dist.*`. Hugging Face's separate query/key/value projections are fused into timm's
//! `qkv` (rows in q, k, v order, as timm's `checkpoint_filter_fn` does), so every format runs
//! through the same code. Error messages name tensors as the checkpoint spells them.
//!
//! Hugging Face spells the same ViT three ways ([`Dialect`]): ViT/DeiT, DINOv2 (with and
//! without registers), and CLIP/SigLIP's vision tower.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::model::config::Format;
use crate::model::weights::Weights;

/// How a Hugging Face model type names its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// `vit`, `deit`: `{vit,deit}.encoder.layer.N.layernorm_before`, ...
    Vit,
    /// `dinov2`, `dinov2_with_registers`: `dinov2.encoder.layer.N.norm1`, `layer_scale1`, ...
    Dinov2,
    /// `clip`, `siglip` (vision tower): `vision_model.encoder.layers.N.layer_norm1`, ...
    Clip,
    /// SigLIP: as CLIP, but the final `post_layernorm` is applied to every token.
    Siglip,
}

impl Dialect {
    /// The dialect of a Hugging Face `model_type`.
    pub(crate) fn of(model_type: &str) -> Option<Dialect> {
        match model_type {
            "vit" | "deit" => Some(Dialect::Vit),
            "dinov2" | "dinov2_with_registers" => Some(Dialect::Dinov2),
            "clip" => Some(Dialect::Clip),
            "siglip" => Some(Dialect::Siglip),
            _ => None,
        }
    }

    /// Non-block tensors (after the model prefix): Hugging Face name, timm name.
    fn top(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Dialect::Vit => &[
                ("embeddings.cls_token", "cls_token"),
                ("embeddings.distillation_token", "dist_token"),
                ("embeddings.position_embeddings", "pos_embed"),
                ("embeddings.patch_embeddings.projection.weight", "patch_embed.proj.weight"),
                ("embeddings.patch_embeddings.projection.bias", "patch_embed.proj.bias"),
                ("layernorm.weight", "norm.weight"),
                ("layernorm.bias", "norm.bias"),
            ],
            Dialect::Dinov2 => &[
                ("embeddings.cls_token", "cls_token"),
                ("embeddings.register_tokens", "reg_token"),
                ("embeddings.position_embeddings", "pos_embed"),
                ("embeddings.patch_embeddings.projection.weight", "patch_embed.proj.weight"),
                ("embeddings.patch_embeddings.projection.bias", "patch_embed.proj.bias"),
                ("layernorm.weight", "norm.weight"),
                ("layernorm.bias", "norm.bias"),
            ],
            Dialect::Clip => &[
                ("embeddings.class_embedding", "cls_token"),
                ("embeddings.position_embedding.weight", "pos_embed"),
                ("embeddings.patch_embedding.weight", "patch_embed.proj.weight"),
                ("embeddings.patch_embedding.bias", "patch_embed.proj.bias"),
                ("pre_layrnorm.weight", "norm_pre.weight"),
                ("pre_layrnorm.bias", "norm_pre.bias"),
            ],
            Dialect::Siglip => &[
                ("embeddings.position_embedding.weight", "pos_embed"),
                ("embeddings.patch_embedding.weight", "patch_embed.proj.weight"),
                ("embeddings.patch_embedding.bias", "patch_embed.proj.bias"),
                ("post_layernorm.weight", "norm.weight"),
                ("post_layernorm.bias", "norm.bias"),
            ],
        }
    }

    /// Where the blocks are: `encoder.layer.` or `encoder.layers.`.
    fn blocks(self) -> &'static str {
        match self {
            Dialect::Vit | Dialect::Dinov2 => "encoder.layer.",
            Dialect::Clip | Dialect::Siglip => "encoder.layers.",
        }
    }

    /// Tensors inside a block (after `N.`): Hugging Face name, timm name. An entry without a
    /// parameter (no `.weight`/`.bias`) maps a module and keeps the parameter's name.
    fn block(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Dialect::Vit => &[
                ("layernorm_before", "norm1"),
                ("attention.output.dense", "attn.proj"),
                ("layernorm_after", "norm2"),
                ("intermediate.dense", "mlp.fc1"),
                ("output.dense", "mlp.fc2"),
            ],
            Dialect::Dinov2 => &[
                ("norm1", "norm1"),
                ("attention.output.dense", "attn.proj"),
                ("layer_scale1.lambda1", "ls1.gamma"),
                ("norm2", "norm2"),
                ("mlp.fc1", "mlp.fc1"),
                ("mlp.fc2", "mlp.fc2"),
                ("layer_scale2.lambda1", "ls2.gamma"),
            ],
            Dialect::Clip | Dialect::Siglip => &[
                ("layer_norm1", "norm1"),
                ("self_attn.out_proj", "attn.proj"),
                ("layer_norm2", "norm2"),
                ("mlp.fc1", "mlp.fc1"),
                ("mlp.fc2", "mlp.fc2"),
            ],
        }
    }

    /// The separate attention projections, fused in this order into timm's `attn.qkv`.
    fn qkv(self) -> [&'static str; 3] {
        match self {
            Dialect::Vit | Dialect::Dinov2 => [
                "attention.attention.query",
                "attention.attention.key",
                "attention.attention.value",
            ],
            Dialect::Clip | Dialect::Siglip => {
                ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
            }
        }
    }

    /// Tensors (after the model prefix) that the image classifier never uses: the pooler of
    /// `ViTModel`, the masked-image-modelling token, CLIP's `post_layernorm` (it norms only the
    /// pooled \[CLS\] of the contrastive model; the classifier averages the un-normed tokens),
    /// SigLIP's attention-pooling `head` (the classifier averages the tokens instead).
    fn ignored(self, rest: &str) -> bool {
        match self {
            Dialect::Vit => rest.starts_with("pooler.") || rest == "embeddings.mask_token",
            Dialect::Dinov2 => rest == "embeddings.mask_token",
            Dialect::Clip => {
                rest.starts_with("post_layernorm.") || rest == "embeddings.position_ids"
            }
            Dialect::Siglip => rest.starts_with("head.") || rest == "embeddings.position_ids",
        }
    }
}

/// Hugging Face classifier names (never prefixed) of the heads.
const HF_HEADS: &[(&str, &str)] = &[
    ("classifier.weight", "head.weight"),
    ("classifier.bias", "head.bias"),
    ("cls_classifier.weight", "head.weight"),
    ("cls_classifier.bias", "head.bias"),
    ("distillation_classifier.weight", "head_dist.weight"),
    ("distillation_classifier.bias", "head_dist.bias"),
];

/// How the checkpoint spells tensor names, to report errors in its own terms.
#[derive(Debug, Clone)]
struct Naming {
    format: Format,
    dialect: Dialect,
    /// `vit.`, `deit.`, `dinov2.`, `vision_model.` ... or empty (Hugging Face only).
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
        let d = self.dialect;
        if let Some((hf, _)) = d.top().iter().find(|(_, t)| *t == name) {
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
                let blocks = d.blocks();
                if let Some((_, hf)) = d.block().iter().map(|(h, t)| (t, h)).find(|(t, _)| **t == module) {
                    return format!("{p}{blocks}{n}.{hf}");
                }
                let (path, param) = split_param(module);
                if path == "attn.qkv" {
                    let [q, k, v] = d.qkv();
                    let (common, q) = q.rsplit_once('.').unwrap_or(("", q));
                    let k = k.rsplit_once('.').map_or(k, |x| x.1);
                    let v = v.rsplit_once('.').map_or(v, |x| x.1);
                    return format!("{p}{blocks}{n}.{common}.{{{q},{k},{v}}}.{param}");
                }
                if let Some((hf, _)) = d.block().iter().find(|(_, t)| *t == path) {
                    return format!("{p}{blocks}{n}.{hf}.{param}");
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
/// `model_type` picks the Hugging Face dialect.
pub(crate) fn weights(
    path: &Path,
    format: Format,
    model_type: Option<&str>,
    raw: HashMap<String, Tensor>,
) -> Result<Weights> {
    let dialect = model_type.and_then(Dialect::of).unwrap_or(Dialect::Vit);
    let mut naming = Naming {
        format,
        dialect,
        prefix: String::new(),
        teacher: false,
    };
    let tensors = match format {
        Format::Timm => raw,
        Format::HuggingFace => {
            naming.prefix = model_prefix(dialect, &raw);
            naming.teacher = raw.keys().any(|k| k.starts_with("cls_classifier."));
            hf_to_timm(path, dialect, &naming.prefix, raw)?
        }
    };
    Ok(Weights::new(path, tensors, move |n| naming.source_name(n)))
}

/// The prefix before `embeddings.` of the patch embedding (`vit.`, `dinov2.`,
/// `vision_model.`, ...), else before the blocks; empty when there is none.
fn model_prefix(dialect: Dialect, raw: &HashMap<String, Tensor>) -> String {
    let probe = dialect
        .top()
        .iter()
        .find(|(_, t)| *t == "patch_embed.proj.weight")
        .map(|(hf, _)| *hf)
        .unwrap_or("embeddings.patch_embeddings.projection.weight");
    let mut found: Vec<&str> = raw.keys().filter_map(|k| k.strip_suffix(probe)).collect();
    if found.is_empty() {
        // No patch embedding (reported later as missing): the prefix of the blocks, if any.
        found = raw
            .keys()
            .filter_map(|k| k.find(dialect.blocks()).map(|i| &k[..i]))
            .collect();
    }
    found.sort_unstable();
    found.first().map(|p| p.to_string()).unwrap_or_default()
}

/// Maps Hugging Face names to timm names, fusing query/key/value into `qkv` and giving CLIP's
/// 1-d class embedding and 2-d position embedding timm's `(1, T, D)` shapes. Unknown names are
/// kept as they are (reported later as unused).
fn hf_to_timm(
    path: &Path,
    dialect: Dialect,
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
    let names = dialect.qkv();
    for (key, t) in raw {
        if let Some((_, timm)) = HF_HEADS.iter().find(|(hf, _)| *hf == key) {
            insert(&mut out, timm.to_string(), &key, t)?;
            continue;
        }
        let rest = key.strip_prefix(prefix).unwrap_or(&key);
        if dialect.ignored(rest) {
            continue;
        }
        if let Some((_, timm)) = dialect.top().iter().find(|(hf, _)| *hf == rest) {
            let t = match (*timm, t.rank()) {
                ("cls_token", 1) => t.reshape((1, 1, ()))?,
                ("pos_embed", 2) => t.unsqueeze(0)?,
                _ => t,
            };
            insert(&mut out, timm.to_string(), &key, t)?;
            continue;
        }
        if let Some((n, module)) = rest
            .strip_prefix(dialect.blocks())
            .and_then(|r| r.split_once('.'))
            .filter(|(n, _)| n.parse::<usize>().is_ok())
        {
            if let Some((_, timm)) = dialect.block().iter().find(|(hf, _)| *hf == module) {
                insert(&mut out, format!("blocks.{n}.{timm}"), &key, t)?;
                continue;
            }
            let (mpath, param) = split_param(module);
            if let Some(i) = names.iter().position(|q| *q == mpath) {
                // `i` is a position in the 3 names, so it indexes the 3 slots.
                qkv.entry((n.to_string(), param.to_string())).or_default()[i] = Some(t);
                continue;
            }
            if let Some((_, timm)) = dialect.block().iter().find(|(hf, _)| *hf == mpath) {
                insert(&mut out, format!("blocks.{n}.{timm}.{param}"), &key, t)?;
                continue;
            }
        }
        insert(&mut out, key.clone(), &key, t)?;
    }
    let blocks = dialect.blocks();
    for ((n, param), parts) in qkv {
        let mut found = Vec::with_capacity(3);
        for (i, part) in parts.into_iter().enumerate() {
            match part {
                Some(t) => found.push(t),
                None => {
                    return Err(Error::Checkpoint {
                        path: path.to_path_buf(),
                        reason: format!("missing tensor '{prefix}{blocks}{n}.{}.{param}'", names[i]),
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
            dialect: Dialect::Vit,
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
        let mut w = weights(Path::new("m.safetensors"), Format::HuggingFace, Some("vit"), raw).unwrap();
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

    #[test]
    fn dinov2_and_clip_names_map_both_ways() {
        let dev = Device::Cpu;
        let z = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &dev).unwrap();
        let mut raw = HashMap::new();
        for q in ["q_proj", "k_proj", "v_proj"] {
            raw.insert(format!("vision_model.encoder.layers.0.self_attn.{q}.weight"), z(&[4, 4]));
        }
        raw.insert("vision_model.embeddings.class_embedding".into(), z(&[4]));
        raw.insert("vision_model.embeddings.position_embedding.weight".into(), z(&[5, 4]));
        raw.insert("vision_model.embeddings.patch_embedding.weight".into(), z(&[4, 3, 2, 2]));
        raw.insert("vision_model.post_layernorm.weight".into(), z(&[4]));
        let mut w = weights(Path::new("m.safetensors"), Format::HuggingFace, Some("clip"), raw).unwrap();
        assert_eq!(w.dims("cls_token").unwrap(), &[1, 1, 4]);
        assert_eq!(w.dims("pos_embed").unwrap(), &[1, 5, 4]);
        assert_eq!(w.dims("blocks.0.attn.qkv.weight").unwrap(), &[12, 4]);
        assert_eq!(
            w.source_name("blocks.0.attn.qkv.weight"),
            "vision_model.encoder.layers.0.self_attn.{q_proj,k_proj,v_proj}.weight"
        );
        assert_eq!(w.source_name("norm_pre.bias"), "vision_model.pre_layrnorm.bias");
        // CLIP's post_layernorm is not the classifier's: dropped, not reported as unused.
        for n in ["cls_token", "pos_embed", "blocks.0.attn.qkv.weight"] {
            let dims = w.dims(n).unwrap().to_vec();
            w.take(n, &dims).unwrap();
        }
        w.take("patch_embed.proj.weight", &[4, 3, 2, 2]).unwrap();
        assert!(w.finish("a ViT", "none").is_ok());

        let mut raw = HashMap::new();
        raw.insert("dinov2.encoder.layer.1.layer_scale2.lambda1".into(), z(&[4]));
        raw.insert("dinov2.embeddings.patch_embeddings.projection.weight".into(), z(&[4, 3, 2, 2]));
        raw.insert("dinov2.embeddings.register_tokens".into(), z(&[1, 4, 4]));
        let w = weights(Path::new("m.safetensors"), Format::HuggingFace, Some("dinov2_with_registers"), raw).unwrap();
        assert!(w.contains("blocks.1.ls2.gamma") && w.contains("reg_token"));
        assert_eq!(
            w.source_name("blocks.1.ls2.gamma"),
            "dinov2.encoder.layer.1.layer_scale2.lambda1"
        );
        assert_eq!(
            w.source_name("blocks.0.attn.qkv.bias"),
            "dinov2.encoder.layer.0.attention.attention.{query,key,value}.bias"
        );
    }
}
