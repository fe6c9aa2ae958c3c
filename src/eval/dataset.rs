//! The images an evaluation runs over, with their ground truth: a `manifest.jsonl` (as `vitcx
//! synth` writes it, or any list with at least an `image` per line), a directory holding one,
//! or a plain directory of images (no ground truth).

use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::error::{Error, Result};
use crate::model::Spec;
use crate::target::check_classes;

/// One manifest line; everything but `image` is optional so a plain list of images works.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Entry {
    /// As written in the manifest (relative to it); reported in the CSV.
    pub image: PathBuf,
    /// `image` resolved against the manifest's directory.
    #[serde(skip)]
    pub path: PathBuf,
    /// The true class id.
    #[serde(default)]
    pub class_id: Option<usize>,
    /// The true class by label (used when there is no `class_id`).
    #[serde(default)]
    pub class_name: Option<String>,
    /// `[x0, y0, x1, y1]` in original image pixels, `x1`/`y1` exclusive.
    #[serde(default)]
    pub bbox: Option<[f64; 4]>,
    /// The object mask (nonzero = object), resolved against the manifest's directory.
    #[serde(default)]
    pub mask: Option<PathBuf>,
    /// The same scene without the object (as `vitcx synth` writes it), resolved against the
    /// manifest's directory: the baseline of the `background` deletion and insertion curves.
    #[serde(default)]
    pub background: Option<PathBuf>,
}

/// The entries named by `data`: a manifest file, a directory holding `manifest.jsonl`, or a
/// directory of images (no ground truth). Paths become relative to the manifest's directory,
/// and may not leave it ([`read_with`] to allow that).
pub fn read(data: &Path) -> Result<Vec<Entry>> {
    read_with(data, false)
}

/// [`read`]; with `allow_outside`, a manifest may name files outside its folder (absolute
/// paths, `..`), as a list a user wrote on purpose may.
pub fn read_with(data: &Path, allow_outside: bool) -> Result<Vec<Entry>> {
    let manifest = if data.is_dir() {
        let m = data.join("manifest.jsonl");
        if !m.is_file() {
            return images_in(data);
        }
        m
    } else {
        data.to_path_buf()
    };
    let bytes = crate::io::read_bounded(&manifest, MAX_MANIFEST_BYTES)?;
    let text = String::from_utf8(bytes).map_err(|_| {
        Error::invalid(format!("manifest {} is not UTF-8 text", manifest.display()))
    })?;
    let dir = manifest.parent().unwrap_or(Path::new("."));
    let mut entries = Vec::new();
    for (k, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut e: Entry = serde_json::from_str(line).map_err(|err| {
            Error::invalid(format!(
                "{} line {}: bad manifest entry: {err}",
                manifest.display(),
                k + 1
            ))
        })?;
        let inside = |rel: &Path, what: &str| -> Result<PathBuf> {
            if !allow_outside && !stays_inside(rel) {
                return Err(Error::invalid(format!(
                    "{} line {}: {what} '{}' is outside the manifest's folder (--allow-outside permits it)",
                    manifest.display(),
                    k + 1,
                    rel.display()
                )));
            }
            Ok(dir.join(rel))
        };
        e.path = inside(&e.image, "image")?;
        e.mask = e.mask.map(|m| inside(&m, "mask")).transpose()?;
        e.background = e.background.map(|b| inside(&b, "background")).transpose()?;
        entries.push(e);
    }
    if entries.is_empty() {
        return Err(Error::invalid(format!(
            "manifest {} lists no image",
            manifest.display()
        )));
    }
    Ok(entries)
}

/// The largest manifest read (a million entries take about 150 MB).
pub const MAX_MANIFEST_BYTES: u64 = 1 << 30;

/// Whether the relative path `rel` stays inside its base folder: not absolute, and no `..`
/// climbing above where it started.
fn stays_inside(rel: &Path) -> bool {
    use std::path::Component;
    let mut depth = 0i64;
    for c in rel.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// The image files of a directory, sorted, as entries without ground truth.
fn images_in(dir: &Path) -> Result<Vec<Entry>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && crate::image::has_image_extension(p))
        .collect();
    if files.is_empty() {
        return Err(Error::invalid(format!(
            "directory {} holds no manifest.jsonl and no image ({})",
            dir.display(),
            crate::image::EXTENSIONS.join(", ")
        )));
    }
    files.sort();
    Ok(files
        .into_iter()
        .map(|path| Entry {
            image: path.strip_prefix(dir).unwrap_or(&path).to_path_buf(),
            path,
            class_id: None,
            class_name: None,
            bbox: None,
            mask: None,
            background: None,
        })
        .collect())
}

/// One image read, resized and normalised for a model, with its ground truth.
#[derive(Debug, Clone)]
pub struct Input {
    /// The model's input `(3, H, W)`.
    pub x: Vec<f32>,
    /// The true class, where the entry gives one.
    pub truth: Option<usize>,
    /// The object mask `(H, W)` at the model's input size, where the entry gives one.
    pub mask: Option<Vec<u8>>,
    /// The object-free image `(3, H, W)`, preprocessed like `x`, when it was read
    /// ([`Entry::load_background`]; [`Entry::load`] leaves it out).
    pub background: Option<Vec<f32>>,
}

impl Entry {
    /// The ground-truth class: `class_id`, else `class_name` looked up in the model's labels.
    pub fn truth(&self, spec: &Spec) -> Result<Option<usize>> {
        let id = match (self.class_id, &self.class_name) {
            (Some(id), _) => Some(id),
            (None, Some(name)) => spec.labels.iter().position(|l| l == name),
            (None, None) => None,
        };
        if let Some(id) = id {
            check_classes(&[id], spec.num_classes)?;
        }
        Ok(id)
    }

    /// Reads the image and its ground truth for a model with `spec`.
    pub fn load(&self, spec: &Spec) -> Result<Input> {
        let img = crate::image::load_rgb(&self.path)?;
        self.input(&img, spec)
    }

    /// Reads the object-free image, preprocessed exactly as [`Entry::load`] preprocesses the
    /// image `(3, H, W)`. Fails when the entry has none, or when its size differs from the
    /// image's (the two must be the same scene).
    pub fn load_background(&self, spec: &Spec) -> Result<Vec<f32>> {
        let Some(path) = &self.background else {
            return Err(Error::invalid(format!(
                "{} has no background (the scene without the object) in the manifest; the \
                 background baseline needs one (vitcx synth writes them)",
                self.image.display()
            )));
        };
        let bg = crate::image::load_rgb(path)?;
        let image_size = ::image::ImageReader::open(&self.path)
            .and_then(|r| r.with_guessed_format())
            .map_err(|e| Error::io(&self.path, e))?
            .into_dimensions()
            .map_err(|e| Error::invalid(format!("{}: {e}", self.path.display())))?;
        if bg.dimensions() != image_size {
            return Err(Error::invalid(format!(
                "background {} is {}x{} but its image {} is {}x{}; they must show the same scene",
                path.display(),
                bg.width(),
                bg.height(),
                self.path.display(),
                image_size.0,
                image_size.1
            )));
        }
        let pre = &spec.preprocess;
        Ok(crate::image::model_input(&bg, spec.input_size, pre.mean, pre.std).1)
    }

    fn input(&self, img: &RgbImage, spec: &Spec) -> Result<Input> {
        let size = spec.input_size;
        let pre = &spec.preprocess;
        let (_, x) = crate::image::model_input(img, size, pre.mean, pre.std);
        let truth = self.truth(spec)?;
        let mask = match (&self.mask, self.bbox) {
            (Some(m), _) => Some(load_mask(m, size)?),
            (None, Some(b)) => Some(bbox_mask(b, (img.width(), img.height()), size)),
            (None, None) => None,
        };
        Ok(Input {
            x,
            truth,
            mask,
            background: None,
        })
    }
}

/// A mask PNG (nonzero = object) resized to `(H, W)` by nearest neighbour (half-pixel centres).
pub fn load_mask(path: &Path, (h, w): (usize, usize)) -> Result<Vec<u8>> {
    let m = image::DynamicImage::ImageRgb8(crate::image::load_rgb(path)?).to_luma8();
    let (mw, mh) = (m.width() as usize, m.height() as usize);
    let near = |d: usize, out: usize, src: usize| ((2 * d + 1) * src / (2 * out)).min(src - 1);
    let mut out = Vec::with_capacity(h * w);
    for y in 0..h {
        let sy = near(y, h, mh);
        for x in 0..w {
            let sx = near(x, w, mw);
            out.push(u8::from(m.get_pixel(sx as u32, sy as u32).0[0] != 0));
        }
    }
    Ok(out)
}

/// A box `[x0, y0, x1, y1]` in original pixels (end exclusive) as a mask `(H, W)`: a model
/// pixel is inside when its centre, mapped back to the original image, is.
pub fn bbox_mask(b: [f64; 4], (iw, ih): (u32, u32), (h, w): (usize, usize)) -> Vec<u8> {
    let mut out = Vec::with_capacity(h * w);
    for y in 0..h {
        let cy = (y as f64 + 0.5) * f64::from(ih) / h as f64;
        for x in 0..w {
            let cx = (x as f64 + 0.5) * f64::from(iw) / w as f64;
            out.push(u8::from(cx >= b[0] && cx < b[2] && cy >= b[1] && cy < b[3]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bbox_mask_scales_to_model_size() {
        // A 4x2 image whose box covers its left half, on a 2x4 model grid.
        let m = bbox_mask([0.0, 0.0, 2.0, 2.0], (4, 2), (2, 4));
        assert_eq!(m, [1, 1, 0, 0, 1, 1, 0, 0]);
    }

    #[test]
    fn mask_png_resized_by_nearest_neighbour() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.png");
        // 2x2 mask: top-right pixel inside (value 7, any nonzero counts).
        image::GrayImage::from_raw(2, 2, vec![0, 7, 0, 0])
            .unwrap()
            .save(&p)
            .unwrap();
        let m = load_mask(&p, (4, 4)).unwrap();
        assert_eq!(m, [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(load_mask(&dir.path().join("none.png"), (4, 4)).is_err());
    }

    #[test]
    fn manifests_and_image_directories() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("a.png"), b"x").unwrap();
        std::fs::write(d.join("notes.txt"), b"x").unwrap();
        let e = read(d).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].image, PathBuf::from("a.png"));
        std::fs::write(
            d.join("manifest.jsonl"),
            "{\"image\": \"a.png\", \"class_id\": 1, \"mask\": \"m.png\"}\n\n",
        )
        .unwrap();
        let e = read(d).unwrap();
        assert_eq!(
            (e[0].class_id, e[0].path.clone()),
            (Some(1), d.join("a.png"))
        );
        assert_eq!(e[0].mask, Some(d.join("m.png")));
        assert_eq!(e[0].background, None);
        std::fs::write(d.join("manifest.jsonl"), "{\"class_id\": 1}\n").unwrap();
        let err = read(d).unwrap_err().to_string();
        assert!(err.contains("line 1: bad manifest entry"), "{err}");
        let empty = tempfile::tempdir().unwrap();
        assert!(read(empty.path()).is_err());
    }

    #[test]
    fn backgrounds_are_read_and_preprocessed_like_their_image() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let img = image::RgbImage::from_fn(8, 6, |x, y| image::Rgb([x as u8 * 30, y as u8, 7]));
        img.save(d.join("a.png")).unwrap();
        image::RgbImage::from_pixel(8, 6, image::Rgb([200, 10, 7]))
            .save(d.join("a.bg.png"))
            .unwrap();
        image::RgbImage::new(4, 6)
            .save(d.join("small.png"))
            .unwrap();
        let lines = [
            r#"{"image": "a.png", "background": "a.bg.png"}"#,
            r#"{"image": "a.png"}"#,
            r#"{"image": "a.png", "background": "small.png"}"#,
        ];
        std::fs::write(d.join("manifest.jsonl"), lines.join("\n")).unwrap();
        let e = read(d).unwrap();
        assert_eq!(e[0].background, Some(d.join("a.bg.png")));
        let spec = crate::model::demo(&candle_core::Device::Cpu)
            .unwrap()
            .spec()
            .clone();
        let bg = e[0].load_background(&spec).unwrap();
        let (h, w) = spec.input_size;
        assert_eq!(bg.len(), 3 * h * w);
        // Constant colour: every pixel (200 - mean) / std after the same resize and normalisation.
        let pre = &spec.preprocess;
        let want = (200.0 / 255.0 - pre.mean[0]) / pre.std[0];
        assert!(bg[..h * w].iter().all(|v| (v - want).abs() < 1e-5));
        let x = e[0].load(&spec).unwrap().x;
        assert_eq!(x.len(), bg.len());
        let err = e[1].load_background(&spec).unwrap_err().to_string();
        assert!(err.contains("a.png has no background"), "{err}");
        let err = e[2].load_background(&spec).unwrap_err().to_string();
        assert!(err.contains("is 4x6 but its image"), "{err}");
        // The background path obeys the same rule as the image's.
        std::fs::write(
            d.join("manifest.jsonl"),
            r#"{"image": "a.png", "background": "../b.png"}"#,
        )
        .unwrap();
        let err = read(d).unwrap_err().to_string();
        assert!(err.contains("background '../b.png' is outside"), "{err}");
        assert!(read_with(d, true).is_ok());
    }

    #[test]
    fn manifest_paths_stay_in_the_manifest_folder_unless_allowed() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("manifest.jsonl");
        for bad in ["../x.png", "/etc/passwd", "a/../../x.png"] {
            std::fs::write(&m, format!("{{\"image\": \"{bad}\"}}\n")).unwrap();
            let e = read(d.path()).unwrap_err().to_string();
            assert!(
                e.contains("outside the manifest's folder") && e.contains("line 1"),
                "{e}"
            );
            assert_eq!(read_with(d.path(), true).unwrap().len(), 1, "{bad}");
        }
        std::fs::write(&m, "{\"image\": \"a/../b/./x.png\"}\n").unwrap();
        assert_eq!(
            read(d.path()).unwrap()[0].path,
            d.path().join("a/../b/./x.png")
        );
    }
}
