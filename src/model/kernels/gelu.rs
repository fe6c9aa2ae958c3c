//! `GELU(x + b)` in one pass over the MLP's widest activations, for the MLP's first layer.
//!
//! candle adds the bias in one pass and applies GELU in another, through a scalar `erf` call per
//! element, a large share of a ViT-B forward pass (docs/performance.md). This kernel fuses both and
//! computes `erf` as PyTorch's vectorised CPU kernel does ([`super::vecmath::erf`]), compiled
//! for AVX-512, for AVX2 + FMA and for baseline x86-64 and chosen at run time. Other dtypes and
//! devices fall back to candle's ops. The backward pass (training, Grad-CAM) is one sweep too:
//! `d/dz GELU(z) = Phi(z) + z phi(z)`, with the bias gradient summed on the way.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::vecmath::{erf, exp_nonpositive, gelu, gelu_tanh, quick_gelu};
pub(crate) use super::Activation;

/// `act(xs + bias)` with `xs` `(.., N)` and `bias` `(N)`, in one pass on the CPU. The backward
/// pass of GELU is one fused sweep too (training, Grad-CAM); the others' are composed from
/// candle ops (only Grad-CAM differentiates through them).
pub(crate) fn bias_act(xs: &Tensor, bias: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == DType::F32 && bias.dtype() == DType::F32 {
        xs.contiguous()?
            .apply_op2(&bias.contiguous()?, BiasAct(act))
    } else {
        composed_act(&xs.broadcast_add(bias)?, act)
    }
}

/// The activation from candle ops (off the CPU).
fn composed_act(z: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
    match act {
        Activation::Gelu => z.gelu_erf(),
        Activation::QuickGelu => z * candle_nn::ops::sigmoid(&(z * 1.702)?)?,
        Activation::GeluTanh => z.gelu(),
    }
}

struct BiasAct(Activation);

impl CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "vitcx-bias-act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = super::f32_slice(s1, l1, "vitcx bias-act", "input")?;
        let bias = super::f32_slice(s2, l2, "vitcx bias-act", "bias")?;
        let n = l1.shape().dims().last().copied().unwrap_or(1);
        if bias.len() != n || n == 0 {
            candle_core::bail!(
                "vitcx bias-act: bias has {} values for rows of {n}",
                bias.len()
            )
        }
        let mut dst = vec![0f32; src.len()];
        let rows_per_task = (8192 / n).max(1);
        let act = self.0;
        src.par_chunks(n * rows_per_task)
            .zip(dst.par_chunks_mut(n * rows_per_task))
            .for_each(|(s, d)| bias_act_rows(s, bias, d, act));
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if self.0 == Activation::Gelu {
            return gelu_bwd(xs, bias, grad_res);
        }
        let z = xs.broadcast_add(bias)?;
        let d = match self.0 {
            Activation::Gelu => unreachable!("handled above"),
            Activation::QuickGelu => {
                // s + 1.702 z s (1 - s), s = sigmoid(1.702 z)
                let s = candle_nn::ops::sigmoid(&(&z * 1.702)?)?;
                let one_minus = s.affine(-1.0, 1.0)?;
                (&s + ((&z * 1.702)? * (&s * one_minus)?)?)?
            }
            Activation::GeluTanh => {
                // 0.5 (1 + t) + 0.5 z (1 - t^2) c (1 + 3 * 0.044715 z^2)
                let c = (2.0 / std::f64::consts::PI).sqrt();
                let z2 = z.sqr()?;
                let t = ((&z + (&z * &z2)? * 0.044715)? * c)?.tanh()?;
                let dt =
                    (t.sqr()?.affine(-1.0, 1.0)? * (z2 * (3.0 * 0.044715 * c))?.affine(1.0, c)?)?;
                ((t.affine(0.5, 0.5))? + (&z * dt)? * 0.5)?
            }
        };
        let gx = (grad_res * d)?;
        let gb = super::sum_leading(&gx)?.reshape(bias.shape())?;
        Ok((Some(gx), Some(gb)))
    }
}

/// `dst = act(src + bias)` row by row, on the best instruction set.
fn bias_act_rows(src: &[f32], bias: &[f32], dst: &mut [f32], act: Activation) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            unsafe { bias_act_avx512(src, bias, dst, act) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            unsafe { bias_act_avx2(src, bias, dst, act) };
            return;
        }
    }
    bias_act_generic(src, bias, dst, act);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn bias_act_avx512(src: &[f32], bias: &[f32], dst: &mut [f32], act: Activation) {
    bias_act_generic(src, bias, dst, act)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn bias_act_avx2(src: &[f32], bias: &[f32], dst: &mut [f32], act: Activation) {
    bias_act_generic(src, bias, dst, act)
}

#[inline(always)]
fn bias_act_generic(src: &[f32], bias: &[f32], dst: &mut [f32], act: Activation) {
    let n = bias.len();
    for (s, d) in src.chunks_exact(n).zip(dst.chunks_exact_mut(n)) {
        match act {
            Activation::Gelu => {
                for ((o, &x), &b) in d.iter_mut().zip(s).zip(bias) {
                    *o = gelu(x + b);
                }
            }
            Activation::QuickGelu => {
                for ((o, &x), &b) in d.iter_mut().zip(s).zip(bias) {
                    *o = quick_gelu(x + b);
                }
            }
            Activation::GeluTanh => {
                for ((o, &x), &b) in d.iter_mut().zip(s).zip(bias) {
                    *o = gelu_tanh(x + b);
                }
            }
        }
    }
}

/// `rows = act(rows + bias)` in place (rows of `bias.len()`; without a bias, `act(rows)`), on
/// the best instruction set: the packed products' epilogue, applied to a block of rows while it
/// is still in cache. The same arithmetic as [`bias_act`]'s kernel.
pub(crate) fn bias_act_in_place(rows: &mut [f32], bias: Option<&[f32]>, act: Activation) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            unsafe { in_place_avx512(rows, bias, act) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            unsafe { in_place_avx2(rows, bias, act) };
            return;
        }
    }
    in_place_generic(rows, bias, act);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn in_place_avx512(rows: &mut [f32], bias: Option<&[f32]>, act: Activation) {
    in_place_generic(rows, bias, act)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn in_place_avx2(rows: &mut [f32], bias: Option<&[f32]>, act: Activation) {
    in_place_generic(rows, bias, act)
}

#[inline(always)]
fn in_place_generic(rows: &mut [f32], bias: Option<&[f32]>, act: Activation) {
    #[inline(always)]
    fn apply(rows: &mut [f32], bias: Option<&[f32]>, f: impl Fn(f32) -> f32) {
        match bias {
            Some(b) if !b.is_empty() => {
                for row in rows.chunks_exact_mut(b.len()) {
                    for (v, &b) in row.iter_mut().zip(b) {
                        *v = f(*v + b);
                    }
                }
            }
            _ => rows.iter_mut().for_each(|v| *v = f(*v)),
        }
    }
    match act {
        Activation::Gelu => apply(rows, bias, gelu),
        Activation::QuickGelu => apply(rows, bias, quick_gelu),
        Activation::GeluTanh => apply(rows, bias, gelu_tanh),
    }
}

/// The backward pass of `GELU(xs + bias)`: one fused sweep on the CPU ([`BiasGeluGrad`]).
fn gelu_bwd(
    xs: &Tensor,
    bias: &Tensor,
    grad_res: &Tensor,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    let (gx, gb) = if xs.device().is_cpu() && grad_res.dtype() == DType::F32 {
        let n = bias.elem_count();
        let rows = xs.elem_count() / n.max(1);
        let both = xs.contiguous()?.apply_op3_no_bwd(
            &bias.contiguous()?,
            &grad_res.contiguous()?,
            &BiasGeluGrad,
        )?;
        (
            both.narrow(0, 0, rows)?.reshape(xs.shape())?,
            both.get(rows)?.reshape(bias.shape())?,
        )
    } else {
        composed_grad(xs, bias, grad_res)?
    };
    Ok((Some(gx), Some(gb)))
}

/// `d/dz GELU(z) = Phi(z) + z phi(z)` from candle ops: the gradients with respect to `xs` and
/// `bias` (off the CPU, and the tests' reference).
fn composed_grad(
    xs: &Tensor,
    bias: &Tensor,
    grad_res: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let z = xs.broadcast_add(bias)?;
    let cdf = ((z.affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?.erf()? + 1.0)? * 0.5)?;
    let pdf = (z.sqr()? * -0.5)?
        .exp()?
        .affine(1.0 / (2.0 * std::f64::consts::PI).sqrt(), 0.0)?;
    let gx = (grad_res * (cdf + (z * pdf)?)?)?;
    let gb = super::sum_leading(&gx)?.reshape(bias.shape())?;
    Ok((gx, gb))
}

/// The backward pass in one sweep: `(xs, bias, output gradient)` -> `(rows + 1, N)`, the input
/// gradient's rows then the bias gradient (its column sums). Composed from candle ops it was
/// ten sweeps over the MLP's widest activations.
struct BiasGeluGrad;

impl CustomOp3 for BiasGeluGrad {
    fn name(&self) -> &'static str {
        "vitcx-bias-gelu-grad"
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
        super::row_grad_cpu(
            "vitcx bias-gelu gradient",
            "bias",
            (s1, l1),
            (s2, l2),
            (s3, l3),
            1,
            bias_gelu_grad_rows,
        )
    }
}

/// `gx = g * GELU'(x + b)` row by row and `gb += gx`, on the best instruction set.
fn bias_gelu_grad_rows(src: &[f32], bias: &[f32], g: &[f32], gx: &mut [f32], gb: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            unsafe { bias_gelu_grad_avx512(src, bias, g, gx, gb) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            unsafe { bias_gelu_grad_avx2(src, bias, g, gx, gb) };
            return;
        }
    }
    bias_gelu_grad_generic(src, bias, g, gx, gb);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn bias_gelu_grad_avx512(
    src: &[f32],
    bias: &[f32],
    g: &[f32],
    gx: &mut [f32],
    gb: &mut [f32],
) {
    bias_gelu_grad_generic(src, bias, g, gx, gb)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn bias_gelu_grad_avx2(
    src: &[f32],
    bias: &[f32],
    g: &[f32],
    gx: &mut [f32],
    gb: &mut [f32],
) {
    bias_gelu_grad_generic(src, bias, g, gx, gb)
}

#[inline(always)]
fn bias_gelu_grad_generic(src: &[f32], bias: &[f32], g: &[f32], gx: &mut [f32], gb: &mut [f32]) {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let n = bias.len();
    for ((s, gr), o) in src
        .chunks_exact(n)
        .zip(g.chunks_exact(n))
        .zip(gx.chunks_exact_mut(n))
    {
        for ((((o, &x), &b), &gv), acc) in o.iter_mut().zip(s).zip(bias).zip(gr).zip(gb.iter_mut())
        {
            let z = x + b;
            let cdf = 0.5 * (1.0 + erf(z * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = exp_nonpositive(-0.5 * z * z) * INV_SQRT_2PI;
            *o = gv * (cdf + z * pdf);
            *acc += *o;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn seq(n: usize, k: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32) * k).sin() * 4.0).collect()
    }

    #[test]
    fn matches_candle_add_then_gelu_erf() {
        let xs = Tensor::from_vec(seq(3 * 5 * 37, 0.37), (3, 5, 37), &Device::Cpu).unwrap();
        let b = Tensor::from_vec(seq(37, 1.1), 37, &Device::Cpu).unwrap();
        let ours = bias_act(&xs, &b, Activation::Gelu).unwrap();
        let theirs = xs.broadcast_add(&b).unwrap().gelu_erf().unwrap();
        let d = (&ours - &theirs).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
        // Every instruction-set path gives the numbers of the generic one.
        let src = xs.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let bias = b.to_vec1::<f32>().unwrap();
        let (mut a, mut g) = (vec![0f32; src.len()], vec![0f32; src.len()]);
        bias_act_rows(&src, &bias, &mut a, Activation::Gelu);
        bias_act_generic(&src, &bias, &mut g, Activation::Gelu);
        assert_eq!(a, g);
    }

    #[test]
    fn gradients_match_the_composed_ops() {
        let x = Var::from_vec(seq(4 * 9, 0.7), (4, 9), &Device::Cpu).unwrap();
        let b = Var::from_vec(seq(9, 1.3), 9, &Device::Cpu).unwrap();
        let w = Tensor::from_vec(seq(4 * 9, 2.1), (4, 9), &Device::Cpu).unwrap();
        let loss = |y: Tensor| (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g1 = loss(bias_act(x.as_tensor(), b.as_tensor(), Activation::Gelu).unwrap());
        let g2 = loss(
            x.as_tensor()
                .broadcast_add(b.as_tensor())
                .unwrap()
                .gelu_erf()
                .unwrap(),
        );
        for v in [x.as_tensor(), b.as_tensor()] {
            let d = crate::model::kernels::max_abs_diff(g1.get(v).unwrap(), g2.get(v).unwrap());
            assert!(d < 1e-5, "{d}");
        }
    }

    #[test]
    fn fused_gradient_matches_its_composed_form_across_blocks() {
        // 300 rows of 130: several parallel blocks, so the bias gradient adds partial sums.
        let xs = Tensor::from_vec(seq(300 * 130, 0.37), (3, 100, 130), &Device::Cpu).unwrap();
        let b = Tensor::from_vec(seq(130, 1.1), 130, &Device::Cpu).unwrap();
        let g = Tensor::from_vec(seq(300 * 130, 0.77), (3, 100, 130), &Device::Cpu).unwrap();
        let both = xs.apply_op3_no_bwd(&b, &g, &BiasGeluGrad).unwrap();
        assert_eq!(both.dims(), &[301, 130]);
        let (gx, gb) = composed_grad(&xs, &b, &g).unwrap();
        let ours_gx = both.narrow(0, 0, 300).unwrap().reshape(gx.shape()).unwrap();
        assert!(crate::model::kernels::max_abs_diff(&ours_gx, &gx) < 1e-5);
        let d = crate::model::kernels::max_abs_diff(&both.get(300).unwrap(), &gb);
        assert!(d < 1e-3, "{d}");
        // The sums are added in block order: the same inputs give the same bits.
        let again = xs.apply_op3_no_bwd(&b, &g, &BiasGeluGrad).unwrap();
        assert_eq!(crate::model::kernels::max_abs_diff(&both, &again), 0.0);
    }

    #[test]
    fn bias_act_matches_the_composed_ops_and_their_gradients() {
        let dev = Device::Cpu;
        let xs = Tensor::from_vec(seq(6 * 40, 0.37), (6, 40), &dev).unwrap();
        let b = Tensor::from_vec(seq(40, 0.11), 40, &dev).unwrap();
        for act in [Activation::QuickGelu, Activation::GeluTanh] {
            let ours = bias_act(&xs, &b, act).unwrap();
            let theirs = composed_act(&xs.broadcast_add(&b).unwrap(), act).unwrap();
            let d = (ours - &theirs).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 2e-6, "{act:?}");
            // Gradients: the custom op's bwd against candle's autograd of the composed ops.
            let (vx, vb) = (
                Var::from_tensor(&xs).unwrap(),
                Var::from_tensor(&b).unwrap(),
            );
            let g1 = bias_act(vx.as_tensor(), vb.as_tensor(), act)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let z = vx.as_tensor().broadcast_add(vb.as_tensor()).unwrap();
            let g2 = composed_act(&z, act)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&vx, &vb] {
                let a = g1.get(v.as_tensor()).unwrap();
                let c = g2.get(v.as_tensor()).unwrap();
                let d = (a - c).unwrap().abs().unwrap().max_all().unwrap();
                assert!(d.to_scalar::<f32>().unwrap() < 1e-4, "{act:?} gradient");
            }
        }
    }
}
