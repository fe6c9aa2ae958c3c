//! Writing results: `.npy` maps, JSON reports and PNG images, each written atomically
//! (temporary file, then rename) so that a failure never leaves a partial file behind, and the
//! files of one result as a set ([`OutputSet`]): all or none.

use std::io::Write;
use std::path::{Path, PathBuf};

use image::{GrayImage, ImageEncoder, RgbImage};

use crate::error::{Error, Result};

/// Every temporary file staged by an [`OutputSet`] and not yet renamed or removed, so that a
/// signal handler can remove them ([`discard_staged`]). A commit holds the lock while it renames,
/// so a signal lands before or after a whole set, never inside one.
static STAGED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn staged() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    STAGED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes every staged temporary file of every [`OutputSet`] and keeps any set from being
/// committed afterwards (for a SIGINT/SIGTERM handler, which then exits): what is on disk is
/// the sets committed before, complete.
pub fn discard_staged() {
    let mut reg = staged();
    for p in reg.drain(..) {
        let _ = std::fs::remove_file(p);
    }
    // Held until the process exits: no rename can start after this.
    std::mem::forget(reg);
}

/// Files of one result (an image's maps, overlay and report) written as a set: each is staged
/// to a temporary file beside its final name, and all are renamed only once every one is
/// written. Dropped before [`OutputSet::commit`] (an error, a failed write on a full disk), it
/// removes what it staged, so a result is either complete or absent.
#[derive(Debug, Default)]
pub struct OutputSet {
    /// (temporary, final) paths, in the order staged.
    staged: Vec<(PathBuf, PathBuf)>,
}

impl OutputSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stages `bytes` for `path`.
    pub fn add(&mut self, path: &Path, bytes: &[u8]) -> Result<()> {
        let tmp = temporary(path)?;
        // Registered first, so that a failed write is removed by Drop, or by a signal handler.
        staged().push(tmp.clone());
        self.staged.push((tmp.clone(), path.to_path_buf()));
        write_file(&tmp, path, bytes)
    }

    /// Stages a float32 `.npy` file; non-finite values are refused (NaN is never a result).
    pub fn add_npy(&mut self, path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
        if let Some((i, v)) = data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(Error::invalid(format!(
                "{}: value {v} at index {i}; a result must be finite, so nothing was written",
                path.display()
            )));
        }
        self.add(path, &npy_bytes(shape, data)?)
    }

    /// Stages pretty-printed JSON.
    pub fn add_json(&mut self, path: &Path, value: &serde_json::Value) -> Result<()> {
        self.add(path, &json_bytes(value)?)
    }

    /// Stages an RGB image as PNG.
    pub fn add_png(&mut self, path: &Path, img: &RgbImage) -> Result<()> {
        self.add(path, &rgb_png(img)?)
    }

    /// Stages a grey image (8 bits) as PNG.
    pub fn add_gray_png(&mut self, path: &Path, img: &GrayImage) -> Result<()> {
        self.add(
            path,
            &encode_png(img.as_raw(), img.dimensions(), image::ExtendedColorType::L8)?,
        )
    }

    /// Renames every staged file to its final name. If one rename fails, the files already
    /// renamed are removed again, with the rest.
    pub fn commit(mut self) -> Result<()> {
        // Held while renaming: a signal handler waits for the whole set.
        let mut reg = staged();
        let staged = std::mem::take(&mut self.staged);
        let result = (|| {
            for (k, (tmp, path)) in staged.iter().enumerate() {
                if let Err(e) = std::fs::rename(tmp, path) {
                    for (_, done) in &staged[..k] {
                        let _ = std::fs::remove_file(done);
                    }
                    for (left, _) in &staged[k..] {
                        let _ = std::fs::remove_file(left);
                    }
                    return Err(Error::io(path, e));
                }
            }
            Ok(())
        })();
        reg.retain(|p| !staged.iter().any(|(t, _)| t == p));
        result
    }
}

impl Drop for OutputSet {
    fn drop(&mut self) {
        if self.staged.is_empty() {
            return;
        }
        let mut reg = staged();
        for (tmp, _) in &self.staged {
            let _ = std::fs::remove_file(tmp);
        }
        reg.retain(|p| !self.staged.iter().any(|(t, _)| t == p));
    }
}

/// The temporary name beside `path`: `.<name>.<pid>.tmp`.
fn temporary(path: &Path) -> Result<PathBuf> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| {
        Error::invalid(format!("output path '{}' has no file name", path.display()))
    })?;
    Ok(dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// Writes and syncs `bytes` to `tmp`; errors name `path`, the file asked for.
fn write_file(tmp: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(tmp).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

fn npy_bytes(shape: &[usize], data: &[f32]) -> Result<Vec<u8>> {
    let count: usize = shape.iter().product();
    if count != data.len() {
        return Err(Error::invalid(format!(
            "shape {shape:?} needs {count} values, got {}",
            data.len()
        )));
    }
    Ok(crate::io::npy::encode_npy_f32(shape, data))
}

fn json_bytes(value: &serde_json::Value) -> Result<Vec<u8>> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::invalid(format!("cannot encode json: {e}")))?;
    text.push('\n');
    Ok(text.into_bytes())
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut set = OutputSet::new();
    set.add(path, bytes)?;
    set.commit()
}

/// Writes a float32 `.npy` file atomically.
pub fn write_npy_atomic(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    write_atomic(path, &npy_bytes(shape, data)?)
}

/// Writes pretty-printed JSON atomically.
pub fn write_json_atomic(path: &Path, value: &serde_json::Value) -> Result<()> {
    write_atomic(path, &json_bytes(value)?)
}

/// Writes an RGB image as a PNG atomically.
///
/// Errors: [`Error::Io`] naming `path` when the directory is missing or not writable or the
/// write fails; [`Error::InvalidArgument`] for an empty image (PNG cannot hold 0 pixels).
pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    write_atomic(path, &rgb_png(img)?)
}

fn rgb_png(img: &RgbImage) -> Result<Vec<u8>> {
    encode_png(
        img.as_raw(),
        img.dimensions(),
        image::ExtendedColorType::Rgb8,
    )
}

fn encode_png(raw: &[u8], (w, h): (u32, u32), color: image::ExtendedColorType) -> Result<Vec<u8>> {
    if w == 0 || h == 0 {
        return Err(Error::invalid(format!(
            "image is {w}x{h}; cannot save an empty image as png"
        )));
    }
    let mut bytes = Vec::new();
    image::codecs::png::PngEncoder::new(&mut bytes)
        .write_image(raw, w, h, color)
        .map_err(|e| Error::invalid(format!("cannot encode png: {e}")))?;
    Ok(bytes)
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

    fn photo(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 100]))
    }

    #[test]
    fn save_png_round_trip_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.png");
        let img = photo(13, 9);
        save_png(&img, &p).unwrap();
        let back = image::open(&p).unwrap().into_rgb8();
        assert_eq!(back, img);
        // Overwrite works too.
        save_png(&photo(3, 3), &p).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out.png")]);
    }

    #[test]
    fn save_png_into_missing_directory_is_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("no/such/dir/out.png");
        let err = save_png(&photo(2, 2), &p).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
        assert!(!p.exists());
        assert!(save_png(&RgbImage::new(0, 0), &dir.path().join("e.png")).is_err());
    }

    #[test]
    fn an_output_set_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.npy"), dir.path().join("b.json"));
        // A NaN in the second file: the first one, already staged, is removed too.
        let mut set = OutputSet::new();
        set.add_json(&a, &serde_json::json!({"x": 1})).unwrap();
        let e = set
            .add_npy(&b, &[2], &[1.0, f32::NAN])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("NaN") && e.contains("nothing was written"),
            "{e}"
        );
        drop(set);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // All written: both appear, no temporary is left.
        let mut set = OutputSet::new();
        set.add_json(&a, &serde_json::json!({"x": 1})).unwrap();
        set.add_npy(&b, &[2], &[1.0, 2.0]).unwrap();
        assert!(!a.exists(), "nothing visible before the commit");
        set.commit().unwrap();
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["a.npy", "b.json"]);
    }

    #[test]
    fn a_write_that_fails_midway_removes_the_set() {
        // As on a full disk: the second file cannot be written.
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.json");
        let b = dir.path().join("b.npy");
        let mut set = OutputSet::new();
        set.add_json(&a, &serde_json::json!({"x": 1})).unwrap();
        // The temporary of b is made unwritable by a folder in its place.
        let tmp_b = temporary(&b).unwrap();
        std::fs::create_dir(&tmp_b).unwrap();
        assert!(set.add_npy(&b, &[1], &[1.0]).is_err());
        drop(set);
        std::fs::remove_dir(&tmp_b).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "nothing left"
        );
    }
}
