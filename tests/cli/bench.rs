//! `vitcx bench` end to end: a quick tiny-preset run prints one JSON object with the keys that
//! `scripts/bench_pytorch.py` compares against, its times are consistent with the clock of the
//! process that ran it, and bad arguments exit 2.

use crate::common::vitcx;

fn positive(v: &serde_json::Value, key: &str) -> f64 {
    let x = v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is {}, expected a number", v[key]));
    assert!(x > 0.0 && x.is_finite(), "{key} = {x}");
    x
}

#[test]
fn bench_tiny_json() {
    let started = std::time::Instant::now();
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
        "--linears",
        "--json",
    ]);
    let wall = started.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("stdout is one JSON object");
    assert!(v.is_object());
    assert_eq!(v["preset"], "tiny");
    assert_eq!(v["model"], "vit_tiny_patch16_224");
    assert_eq!(v["dtype"], "f32");
    positive(&v, "forward_s_per_image");
    let g = positive(&v, "forward_gflops");
    let flop = positive(&v, "gflop_per_image");
    // ViT-Ti/16 at 224 px, counted by hand: 1.25 G multiply-adds (timm's own profile: 1.3 GMACs).
    assert!((flop - 2.51).abs() < 0.02, "tiny is 2.51 GFLOP, got {flop}");
    positive(&v, "forward_s_per_image_bf16");
    if cfg!(target_arch = "x86_64") {
        // The forward pass cannot beat the machine's FMA peak, measured in the same run.
        let peak = positive(&v, "fma_peak_gflops");
        assert!(g < peak, "forward {g} GFLOP/s above the FMA peak {peak}");
        assert!(positive(&v, "forward_share_of_peak") < 1.0);
    }
    // Every timed run happened inside this process's lifetime: the sum of the reported times
    // cannot exceed the wall clock around it (a unit slip, ms for s, would).
    let runs: f64 = ["forward_runs_s", "forward_runs_s_bf16"]
        .iter()
        .flat_map(|k| v[*k]["1"].as_array().cloned().unwrap_or_default())
        .map(|t| t.as_f64().unwrap())
        .sum();
    let explained =
        v["explain"]["total_s"].as_f64().unwrap() + v["explain_bf16"]["total_s"].as_f64().unwrap();
    assert!(runs > 0.0 && explained > 0.0, "{runs} {explained}");
    assert!(
        runs + explained < wall,
        "timed {runs} + {explained} s in a process of {wall} s"
    );
    // `--linears`: ViT-Ti's four linear layers at batch 1 (197 tokens, width 192, MLP 768).
    let lin = v["linear_f32"].as_array().expect("linear_f32 is a list");
    let shapes: Vec<_> = lin
        .iter()
        .map(|l| (l["layer"].clone(), l["shape"].clone()))
        .collect();
    let want = [
        ("qkv", [197, 192, 576]),
        ("proj", [197, 192, 192]),
        ("fc1", [197, 192, 768]),
        ("fc2", [197, 768, 192]),
    ]
    .map(|(l, s)| (serde_json::json!(l), serde_json::json!(s)));
    assert_eq!(shapes, want);
    // On the packed f32 kernel each shape also went through gemm, run by run (the anchor).
    let packed = v["f32_kernel"].as_str().unwrap().starts_with("avx512f");
    for l in lin {
        positive(l, "gflops");
        assert_eq!(l["batch"], 1);
        assert_eq!(l["kernel"], v["f32_kernel"]);
        assert_eq!(l["gemm"].is_object(), packed, "{l}");
        if packed {
            positive(&l["gemm"], "gflops");
            positive(&l["gemm"], "speedup");
            assert_eq!(
                l["gemm"]["runs_s"].as_array().unwrap().len(),
                l["runs_s"].as_array().unwrap().len()
            );
        }
    }
    // The reduced precisions' packed products, at the same shapes (`--precision all`).
    for key in ["linear_bf16", "linear_int8"] {
        let l = v[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} is a list"));
        let got: Vec<_> = l
            .iter()
            .map(|l| (l["layer"].clone(), l["shape"].clone()))
            .collect();
        assert_eq!(got, want, "{key}");
        for t in l {
            positive(t, "gflops");
        }
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
    // int8 (the default `--precision all` times it too): timed, explained, compared. On this
    // random-weight ViT-Ti the probabilities are nearly uniform, so the top-1 class may flip;
    // the map and the logits stay close.
    positive(&v, "forward_s_per_image_int8");
    assert!(
        v["int8_kernel"].as_str().unwrap().contains("int8")
            || v["int8_kernel"].as_str().unwrap().contains("vnni")
    );
    assert_eq!(v["explain_int8"]["n_masks"], 4);
    let f = &v["int8_fidelity"];
    let r = f["saliency_pearson"].as_f64().unwrap();
    assert!((0.9..=1.0).contains(&r), "int8 saliency pearson {r}");
    let e = f["logits_rel_l2"].as_f64().unwrap();
    assert!(e > 0.0 && e < 0.2, "int8 logits relative error {e}");
    assert!(f["top1_int8"].is_u64(), "{f}");
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
        (
            &["bench", "--preset", "huge"][..],
            "architecture 'huge' unknown",
        ),
        (&["bench", "--batch", "0"][..], "batch 0 out of range"),
        (
            &["bench", "--precision", "fp8"][..],
            "precision 'fp8' unknown",
        ),
        (
            &["bench", "--preset", "tiny", "--explain-masks", "x"][..],
            "explain masks 'x' invalid",
        ),
        (
            &["bench", "--arch", "swin_tiny", "--linears"][..],
            "--linears times plain-block ViTs",
        ),
    ] {
        let o = vitcx(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(o.stdout.is_empty());
    }
}
