//! `x @ wt + b` for the linear layers, the way PyTorch's `addmm` does it: each output row starts
//! as a copy of the bias and the matrix product is accumulated onto it.
//!
//! candle's matmul writes into a freshly zeroed buffer and the bias is added in a second pass over
//! the output; here the bias copy replaces the zeroing and the second pass disappears. The product
//! is the same `gemm` call candle makes (AVX-512 kernels chosen at run time, rayon threads). The
//! backward pass (training, Grad-CAM) is two candle matmuls and the bias sum done as a third.
//! Other dtypes and devices take candle's matmul and broadcast add.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

/// `xs (rows, in) @ wt (in, out) + bias (out)` -> `(rows, out)`.
pub(crate) fn linear(xs: &Tensor, wt: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if f32_cpu(xs) && f32_cpu(wt) && f32_cpu(bias) {
        xs.contiguous()?
            .apply_op3(&wt.contiguous()?, &bias.contiguous()?, Linear)
    } else {
        xs.matmul(wt)?.broadcast_add(bias)
    }
}

struct Linear;

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "vitcx-linear"
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
        let (x, wt, b) = (
            super::f32_slice(s1, l1, "vitcx linear", "input")?,
            super::f32_slice(s2, l2, "vitcx linear", "weight")?,
            super::f32_slice(s3, l3, "vitcx linear", "bias")?,
        );
        let (rows, inp) = l1.shape().dims2()?;
        let (inp2, out) = l2.shape().dims2()?;
        if inp != inp2 || b.len() != out {
            candle_core::bail!(
                "vitcx linear: ({rows}, {inp}) @ ({inp2}, {out}) + bias of {}",
                b.len()
            )
        }
        let mut dst = Vec::with_capacity(rows * out);
        for _ in 0..rows {
            dst.extend_from_slice(b);
        }
        if rows > 0 && out > 0 {
            let threads = candle_core::utils::get_num_threads();
            let parallelism = if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            };
            // SAFETY: dst is (rows, out) row-major, x (rows, inp) and wt (inp, out) row-major,
            // all of the lengths checked above.
            unsafe {
                gemm::gemm(
                    rows,
                    out,
                    inp,
                    dst.as_mut_ptr(),
                    1,
                    out as isize,
                    true,
                    x.as_ptr(),
                    1,
                    inp as isize,
                    wt.as_ptr(),
                    1,
                    out as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                )
            };
        }
        Ok((CpuStorage::F32(dst), Shape::from_dims(&[rows, out])))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        wt: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let gx = grad.matmul(&wt.t()?)?;
        let gw = xs.t()?.matmul(grad)?;
        let gb = super::sum_leading(grad)?;
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn seq(n: usize, k: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32) * k).sin()).collect()
    }

    #[test]
    fn matches_matmul_plus_bias() {
        let x = Tensor::from_vec(seq(37 * 19, 0.3), (37, 19), &Device::Cpu).unwrap();
        let w = Tensor::from_vec(seq(19 * 23, 0.7), (19, 23), &Device::Cpu).unwrap();
        let b = Tensor::from_vec(seq(23, 1.9), 23, &Device::Cpu).unwrap();
        let ours = linear(&x, &w, &b).unwrap();
        let theirs = x.matmul(&w).unwrap().broadcast_add(&b).unwrap();
        assert!(crate::model::kernels::max_abs_diff(&ours, &theirs) < 1e-5);
        // A transposed (non-contiguous) input is made contiguous first.
        let xt = Tensor::from_vec(seq(37 * 19, 0.3), (19, 37), &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        let theirs = xt.matmul(&w).unwrap().broadcast_add(&b).unwrap();
        assert!(crate::model::kernels::max_abs_diff(&linear(&xt, &w, &b).unwrap(), &theirs) < 1e-5);
    }

    #[test]
    fn gradients_match_the_composed_ops() {
        let x = Var::from_vec(seq(5 * 7, 0.3), (5, 7), &Device::Cpu).unwrap();
        let w = Var::from_vec(seq(7 * 3, 0.7), (7, 3), &Device::Cpu).unwrap();
        let b = Var::from_vec(seq(3, 1.9), 3, &Device::Cpu).unwrap();
        let m = Tensor::from_vec(seq(5 * 3, 2.3), (5, 3), &Device::Cpu).unwrap();
        let loss = |y: Tensor| (y * &m).unwrap().sum_all().unwrap().backward().unwrap();
        let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        let g1 = loss(linear(xt, wt, bt).unwrap());
        let g2 = loss(xt.matmul(wt).unwrap().broadcast_add(bt).unwrap());
        for v in [xt, wt, bt] {
            let d = crate::model::kernels::max_abs_diff(g1.get(v).unwrap(), g2.get(v).unwrap());
            assert!(d < 1e-5, "{d}");
        }
    }
}
