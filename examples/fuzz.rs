//! A seeded mutation fuzzer for what vitcx reads from users: images, checkpoints (config.json +
//! safetensors), PyTorch pickles and manifests. It runs on stable Rust with no extra tool:
//!
//! ```sh
//! cargo run --release --example fuzz -- --make-corpus          # once: seeds in tests/data/fuzz/
//! cargo run --release --example fuzz -- --target all --seconds 900 --seed 1
//! ```
//!
//! Each iteration takes a seed file of the target's corpus (`tests/data/fuzz/<target>/`),
//! mutates it (bit flips, byte runs, insertions, deletions, truncation, splices, and numbers
//! swapped for edge values in text), and runs the loader on it under `catch_unwind`. An `Err` is
//! the expected answer to a bad input; a panic is a bug: the input is saved to
//! `tests/data/fuzz/crashes/` and reported. A run slower than 2 s is reported as slow (a hang or a
//! memory blow-up shows up here first). Deterministic for a given `--seed`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const TARGETS: [&str; 4] = ["image", "checkpoint", "pickle", "manifest"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    if args.iter().any(|a| a == "--make-corpus") {
        make_corpus();
        return;
    }
    let target = value("--target").unwrap_or_else(|| "all".into());
    let seconds: u64 = value("--seconds")
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seed: u64 = value("--seed").and_then(|s| s.parse().ok()).unwrap_or(0);
    let targets: Vec<&str> = if target == "all" {
        TARGETS.to_vec()
    } else if let Some(t) = TARGETS.iter().find(|t| **t == target) {
        vec![*t]
    } else {
        eprintln!("fuzz: unknown target '{target}'; expected one of {TARGETS:?} or all");
        std::process::exit(2);
    };
    // Panics are what we look for: count them, do not print a backtrace for each.
    std::panic::set_hook(Box::new(|_| {}));
    let per_target = Duration::from_secs(seconds) / targets.len() as u32;
    let mut crashed = false;
    for t in targets {
        crashed |= fuzz(t, per_target, seed);
    }
    if crashed {
        std::process::exit(1);
    }
}

/// Fuzzes one target for `time`; returns whether anything panicked.
fn fuzz(target: &str, time: Duration, seed: u64) -> bool {
    let corpus = files(&root().join(target));
    if corpus.is_empty() {
        eprintln!("fuzz: no corpus for {target}; run with --make-corpus first");
        std::process::exit(2);
    }
    let seeds: Vec<(PathBuf, Vec<u8>)> = corpus
        .iter()
        .map(|p| (p.clone(), std::fs::read(p).expect("corpus file")))
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fxhash(target.as_bytes()));
    let work = tempfile::tempdir().expect("temp dir");
    let start = Instant::now();
    let (mut runs, mut errors, mut panics, mut slow) = (0u64, 0u64, 0u64, 0u64);
    let mut slowest = Duration::ZERO;
    while start.elapsed() < time {
        let (name, bytes) = &seeds[rng.random_range(0..seeds.len())];
        let other = &seeds[rng.random_range(0..seeds.len())].1;
        let input = mutate(bytes, other, &mut rng, is_text(name));
        let t = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| run(target, name, &input, work.path())));
        let took = t.elapsed();
        runs += 1;
        slowest = slowest.max(took);
        if took > Duration::from_secs(2) {
            slow += 1;
            save(target, "slow", &input);
        }
        match outcome {
            Ok(true) => {}
            Ok(false) => errors += 1,
            Err(_) => {
                panics += 1;
                let p = save(target, "crash", &input);
                eprintln!(
                    "fuzz: {target}: PANIC on {} (from {})",
                    p.display(),
                    name.display()
                );
            }
        }
    }
    eprintln!(
        "fuzz: {target}: {runs} runs in {:.0} s, {errors} refused with an error, {panics} panics, {slow} slower than 2 s (slowest {:.2} s)",
        start.elapsed().as_secs_f64(),
        slowest.as_secs_f64()
    );
    panics > 0
}

/// Runs the loader of `target` on `input` (a mutation of the corpus file `name`); true when it
/// loaded, false when it answered with an error.
fn run(target: &str, name: &Path, input: &[u8], work: &Path) -> bool {
    let dev = Device::Cpu;
    match target {
        "image" => {
            let p = work.join("x.img");
            std::fs::write(&p, input).unwrap();
            vitcx::image::load_rgb(&p).is_ok()
        }
        "checkpoint" => {
            // A mutated config.json with its seed's weights, or the reverse.
            let dir = name.parent().unwrap();
            let stem = name.file_stem().unwrap().to_string_lossy();
            let stem = stem.trim_end_matches(".config");
            let (config, weights) = if is_text(name) {
                (
                    input.to_vec(),
                    std::fs::read(dir.join(format!("{stem}.safetensors"))).unwrap(),
                )
            } else {
                (
                    std::fs::read(dir.join(format!("{stem}.config.json"))).unwrap(),
                    input.to_vec(),
                )
            };
            vitcx::model::load_from_memory("fuzz", &config, &weights, &dev).is_ok()
        }
        "pickle" => {
            // The mutation is of data.pkl: put it back into the archive it came from.
            let d = work.join("ckpt");
            let _ = std::fs::create_dir_all(&d);
            let archive = std::fs::read(name.with_extension("pt")).unwrap();
            std::fs::write(d.join("pytorch_model.bin"), rezip(&archive, input)).unwrap();
            std::fs::write(d.join("config.json"), TINY_TIMM_CONFIG).unwrap();
            vitcx::model::load(&d, &dev).is_ok()
        }
        "manifest" => {
            let d = work.join("data");
            let _ = std::fs::create_dir_all(&d);
            let p = d.join("manifest.jsonl");
            std::fs::write(&p, input).unwrap();
            let a = vitcx::eval::dataset::read(&d).is_ok();
            let b = vitcx::eval::synth::read_manifest(&p).is_ok();
            a || b
        }
        _ => unreachable!(),
    }
}

/// `archive` (a torch.save zip) with its `*/data.pkl` replaced by `pkl`, stored uncompressed.
fn rezip(archive: &[u8], pkl: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut zin = zip::ZipArchive::new(std::io::Cursor::new(archive)).unwrap();
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..zin.len() {
        let mut f = zin.by_index(i).unwrap();
        let name = f.name().unwrap().to_string();
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).unwrap();
        out.start_file(name.as_str(), opts).unwrap();
        out.write_all(if name.ends_with("data.pkl") {
            pkl
        } else {
            &bytes
        })
        .unwrap();
    }
    out.finish().unwrap().into_inner()
}

/// A timm config naming a ViT, so that a pickle that loads reaches the family's checks.
const TINY_TIMM_CONFIG: &str =
    r#"{"architecture": "vit_tiny_patch16_224", "model_args": {"num_heads": 2}}"#;

fn is_text(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("json") | Some("jsonl")
    )
}

/// One to four mutations of `bytes`; in text, numbers are often swapped for edge values.
fn mutate(bytes: &[u8], other: &[u8], rng: &mut ChaCha8Rng, text: bool) -> Vec<u8> {
    let mut v = bytes.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let len = v.len().max(1);
        // Headers decide most parsing: aim a third of the edits at the first 256 bytes.
        let at = |rng: &mut ChaCha8Rng| {
            if rng.random_bool(0.33) {
                rng.random_range(0..len.min(256))
            } else {
                rng.random_range(0..len)
            }
        };
        match rng.random_range(0..8) {
            0 if !v.is_empty() => {
                let i = at(rng) % v.len();
                v[i] ^= 1 << rng.random_range(0..8);
            }
            1 if !v.is_empty() => {
                let i = at(rng) % v.len();
                v[i] = [0u8, 0xff, 0x7f, 0x80, b'0', b'9', b'"', b'{'][rng.random_range(0..8)];
            }
            2 => {
                let i = at(rng).min(v.len());
                let n = rng.random_range(1..=16);
                let ins: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                v.splice(i..i, ins);
            }
            3 if !v.is_empty() => {
                let i = at(rng) % v.len();
                let n = rng.random_range(1..=16).min(v.len() - i);
                v.drain(i..i + n);
            }
            4 if !v.is_empty() => v.truncate(rng.random_range(0..v.len())),
            5 if !other.is_empty() && !v.is_empty() => {
                // Splice a piece of another seed.
                let i = at(rng) % v.len();
                let a = rng.random_range(0..other.len());
                let b = (a + rng.random_range(1..=64)).min(other.len());
                v.splice(i..i, other[a..b].iter().copied());
            }
            6 if text => number_swap(&mut v, rng),
            _ if !v.is_empty() => {
                // Overwrite 4 or 8 bytes with an edge integer (sizes, offsets, counts).
                let edges: [u64; 6] = [0, 1, u32::MAX as u64, u64::MAX, 1 << 31, 1 << 40];
                let e = edges[rng.random_range(0..edges.len())].to_le_bytes();
                let w = if rng.random_bool(0.5) { 4 } else { 8 };
                let i = at(rng) % v.len();
                for (k, b) in e.iter().take(w).enumerate() {
                    if let Some(x) = v.get_mut(i + k) {
                        *x = *b;
                    }
                }
            }
            _ => {}
        }
    }
    v
}

/// Replaces one run of digits in JSON text with an edge value.
fn number_swap(v: &mut Vec<u8>, rng: &mut ChaCha8Rng) {
    let runs: Vec<(usize, usize)> = {
        let mut r = Vec::new();
        let mut i = 0;
        while i < v.len() {
            if v[i].is_ascii_digit() {
                let s = i;
                while i < v.len() && v[i].is_ascii_digit() {
                    i += 1;
                }
                r.push((s, i));
            }
            i += 1;
        }
        r
    };
    if runs.is_empty() {
        return;
    }
    let (a, b) = runs[rng.random_range(0..runs.len())];
    let edge = [
        "0",
        "1",
        "-1",
        "65536",
        "4294967296",
        "99999999999999999999",
        "1e308",
        "0.0",
    ][rng.random_range(0..8)];
    v.splice(a..b, edge.bytes());
}

fn save(target: &str, kind: &str, input: &[u8]) -> PathBuf {
    let dir = root().join("crashes");
    let _ = std::fs::create_dir_all(&dir);
    let p = dir.join(format!("{target}-{kind}-{:016x}", fxhash(input)));
    let _ = std::fs::write(&p, input);
    p
}

fn fxhash(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3)
    })
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    // The pickle corpus is its data.pkl files; the archives beside them are context.
    v.retain(|p| p.is_file() && p.extension().and_then(|e| e.to_str()) != Some("pt"));
    v.sort();
    v
}

/// Writes the seed corpus: small images in every format, tiny checkpoints, the pickles of
/// tests/data/pickle (data.pkl beside its archive), and manifests.
fn make_corpus() {
    use std::io::Read;
    let r = root();
    for t in TARGETS {
        std::fs::create_dir_all(r.join(t)).unwrap();
    }
    // Images: a gradient in PNG (RGB, grey, RGBA), JPEG, BMP and WebP.
    let img =
        image::RgbImage::from_fn(24, 16, |x, y| image::Rgb([x as u8 * 10, y as u8 * 15, 128]));
    let dynimg = image::DynamicImage::ImageRgb8(img);
    for (name, fmt) in [
        ("a.png", image::ImageFormat::Png),
        ("a.jpg", image::ImageFormat::Jpeg),
        ("a.bmp", image::ImageFormat::Bmp),
        ("a.webp", image::ImageFormat::WebP),
    ] {
        dynimg
            .save_with_format(r.join("image").join(name), fmt)
            .unwrap();
    }
    dynimg.to_luma8().save(r.join("image/grey.png")).unwrap();
    dynimg.to_rgba8().save(r.join("image/rgba.png")).unwrap();
    // Checkpoints: tiny timm ViTs with random weights, config and safetensors side by side.
    let dev = Device::Cpu;
    for (stem, options) in [
        (
            "vit",
            vitcx::model::families::vit::random::ArchOptions::default(),
        ),
        (
            "reg",
            vitcx::model::families::vit::random::ArchOptions {
                reg_tokens: 2,
                no_embed_class: true,
                layer_scale: true,
                ..Default::default()
            },
        ),
    ] {
        let arch = vitcx::model::families::vit::random::Arch {
            dim: 8,
            depth: 1,
            heads: 2,
            mlp_dim: 16,
            patch: 8,
            image_size: 16,
            num_classes: 3,
            layer_norm_eps: 1e-6,
            options,
        };
        let state = vitcx::model::families::vit::random::random_state_dict(&arch, 1, &dev).unwrap();
        candle_core::safetensors::save(&state, r.join(format!("checkpoint/{stem}.safetensors")))
            .unwrap();
        let config =
            vitcx::model::families::vit::random::timm_config_json(&arch, "vit_tiny_patch8_16");
        std::fs::write(
            r.join(format!("checkpoint/{stem}.config.json")),
            serde_json::to_string_pretty(&config).unwrap(),
        )
        .unwrap();
    }
    // Pickles: each archive of tests/data/pickle with its data.pkl beside it.
    let pickles = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/pickle");
    for name in ["dtypes.pt", "nested.pth"] {
        let bytes = std::fs::read(pickles.join(name)).unwrap();
        let stem = Path::new(name)
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .to_string();
        std::fs::write(r.join(format!("pickle/{stem}.pt")), &bytes).unwrap();
        let mut zin = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
        let pkl = (0..zin.len())
            .find(|&i| {
                zin.by_index(i)
                    .unwrap()
                    .name()
                    .unwrap()
                    .ends_with("data.pkl")
            })
            .unwrap();
        let mut data = Vec::new();
        zin.by_index(pkl).unwrap().read_to_end(&mut data).unwrap();
        std::fs::write(r.join(format!("pickle/{stem}.pkl")), data).unwrap();
    }
    // Manifests.
    std::fs::write(
        r.join("manifest/synth.jsonl"),
        "{\"image\": \"00000.png\", \"class_id\": 2, \"class_name\": \"cross\", \"bbox\": [10, 20, 60, 90], \"mask\": \"00000.mask.png\"}\n{\"image\": \"sub/00001.png\", \"class_id\": 0, \"class_name\": \"disk\", \"bbox\": [0, 0, 224, 224]}\n",
    )
    .unwrap();
    std::fs::write(
        r.join("manifest/minimal.jsonl"),
        "{\"image\": \"a.png\"}\n\n{\"image\": \"b.jpg\", \"class_id\": 7}\n",
    )
    .unwrap();
    eprintln!("fuzz: corpus written under {}", r.display());
}
