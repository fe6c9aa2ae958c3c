//! Multi-head self-attention from the fused qkv projection in one op: for each image and head,
//! `softmax(q k^T * scale) v`, with `q`, `k`, `v` read in place from the `(B, T, 3 * D)`
//! projection (strided matrix products, no permuted copies) and the `T x T` scores in a
//! per-task buffer that never becomes a tensor, written straight into `(B, T, D)`.
//!
//! Composed from candle ops, attention costs a permuted copy of q, k and v, a zeroed `(B, H, T, T)`
//! score tensor, a second one for the softmax and a transposed copy of the output; with a small
//! width (the demo model: 14x14 tokens, width 64) that was most of a forward pass (profiles in
//! docs/performance.md). The matrix products use
//! the `gemm` crate candle itself uses. The backward pass (training, Grad-CAM) is fused the same
//! way ([`AttentionGrad`]). An additive bias on the scores (relative position bias, Swin's shift
//! mask) is added to each head's `T x T` buffer before the softmax, in both passes. Other dtypes
//! and devices take the composed path.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

/// `(B, T, 3 * D)` fused projection (q, k, v; heads inside each) -> `(B, T, D)`.
pub(crate) fn self_attention(
    qkv: &Tensor,
    heads: usize,
    scale: f64,
) -> candle_core::Result<Tensor> {
    if qkv.device().is_cpu() && qkv.dtype() == DType::F32 {
        qkv.contiguous()?.apply_op1(FusedAttention { heads, scale })
    } else {
        Ok(composed(qkv, heads, scale)?.0)
    }
}

/// The same from candle ops, keeping the attention probabilities `(B, H, T, T)` (for Attention
/// Rollout, and the path off the CPU): `q` is scaled before the product, as timm does.
pub(crate) fn composed(
    qkv: &Tensor,
    heads: usize,
    scale: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (b, t, d3) = qkv.dims3()?;
    let (q, k, v) = split(qkv, heads)?;
    let attn = super::softmax::softmax_last_dim(&(q * scale)?.matmul(&k.t()?)?)?;
    let out = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d3 / 3))?;
    Ok((out, attn))
}

/// Self-attention with an additive bias on the scores before the softmax: relative position
/// bias (BEiT, Swin) and the shifted-window mask (Swin). `bias` is `(G, H, T, T)` with `B` a
/// multiple of `G`; image `b` takes `bias[b % G]` (Swin's batch is images x windows, the
/// window index fastest; BEiT has `G = 1`). The bias is a constant: no gradient flows to it.
pub(crate) fn self_attention_biased(
    qkv: &Tensor,
    heads: usize,
    scale: f64,
    bias: &Tensor,
) -> candle_core::Result<Tensor> {
    let on_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if on_cpu(qkv) && on_cpu(bias) {
        check_bias(qkv, heads, bias)?;
        qkv.contiguous()?.apply_op2(
            &bias.detach().contiguous()?,
            FusedAttention { heads, scale },
        )
    } else {
        Ok(composed_biased(qkv, heads, scale, bias)?.0)
    }
}

/// Fails unless `bias` is `(G, H, T, T)` for `qkv` `(B, T, 3D)` with `B` a multiple of `G`.
fn check_bias(qkv: &Tensor, heads: usize, bias: &Tensor) -> candle_core::Result<(usize, usize)> {
    let (b, t, _) = qkv.dims3()?;
    let (g, bh, bt, bt2) = bias.dims4()?;
    if g == 0 || b % g != 0 || bh != heads || bt != t || bt2 != t {
        candle_core::bail!(
            "vitcx attention: bias {:?} does not fit {b} images of {t} tokens and {heads} heads",
            bias.dims()
        )
    }
    Ok((g, t))
}

/// [`self_attention_biased`] from candle ops, keeping the probabilities `(B, H, T, T)`.
pub(crate) fn composed_biased(
    qkv: &Tensor,
    heads: usize,
    scale: f64,
    bias: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (b, t, d3) = qkv.dims3()?;
    let (g, _) = check_bias(qkv, heads, bias)?;
    let (q, k, v) = split(qkv, heads)?;
    let scores = (q * scale)?.matmul(&k.t()?)?;
    let scores = scores
        .reshape((b / g, g, heads, t, t))?
        .broadcast_add(&bias.unsqueeze(0)?)?
        .reshape((b, heads, t, t))?;
    let attn = super::softmax::softmax_last_dim(&scores)?;
    let out = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d3 / 3))?;
    Ok((out, attn))
}

/// `(B, T, 3 * D)` -> q, k, v as contiguous `(B, H, T, hd)`.
fn split(qkv: &Tensor, heads: usize) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (b, t, d3) = qkv.dims3()?;
    let hd = d3 / 3 / heads;
    let p = qkv
        .reshape((b, t, 3, heads, hd))?
        .permute((2, 0, 3, 1, 4))?;
    Ok((
        p.get(0)?.contiguous()?,
        p.get(1)?.contiguous()?,
        p.get(2)?.contiguous()?,
    ))
}

struct FusedAttention {
    heads: usize,
    scale: f64,
}

impl FusedAttention {
    /// The forward pass on the CPU, with `bias` `(G, H, T, T)` when given.
    fn cpu(
        &self,
        (storage, layout): (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = super::f32_slice(storage, layout, "vitcx attention", "input")?;
        let (b, t, d3) = layout.shape().dims3()?;
        let h = self.heads;
        if h == 0 || d3 % (3 * h) != 0 {
            candle_core::bail!("vitcx attention: width {d3} is not 3 x {h} heads x head size")
        }
        let bias = bias_groups(bias, (b, h, t))?;
        let d = d3 / 3;
        let hd = d / h;
        let mut out = vec![0f32; b * t * d];
        let scale = self.scale as f32;
        // One task per image: its heads write disjoint columns of its (T, D) output rows.
        out.par_chunks_mut(t * d)
            .zip(src.par_chunks(t * d3))
            .enumerate()
            .for_each_init(
                || (vec![0f32; t * t], vec![0f32; t]),
                |(scores, inv), (image, (o, x))| {
                    for head in 0..h {
                        let add = bias.map(|(all, g)| head_bias(all, g, image, head, h, t));
                        // SAFETY: every pointer/stride pair below stays inside `x` (T rows of
                        // 3D), `scores` (T x T) or `o` (T rows of D) as the shapes checked above
                        // give; `o`'s columns of this head are written by this task only.
                        unsafe { attend(x, o, (scores, add), inv, (t, d, hd), head, scale) };
                    }
                },
            );
        Ok((CpuStorage::F32(out), Shape::from_dims(&[b, t, d])))
    }
}

/// The bias values and their group count `G`, checked against `b` images, `h` heads and `t`
/// tokens.
fn bias_groups<'a>(
    bias: Option<(&'a CpuStorage, &'a Layout)>,
    (b, h, t): (usize, usize, usize),
) -> candle_core::Result<Option<(&'a [f32], usize)>> {
    let Some((s, l)) = bias else { return Ok(None) };
    let all = super::f32_slice(s, l, "vitcx attention", "bias")?;
    let (g, bh, bt, bt2) = l.shape().dims4()?;
    if g == 0 || b % g != 0 || bh != h || bt != t || bt2 != t {
        candle_core::bail!(
            "vitcx attention: bias {:?} does not fit {b} images of {t} tokens and {h} heads",
            l.shape().dims()
        )
    }
    Ok(Some((all, g)))
}

/// The `T x T` bias of `head` for `image`: group `image % G`.
fn head_bias(all: &[f32], g: usize, image: usize, head: usize, h: usize, t: usize) -> &[f32] {
    let at = ((image % g) * h + head) * t * t;
    &all[at..at + t * t]
}

impl CustomOp1 for FusedAttention {
    fn name(&self) -> &'static str {
        "vitcx-self-attention"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu((storage, layout), None)
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = AttentionGrad {
            heads: self.heads,
            scale: self.scale,
        };
        if qkv.device().is_cpu() && qkv.dtype() == DType::F32 {
            Ok(Some(
                qkv.contiguous()?
                    .apply_op2_no_bwd(&grad_res.contiguous()?, &grad)?,
            ))
        } else {
            Ok(Some(grad.composed(qkv, grad_res, None)?))
        }
    }
}

/// The biased form: `(qkv, bias)`; the gradient reaches `qkv` only.
impl CustomOp2 for FusedAttention {
    fn name(&self) -> &'static str {
        "vitcx-self-attention-biased"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu((s1, l1), Some((s2, l2)))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = AttentionGrad {
            heads: self.heads,
            scale: self.scale,
        };
        let on_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        let g = if on_cpu(qkv) && on_cpu(bias) {
            qkv.contiguous()?.apply_op3_no_bwd(
                &grad_res.contiguous()?,
                &bias.contiguous()?,
                &grad,
            )?
        } else {
            grad.composed(qkv, grad_res, Some(bias))?
        };
        Ok((Some(g), None))
    }
}

/// The gradient of [`FusedAttention`] with respect to its `(B, T, 3D)` input, given the
/// gradient of its `(B, T, D)` output. Training spends most of its attention time here: composed
/// from candle ops it materialises half a dozen `(B, H, T, T)` tensors (40 MB each for a batch
/// of 64 demo-model images); fused, each image and head recomputes its probabilities in a
/// `T x T` buffer that stays in cache, as the forward pass does.
struct AttentionGrad {
    heads: usize,
    scale: f64,
}

impl AttentionGrad {
    /// The same from candle ops (off the CPU, and the tests' reference).
    fn composed(
        &self,
        qkv: &Tensor,
        grad_res: &Tensor,
        bias: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, d3) = qkv.dims3()?;
        let h = self.heads;
        let hd = d3 / 3 / h;
        let (q, k, v) = split(qkv, h)?;
        let mut s = (q.matmul(&k.t()?)? * self.scale)?;
        if let Some(bias) = bias {
            let g = bias.dim(0)?;
            s = s
                .reshape((b / g, g, h, t, t))?
                .broadcast_add(&bias.unsqueeze(0)?)?
                .reshape((b, h, t, t))?;
        }
        let a = super::softmax::softmax_last_dim(&s)?;
        let go = grad_res
            .reshape((b, t, h, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let dv = a.t()?.matmul(&go)?;
        let da = go.matmul(&v.t()?)?;
        let ds = (&a * da.broadcast_sub(&(&da * &a)?.sum_keepdim(D::Minus1)?)?)?;
        let dq = (ds.matmul(&k)? * self.scale)?;
        let dk = (ds.t()?.matmul(&q)? * self.scale)?;
        Tensor::stack(&[dq, dk, dv], 0)? // (3, B, H, T, hd)
            .permute((1, 3, 0, 2, 4))?
            .reshape((b, t, d3))
    }
}

impl AttentionGrad {
    /// The gradient on the CPU, with `bias` `(G, H, T, T)` when the forward pass had one.
    fn cpu(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = "vitcx attention gradient";
        let src = super::f32_slice(s1, l1, op, "input")?;
        let go = super::f32_slice(s2, l2, op, "output gradient")?;
        let (b, t, d3) = l1.shape().dims3()?;
        let h = self.heads;
        if h == 0 || d3 % (3 * h) != 0 {
            candle_core::bail!("{op}: width {d3} is not 3 x {h} heads x head size")
        }
        let d = d3 / 3;
        if l2.shape().dims() != [b, t, d] {
            candle_core::bail!(
                "{op}: output gradient {:?}, expected {:?}",
                l2.shape().dims(),
                [b, t, d]
            )
        }
        let bias = bias_groups(bias, (b, h, t))?;
        let hd = d / h;
        let mut grad = vec![0f32; b * t * d3];
        let scale = self.scale as f32;
        grad.par_chunks_mut(t * d3)
            .zip(src.par_chunks(t * d3))
            .zip(go.par_chunks(t * d))
            .enumerate()
            .for_each_init(
                || (vec![0f32; t * t], vec![0f32; t * t], vec![0f32; t]),
                |(p, dp, inv), (image, ((g, x), go))| {
                    for head in 0..h {
                        let add = bias.map(|(all, gr)| head_bias(all, gr, image, head, h, t));
                        // SAFETY: as in `attend`; `g` has the layout of `x` and `go` of the
                        // forward output, and this task alone writes `g`.
                        unsafe {
                            attend_grad(x, go, g, (p, dp, inv), add, (t, d, hd), head, scale)
                        };
                    }
                },
            );
        Ok((CpuStorage::F32(grad), Shape::from_dims(&[b, t, d3])))
    }
}

impl CustomOp2 for AttentionGrad {
    fn name(&self) -> &'static str {
        "vitcx-self-attention-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu((s1, l1), (s2, l2), None)
    }
}

/// The biased form: `(qkv, output gradient, bias)`.
impl CustomOp3 for AttentionGrad {
    fn name(&self) -> &'static str {
        "vitcx-self-attention-biased-grad"
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
        self.cpu((s1, l1), (s2, l2), Some((s3, l3)))
    }
}

/// A matrix read in place: element `(i, j)` at `ptr + i * rs + j * cs`. q, k and v are such
/// views into the fused projection (rows 3D apart), and a transpose is the same view with the
/// strides swapped.
#[derive(Clone, Copy)]
struct Strided {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

impl Strided {
    fn new(ptr: *const f32, rs: isize, cs: isize) -> Self {
        Strided { ptr, rs, cs }
    }
}

/// `dst = scale * a @ b` for `(m, n, k)` = `a` `m x k`, `b` `k x n`; `dst` is `m x n` with
/// rows `dst_rs` apart, overwritten. Single-threaded: the callers run one task per image.
///
/// # Safety
/// Every element the shapes and strides address must lie inside its buffer, and `dst` must not
/// overlap `a` or `b`.
unsafe fn product(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut f32, isize),
    a: Strided,
    b: Strided,
    scale: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs,
        false,
        a.ptr,
        a.cs,
        a.rs,
        b.ptr,
        b.cs,
        b.rs,
        0.0,
        scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// `scores += bias` (the head's `T x T` bias), when there is one.
fn add_bias(scores: &mut [f32], bias: Option<&[f32]>) {
    if let Some(bias) = bias {
        for (s, b) in scores.iter_mut().zip(bias) {
            *s += b;
        }
    }
}

/// One head of one image: `o[:, head] = softmax(q k^T * scale + bias) v`, reading q, k, v from
/// the `(T, 3D)` rows of `x`. The softmax is normalised after the product with `v`: each output
/// row (hd values) is divided by its row sum instead of each score row (T values).
///
/// # Safety
/// `x` must hold `T * 3D` values, `o` `T * D`, `scores` `T * T`, `inv` `T`, with
/// `D = heads * hd` and `head < D / hd`.
unsafe fn attend(
    x: &[f32],
    o: &mut [f32],
    (scores, bias): (&mut [f32], Option<&[f32]>),
    inv: &mut [f32],
    (t, d, hd): (usize, usize, usize),
    head: usize,
    scale: f32,
) {
    let d3 = (3 * d) as isize;
    let q = x.as_ptr().add(head * hd);
    let k = x.as_ptr().add(d + head * hd);
    let v = x.as_ptr().add(2 * d + head * hd);
    // scores (T x T) = scale * q (T x hd, rows 3D apart) @ k^T (hd x T: k's rows as columns).
    product(
        (t, t, hd),
        (scores.as_mut_ptr(), t as isize),
        Strided::new(q, d3, 1),
        Strided::new(k, 1, d3),
        scale,
    );
    add_bias(scores, bias);
    super::softmax::exp_rows(scores, t, inv);
    // o (T x hd, rows D apart) = scores (T x T) @ v (T x hd, rows 3D apart).
    product(
        (t, hd, t),
        (o.as_mut_ptr().add(head * hd), d as isize),
        Strided::new(scores.as_ptr(), t as isize, 1),
        Strided::new(v, d3, 1),
        1.0,
    );
    for (row, &s) in o.chunks_exact_mut(d).zip(inv.iter()) {
        for v in &mut row[head * hd..(head + 1) * hd] {
            *v *= s;
        }
    }
}

/// The gradient of one head of one image (see [`attend`]): with `P = softmax(q k^T * scale)`
/// and `dO` the output gradient, `dV = P^T dO`, `dP = dO V^T`, `dS = P * (dP - rowsum(P * dP))`,
/// `dQ = scale * dS K` and `dK = scale * dS^T Q`, written into the head's q, k and v columns
/// of `g` (laid out like `x`).
///
/// # Safety
/// `x` and `g` must hold `T * 3D` values, `go` `T * D`, `p` and `dp` `T * T`, `inv` `T`, with
/// `D = heads * hd` and `head < D / hd`.
#[allow(clippy::too_many_arguments)]
unsafe fn attend_grad(
    x: &[f32],
    go: &[f32],
    g: &mut [f32],
    (p, dp, inv): (&mut [f32], &mut [f32], &mut [f32]),
    bias: Option<&[f32]>,
    (t, d, hd): (usize, usize, usize),
    head: usize,
    scale: f32,
) {
    let d3 = (3 * d) as isize;
    let ti = t as isize;
    let q = x.as_ptr().add(head * hd);
    let k = x.as_ptr().add(d + head * hd);
    let v = x.as_ptr().add(2 * d + head * hd);
    let dout = go.as_ptr().add(head * hd);
    let gq = g.as_mut_ptr().add(head * hd);
    let gk = g.as_mut_ptr().add(d + head * hd);
    let gv = g.as_mut_ptr().add(2 * d + head * hd);
    // P (T x T) = softmax(scale * q k^T), recomputed.
    product(
        (t, t, hd),
        (p.as_mut_ptr(), ti),
        Strided::new(q, d3, 1),
        Strided::new(k, 1, d3),
        scale,
    );
    add_bias(p, bias);
    super::softmax::exp_rows(p, t, inv);
    for (row, &s) in p.chunks_exact_mut(t).zip(inv.iter()) {
        for e in row {
            *e *= s;
        }
    }
    // dV (T x hd, rows 3D apart) = P^T (element (i, j) at p[j * T + i]) @ dO (rows D apart).
    product(
        (t, hd, t),
        (gv, d3),
        Strided::new(p.as_ptr(), 1, ti),
        Strided::new(dout, d as isize, 1),
        1.0,
    );
    // dP (T x T) = dO (T x hd) @ V^T (element (c, j) at v[j * 3D + c]).
    product(
        (t, t, hd),
        (dp.as_mut_ptr(), ti),
        Strided::new(dout, d as isize, 1),
        Strided::new(v, 1, d3),
        1.0,
    );
    // dS = P * (dP - rowsum(P * dP)), in place of dP.
    for (prow, drow) in p.chunks_exact(t).zip(dp.chunks_exact_mut(t)) {
        let dot: f32 = prow.iter().zip(drow.iter()).map(|(a, b)| a * b).sum();
        for (e, &a) in drow.iter_mut().zip(prow) {
            *e = a * (*e - dot);
        }
    }
    // dQ = scale * dS (T x T) @ K (rows 3D apart).
    product(
        (t, hd, t),
        (gq, d3),
        Strided::new(dp.as_ptr(), ti, 1),
        Strided::new(k, d3, 1),
        scale,
    );
    // dK = scale * dS^T @ Q.
    product(
        (t, hd, t),
        (gk, d3),
        Strided::new(dp.as_ptr(), 1, ti),
        Strided::new(q, d3, 1),
        scale,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn seq(n: usize, k: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32) * k).sin() * 2.0).collect()
    }

    /// An independent reference: permuted copies, scores, softmax, product, transpose.
    fn reference(qkv: &Tensor, heads: usize, scale: f64) -> Tensor {
        let (b, t, d3) = qkv.dims3().unwrap();
        let (q, k, v) = split(qkv, heads).unwrap();
        let s = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let e = s
            .broadcast_sub(&s.max_keepdim(D::Minus1).unwrap())
            .unwrap()
            .exp()
            .unwrap();
        let a = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        a.matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, d3 / 3))
            .unwrap()
    }

    #[test]
    fn matches_the_composed_ops() {
        // 2 images, 7 tokens, 3 heads of 4.
        let qkv = Tensor::from_vec(seq(2 * 7 * 36, 0.31), (2, 7, 36), &Device::Cpu).unwrap();
        let ours = self_attention(&qkv, 3, 0.5).unwrap();
        assert_eq!(ours.dims(), &[2, 7, 12]);
        let want = reference(&qkv, 3, 0.5);
        let (kept, attn) = composed(&qkv, 3, 0.5).unwrap();
        assert!(crate::model::kernels::max_abs_diff(&kept, &want) < 1e-6);
        assert_eq!(attn.dims(), &[2, 3, 7, 7]);
        let d = (&ours - &want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
    }

    #[test]
    fn bias_is_added_per_window_group() {
        // 4 "windows" of 5 tokens, 2 heads of 3, bias in 2 groups: windows 0 and 2 take group 0.
        let dev = &Device::Cpu;
        let qkv = Tensor::from_vec(seq(4 * 5 * 18, 0.23), (4, 5, 18), dev).unwrap();
        let zero = Tensor::zeros((1, 2, 5, 5), DType::F32, dev).unwrap();
        let plain = self_attention(&qkv, 2, 0.6).unwrap();
        let with_zero = self_attention_biased(&qkv, 2, 0.6, &zero).unwrap();
        assert!(crate::model::kernels::max_abs_diff(&plain, &with_zero) < 1e-6);
        // A -inf-like bias on every key but the first makes each query copy the first value.
        let mut m = vec![0f32; 2 * 2 * 5 * 5];
        for (i, x) in m.iter_mut().enumerate().skip(2 * 5 * 5) {
            if i % 5 != 0 {
                *x = -1e9;
            }
        }
        let bias = Tensor::from_vec(m, (2, 2, 5, 5), dev).unwrap();
        let (out, attn) = composed_biased(&qkv, 2, 0.6, &bias).unwrap();
        assert_eq!(attn.dims(), &[4, 2, 5, 5]);
        let first_v = qkv.narrow(2, 12, 6).unwrap().narrow(1, 0, 1).unwrap();
        for w in [1, 3] {
            let got = out.get(w).unwrap();
            let want = first_v.get(w).unwrap().broadcast_as((5, 6)).unwrap();
            assert!(crate::model::kernels::max_abs_diff(&got, &want) < 1e-5);
        }
        for w in [0, 2] {
            let got = out.narrow(0, w, 1).unwrap();
            let want = plain.narrow(0, w, 1).unwrap();
            assert!(crate::model::kernels::max_abs_diff(&got, &want) < 1e-6);
        }
        assert!(self_attention_biased(&qkv, 2, 0.6, &zero.narrow(3, 0, 4).unwrap()).is_err());
    }

    #[test]
    fn fused_bias_matches_the_composed_ops_forward_and_backward() {
        // 4 images of 9 tokens, 3 heads of 4, a bias in 2 groups (image b takes b % 2).
        let dev = &Device::Cpu;
        let x = Var::from_vec(seq(4 * 9 * 36, 0.29), (4, 9, 36), dev).unwrap();
        let bias = Tensor::from_vec(seq(2 * 3 * 9 * 9, 0.83), (2, 3, 9, 9), dev).unwrap();
        let fused = self_attention_biased(x.as_tensor(), 3, 0.45, &bias).unwrap();
        let (composed, _) = composed_biased(x.as_tensor(), 3, 0.45, &bias).unwrap();
        let d = crate::model::kernels::max_abs_diff(&fused, &composed);
        assert!(d < 1e-6, "forward {d}");
        // The bias matters: without it the output differs.
        let plain = self_attention(x.as_tensor(), 3, 0.45).unwrap();
        assert!(crate::model::kernels::max_abs_diff(&fused, &plain) > 1e-2);
        // Gradients through the fused op (its fused backward) and the composed ops agree.
        let w = Tensor::from_vec(seq(4 * 9 * 12, 1.9), (4, 9, 12), dev).unwrap();
        let loss = |y: Tensor| (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g1 = loss(fused);
        let g2 = loss(composed);
        let v = x.as_tensor();
        let d = crate::model::kernels::max_abs_diff(g1.get(v).unwrap(), g2.get(v).unwrap());
        assert!(d < 1e-5, "gradient {d}");
        // The fused gradient kernel against its own composed form, bias included.
        let go = Tensor::from_vec(seq(4 * 9 * 12, 0.61), (4, 9, 12), dev).unwrap();
        let op = AttentionGrad {
            heads: 3,
            scale: 0.45,
        };
        let fused = v.apply_op3_no_bwd(&go, &bias, &op).unwrap();
        let want = op.composed(v, &go, Some(&bias)).unwrap();
        let d = crate::model::kernels::max_abs_diff(&fused, &want);
        assert!(d < 1e-5, "gradient kernel {d}");
        // A bias of the wrong group count or size is an error, not a read out of bounds.
        let three = Tensor::zeros((3, 3, 9, 9), DType::F32, dev).unwrap();
        assert!(self_attention_biased(v, 3, 0.45, &three).is_err());
        let small = Tensor::zeros((1, 3, 8, 8), DType::F32, dev).unwrap();
        assert!(v.apply_op3_no_bwd(&go, &small, &op).is_err());
    }

    #[test]
    fn gradient_matches_the_composed_ops() {
        let x = Var::from_vec(seq(2 * 5 * 24, 0.47), (2, 5, 24), &Device::Cpu).unwrap();
        let w = Tensor::from_vec(seq(2 * 5 * 8, 1.7), (2, 5, 8), &Device::Cpu).unwrap();
        let loss = |y: Tensor| (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g1 = loss(self_attention(x.as_tensor(), 2, 0.7).unwrap());
        let g2 = loss(reference(x.as_tensor(), 2, 0.7));
        let v = x.as_tensor();
        let d = crate::model::kernels::max_abs_diff(g1.get(v).unwrap(), g2.get(v).unwrap());
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn fused_gradient_matches_its_composed_form() {
        // 3 images, 17 tokens, 3 heads of 8: several gemm tiles and a ragged edge.
        let qkv = Tensor::from_vec(seq(3 * 17 * 72, 0.13), (3, 17, 72), &Device::Cpu).unwrap();
        let go = Tensor::from_vec(seq(3 * 17 * 24, 0.71), (3, 17, 24), &Device::Cpu).unwrap();
        let op = AttentionGrad {
            heads: 3,
            scale: 0.35,
        };
        let fused = qkv.apply_op2_no_bwd(&go, &op).unwrap();
        let want = op.composed(&qkv, &go, None).unwrap();
        assert_eq!(fused.dims(), &[3, 17, 72]);
        let d = crate::model::kernels::max_abs_diff(&fused, &want);
        assert!(d < 1e-5, "{d}");
        // A wrongly shaped output gradient is an error, not a read out of bounds.
        let bad = Tensor::zeros((3, 17, 23), DType::F32, &Device::Cpu).unwrap();
        assert!(qkv.apply_op2_no_bwd(&bad, &op).is_err());
    }
}
