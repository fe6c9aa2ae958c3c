//! LayerNorm over the last dimension in one pass per row: mean, variance of the centred values
//! (two-pass, as PyTorch; candle-nn's fused kernel uses `E[x^2] - E[x]^2`, which loses digits),
//! scale and shift. Composed from candle ops it was ten tensor ops, each allocating and
//! sweeping the `(B, T, D)` activations, twice per block. Row sums use 16 partial sums so they
//! vectorise; the kernel is compiled for AVX-512, for AVX2 + FMA and for baseline x86-64 and
//! chosen at run time. The backward pass (training, Grad-CAM) is one sweep per row too, with the
//! weight and bias gradients summed on the way. Other dtypes and devices take the composed path.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

/// `LayerNorm(xs) * weight + bias` over the last dimension of `xs`.
pub(crate) fn layer_norm(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if f32_cpu(xs) && f32_cpu(weight) && f32_cpu(bias) {
        xs.contiguous()?.apply_op3(
            &weight.contiguous()?,
            &bias.contiguous()?,
            FusedLayerNorm { eps },
        )
    } else {
        composed(xs, weight, bias, eps)
    }
}

/// The same from candle ops (reference for the tests, and the path off the CPU).
fn composed(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let (xhat, _) = normalise(xs, eps)?;
    xhat.broadcast_mul(weight)?.broadcast_add(bias)
}

/// `(x - mean) / sqrt(var + eps)` and `1 / sqrt(var + eps)` (keepdim), from candle ops.
fn normalise(xs: &Tensor, eps: f64) -> candle_core::Result<(Tensor, Tensor)> {
    let mean = xs.mean_keepdim(D::Minus1)?;
    let xc = xs.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_std = (var + eps)?.sqrt()?.recip()?;
    Ok((xc.broadcast_mul(&inv_std)?, inv_std))
}

struct FusedLayerNorm {
    eps: f64,
}

impl CustomOp3 for FusedLayerNorm {
    fn name(&self) -> &'static str {
        "vitcx-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = super::f32_slice(s1, l1, "vitcx layer-norm", "input")?;
        let (w, b) = (
            super::f32_slice(s2, l2, "vitcx layer-norm", "weight")?,
            super::f32_slice(s3, l3, "vitcx layer-norm", "bias")?,
        );
        let n = l1.shape().dims().last().copied().unwrap_or(0);
        if n == 0 || w.len() != n || b.len() != n {
            candle_core::bail!(
                "vitcx layer-norm: rows of {n} with {} weights and {} biases",
                w.len(),
                b.len()
            )
        }
        let mut dst = vec![0f32; src.len()];
        let rows_per_task = (8192 / n).max(1);
        let eps = self.eps as f32;
        src.par_chunks(n * rows_per_task)
            .zip(dst.par_chunks_mut(n * rows_per_task))
            .for_each(|(s, d)| rows(s, w, b, eps, d));
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gx, gw, gb) = if xs.device().is_cpu() && grad.dtype() == DType::F32 {
            let n = weight.elem_count();
            let rows = xs.elem_count() / n.max(1);
            let all = xs.contiguous()?.apply_op3_no_bwd(
                &weight.contiguous()?,
                &grad.contiguous()?,
                &LayerNormGrad { eps: self.eps },
            )?;
            (
                all.narrow(0, 0, rows)?.reshape(xs.shape())?,
                all.get(rows)?.reshape(weight.shape())?,
                all.get(rows + 1)?.reshape(weight.shape())?,
            )
        } else {
            composed_grad(xs, weight, grad, self.eps)?
        };
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

/// The gradients with respect to `xs`, `weight` and `bias`, from candle ops (off the CPU, and
/// the tests' reference).
fn composed_grad(
    xs: &Tensor,
    weight: &Tensor,
    grad: &Tensor,
    eps: f64,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (xhat, inv_std) = normalise(xs, eps)?;
    let sums = |t: &Tensor| super::sum_leading(t)?.reshape(weight.shape());
    let gb = sums(grad)?;
    let gw = sums(&(grad * &xhat)?)?;
    let gxhat = grad.broadcast_mul(weight)?;
    let a = gxhat.mean_keepdim(D::Minus1)?;
    let c = (&gxhat * &xhat)?.mean_keepdim(D::Minus1)?;
    let gx = gxhat
        .broadcast_sub(&a)?
        .sub(&xhat.broadcast_mul(&c)?)?
        .broadcast_mul(&inv_std)?;
    Ok((gx, gw, gb))
}

/// The backward pass in one sweep per row: `(xs, weight, output gradient)` -> `(rows + 2, N)`,
/// the input gradient's rows, then the weight and bias gradients (column sums). Composed from
/// candle ops it was a dozen sweeps over the activations.
struct LayerNormGrad {
    eps: f64,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "vitcx-layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let eps = self.eps as f32;
        super::row_grad_cpu(
            "vitcx layer-norm gradient",
            "weight",
            (s1, l1),
            (s2, l2),
            (s3, l3),
            2,
            |src, w, grad, gx, sums| grad_rows(src, w, grad, eps, gx, sums),
        )
    }
}

/// The LayerNorm gradient of each row (see [`LayerNormGrad`]) into `gx`, the weight and bias
/// gradients added to `sums` (`[gw | gb]`), on the best instruction set.
fn grad_rows(src: &[f32], w: &[f32], g: &[f32], eps: f32, gx: &mut [f32], sums: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            unsafe { grad_rows_avx512(src, w, g, eps, gx, sums) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            unsafe { grad_rows_avx2(src, w, g, eps, gx, sums) };
            return;
        }
    }
    grad_rows_generic(src, w, g, eps, gx, sums);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn grad_rows_avx512(
    src: &[f32],
    w: &[f32],
    g: &[f32],
    eps: f32,
    gx: &mut [f32],
    sums: &mut [f32],
) {
    grad_rows_generic(src, w, g, eps, gx, sums)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn grad_rows_avx2(
    src: &[f32],
    w: &[f32],
    g: &[f32],
    eps: f32,
    gx: &mut [f32],
    sums: &mut [f32],
) {
    grad_rows_generic(src, w, g, eps, gx, sums)
}

/// With `xhat = (x - mean) * inv`: `gx = inv * (g w - mean(g w) - xhat * mean(g w xhat))`,
/// `gw += g xhat`, `gb += g`. `gx` holds `xhat` until the last step of each row.
#[inline(always)]
fn grad_rows_generic(
    src: &[f32],
    w: &[f32],
    g: &[f32],
    eps: f32,
    gx: &mut [f32],
    sums: &mut [f32],
) {
    let n = w.len();
    let (gw, gb) = sums.split_at_mut(n);
    for ((s, gr), o) in src
        .chunks_exact(n)
        .zip(g.chunks_exact(n))
        .zip(gx.chunks_exact_mut(n))
    {
        let mean = sum16(s, |x| x) / n as f32;
        for (o, &x) in o.iter_mut().zip(s) {
            *o = x - mean;
        }
        let var = sum16(o, |x| x * x) / n as f32;
        let inv = 1.0 / (var + eps).sqrt();
        let (mut a, mut c) = ([0f32; 16], [0f32; 16]);
        for (i, ((o, &gv), &wv)) in o.iter_mut().zip(gr).zip(w).enumerate() {
            *o *= inv;
            let gw_ = gv * wv;
            a[i % 16] += gw_;
            c[i % 16] += gw_ * *o;
        }
        let a = a.iter().sum::<f32>() / n as f32;
        let c = c.iter().sum::<f32>() / n as f32;
        for ((((o, &gv), &wv), sw), sb) in o
            .iter_mut()
            .zip(gr)
            .zip(w)
            .zip(gw.iter_mut())
            .zip(gb.iter_mut())
        {
            *sw += gv * *o;
            *sb += gv;
            *o = (gv * wv - a - *o * c) * inv;
        }
    }
}

/// LayerNorm of each row of `src` (rows of `w.len()`) into `dst`, on the best instruction set.
fn rows(src: &[f32], w: &[f32], b: &[f32], eps: f32, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            unsafe { rows_avx512(src, w, b, eps, dst) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            unsafe { rows_avx2(src, w, b, eps, dst) };
            return;
        }
    }
    rows_generic(src, w, b, eps, dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512(src: &[f32], w: &[f32], b: &[f32], eps: f32, dst: &mut [f32]) {
    rows_generic(src, w, b, eps, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2(src: &[f32], w: &[f32], b: &[f32], eps: f32, dst: &mut [f32]) {
    rows_generic(src, w, b, eps, dst)
}

/// `sum(f(v))` with 16 partial sums (one AVX-512 register), so it vectorises.
#[inline(always)]
fn sum16(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += f(x);
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().map(|&x| f(x)).sum::<f32>()
}

#[inline(always)]
fn rows_generic(src: &[f32], w: &[f32], b: &[f32], eps: f32, dst: &mut [f32]) {
    let n = w.len();
    for (s, d) in src.chunks_exact(n).zip(dst.chunks_exact_mut(n)) {
        let mean = sum16(s, |x| x) / n as f32;
        for (o, &x) in d.iter_mut().zip(s) {
            *o = x - mean;
        }
        let var = sum16(d, |x| x * x) / n as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((o, &wv), &bv) in d.iter_mut().zip(w).zip(b) {
            *o = *o * inv * wv + bv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn seq(n: usize, k: f32, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32) * k).sin() * scale + 0.3)
            .collect()
    }

    #[test]
    fn matches_the_composed_ops_on_every_instruction_set() {
        let xs = Tensor::from_vec(seq(3 * 5 * 67, 0.37, 4.0), (3, 5, 67), &Device::Cpu).unwrap();
        let w = Tensor::from_vec(seq(67, 1.1, 0.5), 67, &Device::Cpu).unwrap();
        let b = Tensor::from_vec(seq(67, 0.9, 0.2), 67, &Device::Cpu).unwrap();
        let ours = layer_norm(&xs, &w, &b, 1e-6).unwrap();
        let theirs = composed(&xs, &w, &b, 1e-6).unwrap();
        let d = (&ours - &theirs).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 2e-6);
        let src = xs.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (wv, bv) = (w.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
        let (mut a, mut g) = (vec![0f32; src.len()], vec![0f32; src.len()]);
        rows(&src, &wv, &bv, 1e-6, &mut a);
        rows_generic(&src, &wv, &bv, 1e-6, &mut g);
        let worst = a
            .iter()
            .zip(&g)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(worst < 1e-6, "{worst}");
    }

    #[test]
    fn gradients_match_the_composed_ops() {
        let x = Var::from_vec(seq(4 * 19, 0.7, 3.0), (4, 19), &Device::Cpu).unwrap();
        let w = Var::from_vec(seq(19, 1.3, 0.5), 19, &Device::Cpu).unwrap();
        let b = Var::from_vec(seq(19, 2.3, 0.5), 19, &Device::Cpu).unwrap();
        let m = Tensor::from_vec(seq(4 * 19, 2.1, 1.0), (4, 19), &Device::Cpu).unwrap();
        let loss = |y: Tensor| (y * &m).unwrap().sum_all().unwrap().backward().unwrap();
        let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        let g1 = loss(layer_norm(xt, wt, bt, 1e-5).unwrap());
        let g2 = loss(composed(xt, wt, bt, 1e-5).unwrap());
        for v in [xt, wt, bt] {
            let d = crate::model::kernels::max_abs_diff(g1.get(v).unwrap(), g2.get(v).unwrap());
            assert!(d < 1e-5, "{d}");
        }
    }

    #[test]
    fn fused_gradient_matches_its_composed_form_across_blocks() {
        // 400 rows of 67: several parallel blocks, so the weight and bias gradients add partial
        // sums, and a row width that is not a multiple of 16.
        let xs = Tensor::from_vec(seq(400 * 67, 0.37, 4.0), (4, 100, 67), &Device::Cpu).unwrap();
        let w = Tensor::from_vec(seq(67, 1.1, 0.5), 67, &Device::Cpu).unwrap();
        let g = Tensor::from_vec(seq(400 * 67, 0.77, 1.0), (4, 100, 67), &Device::Cpu).unwrap();
        let op = LayerNormGrad { eps: 1e-6 };
        let all = xs.apply_op3_no_bwd(&w, &g, &op).unwrap();
        assert_eq!(all.dims(), &[402, 67]);
        let (gx, gw, gb) = composed_grad(&xs, &w, &g, 1e-6).unwrap();
        let ours_gx = all.narrow(0, 0, 400).unwrap().reshape(gx.shape()).unwrap();
        assert!(crate::model::kernels::max_abs_diff(&ours_gx, &gx) < 1e-4);
        assert!(crate::model::kernels::max_abs_diff(&all.get(400).unwrap(), &gw) < 1e-3);
        assert!(crate::model::kernels::max_abs_diff(&all.get(401).unwrap(), &gb) < 1e-3);
        let again = xs.apply_op3_no_bwd(&w, &g, &op).unwrap();
        assert_eq!(crate::model::kernels::max_abs_diff(&all, &again), 0.0);
    }
}
