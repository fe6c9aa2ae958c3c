//! Swin Transformers with seeded random weights, built in memory: the benchmark's `swin_tiny`.
//! A timm-named state dict (weights and relative position tables N(0, 0.02), biases 0,
//! LayerNorm weights 1) goes through the same config and weight checks as a checkpoint read from
//! disk, so the model is exactly the one `vitcx explain` would run.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use serde::Serialize;

use super::SwinTransformer;
use crate::error::Result;
use crate::model::checkpoint::Checkpoint;
use crate::model::families::vit::random::materialise;

/// The sizes of a Swin built in code.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SwinArch {
    /// Width of the first stage (doubling at each merge).
    pub embed_dim: usize,
    /// Blocks per stage.
    pub depths: Vec<usize>,
    /// Heads per stage.
    pub heads: Vec<usize>,
    /// Square window side.
    pub window: usize,
    /// Patch side in pixels.
    pub patch: usize,
    /// Square input side in pixels.
    pub image_size: usize,
    /// MLP width over the block width.
    pub mlp_ratio: usize,
    /// Output classes.
    pub num_classes: usize,
}

impl SwinArch {
    /// timm's `swin_tiny_patch4_window7_224`: 96 wide, depths (2, 2, 6, 2), heads (3, 6, 12, 24).
    pub fn tiny() -> Self {
        SwinArch {
            embed_dim: 96,
            depths: vec![2, 2, 6, 2],
            heads: vec![3, 6, 12, 24],
            window: 7,
            patch: 4,
            image_size: 224,
            mlp_ratio: 4,
            num_classes: 1000,
        }
    }

    /// Width of stage `s`.
    fn dim(&self, s: usize) -> usize {
        self.embed_dim << s
    }

    /// Multiply-adds of one forward pass for one image: patch embedding, per block the qkv,
    /// windowed attention (`QK^T` and `AV` within each window), projection and MLP, the merges
    /// and the head. Windows are clamped to the grid as the model does; no padding.
    pub fn macs_per_image(&self) -> f64 {
        let mut g = self.image_size / self.patch;
        let d0 = self.dim(0) as f64;
        let mut macs = (g * g) as f64 * (3 * self.patch * self.patch) as f64 * d0;
        for (s, &depth) in self.depths.iter().enumerate() {
            let d = self.dim(s) as f64;
            if s > 0 {
                g = g.div_ceil(2);
                macs += (g * g) as f64 * 4.0 * self.dim(s - 1) as f64 * d;
            }
            let n = (g * g) as f64;
            let t = self.window.min(g).pow(2) as f64;
            let m = self.mlp_ratio as f64 * d;
            let block = n * d * 3.0 * d + 2.0 * n * t * d + n * d * d + 2.0 * n * d * m;
            macs += depth as f64 * block;
        }
        macs + self.dim(self.depths.len() - 1) as f64 * self.num_classes as f64
    }

    /// Floating-point operations of one forward pass for one image (2 per multiply-add).
    /// swin_tiny at 224 px: about 9 G (timm's `4.5 GMACs`).
    pub fn flops_per_image(&self) -> f64 {
        2.0 * self.macs_per_image()
    }
}

/// A timm-named state dict of random tensors for `arch`, drawn in a fixed order from one
/// ChaCha8 stream, so the same seed gives the same weights on every machine.
pub fn random_state_dict(
    arch: &SwinArch,
    seed: u64,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let (p, w) = (arch.patch, arch.window);
    let d0 = arch.dim(0);
    // (name, shape, kind): kind 'n' normal, 'z' zeros, 'o' ones.
    let mut plan: Vec<(String, Vec<usize>, char)> = vec![
        ("patch_embed.proj.weight".into(), vec![d0, 3, p, p], 'n'),
        ("patch_embed.proj.bias".into(), vec![d0], 'z'),
        ("patch_embed.norm.weight".into(), vec![d0], 'o'),
        ("patch_embed.norm.bias".into(), vec![d0], 'z'),
    ];
    let mut g = arch.image_size / p;
    for (s, (&depth, &heads)) in arch.depths.iter().zip(&arch.heads).enumerate() {
        let d = arch.dim(s);
        if s > 0 {
            g = g.div_ceil(2);
            let prev = arch.dim(s - 1);
            plan.extend([
                (format!("layers.{s}.downsample.norm.weight"), vec![4 * prev], 'o'),
                (format!("layers.{s}.downsample.norm.bias"), vec![4 * prev], 'z'),
                (format!("layers.{s}.downsample.reduction.weight"), vec![d, 4 * prev], 'n'),
            ]);
        }
        let win = w.min(g);
        let m = arch.mlp_ratio * d;
        for j in 0..depth {
            let b = |x: &str| format!("layers.{s}.blocks.{j}.{x}");
            plan.extend([
                (b("norm1.weight"), vec![d], 'o'),
                (b("norm1.bias"), vec![d], 'z'),
                (
                    b("attn.relative_position_bias_table"),
                    vec![(2 * win - 1) * (2 * win - 1), heads],
                    'n',
                ),
                (b("attn.qkv.weight"), vec![3 * d, d], 'n'),
                (b("attn.qkv.bias"), vec![3 * d], 'z'),
                (b("attn.proj.weight"), vec![d, d], 'n'),
                (b("attn.proj.bias"), vec![d], 'z'),
                (b("norm2.weight"), vec![d], 'o'),
                (b("norm2.bias"), vec![d], 'z'),
                (b("mlp.fc1.weight"), vec![m, d], 'n'),
                (b("mlp.fc1.bias"), vec![m], 'z'),
                (b("mlp.fc2.weight"), vec![d, m], 'n'),
                (b("mlp.fc2.bias"), vec![d], 'z'),
            ]);
        }
    }
    let last = arch.dim(arch.depths.len() - 1);
    plan.extend([
        ("norm.weight".into(), vec![last], 'o'),
        ("norm.bias".into(), vec![last], 'z'),
        ("head.fc.weight".into(), vec![arch.num_classes, last], 'n'),
        ("head.fc.bias".into(), vec![arch.num_classes], 'z'),
    ]);
    materialise(plan, seed, device)
}

/// The timm `config.json` a checkpoint of `arch` would carry (ImageNet mean/std, as timm's
/// Swins).
pub fn timm_config_json(arch: &SwinArch, architecture: &str) -> serde_json::Value {
    serde_json::json!({
        "architecture": architecture,
        "num_classes": arch.num_classes,
        "global_pool": "avg",
        "model_args": {
            "embed_dim": arch.embed_dim,
            "depths": arch.depths,
            "num_heads": arch.heads,
            "window_size": arch.window,
            "patch_size": arch.patch,
            "img_size": arch.image_size,
            "num_classes": arch.num_classes,
        },
        "pretrained_cfg": {
            "input_size": [3, arch.image_size, arch.image_size],
            "mean": crate::model::config::IMAGENET_DEFAULT_MEAN,
            "std": crate::model::config::IMAGENET_DEFAULT_STD,
            "num_classes": arch.num_classes,
        },
    })
}

/// A Swin of `arch` with weights drawn from `seed`, named `architecture` in its configuration,
/// built through the checkpoint loader's own checks (no file is read or written).
pub fn random_swin(
    arch: &SwinArch,
    architecture: &str,
    seed: u64,
    device: &Device,
) -> Result<SwinTransformer> {
    let ckpt = Checkpoint::from_parts(
        std::path::Path::new("<in-memory>/config.json"),
        timm_config_json(arch, architecture),
        None,
        std::path::Path::new("<in-memory>/model.safetensors"),
        random_state_dict(arch, seed, device)?,
    )?;
    SwinTransformer::from_checkpoint(ckpt, device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Backbone;

    #[test]
    fn swin_tiny_has_timm_sizes() {
        let a = SwinArch::tiny();
        // timm's swin_tiny_patch4_window7_224: 4.5 GMACs (fvcore, counting the attention).
        let g = a.macs_per_image() / 1e9;
        assert!((4.3..4.7).contains(&g), "{g}");
        let small = SwinArch {
            embed_dim: 12,
            depths: vec![2, 2],
            heads: vec![3, 3],
            window: 7,
            patch: 4,
            image_size: 56,
            mlp_ratio: 2,
            num_classes: 5,
        };
        let m = random_swin(&small, "swin_tiny_patch4_window7_224", 3, &Device::Cpu).unwrap();
        let s = m.spec();
        assert_eq!(s.depth, 4);
        assert_eq!(s.layer_taps[3], "layers.1.blocks.1.norm1");
        let t = s.tap("layers.1.blocks.1.norm1").unwrap();
        assert_eq!((t.grid, t.dim, t.layer), ((7, 7), 24, 3));
        assert_eq!(s.tap("layers.0.blocks.0").unwrap().grid, (14, 14));
        let px = Tensor::zeros((2, 3, 56, 56), candle_core::DType::F32, &Device::Cpu).unwrap();
        let out = m.forward(&px, Some("layers.0.blocks.1.norm1")).unwrap();
        assert_eq!(out.logits.dims(), &[2, 5]);
        assert_eq!(out.features.unwrap().dims(), &[2, 12, 14, 14]);
        let e = m.attention(&px).unwrap_err().to_string();
        assert!(e.contains("no token-to-token attention"), "{e}");
        let e = m.forward(&px, Some("layers.1.blocks.2.norm1")).unwrap_err();
        assert!(e.to_string().contains("not in this model"), "{e}");
    }
}
