//! BEiT and EVA-02 through every method: ViT-CX, Rollout (the attention probabilities include
//! BEiT's relative position bias and EVA-02's rotary embedding), RISE and Grad-CAM, on the zoo
//! fixtures that match PyTorch (tests/library/zoo.rs).

use candle_core::{Device, Tensor, D};
use vitcx::io::npy::read_npy;
use vitcx::methods::{Explainer, NoProgress};
use vitcx::model::Backbone;
use vitcx::{MethodParams, Targets};

use crate::common::{data, max_abs_diff, range};

const CASES: [&str; 3] = [
    "zoo/beit_hf_relpos_img96_d48_h3_c4",
    "zoo/beit_timm_shared_abs_img112_d48_h3_c5",
    "zoo/eva02_timm_fused_img112_d48_h3_c5",
];

fn input(case: &str) -> Tensor {
    let a = read_npy(data(case).join("reference/input.npy")).unwrap();
    Tensor::from_vec(a.to_f32(), a.shape.clone(), &Device::Cpu).unwrap()
}

#[test]
fn attention_maps_carry_the_bias_and_agree_with_the_fused_pass() {
    for case in CASES {
        let model = vitcx::model::load(&data(case), &Device::Cpu).unwrap();
        let px = input(case);
        let att = model.attention(&px).unwrap();
        let spec = model.spec();
        assert_eq!(att.maps.len(), spec.depth, "{case}");
        assert_eq!(att.prefix_tokens, 1, "{case}");
        let (gh, gw) = att.grid;
        let t = 1 + gh * gw;
        for m in &att.maps {
            assert_eq!(m.dims()[2..], [t, t], "{case}");
            let sums = m
                .sum(D::Minus1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(
                sums.iter().all(|s| (s - 1.0).abs() < 1e-5),
                "{case}: rows sum to 1"
            );
        }
        // The composed pass that keeps the probabilities and the fused pass give the same logits
        // (the fused kernel adds the same bias).
        let a = att.logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let f = model.forward(&px, None).unwrap().logits;
        let f = f.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let d = max_abs_diff(&a, &f);
        assert!(d < 1e-5, "{case}: logits of the two passes differ by {d}");
    }
}

#[test]
fn every_method_explains_beit_and_eva02() {
    let mut params = MethodParams::default();
    params.rise.masks = 64;
    params.rise.batch = 16;
    for case in CASES {
        let model = vitcx::model::load(&data(case), &Device::Cpu).unwrap();
        let x = input(case).get(1).unwrap();
        let x = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (h, w) = model.spec().input_size;
        for name in ["vitcx", "rollout", "rise", "gradcam"] {
            let method = Explainer::by_name(name, &params, &model).unwrap();
            let ex = method
                .explain(&model, &x, &Targets::default(), 0, &mut NoProgress)
                .unwrap_or_else(|e| panic!("{case} {name}: {e}"));
            let s = &ex.saliency[0];
            assert_eq!(s.len(), h * w, "{case} {name}");
            assert!(s.iter().all(|v| v.is_finite()), "{case} {name}: finite");
            assert!(range(s) > 0.0, "{case} {name}: not constant");
        }
    }
}

#[test]
fn grad_cam_gradients_reach_every_layer() {
    for case in CASES {
        let model = vitcx::model::load(&data(case), &Device::Cpu).unwrap();
        let px = input(case);
        let logits = model.forward(&px, None).unwrap().logits;
        for tap in ["blocks.0.norm1", "blocks.1"] {
            let mut score =
                |l: &Tensor| -> vitcx::Result<Tensor> { Ok(l.narrow(1, 0, 1)?.sum_all()?) };
            let g = model.tap_gradient(&px, tap, &mut score).unwrap();
            let d = max_abs_diff(
                &g.logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                &logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert!(d < 1e-5, "{case} {tap}: logits {d}");
            let v = g.gradients.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(
                v.iter().all(|x| x.is_finite()) && range(&v) > 0.0,
                "{case} {tap}"
            );
        }
    }
}
