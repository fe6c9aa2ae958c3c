//! The faithfulness metrics against an independent PyTorch reference on the golden `vit_timm`
//! case (`tests/data/vit_timm/eval/`, written by `scripts/make_eval_fixtures.py` from the
//! protocol, RISE's `CausalMetric` style): deletion curves at a whole and a partial last step,
//! insertion at the partial one, their AUCs, the blur baseline, and the pointing games on two
//! masks, through the library and through `vitcx eval`.

use crate::common::{data, fixture, max_abs_diff, model, reference_input, s, vitcx};

use vitcx::eval::metrics::{self, Baseline, CurveParams};

fn reference() -> serde_json::Value {
    let text = std::fs::read_to_string(data("vit_timm/eval/metrics.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A 0/255 mask PNG of the fixtures, as 0/1.
fn mask(file: &str) -> Vec<u8> {
    let img = image::open(data(&format!("vit_timm/eval/{file}")))
        .unwrap()
        .to_luma8();
    img.as_raw().iter().map(|&v| u8::from(v != 0)).collect()
}

/// vitcx's curves differ from PyTorch's by up to 1.3e-6 (float32 rounding in the forward
/// passes; PyTorch alone moves a probability by about 1e-7 with where an image sits in a
/// batch): 1e-5 leaves a margin of 7.
const TOL: f64 = 1e-5;

#[test]
fn curves_and_aucs_match_the_pytorch_reference() {
    let m = model("vit_timm");
    let x = reference_input("vit_timm");
    let saliency = fixture("vit_timm", "saliency_sigma0.npy");
    let r = reference();
    let class = r["class"].as_u64().unwrap() as usize;
    for (step, prefix, json) in [(224, "", &r), (6277, "_step6277", &r["partial_last_step"])] {
        let p = CurveParams {
            step,
            ..CurveParams::default()
        };
        assert_eq!(p.insertion_baseline.report_json()["kind"], "blur");
        let del = metrics::deletion(&m, &x, &saliency, class, &p).unwrap();
        let mut curves = vec![("deletion", &del)];
        // Insertion shares deletion's stepping; its 225-point curve would only double the
        // test's time, so it is checked at the coarse step (its blur baseline has its own test).
        let ins;
        if step == 6277 {
            ins = metrics::insertion(&m, &x, &saliency, class, &p).unwrap();
            curves.push(("insertion", &ins));
        }
        for (name, curve) in curves {
            let want = fixture("vit_timm", &format!("eval/{name}{prefix}.npy"));
            assert_eq!(curve.probs.len(), want.len(), "{name} step {step}");
            let d = f64::from(max_abs_diff(&curve.probs, &want));
            let auc = json[format!("{name}_auc")].as_f64().unwrap();
            eprintln!(
                "{name} step {step}: curve max diff {d:.2e}, auc {:.7} vs {auc:.7}",
                curve.auc
            );
            assert!(d < TOL, "{name} step {step}: curve differs by {d}");
            assert!((curve.auc - auc).abs() < TOL, "{name} step {step}: auc");
        }
        if step == 6277 {
            // The partial last step counts for its true width (RISE's equal-width AUC differs).
            let xs: Vec<f64> = json["x_values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(del.x, xs);
        }
    }
}

#[test]
fn blur_baseline_matches_the_reference_probes() {
    let r = reference();
    let x = reference_input("vit_timm");
    let blurred = Baseline::RISE_BLUR.apply(&x, (224, 224)).unwrap();
    let probes = r["blur_probe_c_y_x_value"].as_array().unwrap();
    assert!(probes.len() >= 10);
    for p in probes {
        let v: Vec<f64> = p
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let (c, y, xx) = (v[0] as usize, v[1] as usize, v[2] as usize);
        let got = f64::from(blurred[c * 224 * 224 + y * 224 + xx]);
        assert!((got - v[3]).abs() < 1e-6, "blur at {p}: {got}");
    }
    let weights = metrics::gaussian_kernel(11, 5.0).unwrap();
    for (w, want) in weights.iter().zip(r["blur_weights"].as_array().unwrap()) {
        assert!((f64::from(*w) - want.as_f64().unwrap()).abs() < 1e-7);
    }
}

#[test]
fn pointing_games_match_the_reference() {
    let r = reference();
    let saliency = fixture("vit_timm", "saliency_sigma0.npy");
    for file in ["object_mask.png", "off_mask.png"] {
        let want = &r["masks"][file];
        let m = mask(file);
        assert_eq!(
            metrics::pointing_game(&saliency, &m),
            want["pointing_game"].as_bool().unwrap(),
            "{file}"
        );
        let e = metrics::energy_pointing_game(&saliency, &m);
        let we = want["energy_pointing_game"].as_f64().unwrap();
        assert!((e - we).abs() < 1e-9, "{file}: energy {e} vs {we}");
    }
}

#[test]
fn vitcx_eval_reports_the_reference_numbers() {
    // The CLI explains the image (noise 0: the golden map) and scores it, at the partial-step
    // setting (9 points a curve, to keep the test short); its map equals the reference's within
    // 1e-5 of the range, which can swap pixels of nearly equal saliency in the ranking: the AUCs
    // are checked to 1e-4.
    let r = reference();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::copy(data("vit_timm/image_224.png"), d.join("a.png")).unwrap();
    std::fs::copy(data("vit_timm/eval/object_mask.png"), d.join("a.mask.png")).unwrap();
    let line = format!(
        "{{\"image\": \"a.png\", \"class_id\": {}, \"mask\": \"a.mask.png\"}}\n",
        r["class"]
    );
    std::fs::write(d.join("manifest.jsonl"), line).unwrap();
    let out = d.join("out");
    let o = vitcx(&[
        "eval",
        "--model",
        s(&data("vit_timm")),
        "--data",
        s(d),
        "--noise-std",
        "0",
        "--step",
        "6277",
        "--out",
        s(&out),
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", crate::common::stderr(&o));
    let csv = std::fs::read_to_string(out.join("per_image.csv")).unwrap();
    let row: Vec<&str> = csv.lines().nth(1).unwrap().split(',').collect();
    let num = |i: usize| row[i].parse::<f64>().unwrap();
    let partial = &r["partial_last_step"];
    let del = partial["deletion_auc"].as_f64().unwrap();
    let ins = partial["insertion_auc"].as_f64().unwrap();
    assert!((num(6) - del).abs() < 1e-4, "deletion {} vs {del}", num(6));
    assert!((num(7) - ins).abs() < 1e-4, "insertion {} vs {ins}", num(7));
    assert_eq!(row[8], "true", "pointing game");
    assert_eq!(
        row[9], "true",
        "pointing game, 15 px: every strict hit counts"
    );
    let energy = r["masks"]["object_mask.png"]["energy_pointing_game"]
        .as_f64()
        .unwrap();
    assert!(
        (num(10) - energy).abs() < 1e-4,
        "energy {} vs {energy}",
        num(10)
    );
}
