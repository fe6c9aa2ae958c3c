//! Expands image arguments (files, directories, glob patterns) into a list of files.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use vitcx::image::{has_image_extension, EXTENSIONS};

/// What the image arguments name: the files, in argument order (directory contents and glob
/// matches sorted), and one reason for each argument that names none (a pattern matching
/// nothing, a folder without images), reported as that entry's failure while the others run.
#[derive(Debug, Default)]
pub struct Inputs {
    /// The files to read.
    pub files: Vec<PathBuf>,
    /// One line per argument that named no file.
    pub bad: Vec<String>,
}

/// Expands `args` ([`Inputs`]). An existing file is taken whatever its extension (decoding
/// decides); a missing path that is not a pattern is kept, so that it is reported with the other
/// per-image failures. With `recursive`, folders are read with their subfolders.
pub fn expand(args: &[String], recursive: bool) -> Result<Inputs> {
    let mut out = Inputs::default();
    for a in args {
        let p = Path::new(a);
        if p.is_dir() {
            let mut files = Vec::new();
            images_in(p, recursive, &mut files)
                .with_context(|| format!("cannot read directory {a}"))?;
            if files.is_empty() {
                let sub = if recursive {
                    ""
                } else {
                    " (--recursive reads subfolders)"
                };
                out.bad.push(format!(
                    "directory {a} holds no image ({}){sub}",
                    EXTENSIONS.join(", ")
                ));
            }
            files.sort();
            out.files.extend(files);
        } else if !p.exists() && a.contains(['*', '?', '[']) {
            let mut files: Vec<PathBuf> = glob::glob(a)
                .with_context(|| format!("bad glob pattern '{a}'"))?
                .filter_map(|r| r.ok())
                .filter(|p| p.is_file())
                .collect();
            if files.is_empty() {
                out.bad.push(format!("pattern '{a}' matches no file"));
            }
            files.sort();
            out.files.extend(files);
        } else {
            out.files.push(p.to_path_buf());
        }
    }
    Ok(out)
}

/// The image files in `dir` (and its subfolders when `recursive`; symbolic links to folders are
/// not followed, so a cycle cannot loop).
fn images_in(dir: &Path, recursive: bool, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let path = e.path();
        let kind = e.file_type()?;
        if kind.is_dir() && recursive {
            images_in(&path, true, out)?;
        } else if path.is_file() && has_image_extension(&path) {
            out.push(path);
        }
    }
    Ok(())
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
