//! End-to-end tests of `vitcx compare` and of `vitcx explain --method`: the files written, the
//! maps equal to the PyTorch references where those exist, and clear errors.

use crate::common::{data, max_abs_diff, s, vitcx};

use vitcx::io::npy::read_npy;

#[test]
fn compare_writes_one_figure_the_numbers_and_each_map() {
    let out = tempfile::tempdir().unwrap();
    let o = vitcx(&[
        "compare",
        s(&data("vit_timm/image_224.png")),
        "--model",
        s(&data("vit_timm")),
        "--methods",
        "vitcx,rollout,rise,gradcam",
        "--masks",
        "32",
        "--step",
        "3136",
        "--out",
        s(out.path()),
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("image_224.compare.json")).unwrap())
            .unwrap();
    assert_eq!(v["class"]["id"], 2);
    let methods = v["methods"].as_array().unwrap();
    let names: Vec<&str> = methods
        .iter()
        .map(|m| m["method"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["vitcx", "rollout", "rise", "gradcam"]);
    for m in methods {
        for k in ["deletion_auc", "insertion_auc"] {
            let auc = m[k].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&auc), "{m}");
        }
        let npy = out.path().join(m["saliency"].as_str().unwrap());
        assert_eq!(read_npy(npy).unwrap().shape, vec![224, 224]);
    }
    assert_eq!(methods[2]["params"]["masks"], 32);
    // The maps are the library's: rollout and Grad-CAM equal the PyTorch references.
    let map = |m: &str| {
        read_npy(out.path().join(format!("image_224.{m}.saliency.npy")))
            .unwrap()
            .to_f32()
    };
    let reference = |f: &str| read_npy(data("vit_timm/methods").join(f)).unwrap().to_f32();
    assert!(max_abs_diff(&map("rollout"), &reference("rollout_r0.9.npy")) < 5e-3);
    assert!(max_abs_diff(&map("gradcam"), &reference("gradcam.npy")) < 1e-5);
    // One panel for the image and one per method, side by side.
    let fig = image::open(out.path().join("image_224.compare.png")).unwrap();
    assert!(fig.width() >= 5 * 224, "{}", fig.width());
    assert!(fig.height() > 224);
}

#[test]
fn explain_with_another_method_writes_its_map_and_names_it() {
    let out = tempfile::tempdir().unwrap();
    let o = vitcx(&[
        "explain",
        s(&data("deit_distilled_timm/image_224.png")),
        "--model",
        s(&data("deit_distilled_timm")),
        "--method",
        "gradcam",
        "--out",
        s(out.path()),
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("image_224.json")).unwrap()).unwrap();
    assert_eq!(v["method"], "gradcam");
    assert_eq!(v["params"]["layer"], 2);
    assert_eq!(v["params"]["target"], "logit");
    let map = read_npy(out.path().join("image_224.saliency.npy"))
        .unwrap()
        .to_f32();
    let want = read_npy(data("deit_distilled_timm/methods/gradcam.npy"))
        .unwrap()
        .to_f32();
    assert!(max_abs_diff(&map, &want) < 1e-5);
    assert!(out.path().join("image_224.png").is_file());
}

#[test]
fn bad_method_settings_exit_2_before_any_output() {
    let out = tempfile::tempdir().unwrap();
    let never = out.path().join("never");
    let img = data("vit_timm/image_224.png");
    let model = data("vit_timm");
    for (args, needle) in [
        (
            vec!["compare", s(&img), "--methods", "vitcx,,rise"],
            "unknown method ''",
        ),
        (
            vec!["compare", s(&img), "--methods", "rise,rise"],
            "method 'rise' given twice",
        ),
        (
            vec![
                "compare",
                s(&img),
                "--methods",
                "rollout",
                "--discard-ratio",
                "1.5",
            ],
            "discard ratio 1.5 out of range",
        ),
        (
            vec!["explain", s(&img), "--method", "rise", "--masks", "0"],
            "RISE masks 0 out of range; expected 1 to 100000",
        ),
        (
            vec!["explain", s(&img), "--method", "rise", "--rise-p1", "2"],
            "RISE p1 2 out of range",
        ),
        (
            vec!["explain", s(&img), "--method", "gradcam", "--layer", "9"],
            "layer 9 out of range",
        ),
        (
            vec!["compare", s(&data("nope.png")), "--methods", "rollout"],
            "nope.png",
        ),
    ] {
        let mut args = args.clone();
        args.extend(["--model", s(&model), "--out", s(&never), "--quiet"]);
        let o = vitcx(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: expected '{needle}' in {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(!never.exists(), "{args:?} left output");
    }
}
