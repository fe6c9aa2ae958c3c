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
    /// Each file's key for shards and run records: its path relative to the folder argument
    /// it came from (or to a glob pattern's fixed folder; a file argument: its name), with `/`
    /// between components, made unique with `#2`, `#3` in argument order. It stays the same
    /// wherever the folder is mounted and whatever else is listed.
    pub keys: Vec<String>,
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
            for f in &files {
                out.keys.push(relative_key(f, p));
            }
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
            let base = glob_base(a);
            for f in &files {
                out.keys.push(relative_key(f, &base));
            }
            out.files.extend(files);
        } else {
            out.keys
                .push(relative_key(p, p.parent().unwrap_or(Path::new(""))));
            out.files.push(p.to_path_buf());
        }
    }
    out.keys = unique(std::mem::take(&mut out.keys), "#");
    Ok(out)
}

/// `names` made unique in order: a repeated name gets `{sep}2`, `{sep}3`, ... (`a`, `a-2` for
/// file stems; `a.png`, `a.png#2` for run-record keys).
pub fn unique(names: impl IntoIterator<Item = String>, sep: &str) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    names
        .into_iter()
        .map(|base| {
            let mut name = base.clone();
            let mut k = 2;
            while !seen.insert(name.clone()) {
                name = format!("{base}{sep}{k}");
                k += 1;
            }
            name
        })
        .collect()
}

/// `path` relative to `root`, components joined with `/`.
fn relative_key(path: &Path, root: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    let parts: Vec<String> = rel
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    if parts.is_empty() {
        path.to_string_lossy().into_owned()
    } else {
        parts.join("/")
    }
}

/// The folder part of a glob pattern before its first wildcard component (`data/*/x.png` ->
/// `data`).
fn glob_base(pattern: &str) -> PathBuf {
    let mut base = PathBuf::new();
    for c in Path::new(pattern).components() {
        if c.as_os_str().to_string_lossy().contains(['*', '?', '[']) {
            break;
        }
        base.push(c);
    }
    base
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_relative_to_the_argument_and_unique() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("d/sub")).unwrap();
        for f in ["d/a.png", "d/sub/b.png", "c/a.png"] {
            let p = root.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        }
        let s = |p: &str| root.join(p).to_string_lossy().into_owned();
        let got = expand(&[s("d"), s("c/*.png"), s("d/a.png")], true).unwrap();
        assert_eq!(got.keys, ["a.png", "sub/b.png", "a.png#2", "a.png#3"]);
        assert_eq!(got.files.len(), got.keys.len());
        assert_eq!(glob_base("data/*/x.png"), PathBuf::from("data"));
        let stems = unique(["a", "b", "a", "a"].map(String::from), "-");
        assert_eq!(stems, ["a", "b", "a-2", "a-3"]);
    }
}
