//! The Swin family against PyTorch (timm and transformers): logits and tapped tokens of small
//! random-weight checkpoints (four stages of 56 down to 7, the original timm layout with its
//! merges at the end of a stage, Hugging Face), a model built for another input size, and what
//! Swin refuses (Attention Rollout, sizes the windows do not tile).
//! Fixtures: `tests/data/swin_zoo/<case>`, made by `scripts/make_fixtures.py`.

use crate::common::max_abs_diff;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use vitcx::io::npy::read_npy;
use vitcx::model::Backbone;

fn zoo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/swin_zoo")
}

fn tensor(path: PathBuf) -> Tensor {
    let a = read_npy(path).unwrap();
    Tensor::from_vec(a.to_f32(), a.shape.clone(), &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Reference tokens `(B, H*W, C)` as feature maps `(B, C, H, W)`, flattened.
fn maps(tokens: &Tensor, grid: (usize, usize)) -> Vec<f32> {
    let (b, _, c) = tokens.dims3().unwrap();
    flat(
        &tokens
            .transpose(1, 2)
            .unwrap()
            .reshape((b, c, grid.0, grid.1))
            .unwrap(),
    )
}

fn pair(v: &serde_json::Value) -> (usize, usize) {
    (
        v[0].as_u64().unwrap() as usize,
        v[1].as_u64().unwrap() as usize,
    )
}

#[test]
fn every_swin_case_matches_pytorch() {
    let cases = crate::common::case_dirs(&zoo());
    assert!(cases.len() >= 3, "swin fixtures missing: {cases:?}");
    for dir in cases {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let meta = crate::common::zoo_meta(&dir);
        let model = vitcx::model::load(&dir, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{name}: cannot load: {e}"));
        let spec = model.spec().clone();
        assert_eq!(spec.family, "Swin", "{name}");
        assert_eq!(
            spec.depth,
            meta["depth"].as_u64().unwrap() as usize,
            "{name}"
        );
        assert_eq!(spec.details["heads"], meta["heads"], "{name}: heads");
        assert_eq!(
            spec.num_classes,
            meta["num_classes"].as_u64().unwrap() as usize
        );
        let eps = meta["layer_norm_eps"].as_f64().unwrap();
        assert!((spec.details["layer_norm_eps"].as_f64().unwrap() - eps).abs() < eps * 1e-6);
        // The default tap: the last stage's last block's first norm.
        let tap = spec.layer_tap(-1).unwrap().clone();
        let last_stage = meta["heads"].as_array().unwrap().len() - 1;
        assert_eq!(
            tap.name,
            format!("layers.{last_stage}.blocks.1.norm1"),
            "{name}"
        );
        let grid = pair(&meta["grid"]);
        assert_eq!(tap.grid, grid, "{name}: grid");
        assert_eq!(
            tap.dim,
            meta["dim"].as_u64().unwrap() as usize,
            "{name}: dim"
        );
        assert!(tap.prefix_tokens.is_empty());

        let px = tensor(dir.join("reference/input.npy"));
        let out = model.forward(&px, Some(&tap.name)).unwrap();
        let d = max_abs_diff(
            &flat(&out.logits),
            &flat(&tensor(dir.join("reference/logits.npy"))),
        );
        assert!(d < 1e-4, "{name}: logits differ by {d}");
        let want = maps(&tensor(dir.join("reference/tokens.npy")), grid);
        let got = out.features.unwrap();
        assert_eq!(got.dims()[2..], [grid.0, grid.1], "{name}");
        let d = max_abs_diff(&flat(&got), &want);
        assert!(d < 1e-4, "{name}: tokens differ by {d}");

        // A shifted block of the first stage, at its own grid and width.
        let first = meta["first_tap"].as_str().unwrap();
        let fg = pair(&meta["first_grid"]);
        let info = spec.tap(first).unwrap();
        assert_eq!(
            (info.grid, info.dim, info.layer),
            (fg, meta["first_dim"].as_u64().unwrap() as usize, 1)
        );
        let got = model.forward(&px, Some(first)).unwrap().features.unwrap();
        let want = maps(&tensor(dir.join("reference/tokens_first.npy")), fg);
        let d = max_abs_diff(&flat(&got), &want);
        assert!(d < 1e-4, "{name}: {first} differs by {d}");
        eprintln!("{name}: ok");
    }
}

/// `--input-size`: the weights built for another size, as timm's `create_model(img_size=...)`
/// builds them (the same windows, masks for the new grids).
#[test]
fn a_swin_built_for_another_size_matches_timm() {
    let dir = zoo().join("timm_swin_old_img112_d20_c7");
    let model = vitcx::model::load_at(&dir, &Device::Cpu, Some((56, 56))).unwrap();
    let spec = model.spec();
    assert_eq!(spec.input_size, (56, 56));
    assert_eq!(spec.tap("layers.1.blocks.1.norm1").unwrap().grid, (7, 7));
    assert!(
        spec.notes.iter().any(|n| n.contains("56x56")),
        "{:?}",
        spec.notes
    );
    let px = tensor(dir.join("reference/at56/input.npy"));
    let logits = model.forward(&px, None).unwrap().logits;
    let d = max_abs_diff(
        &flat(&logits),
        &flat(&tensor(dir.join("reference/at56/logits.npy"))),
    );
    assert!(d < 1e-4, "logits differ by {d}");

    // 64 px: a 16x16 first stage, which 7x7 windows do not tile.
    let e = vitcx::model::load_at(&dir, &Device::Cpu, Some((64, 64)))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("16x16 grid, which 7x7 windows do not tile"),
        "{e}"
    );
    // 28 px: windows would shrink to 7x7 and 4x4, which the tables were not trained for.
    let e = vitcx::model::load_at(&dir, &Device::Cpu, Some((28, 28)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not resize the table"), "{e}");
    // The model refuses inputs of another size than it was built for.
    let e = model
        .forward(
            &Tensor::zeros((1, 3, 112, 112), candle_core::DType::F32, &Device::Cpu).unwrap(),
            None,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected (B, 3, 56, 56)"), "{e}");
}

/// Rollout is refused in one line saying why; Grad-CAM's gradient reaches a tap of every stage.
#[test]
fn swin_refuses_rollout_and_differentiates_at_any_tap() {
    let dir = zoo().join("hf_swin_img112_d12_c6");
    let model = vitcx::model::load(&dir, &Device::Cpu).unwrap();
    let px = tensor(dir.join("reference/input.npy"));
    let e = model.attention(&px).unwrap_err().to_string();
    assert!(e.contains("no token-to-token attention matrix"), "{e}");
    // bf16 products in the blocks' linear layers: close to f32, but not f32.
    let p32 = flat(&model.probs_at(&px, vitcx::model::Precision::F32).unwrap());
    let p16 = flat(&model.probs_at(&px, vitcx::model::Precision::Bf16).unwrap());
    let d = max_abs_diff(&p32, &p16);
    assert!(d > 0.0 && d < 2e-2, "bf16 probabilities differ by {d}");
    for tap in [
        "layers.0.blocks.1.norm1",
        "layers.1.blocks.0",
        "layers.2.blocks.1.norm1",
    ] {
        let info = model.spec().tap(tap).unwrap().clone();
        let g = model
            .tap_gradient(&px, tap, &mut |l| Ok(l.get(0)?.get(2)?))
            .unwrap();
        assert_eq!(g.gradients.dims(), &[2, info.dim, info.grid.0, info.grid.1]);
        let gv = flat(&g.gradients);
        assert!(gv.iter().all(|v| v.is_finite()));
        assert!(gv.iter().any(|v| *v != 0.0), "{tap}: zero gradient");
        // The features are those of the forward pass.
        let f = model.forward(&px, Some(tap)).unwrap().features.unwrap();
        assert!(max_abs_diff(&flat(&f), &flat(&g.features)) < 1e-6);
    }
}

/// Every method but Rollout explains a Swin at a tap of any stage; Rollout is refused when set
/// up, in one line saying why.
#[test]
fn methods_run_on_swin_at_any_stage() {
    use vitcx::methods::{Explainer, MethodParams, NoProgress};
    use vitcx::Targets;
    let dir = zoo().join("timm_swin_old_img112_d20_c7");
    let model = vitcx::model::load(&dir, &Device::Cpu).unwrap();
    let px = flat(&tensor(dir.join("reference/input.npy")));
    let x = &px[..3 * 112 * 112];
    let e = Explainer::by_name("rollout", &MethodParams::default(), &model)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no token-to-token")
            || e.contains("has none: its attention is within local windows"),
        "{e}"
    );
    assert!(!e.contains('\n'), "{e}");
    for (layer, grid) in [(-1i64, 7usize), (1, 28)] {
        let mut params = MethodParams::default();
        params.vitcx.layer = layer;
        params.gradcam.layer = layer;
        params.rise.masks = 64;
        for name in ["vitcx", "gradcam", "rise"] {
            let method = Explainer::by_name(name, &params, &model).unwrap();
            let ex = method
                .explain(&model, x, &Targets::default(), 0, &mut NoProgress)
                .unwrap_or_else(|e| panic!("{name} at layer {layer}: {e}"));
            let s = &ex.saliency[0];
            assert_eq!(s.len(), 112 * 112, "{name}");
            assert!(s.iter().all(|v| v.is_finite()), "{name}");
            let range = s.iter().fold(f32::MIN, |m, v| m.max(*v))
                - s.iter().fold(f32::MAX, |m, v| m.min(*v));
            assert!(
                range > 0.0,
                "{name} at layer {layer} ({grid}x{grid}): a flat map"
            );
        }
    }
}
