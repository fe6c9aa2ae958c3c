//! EVA-02's rotary position embedding, as timm's `RotaryEmbeddingCat` builds it (`rope_type='cat'`,
//! index grid, `ij` indexing, interleaved pairs) and `EvaAttention` applies it: to each head's
//! queries and keys of the patch tokens (not the \[CLS\]), after the projection, before the scores.
//!
//! For a head width `hd` there are `hd / 4` frequencies `1 / temperature^(j / (hd / 4))`; patch
//! `(y, x)` sits at `t = (y * ref_h / gh, x * ref_w / gw)` (timm's `ref_feat_shape` scaling, so a
//! model fine-tuned at 448 px sees the positions of its 224 px pre-training), its angles are
//! `[t_y * f, t_x * f]` (`hd / 2` values), and each angle rotates one interleaved pair
//! `(x[2k], x[2k+1])`. Everything is computed in f32 in timm's order.
//!
//! The rotation is one CPU op over the fused `(B, T, 3D)` projection (q and k rotated in a copy,
//! v untouched); its gradient is the rotation by the opposite angle (Grad-CAM).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::config::RopeConfig;

/// The sines and cosines of one model's grid, shared by every block.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    /// `(N, hd / 2)` row-major: one angle per pair, per patch.
    sin: Arc<Vec<f32>>,
    cos: Arc<Vec<f32>>,
    /// Patches `N`.
    patches: usize,
    /// Head width.
    hd: usize,
    /// Tokens before the patches (left unrotated).
    prefix: usize,
}

impl Rope {
    /// The tables for a `grid` of patches, heads of width `hd` (a multiple of 4).
    pub(crate) fn new(cfg: &RopeConfig, grid: (usize, usize), hd: usize, prefix: usize) -> Self {
        let nb = hd / 4;
        // timm freq_bands: 1 / temperature ** (arange(nb) / nb), in f32.
        let temperature = cfg.temperature as f32;
        let bands: Vec<f32> = (0..nb)
            .map(|j| 1.0 / temperature.powf(j as f32 / nb as f32))
            .collect();
        let axis = |n: usize, r: Option<usize>| -> Vec<f32> {
            (0..n)
                .map(|i| match r {
                    // timm: t / feat * ref, in f32.
                    Some(r) => i as f32 / n as f32 * r as f32,
                    None => i as f32,
                })
                .collect()
        };
        let (gh, gw) = grid;
        let ty = axis(gh, cfg.ref_grid.map(|g| g.0));
        let tx = axis(gw, cfg.ref_grid.map(|g| g.1));
        let half = hd / 2;
        let mut sin = Vec::with_capacity(gh * gw * half);
        let mut cos = Vec::with_capacity(gh * gw * half);
        for &y in &ty {
            for &x in &tx {
                for (t, b) in std::iter::repeat_n(y, nb)
                    .zip(&bands)
                    .chain(std::iter::repeat_n(x, nb).zip(&bands))
                {
                    let a = t * b;
                    sin.push(a.sin());
                    cos.push(a.cos());
                }
            }
        }
        Rope {
            sin: Arc::new(sin),
            cos: Arc::new(cos),
            patches: gh * gw,
            hd,
            prefix,
        }
    }

    /// `(B, T, 3D)` with q and k of the patch tokens rotated.
    pub(crate) fn apply(&self, qkv: &Tensor) -> candle_core::Result<Tensor> {
        if qkv.device().is_cpu() && qkv.dtype() == DType::F32 {
            qkv.contiguous()?.apply_op1(RopeOp {
                rope: self.clone(),
                sign: 1.0,
            })
        } else {
            self.composed(qkv)
        }
    }

    /// The same from candle ops (off the CPU, and the tests' reference).
    fn composed(&self, qkv: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, d3) = qkv.dims3()?;
        let d = d3 / 3;
        let (hd, n, k) = (self.hd, self.patches, self.prefix);
        let heads2 = 2 * d / hd;
        let dev = qkv.device();
        let table = |v: &Arc<Vec<f32>>| -> candle_core::Result<Tensor> {
            Tensor::from_slice(v.as_slice(), (1, n, 1, hd / 2, 1), dev)?.to_dtype(qkv.dtype())
        };
        let (sin, cos) = (table(&self.sin)?, table(&self.cos)?);
        let qk = qkv.narrow(2, 0, 2 * d)?;
        let x = qk.narrow(1, k, n)?.reshape((b, n, heads2, hd / 2, 2))?;
        let x0 = x.narrow(4, 0, 1)?;
        let x1 = x.narrow(4, 1, 1)?;
        let y0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
        let y1 = (x1.broadcast_mul(&cos)? + x0.broadcast_mul(&sin)?)?;
        let rotated = Tensor::cat(&[&y0, &y1], 4)?.reshape((b, n, 2 * d))?;
        let qk = Tensor::cat(&[&qk.narrow(1, 0, k)?, &rotated], 1)?;
        Tensor::cat(&[&qk, &qkv.narrow(2, 2 * d, d)?], 2)?.reshape((b, t, d3))
    }
}

/// The rotation on the CPU: by the table's angles (`sign` 1) or by their opposites (`sign` -1,
/// the gradient).
struct RopeOp {
    rope: Rope,
    sign: f32,
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "vitcx-rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = crate::model::kernels::f32_slice(storage, layout, "vitcx rope", "input")?;
        let (b, t, d3) = layout.shape().dims3()?;
        let r = &self.rope;
        let (hd, n, k) = (r.hd, r.patches, r.prefix);
        if hd == 0 || d3 % 3 != 0 || (d3 / 3) % hd != 0 || t != k + n {
            candle_core::bail!(
                "vitcx rope: input {:?} does not fit {k} prefix + {n} patch tokens of heads {hd} wide",
                layout.shape().dims()
            )
        }
        let d = d3 / 3;
        let half = hd / 2;
        let mut out = src.to_vec();
        let sign = self.sign;
        out.par_chunks_mut(d3).enumerate().for_each(|(row, o)| {
            let tok = row % t;
            if tok < k {
                return;
            }
            let p = tok - k;
            let sin = &r.sin[p * half..(p + 1) * half];
            let cos = &r.cos[p * half..(p + 1) * half];
            for head in o[..2 * d].chunks_exact_mut(hd) {
                for ((pair, &s), &c) in head.chunks_exact_mut(2).zip(sin).zip(cos) {
                    let (x0, x1) = (pair[0], pair[1]);
                    let s = sign * s;
                    pair[0] = x0 * c - x1 * s;
                    pair[1] = x1 * c + x0 * s;
                }
            }
        });
        let _ = b;
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // The rotation is orthogonal: its gradient is the rotation back.
        let back = RopeOp {
            rope: self.rope.clone(),
            sign: -self.sign,
        };
        Ok(Some(grad_res.contiguous()?.apply_op1(back)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn cfg() -> RopeConfig {
        RopeConfig {
            ref_grid: Some((16, 16)),
            temperature: 10000.0,
        }
    }

    #[test]
    fn tables_follow_timm() {
        // hd 8: 2 bands, 1 and 1 / 100. A 2x3 grid scaled to 16x16: t_y = 0, 8; t_x = 0, 16/3, 32/3.
        let r = Rope::new(&cfg(), (2, 3), 8, 1);
        assert_eq!(r.sin.len(), 6 * 4);
        // Patch (1, 2): angles [8, 8/100, 32/3, 32/300].
        let p = 5 * 4;
        let want = [8.0f32, 0.08, 32.0 / 3.0, 32.0 / 300.0];
        for (i, a) in want.iter().enumerate() {
            assert!((r.sin[p + i] - a.sin()).abs() < 1e-6, "{i}");
            assert!((r.cos[p + i] - a.cos()).abs() < 1e-6, "{i}");
        }
    }

    #[test]
    fn fused_matches_composed_and_gradient_rotates_back() {
        let r = Rope::new(&cfg(), (2, 2), 8, 1);
        // 2 images, 1 + 4 tokens, 2 heads of 8: D 16, 3D 48.
        let vals: Vec<f32> = (0..2 * 5 * 48).map(|i| (i as f32 * 0.37).sin()).collect();
        let x = Var::from_vec(vals, (2, 5, 48), &Device::Cpu).unwrap();
        let fused = r.apply(x.as_tensor()).unwrap();
        let composed = r.composed(x.as_tensor()).unwrap();
        let d = crate::model::kernels::max_abs_diff(&fused, &composed);
        assert!(d < 1e-6, "{d}");
        // [CLS] and v untouched.
        let same = |a: &Tensor, b: &Tensor| crate::model::kernels::max_abs_diff(a, b) < 1e-7;
        let xt = x.as_tensor();
        assert!(same(&fused.narrow(1, 0, 1).unwrap(), &xt.narrow(1, 0, 1).unwrap()));
        assert!(same(&fused.narrow(2, 32, 16).unwrap(), &xt.narrow(2, 32, 16).unwrap()));
        // Gradients of the fused and composed forms agree.
        let w = Tensor::from_vec((0..480).map(|i| (i as f32 * 1.3).cos()).collect(), (2, 5, 48), &Device::Cpu).unwrap();
        let g1 = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (composed * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let d = crate::model::kernels::max_abs_diff(g1.get(xt).unwrap(), g2.get(xt).unwrap());
        assert!(d < 1e-6, "{d}");
        // A misshapen input is an error.
        let bad = Tensor::zeros((1, 4, 48), DType::F32, &Device::Cpu).unwrap();
        assert!(r.apply(&bad).is_err());
    }
}
