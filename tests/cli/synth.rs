//! End-to-end tests of `vitcx synth`: the files it writes, determinism, and errors (exit 2,
//! one line).

use crate::common::{s, stderr, vitcx};

#[test]
fn synth_writes_images_masks_and_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bench");
    let o = vitcx(&["synth", "--count", "12", "--seed", "5", "--out", s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut want: Vec<String> = (0..12)
        .flat_map(|i| {
            [
                format!("{i:05}.png"),
                format!("{i:05}.mask.png"),
                format!("{i:05}.background.png"),
            ]
        })
        .collect();
    want.push("manifest.jsonl".into());
    want.sort();
    assert_eq!(names, want);

    let entries = vitcx::eval::synth::read_manifest(&out.join("manifest.jsonl")).unwrap();
    assert_eq!(entries.len(), 12);
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.image, format!("{i:05}.png"));
        assert_eq!(e.class_name, vitcx::eval::synth::CLASSES[e.class_id]);
        let img = image::open(out.join(&e.image)).unwrap();
        assert_eq!((img.width(), img.height()), (224, 224));
        assert_eq!(img.color(), image::ColorType::Rgb8);
        let mask = image::open(out.join(e.mask.as_deref().unwrap())).unwrap();
        assert_eq!(mask.color(), image::ColorType::L8);
        let mask = mask.to_luma8();
        let [x0, y0, x1, y1] = e.bbox;
        assert!(x0 < x1 && y0 < y1 && x1 <= 224 && y1 <= 224, "{:?}", e.bbox);
        let inside = mask.enumerate_pixels().filter(|(_, _, p)| p[0] == 255);
        let n = inside
            .map(|(x, y, _)| {
                assert!((x0..x1).contains(&x) && (y0..y1).contains(&y));
                1
            })
            .sum::<usize>();
        assert!(n > 224 * 224 / 150, "sample {i}: {n} mask pixels");
        // The library gives the same sample.
        let sample = vitcx::eval::synth::sample(5, i as u64, (224, 224));
        assert_eq!(img.to_rgb8().as_raw(), sample.image.as_raw());
        assert_eq!(e.class_id, sample.class_id);
        let bg = image::open(out.join(e.background.as_deref().unwrap())).unwrap();
        assert_eq!(bg.color(), image::ColorType::Rgb8);
        let scene = vitcx::eval::synth::Scene::BENCHMARK;
        let (_, want) = vitcx::eval::synth::sample_with_background(&scene, 5, i as u64, (224, 224));
        assert_eq!(bg.to_rgb8().as_raw(), want.as_raw());
    }

    // Same seed, byte-identical files; another seed, other images.
    let again = tmp.path().join("again");
    let o = vitcx(&[
        "synth",
        "--count",
        "12",
        "--seed",
        "5",
        "--out",
        s(&again),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for name in &names {
        assert_eq!(
            std::fs::read(out.join(name)).unwrap(),
            std::fs::read(again.join(name)).unwrap(),
            "{name}"
        );
    }
    let other = tmp.path().join("other");
    let o = vitcx(&[
        "synth",
        "--count",
        "1",
        "--seed",
        "6",
        "--out",
        s(&other),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(
        std::fs::read(out.join("00000.png")).unwrap(),
        std::fs::read(other.join("00000.png")).unwrap()
    );
}

#[test]
fn synth_errors_exit_2_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let o = vitcx(&["synth", "--count", "0", "--out", s(tmp.path())]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.starts_with("vitcx: ") && e.contains("count 0"), "{e}");
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");

    // The output path is a file: nothing can be created under it.
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let o = vitcx(&["synth", "--count", "2", "--out", s(&file.join("sub"))]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.starts_with("vitcx: ") && e.contains("file"), "{e}");

    // Object sizes that cannot fit, or are not a range: one line, nothing written.
    let sized = tmp.path().join("sized");
    for bad in ["0.5-0.3", "0.2-0.95", "big", "0-0.4"] {
        let o = vitcx(&[
            "synth",
            "--count",
            "2",
            "--object-size",
            bad,
            "--out",
            s(&sized),
        ]);
        assert_eq!(o.status.code(), Some(2), "{bad}");
        let e = stderr(&o);
        assert!(
            e.contains("0.35-0.45") || e.contains("object size"),
            "{bad}: {e}"
        );
        assert!(!sized.join("manifest.jsonl").exists(), "{bad}");
    }

    // Usage errors (clap) also exit 2.
    let o = vitcx(&["synth", "--count", "-3", "--out", s(tmp.path())]);
    assert_eq!(o.status.code(), Some(2));
    let o = vitcx(&["synth", "--count", "2"]);
    assert_eq!(o.status.code(), Some(2), "--out is required");
}
