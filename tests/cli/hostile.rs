//! Hostile and odd inputs through the binary: each gets one `vitcx:` line, exit code 2, no
//! panic, and leaves nothing behind in `--out`.

use crate::common::{data, files_in, s, stderr, vitcx};

/// Runs `args`, expecting exit 2 and one `vitcx:` line containing `needle`.
fn refused(args: &[&str], needle: &str) -> String {
    let o = vitcx(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("vitcx: ") && err.contains(needle),
        "{args:?}: expected one line with '{needle}', got:\n{err}"
    );
    err
}

#[test]
fn command_line_errors_are_one_line() {
    let img = data("vit_timm/image_224.png");
    for (args, needle) in [
        (
            &["explain", s(&img), "--class", "-1"][..],
            "unexpected argument '-1'",
        ),
        (&["explain", s(&img), "--precision", "f64"][..], "f64"),
        (&["synth", "--count", "-1"][..], "'-1'"),
        (&["explain"][..], "<IMAGES>"),
        (&["explain", s(&img), "--seed", "-1"][..], "'-1'"),
    ] {
        refused(args, needle);
    }
    // --help keeps clap's own text.
    let o = vitcx(&["explain", "--help"]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("Usage:"));
}

#[test]
fn sizes_beyond_their_limits_are_refused_with_the_limit() {
    let out = tempfile::tempdir().unwrap();
    let img = data("vit_timm/image_224.png");
    let model = data("vit_timm");
    let base = [
        "explain",
        s(&img),
        "--model",
        s(&model),
        "--out",
        s(out.path()),
        "--quiet",
    ];
    for (extra, needle) in [
        (&["--noise-std", "1e38"][..], "expected 0 to 10"),
        (
            &["--method", "rise", "--rise-cells", "100000"][..],
            "expected 1 to 224",
        ),
        (
            &["--method", "rise", "--batch", "1000000"][..],
            "expected 1 to 1024",
        ),
    ] {
        let args: Vec<&str> = base.iter().copied().chain(extra.iter().copied()).collect();
        refused(&args, needle);
        assert!(files_in(out.path()).is_empty(), "{extra:?} wrote files");
    }
    refused(
        &[
            "compare",
            s(&img),
            "--model",
            s(&model),
            "--blur-kernel",
            "100001",
            "--out",
            s(out.path()),
        ],
        "from 1 to 449",
    );
}

#[cfg(unix)]
#[test]
fn a_fifo_or_a_device_is_refused_without_reading_it() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("f.png");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    if made.map(|s| s.success()).unwrap_or(false) {
        refused(
            &["predict", s(&fifo), "--model", s(&data("vit_timm"))],
            "not a regular file",
        );
    }
    refused(
        &["predict", "/dev/zero", "--model", s(&data("vit_timm"))],
        "not a regular file",
    );
}

#[test]
fn out_holding_an_input_is_refused_and_the_input_kept() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.png");
    std::fs::copy(data("vit_timm/image_224.png"), &a).unwrap();
    let before = std::fs::read(&a).unwrap();
    refused(
        &[
            "explain",
            s(&a),
            "--model",
            s(&data("vit_timm")),
            "--out",
            s(dir.path()),
            "--quiet",
        ],
        "holds the input",
    );
    assert_eq!(std::fs::read(&a).unwrap(), before);
    assert_eq!(files_in(dir.path()), vec!["a.png"]);
}

#[test]
fn a_checkpoint_with_nan_weights_is_refused_before_any_output() {
    let model = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(data(&format!("vit_timm/{f}")), model.path().join(f)).unwrap();
    }
    let p = model.path().join("model.safetensors");
    let mut t = candle_core::safetensors::load(&p, &candle_core::Device::Cpu).unwrap();
    let nan = t["head.bias"].affine(0.0, f64::NAN).unwrap();
    t.insert("head.bias".into(), nan);
    candle_core::safetensors::save(&t, &p).unwrap();
    let out = tempfile::tempdir().unwrap();
    refused(
        &[
            "explain",
            s(&data("vit_timm/image_224.png")),
            "--model",
            s(model.path()),
            "--out",
            s(out.path()),
            "--no-overlay",
        ],
        "'head.bias': holds NaN or infinite values",
    );
    assert!(files_in(out.path()).is_empty());
}

/// SIGINT in the middle of a batch: exit 130 within a second, every image's files complete or
/// absent, no temporary file left.
#[cfg(unix)]
#[test]
fn an_interrupted_batch_leaves_only_complete_sets() {
    use std::time::{Duration, Instant};
    let inputs = tempfile::tempdir().unwrap();
    for i in 0..8 {
        std::fs::copy(
            data("vit_timm/image_224.png"),
            inputs.path().join(format!("img{i}.png")),
        )
        .unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vitcx"))
        .args([
            "explain",
            s(inputs.path()),
            "--model",
            s(&data("vit_timm")),
            "--out",
            s(out.path()),
            "--quiet",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first image's report, then interrupt during a later image.
    let start = Instant::now();
    while !files_in(out.path()).iter().any(|f| f.ends_with(".json")) {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no image finished"
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("finished before the signal: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(150));
    let sent = Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(sent.elapsed() < Duration::from_secs(10), "did not stop");
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = sent.elapsed();
    let finished: Vec<String> = files_in(out.path());
    if status.code() == Some(0) {
        return; // the batch ended before the signal arrived: nothing to check
    }
    assert_eq!(status.code(), Some(130), "exit code");
    assert!(took < Duration::from_secs(1), "took {took:?} to stop");
    assert!(
        finished.iter().all(|f| !f.ends_with(".tmp")),
        "{finished:?}"
    );
    for i in 0..8 {
        let set: Vec<&String> = finished
            .iter()
            .filter(|f| f.starts_with(&format!("img{i}.")))
            .collect();
        assert!(set.is_empty() || set.len() == 3, "img{i}: {set:?}");
    }
    assert!(
        finished.len() < 24,
        "the signal came after the batch: {finished:?}"
    );
}

/// A pattern matching nothing is that entry's failure: the other images still run; folders are
/// read with their subfolders only with `--recursive`.
#[test]
fn bad_entries_fail_one_by_one_and_recursive_reads_subfolders() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    std::fs::copy(data("vit_timm/image_224.png"), sub.join("a.png")).unwrap();
    let model = data("vit_timm");
    let pattern = dir.path().join("nothing*.png");
    let o = vitcx(&[
        "predict",
        s(&pattern),
        s(&sub.join("a.png")),
        "--model",
        s(&model),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("matches no file") && err.lines().count() == 1,
        "{err}"
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("a.png"),
        "the good image ran"
    );

    let o = vitcx(&["predict", s(dir.path()), "--model", s(&model)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("--recursive reads subfolders"),
        "{}",
        stderr(&o)
    );
    let o = vitcx(&[
        "predict",
        s(dir.path()),
        "--recursive",
        "--model",
        s(&model),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("a.png"));
}

/// `synth` interrupted: exit 130, and nothing of the run left (no images without a manifest).
#[cfg(unix)]
#[test]
fn an_interrupted_synth_leaves_nothing() {
    use std::time::{Duration, Instant};
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("shapes");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vitcx"))
        .args(["synth", "--count", "5000", "--out", s(&dir)])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Interrupt once samples are being staged.
    let start = Instant::now();
    while files_in(&dir).len() < 4 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "synth wrote nothing"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let killed = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert_eq!(files_in(&dir), Vec::<String>::new(), "left behind");
}

/// With `RUST_BACKTRACE=1` set, as many shells have it, an ordinary error is still one line:
/// no stack trace, and nothing printed by a dependency before it.
#[test]
fn rust_backtrace_does_not_change_an_error() {
    let model = tempfile::tempdir().unwrap();
    std::fs::copy(
        data("pickle/int_storage.pt"),
        model.path().join("pytorch_model.bin"),
    )
    .unwrap();
    std::fs::copy(
        data("vit_timm/config.json"),
        model.path().join("config.json"),
    )
    .unwrap();
    let jpeg = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(data("images/goldfish.jpg")).unwrap();
    let cut = jpeg.path().join("cut.jpg");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    for args in [
        vec!["inspect", s(model.path())],
        vec!["predict", s(&cut), "--model", s(&data("vit_timm"))],
    ] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_vitcx"))
            .args(&args)
            .env("RUST_BACKTRACE", "1")
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("vitcx: ") && !err.contains("backtrace"),
            "{err}"
        );
    }
}
