//! End-to-end tests of `vitcx eval`: a tiny manifest with masks in, per-image CSV, summary JSON
//! and curve plots out; a bad method exits 2 naming the supported ones.

use crate::common::{data, s, vitcx};
use std::path::Path;
use std::process::Output;

/// A grey mask PNG of `w x h` with the rectangle `[x0, x1) x [y0, y1)` set to 255.
fn mask_png(path: &Path, (w, h): (u32, u32), [x0, y0, x1, y1]: [u32; 4]) {
    let img = image::GrayImage::from_fn(w, h, |x, y| {
        image::Luma([if x >= x0 && x < x1 && y >= y0 && y < y1 {
            255
        } else {
            0
        }])
    });
    img.save(path).unwrap();
}

/// Three images: two with labels and masks (one mask at half resolution), one bare.
fn dataset() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::copy(data("vit_timm/image_224.png"), d.join("a.png")).unwrap();
    std::fs::copy(data("vit_hf/image_224.png"), d.join("b.png")).unwrap();
    std::fs::copy(data("deit_distilled_timm/image_224.png"), d.join("c.png")).unwrap();
    mask_png(&d.join("a.mask.png"), (224, 224), [40, 40, 180, 180]);
    mask_png(&d.join("b.mask.png"), (112, 112), [0, 0, 56, 112]);
    let lines = [
        r#"{"image": "a.png", "class_id": 3, "class_name": "c3", "bbox": [40, 40, 180, 180], "mask": "a.mask.png"}"#,
        r#"{"image": "b.png", "class_id": 1, "mask": "b.mask.png"}"#,
        r#"{"image": "c.png"}"#,
    ];
    std::fs::write(d.join("manifest.jsonl"), lines.join("\n") + "\n").unwrap();
    dir
}

#[test]
fn eval_writes_csv_summary_and_plots() {
    let ds = dataset();
    let out = tempfile::tempdir().unwrap();
    let o = vitcx(&[
        "eval",
        "--model",
        s(&data("vit_timm")),
        "--data",
        s(ds.path()),
        "--step",
        "3136",
        "--out",
        s(out.path()),
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let csv = std::fs::read_to_string(out.path().join("per_image.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
    assert_eq!(
        rows[0],
        [
            "method",
            "image",
            "class",
            "class_from",
            "predicted",
            "correct",
            "deletion_auc",
            "insertion_auc",
            "pointing_game",
            "pointing_game_15px",
            "energy_pointing_game",
            "energy_pointing_game_minmax"
        ]
    );
    assert_eq!(rows.len(), 4, "{csv}");
    assert_eq!(&rows[1][..4], ["vitcx", "a.png", "3", "label"]);
    assert_eq!(&rows[2][1..4], ["b.png", "1", "label"]);
    assert_eq!(
        &rows[3][1..3],
        ["c.png", rows[3][4]],
        "unlabelled: explains top-1"
    );
    assert_eq!(rows[3][3], "top1");
    for r in &rows[1..] {
        assert_eq!(r.len(), 12);
        for v in &r[6..8] {
            let auc: f64 = v.parse().unwrap();
            assert!((0.0..=1.0).contains(&auc), "{v}");
        }
    }
    for r in &rows[1..3] {
        assert!(["true", "false"].contains(&r[5]));
        assert!(["true", "false"].contains(&r[8]));
        // The tolerant game counts every strict hit.
        assert!(["true", "false"].contains(&r[9]));
        assert!(r[8] == "false" || r[9] == "true", "{r:?}");
        let e: f64 = r[10].parse().unwrap();
        assert!((0.0..=1.0).contains(&e));
    }
    // No ground truth for c.png: correct and pointing fields empty.
    assert_eq!(
        [rows[3][5], rows[3][8], rows[3][9], rows[3][10]],
        ["", "", "", ""]
    );
    assert_eq!(rows[3][11], "");
    for r in &rows[1..3] {
        let e: f64 = r[11].parse().unwrap();
        assert!((0.0..=1.0).contains(&e));
    }

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("summary.json")).unwrap())
            .unwrap();
    let m = summary["vitcx"].as_object().unwrap();
    let mut keys: Vec<&str> = m.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "accuracy",
            "deletion_auc",
            "energy_pointing_game",
            "energy_pointing_game_minmax",
            "insertion_auc",
            "pointing_game",
            "pointing_game_15px"
        ]
    );
    let n = |k: &str| m[k]["n"].as_u64().unwrap();
    assert_eq!(
        [
            n("deletion_auc"),
            n("insertion_auc"),
            n("accuracy"),
            n("pointing_game"),
            n("pointing_game_15px")
        ],
        [3, 3, 2, 2, 2]
    );
    let del: Vec<f64> = rows[1..].iter().map(|r| r[6].parse().unwrap()).collect();
    let mean = m["deletion_auc"]["mean"].as_f64().unwrap();
    assert!((mean - del.iter().sum::<f64>() / 3.0).abs() < 1e-12);
    let ci = m["deletion_auc"]["ci95"].as_array().unwrap();
    assert!(ci[0].as_f64().unwrap() <= mean && mean <= ci[1].as_f64().unwrap());
    let st = &summary["settings"];
    assert_eq!(st["step"], 3136);
    assert_eq!(st["deletion_baseline"]["kind"], "zero");
    assert_eq!(st["insertion_baseline"]["kind"], "blur");
    assert_eq!(st["insertion_baseline"]["kernel"], 11);
    assert_eq!(st["insertion_baseline"]["sigma"], 5.0);
    assert_eq!(st["methods"], serde_json::json!(["vitcx"]));
    assert_eq!(st["method_params"]["vitcx"]["threshold"], 0.1);
    let table = std::fs::read_to_string(out.path().join("table.csv")).unwrap();
    assert!(
        table.starts_with("method,metric,mean,ci95_low,ci95_high,n\n"),
        "{table}"
    );
    assert_eq!(table.lines().count(), 8, "{table}");
    let md = std::fs::read_to_string(out.path().join("table.md")).unwrap();
    assert!(
        md.lines().nth(2).unwrap().starts_with("| ViT-CX | "),
        "{md}"
    );
    assert!(st["vitcx_version"].is_string());

    for png in ["deletion.png", "insertion.png"] {
        let img = image::open(out.path().join(png)).unwrap();
        assert!(img.width() > 100 && img.height() > 100);
    }
}

#[test]
fn eval_on_a_plain_image_directory_has_no_ground_truth_metrics() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(data("vit_timm/image_224.png"), dir.path().join("a.png")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let o = vitcx(&[
        "eval",
        "--model",
        s(&data("vit_timm")),
        "--data",
        s(dir.path()),
        "--step",
        "12544",
        "--deletion-baseline",
        "blur",
        "--insertion-baseline",
        "zero",
        "--out",
        s(out.path()),
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("summary.json")).unwrap())
            .unwrap();
    let mut keys: Vec<&str> = summary["vitcx"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(keys, ["deletion_auc", "insertion_auc"]);
    assert_eq!(summary["vitcx"]["deletion_auc"]["n"], 1);
    assert_eq!(summary["settings"]["deletion_baseline"]["kind"], "blur");
}

#[test]
fn eval_reports_a_failed_image_and_exits_2() {
    let ds = dataset();
    std::fs::write(
        ds.path().join("manifest.jsonl"),
        "{\"image\": \"a.png\"}\n{\"image\": \"missing.png\"}\n",
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let o = vitcx(&[
        "eval",
        "--model",
        s(&data("vit_timm")),
        "--data",
        s(&ds.path().join("manifest.jsonl")),
        "--step",
        "25088",
        "--out",
        s(out.path()),
        "--quiet",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("missing.png"), "{err}");
    let csv = std::fs::read_to_string(out.path().join("per_image.csv")).unwrap();
    assert_eq!(csv.lines().count(), 2, "{csv}");
}

#[test]
fn eval_rejects_unknown_method_listing_supported_ones() {
    let ds = dataset();
    let out = tempfile::tempdir().unwrap();
    let o = vitcx(&[
        "eval",
        "--model",
        s(&data("vit_timm")),
        "--data",
        s(ds.path()),
        "--method",
        "vitcx,lime",
        "--out",
        s(&out.path().join("x")),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--methods: unknown method 'lime'")
            && err.contains("supported methods: vitcx, rollout, rise, gradcam, random, center"),
        "{err}"
    );
    assert!(!out.path().join("x").exists());
}

/// Runs `vitcx eval` of the test checkpoint on `ds` into `out`, quietly, with `extra` flags.
fn eval_on(ds: &Path, out: &Path, extra: &[&str]) -> Output {
    let model = data("vit_timm");
    let mut args = vec![
        "eval",
        "--model",
        s(&model),
        "--data",
        s(ds),
        "--out",
        s(out),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    vitcx(&args)
}

/// Runs `vitcx eval` with `method` on the test set at step 3136 (17 points per curve).
fn eval_method(ds: &Path, method: &str, out: &Path) -> Output {
    eval_on(ds, out, &["--method", method, "--step", "3136"])
}

#[test]
fn control_maps_are_scored_like_a_method() {
    let ds = dataset();
    let mut pointing = Vec::new();
    for method in ["random", "center"] {
        let out = tempfile::tempdir().unwrap();
        let o = eval_method(ds.path(), method, out.path());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.path().join("summary.json")).unwrap())
                .unwrap();
        assert_eq!(v["settings"]["methods"], serde_json::json!([method]));
        for metric in ["deletion_auc", "insertion_auc", "pointing_game"] {
            let m = v[method][metric]["mean"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&m), "{method} {metric} {m}");
        }
        pointing.push(v[method]["pointing_game"]["mean"].as_f64().unwrap());
        // Same seed, same random map: a rerun gives the same per-image numbers.
        if method == "random" {
            let again = tempfile::tempdir().unwrap();
            assert!(eval_method(ds.path(), method, again.path())
                .status
                .success());
            assert_eq!(
                std::fs::read(out.path().join("per_image.csv")).unwrap(),
                std::fs::read(again.path().join("per_image.csv")).unwrap()
            );
        }
    }
    // The centred blob's peak is the image centre, inside both ground-truth boxes (a: 40..180
    // square; b: left half of a 112-px mask scaled to 224 is x < 112, and the centre pixel
    // 111.5 rounds to column 111 or 112).
    assert!(pointing[1] >= 0.5, "{pointing:?}");
}

#[test]
fn several_methods_in_one_run_make_one_table() {
    let ds = dataset();
    let out = tempfile::tempdir().unwrap();
    let o = eval_on(
        ds.path(),
        out.path(),
        &[
            "--methods",
            "vitcx,rollout,rise,gradcam,center",
            "--masks",
            "16",
            "--step",
            "6272",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let methods = ["vitcx", "rollout", "rise", "gradcam", "center"];
    let csv = std::fs::read_to_string(out.path().join("per_image.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows.len(), 3 * methods.len(), "{csv}");
    // Image by image, each method in the order given.
    let order: Vec<&str> = rows[..methods.len()].iter().map(|r| r[0]).collect();
    assert_eq!(order, methods);
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("summary.json")).unwrap()).unwrap();
    for m in methods {
        assert_eq!(v[m]["deletion_auc"]["n"], 3, "{m}");
        assert_eq!(v[m]["pointing_game"]["n"], 2, "{m}");
        assert!(v["settings"]["seconds_per_image"][m].as_f64().unwrap() > 0.0);
    }
    assert_eq!(v["settings"]["method_params"]["rise"]["masks"], 16);
    assert_eq!(
        v["settings"]["method_params"]["rollout"]["discard_ratio"],
        0.9
    );
    let md = std::fs::read_to_string(out.path().join("table.md")).unwrap();
    for title in ["ViT-CX", "Rollout", "RISE", "Grad-CAM", "center"] {
        assert!(md.contains(&format!("| {title} | ")), "{title}: {md}");
    }
    let table = std::fs::read_to_string(out.path().join("table.csv")).unwrap();
    assert_eq!(table.lines().count(), 1 + 7 * methods.len(), "{table}");
    // The same maps as one method at a time: rollout alone gives the same rows.
    let alone = tempfile::tempdir().unwrap();
    let o = eval_on(
        ds.path(),
        alone.path(),
        &["--method", "rollout", "--step", "6272"],
    );
    assert!(o.status.success());
    let alone = std::fs::read_to_string(alone.path().join("per_image.csv")).unwrap();
    let together: Vec<&str> = csv.lines().filter(|l| l.starts_with("rollout,")).collect();
    let alone: Vec<&str> = alone.lines().skip(1).collect();
    assert_eq!(together, alone);
}
