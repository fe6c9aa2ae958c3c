//! Runs as shards of a job array: 1 shard and 4 shards (one killed mid-way and resumed) give the
//! same merged outputs, for `explain` and `eval`; assignment is stable as images are added;
//! reruns resume, refuse other settings, and retry failures only when asked.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::{files_in, s, stderr, vitcx, vitcx_command};

/// `synth` images (and their masks and backgrounds, also images to `explain`) with a manifest.
fn dataset(dir: &Path, count: usize) -> PathBuf {
    let data = dir.join("data");
    let count = count.to_string();
    let o = vitcx(&[
        "synth",
        "--count",
        &count,
        "--seed",
        "41",
        "--out",
        s(&data),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    data
}

/// The record lines of kind `done` in `dir`.
fn done_lines(dir: &Path) -> usize {
    files_in(dir)
        .iter()
        .filter(|f| f.starts_with("vitcx-run."))
        .map(|f| {
            std::fs::read_to_string(dir.join(f))
                .unwrap_or_default()
                // Whole lines only: a torn last line is ignored on resuming, so it is not done.
                .split_inclusive('\n')
                .filter(|l| l.ends_with('\n') && l.contains(r#""kind":"done""#))
                .count()
        })
        .sum()
}

/// Runs `args` as a shard, killing it (SIGKILL: a crash, not a clean stop) once its record
/// shows one image done, then runs it again to resume.
fn killed_then_resumed(args: &[&str], out: &Path) {
    let mut child = vitcx_command(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while done_lines(out) == 0 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the shard ended before any image was done"
        );
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no image done in 5 minutes"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let finished_early = child.try_wait().unwrap().is_some();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !finished_early,
        "the shard finished before it could be killed"
    );
    let before = done_lines(out);
    let o = vitcx(args);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("already"),
        "the rerun should say it resumed: {err}"
    );
    assert!(done_lines(out) > before);
}

fn shard_args<'a>(base: &[&'a str], out: &'a str, shard: &'a str) -> Vec<&'a str> {
    let mut v = base.to_vec();
    v.extend(["--out", out, "--shard", shard, "--quiet"]);
    v
}

/// Every file of the two folders is the same, but for the run records and the seconds in JSON.
fn same_outputs(a: &Path, b: &Path, skip_keys: &[&str]) {
    let names = |d: &Path| -> BTreeSet<String> {
        files_in(d)
            .into_iter()
            .filter(|f| !f.starts_with("vitcx-run."))
            .collect()
    };
    assert_eq!(names(a), names(b));
    let strip = |v: &mut serde_json::Value| {
        for k in skip_keys {
            let mut cur = &mut *v;
            let parts: Vec<&str> = k.split('.').collect();
            for p in &parts[..parts.len() - 1] {
                cur = &mut cur[*p];
            }
            if let Some(o) = cur.as_object_mut() {
                o.remove(*parts.last().unwrap());
            }
        }
    };
    for f in names(a) {
        let (x, y) = (
            std::fs::read(a.join(&f)).unwrap(),
            std::fs::read(b.join(&f)).unwrap(),
        );
        if f.ends_with(".json") {
            let mut x: serde_json::Value = serde_json::from_slice(&x).unwrap();
            let mut y: serde_json::Value = serde_json::from_slice(&y).unwrap();
            strip(&mut x);
            strip(&mut y);
            assert_eq!(x, y, "{f}");
        } else if f == "table.md" {
            // Its last column is seconds per image.
            let cut = |t: &[u8]| -> Vec<String> {
                String::from_utf8_lossy(t)
                    .lines()
                    .map(|l| l.rsplitn(3, '|').nth(2).unwrap_or(l).to_string())
                    .collect()
            };
            assert_eq!(cut(&x), cut(&y), "{f}");
        } else {
            assert!(x == y, "{f} differs");
        }
    }
}

#[test]
fn explain_as_four_shards_merges_to_the_single_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), 8);
    let base = ["explain", s(&data), "--method", "vitcx", "--noise-std", "0"];
    let one = dir.path().join("one");
    let o = vitcx(&shard_args(&base, s(&one), "0/1"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(done_lines(&one), 24);

    let outs: Vec<PathBuf> = (0..4).map(|i| dir.path().join(format!("s{i}"))).collect();
    let tags: Vec<String> = (0..4).map(|i| format!("{i}/4")).collect();
    for i in 0..4 {
        let args = shard_args(&base, s(&outs[i]), &tags[i]);
        if i == 1 {
            killed_then_resumed(&args, &outs[i]);
        } else {
            let o = vitcx(&args);
            assert!(o.status.success(), "{}", stderr(&o));
            assert!(stderr(&o).contains(&format!("shard {i}/4 (from --shard {i}/4)")));
        }
    }
    let total: usize = outs.iter().map(|d| done_lines(d)).sum();
    assert!(
        total >= 24,
        "every image done once, the killed shard's maybe twice: {total}"
    );
    let merged = dir.path().join("merged");
    let mut args = vec!["merge"];
    args.extend(outs.iter().map(|d| s(d)));
    args.extend(["--out", s(&merged)]);
    let o = vitcx(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("merged 24 of 24 images"),
        "{}",
        stderr(&o)
    );
    same_outputs(&one, &merged, &["seconds"]);

    // A shard left out is reported, and the exit code says the merge is incomplete.
    let o = vitcx(&[
        "merge",
        s(&outs[0]),
        s(&outs[2]),
        "--out",
        s(&dir.path().join("m2")),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("shard(s) 1, 3 of 4 missing"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn eval_as_four_shards_merges_to_the_single_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), 10);
    let base = [
        "eval",
        "--data",
        s(&data),
        "--methods",
        "vitcx,random",
        "--step",
        "1792",
    ];
    let one = dir.path().join("one");
    let mut args = base.to_vec();
    args.extend(["--out", s(&one), "--quiet"]);
    let o = vitcx(&args);
    assert!(o.status.success(), "{}", stderr(&o));

    let outs: Vec<PathBuf> = (0..4).map(|i| dir.path().join(format!("s{i}"))).collect();
    let tags: Vec<String> = (0..4).map(|i| format!("{i}/4")).collect();
    for i in 0..4 {
        let args = shard_args(&base, s(&outs[i]), &tags[i]);
        if i == 2 {
            killed_then_resumed(&args, &outs[i]);
        } else {
            let o = vitcx(&args);
            assert!(o.status.success(), "{}", stderr(&o));
        }
    }
    let merged = dir.path().join("merged");
    let mut args = vec!["merge"];
    args.extend(outs.iter().map(|d| s(d)));
    args.extend(["--out", s(&merged)]);
    let o = vitcx(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    same_outputs(&one, &merged, &["settings.seconds_per_image"]);
    let csv = std::fs::read_to_string(merged.join("per_image.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 2 * 10);

    // An eval shard may not share a folder with another (their reports would collide), and a
    // shard made with other settings is refused by name.
    let o = vitcx(&shard_args(&base, s(&outs[0]), "1/4"));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("its own --out"), "{}", stderr(&o));
    let other = dir.path().join("other");
    let mut args = shard_args(&base, s(&other), "1/4");
    args[4] = "vitcx,center";
    let o = vitcx(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = vitcx(&[
        "merge",
        s(&outs[0]),
        s(&other),
        "--out",
        s(&dir.path().join("m")),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("not shards of one run") && err.contains("center"),
        "{err}"
    );
}

#[test]
fn assignment_is_stable_as_images_are_added() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let png = crate::common::data("images");
    let source: Vec<String> = files_in(&png)
        .into_iter()
        .filter(|f| f.ends_with(".JPEG") || f.ends_with(".jpg"))
        .collect();
    assert!(!source.is_empty());
    let copy = |k: usize| {
        let f = &source[k % source.len()];
        let ext = Path::new(f).extension().unwrap().to_string_lossy();
        std::fs::copy(png.join(f), images.join(format!("img{k:03}.{ext}"))).unwrap();
    };
    let assigned = |out: &Path| -> BTreeSet<String> {
        let o = vitcx(&[
            "explain",
            s(&images),
            "--method",
            "center",
            "--no-overlay",
            "--quiet",
            "--shard",
            "1/3",
            "--out",
            s(out),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let rec = out.join("vitcx-run.shard-1-of-3.jsonl");
        let first = std::fs::read_to_string(rec).unwrap();
        let header: serde_json::Value =
            serde_json::from_str(first.lines().next().unwrap()).unwrap();
        header["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    for k in 0..12 {
        copy(k);
    }
    let before = assigned(&dir.path().join("a"));
    assert!(!before.is_empty() && before.len() < 12, "{before:?}");
    for k in 12..30 {
        copy(k);
    }
    let after = assigned(&dir.path().join("b"));
    assert!(before.is_subset(&after), "{before:?} vs {after:?}");
    assert!(after
        .iter()
        .filter(|k| !before.contains(*k))
        .all(|k| k.as_str() >= "img012"));
}

#[test]
fn reruns_resume_refuse_other_settings_and_retry_failures_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let good = crate::common::data("images/goldfish.jpg");
    std::fs::copy(&good, images.join("a.jpg")).unwrap();
    std::fs::write(images.join("b.jpg"), b"not a jpeg").unwrap();
    let out = dir.path().join("out");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "explain",
            s(&images),
            "--method",
            "random",
            "--out",
            s(&out),
            "-q",
        ];
        args.extend(extra);
        vitcx(&args)
    };
    let o = run(&[]);
    assert_eq!(o.status.code(), Some(2), "b.jpg fails");
    let a_json = std::fs::read(out.join("a.json")).unwrap();
    // Rerun: a.jpg is done (and not redone), b.jpg's failure is reported, not retried.
    let o = run(&[]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("b.jpg: failed in an earlier run"), "{err}");
    assert!(err.contains("1 of 2 images already explained"), "{err}");
    assert_eq!(std::fs::read(out.join("a.json")).unwrap(), a_json);
    // Fixed and retried.
    std::fs::copy(&good, images.join("b.jpg")).unwrap();
    let o = run(&["--retry-failed"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("b.saliency.npy").is_file());
    // Other settings: refused, naming the difference; --force redoes over it.
    let o = run(&["--seed", "7"]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("other settings") && err.contains("--force"),
        "{err}"
    );
    let o = run(&["--seed", "7", "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(std::fs::read(out.join("a.json")).unwrap(), a_json);
}

#[test]
fn the_readme_shows_the_deployment_files_as_they_are() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    for f in [
        "deploy/slurm-array.sh",
        "deploy/k8s-indexed-job.yaml",
        "Dockerfile",
    ] {
        let text = std::fs::read_to_string(root.join(f)).unwrap();
        assert!(
            readme.contains(&text),
            "README.md does not hold {f} as it is"
        );
    }
    // The Slurm script is valid bash, and names the shard's own folder.
    let o = std::process::Command::new("bash")
        .args(["-n", s(&root.join("deploy/slurm-array.sh"))])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let k8s = std::fs::read_to_string(root.join("deploy/k8s-indexed-job.yaml")).unwrap();
    assert!(k8s.contains("completionMode: Indexed") && k8s.contains("--shards"));
}
