//! Attention Rollout, Grad-CAM and RISE against their PyTorch references on the golden
//! checkpoints (`tests/data/<case>/methods/`, written by `scripts/make_method_fixtures.py`:
//! rollout as vit-explain with rows renormalised, Grad-CAM by pytorch-grad-cam 1.5.7, RISE as
//! its reference code with a stored set of grids and shifts), plus the methods' properties.

use crate::common::{case, max_abs_diff, model, reference_input as input};

use candle_core::{Device, Tensor};
use vitcx::io::npy::read_npy;
use vitcx::methods::gradcam::{GradCam, GradCamParams};
use vitcx::methods::rise::{GridMask, MaskSource, Rise, RiseParams};
use vitcx::methods::rollout::{Rollout, RolloutParams};
use vitcx::methods::{Method, NoProgress};
use vitcx::model::Backbone;
use vitcx::target::{Score, Targets};

const CASES: [&str; 8] = [
    "vit_timm",
    "vit_hf",
    "deit_distilled_timm",
    "deit3_timm",
    "reg4_dinov2_timm",
    "clip_timm",
    "siglip_timm",
    "dinov2_hf",
];

/// The cases with a [CLS] token, which Attention Rollout follows (SigLIP has none).
fn with_class_token() -> impl Iterator<Item = &'static str> {
    CASES.into_iter().filter(|&c| c != "siglip_timm")
}

fn reference(name: &str, file: &str) -> Vec<f32> {
    read_npy(case(name).join("methods").join(file))
        .unwrap()
        .to_f32()
}

fn class(name: &str) -> usize {
    let text = std::fs::read_to_string(case(name).join("methods/methods.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["class"].as_u64().unwrap() as usize
}

#[test]
fn rollout_matches_the_reference() {
    // Discarding 90% cuts through values 1e-5 apart (relative), so f32 rounding can move an
    // entry across the cut: the map is checked to 5e-3 there, to 1e-5 without discarding.
    for name in with_class_token() {
        let m = model(name);
        let x = input(name);
        for (ratio, file, tol) in [
            (0.0, "rollout_r0.npy", 1e-5),
            (0.9, "rollout_r0.9.npy", 5e-3),
        ] {
            let r = Rollout::new(&RolloutParams {
                discard_ratio: ratio,
            })
            .unwrap();
            let ex = r
                .explain(&m, &x, &Targets::default(), &mut NoProgress)
                .unwrap();
            assert_eq!(ex.classes, vec![class(name)], "{name}");
            let d = max_abs_diff(&ex.saliency[0], &reference(name, file));
            println!("{name} rollout r={ratio}: max |diff| {d:.2e}");
            crate::common::readme_cell("methods", &format!("rollout, discard {ratio}"), name, d);
            assert!(d < tol, "{name} r={ratio}: {d}");
        }
    }
}

#[test]
fn rollout_matrix_is_row_stochastic_and_matches_the_reference() {
    for name in with_class_token() {
        let m = model(name);
        let px = Tensor::from_vec(input(name), (1, 3, 224, 224), &Device::Cpu).unwrap();
        let att = m.attention(&px).unwrap();
        assert_eq!(att.maps.len(), m.spec().depth);
        let t = att.prefix_tokens + att.grid.0 * att.grid.1;
        let mut layers: Vec<Vec<f64>> = att
            .maps
            .iter()
            .map(|a| {
                let (_, heads, _, _) = a.dims4().unwrap();
                let v = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                vitcx::methods::rollout::head_mean(&v, heads, t)
            })
            .collect();
        let r = vitcx::methods::rollout::rollout(&mut layers, t, 0.0);
        for row in r.chunks_exact(t) {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{name}");
        }
        let ours: Vec<f32> = r.iter().map(|&v| v as f32).collect();
        let d = max_abs_diff(&ours, &reference(name, "rollout_matrix_r0.npy"));
        crate::common::readme_cell("methods", "rollout matrix, discard 0", name, d);
        assert!(d < 1e-6, "{name}: {d}");
    }
}

#[test]
fn rollout_is_refused_without_a_class_token() {
    let m = model("siglip_timm");
    let e = Rollout::for_model(&RolloutParams::default(), &m)
        .unwrap_err()
        .to_string();
    assert!(e.contains("has no class token"), "{e}");
    assert!(Rollout::for_model(&RolloutParams::default(), &model("reg4_dinov2_timm")).is_ok());
}

#[test]
fn gradcam_gradients_and_map_match_pytorch_grad_cam() {
    for name in CASES {
        let m = model(name);
        let x = input(name);
        let px = Tensor::from_vec(x.clone(), (1, 3, 224, 224), &Device::Cpu).unwrap();
        let layer = m.spec().depth - 1;
        let tap = format!("blocks.{layer}.norm1");
        let mut classes = Vec::new();
        let g = m
            .tap_gradient(&px, &tap, &mut |logits| {
                classes = vec![vitcx::target::argmax(&logits.to_vec2::<f32>()?[0])];
                Score::Logit.of(logits, &classes)
            })
            .unwrap();
        assert_eq!(classes, vec![class(name)], "{name}");
        let acts = g.features.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let grads = g.gradients.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want_acts = reference(name, "gradcam_activations.npy");
        let want_grads = reference(name, "gradcam_gradients.npy");
        let da = max_abs_diff(&acts, &want_acts);
        let scale = want_grads.iter().fold(0f32, |m, v| m.max(v.abs()));
        let dg = max_abs_diff(&grads, &want_grads) / scale;
        println!("{name} grad-cam: activations {da:.2e}, gradients {dg:.2e} (relative to max)");
        crate::common::readme_cell("methods", "Grad-CAM activations", name, da);
        crate::common::readme_cell("methods", "Grad-CAM gradients, of their maximum", name, dg);
        assert!(da < 5e-5, "{name} activations {da}");
        assert!(dg < 2e-5, "{name} gradients {dg}");

        let cam = GradCam::new(&GradCamParams::default(), &m).unwrap();
        let ex = cam
            .explain(&m, &x, &Targets::default(), &mut NoProgress)
            .unwrap();
        let d = max_abs_diff(&ex.saliency[0], &reference(name, "gradcam.npy"));
        println!("{name} grad-cam map: max |diff| {d:.2e}");
        crate::common::readme_cell("methods", "Grad-CAM", name, d);
        assert!(d < 1e-5, "{name} map {d}");
        // The same class asked for explicitly gives the same map.
        let again = cam
            .explain(
                &m,
                &x,
                &Targets::Classes(vec![class(name)]),
                &mut NoProgress,
            )
            .unwrap();
        assert!(max_abs_diff(&again.saliency[0], &ex.saliency[0]) < 1e-6);
    }
}

/// The reference's stored grids and shifts.
fn stored_masks(name: &str) -> Vec<GridMask> {
    let grids = reference(name, "rise_grids.npy");
    let shifts = read_npy(case(name).join("methods/rise_shifts.npy")).unwrap();
    let shifts = shifts.as_i64().unwrap().to_vec();
    grids
        .chunks_exact(64)
        .zip(shifts.chunks_exact(2))
        .map(|(g, s)| GridMask {
            grid: g.to_vec(),
            shift: (s[0] as usize, s[1] as usize),
        })
        .collect()
}

#[test]
fn rise_masks_match_scikit_image_resize() {
    let masks = stored_masks("vit_timm");
    let want = reference("vit_timm", "rise_masks_first2.npy");
    for (k, m) in masks.iter().take(2).enumerate() {
        let ours = vitcx::methods::rise::upsample(m, 8, (224, 224));
        let d = max_abs_diff(&ours, &want[k * 224 * 224..(k + 1) * 224 * 224]);
        assert!(d < 1e-6, "mask {k}: {d}");
    }
}

#[test]
fn rise_with_stored_masks_matches_the_reference() {
    for name in CASES {
        let m = model(name);
        let x = input(name);
        let masks = stored_masks(name);
        let rise = Rise::new(&RiseParams {
            masks: masks.len(),
            batch: 16,
            ..Default::default()
        })
        .unwrap();
        let ex = rise
            .explain_with(
                &m,
                &x,
                &Targets::default(),
                &MaskSource::Given(masks),
                &mut NoProgress,
            )
            .unwrap();
        assert_eq!(ex.classes, vec![class(name)]);
        assert_eq!(ex.count("n_masks"), Some(48));
        let d = max_abs_diff(&ex.saliency[0], &reference(name, "rise.npy"));
        println!("{name} rise: max |diff| {d:.2e}");
        crate::common::readme_cell("methods", "RISE, stored 48 masks", name, d);
        assert!(d < 1e-5, "{name}: {d}");
    }
}

#[test]
fn rise_with_all_ones_masks_gives_a_flat_map_at_p_over_p1() {
    let m = model("vit_timm");
    let x = input("vit_timm");
    let ones = vec![
        GridMask {
            grid: vec![1.0; 16],
            shift: (3, 50),
        };
        5
    ];
    let rise = Rise::new(&RiseParams {
        masks: 5,
        cells: 4,
        p1: 0.25,
        batch: 2,
        ..Default::default()
    })
    .unwrap();
    let ex = rise
        .explain_with(
            &m,
            &x,
            &Targets::default(),
            &MaskSource::Given(ones),
            &mut NoProgress,
        )
        .unwrap();
    let c = ex.classes[0];
    let want = ex.probs[c] / 0.25;
    let d = ex.saliency[0]
        .iter()
        .fold(0f32, |acc, v| acc.max((v - want).abs()));
    assert!(d < 1e-5, "{d}");
}

#[test]
fn seeded_rise_is_reproducible_and_differs_by_seed() {
    let m = model("vit_timm");
    let x = input("vit_timm");
    let run = |seed| {
        Rise::new(&RiseParams {
            masks: 8,
            seed,
            ..Default::default()
        })
        .unwrap()
        .explain(&m, &x, &Targets::default(), &mut NoProgress)
        .unwrap()
        .saliency
        .remove(0)
    };
    let a = run(0);
    assert_eq!(a, run(0));
    assert_ne!(a, run(1));
}

#[test]
fn tap_gradient_rejects_bad_classes() {
    let m = model("vit_timm");
    let px = Tensor::zeros((2, 3, 224, 224), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = m
        .tap_gradient(&px, "blocks.0.norm1", &mut |l| Score::Logit.of(l, &[0]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 classes given for a batch of 2"), "{e}");
    let e = m
        .tap_gradient(&px, "blocks.0.norm1", &mut |l| Score::Logit.of(l, &[0, 10]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("class 10 out of range"), "{e}");
    // Two images, two classes: one backward pass, one gradient per image.
    let g = m
        .tap_gradient(&px, "blocks.1", &mut |l| Score::Logit.of(l, &[1, 2]))
        .unwrap();
    assert_eq!(g.gradients.dims(), &[2, 192, 14, 14]);
}
