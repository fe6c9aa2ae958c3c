//! PyTorch checkpoints (`torch.save` zip archives) read by vitcx's own pickle reader: files
//! written by PyTorch (`scripts/make_pickle_fixtures.py`, in `tests/data/pickle/`) read as
//! PyTorch wrote them, and a pickle that would run a command is refused without running it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::Value;
use vitcx::model::{load_with, Backbone, Checkpoint, Family, Format};
use vitcx::Error;

use crate::common::{case, crc32, data};

thread_local! {
    /// The tensors the capturing family was given.
    static CAPTURED: RefCell<Option<HashMap<String, Tensor>>> = const { RefCell::new(None) };
}

fn claims_all(_: Format, _: &Value) -> bool {
    true
}

fn capture(ckpt: Checkpoint, _: &Device) -> vitcx::Result<Box<dyn Backbone>> {
    CAPTURED.with(|c| *c.borrow_mut() = Some(ckpt.tensors));
    Err(Error::Unsupported("captured".into()))
}

/// A family that builds nothing and keeps the tensors the loader read.
const CAPTURE: Family = Family {
    name: "capture",
    covers: "anything",
    claims: claims_all,
    build: capture,
};

/// `file` beside a `config.json` in a fresh directory (the directory, and the file's path).
fn staged(file: &Path, name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        case("vit_timm").join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let dst = dir.path().join(name);
    std::fs::copy(file, &dst).unwrap();
    (dir, dst)
}

/// The tensors vitcx reads from a weights file, or the loader's error.
fn read(file: &Path) -> Result<HashMap<String, Tensor>, Error> {
    let name = file.file_name().unwrap().to_str().unwrap();
    let (_dir, path) = staged(file, name);
    CAPTURED.with(|c| c.borrow_mut().take());
    match load_with(&[CAPTURE], &path, &Device::Cpu) {
        Err(Error::Unsupported(m)) if m == "captured" => {
            Ok(CAPTURED.with(|c| c.borrow_mut().take()).unwrap())
        }
        Err(e) => Err(e),
        Ok(_) => unreachable!(),
    }
}

fn reason(r: Result<HashMap<String, Tensor>, Error>) -> String {
    match r {
        Err(Error::Checkpoint { reason, .. }) => reason,
        other => panic!("expected a checkpoint error, got {other:?}"),
    }
}

/// `arange(n) * 0.25 - 1`, the fixtures' values.
fn ramp(n: usize) -> Vec<f32> {
    (0..n).map(|i| i as f32 * 0.25 - 1.0).collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn every_float_dtype_and_layout_torch_saves_reads_as_f32() {
    let t = read(&data("pickle/dtypes.pt")).unwrap();
    let mut names: Vec<&str> = t.keys().map(String::as_str).collect();
    names.sort();
    // `position_ids` (a LongStorage buffer) is dropped, as for safetensors.
    assert_eq!(
        names,
        [
            "bf16",
            "empty",
            "f16",
            "f32",
            "f64",
            "param",
            "scalar",
            "transposed",
            "view_row"
        ]
    );
    for (name, dims, want) in [
        ("f32", vec![2, 3], ramp(6)),
        ("f16", vec![3, 2], ramp(6)),
        ("bf16", vec![5], ramp(5)),
        ("f64", vec![2, 2], ramp(4)),
        ("param", vec![1, 4], ramp(4)),
        ("view_row", vec![6], ramp(24)[12..18].to_vec()),
        ("scalar", vec![], vec![1.5]),
        ("empty", vec![0, 3], vec![]),
    ] {
        assert_eq!(t[name].dims(), dims.as_slice(), "{name}");
        assert_eq!(t[name].dtype(), candle_core::DType::F32, "{name}");
        assert_eq!(values(&t[name]), want, "{name}");
    }
    // `base.t()`: column-major strides over a 4x6 storage, read as the 6x4 transpose.
    let base = ramp(24);
    let want: Vec<f32> = (0..6)
        .flat_map(|i| (0..4).map(move |j| (i, j)))
        .map(|(i, j)| base[j * 6 + i])
        .collect();
    assert_eq!(t["transposed"].dims(), &[6, 4]);
    assert_eq!(values(&t["transposed"]), want);
}

#[test]
fn a_training_checkpoint_nests_its_state_dict() {
    let t = read(&data("pickle/nested.pth")).unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!(values(&t["w"]), ramp(3));
}

#[test]
fn unsupported_storages_and_layouts_name_the_tensor() {
    let r = reason(read(&data("pickle/int_storage.pt")));
    assert!(
        r.contains("tensor 'ints'") && r.contains("IntStorage"),
        "{r}"
    );
    let r = reason(read(&data("pickle/strided.pt")));
    assert!(
        r.contains("tensor 'strided'") && r.contains("not contiguous"),
        "{r}"
    );
}

/// A unique path under the temporary directory that nothing has created.
fn marker(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let p = std::env::temp_dir().join(format!("vitcx_pickle_{tag}_{}_{nanos}", std::process::id()));
    assert!(!p.exists());
    p
}

/// A stored (uncompressed) zip of `entries`, as torch.save writes it.
fn write_zip(path: &Path, entries: &[(&str, &[u8])]) {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, body) in entries {
        let off = out.len() as u32;
        let (crc, len) = (crc32(body), body.len() as u32);
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        for x in [20u16, 0, 0, 0, 0] {
            out.extend_from_slice(&x.to_le_bytes());
        }
        for x in [crc, len, len] {
            out.extend_from_slice(&x.to_le_bytes());
        }
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(body);
        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        for x in [20u16, 20, 0, 0, 0, 0] {
            central.extend_from_slice(&x.to_le_bytes());
        }
        for x in [crc, len, len] {
            central.extend_from_slice(&x.to_le_bytes());
        }
        for x in [name.len() as u16, 0, 0, 0, 0] {
            central.extend_from_slice(&x.to_le_bytes());
        }
        central.extend_from_slice(&0u32.to_le_bytes());
        central.extend_from_slice(&off.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let (cd_off, cd_len, n) = (out.len() as u32, central.len() as u32, entries.len() as u16);
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    for x in [0u16, 0, n, n] {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.extend_from_slice(&cd_len.to_le_bytes());
    out.extend_from_slice(&cd_off.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    std::fs::write(path, out).unwrap();
}

#[test]
fn a_reduce_exploit_is_refused_by_name_and_never_runs() {
    // `{"x": os.system("touch <marker>")}`: Python's pickle would run the command.
    let m = marker("os_system");
    let cmd = format!("touch {}", m.display());
    let mut pkl = b"\x80\x02}q\x00(X\x01\x00\x00\x00xcos\nsystem\nX".to_vec();
    pkl.extend_from_slice(&(cmd.len() as u32).to_le_bytes());
    pkl.extend_from_slice(cmd.as_bytes());
    pkl.extend_from_slice(b"\x85Ru.");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pytorch_model.bin");
    write_zip(&file, &[("archive/data.pkl", &pkl)]);
    let r = reason(read(&file));
    assert!(r.contains("'os.system'"), "{r}");
    assert!(!m.exists(), "the payload ran");

    // The same payload as torch.save writes it (`__reduce__` -> `posix.system` on Linux).
    let r = reason(read(&data("pickle/exploit.pt")));
    assert!(r.contains("'posix.system'"), "{r}");
    assert!(!Path::new("/tmp/vitcx_pickle_fixture_marker").exists());
}

#[test]
fn a_memo_bomb_is_refused_in_bounded_time() {
    // An empty list appended into itself through the memo, 133 times: candle's reader copied
    // the list on each memo read, doubling it, until the process ran out of memory.
    let mut pkl = b"\x80\x02]q\x00".to_vec();
    for _ in 0..133 {
        pkl.extend_from_slice(b"h\x00h\x00a0");
    }
    pkl.extend_from_slice(b"h\x00.");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pytorch_model.bin");
    write_zip(&file, &[("archive/data.pkl", &pkl)]);
    let start = std::time::Instant::now();
    let r = reason(read(&file));
    assert!(r.contains("a list, not a state dict"), "{r}");
    assert!(start.elapsed().as_secs() < 5, "{:?}", start.elapsed());
}

#[test]
fn files_that_are_not_torch_archives_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.pth");
    std::fs::write(&file, b"\x80\x02}.").unwrap();
    let r = reason(read(&file));
    assert!(r.contains("not a torch.save zip archive"), "{r}");
    write_zip(&file, &[("archive/other", b"x")]);
    let r = reason(read(&file));
    assert!(r.contains("data.pkl"), "{r}");
    write_zip(
        &file,
        &[
            ("archive/data.pkl", b"\x80\x02}."),
            ("archive/byteorder", b"big"),
        ],
    );
    let r = reason(read(&file));
    assert!(r.contains("byte order 'big'"), "{r}");
}
