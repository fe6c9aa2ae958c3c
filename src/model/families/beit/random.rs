//! BEiT and EVA-02 with seeded random weights, built in memory for the benchmark (`vitcx bench
//! --arch beit_base`, `eva02_base`): a timm-named state dict of plain tensors (weights
//! N(0, 0.02), biases 0, LayerNorm weights 1, LayerScale 0.1) through the same config and weight
//! checks as a checkpoint read from disk.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::config::Kind;
use super::Beit;
use crate::error::Result;
use crate::model::checkpoint::Checkpoint;
use crate::model::families::vit::random::materialise;

/// The sizes of a BEiT or EVA-02 built in code.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RelArch {
    /// BEiT (per-block relative position bias, LayerScale, GELU MLP, patch 16) or EVA-02 (base
    /// layout: absolute and rotary position embedding, separate q/k/v, SwiGLU with its inner
    /// norm, patch 14).
    pub kind: Kind,
    /// Token width.
    pub dim: usize,
    /// Blocks.
    pub depth: usize,
    /// Heads.
    pub heads: usize,
    /// MLP hidden width (of each SwiGLU half).
    pub mlp_dim: usize,
    /// Square input side.
    pub image_size: usize,
    /// Classes.
    pub num_classes: usize,
}

impl RelArch {
    /// The patch side: 16 for BEiT, 14 for EVA-02.
    pub fn patch(&self) -> usize {
        match self.kind {
            Kind::Beit => 16,
            Kind::Eva02 => 14,
        }
    }

    /// The timm architecture it mirrors.
    pub fn timm_name(&self) -> &'static str {
        match self.kind {
            Kind::Beit => "beit_base_patch16_224",
            Kind::Eva02 => "eva02_base_patch14_224",
        }
    }
}

/// The timm-named random state dict of `arch`, drawn in a fixed order from one ChaCha8 stream.
pub fn random_state_dict(arch: &RelArch, seed: u64, device: &Device) -> Result<HashMap<String, Tensor>> {
    let (d, m, p) = (arch.dim, arch.mlp_dim, arch.patch());
    let g = arch.image_size / p;
    let distances = (2 * g - 1) * (2 * g - 1) + 3;
    let mut plan: Vec<(String, Vec<usize>, char)> = vec![
        ("cls_token".into(), vec![1, 1, d], 'n'),
        ("patch_embed.proj.weight".into(), vec![d, 3, p, p], 'n'),
        ("patch_embed.proj.bias".into(), vec![d], 'z'),
    ];
    if arch.kind == Kind::Eva02 {
        plan.push(("pos_embed".into(), vec![1, 1 + g * g, d], 'n'));
    }
    for i in 0..arch.depth {
        let b = |s: &str| format!("blocks.{i}.{s}");
        plan.extend([(b("norm1.weight"), vec![d], 'o'), (b("norm1.bias"), vec![d], 'z')]);
        match arch.kind {
            Kind::Beit => plan.extend([
                (b("attn.qkv.weight"), vec![3 * d, d], 'n'),
                (b("attn.q_bias"), vec![d], 'z'),
                (b("attn.v_bias"), vec![d], 'z'),
                (b("attn.relative_position_bias_table"), vec![distances, arch.heads], 'n'),
                (b("gamma_1"), vec![d], 's'),
                (b("gamma_2"), vec![d], 's'),
                (b("mlp.fc1.weight"), vec![m, d], 'n'),
                (b("mlp.fc1.bias"), vec![m], 'z'),
            ]),
            Kind::Eva02 => plan.extend([
                (b("attn.q_proj.weight"), vec![d, d], 'n'),
                (b("attn.q_proj.bias"), vec![d], 'z'),
                (b("attn.k_proj.weight"), vec![d, d], 'n'),
                (b("attn.v_proj.weight"), vec![d, d], 'n'),
                (b("attn.v_proj.bias"), vec![d], 'z'),
                (b("mlp.fc1_g.weight"), vec![m, d], 'n'),
                (b("mlp.fc1_g.bias"), vec![m], 'z'),
                (b("mlp.fc1_x.weight"), vec![m, d], 'n'),
                (b("mlp.fc1_x.bias"), vec![m], 'z'),
                (b("mlp.norm.weight"), vec![m], 'o'),
                (b("mlp.norm.bias"), vec![m], 'z'),
            ]),
        }
        plan.extend([
            (b("attn.proj.weight"), vec![d, d], 'n'),
            (b("attn.proj.bias"), vec![d], 'z'),
            (b("norm2.weight"), vec![d], 'o'),
            (b("norm2.bias"), vec![d], 'z'),
            (b("mlp.fc2.weight"), vec![d, m], 'n'),
            (b("mlp.fc2.bias"), vec![d], 'z'),
        ]);
    }
    plan.extend([
        ("fc_norm.weight".into(), vec![d], 'o'),
        ("fc_norm.bias".into(), vec![d], 'z'),
        ("head.weight".into(), vec![arch.num_classes, d], 'n'),
        ("head.bias".into(), vec![arch.num_classes], 'z'),
    ]);
    materialise(plan, seed, device)
}

/// A model of `arch` with weights drawn from `seed`, built through the checkpoint loader's checks.
pub fn random_model(arch: &RelArch, seed: u64, device: &Device) -> Result<Beit> {
    let config = serde_json::json!({
        "architecture": arch.timm_name(),
        "num_classes": arch.num_classes,
        "global_pool": "avg",
        "model_args": {
            "embed_dim": arch.dim,
            "depth": arch.depth,
            "num_heads": arch.heads,
            "img_size": arch.image_size,
            "num_classes": arch.num_classes,
        },
        "pretrained_cfg": {"input_size": [3, arch.image_size, arch.image_size]},
    });
    let ckpt = Checkpoint::from_parts(
        std::path::Path::new("<in-memory>/config.json"),
        config,
        None,
        std::path::Path::new("<in-memory>/model.safetensors"),
        random_state_dict(arch, seed, device)?,
    )?;
    super::from_checkpoint(ckpt, device, arch.kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Backbone;

    #[test]
    fn small_random_models_read_back_as_their_family() {
        for kind in [Kind::Beit, Kind::Eva02] {
            let arch = RelArch {
                kind,
                dim: 32,
                depth: 1,
                heads: 2,
                mlp_dim: 48,
                image_size: 4 * if kind == Kind::Beit { 16 } else { 14 },
                num_classes: 5,
            };
            let m = random_model(&arch, 3, &Device::Cpu).unwrap();
            let spec = m.spec();
            assert_eq!(spec.family, kind.name());
            assert_eq!(spec.taps[0].grid, (4, 4));
            let c = m.config();
            assert_eq!(c.block_rel_pos, kind == Kind::Beit);
            assert_eq!(c.rope.is_some(), kind == Kind::Eva02);
            assert_eq!(c.mlp_norm, kind == Kind::Eva02);
        }
    }
}
