//! A checkpoint's tensors under one family's own names, handed out one at a time with shape
//! checks, so that a missing, misshapen or unused tensor is an error that names it as the
//! checkpoint spells it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::error::{Error, Result};

/// The tensors of a checkpoint, named as the family names them (timm's names for the ViT).
pub struct Weights {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
    /// The checkpoint's own name for a family name, for error messages.
    source_name: Box<dyn Fn(&str) -> String>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        f.debug_struct("Weights")
            .field("path", &self.path)
            .field("tensors", &names)
            .finish()
    }
}

impl Weights {
    /// `tensors` (read from `path`, already renamed to the family's names); `source_name` maps a
    /// family name back to the checkpoint's own spelling for errors.
    pub fn new(
        path: &Path,
        tensors: HashMap<String, Tensor>,
        source_name: impl Fn(&str) -> String + 'static,
    ) -> Self {
        Weights {
            path: path.to_path_buf(),
            tensors,
            source_name: Box::new(source_name),
        }
    }

    /// The weights file, for error messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether tensor `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The shape of tensor `name`, or a "missing tensor" error naming it as the checkpoint does.
    pub fn dims(&self, name: &str) -> Result<&[usize]> {
        match self.tensors.get(name) {
            Some(t) => Ok(t.dims()),
            None => Err(self.missing(name)),
        }
    }

    /// The checkpoint's own name for `name`.
    pub fn source_name(&self, name: &str) -> String {
        (self.source_name)(name)
    }

    /// A checkpoint error about this file.
    pub fn err(&self, reason: String) -> Error {
        Error::Checkpoint {
            path: self.path.clone(),
            reason,
        }
    }

    /// Number of numbered layers `{prefix}N.` (e.g. `blocks.`); they must run `0..N` without gap
    /// (`probe`, a tensor of each layer, names the layer in the error).
    pub fn layer_count(&self, prefix: &str, probe: &str) -> Result<usize> {
        let mut seen: Vec<usize> = self
            .tensors
            .keys()
            .filter_map(|k| k.strip_prefix(prefix)?.split_once('.')?.0.parse().ok())
            .collect();
        seen.sort_unstable();
        seen.dedup();
        for (i, &n) in seen.iter().enumerate() {
            if n != i {
                return Err(self.err(format!(
                    "block {i} is missing ({} tensors found but none for block {i})",
                    self.source_name(&format!("{prefix}{n}.{probe}"))
                )));
            }
        }
        Ok(seen.len())
    }

    /// Removes tensor `name` and checks it has shape `shape`.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| self.missing(name))?;
        if t.dims() != shape {
            return Err(self.err(format!(
                "tensor '{}' has shape {:?}, expected {:?}",
                self.source_name(name),
                t.dims(),
                shape
            )));
        }
        Ok(t)
    }

    /// Checks that every tensor was used: a leftover means an architecture feature the model
    /// would silently ignore. `model` says what the family built ("a plain ViT/DeiT") and
    /// `variants` which variants it does not support.
    pub fn finish(self, model: &str, variants: &str) -> Result<()> {
        if self.tensors.is_empty() {
            return Ok(());
        }
        let mut left: Vec<String> = self.tensors.keys().map(|k| self.source_name(k)).collect();
        left.sort();
        let n = left.len();
        left.truncate(5);
        Err(Error::Unsupported(format!(
            "{} holds {n} tensor(s) {model} does not use: {}{} ({variants})",
            self.path.display(),
            left.join(", "),
            if n > 5 { ", ..." } else { "" }
        )))
    }

    fn missing(&self, name: &str) -> Error {
        self.err(format!("missing tensor '{}'", self.source_name(name)))
    }
}

/// The patch grid of an input size, which must be a positive multiple of the patch.
pub(crate) fn grid_of(w: &Weights, size: (usize, usize), patch: usize) -> Result<(usize, usize)> {
    let (h, wd) = size;
    if h % patch != 0 || wd % patch != 0 || h == 0 || wd == 0 {
        return Err(w.err(format!(
            "input size {h}x{wd} is not a positive multiple of the patch size {patch}"
        )));
    }
    Ok((h / patch, wd / patch))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn weights(names: &[&str]) -> Weights {
        let t: HashMap<String, Tensor> = names
            .iter()
            .map(|n| {
                let z = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
                (n.to_string(), z)
            })
            .collect();
        Weights::new(Path::new("m.safetensors"), t, |n| format!("src.{n}"))
    }

    #[test]
    fn block_gap_is_an_error() {
        let w = weights(&["blocks.0.norm1.weight", "blocks.2.norm1.weight"]);
        match w.layer_count("blocks.", "norm1.weight") {
            Err(Error::Checkpoint { reason, .. }) => {
                assert!(reason.contains("block 1"), "{reason}");
                assert!(reason.contains("src.blocks.2.norm1.weight"), "{reason}")
            }
            other => panic!("unexpected {other:?}"),
        }
        let w = weights(&["blocks.0.a", "blocks.1.a", "blocks.1.b", "head"]);
        assert_eq!(w.layer_count("blocks.", "a").unwrap(), 2);
    }

    #[test]
    fn take_checks_shapes_and_finish_lists_leftovers() {
        let mut w = weights(&["a", "b", "c"]);
        assert!(w.take("a", &[2]).is_ok());
        let e = w.take("b", &[3]).unwrap_err().to_string();
        assert!(
            e.contains("tensor 'src.b' has shape [2], expected [3]"),
            "{e}"
        );
        let e = w.take("zz", &[2]).unwrap_err().to_string();
        assert!(e.contains("missing tensor 'src.zz'"), "{e}");
        match w.finish("a toy", "no extras") {
            Err(Error::Unsupported(m)) => {
                assert!(
                    m.contains("1 tensor(s) a toy does not use: src.c (no extras)"),
                    "{m}"
                )
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
