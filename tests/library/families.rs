//! The seam takes a model family vitcx has never heard of: a toy family defined here (each
//! patch's mean colour as its tokens, a linear head on their average) is loaded through
//! `load_with` and explained by the same methods as a ViT, with no change to them; what it does
//! not offer (attention, gradients) is refused in one line.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::Deserialize;
use vitcx::methods::{Explainer, NoProgress};
use vitcx::model::weights::Weights;
use vitcx::model::{Backbone, Checkpoint, Family, Format, Forward, Preprocess, Spec, TapInfo};
use vitcx::{MethodParams, Targets};

/// A patch-mean model: tokens are the mean colour of each `patch x patch` patch (3 channels, no
/// prefix tokens), logits a linear head on the average token.
struct PatchMean {
    spec: Spec,
    device: Device,
    patch: usize,
    head_w: Tensor,
    head_b: Tensor,
}

/// Its `config.json`.
#[derive(Deserialize)]
struct ToyConfig {
    patch_size: usize,
    image_size: usize,
    labels: Vec<String>,
}

const TOY: Family = Family {
    name: "patch_mean",
    covers: "toy models of tests/library/families.rs (model_type patch_mean)",
    claims: |format, config| format == Format::HuggingFace && config["model_type"] == "patch_mean",
    build: |mut ckpt, device| Ok(Box::new(PatchMean::build(&mut ckpt, device)?)),
};

impl PatchMean {
    fn build(ckpt: &mut Checkpoint, device: &Device) -> vitcx::Result<Self> {
        let cfg: ToyConfig = ckpt.parse()?;
        let c = cfg.labels.len();
        let tensors = std::mem::take(&mut ckpt.tensors);
        let mut w = Weights::new(&ckpt.weights_path, tensors, |n| n.to_string());
        let head_w = w.take("head.weight", &[c, 3])?;
        let head_b = w.take("head.bias", &[c])?;
        w.finish("a patch-mean model", "it has a head and nothing else")?;
        let g = cfg.image_size / cfg.patch_size;
        let tap = TapInfo {
            name: "patches".into(),
            layer: 0,
            grid: (g, g),
            dim: 3,
            prefix_tokens: vec![],
        };
        let size = (cfg.image_size, cfg.image_size);
        let spec = Spec {
            family: "PatchMean".into(),
            format: ckpt.format,
            architecture: "patch_mean".into(),
            input_size: size,
            num_classes: c,
            labels: cfg.labels,
            preprocess: Preprocess {
                mean: [0.0; 3],
                std: [1.0; 3],
                input_size: size,
                interpolation: None,
                crop_pct: None,
                resize_shortest: None,
                crop: None,
            },
            depth: 1,
            layer_taps: vec![tap.name.clone()],
            taps: vec![tap],
            notes: vec![],
            details: Default::default(),
        };
        Ok(PatchMean {
            spec,
            device: device.clone(),
            patch: cfg.patch_size,
            head_w,
            head_b,
        })
    }
}

impl Backbone for PatchMean {
    fn spec(&self) -> &Spec {
        &self.spec
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn forward(&self, px: &Tensor, tap: Option<&str>) -> vitcx::Result<Forward> {
        let (b, _, h, w) = px.dims4()?;
        let p = self.patch;
        let tokens = px.reshape((b, 3, h / p, p, w / p, p))?.mean(5)?.mean(3)?;
        let pooled = tokens.mean(3)?.mean(2)?;
        let logits = pooled
            .matmul(&self.head_w.t()?)?
            .broadcast_add(&self.head_b)?;
        let features = match tap {
            None => None,
            Some(name) => {
                self.spec.tap(name)?;
                Some(tokens.contiguous()?)
            }
        };
        Ok(Forward { logits, features })
    }
}

/// A toy checkpoint in a temporary directory: 64 px, patch 16, classes red/green/blue, a head
/// that reads each colour channel as its class.
fn checkpoint() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let config = serde_json::json!({
        "model_type": "patch_mean", "patch_size": 16, "image_size": 64,
        "labels": ["red", "green", "blue"],
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let mut eye = vec![0f32; 9];
    for i in 0..3 {
        eye[i * 3 + i] = 100.0;
    }
    let t = HashMap::from([
        (
            "head.weight".to_string(),
            Tensor::from_vec(eye, (3, 3), &Device::Cpu).unwrap(),
        ),
        (
            "head.bias".to_string(),
            Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
        ),
    ]);
    candle_core::safetensors::save(&t, dir.path().join("model.safetensors")).unwrap();
    dir
}

/// A grey 64x64 image `(3, 64, 64)` with a red 16x16 square at rows 8..24, columns 40..56.
fn red_square() -> Vec<f32> {
    let mut x = vec![0.2f32; 3 * 64 * 64];
    for y in 8..24 {
        for c in 40..56 {
            x[y * 64 + c] = 1.0;
        }
    }
    x
}

fn load(dir: &Path) -> Box<dyn Backbone> {
    vitcx::model::load_with(&[TOY, vitcx::model::FAMILIES[0]], dir, &Device::Cpu).unwrap()
}

#[test]
fn a_new_family_is_explained_by_the_same_methods() {
    let dir = checkpoint();
    let model = load(dir.path());
    assert_eq!(model.spec().family, "PatchMean");
    let x = red_square();
    let params = MethodParams {
        rise: vitcx::methods::rise::RiseParams {
            masks: 256,
            cells: 4,
            ..Default::default()
        },
        ..Default::default()
    };
    let inside = |m: &[f32]| {
        let (mut a, mut b) = (0f32, 0f32);
        for (i, v) in m.iter().enumerate() {
            let (y, c) = (i / 64, i % 64);
            if (8..24).contains(&y) && (40..56).contains(&c) {
                a += v / 256.0;
            } else {
                b += v / (4096.0 - 256.0);
            }
        }
        (a, b)
    };
    for name in ["vitcx", "rise", "center"] {
        let method = Explainer::by_name(name, &params, &model).unwrap();
        let ex = method
            .explain(&model, &x, &Targets::default(), 0, &mut NoProgress)
            .unwrap();
        assert_eq!(ex.classes, vec![0], "{name}: the red class");
        assert_eq!(ex.saliency[0].len(), 64 * 64, "{name}");
        if name != "center" {
            let (a, b) = inside(&ex.saliency[0]);
            assert!(a > b, "{name}: saliency inside the square {a}, outside {b}");
        }
    }
    let vitcx = Explainer::by_name("vitcx", &params, &model).unwrap();
    let ex = vitcx
        .explain(&model, &x, &Targets::default(), 0, &mut NoProgress)
        .unwrap();
    assert_eq!(ex.count("n_feature_maps"), Some(3), "the 3 colour channels");
}

#[test]
fn what_the_family_lacks_is_refused_in_one_line() {
    let dir = checkpoint();
    let model = load(dir.path());
    let x = red_square();
    let params = MethodParams::default();
    // Rollout is refused when set up (the model has no [CLS] token to follow), Grad-CAM when
    // it asks for the gradient.
    for (name, why) in [
        ("rollout", "has no class token"),
        ("gradcam", "has no backward pass"),
    ] {
        let e = match Explainer::by_name(name, &params, &model) {
            Err(e) => e.to_string(),
            Ok(method) => method
                .explain(&model, &x, &Targets::default(), 0, &mut NoProgress)
                .unwrap_err()
                .to_string(),
        };
        assert!(e.contains(why) && !e.contains('\n'), "{name}: {e}");
    }
    let e = Explainer::by_name(
        "vitcx",
        &MethodParams {
            vitcx: vitcx::VitCxParams {
                layer: 1,
                ..Default::default()
            },
            ..Default::default()
        },
        &model,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("layer 1 out of range; model has 1 blocks"),
        "{e}"
    );
}

#[test]
fn the_default_registry_refuses_it_naming_the_families_it_has() {
    let dir = checkpoint();
    let e = vitcx::model::load(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model_type 'patch_mean'"), "{e}");
    assert!(e.contains("supported families: vit ("), "{e}");
}
