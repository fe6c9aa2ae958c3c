//! Writing results: `.npy` maps, the JSON report and PNG overlays, each written atomically
//! (temporary file, then rename) so that a failure never leaves a partial file behind.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| {
        Error::invalid(format!("output path '{}' has no file name", path.display()))
    })?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes a float32 `.npy` file atomically.
pub fn write_npy_atomic(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let count: usize = shape.iter().product();
    if count != data.len() {
        return Err(Error::invalid(format!(
            "shape {shape:?} needs {count} values, got {}",
            data.len()
        )));
    }
    write_atomic(path, &crate::io::npy::encode_npy_f32(shape, data))
}

/// Writes pretty-printed JSON atomically.
pub fn write_json_atomic(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::invalid(format!("cannot encode json: {e}")))?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_leaves_only_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.npy");
        write_npy_atomic(&p, &[2], &[1.0, 2.0]).unwrap();
        let arr = crate::io::npy::read_npy(&p).unwrap();
        assert_eq!(arr.to_f32(), vec![1.0, 2.0]);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file left");
    }

    #[test]
    fn failed_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing").join("a.json");
        let e = write_json_atomic(&p, &serde_json::json!({"a": 1})).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        assert!(write_npy_atomic(&dir.path().join("b.npy"), &[3], &[1.0]).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
