//! Checkpoints on disk or in memory, and the seam a model family plugs into: a [`Family`]
//! recognises the checkpoints it reads from their `config.json` and builds a [`Backbone`] from
//! a [`Checkpoint`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::backbone::Backbone;
use super::config::Format;
use super::weights::Weights;
use crate::error::{Error, Result};

/// A model family: one entry of the registry ([`super::families::FAMILIES`]).
#[derive(Debug, Clone, Copy)]
pub struct Family {
    /// Short name (`vit`).
    pub name: &'static str,
    /// What it reads, for the list of supported families in errors.
    pub covers: &'static str,
    /// Whether this family reads a checkpoint with this `config.json`. Decided from the
    /// configuration alone, before any tensor is read.
    pub claims: fn(Format, &Value) -> bool,
    /// Builds the model; every size stated in the configuration is checked against the tensors.
    pub build: fn(Checkpoint, &Device) -> Result<Box<dyn Backbone>>,
}

/// Everything a family needs to build a model: the configuration as read, and the tensors
/// under the checkpoint's own names (as f32 on the target device).
#[derive(Debug)]
pub struct Checkpoint {
    /// timm or Hugging Face.
    pub format: Format,
    /// `config.json`, for error messages.
    pub config_path: PathBuf,
    /// `config.json`, parsed; a family reads it into its own typed struct ([`Checkpoint::parse`]).
    pub config: Value,
    /// Hugging Face `preprocessor_config.json`, when present.
    pub preprocessor: Option<(PathBuf, Value)>,
    /// The weights file, for error messages.
    pub weights_path: PathBuf,
    /// Every tensor of the weights file.
    pub tensors: HashMap<String, Tensor>,
    /// An input size `(H, W)` the caller asks for instead of the checkpoint's own
    /// ([`super::load::load_at`], `--input-size`): a family that can resample its position
    /// embedding honours it, as timm's `create_model(..., img_size=...)` does; others refuse it.
    pub input_size: Option<(usize, usize)>,
}

impl Checkpoint {
    /// A checkpoint from parts already in memory (a model built in code, or trained); the paths
    /// only name the sources in error messages.
    pub fn from_parts(
        config_path: &Path,
        config: Value,
        preprocessor: Option<(PathBuf, Value)>,
        weights_path: &Path,
        tensors: HashMap<String, Tensor>,
    ) -> Result<Self> {
        Ok(Checkpoint {
            format: Format::detect(config_path, &config)?,
            config_path: config_path.to_path_buf(),
            config,
            preprocessor,
            weights_path: weights_path.to_path_buf(),
            tensors,
            input_size: None,
        })
    }

    /// `config.json` as a `T` (a family's own typed configuration).
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        super::config::parse(&self.config_path, &self.config)
    }

    /// `preprocessor_config.json` as a `T`, when there is one.
    pub fn parse_preprocessor<T: DeserializeOwned>(&self) -> Result<Option<T>> {
        self.preprocessor
            .as_ref()
            .map(|(p, v)| super::config::parse(p, v))
            .transpose()
    }

    /// A checkpoint error about `config.json`.
    pub fn config_err(&self, reason: String) -> Error {
        Error::Checkpoint {
            path: self.config_path.clone(),
            reason,
        }
    }
}

/// The files that make up one checkpoint.
#[derive(Debug, Clone)]
pub(crate) struct CheckpointFiles {
    /// `config.json` (timm or Hugging Face).
    pub config: PathBuf,
    /// `model.safetensors` or `pytorch_model.bin`.
    pub weights: PathBuf,
    /// Hugging Face `preprocessor_config.json`, when present.
    pub preprocessor: Option<PathBuf>,
}

/// Finds config and weights for a checkpoint directory, or for a weights file with `config.json`
/// beside it.
pub(crate) fn locate(path: &Path) -> Result<CheckpointFiles> {
    let ckpt_err = |reason: String| Error::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let (dir, weights) = if path.is_dir() {
        let candidates = ["model.safetensors", "pytorch_model.bin"];
        let found = candidates
            .iter()
            .map(|f| path.join(f))
            .find(|p| p.is_file());
        match found {
            Some(w) => (path.to_path_buf(), w),
            None if path.join("model.safetensors.index.json").is_file() => {
                return Err(Error::Unsupported(format!(
                    "sharded checkpoint in {} (model.safetensors.index.json); merge the shards into one model.safetensors",
                    path.display()
                )))
            }
            None => {
                return Err(ckpt_err(
                    "no model.safetensors or pytorch_model.bin in the directory".into(),
                ))
            }
        }
    } else if path.is_file() {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        (dir, path.to_path_buf())
    } else {
        return Err(ckpt_err("no such file or directory".into()));
    };
    let config = dir.join("config.json");
    if !config.is_file() {
        return Err(Error::Checkpoint {
            path: dir,
            reason: "missing config.json (needed beside the weights to know the architecture)"
                .into(),
        });
    }
    let preprocessor = Some(dir.join("preprocessor_config.json")).filter(|p| p.is_file());
    Ok(CheckpointFiles {
        config,
        weights,
        preprocessor,
    })
}

/// Reads a JSON file.
pub(crate) fn read_json(path: &Path) -> Result<Value> {
    // Configuration files are small; a FIFO or a huge file is refused before it is read.
    let text = crate::io::read_bounded(path, 64 << 20)?;
    parse_json(path, &text)
}

/// Parses JSON read from `path` (a file, or the name of an in-memory buffer).
pub(crate) fn parse_json(path: &Path, bytes: &[u8]) -> Result<Value> {
    serde_json::from_slice(bytes).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        reason: format!("invalid json: {e}"),
    })
}

/// Keys under which training checkpoints nest their weights in a PyTorch pickle.
const NESTED_STATE_KEYS: [&str; 2] = ["state_dict", "model"];

/// Reads every tensor of a `.safetensors` or PyTorch pickle (`.bin`, `.pth`, `.pt`) file as f32
/// on `device`.
pub(crate) fn read_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let ckpt_err = |e: candle_core::Error| Error::Checkpoint {
        path: path.to_path_buf(),
        reason: crate::error::without_backtrace(e).to_string(),
    };
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let raw: Vec<(String, Tensor)> = match ext.as_str() {
        "safetensors" => {
            // Mapped, not read: each tensor is copied once, from the page cache into its own
            // buffer (reading the file first cost a second copy, and fresh pages are slow to
            // fault in on virtual machines: ViT-B/16's 346 MB took 2.8 s to load, mostly
            // the kernel zeroing pages).
            // SAFETY: the mapping lives only while the tensors are copied out of it; a file
            // truncated meanwhile by another process is the usual caveat of mapped files.
            let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
                .map_err(ckpt_err)?;
            st.tensors()
                .into_iter()
                .map(|(name, _)| st.load(&name, device).map(|t| (name, t)))
                .collect::<candle_core::Result<_>>()
                .map_err(ckpt_err)?
        }
        "bin" | "pth" | "pt" => {
            // Training checkpoints nest the weights under a key, tried when the top level
            // holds no tensors.
            super::pickle::read_state_dict(path, &NESTED_STATE_KEYS)
                .map_err(|reason| Error::Checkpoint {
                    path: path.to_path_buf(),
                    reason,
                })?
                .into_iter()
                .map(|(k, t)| Ok((k, t.to_device(device)?)))
                .collect::<candle_core::Result<_>>()
                .map_err(ckpt_err)?
        }
        _ => {
            return Err(Error::Unsupported(format!(
                "weights file {} (expected .safetensors, .bin, .pth or .pt)",
                path.display()
            )))
        }
    };
    to_f32(path, raw)
}

/// Reads every tensor of a `.safetensors` buffer as f32 on `device`; `path` names it in errors.
pub(crate) fn read_tensors_from_buffer(
    path: &Path,
    buffer: &[u8],
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let raw =
        candle_core::safetensors::load_buffer(buffer, device).map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            reason: crate::error::without_backtrace(e).to_string(),
        })?;
    to_f32(path, raw)
}

fn to_f32(
    path: &Path,
    raw: impl IntoIterator<Item = (String, Tensor)>,
) -> Result<HashMap<String, Tensor>> {
    let out: HashMap<String, Tensor> = raw
        .into_iter()
        // Integer buffers that are not weights (Hugging Face's saved `position_ids`, BatchNorm
        // counters, BEiT's `relative_position_index`, which transformers 4.x and older timm saved
        // and which the model recomputes) are dropped; any other integer tensor is refused below.
        .filter(|(k, t)| {
            !(t.dtype().is_int()
                && (k.ends_with("position_ids")
                    || k.ends_with("num_batches_tracked")
                    || k.ends_with("relative_position_index")))
        })
        .map(|(k, t)| {
            let err = |reason: String| Error::Checkpoint {
                path: path.to_path_buf(),
                reason: format!("tensor '{k}': {reason}"),
            };
            if t.dtype().is_int() {
                return Err(err(format!(
                    "holds integers ({:?}); weights must be floating point",
                    t.dtype()
                )));
            }
            let t = t
                .to_dtype(DType::F32)
                .map_err(|e| err(crate::error::without_backtrace(e).to_string()))?;
            let finite =
                all_finite(&t).map_err(|e| err(crate::error::without_backtrace(e).to_string()))?;
            if !finite {
                return Err(err("holds NaN or infinite values".into()));
            }
            Ok((k, t))
        })
        .collect::<Result<_>>()?;
    if out.is_empty() {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            reason: "no tensors found".into(),
        });
    }
    Ok(out)
}

/// Whether every value of an f32 tensor is finite: read in place on the CPU (no temporary as
/// large as the weight), else `0 * x`, which is NaN exactly where x is NaN or infinite, summed.
fn all_finite(t: &Tensor) -> candle_core::Result<bool> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(v[a..b].iter().all(|x| x.is_finite()));
        }
    }
    let sum = t.affine(0.0, 0.0)?.sum_all()?.to_scalar::<f32>()?;
    Ok(sum.is_finite())
}

/// Fails unless the config's `field` (when present) equals the tensors' `actual`; `what`
/// describes the tensors' value, `{}` standing for it (e.g. `"{} blocks"`).
pub(crate) fn check(
    ckpt: &Checkpoint,
    field: &str,
    stated: Option<usize>,
    actual: usize,
    what: &str,
) -> Result<()> {
    match stated {
        Some(s) if s != actual => Err(ckpt.config_err(format!(
            "config.json {field} is {s} but the weights have {}",
            what.replace("{}", &actual.to_string())
        ))),
        _ => Ok(()),
    }
}

/// Fails unless the config's boolean `field` (when present) agrees with whether the weights
/// hold `tensor`.
pub(crate) fn check_flag(
    ckpt: &Checkpoint,
    w: &Weights,
    field: &str,
    stated: Option<bool>,
    actual: bool,
    tensor: &str,
) -> Result<()> {
    match stated {
        Some(s) if s != actual => Err(ckpt.config_err(format!(
            "config.json {field} is {s} but the weights {} '{}'",
            if actual { "hold" } else { "lack" },
            w.source_name(tensor)
        ))),
        _ => Ok(()),
    }
}
