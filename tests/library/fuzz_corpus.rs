//! The fuzzer's corpus (`tests/data/fuzz/`, see `examples/fuzz.rs`) as a regression test: every
//! seed, every prefix of it at a stride, and every saved crash go through the loaders they were
//! made for and must give `Ok` or `Err`, never a panic.

use std::path::{Path, PathBuf};

use candle_core::Device;

fn dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/fuzz")
        .join(target)
}

fn files(d: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(d)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// `bytes` and its prefixes at about 40 lengths: the truncations that parsers get wrong most.
fn cuts(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let step = (bytes.len() / 40).max(1);
    (0..bytes.len())
        .step_by(step)
        .map(move |n| &bytes[..n])
        .chain([bytes])
}

#[test]
fn images_and_their_truncations_never_panic() {
    let work = tempfile::tempdir().unwrap();
    let p = work.path().join("x.img");
    let seeds = files(&dir("image"));
    assert!(seeds.len() >= 6, "corpus missing: {seeds:?}");
    for seed in seeds {
        let bytes = std::fs::read(&seed).unwrap();
        assert!(vitcx::image::load_rgb(&seed).is_ok(), "{}", seed.display());
        for cut in cuts(&bytes) {
            std::fs::write(&p, cut).unwrap();
            let _ = vitcx::image::load_rgb(&p);
        }
    }
}

#[test]
fn checkpoints_and_their_truncations_never_panic() {
    let d = dir("checkpoint");
    for stem in ["vit", "reg"] {
        let config = std::fs::read(d.join(format!("{stem}.config.json"))).unwrap();
        let weights = std::fs::read(d.join(format!("{stem}.safetensors"))).unwrap();
        let dev = Device::Cpu;
        assert!(vitcx::model::load_from_memory(stem, &config, &weights, &dev).is_ok());
        for cut in cuts(&weights) {
            let _ = vitcx::model::load_from_memory(stem, &config, cut, &dev);
        }
        for cut in cuts(&config) {
            let _ = vitcx::model::load_from_memory(stem, cut, &weights, &dev);
        }
        // The same cuts as files (read through a memory map, not a buffer): one error line that
        // names the file once.
        let work = tempfile::tempdir().unwrap();
        std::fs::write(work.path().join("config.json"), &config).unwrap();
        let file = work.path().join("model.safetensors");
        for cut in cuts(&weights) {
            std::fs::write(&file, cut).unwrap();
            if let Err(e) = vitcx::model::load(work.path(), &dev) {
                let e = e.to_string();
                assert!(e.contains("model.safetensors") && !e.contains('\n'), "{e}");
                assert!(!e.contains("path: "), "{e}");
            }
        }
        std::fs::write(&file, &weights).unwrap();
        assert!(vitcx::model::load(work.path(), &dev).is_ok());
    }
}

#[test]
fn manifests_and_saved_crashes_never_panic() {
    let work = tempfile::tempdir().unwrap();
    let m = work.path().join("manifest.jsonl");
    for seed in files(&dir("manifest")) {
        let bytes = std::fs::read(&seed).unwrap();
        for cut in cuts(&bytes) {
            std::fs::write(&m, cut).unwrap();
            let _ = vitcx::eval::dataset::read(work.path());
            let _ = vitcx::eval::synth::read_manifest(&m);
        }
    }
    // Whatever the fuzzer saved (`<target>-crash-<hash>`) stays a test case once fixed.
    for crash in files(&dir("crashes")) {
        let name = crash.file_name().unwrap().to_string_lossy().to_string();
        let bytes = std::fs::read(&crash).unwrap();
        if name.starts_with("image-") {
            let p = work.path().join("c.img");
            std::fs::write(&p, &bytes).unwrap();
            let _ = vitcx::image::load_rgb(&p);
        } else if name.starts_with("manifest-") {
            std::fs::write(&m, &bytes).unwrap();
            let _ = vitcx::eval::dataset::read(work.path());
        }
    }
}
