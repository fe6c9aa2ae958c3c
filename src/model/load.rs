//! Loading: a checkpoint on disk or in memory to a `Box<dyn Backbone>` through the registry of
//! model families ([`super::families`]), the bundled demo model, and the device a model runs on.

use std::path::Path;

use candle_core::Device;

use super::backbone::Backbone;
use super::checkpoint::{self, Checkpoint, Family};
use super::config::Format;
use super::families::FAMILIES;
use crate::error::{Error, Result};

/// Loads a checkpoint from a directory (`config.json` + `model.safetensors` or
/// `pytorch_model.bin` [+ `preprocessor_config.json` for Hugging Face]) or from a weights file
/// with `config.json` beside it. The family is detected from `config.json` before the tensors
/// are read; every size the configuration states is checked against the tensors.
pub fn load(path: &Path, device: &Device) -> Result<Box<dyn Backbone>> {
    load_with(FAMILIES, path, device)
}

/// [`load`], the model built for the input size `(H, W)` instead of the checkpoint's own, its
/// position embedding resampled as timm's `create_model(..., img_size=...)` (or transformers'
/// `interpolate_pos_encoding`) does; `None` is [`load`].
pub fn load_at(
    path: &Path,
    device: &Device,
    input_size: Option<(usize, usize)>,
) -> Result<Box<dyn Backbone>> {
    read_checkpoint(FAMILIES, path, device).and_then(|(family, mut ckpt)| {
        ckpt.input_size = input_size;
        (family.build)(ckpt, device)
    })
}

/// [`load`] with another list of families, asked in order: a program can add a family of its
/// own (`&[my_family, vitcx::model::FAMILIES[0]]`) without changing vitcx.
pub fn load_with(families: &[Family], path: &Path, device: &Device) -> Result<Box<dyn Backbone>> {
    let (family, ckpt) = read_checkpoint(families, path, device)?;
    (family.build)(ckpt, device)
}

/// The family that reads the checkpoint at `path`, and the checkpoint.
fn read_checkpoint<'f>(
    families: &'f [Family],
    path: &Path,
    device: &Device,
) -> Result<(&'f Family, Checkpoint)> {
    let files = checkpoint::locate(path)?;
    let config = checkpoint::read_json(&files.config)?;
    let format = Format::detect(&files.config, &config)?;
    let family = family_for(families, format, &config, &files.config)?;
    let preprocessor = match &files.preprocessor {
        Some(p) if format == Format::HuggingFace => Some((p.clone(), checkpoint::read_json(p)?)),
        _ => None,
    };
    let tensors = checkpoint::read_tensors(&files.weights, device)?;
    let ckpt = Checkpoint {
        format,
        config_path: files.config,
        config,
        preprocessor,
        weights_path: files.weights,
        tensors,
        input_size: None,
    };
    Ok((family, ckpt))
}

/// Loads a timm or Hugging Face checkpoint held in memory: `config.json` text and a
/// `.safetensors` buffer (no preprocessor config). `name` stands for the checkpoint in error
/// messages. This is how the bundled demo model ([`demo`]) is read from the binary itself.
pub fn load_from_memory(
    name: &str,
    config: &[u8],
    safetensors: &[u8],
    device: &Device,
) -> Result<Box<dyn Backbone>> {
    let config_path = Path::new(name).join("config.json");
    let weights_path = Path::new(name).join("model.safetensors");
    let config = checkpoint::parse_json(&config_path, config)?;
    let format = Format::detect(&config_path, &config)?;
    let family = family_for(FAMILIES, format, &config, &config_path)?;
    let tensors = checkpoint::read_tensors_from_buffer(&weights_path, safetensors, device)?;
    let ckpt = Checkpoint::from_parts(&config_path, config, None, &weights_path, tensors)?;
    (family.build)(ckpt, device)
}

/// The first of `families` that reads a checkpoint with this configuration, or an error naming
/// what the configuration says and every family of the list.
pub fn family_for<'f>(
    families: &'f [Family],
    format: Format,
    config: &serde_json::Value,
    config_path: &Path,
) -> Result<&'f Family> {
    if let Some(f) = families.iter().find(|f| (f.claims)(format, config)) {
        return Ok(f);
    }
    let (key, value) = match format {
        Format::Timm => ("architecture", config.get("architecture")),
        Format::HuggingFace => ("model_type", config.get("model_type")),
    };
    let value = value
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string())
        })
        .unwrap_or_default();
    let supported: Vec<String> = families
        .iter()
        .map(|f| format!("{} ({})", f.name, f.covers))
        .collect();
    Err(Error::Unsupported(format!(
        "{key} '{value}' in {} is not a supported model; supported families: {}",
        config_path.display(),
        supported.join("; ")
    )))
}

/// The bundled demo model: a small ViT (patch 16, 224 px, 14x14 tokens) trained by
/// `cargo run --release --example train_demo` on the generated shapes of
/// [`crate::eval::synth`], so that vitcx can be tried, and checked against ground truth, without
/// a download. Its weights are compiled into the library.
pub fn demo(device: &Device) -> Result<Box<dyn Backbone>> {
    load_from_memory(DEMO_NAME, DEMO_CONFIG, DEMO_WEIGHTS, device)
}

/// The demo model's accuracy on its held-out generated images, as its training run measured
/// and recorded it (`vitcx_training.held_out_accuracy` in its `config.json`).
pub fn demo_held_out_accuracy() -> Option<f64> {
    let v: serde_json::Value = serde_json::from_slice(DEMO_CONFIG).ok()?;
    v.get("vitcx_training")?.get("held_out_accuracy")?.as_f64()
}

/// How the demo model is named on the command line and in reports.
pub const DEMO_NAME: &str = "demo";
/// The demo model's files, compiled in once (the sanity check reads them too).
pub(crate) const DEMO_CONFIG: &[u8] = include_bytes!("../../models/demo/config.json");
pub(crate) const DEMO_WEIGHTS: &[u8] = include_bytes!("../../models/demo/model.safetensors");

/// The device named on the command line: `cpu`, or `cuda` / `cuda:N` for GPU `N` (default 0).
///
/// CUDA needs a build with the `cuda` feature (`cargo build --release --features cuda`, which
/// needs the CUDA toolkit); the default build has no CUDA code and says so here.
pub fn device(name: &str) -> Result<Device> {
    let name = name.trim().to_ascii_lowercase();
    let gpu = match name.as_str() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" | "gpu" => Some(0),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok()),
    };
    let Some(ordinal) = gpu else {
        return Err(Error::invalid(format!(
            "unknown device {name:?}; expected cpu, cuda or cuda:N"
        )));
    };
    if !cfg!(feature = "cuda") {
        return Err(Error::Unsupported(format!(
            "device {name:?}: this vitcx was built without CUDA; rebuild with \
             `cargo build --release --features cuda` (needs the CUDA toolkit)"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| {
        let e = crate::error::without_backtrace(e);
        Error::Unsupported(format!("device {name:?}: cannot open CUDA device: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_model_loads_from_the_binary_with_its_labels() {
        let m = demo(&Device::Cpu).unwrap();
        assert_eq!(m.spec().labels, crate::eval::synth::CLASSES.to_vec());
        assert_eq!(m.spec().details["patch"], 16);
        assert_eq!(m.spec().taps[0].grid, (14, 14));
        let x = candle_core::Tensor::zeros((1, 3, 224, 224), candle_core::DType::F32, &Device::Cpu)
            .unwrap();
        let p = m
            .probs(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(p.len(), 6);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }

    #[test]
    fn load_from_memory_reports_bad_buffers() {
        let e = load_from_memory("mem", b"{not json", DEMO_WEIGHTS, &Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("invalid json"), "{e}");
        let e = load_from_memory("mem", DEMO_CONFIG, b"garbage", &Device::Cpu).unwrap_err();
        assert!(matches!(e, Error::Checkpoint { .. }), "{e:?}");
        assert!(e.to_string().contains("mem"), "{e}");
    }

    #[test]
    fn unclaimed_configs_list_the_supported_families() {
        let p = Path::new("x/config.json");
        let cfg = serde_json::json!({"architecture": "resnet50"});
        match family_for(FAMILIES, Format::Timm, &cfg, p) {
            Err(Error::Unsupported(m)) => {
                assert!(m.contains("architecture 'resnet50'"), "{m}");
                assert!(m.contains("supported families: vit ("), "{m}");
            }
            other => panic!("unexpected {other:?}"),
        }
        let cfg = serde_json::json!({"model_type": "deit"});
        assert_eq!(
            family_for(FAMILIES, Format::HuggingFace, &cfg, p)
                .unwrap()
                .name,
            "vit"
        );
    }
}
