//! Loading checkpoints: the ViT family against the reference's probabilities and feature maps,
//! what the loader reads from each format, and every way a checkpoint can be wrong (missing or
//! misshapen tensors, configs that disagree with the tensors, unsupported variants), each an
//! error naming the tensor or field as the checkpoint spells it.

use std::path::Path;

use candle_core::{Device, Tensor};
use vitcx::io::npy::read_npy;
use vitcx::model::{load, Backbone, Format};
use vitcx::Error;

use crate::common::{batch_of_one, case, crc32, manifest, max_abs_diff, reference_input};

/// A golden case's `input.npy` as a batch of one.
fn input(name: &str) -> Tensor {
    batch_of_one(&reference_input(name), (224, 224))
}

/// Logits of `model` for `x`, flattened.
fn logits(model: &dyn Backbone, x: &Tensor) -> Vec<f32> {
    let out = model.forward(x, None).unwrap();
    out.logits.flatten_all().unwrap().to_vec1().unwrap()
}

/// Golden check: probs and last-block norm1 feature maps against the PyTorch reference.
fn golden(name: &str) -> (f32, f32) {
    let model = load(&case(name), &Device::Cpu).unwrap();
    let m = manifest(name);
    let spec = model.spec().clone();
    assert_eq!(
        spec.taps[0].prefix_tokens.len() as u64,
        m["num_tokens_skipped"].as_u64().unwrap()
    );
    let out = model
        .forward(&input(name), Some(&spec.layer_taps[spec.depth - 1]))
        .unwrap();
    let probs = candle_nn::ops::softmax_last_dim(&out.logits).unwrap();
    let probs: Vec<f32> = probs.flatten_all().unwrap().to_vec1().unwrap();
    let want = read_npy(case(name).join("probs.npy")).unwrap().to_f32();
    let dp = max_abs_diff(&probs, &want);
    let top = (0..probs.len())
        .max_by(|&i, &j| probs[i].total_cmp(&probs[j]))
        .unwrap();
    assert_eq!(top as u64, m["target"].as_u64().unwrap());
    let feats = out.features.unwrap();
    assert_eq!(feats.dims(), &[1, spec.taps[0].dim, 14, 14]);
    let feats: Vec<f32> = feats.flatten_all().unwrap().to_vec1().unwrap();
    let fm = read_npy(case(name).join("feature_map.npy")).unwrap();
    assert_eq!(fm.shape, vec![spec.taps[0].dim, 14, 14]);
    let df = max_abs_diff(&feats, &fm.to_f32());
    eprintln!("{name}: max |probs diff| = {dp:e}, max |feature_map diff| = {df:e}");
    assert!(dp < 1e-5, "{name}: probs differ by {dp}");
    assert!(df < 1e-5, "{name}: feature maps differ by {df}");
    (dp, df)
}

#[test]
fn golden_vit_timm() {
    golden("vit_timm");
}

#[test]
fn golden_deit_distilled_timm() {
    golden("deit_distilled_timm");
}

#[test]
fn golden_vit_hf() {
    golden("vit_hf");
}

#[test]
fn spec_per_case() {
    for (name, family, format, prefix, depth, mean0) in [
        ("vit_timm", "Vit", Format::Timm, 1, 4, 0.5),
        (
            "deit_distilled_timm",
            "DeitDistilled",
            Format::Timm,
            2,
            3,
            0.485,
        ),
        ("vit_hf", "Vit", Format::HuggingFace, 1, 4, 0.5),
    ] {
        let model = load(&case(name), &Device::Cpu).unwrap();
        let s = model.spec();
        assert_eq!(s.family, family, "{name}");
        assert_eq!(s.taps[0].prefix_tokens.len(), prefix, "{name}");
        assert_eq!(s.taps[0].grid, (14, 14), "{name}");
        assert_eq!(s.depth, depth, "{name}");
        assert_eq!(s.details["heads"], 3, "{name}");
        assert_eq!(s.taps[0].dim, 192, "{name}");
        assert_eq!(s.details["patch"], 16, "{name}");
        assert_eq!(s.num_classes, 10, "{name}");
        let c = model.spec();
        assert_eq!(c.format, format, "{name}");
        assert_eq!(c.labels.len(), 10);
        assert_eq!(c.labels[3], "class_003");
        assert_eq!(c.preprocess.mean[0], mean0);
        assert_eq!(c.preprocess.input_size, (224, 224));
    }
    let hf = load(&case("vit_hf"), &Device::Cpu).unwrap();
    assert_eq!(hf.spec().details["layer_norm_eps"], 1e-12);
    assert_eq!(hf.spec().architecture, "ViTForImageClassification");
    let timm = load(&case("vit_timm"), &Device::Cpu).unwrap();
    assert_eq!(timm.spec().details["layer_norm_eps"], 1e-6);
    assert!(timm.spec().notes.is_empty(), "{:?}", timm.spec().notes);
}

#[test]
fn deit_heads_from_architecture_name_with_note() {
    // The deit case's model_args has no embed_dim / num_heads.
    let model = load(&case("deit_distilled_timm"), &Device::Cpu).unwrap();
    assert_eq!(model.spec().details["heads"], 3);
    assert!(model
        .spec()
        .notes
        .iter()
        .any(|n| n.contains("num_heads not in config.json; using 3")));
}

#[test]
fn weights_file_path_loads_too() {
    let model = load(&case("vit_hf").join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(model.spec().depth, 4);
}

#[test]
fn batch_matches_single() {
    for name in ["vit_timm", "deit_distilled_timm", "vit_hf"] {
        let model = load(&case(name), &Device::Cpu).unwrap();
        let x = input(name);
        let one = model.forward(&x, Some("blocks.1")).unwrap();
        let two = model
            .forward(&Tensor::cat(&[&x, &x], 0).unwrap(), Some("blocks.1"))
            .unwrap();
        assert_eq!(two.logits.dims(), &[2, 10]);
        let a: Vec<f32> = one.logits.flatten_all().unwrap().to_vec1().unwrap();
        for i in 0..2 {
            let b: Vec<f32> = two.logits.get(i).unwrap().to_vec1().unwrap();
            assert!(max_abs_diff(&a, &b) < 1e-5, "{name}");
            let fa: Vec<f32> = one
                .features
                .as_ref()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let fb: Vec<f32> = two
                .features
                .as_ref()
                .unwrap()
                .get(i)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(max_abs_diff(&fa, &fb) < 1e-5, "{name}");
        }
    }
}

#[test]
fn tap_none_and_block_taps() {
    let model = load(&case("vit_timm"), &Device::Cpu).unwrap();
    let x = input("vit_timm");
    let none = model.forward(&x, None).unwrap();
    assert!(none.features.is_none());
    let b = model.forward(&x, Some("blocks.3")).unwrap();
    let n = model.forward(&x, Some("blocks.3.norm1")).unwrap();
    let fb = b.features.unwrap();
    assert_eq!(fb.dims(), &[1, 192, 14, 14]);
    // The block output is not the norm1 output.
    let d: f32 = (fb - n.features.unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(d > 1e-3);
    let l0: Vec<f32> = none.logits.flatten_all().unwrap().to_vec1().unwrap();
    let l1: Vec<f32> = b.logits.flatten_all().unwrap().to_vec1().unwrap();
    // A tap of the last block's output makes that block finish every token, not only the
    // [CLS] row the head reads: the same logits up to the rounding of the larger products.
    assert!(
        l0.iter().zip(&l1).all(|(a, b)| (a - b).abs() < 1e-5),
        "{l0:?} {l1:?}"
    );
    // Any other tap leaves the logits' computation as it is, bit for bit.
    let l2 = model.forward(&x, Some("blocks.2")).unwrap().logits;
    assert_eq!(l0, l2.flatten_all().unwrap().to_vec1::<f32>().unwrap());
}

#[test]
fn layer_out_of_range_and_wrong_input() {
    let model = load(&case("vit_timm"), &Device::Cpu).unwrap();
    let x = input("vit_timm");
    match model.forward(&x, Some("blocks.4.norm1")) {
        Err(Error::InvalidArgument(m)) => {
            assert_eq!(m, "layer 4 out of range; model has 4 blocks")
        }
        other => panic!("unexpected {other:?}"),
    }
    let small = Tensor::zeros((1, 3, 96, 224), candle_core::DType::F32, &Device::Cpu).unwrap();
    match model.forward(&small, None) {
        Err(Error::InvalidArgument(m)) => {
            assert!(m.contains("[1, 3, 96, 224]") && m.contains("224"), "{m}")
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// Copies a case into a tempdir so it can be broken.
fn copy_case(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ] {
        let src = case(name).join(f);
        if src.is_file() {
            std::fs::copy(&src, dir.path().join(f)).unwrap();
        }
    }
    dir
}

fn edit_tensors(dir: &Path, f: impl FnOnce(&mut std::collections::HashMap<String, Tensor>)) {
    let p = dir.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    f(&mut t);
    candle_core::safetensors::save(&t, &p).unwrap();
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

fn checkpoint_reason(r: vitcx::Result<Box<dyn Backbone>>) -> String {
    match r {
        Err(Error::Checkpoint { reason, .. }) => reason,
        other => panic!("expected a checkpoint error, got {other:?}"),
    }
}

#[test]
fn missing_config_json() {
    let dir = copy_case("vit_timm");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let r = checkpoint_reason(load(dir.path(), &Device::Cpu));
    assert!(r.contains("missing config.json"), "{r}");
}

#[test]
fn missing_weights_and_path() {
    let dir = copy_case("vit_timm");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let r = checkpoint_reason(load(dir.path(), &Device::Cpu));
    assert!(r.contains("model.safetensors"), "{r}");
    let r = checkpoint_reason(load(&dir.path().join("nope"), &Device::Cpu));
    assert!(r.contains("no such file"), "{r}");
}

#[test]
fn unknown_model_type() {
    let dir = copy_case("vit_hf");
    edit_config(dir.path(), |v| v["model_type"] = "convnext".into());
    match load(dir.path(), &Device::Cpu) {
        Err(Error::Unsupported(m)) => assert!(m.contains("model_type 'convnext'"), "{m}"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn dropped_tensor_timm() {
    let dir = copy_case("vit_timm");
    edit_tensors(dir.path(), |t| {
        t.remove("blocks.3.attn.qkv.weight");
    });
    let r = checkpoint_reason(load(dir.path(), &Device::Cpu));
    assert_eq!(r, "missing tensor 'blocks.3.attn.qkv.weight'");
}

#[test]
fn dropped_tensor_hf_named_as_hub() {
    let dir = copy_case("vit_hf");
    edit_tensors(dir.path(), |t| {
        t.remove("vit.encoder.layer.2.attention.attention.key.weight");
    });
    let r = checkpoint_reason(load(dir.path(), &Device::Cpu));
    assert_eq!(
        r,
        "missing tensor 'vit.encoder.layer.2.attention.attention.key.weight'"
    );
    let dir = copy_case("vit_hf");
    edit_tensors(dir.path(), |t| {
        t.remove("vit.encoder.layer.1.layernorm_after.bias");
    });
    let r = checkpoint_reason(load(dir.path(), &Device::Cpu));
    assert_eq!(
        r,
        "missing tensor 'vit.encoder.layer.1.layernorm_after.bias'"
    );
}

#[test]
fn dropped_dist_head() {
    let dir = copy_case("deit_distilled_timm");
    edit_tensors(dir.path(), |t| {
        t.remove("head_dist.weight");
    });
    let r = checkpoint_reason(load(dir.path(), &Device::Cpu));
    assert!(r.contains("head_dist.weight"), "{r}");
}

#[test]
fn wrong_tensor_shape() {
    let dir = copy_case("vit_timm");
    edit_tensors(dir.path(), |t| {
        let z = Tensor::zeros((768, 100), candle_core::DType::F32, &Device::Cpu).unwrap();
        t.insert("blocks.1.mlp.fc2.weight".into(), z);
    });
    let r = checkpoint_reason(load(dir.path(), &Device::Cpu));
    assert_eq!(
        r,
        "tensor 'blocks.1.mlp.fc2.weight' has shape [768, 100], expected [192, 768]"
    );
}

#[test]
fn config_disagrees_with_tensors() {
    // depth 4 in config but only 3 blocks.
    let dir = copy_case("vit_timm");
    edit_tensors(dir.path(), |t| t.retain(|k, _| !k.starts_with("blocks.3.")));
    let r = checkpoint_reason(load(dir.path(), &Device::Cpu));
    assert!(
        r.contains("model_args.depth is 4") && r.contains("3"),
        "{r}"
    );
    // HF hidden size.
    let dir = copy_case("vit_hf");
    edit_config(dir.path(), |v| v["hidden_size"] = 256.into());
    let r = checkpoint_reason(load(dir.path(), &Device::Cpu));
    assert!(r.contains("hidden_size is 256") && r.contains("192"), "{r}");
    // HF label count.
    let dir = copy_case("vit_hf");
    edit_config(dir.path(), |v| {
        v["id2label"].as_object_mut().unwrap().remove("9");
    });
    let r = checkpoint_reason(load(dir.path(), &Device::Cpu));
    assert!(r.contains("id2label has 9 labels"), "{r}");
}

#[test]
fn unsupported_variants() {
    let unsupported = |dir: &std::path::Path| match load(dir, &Device::Cpu) {
        Err(Error::Unsupported(m)) => m,
        other => panic!("unexpected {other:?}"),
    };
    // A timm option vitcx does not implement is named.
    let dir = copy_case("vit_timm");
    edit_config(dir.path(), |v| {
        v["model_args"]["mlp_layer"] = "SwiGLU".into()
    });
    let m = unsupported(dir.path());
    assert!(m.contains("model_args.mlp_layer"), "{m}");
    let dir = copy_case("vit_timm");
    edit_config(dir.path(), |v| v["model_args"]["act_layer"] = "silu".into());
    let m = unsupported(dir.path());
    assert!(m.contains("act_layer = 'silu'"), "{m}");
    // An architecture whose blocks differ where the tensors cannot show it.
    let dir = copy_case("vit_timm");
    edit_config(dir.path(), |v| {
        v["architecture"] = "vit_base_patch16_rpn_224".into()
    });
    let m = unsupported(dir.path());
    assert!(m.contains("ResPostBlock"), "{m}");
    // Hugging Face: a gated MLP.
    let dir = copy_case("vit_hf");
    edit_config(dir.path(), |v| {
        v["model_type"] = "dinov2".into();
        v["use_swiglu_ffn"] = true.into();
    });
    let m = unsupported(dir.path());
    assert!(m.contains("use_swiglu_ffn"), "{m}");

    // A stated fc_norm the weights contradict; without it the tensors decide (avg pooling
    // after the final norm, as timm's SigLIP `*_gap_*` architectures set in code).
    let dir = copy_case("vit_timm");
    edit_config(dir.path(), |v| {
        v["model_args"]["global_pool"] = "avg".into();
        v["model_args"]["fc_norm"] = true.into();
    });
    let r = checkpoint_reason(load(dir.path(), &Device::Cpu));
    assert!(
        r.contains("'fc_norm'") && r.contains("'norm.weight'"),
        "{r}"
    );
    let dir = copy_case("vit_timm");
    edit_config(dir.path(), |v| {
        v["model_args"]["global_pool"] = "avg".into()
    });
    let m = load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(m.spec().details["pool"], "avg");
    assert_eq!(m.spec().details["norms"], "blocks -> norm");

    // Register tokens the position embedding does not fit.
    let dir = copy_case("vit_timm");
    edit_tensors(dir.path(), |t| {
        let z = Tensor::zeros((1, 4, 192), candle_core::DType::F32, &Device::Cpu).unwrap();
        t.insert("reg_token".into(), z);
    });
    let r = checkpoint_reason(load(dir.path(), &Device::Cpu));
    assert!(
        r.contains("'pos_embed' has 197 tokens") && r.contains("5 prefix"),
        "{r}"
    );
    // A stated option the weights contradict.
    let dir = copy_case("vit_timm");
    edit_config(dir.path(), |v| v["model_args"]["init_values"] = 1e-5.into());
    let r = checkpoint_reason(load(dir.path(), &Device::Cpu));
    assert!(
        r.contains("init_values") && r.contains("'blocks.0.ls1.gamma'"),
        "{r}"
    );
}

#[test]
fn hf_without_prefix_and_as_deit_teacher() {
    // Same weights stored without the `vit.` prefix.
    let dir = copy_case("vit_hf");
    edit_tensors(dir.path(), |t| {
        *t = t
            .drain()
            .map(|(k, v)| (k.strip_prefix("vit.").unwrap_or(&k).to_string(), v))
            .collect();
    });
    let a = load(dir.path(), &Device::Cpu).unwrap();
    let b = load(&case("vit_hf"), &Device::Cpu).unwrap();
    let x = input("vit_hf");
    let la = logits(&a, &x);
    let lb = logits(&b, &x);
    assert_eq!(la, lb);

    // The timm DeiT-distilled weights renamed to HF DeiTForImageClassificationWithTeacher
    // give the same logits as the timm checkpoint.
    let timm = load(&case("deit_distilled_timm"), &Device::Cpu).unwrap();
    let dir = copy_case("vit_hf");
    let src = candle_core::safetensors::load(
        case("deit_distilled_timm").join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut hf = std::collections::HashMap::new();
    for (k, v) in src {
        let name = match k.as_str() {
            "cls_token" => "deit.embeddings.cls_token".to_string(),
            "dist_token" => "deit.embeddings.distillation_token".to_string(),
            "pos_embed" => "deit.embeddings.position_embeddings".to_string(),
            "norm.weight" => "deit.layernorm.weight".to_string(),
            "norm.bias" => "deit.layernorm.bias".to_string(),
            _ if k.starts_with("patch_embed.proj.") => k.replace(
                "patch_embed.proj.",
                "deit.embeddings.patch_embeddings.projection.",
            ),
            _ if k.starts_with("head_dist.") => k.replace("head_dist.", "distillation_classifier."),
            _ if k.starts_with("head.") => k.replace("head.", "cls_classifier."),
            _ => {
                let (n, rest) = k.strip_prefix("blocks.").unwrap().split_once('.').unwrap();
                let p = format!("deit.encoder.layer.{n}.");
                if let Some(param) = rest.strip_prefix("attn.qkv.") {
                    for (i, q) in ["query", "key", "value"].iter().enumerate() {
                        let part = v.narrow(0, i * 192, 192).unwrap().contiguous().unwrap();
                        hf.insert(format!("{p}attention.attention.{q}.{param}"), part);
                    }
                    continue;
                }
                let (m, param) = rest.rsplit_once('.').unwrap();
                let hm = match m {
                    "norm1" => "layernorm_before",
                    "norm2" => "layernorm_after",
                    "attn.proj" => "attention.output.dense",
                    "mlp.fc1" => "intermediate.dense",
                    "mlp.fc2" => "output.dense",
                    _ => panic!("{k}"),
                };
                format!("{p}{hm}.{param}")
            }
        };
        hf.insert(name, v);
    }
    candle_core::safetensors::save(&hf, dir.path().join("model.safetensors")).unwrap();
    edit_config(dir.path(), |v| {
        v["model_type"] = "deit".into();
        v["num_hidden_layers"] = 3.into();
        v["layer_norm_eps"] = 1e-6.into();
        v["architectures"] = serde_json::json!(["DeiTForImageClassificationWithTeacher"]);
    });
    let hfm = load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(hfm.spec().family, "DeitDistilled");
    assert_eq!(hfm.spec().taps[0].prefix_tokens.len(), 2);
    let x = input("deit_distilled_timm");
    let a = hfm.forward(&x, Some("blocks.2.norm1")).unwrap();
    let b = timm.forward(&x, Some("blocks.2.norm1")).unwrap();
    let la: Vec<f32> = a.logits.flatten_all().unwrap().to_vec1().unwrap();
    let lb: Vec<f32> = b.logits.flatten_all().unwrap().to_vec1().unwrap();
    assert!(max_abs_diff(&la, &lb) < 1e-6);

    // Dropping one of the fused projections names it as the Hub does.
    edit_tensors(dir.path(), |t| {
        t.remove("deit.encoder.layer.0.attention.attention.value.bias");
    });
    let r = checkpoint_reason(load(dir.path(), &Device::Cpu));
    assert_eq!(
        r,
        "missing tensor 'deit.encoder.layer.0.attention.attention.value.bias'"
    );
}

/// Writes `entries` as an uncompressed zip (the container of PyTorch's `torch.save`).
fn write_zip(path: &Path, entries: &[(String, Vec<u8>)]) {
    let (mut out, mut central) = (Vec::new(), Vec::new());
    let u16le = |v: &mut Vec<u8>, x: u16| v.extend_from_slice(&x.to_le_bytes());
    let u32le = |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&x.to_le_bytes());
    for (name, data) in entries {
        let (crc, len, off) = (crc32(data), data.len() as u32, out.len() as u32);
        u32le(&mut out, 0x0403_4b50);
        for x in [20, 0, 0, 0, 0x21] {
            u16le(&mut out, x);
        }
        for x in [crc, len, len] {
            u32le(&mut out, x);
        }
        u16le(&mut out, name.len() as u16);
        u16le(&mut out, 0);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
        u32le(&mut central, 0x0201_4b50);
        for x in [20, 20, 0, 0, 0, 0x21] {
            u16le(&mut central, x);
        }
        for x in [crc, len, len] {
            u32le(&mut central, x);
        }
        for x in [name.len() as u16, 0, 0, 0, 0] {
            u16le(&mut central, x);
        }
        u32le(&mut central, 0);
        u32le(&mut central, off);
        central.extend_from_slice(name.as_bytes());
    }
    let (cd_off, cd_len, n) = (out.len() as u32, central.len() as u32, entries.len() as u16);
    out.extend_from_slice(&central);
    u32le(&mut out, 0x0605_4b50);
    for x in [0, 0, n, n] {
        u16le(&mut out, x);
    }
    u32le(&mut out, cd_len);
    u32le(&mut out, cd_off);
    u16le(&mut out, 0);
    std::fs::write(path, out).unwrap();
}

/// Writes f32 tensors as a PyTorch `state_dict` pickle (`pytorch_model.bin`).
/// With `nest`, the state dict sits under that key of an outer dict, as training checkpoints
/// store it (`{"model": state_dict, ...}`).
fn write_pth(path: &Path, tensors: &std::collections::HashMap<String, Tensor>, nest: Option<&str>) {
    let mut pkl = vec![0x80, 2, b'}', b'('];
    let unicode = |p: &mut Vec<u8>, s: &str| {
        p.push(b'X');
        p.extend_from_slice(&(s.len() as u32).to_le_bytes());
        p.extend_from_slice(s.as_bytes());
    };
    if let Some(key) = nest {
        unicode(&mut pkl, key);
        pkl.extend_from_slice(b"}(");
    }
    let int = |p: &mut Vec<u8>, x: usize| {
        p.push(b'J');
        p.extend_from_slice(&(x as i32).to_le_bytes());
    };
    let mut entries = Vec::new();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for (i, name) in names.into_iter().enumerate() {
        let t = &tensors[name];
        unicode(&mut pkl, name);
        pkl.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        pkl.push(b'(');
        unicode(&mut pkl, "storage");
        pkl.extend_from_slice(b"ctorch\nFloatStorage\n");
        unicode(&mut pkl, &i.to_string());
        unicode(&mut pkl, "cpu");
        int(&mut pkl, t.elem_count());
        pkl.extend_from_slice(b"tQ");
        int(&mut pkl, 0);
        let dims = t.dims();
        let mut strides = vec![1usize; dims.len()];
        for d in (0..dims.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * dims[d + 1];
        }
        for v in [dims, strides.as_slice()] {
            pkl.push(b'(');
            for &x in v {
                int(&mut pkl, x);
            }
            pkl.push(b't');
        }
        pkl.extend_from_slice(&[0x89, b'N', b't', b'R']);
        let data: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        entries.push((format!("archive/data/{i}"), bytes));
    }
    if nest.is_some() {
        pkl.push(b'u');
    }
    pkl.extend_from_slice(b"u.");
    entries.insert(0, ("archive/data.pkl".to_string(), pkl));
    write_zip(path, &entries);
}

#[test]
fn pytorch_bin_loads_like_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        case("vit_timm").join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let t =
        candle_core::safetensors::load(case("vit_timm").join("model.safetensors"), &Device::Cpu)
            .unwrap();
    write_pth(&dir.path().join("pytorch_model.bin"), &t, None);
    let nested = tempfile::tempdir().unwrap();
    std::fs::copy(
        case("vit_timm").join("config.json"),
        nested.path().join("config.json"),
    )
    .unwrap();
    write_pth(&nested.path().join("model.pth"), &t, Some("model"));
    let x = input("vit_timm");
    let want = load(&case("vit_timm"), &Device::Cpu)
        .unwrap()
        .forward(&x, None)
        .unwrap()
        .logits;
    for p in [
        dir.path().to_path_buf(),
        dir.path().join("pytorch_model.bin"),
        nested.path().join("model.pth"),
    ] {
        let got = load(&p, &Device::Cpu)
            .unwrap()
            .forward(&x, None)
            .unwrap()
            .logits;
        let d: f32 = (&got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(d, 0.0, "{}", p.display());
    }
}

#[test]
fn timm_deit_is_a_plain_vit_and_hf_deit_without_teacher_keeps_dist_token() {
    let dir = copy_case("vit_timm");
    edit_config(dir.path(), |v| {
        v["architecture"] = "deit_tiny_patch16_224".into()
    });
    let deit = load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(deit.spec().family, "Deit");
    assert_eq!(deit.spec().taps[0].prefix_tokens.len(), 1);
    let x = input("vit_timm");
    let vit = load(&case("vit_timm"), &Device::Cpu).unwrap();
    let a = logits(&deit, &x);
    let b = logits(&vit, &x);
    assert_eq!(a, b);

    // A distilled architecture name without the [DIST] token.
    let dir = copy_case("vit_timm");
    edit_config(dir.path(), |v| {
        v["architecture"] = "deit_tiny_distilled_patch16_224".into()
    });
    let r = checkpoint_reason(load(dir.path(), &Device::Cpu));
    assert!(r.contains("missing tensor 'dist_token'"), "{r}");

    // HF DeiTForImageClassification: [CLS] + [DIST] tokens, one classifier on [CLS].
    let dir = copy_case("vit_hf");
    edit_tensors(dir.path(), |t| {
        *t = t
            .drain()
            .map(|(k, v)| (k.replacen("vit.", "deit.", 1), v))
            .collect();
        let pos = t["deit.embeddings.position_embeddings"].clone();
        let pos = Tensor::cat(&[&pos.narrow(1, 0, 1).unwrap(), &pos], 1).unwrap();
        t.insert("deit.embeddings.position_embeddings".into(), pos);
        let cls = t["deit.embeddings.cls_token"].clone();
        t.insert("deit.embeddings.distillation_token".into(), cls);
    });
    edit_config(dir.path(), |v| {
        v["model_type"] = "deit".into();
        v["architectures"] = serde_json::json!(["DeiTForImageClassification"]);
    });
    let m = load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(m.spec().family, "Deit");
    assert_eq!(m.spec().taps[0].prefix_tokens.len(), 2);
    let out = m.forward(&input("vit_hf"), Some("blocks.0.norm1")).unwrap();
    assert_eq!(out.logits.dims(), &[1, 10]);
    assert_eq!(out.features.unwrap().dims(), &[1, 192, 14, 14]);
    // Its mean/std come from preprocessor_config.json, not the DeiT default.
    assert_eq!(m.spec().preprocess.mean, [0.5; 3]);
}

/// Weights that cannot give a finite answer are refused at load, naming the tensor; so are
/// integer weights, 0 classes and a preprocessing that divides by 0.
#[test]
fn unusable_weights_and_preprocessing_are_refused_at_load() {
    let dev = Device::Cpu;
    for (name, value) in [
        ("head.weight", f32::NAN),
        ("patch_embed.proj.weight", f32::INFINITY),
    ] {
        let dir = copy_case("vit_timm");
        edit_tensors(dir.path(), |t| {
            // One bad value among the real weights.
            let w = &t[name];
            let mut v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v[0] = value;
            let v = Tensor::from_vec(v, w.dims(), &dev).unwrap();
            t.insert(name.into(), v);
        });
        let r = checkpoint_reason(load(dir.path(), &dev));
        assert!(r.contains(name) && r.contains("NaN or infinite"), "{r}");
    }
    let dir = copy_case("vit_timm");
    edit_tensors(dir.path(), |t| {
        let w = t["head.bias"].to_dtype(candle_core::DType::I64).unwrap();
        t.insert("head.bias".into(), w);
    });
    let r = checkpoint_reason(load(dir.path(), &dev));
    assert!(r.contains("head.bias") && r.contains("integers"), "{r}");

    let dir = copy_case("vit_timm");
    edit_tensors(dir.path(), |t| {
        t.insert(
            "head.weight".into(),
            Tensor::zeros((0, 192), candle_core::DType::F32, &dev).unwrap(),
        );
        t.insert(
            "head.bias".into(),
            Tensor::zeros(0, candle_core::DType::F32, &dev).unwrap(),
        );
    });
    edit_config(dir.path(), |v| {
        v["num_classes"] = 0.into();
        v["model_args"]["num_classes"] = 0.into();
        v["pretrained_cfg"]["num_classes"] = 0.into();
        v.as_object_mut().unwrap().remove("label_names");
    });
    let r = checkpoint_reason(load(dir.path(), &dev));
    assert!(r.contains("0 classes"), "{r}");

    for (field, value) in [("std", 0.0), ("mean", f64::MAX)] {
        let dir = copy_case("vit_timm");
        edit_config(dir.path(), |v| {
            v["pretrained_cfg"][field] = serde_json::json!([value, 0.5, 0.5])
        });
        let r = checkpoint_reason(load(dir.path(), &dev));
        assert!(r.contains(field) && r.contains("must be finite"), "{r}");
    }
}
