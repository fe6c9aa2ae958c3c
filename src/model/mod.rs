//! Models and the seam between models and explanation methods.
//!
//! Explanation methods see a model only through [`Backbone`]: one forward pass that returns the
//! logits and, when asked, the patch tokens of one layer already reshaped to a grid. The model
//! states its own number of prefix tokens (\[CLS\], \[DIST\], registers) and its token grid, so no
//! user ever writes a "reshape function" (the reference's top source of mistakes).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::error::Result;

pub mod config;
pub mod hub;
pub(crate) mod kernels;
pub mod vit;
pub mod weights;

pub use config::{Family, Format, ModelConfig, Preprocess};
pub use vit::VisionTransformer;

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
        return Err(crate::Error::invalid(format!(
            "unknown device {name:?}; expected cpu, cuda or cuda:N"
        )));
    };
    if !cfg!(feature = "cuda") {
        return Err(crate::Error::Unsupported(format!(
            "device {name:?}: this vitcx was built without CUDA; rebuild with \
             `cargo build --release --features cuda` (needs the CUDA toolkit)"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| {
        let e = crate::error::without_backtrace(e);
        crate::Error::Unsupported(format!("device {name:?}: cannot open CUDA device: {e}"))
    })
}

/// Loads a checkpoint from a directory (`config.json` + `model.safetensors` or
/// `pytorch_model.bin` [+ `preprocessor_config.json` for Hugging Face]) or from a weights file
/// with `config.json` beside it. timm and Hugging Face ViT / DeiT / DeiT-distilled are detected
/// from `config.json`; every size it states is checked against the tensors.
pub fn load(path: &Path, device: &Device) -> Result<VisionTransformer> {
    let files = weights::locate(path)?;
    let cfg_json = config::read_json(&files.config)?;
    let format = config::detect_format(&files.config, &cfg_json)?;
    let pre_json = match &files.preprocessor {
        Some(p) if format == Format::HuggingFace => Some((p.as_path(), config::read_json(p)?)),
        _ => None,
    };
    let raw = weights::read_tensors(&files.weights, device)?;
    from_parts(
        &files.config,
        &cfg_json,
        pre_json.as_ref().map(|(p, v)| (*p, v)),
        &files.weights,
        raw,
        device,
    )
}

/// What every loader shares once the files are read: `config.json` (+ Hugging Face
/// preprocessor config) and the raw tensors, named as the checkpoint names them, become a
/// checked model. The paths only name the sources in error messages.
pub(crate) fn from_parts(
    config_path: &Path,
    cfg_json: &serde_json::Value,
    preprocessor: Option<(&Path, &serde_json::Value)>,
    weights_path: &Path,
    raw: HashMap<String, Tensor>,
    device: &Device,
) -> Result<VisionTransformer> {
    let format = config::detect_format(config_path, cfg_json)?;
    let w = weights::Weights::new(weights_path, format, raw)?;
    let cfg = config::build(format, config_path, cfg_json, preprocessor, &w)?;
    VisionTransformer::new(cfg, w, device)
}

/// Loads a timm or Hugging Face checkpoint held in memory: `config.json` text and a
/// `.safetensors` buffer (no preprocessor config). `name` stands for the checkpoint in error
/// messages. This is how the bundled demo model ([`demo`]) is read from the binary itself.
pub fn load_from_memory(
    name: &str,
    config: &[u8],
    safetensors: &[u8],
    device: &Device,
) -> Result<VisionTransformer> {
    let config_path = Path::new(name).join("config.json");
    let weights_path = Path::new(name).join("model.safetensors");
    let cfg_json = config::parse_json(&config_path, config)?;
    let raw = weights::read_tensors_from_buffer(&weights_path, safetensors, device)?;
    from_parts(&config_path, &cfg_json, None, &weights_path, raw, device)
}

/// The bundled demo model: a small ViT (patch 16, 224 px, 14x14 tokens) trained by
/// `cargo run --release --example train_demo -- --seed 0` on the generated shapes of
/// [`crate::eval::synth`], so that vitcx can be tried, and checked against ground truth, without a
/// download. Its weights are compiled into the library.
pub fn demo(device: &Device) -> Result<VisionTransformer> {
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
const DEMO_CONFIG: &[u8] = include_bytes!("../../models/demo/config.json");
const DEMO_WEIGHTS: &[u8] = include_bytes!("../../models/demo/model.safetensors");

/// Shape facts about a model that explanation methods rely on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Spec {
    /// Model family, as detected from the checkpoint.
    pub family: Family,
    /// Number of transformer blocks.
    pub depth: usize,
    /// Token width (embedding dimension).
    pub dim: usize,
    /// Attention heads per block.
    pub heads: usize,
    /// Patch side in pixels.
    pub patch: usize,
    /// Input resolution `(H, W)` the model was built for.
    pub input_size: (usize, usize),
    /// Token grid `(gh, gw)` = input size / patch.
    pub grid: (usize, usize),
    /// Tokens before the patch tokens: 1 for ViT (\[CLS\]), 2 for DeiT-distilled (\[CLS\], \[DIST\]).
    pub num_prefix_tokens: usize,
    /// Number of output classes.
    pub num_classes: usize,
}

/// The arithmetic of a forward pass.
///
/// `Bf16` rounds the inputs and weights of the transformer blocks' linear layers to bf16 and
/// accumulates in f32 (see the `bf16` module); everything else stays f32. ViT-CX uses it for
/// its perturbed passes, where it trades a small, measured loss of fidelity for speed on CPUs
/// with AVX512-BF16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout, as the reference runs.
    #[default]
    F32,
    /// bf16 products with f32 accumulation in the linear layers.
    Bf16,
}

impl Precision {
    /// The name used on the command line and in output files.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// Parses `f32` or `bf16`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            other => Err(crate::Error::invalid(format!(
                "unknown precision {other:?}; expected f32 or bf16"
            ))),
        }
    }

    /// Which bf16 kernel this CPU runs (`vitcx bench` reports it).
    pub fn bf16_kernel() -> &'static str {
        kernels::bf16::Kernel::detect().name()
    }

    /// Whether this CPU has a bf16 dot product (AVX512-BF16), the only case where `Bf16` is
    /// faster than `F32` on the CPU.
    pub fn bf16_is_native() -> bool {
        kernels::bf16::Kernel::detect() == kernels::bf16::Kernel::Avx512Bf16
    }
}

/// Where in the network to read tokens from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tap {
    /// Output of the first LayerNorm (`norm1` / `layernorm_before`) of block `layer` (0-based):
    /// the reference's default target layer (`model.blocks[-1].norm1`).
    Norm1(usize),
    /// Output of block `layer` (the residual stream after the block).
    Block(usize),
}

impl Tap {
    /// The 0-based block this tap reads from.
    pub fn layer(self) -> usize {
        match self {
            Tap::Norm1(l) | Tap::Block(l) => l,
        }
    }
}

/// What one forward pass returns.
#[derive(Debug, Clone)]
pub struct Forward {
    /// Logits `(B, C)`.
    pub logits: Tensor,
    /// Patch tokens at the requested tap, prefix tokens dropped, as feature maps `(B, D, gh, gw)`.
    pub features: Option<Tensor>,
}

/// The one interface explanation methods use to talk to a model.
pub trait Backbone {
    /// Shape facts: depth, width, patch, grid, prefix tokens, classes.
    fn spec(&self) -> &Spec;

    /// The device the model's weights live on (inputs must be moved there).
    fn device(&self) -> &Device;

    /// Runs the model on normalised pixels `(B, 3, H, W)`; returns logits and, if `tap` is
    /// given, that layer's patch tokens as feature maps, all from the same single pass.
    fn forward(&self, px: &Tensor, tap: Option<Tap>) -> Result<Forward>;

    /// Softmax probabilities `(B, C)` for normalised pixels `(B, 3, H, W)`.
    fn probs(&self, px: &Tensor) -> Result<Tensor> {
        let out = self.forward(px, None)?;
        Ok(candle_nn::ops::softmax_last_dim(&out.logits)?)
    }

    /// Softmax probabilities `(B, C)` computed at `precision`. Models without a bf16 path answer
    /// `Bf16` with [`crate::Error::Unsupported`].
    fn probs_at(&self, px: &Tensor, precision: Precision) -> Result<Tensor> {
        match precision {
            Precision::F32 => self.probs(px),
            Precision::Bf16 => Err(crate::Error::Unsupported(
                "this model has no bf16 forward pass".into(),
            )),
        }
    }

    /// The attention probabilities of every block, for methods that read attention (Attention
    /// Rollout). Models without attention say so with [`crate::Error::Unsupported`].
    fn attention(&self, px: &Tensor) -> Result<Attention> {
        let _ = px;
        Err(crate::Error::Unsupported(
            "this model does not expose its attention".into(),
        ))
    }

    /// The gradient of one class logit per image with respect to the tokens at `tap`, for
    /// gradient methods (Grad-CAM). `classes` gives the class of each image; `None` takes each
    /// image's top-1 class from the same pass. Models without a backward pass say so with
    /// [`crate::Error::Unsupported`].
    fn tap_gradient(
        &self,
        px: &Tensor,
        tap: Tap,
        classes: Option<&[usize]>,
    ) -> Result<TapGradient> {
        let _ = (px, tap, classes);
        Err(crate::Error::Unsupported(
            "this model has no backward pass".into(),
        ))
    }
}

/// What [`Backbone::attention`] returns.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Logits `(B, C)` of the same pass.
    pub logits: Tensor,
    /// Attention probabilities `(B, heads, T, T)` of each block in order, prefix tokens included
    /// (rows: queries, columns: keys; each row sums to 1).
    pub maps: Vec<Tensor>,
}

/// What [`Backbone::tap_gradient`] returns.
#[derive(Debug, Clone)]
pub struct TapGradient {
    /// Logits `(B, C)` of the pass.
    pub logits: Tensor,
    /// The class whose logit was differentiated, per image.
    pub classes: Vec<usize>,
    /// The tap's patch tokens as feature maps `(B, D, gh, gw)`, prefix dropped.
    pub features: Tensor,
    /// `d logit[b, classes[b]] / d features[b]`, `(B, D, gh, gw)`.
    pub gradients: Tensor,
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use candle_core::{Device, Tensor};

    use super::*;
    use crate::error::Error;
    use crate::io::npy::read_npy;

    #[test]
    fn demo_model_loads_from_the_binary_with_its_labels() {
        let m = demo(&Device::Cpu).unwrap();
        assert_eq!(m.config().labels, crate::eval::synth::CLASSES.to_vec());
        assert_eq!((m.spec().patch, m.spec().grid), (16, (14, 14)));
        let x = Tensor::zeros((1, 3, 224, 224), candle_core::DType::F32, &Device::Cpu).unwrap();
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

    const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");

    fn case(name: &str) -> PathBuf {
        Path::new(DATA).join(name)
    }

    fn manifest(name: &str) -> serde_json::Value {
        let text = std::fs::read_to_string(case(name).join("manifest.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn input(name: &str) -> Tensor {
        let a = read_npy(case(name).join("input.npy")).unwrap();
        assert_eq!(a.shape, vec![3, 224, 224]);
        Tensor::from_vec(a.to_f32(), (1, 3, 224, 224), &Device::Cpu).unwrap()
    }

    /// Logits of `model` for `x`, flattened.
    fn logits(model: &VisionTransformer, x: &Tensor) -> Vec<f32> {
        let out = model.forward(x, None).unwrap();
        out.logits.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Golden check: probs and last-block norm1 feature maps against the PyTorch reference.
    fn golden(name: &str) -> (f32, f32) {
        let model = load(&case(name), &Device::Cpu).unwrap();
        let m = manifest(name);
        let spec = model.spec().clone();
        assert_eq!(
            spec.num_prefix_tokens as u64,
            m["num_tokens_skipped"].as_u64().unwrap()
        );
        let out = model
            .forward(&input(name), Some(Tap::Norm1(spec.depth - 1)))
            .unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&out.logits).unwrap();
        let probs: Vec<f32> = probs.flatten_all().unwrap().to_vec1().unwrap();
        let want = read_npy(case(name).join("probs.npy")).unwrap().to_f32();
        let dp = max_abs_diff(&probs, &want);
        let top = (0..probs.len())
            .max_by(|&i, &j| probs[i].total_cmp(&probs[j]))
            .unwrap();
        assert_eq!(top as u64, m["target"].as_u64().unwrap());
        let feats = out.features.unwrap();
        assert_eq!(feats.dims(), &[1, spec.dim, 14, 14]);
        let feats: Vec<f32> = feats.flatten_all().unwrap().to_vec1().unwrap();
        let fm = read_npy(case(name).join("feature_map.npy")).unwrap();
        assert_eq!(fm.shape, vec![spec.dim, 14, 14]);
        let df = max_abs_diff(&feats, &fm.to_f32());
        eprintln!("{name}: max |probs diff| = {dp:e}, max |feature_map diff| = {df:e}");
        assert!(dp < 1e-5, "{name}: probs differ by {dp}");
        assert!(df < 1e-5, "{name}: feature maps differ by {df}");
        (dp, df)
    }

    #[test]
    fn golden_vit_timm() {
        golden("vit_timm");
    }

    #[test]
    fn golden_deit_distilled_timm() {
        golden("deit_distilled_timm");
    }

    #[test]
    fn golden_vit_hf() {
        golden("vit_hf");
    }

    #[test]
    fn spec_per_case() {
        for (name, family, format, prefix, depth, mean0) in [
            ("vit_timm", Family::Vit, Format::Timm, 1, 4, 0.5),
            (
                "deit_distilled_timm",
                Family::DeitDistilled,
                Format::Timm,
                2,
                3,
                0.485,
            ),
            ("vit_hf", Family::Vit, Format::HuggingFace, 1, 4, 0.5),
        ] {
            let model = load(&case(name), &Device::Cpu).unwrap();
            let s = model.spec();
            assert_eq!(s.family, family, "{name}");
            assert_eq!(s.num_prefix_tokens, prefix, "{name}");
            assert_eq!(s.grid, (14, 14), "{name}");
            assert_eq!(s.depth, depth, "{name}");
            assert_eq!(s.heads, 3, "{name}");
            assert_eq!(s.dim, 192, "{name}");
            assert_eq!(s.patch, 16, "{name}");
            assert_eq!(s.num_classes, 10, "{name}");
            let c = model.config();
            assert_eq!(c.format, format, "{name}");
            assert_eq!(c.labels.len(), 10);
            assert_eq!(c.labels[3], "class_003");
            assert_eq!(c.preprocess.mean[0], mean0);
            assert_eq!(c.preprocess.input_size, (224, 224));
        }
        let hf = load(&case("vit_hf"), &Device::Cpu).unwrap();
        assert_eq!(hf.config().layer_norm_eps, 1e-12);
        assert_eq!(hf.config().architecture, "ViTForImageClassification");
        let timm = load(&case("vit_timm"), &Device::Cpu).unwrap();
        assert_eq!(timm.config().layer_norm_eps, 1e-6);
        assert!(timm.config().notes.is_empty(), "{:?}", timm.config().notes);
    }

    #[test]
    fn deit_heads_from_architecture_name_with_note() {
        // The deit case's model_args has no embed_dim / num_heads.
        let model = load(&case("deit_distilled_timm"), &Device::Cpu).unwrap();
        assert_eq!(model.config().heads, 3);
        assert!(model
            .config()
            .notes
            .iter()
            .any(|n| n.contains("num_heads not in config.json; using 3")));
    }

    #[test]
    fn weights_file_path_loads_too() {
        let model = load(&case("vit_hf").join("model.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(model.spec().depth, 4);
    }

    #[test]
    fn batch_matches_single() {
        for name in ["vit_timm", "deit_distilled_timm", "vit_hf"] {
            let model = load(&case(name), &Device::Cpu).unwrap();
            let x = input(name);
            let one = model.forward(&x, Some(Tap::Block(1))).unwrap();
            let two = model
                .forward(&Tensor::cat(&[&x, &x], 0).unwrap(), Some(Tap::Block(1)))
                .unwrap();
            assert_eq!(two.logits.dims(), &[2, 10]);
            let a: Vec<f32> = one.logits.flatten_all().unwrap().to_vec1().unwrap();
            for i in 0..2 {
                let b: Vec<f32> = two.logits.get(i).unwrap().to_vec1().unwrap();
                assert!(max_abs_diff(&a, &b) < 1e-5, "{name}");
                let fa: Vec<f32> = one
                    .features
                    .as_ref()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let fb: Vec<f32> = two
                    .features
                    .as_ref()
                    .unwrap()
                    .get(i)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert!(max_abs_diff(&fa, &fb) < 1e-5, "{name}");
            }
        }
    }

    #[test]
    fn tap_none_and_block_taps() {
        let model = load(&case("vit_timm"), &Device::Cpu).unwrap();
        let x = input("vit_timm");
        let none = model.forward(&x, None).unwrap();
        assert!(none.features.is_none());
        let b = model.forward(&x, Some(Tap::Block(3))).unwrap();
        let n = model.forward(&x, Some(Tap::Norm1(3))).unwrap();
        let fb = b.features.unwrap();
        assert_eq!(fb.dims(), &[1, 192, 14, 14]);
        // The block output is not the norm1 output.
        let d: f32 = (fb - n.features.unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d > 1e-3);
        let l0: Vec<f32> = none.logits.flatten_all().unwrap().to_vec1().unwrap();
        let l1: Vec<f32> = b.logits.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(l0, l1);
    }

    #[test]
    fn layer_out_of_range_and_wrong_input() {
        let model = load(&case("vit_timm"), &Device::Cpu).unwrap();
        let x = input("vit_timm");
        match model.forward(&x, Some(Tap::Norm1(4))) {
            Err(Error::InvalidArgument(m)) => {
                assert_eq!(m, "layer 4 out of range; model has 4 blocks")
            }
            other => panic!("unexpected {other:?}"),
        }
        let small = Tensor::zeros((1, 3, 96, 224), candle_core::DType::F32, &Device::Cpu).unwrap();
        match model.forward(&small, None) {
            Err(Error::InvalidArgument(m)) => {
                assert!(m.contains("[1, 3, 96, 224]") && m.contains("224"), "{m}")
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Copies a case into a tempdir so it can be broken.
    fn copy_case(name: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "config.json",
            "model.safetensors",
            "preprocessor_config.json",
        ] {
            let src = case(name).join(f);
            if src.is_file() {
                std::fs::copy(&src, dir.path().join(f)).unwrap();
            }
        }
        dir
    }

    fn edit_tensors(dir: &Path, f: impl FnOnce(&mut std::collections::HashMap<String, Tensor>)) {
        let p = dir.join("model.safetensors");
        let mut t = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
        f(&mut t);
        candle_core::safetensors::save(&t, &p).unwrap();
    }

    fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
        let p = dir.join("config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    }

    fn checkpoint_reason(r: Result<VisionTransformer>) -> String {
        match r {
            Err(Error::Checkpoint { reason, .. }) => reason,
            other => panic!("expected a checkpoint error, got {other:?}"),
        }
    }

    #[test]
    fn missing_config_json() {
        let dir = copy_case("vit_timm");
        std::fs::remove_file(dir.path().join("config.json")).unwrap();
        let r = checkpoint_reason(load(dir.path(), &Device::Cpu));
        assert!(r.contains("missing config.json"), "{r}");
    }

    #[test]
    fn missing_weights_and_path() {
        let dir = copy_case("vit_timm");
        std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
        let r = checkpoint_reason(load(dir.path(), &Device::Cpu));
        assert!(r.contains("model.safetensors"), "{r}");
        let r = checkpoint_reason(load(&dir.path().join("nope"), &Device::Cpu));
        assert!(r.contains("no such file"), "{r}");
    }

    #[test]
    fn unknown_model_type() {
        let dir = copy_case("vit_hf");
        edit_config(dir.path(), |v| v["model_type"] = "swin".into());
        match load(dir.path(), &Device::Cpu) {
            Err(Error::Unsupported(m)) => assert!(m.contains("model_type 'swin'"), "{m}"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn dropped_tensor_timm() {
        let dir = copy_case("vit_timm");
        edit_tensors(dir.path(), |t| {
            t.remove("blocks.3.attn.qkv.weight");
        });
        let r = checkpoint_reason(load(dir.path(), &Device::Cpu));
        assert_eq!(r, "missing tensor 'blocks.3.attn.qkv.weight'");
    }

    #[test]
    fn dropped_tensor_hf_named_as_hub() {
        let dir = copy_case("vit_hf");
        edit_tensors(dir.path(), |t| {
            t.remove("vit.encoder.layer.2.attention.attention.key.weight");
        });
        let r = checkpoint_reason(load(dir.path(), &Device::Cpu));
        assert_eq!(
            r,
            "missing tensor 'vit.encoder.layer.2.attention.attention.key.weight'"
        );
        let dir = copy_case("vit_hf");
        edit_tensors(dir.path(), |t| {
            t.remove("vit.encoder.layer.1.layernorm_after.bias");
        });
        let r = checkpoint_reason(load(dir.path(), &Device::Cpu));
        assert_eq!(
            r,
            "missing tensor 'vit.encoder.layer.1.layernorm_after.bias'"
        );
    }

    #[test]
    fn dropped_dist_head() {
        let dir = copy_case("deit_distilled_timm");
        edit_tensors(dir.path(), |t| {
            t.remove("head_dist.weight");
        });
        let r = checkpoint_reason(load(dir.path(), &Device::Cpu));
        assert!(r.contains("head_dist.weight"), "{r}");
    }

    #[test]
    fn wrong_tensor_shape() {
        let dir = copy_case("vit_timm");
        edit_tensors(dir.path(), |t| {
            let z = Tensor::zeros((768, 100), candle_core::DType::F32, &Device::Cpu).unwrap();
            t.insert("blocks.1.mlp.fc2.weight".into(), z);
        });
        let r = checkpoint_reason(load(dir.path(), &Device::Cpu));
        assert_eq!(
            r,
            "tensor 'blocks.1.mlp.fc2.weight' has shape [768, 100], expected [192, 768]"
        );
    }

    #[test]
    fn config_disagrees_with_tensors() {
        // depth 4 in config but only 3 blocks.
        let dir = copy_case("vit_timm");
        edit_tensors(dir.path(), |t| t.retain(|k, _| !k.starts_with("blocks.3.")));
        let r = checkpoint_reason(load(dir.path(), &Device::Cpu));
        assert!(
            r.contains("model_args.depth is 4") && r.contains("3"),
            "{r}"
        );
        // HF hidden size.
        let dir = copy_case("vit_hf");
        edit_config(dir.path(), |v| v["hidden_size"] = 256.into());
        let r = checkpoint_reason(load(dir.path(), &Device::Cpu));
        assert!(r.contains("hidden_size is 256") && r.contains("192"), "{r}");
        // HF label count.
        let dir = copy_case("vit_hf");
        edit_config(dir.path(), |v| {
            v["id2label"].as_object_mut().unwrap().remove("9");
        });
        let r = checkpoint_reason(load(dir.path(), &Device::Cpu));
        assert!(r.contains("id2label has 9 labels"), "{r}");
    }

    #[test]
    fn unsupported_variants() {
        let dir = copy_case("vit_timm");
        edit_config(dir.path(), |v| {
            v["model_args"]["global_pool"] = "avg".into()
        });
        match load(dir.path(), &Device::Cpu) {
            Err(Error::Unsupported(m)) => assert!(m.contains("global_pool 'avg'"), "{m}"),
            other => panic!("unexpected {other:?}"),
        }
        let dir = copy_case("vit_timm");
        edit_tensors(dir.path(), |t| {
            let z = Tensor::zeros((1, 4, 192), candle_core::DType::F32, &Device::Cpu).unwrap();
            t.insert("reg_token".into(), z);
        });
        match load(dir.path(), &Device::Cpu) {
            Err(Error::Unsupported(m)) => assert!(m.contains("reg_token"), "{m}"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn hf_without_prefix_and_as_deit_teacher() {
        // Same weights stored without the `vit.` prefix.
        let dir = copy_case("vit_hf");
        edit_tensors(dir.path(), |t| {
            *t = t
                .drain()
                .map(|(k, v)| (k.strip_prefix("vit.").unwrap_or(&k).to_string(), v))
                .collect();
        });
        let a = load(dir.path(), &Device::Cpu).unwrap();
        let b = load(&case("vit_hf"), &Device::Cpu).unwrap();
        let x = input("vit_hf");
        let la = logits(&a, &x);
        let lb = logits(&b, &x);
        assert_eq!(la, lb);

        // The timm DeiT-distilled weights renamed to HF DeiTForImageClassificationWithTeacher
        // give the same logits as the timm checkpoint.
        let timm = load(&case("deit_distilled_timm"), &Device::Cpu).unwrap();
        let dir = copy_case("vit_hf");
        let src = candle_core::safetensors::load(
            case("deit_distilled_timm").join("model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let mut hf = std::collections::HashMap::new();
        for (k, v) in src {
            let name = match k.as_str() {
                "cls_token" => "deit.embeddings.cls_token".to_string(),
                "dist_token" => "deit.embeddings.distillation_token".to_string(),
                "pos_embed" => "deit.embeddings.position_embeddings".to_string(),
                "norm.weight" => "deit.layernorm.weight".to_string(),
                "norm.bias" => "deit.layernorm.bias".to_string(),
                _ if k.starts_with("patch_embed.proj.") => k.replace(
                    "patch_embed.proj.",
                    "deit.embeddings.patch_embeddings.projection.",
                ),
                _ if k.starts_with("head_dist.") => {
                    k.replace("head_dist.", "distillation_classifier.")
                }
                _ if k.starts_with("head.") => k.replace("head.", "cls_classifier."),
                _ => {
                    let (n, rest) = k.strip_prefix("blocks.").unwrap().split_once('.').unwrap();
                    let p = format!("deit.encoder.layer.{n}.");
                    if let Some(param) = rest.strip_prefix("attn.qkv.") {
                        for (i, q) in ["query", "key", "value"].iter().enumerate() {
                            let part = v.narrow(0, i * 192, 192).unwrap().contiguous().unwrap();
                            hf.insert(format!("{p}attention.attention.{q}.{param}"), part);
                        }
                        continue;
                    }
                    let (m, param) = rest.rsplit_once('.').unwrap();
                    let hm = match m {
                        "norm1" => "layernorm_before",
                        "norm2" => "layernorm_after",
                        "attn.proj" => "attention.output.dense",
                        "mlp.fc1" => "intermediate.dense",
                        "mlp.fc2" => "output.dense",
                        _ => panic!("{k}"),
                    };
                    format!("{p}{hm}.{param}")
                }
            };
            hf.insert(name, v);
        }
        candle_core::safetensors::save(&hf, dir.path().join("model.safetensors")).unwrap();
        edit_config(dir.path(), |v| {
            v["model_type"] = "deit".into();
            v["num_hidden_layers"] = 3.into();
            v["layer_norm_eps"] = 1e-6.into();
            v["architectures"] = serde_json::json!(["DeiTForImageClassificationWithTeacher"]);
        });
        let hfm = load(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(hfm.spec().family, Family::DeitDistilled);
        assert_eq!(hfm.spec().num_prefix_tokens, 2);
        let x = input("deit_distilled_timm");
        let a = hfm.forward(&x, Some(Tap::Norm1(2))).unwrap();
        let b = timm.forward(&x, Some(Tap::Norm1(2))).unwrap();
        let la: Vec<f32> = a.logits.flatten_all().unwrap().to_vec1().unwrap();
        let lb: Vec<f32> = b.logits.flatten_all().unwrap().to_vec1().unwrap();
        assert!(max_abs_diff(&la, &lb) < 1e-6);

        // Dropping one of the fused projections names it as the Hub does.
        edit_tensors(dir.path(), |t| {
            t.remove("deit.encoder.layer.0.attention.attention.value.bias");
        });
        let r = checkpoint_reason(load(dir.path(), &Device::Cpu));
        assert_eq!(
            r,
            "missing tensor 'deit.encoder.layer.0.attention.attention.value.bias'"
        );
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// Writes `entries` as an uncompressed zip (the container of PyTorch's `torch.save`).
    fn write_zip(path: &Path, entries: &[(String, Vec<u8>)]) {
        let (mut out, mut central) = (Vec::new(), Vec::new());
        let u16le = |v: &mut Vec<u8>, x: u16| v.extend_from_slice(&x.to_le_bytes());
        let u32le = |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&x.to_le_bytes());
        for (name, data) in entries {
            let (crc, len, off) = (crc32(data), data.len() as u32, out.len() as u32);
            u32le(&mut out, 0x0403_4b50);
            for x in [20, 0, 0, 0, 0x21] {
                u16le(&mut out, x);
            }
            for x in [crc, len, len] {
                u32le(&mut out, x);
            }
            u16le(&mut out, name.len() as u16);
            u16le(&mut out, 0);
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(data);
            u32le(&mut central, 0x0201_4b50);
            for x in [20, 20, 0, 0, 0, 0x21] {
                u16le(&mut central, x);
            }
            for x in [crc, len, len] {
                u32le(&mut central, x);
            }
            for x in [name.len() as u16, 0, 0, 0, 0] {
                u16le(&mut central, x);
            }
            u32le(&mut central, 0);
            u32le(&mut central, off);
            central.extend_from_slice(name.as_bytes());
        }
        let (cd_off, cd_len, n) = (out.len() as u32, central.len() as u32, entries.len() as u16);
        out.extend_from_slice(&central);
        u32le(&mut out, 0x0605_4b50);
        for x in [0, 0, n, n] {
            u16le(&mut out, x);
        }
        u32le(&mut out, cd_len);
        u32le(&mut out, cd_off);
        u16le(&mut out, 0);
        std::fs::write(path, out).unwrap();
    }

    /// Writes f32 tensors as a PyTorch `state_dict` pickle (`pytorch_model.bin`).
    fn write_pth(path: &Path, tensors: &std::collections::HashMap<String, Tensor>) {
        let mut pkl = vec![0x80, 2, b'}', b'('];
        let unicode = |p: &mut Vec<u8>, s: &str| {
            p.push(b'X');
            p.extend_from_slice(&(s.len() as u32).to_le_bytes());
            p.extend_from_slice(s.as_bytes());
        };
        let int = |p: &mut Vec<u8>, x: usize| {
            p.push(b'J');
            p.extend_from_slice(&(x as i32).to_le_bytes());
        };
        let mut entries = Vec::new();
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        for (i, name) in names.into_iter().enumerate() {
            let t = &tensors[name];
            unicode(&mut pkl, name);
            pkl.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
            pkl.push(b'(');
            unicode(&mut pkl, "storage");
            pkl.extend_from_slice(b"ctorch\nFloatStorage\n");
            unicode(&mut pkl, &i.to_string());
            unicode(&mut pkl, "cpu");
            int(&mut pkl, t.elem_count());
            pkl.extend_from_slice(b"tQ");
            int(&mut pkl, 0);
            let dims = t.dims();
            let mut strides = vec![1usize; dims.len()];
            for d in (0..dims.len().saturating_sub(1)).rev() {
                strides[d] = strides[d + 1] * dims[d + 1];
            }
            for v in [dims, strides.as_slice()] {
                pkl.push(b'(');
                for &x in v {
                    int(&mut pkl, x);
                }
                pkl.push(b't');
            }
            pkl.extend_from_slice(&[0x89, b'N', b't', b'R']);
            let data: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
            entries.push((format!("archive/data/{i}"), bytes));
        }
        pkl.extend_from_slice(b"u.");
        entries.insert(0, ("archive/data.pkl".to_string(), pkl));
        write_zip(path, &entries);
    }

    #[test]
    fn pytorch_bin_loads_like_safetensors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            case("vit_timm").join("config.json"),
            dir.path().join("config.json"),
        )
        .unwrap();
        let t = candle_core::safetensors::load(
            case("vit_timm").join("model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        write_pth(&dir.path().join("pytorch_model.bin"), &t);
        let x = input("vit_timm");
        let want = load(&case("vit_timm"), &Device::Cpu)
            .unwrap()
            .forward(&x, None)
            .unwrap()
            .logits;
        for p in [
            dir.path().to_path_buf(),
            dir.path().join("pytorch_model.bin"),
        ] {
            let got = load(&p, &Device::Cpu)
                .unwrap()
                .forward(&x, None)
                .unwrap()
                .logits;
            let d: f32 = (&got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert_eq!(d, 0.0, "{}", p.display());
        }
    }

    #[test]
    fn timm_deit_is_a_plain_vit_and_hf_deit_without_teacher_keeps_dist_token() {
        let dir = copy_case("vit_timm");
        edit_config(dir.path(), |v| {
            v["architecture"] = "deit_tiny_patch16_224".into()
        });
        let deit = load(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(deit.spec().family, Family::Deit);
        assert_eq!(deit.spec().num_prefix_tokens, 1);
        let x = input("vit_timm");
        let vit = load(&case("vit_timm"), &Device::Cpu).unwrap();
        let a = logits(&deit, &x);
        let b = logits(&vit, &x);
        assert_eq!(a, b);

        // A distilled architecture name without the [DIST] token.
        let dir = copy_case("vit_timm");
        edit_config(dir.path(), |v| {
            v["architecture"] = "deit_tiny_distilled_patch16_224".into()
        });
        let r = checkpoint_reason(load(dir.path(), &Device::Cpu));
        assert!(r.contains("missing tensor 'dist_token'"), "{r}");

        // HF DeiTForImageClassification: [CLS] + [DIST] tokens, one classifier on [CLS].
        let dir = copy_case("vit_hf");
        edit_tensors(dir.path(), |t| {
            *t = t
                .drain()
                .map(|(k, v)| (k.replacen("vit.", "deit.", 1), v))
                .collect();
            let pos = t["deit.embeddings.position_embeddings"].clone();
            let pos = Tensor::cat(&[&pos.narrow(1, 0, 1).unwrap(), &pos], 1).unwrap();
            t.insert("deit.embeddings.position_embeddings".into(), pos);
            let cls = t["deit.embeddings.cls_token"].clone();
            t.insert("deit.embeddings.distillation_token".into(), cls);
        });
        edit_config(dir.path(), |v| {
            v["model_type"] = "deit".into();
            v["architectures"] = serde_json::json!(["DeiTForImageClassification"]);
        });
        let m = load(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(m.spec().family, Family::Deit);
        assert_eq!(m.spec().num_prefix_tokens, 2);
        let out = m.forward(&input("vit_hf"), Some(Tap::Norm1(0))).unwrap();
        assert_eq!(out.logits.dims(), &[1, 10]);
        assert_eq!(out.features.unwrap().dims(), &[1, 192, 14, 14]);
        // Its mean/std come from preprocessor_config.json, not the DeiT default.
        assert_eq!(m.config().preprocess.mean, [0.5; 3]);
    }
}
