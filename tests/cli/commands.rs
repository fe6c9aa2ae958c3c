//! End-to-end tests of the `vitcx` binary: files written, numbers right, errors exit 2 with a
//! one-line message and leave no partial output.

use crate::common::{crc32, data, files_in, s, stderr, vitcx};
use std::path::PathBuf;

#[test]
fn explain_sigma0_matches_reference_through_the_cli() {
    for (case, n_masks, target, layer) in [
        ("vit_timm", 13, 2, 3),
        ("deit_distilled_timm", 15, 0, 2),
        ("vit_hf", 8, 5, 3),
        ("deit3_timm", 8, 1, 2),
        ("reg4_dinov2_timm", 6, 2, 2),
        ("clip_timm", 6, 1, 2),
        ("siglip_timm", 6, 9, 2),
        ("dinov2_hf", 5, 5, 2),
    ] {
        let out = tempfile::tempdir().unwrap();
        let o = vitcx(&[
            "explain",
            s(&data(&format!("{case}/image_224.png"))),
            "--model",
            s(&data(case)),
            "--noise-std",
            "0",
            "--out",
            s(out.path()),
            "--quiet",
        ]);
        assert!(o.status.success(), "{case}: {}", stderr(&o));
        assert_eq!(
            files_in(out.path()),
            vec![
                "image_224.json",
                "image_224.png",
                "image_224.saliency.npy",
                "vitcx-run.shard-0-of-1.jsonl"
            ]
        );
        let ours = vitcx::io::npy::read_npy(out.path().join("image_224.saliency.npy")).unwrap();
        assert_eq!(ours.shape, vec![224, 224]);
        let golden =
            vitcx::io::npy::read_npy(data(&format!("{case}/saliency_sigma0.npy"))).unwrap();
        let (a, b) = (ours.to_f32(), golden.to_f32());
        let range =
            b.iter().cloned().fold(f32::MIN, f32::max) - b.iter().cloned().fold(f32::MAX, f32::min);
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(
            d <= 1e-5 * range,
            "{case}: saliency differs by {d} (range {range})"
        );

        let report: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.path().join("image_224.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(report["n_masks"], n_masks, "{case}");
        assert_eq!(report["targets"][0]["id"], target, "{case}");
        assert_eq!(report["params"]["noise_std"], 0.0);
        assert_eq!(report["params"]["layer"], layer, "{case}");
        assert_eq!(report["top5"].as_array().unwrap().len(), 5);
        assert!(report["seconds"]["perturbed_forward"].as_f64().unwrap() >= 0.0);

        let png = image::open(out.path().join("image_224.png")).unwrap();
        assert_eq!(png.width(), 224, "overlay keeps the original width");
        assert!(png.height() > 224, "legend strip below the image");
    }
}

#[test]
fn oversized_and_truncated_images_are_reported_not_decoded() {
    let dir = tempfile::tempdir().unwrap();
    // A valid PNG header claiming 20000 x 20000 pixels (400 MP), then an empty image.
    let mut ihdr = 20000u32.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&20000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, body) in [(b"IHDR", ihdr), (b"IDAT", vec![]), (b"IEND", vec![])] {
        png.extend_from_slice(&(body.len() as u32).to_be_bytes());
        let mut chunk = kind.to_vec();
        chunk.extend_from_slice(&body);
        png.extend_from_slice(&chunk);
        png.extend_from_slice(&crc32(&chunk).to_be_bytes());
    }
    let bomb = dir.path().join("bomb.png");
    std::fs::write(&bomb, &png).unwrap();
    let full = std::fs::read(data("images/goldfish.jpg")).unwrap();
    let cut = dir.path().join("cut.jpg");
    std::fs::write(&cut, &full[..full.len() / 2]).unwrap();
    let out = dir.path().join("out");
    let o = vitcx(&[
        "explain",
        s(&bomb),
        s(&cut),
        "--model",
        s(&data("vit_timm")),
        "--out",
        s(&out),
        "-q",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("bomb.png") && err.contains("100000000"),
        "{err}"
    );
    assert!(
        err.contains("cut.jpg") && err.contains("truncated"),
        "{err}"
    );
    assert!(err.contains("2 of 2 images failed"), "{err}");
    // The run record says why each failed; nothing else is written.
    assert_eq!(files_in(&out), ["vitcx-run.shard-0-of-1.jsonl"]);
    let record = std::fs::read_to_string(out.join("vitcx-run.shard-0-of-1.jsonl")).unwrap();
    assert_eq!(record.matches(r#""kind":"failed""#).count(), 2, "{record}");
    assert!(
        files_in(&out).len() == 1,
        "no partial output: {:?}",
        files_in(&out)
    );
}

#[test]
fn explain_several_images_and_classes_with_one_bad_file() {
    let out = tempfile::tempdir().unwrap();
    let bad = out.path().join("broken.jpg");
    std::fs::write(&bad, b"\xff\xd8\xff\xe0 this is not really a jpeg").unwrap();
    let outdir = out.path().join("res");
    let o = vitcx(&[
        "explain",
        s(&data("images/goldfish.jpg")),
        s(&bad),
        "--model",
        s(&data("deit_distilled_timm")),
        "--top-k",
        "2",
        "--out",
        s(&outdir),
        "--quiet",
    ]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "a failed image makes the exit code say so"
    );
    let err = stderr(&o);
    assert!(err.contains("broken.jpg"), "{err}");
    let files = files_in(&outdir);
    assert!(!files.iter().any(|f| f.starts_with("broken")), "{files:?}");
    assert!(files.contains(&"goldfish.json".to_string()), "{files:?}");
    assert!(files.contains(&"goldfish.png".to_string()), "{files:?}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(outdir.join("goldfish.json")).unwrap())
            .unwrap();
    let targets = report["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 2);
    for t in targets {
        let f = t["saliency"].as_str().unwrap();
        assert!(files.contains(&f.to_string()), "{f} in {files:?}");
        assert!(f.starts_with(&format!("goldfish.{}.", t["id"])), "{f}");
    }
    assert_eq!(report["model"]["family"], "DeitDistilled");
}

#[test]
fn same_seed_same_map_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str| {
        let out = dir.path().join(name);
        let o = vitcx(&[
            "explain",
            s(&data("vit_hf/image_224.png")),
            "--model",
            s(&data("vit_hf")),
            "--seed",
            "42",
            "--no-overlay",
            "--out",
            s(&out),
            "-q",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(!out.join("image_224.png").exists(), "--no-overlay");
        std::fs::read(out.join("image_224.saliency.npy")).unwrap()
    };
    assert_eq!(run("a"), run("b"));
}

#[test]
fn bf16_perturbed_passes_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let run = |precision: &str| {
        let out = dir.path().join(precision);
        let o = vitcx(&[
            "explain",
            s(&data("vit_hf/image_224.png")),
            "--model",
            s(&data("vit_hf")),
            "--precision",
            precision,
            "--out",
            s(&out),
            "-q",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        // On a CPU without a bf16 dot product, bf16 says it will not be faster.
        let slow_bf16 = precision == "bf16" && !vitcx::model::Precision::bf16_is_native();
        let note = stderr(&o).contains("this CPU has no bf16 dot product");
        assert_eq!(note, slow_bf16, "{}", stderr(&o));
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("image_224.json")).unwrap()).unwrap();
        assert_eq!(report["params"]["precision"], precision);
        let npy = vitcx::io::npy::read_npy(out.join("image_224.saliency.npy")).unwrap();
        (report["targets"][0]["id"].clone(), npy.to_f32())
    };
    let (c32, m32) = run("f32");
    let (c16, m16) = run("bf16");
    assert_eq!(c32, c16);
    assert_ne!(m32, m16, "bf16 changes the numbers");
    let d = crate::common::max_abs_diff(&m32, &m16);
    let range = crate::common::range(&m32);
    let r = crate::common::pearson(&m32, &m16);
    eprintln!(
        "bf16 vs f32 through the CLI: pearson {r:.7}, max diff {:.2e} of the range",
        d / range
    );
    // The README's bar for bf16 (Pearson 0.99998); measured 0.9999993 and 4.9e-3 of the range.
    assert!(r >= 0.99998, "bf16 map: pearson {r}");
    assert!(
        d < 0.01 * range,
        "bf16 map differs by {d} of a range of {range}"
    );
}

/// `--precision int8` and `int16` on the bundled demo model, one example image per class: the
/// same explained class, and maps close to f32's. Issue 18's bar (Pearson 0.999) holds for int8
/// on five of the six (0.99992 to 0.999997) but not for the cross (0.99786: its class
/// probability is 1.000 under every mask, so its map is made of small differences that int8
/// moves); the test guards exactly that. int16 holds it on all six.
#[test]
fn integer_perturbed_passes_keep_the_demo_maps() {
    let dir = tempfile::tempdir().unwrap();
    let shapes = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/shapes");
    let run = |precision: &str| {
        let out = dir.path().join(precision);
        let o = vitcx(&[
            "explain",
            s(&shapes),
            "--model",
            "demo",
            "--precision",
            precision,
            "--no-overlay",
            "--out",
            s(&out),
            "-q",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let note = stderr(&o).contains("no integer dot product");
        let slow = precision != "f32" && !vitcx::model::Precision::int8_is_native();
        assert_eq!(note, slow, "{}", stderr(&o));
        out
    };
    let f32_dir = run("f32");
    for precision in ["int8", "int16"] {
        let b = run(precision);
        let mut at_bar = 0;
        for shape in ["circle", "cross", "ring", "square", "star", "triangle"] {
            let report = |dir: &std::path::Path| -> serde_json::Value {
                serde_json::from_slice(&std::fs::read(dir.join(format!("{shape}.json"))).unwrap())
                    .unwrap()
            };
            let (ra, rb) = (report(&f32_dir), report(&b));
            assert_eq!(rb["params"]["precision"], precision);
            assert_eq!(
                ra["targets"][0]["id"], rb["targets"][0]["id"],
                "{shape}: {precision} class"
            );
            let map = |dir: &std::path::Path| {
                let f = format!("{shape}.saliency.npy");
                vitcx::io::npy::read_npy(dir.join(f)).unwrap().to_f32()
            };
            let (ma, mb) = (map(&f32_dir), map(&b));
            assert_ne!(ma, mb, "{shape}: {precision} changes the numbers");
            let r = crate::common::pearson(&ma, &mb);
            eprintln!("{shape}: {precision} vs f32 pearson {r:.6}");
            crate::common::readme_cell(
                &format!("{precision} demo"),
                shape,
                "pearson",
                format!("{r:.6}"),
            );
            assert!(r >= 0.995, "{shape}: {precision} pearson {r}");
            at_bar += usize::from(r >= 0.999);
        }
        let need = if precision == "int16" { 6 } else { 5 };
        assert!(
            at_bar >= need,
            "{precision}: {at_bar} of 6 examples at Pearson 0.999"
        );
    }
}

fn assert_fails(args: &[&str], needle: &str) {
    let o = vitcx(args);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(needle),
        "{args:?}: expected '{needle}' in: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains("RUST_BACKTRACE"), "{err}");
}

#[test]
fn bad_arguments_exit_2_with_a_clear_message() {
    let out = tempfile::tempdir().unwrap();
    let outdir = out.path().join("never");
    let img = data("vit_timm/image_224.png");
    let model = data("vit_timm");
    let common = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "explain",
            s(&img),
            "--model",
            s(&model),
            "--out",
            s(&outdir),
            "-q",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let run = |extra: &[&str], needle: &str| {
        let args = common(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_fails(&refs, needle);
    };
    run(
        &["--class", "10"],
        "class 10 out of range; model has 10 classes",
    );
    run(&["--class", "goldfish"], "class 'goldfish'");
    run(
        &["--layer", "4"],
        "layer 4 out of range; model has 4 blocks",
    );
    run(&["--layer", "-5"], "layer -5 out of range");
    run(&["--threshold", "1.5"], "threshold 1.5 out of range");
    run(&["--tap", "head"], "tap 'head' not in this model");
    run(&["--tap", "blocks.9"], "tap 'blocks.9' not in this model");
    run(&["--batch", "0"], "batch size 0");
    run(&["--noise-std", "-1"], "noise std -1");
    run(
        &["--precision", "fp8"],
        "unknown precision \"fp8\"; expected f32, bf16, int8 or int16",
    );
    assert!(
        !outdir.exists(),
        "no output directory for rejected arguments"
    );

    assert_fails(
        &[
            "explain",
            s(&img),
            "--model",
            s(&out.path().join("nope")),
            "-q",
        ],
        "nope",
    );
    assert_fails(
        &[
            "explain",
            s(&out.path().join("missing.png")),
            "--model",
            s(&model),
            "--out",
            s(&outdir),
            "-q",
        ],
        "missing.png",
    );
    // CUDA in a build without it: says how to get it, before any work.
    if !cfg!(feature = "cuda") {
        assert_fails(
            &["--device", "cuda", "predict", s(&img), "--model", s(&model)],
            "built without CUDA; rebuild with `cargo build --release --features cuda`",
        );
    }
    assert_fails(
        &["predict", s(&img), "--device", "tpu", "--model", s(&model)],
        "unknown device \"tpu\"; expected cpu, cuda or cuda:N",
    );
    // A directory that is not a checkpoint.
    assert_fails(&["inspect", s(&data("images"))], "no model.safetensors");
    // Hub id, offline, not cached: says what to do.
    assert_fails(
        &["inspect", "google/vit-base-patch16-224"],
        "HF_HUB_OFFLINE",
    );
}

#[test]
fn explain_at_a_named_tap() {
    // ViT-CX and Grad-CAM read the tap given by name; the report says which.
    for method in ["vitcx", "gradcam"] {
        let out = tempfile::tempdir().unwrap();
        let o = vitcx(&[
            "explain",
            s(&data("vit_timm/image_224.png")),
            "--model",
            s(&data("vit_timm")),
            "--method",
            method,
            "--tap",
            "blocks.2",
            "--noise-std",
            "0",
            "--no-overlay",
            "--out",
            s(out.path()),
            "-q",
        ]);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.path().join("image_224.json")).unwrap())
                .unwrap();
        assert_eq!(report["params"]["tap"], "blocks.2", "{method}");
        assert_eq!(report["params"]["layer"], 2, "{method}");
    }
    // --tap and --layer name the same thing twice.
    let o = vitcx(&[
        "explain",
        s(&data("vit_timm/image_224.png")),
        "--model",
        s(&data("vit_timm")),
        "--tap",
        "blocks.2",
        "--layer",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn predict_and_inspect() {
    let o = vitcx(&[
        "predict",
        s(&data("vit_hf/image_224.png")),
        "--model",
        s(&data("vit_hf")),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    let first = text.lines().nth(1).unwrap();
    assert!(
        first.contains("class_005"),
        "top-1 is the golden target: {text}"
    );
    assert_eq!(text.lines().count(), 6, "path + 5 classes: {text}");

    let o = vitcx(&["inspect", s(&data("deit_distilled_timm")), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["spec"]["num_prefix_tokens"], 2);
    assert_eq!(v["spec"]["depth"], 3);
    assert_eq!(v["spec"]["grid"], serde_json::json!([14, 14]));
    // Every tap by name, with its grid, width and prefix tokens in the JSON.
    let taps = v["spec"]["taps"].as_array().unwrap();
    assert_eq!(taps.len(), 6, "norm1 and output of 3 blocks");
    assert_eq!(taps[4]["name"], "blocks.2.norm1");
    assert_eq!(taps[4]["grid"], serde_json::json!([14, 14]));
    assert_eq!(
        taps[4]["prefix_tokens"],
        serde_json::json!(["[CLS]", "[DIST]"])
    );
    let o = vitcx(&["inspect", s(&data("vit_hf"))]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("token grid     14 x 14"), "{text}");
    assert!(
        text.contains("taps           8, each 14 x 14 x 192; --layer -1 reads blocks.3.norm1"),
        "{text}"
    );
    assert!(
        text.contains("blocks.0.norm1, blocks.0, blocks.1.norm1"),
        "{text}"
    );
}

#[test]
fn inspect_shows_registers_and_rollout_needs_a_class_token() {
    let o = vitcx(&["inspect", s(&data("reg4_dinov2_timm"))]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "family         Dinov2 (vit_small_patch14_reg4_dinov2)",
        "token grid     16 x 16",
        "prefix tokens  5 ([CLS], [REG0], [REG1], [REG2], [REG3])",
        "pos embed      patches only (not the prefix tokens), 16 x 16",
        "layer scale    true",
        "kernels        fused: attention, LayerNorm, linear, bias+gelu; composed: LayerScale",
    ] {
        assert!(text.contains(needle), "'{needle}' not in:\n{text}");
    }
    let o = vitcx(&["inspect", s(&data("clip_timm"))]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("activation     quick_gelu"), "{text}");
    assert!(
        text.contains("norms          norm_pre -> blocks -> norm"),
        "{text}"
    );
    assert!(text.contains("bias+quick_gelu"), "{text}");
    // Built for another size: the grid follows, and the note says how.
    let o = vitcx(&["inspect", s(&data("clip_timm")), "--input-size", "448"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("token grid     28 x 28"), "{text}");
    assert!(text.contains("resampled from 14x14 to 28x28"), "{text}");

    // --resize processor: DINOv2's processor resizes the shortest edge to 256 and crops 224;
    // the report says so and the overlay is the crop.
    let out = tempfile::tempdir().unwrap();
    let o = vitcx(&[
        "explain",
        s(&data("images/white_stork1.JPEG")),
        "--model",
        s(&data("dinov2_hf")),
        "--resize",
        "processor",
        "--out",
        s(out.path()),
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("white_stork1.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        report["params"]["resize"],
        "processor: shortest edge 256 bicubic, centre crop 224x224"
    );
    let png = image::open(out.path().join("white_stork1.png")).unwrap();
    assert_eq!(png.width(), 224, "the overlay is the crop the model saw");

    let out = tempfile::tempdir().unwrap();
    let o = vitcx(&[
        "explain",
        s(&data("siglip_timm/image_224.png")),
        "--model",
        s(&data("siglip_timm")),
        "--method",
        "rollout",
        "--out",
        s(out.path()),
        "--quiet",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("has no class token") && err.lines().count() == 1,
        "{err}"
    );
    assert!(files_in(out.path()).is_empty(), "nothing written");
}

#[test]
fn the_readme_first_command_explains_a_bundled_shape_with_the_demo_model() {
    // README quick start: `cargo run --release -- explain examples/shapes/cross.png --out DIR`.
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/shapes/cross.png");
    let dir = tempfile::tempdir().unwrap();
    let o = vitcx(&["explain", s(&example), "--out", s(dir.path()), "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("bundled demo model"), "{}", stderr(&o));
    let files = files_in(dir.path());
    assert!(files.contains(&"cross.png".to_string()), "{files:?}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("cross.json")).unwrap())
            .unwrap();
    assert_eq!(report["model"]["id"], "demo", "{report}");
    let png = image::open(dir.path().join("cross.png")).unwrap();
    assert!(png.width() >= 224 && png.height() >= 224);
    // Every bundled example is the first image of its class in `vitcx synth --count 24
    // --seed 11 --object-size 0.35-0.70` (the training sizes), as the README says.
    for (id, class) in vitcx::eval::synth::CLASSES.iter().enumerate() {
        let p = example.with_file_name(format!("{class}.png"));
        let img = image::open(&p).unwrap().to_rgb8();
        let first = (0..24)
            .map(|i| {
                let scene = vitcx::eval::synth::Scene::TRAINING;
                vitcx::eval::synth::sample_in(&scene, 11, i, (224, 224))
            })
            .find(|s| s.class_id == id)
            .unwrap_or_else(|| panic!("no {class} among the first 24 samples of seed 11"));
        assert!(img == first.image, "{} is not that sample", p.display());
    }
}

#[test]
fn no_model_means_the_bundled_demo_model_announced_once() {
    let img = data("vit_hf/image_224.png");
    let o = vitcx(&["predict", s(&img), "--top-k", "6"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "one notice line: {err}");
    assert!(err.contains("bundled demo model"), "{err}");
    let text = String::from_utf8_lossy(&o.stdout);
    for class in ["circle", "square", "triangle", "star", "cross", "ring"] {
        assert!(text.contains(class), "{class} missing: {text}");
    }
    // Asked for by name: the same model, no notice.
    let o = vitcx(&["predict", s(&img), "--top-k", "6", "--model", "demo"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o), "");
    assert_eq!(String::from_utf8_lossy(&o.stdout), text);
    let o = vitcx(&["inspect", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["model"], "demo");
    assert_eq!(v["spec"]["grid"], serde_json::json!([14, 14]));
    assert_eq!(v["spec"]["patch"], 16);
}
