//! Softmax over the last dimension with a vectorised `exp`, for the attention matrices.
//!
//! candle-nn's CPU softmax calls libm's scalar `expf` once per element, a large share of the
//! perturbed forward passes of a small ViT (docs/performance.md). This kernel computes `exp` with
//! a Cody-Waite range
//! reduction and a degree-7 Taylor polynomial (relative error about 1e-7 on the reduced range,
//! float32 rounding level) in plain loops the compiler vectorises, compiled for AVX-512, for
//! AVX2 + FMA and for baseline x86-64, the best one chosen at run time. Other dtypes and devices
//! take a softmax composed of differentiable candle ops. It also has a backward pass,
//! `y * (g - sum(g * y))`: candle-nn 0.11's `softmax_last_dim` has none (`apply_op1_no_bwd`), so
//! training through it silently leaves the query and key projections without gradient.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::vecmath::exp_nonpositive_with;

/// Softmax over the last dimension of `xs`.
pub(crate) fn softmax_last_dim(xs: &Tensor) -> candle_core::Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == DType::F32 {
        xs.contiguous()?.apply_op1(FastSoftmax)
    } else {
        // candle-nn's softmax has no backward pass: compose it from differentiable ops, so that
        // training and Grad-CAM work on other dtypes and devices too.
        let e = xs.broadcast_sub(&xs.max_keepdim(D::Minus1)?)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    }
}

struct FastSoftmax;

impl CustomOp1 for FastSoftmax {
    fn name(&self) -> &'static str {
        "vitcx-softmax-last-dim"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = super::f32_slice(storage, layout, "vitcx softmax", "input")?;
        let dims = layout.shape().dims();
        let n = dims.last().copied().unwrap_or(1).max(1);
        let mut dst = src.to_vec();
        // Enough rows per task to amortise the scheduling.
        let rows_per_task = (4096 / n).max(1);
        dst.par_chunks_mut(n * rows_per_task)
            .for_each(|d| softmax_in_place(d, n));
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let dot = (grad_res * res)?.sum_keepdim(D::Minus1)?;
        Ok(Some((res * grad_res.broadcast_sub(&dot)?)?))
    }
}

/// Softmax of each length-`n` row of `buf`, in place, on the best instruction set available.
pub(crate) fn softmax_in_place(buf: &mut [f32], n: usize) {
    let mut inv = vec![0f32; buf.len() / n.max(1)];
    exp_rows(buf, n, &mut inv);
    for (row, &s) in buf.chunks_exact_mut(n).zip(&inv) {
        for v in row.iter_mut() {
            *v *= s;
        }
    }
}

/// The unnormalised softmax of each length-`n` row of `buf`, in place: `exp(x - max(row))`,
/// and `1 / sum` of each row into `inv_sums`. Attention applies the `1 / sum` to its (much
/// narrower) output rows instead of to the scores.
pub(crate) fn exp_rows(buf: &mut [f32], n: usize, inv_sums: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            unsafe { exp_rows_avx512(buf, n, inv_sums) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            unsafe { exp_rows_avx2(buf, n, inv_sums) };
            return;
        }
    }
    exp_rows_generic::<false>(buf, n, inv_sums);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_rows_avx512(buf: &mut [f32], n: usize, inv_sums: &mut [f32]) {
    exp_rows_generic::<true>(buf, n, inv_sums)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_rows_avx2(buf: &mut [f32], n: usize, inv_sums: &mut [f32]) {
    exp_rows_generic::<true>(buf, n, inv_sums)
}

/// `FMA`: the exp polynomial in fused multiply-adds (the AVX2 and AVX-512 paths).
#[inline(always)]
fn exp_rows_generic<const FMA: bool>(buf: &mut [f32], n: usize, inv_sums: &mut [f32]) {
    for (d, inv) in buf.chunks_exact_mut(n).zip(inv_sums.iter_mut()) {
        // Sixteen running maxima (one AVX-512 register); `max` is exact in any order.
        let mut lanes = [f32::NEG_INFINITY; 16];
        let mut chunks = d.chunks_exact(16);
        for c in &mut chunks {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l = if v > *l { v } else { *l };
            }
        }
        let max = lanes
            .iter()
            .chain(chunks.remainder())
            .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        // exp and sixteen partial sums in the same pass.
        let mut lanes = [0f32; 16];
        let mut chunks = d.chunks_exact_mut(16);
        for c in &mut chunks {
            for (l, v) in lanes.iter_mut().zip(c.iter_mut()) {
                *v = exp_nonpositive_with::<FMA>(*v - max);
                *l += *v;
            }
        }
        // The ragged tail (5 of ViT's 197 columns) through a padded 16-lane block: scalar, it
        // cost a third of the row. Padding is -inf, whose exp is 0; the sum stays in order.
        let tail = chunks.into_remainder();
        let mut pad = [f32::NEG_INFINITY; 16];
        pad[..tail.len()].copy_from_slice(tail);
        for v in pad.iter_mut() {
            *v = exp_nonpositive_with::<FMA>(*v - max);
        }
        let mut rest = 0f32;
        for (v, &e) in tail.iter_mut().zip(&pad) {
            *v = e;
            rest += e;
        }
        *inv = 1.0 / (lanes.iter().sum::<f32>() + rest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn softmax_matches_candle_nn_and_rows_sum_to_one() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let v: Vec<f32> = (0..2 * 3 * 197 * 197)
            .map(|_| rng.random_range(-9.0f32..9.0))
            .collect();
        let xs = Tensor::from_vec(v, (2, 3, 197, 197), &Device::Cpu).unwrap();
        let ours = softmax_last_dim(&xs).unwrap();
        let theirs = candle_nn::ops::softmax_last_dim(&xs).unwrap();
        let d = (&ours - &theirs).unwrap().abs().unwrap().max_all().unwrap();
        let d = d.to_scalar::<f32>().unwrap();
        // Probabilities are at most 1: a few float32 roundings apart.
        assert!(d < 1e-6, "{d}");
        let sums = ours.sum(D::Minus1).unwrap().flatten_all().unwrap();
        for s in sums.to_vec1::<f32>().unwrap() {
            assert!((s - 1.0).abs() < 1e-5, "{s}");
        }
        // Every instruction-set path gives the generic one's numbers, up to the FMA rounding.
        let src = xs.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut a = src.clone();
        let mut b = src.clone();
        softmax_in_place(&mut a, 197);
        let mut inv = vec![0f32; b.len() / 197];
        exp_rows_generic::<false>(&mut b, 197, &mut inv);
        for (row, s) in b.chunks_exact_mut(197).zip(inv) {
            row.iter_mut().for_each(|v| *v *= s);
        }
        let worst = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(worst < 2e-7, "{worst}");
    }

    #[test]
    fn the_fallback_is_differentiable_too() {
        // f64 takes the composed path (as another device would).
        let x = candle_core::Var::from_vec(
            vec![0.3f64, -1.2, 2.0, 0.5, 0.1, -0.4],
            (2, 3),
            &Device::Cpu,
        )
        .unwrap();
        let y = softmax_last_dim(x.as_tensor()).unwrap();
        let rows = y.sum(D::Minus1).unwrap().to_vec1::<f64>().unwrap();
        assert!(rows.iter().all(|s| (s - 1.0).abs() < 1e-12));
        let w = Tensor::new(&[[1.0f64, 0.0, 0.0], [0.0, 2.0, 0.0]], &Device::Cpu).unwrap();
        let g = (y * w).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = g
            .get(x.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap();
        assert!(
            gx.to_scalar::<f64>().unwrap() > 0.0,
            "gradient reaches the input"
        );
    }

    #[test]
    fn gradient_matches_composed_softmax() {
        let seq = |k: f32| -> Vec<f32> { (0..36).map(|i| ((i as f32) * k).sin() * 2.0).collect() };
        let x = candle_core::Var::from_vec(seq(0.7), (4, 9), &Device::Cpu).unwrap();
        let w = Tensor::from_vec(seq(1.3), (4, 9), &Device::Cpu).unwrap();
        let g1 = (softmax_last_dim(x.as_tensor()).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        // Reference: softmax from differentiable primitives (candle-nn's CPU softmax has no
        // backward pass at all: gradients stop at the attention scores).
        let composed = |t: &Tensor| {
            let e = t.broadcast_sub(&t.max_keepdim(D::Minus1)?)?.exp()?;
            e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
        };
        let g2 = (composed(x.as_tensor()).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let d = (g1.get(x.as_tensor()).unwrap() - g2.get(x.as_tensor()).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
    }
}
