//! `vitcx bench` end to end: a quick tiny-preset run prints one JSON object with the keys that
//! `scripts/bench_pytorch.py` compares against, and bad arguments exit 2.

use std::process::{Command, Output};

fn vitcx(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vitcx"))
        .args(args)
        .output()
        .expect("run vitcx")
}

fn positive(v: &serde_json::Value, key: &str) -> f64 {
    let x = v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is {}, expected a number", v[key]));
    assert!(x > 0.0 && x.is_finite(), "{key} = {x}");
    x
}

#[test]
fn bench_tiny_json() {
    let o = vitcx(&[
        "bench",
        "--preset",
        "tiny",
        "--batch",
        "1",
        "--repeats",
        "1",
        "--explain-masks",
        "4",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("stdout is one JSON object");
    assert!(v.is_object());
    assert_eq!(v["preset"], "tiny");
    assert_eq!(v["model"], "vit_tiny_patch16_224");
    assert_eq!(v["dtype"], "f32");
    let s = positive(&v, "forward_s_per_image");
    let g = positive(&v, "forward_gflops");
    let flop = positive(&v, "gflop_per_image");
    assert!((flop - 2.51).abs() < 0.02, "tiny is 2.51 GFLOP, got {flop}");
    assert!(((g * s - flop) / flop).abs() < 1e-9, "{g} * {s} != {flop}");
    positive(&v, "forward_s_per_image_bf16");
    if cfg!(target_arch = "x86_64") {
        // The forward pass cannot beat the machine's FMA peak.
        let peak = positive(&v, "fma_peak_gflops");
        let share = positive(&v, "forward_share_of_peak");
        assert!((share - g / peak).abs() < 1e-9 && share < 1.0, "{share}");
    }
    assert!(v["bf16_kernel"].as_str().unwrap().contains("bf16"));
    positive(&v, "explain_s_per_mask_bf16");
    assert_eq!(v["explain_bf16"]["n_masks"], 4);
    // bf16 perturbed passes keep the map and the class (the fidelity bar).
    let f = &v["bf16_fidelity"];
    let r = f["saliency_pearson"].as_f64().unwrap();
    assert!((0.99..=1.0).contains(&r), "bf16 saliency pearson {r}");
    assert_eq!(f["same_top1"], true, "{f}");
    assert_eq!(f["top1_f32"], v["explain"]["class"]);
    positive(&v, "explain_s_per_mask");
    positive(&v, "perturbed_forward_s_per_image");
    let e = &v["explain"];
    assert_eq!(e["n_masks"], 4);
    assert!(e["n_masks_clustered"].as_u64().unwrap() >= 4);
    for stage in [
        "forward",
        "masks",
        "similarity",
        "clustering",
        "perturbed_forward",
        "aggregation",
    ] {
        assert!(e["stages_s"][stage].as_f64().unwrap() >= 0.0, "{stage}");
    }
    positive(&e["stages_s"], "perturbed_forward");
    assert_eq!(v["forward_runs_s"]["1"].as_array().unwrap().len(), 1);
    if cfg!(target_os = "linux") {
        positive(&v, "peak_rss_bytes");
        let m = &v["machine"];
        assert!(m["cpu_model"].is_string() || m["cpu_model"].is_null());
        assert!(m["available_parallelism"].as_u64().unwrap() >= 1);
        assert!(m["avx512"].is_boolean());
    }
}

#[test]
fn bench_bad_arguments_exit_2() {
    for (args, want) in [
        (&["bench", "--preset", "huge"][..], "preset 'huge' unknown"),
        (&["bench", "--batch", "0"][..], "batch 0 out of range"),
        (
            &["bench", "--precision", "fp8"][..],
            "precision 'fp8' unknown",
        ),
        (
            &["bench", "--preset", "tiny", "--explain-masks", "x"][..],
            "explain masks 'x' invalid",
        ),
    ] {
        let o = vitcx(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(o.stdout.is_empty());
    }
}
