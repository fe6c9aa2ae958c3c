//! Expands image arguments (files, directories, glob patterns) into a list of files.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use vitcx::image::{has_image_extension, EXTENSIONS};

/// Files named by `args`, in argument order (directory contents and glob matches sorted).
/// An existing file is taken whatever its extension (decoding decides); a missing path that
/// is not a pattern is kept, so that it is reported with the other per-image failures.
pub fn expand(args: &[String]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for a in args {
        let p = Path::new(a);
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot read directory {a}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && has_image_extension(p))
                .collect();
            if files.is_empty() {
                bail!("directory {a} holds no image ({})", EXTENSIONS.join(", "));
            }
            files.sort();
            out.extend(files);
        } else if !p.exists() && a.contains(['*', '?', '[']) {
            let mut files: Vec<PathBuf> = glob::glob(a)
                .with_context(|| format!("bad glob pattern '{a}'"))?
                .filter_map(|r| r.ok())
                .filter(|p| p.is_file())
                .collect();
            if files.is_empty() {
                bail!("pattern '{a}' matches no file");
            }
            files.sort();
            out.extend(files);
        } else {
            out.push(p.to_path_buf());
        }
    }
    Ok(out)
}

/// Fails when the output folder `out` is, or contains, the folder of an input image: results
/// written there could overwrite an input (`a.jpg`'s overlay is `a.png`) or be read as inputs by
/// the next run.
pub fn refuse_out_holding_inputs(out: &Path, images: &[PathBuf]) -> anyhow::Result<()> {
    // `out` may not exist yet: then no input can be inside it.
    let Ok(out) = out.canonicalize() else {
        return Ok(());
    };
    for img in images {
        let Some(dir) = img
            .canonicalize()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
        else {
            continue;
        };
        if dir.starts_with(&out) {
            anyhow::bail!(
                "--out {} holds the input {}; choose an output folder apart from the images",
                out.display(),
                img.display()
            );
        }
    }
    Ok(())
}
