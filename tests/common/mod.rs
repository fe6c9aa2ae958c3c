//! Helpers shared by the integration tests: where the test data is, how to run the binary, the
//! golden cases, and the distances the numeric checks use.
#![allow(dead_code)] // each test crate uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vitcx::io::npy::read_npy;
use vitcx::model::Backbone;

/// The golden cases of the reference implementation: three copied from the project's golden set,
/// eight made by `scripts/make_golden.py` (DeiT III, DINOv2 registers, CLIP, SigLIP, HF DINOv2,
/// HF BEiT, EVA-02, Swin).
pub const CASES: [&str; 11] = [
    "vit_timm",
    "deit_distilled_timm",
    "vit_hf",
    "deit3_timm",
    "reg4_dinov2_timm",
    "clip_timm",
    "siglip_timm",
    "dinov2_hf",
    "beit_hf",
    "eva02_timm",
    "swin_timm",
];

/// `tests/data/<rel>`.
pub fn data(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(rel)
}

/// Runs the `vitcx` binary offline (no Hub access, an empty Hub cache).
pub fn vitcx(args: &[&str]) -> Output {
    vitcx_command(args).output().expect("run vitcx")
}

/// The `vitcx` command, offline, with no scheduler's shard variables (a test run inside a Slurm
/// array must not shard itself).
pub fn vitcx_command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vitcx"));
    c.args(args).env("HF_HUB_OFFLINE", "1").env(
        "HF_HOME",
        std::env::temp_dir().join("vitcx-test-empty-hf-home"),
    );
    for v in [
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_MIN",
        "SLURM_ARRAY_TASK_COUNT",
        "SLURM_ARRAY_TASK_STEP",
        "JOB_COMPLETION_INDEX",
    ] {
        c.env_remove(v);
    }
    c
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The binary's stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The names in a directory, sorted (none if it does not exist).
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => vec![],
    };
    v.sort();
    v
}

/// Largest absolute difference of two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Largest minus smallest value.
pub fn range(v: &[f32]) -> f32 {
    let max = v.iter().cloned().fold(f32::MIN, f32::max);
    let min = v.iter().cloned().fold(f32::MAX, f32::min);
    max - min
}

/// Pearson correlation of two equally long series.
pub fn pearson(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    vitcx::eval::metrics::pearson(a, b)
}

/// A golden case's folder.
pub fn case(name: &str) -> PathBuf {
    data(name)
}

/// A golden case's `manifest.json`.
pub fn manifest(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(case(name).join("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A golden case's model.
pub fn model(name: &str) -> Box<dyn Backbone> {
    vitcx::model::load(&case(name), &candle_core::Device::Cpu).unwrap()
}

/// A float32 fixture of a golden case (`<case>/<file>`).
pub fn fixture(name: &str, file: &str) -> Vec<f32> {
    read_npy(case(name).join(file)).unwrap().to_f32()
}

/// The reference's normalised input `input.npy` `(3, 224, 224)`.
pub fn reference_input(name: &str) -> Vec<f32> {
    fixture(name, "input.npy")
}

/// The input the reference used: `image_224.png` through vitcx's own preprocessing.
pub fn input(name: &str, model: &dyn Backbone) -> Vec<f32> {
    let img = vitcx::image::load_rgb(&case(name).join("image_224.png")).unwrap();
    let pre = &model.spec().preprocess;
    vitcx::image::to_input(&img, pre.mean, pre.std)
}

/// `x` `(3, H, W)` as a batch of one on the CPU.
pub fn batch_of_one(x: &[f32], (h, w): (usize, usize)) -> candle_core::Tensor {
    candle_core::Tensor::from_slice(x, (1, 3, h, w), &candle_core::Device::Cpu).unwrap()
}

/// One cell of a README table, printed for `scripts/readme_tables.py` (run the tests with
/// `--nocapture`): `| readme | table | row | column | value |`.
pub fn readme_cell(table: &str, row: &str, column: &str, value: impl std::fmt::Display) {
    eprintln!("| readme | {table} | {row} | {column} | {value} |");
}

/// CRC-32 (IEEE), as PNG chunks and zip entries need.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The case folders under a fixture root (the zoo), sorted.
pub fn case_dirs(root: &Path) -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    cases
}

/// A zoo case's `reference/meta.json`.
pub fn zoo_meta(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("reference/meta.json")).unwrap())
        .unwrap()
}
