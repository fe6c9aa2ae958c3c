//! vitcx's own CPU kernels (fused attention, bias-GELU, LayerNorm, linear, softmax, the packed
//! f32, bf16, int8 and int16 products, the weights' transpose) and the plumbing they share.

/// [`Packed`] for a packed weight type whose module defines `new(wt, k, n, bias)`,
/// `forward(x, with_bias, act)` and the fields `k` and `n`: the packed products share it
/// (generic ones as `([S: Scheme] PackedInt<S>, S::NAME)`). A trailing `from_panels` names the
/// type's own packer from f32 panels (`from_panels(p, bias)`), used instead of unpacking them.
macro_rules! packed_by_inherent_methods {
    ([$($generics:tt)*] $t:ty, $name:expr $(, $from_panels:ident)?) => {
        impl<$($generics)*> $crate::model::kernels::Packed for $t {
            const NAME: &'static str = $name;

            fn pack(
                wt: &[f32],
                k: usize,
                n: usize,
                bias: Option<Vec<f32>>,
            ) -> candle_core::Result<Self> {
                Self::new(wt, k, n, bias)
            }

            $(
                fn pack_panels(
                    p: &impl $crate::model::kernels::Panels,
                    bias: Option<Vec<f32>>,
                ) -> candle_core::Result<Self> {
                    Self::$from_panels(p, bias)
                }
            )?

            fn dims(&self) -> (usize, usize) {
                (self.k, self.n)
            }

            fn product(
                &self,
                x: &[f32],
                with_bias: bool,
                act: Option<$crate::model::kernels::Activation>,
            ) -> candle_core::Result<Vec<f32>> {
                self.forward(x, with_bias, act)
            }
        }
    };
    ($t:ty, $name:expr) => {
        packed_by_inherent_methods!([] $t, $name);
    };
}

pub(crate) mod attention;
pub(crate) mod bf16;
pub(crate) mod gelu;
pub(crate) mod integer;
pub(crate) mod layer_norm;
pub(crate) mod linear;
pub(crate) mod packed_f32;
pub(crate) mod softmax;
pub(crate) mod transpose;
mod vecmath;

use candle_core::Tensor;

/// An MLP activation, fused with the bias by [`gelu::bias_act`] or into a packed product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    /// Exact (erf) GELU.
    Gelu,
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP).
    QuickGelu,
    /// GELU with the tanh approximation (SigLIP 2, `gelu_pytorch_tanh`).
    GeluTanh,
}

/// A linear layer's weight packed for one of the packed products (f32, bf16, int8, int16).
pub(crate) trait Packed: Sized {
    /// The operation's name in errors.
    const NAME: &'static str;
    /// Packs `wt (k, n)` row-major and an optional bias of `n`.
    fn pack(wt: &[f32], k: usize, n: usize, bias: Option<Vec<f32>>) -> candle_core::Result<Self>;
    /// Packs a weight held as f32 panels (what the layers keep): by default unpacked to
    /// row-major first, a copy of the whole weight that a packer reading panels avoids.
    fn pack_panels(p: &impl Panels, bias: Option<Vec<f32>>) -> candle_core::Result<Self> {
        let (k, n) = p.dims();
        Self::pack(&p.unpack(), k, n, bias)
    }
    /// `(k, n)`.
    fn dims(&self) -> (usize, usize);
    /// `x (rows, k) @ W` -> `(rows, n)`, plus the bias if `with_bias`, then `act` if given
    /// (applied to each block of rows as soon as it is done, while it is in cache).
    fn product(
        &self,
        x: &[f32],
        with_bias: bool,
        act: Option<Activation>,
    ) -> candle_core::Result<Vec<f32>>;
}

/// A weight `(k, n)` kept as panels of 16 columns (the f32 kernel's layout), which other
/// packers read in place.
pub(crate) trait Panels: Packed + Sync {
    /// Row `i`'s 16 columns from `16 * block`, zero past `n`.
    fn panel_row(&self, block: usize, i: usize) -> &[f32];
    /// The weight as `(k, n)` row-major: the same values.
    fn unpack(&self) -> Vec<f32>;
    /// [`columns_of`] the unpacked weight, read from the panels.
    fn columns(&self, block: usize, i: usize) -> &[f32] {
        let n = self.dims().1;
        &self.panel_row(block, i)[..n.saturating_sub(block * 16).min(16)]
    }
}

/// Row `i`'s columns from `16 * block` to the next 16 or `n` of a row-major `(k, n)` weight: the
/// reduced-precision packers read a weight one block of 16 columns at a time.
pub(crate) fn columns_of(wt: &[f32], n: usize, block: usize, i: usize) -> &[f32] {
    let j0 = block * 16;
    &wt[i * n + j0..i * n + n.min(j0 + 16)]
}

/// `xs (rows, k) @ W` (+ the packed bias if `bias`, then `act` if given) on the CPU as a
/// candle op, for any packed weight. No backward: only the perturbed, inference-only passes
/// run in reduced precision.
pub(crate) struct PackedLinear<'a, P> {
    pub(crate) packed: &'a P,
    pub(crate) bias: bool,
    pub(crate) act: Option<Activation>,
}

impl<P: Packed> candle_core::CustomOp1 for PackedLinear<'_, P> {
    fn name(&self) -> &'static str {
        P::NAME
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = f32_slice(s, l, P::NAME, "input")?;
        let (rows, k) = l.shape().dims2()?;
        let (pk, n) = self.packed.dims();
        if k != pk {
            candle_core::bail!("{}: rows of {k} for a weight of ({pk}, {n})", P::NAME)
        }
        let dst = self.packed.product(x, self.bias, self.act)?;
        Ok((
            candle_core::CpuStorage::F32(dst),
            candle_core::Shape::from_dims(&[rows, n]),
        ))
    }
}

/// The checks and the output a packed product starts from: `x` as rows of `k`, and `(rows, n)`
/// holding the bias in every row when the sums start from it (a bias and no activation after),
/// zeros otherwise (the activation's pass adds the bias, as the separate bias-GELU pass does).
pub(crate) fn packed_output(
    name: &str,
    x: &[f32],
    (k, n): (usize, usize),
    bias: Option<&[f32]>,
    act: Option<Activation>,
) -> candle_core::Result<(usize, Vec<f32>)> {
    if k == 0 || !x.len().is_multiple_of(k) {
        candle_core::bail!("{name}: {} input values for rows of {k}", x.len())
    }
    let rows = x.len() / k;
    Ok((
        rows,
        match bias {
            Some(b) if act.is_none() => b.repeat(rows),
            _ => vec![0f32; rows * n],
        },
    ))
}

/// Where a micro-tile of a packed product sits: `rows` rows from `row`, `blocks` column blocks
/// (of 16 outputs) from `block`.
#[derive(Clone, Copy)]
pub(crate) struct Tile {
    pub(crate) row: usize,
    pub(crate) rows: usize,
    pub(crate) block: usize,
    pub(crate) blocks: usize,
}

/// The tiling the packed products share: `dst (rows, n)` in tasks of `mc` rows run in parallel,
/// each task in micro-tiles of `mr` rows by `nb` column blocks of 16 (single rows and single
/// blocks at the edges). `tile(t, c)` computes one micro-tile, `c` pointing at the start of its
/// first row in `dst`; the tile lies inside `dst` (its blocks within `n.div_ceil(16)`).
/// `finish(rows)` then runs on each task's rows once all their tiles are done (the fused
/// activation; a no-op otherwise).
pub(crate) fn for_each_tile(
    dst: &mut [f32],
    n: usize,
    (mc, mr, nb): (usize, usize, usize),
    tile: impl Fn(Tile, *mut f32) + Sync,
    finish: impl Fn(&mut [f32]) + Sync,
) {
    use rayon::prelude::*;
    let blocks = n.div_ceil(16);
    if n == 0 {
        return;
    }
    dst.par_chunks_mut(mc * n)
        .enumerate()
        .for_each(|(t, chunk)| {
            let (row0, count) = (t * mc, chunk.len() / n);
            let mut b = 0;
            while b < blocks {
                let bs = if blocks - b >= nb { nb } else { 1 };
                let mut r = 0;
                while r < count {
                    let rs = if count - r >= mr { mr } else { 1 };
                    let at = Tile {
                        row: row0 + r,
                        rows: rs,
                        block: b,
                        blocks: bs,
                    };
                    tile(at, chunk[r * n..].as_mut_ptr());
                    r += rs;
                }
                b += bs;
            }
            finish(chunk);
        });
}

/// The mask of the first `valid` of a vector's 16 f32 lanes.
#[cfg(target_arch = "x86_64")]
pub(crate) fn lane_mask(valid: usize) -> u16 {
    if valid >= 16 {
        u16::MAX
    } else {
        (1u16 << valid) - 1
    }
}

/// The `R x B` accumulators of a tile read from `c` (`ldc` apart; lanes outside `masks` zero).
///
/// # Safety
/// `c` must hold `R` rows `ldc` apart with the masked lanes of `B` blocks.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)] // rows x blocks by position, as the micro-kernels index them
pub(crate) unsafe fn load_tile<const R: usize, const B: usize>(
    c: *const f32,
    ldc: usize,
    masks: [u16; B],
) -> [[std::arch::x86_64::__m512; B]; R] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); B]; R];
    for r in 0..R {
        for b in 0..B {
            acc[r][b] = _mm512_maskz_loadu_ps(masks[b], c.add(r * ldc + b * 16));
        }
    }
    acc
}

/// Writes the accumulators back where [`load_tile`] read them.
///
/// # Safety
/// As [`load_tile`], and `c` writable.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)]
pub(crate) unsafe fn store_tile<const R: usize, const B: usize>(
    c: *mut f32,
    ldc: usize,
    masks: [u16; B],
    acc: &[[std::arch::x86_64::__m512; B]; R],
) {
    use std::arch::x86_64::*;
    for r in 0..R {
        for b in 0..B {
            _mm512_mask_storeu_ps(c.add(r * ldc + b * 16), masks[b], acc[r][b]);
        }
    }
}

/// `f` on the values of `t` read in place (load-time work on weights): `t` made contiguous,
/// which must be f32 on the CPU (`op` and `what` name the operation and operand in the error).
pub(crate) fn with_cpu_f32<R>(
    t: &Tensor,
    op: &str,
    what: &str,
    f: impl FnOnce(&[f32]) -> R,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*storage else {
        candle_core::bail!("{op}: {what} not on the CPU")
    };
    Ok(f(f32_slice(s, layout, op, what)?))
}

/// The f32 values of a contiguous CPU storage, for the CPU kernels' `cpu_fwd`; `op` and `what`
/// name the operation and operand in the error.
pub(crate) fn f32_slice<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    use candle_core::backend::BackendStorage;
    let candle_core::CpuStorage::F32(all) = s else {
        candle_core::bail!("{op}: {what} must be f32, got {:?}", s.dtype())
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: {what} must be contiguous")
    };
    Ok(&all[a..b])
}

/// Row blocks of a `(rows, n)` result computed in parallel, each block also accumulating `k`
/// column sums of length `n` (the bias and scale gradients of the backward kernels):
/// `f(first_row, block, sums)`. Returns `(rows + k) * n` values, the rows then the `k` sums.
/// The blocks' sums are added in block order, so the result does not depend on scheduling and
/// a training run stays reproducible.
pub(crate) fn rows_with_column_sums(
    rows: usize,
    n: usize,
    k: usize,
    f: impl Fn(usize, &mut [f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    use rayon::prelude::*;
    let per_block = (16384 / n.max(1)).max(1);
    let mut out = vec![0f32; (rows + k) * n];
    let (body, tail) = out.split_at_mut(rows * n);
    let partial: Vec<Vec<f32>> = body
        .par_chunks_mut(per_block * n.max(1))
        .enumerate()
        .map(|(i, block)| {
            let mut sums = vec![0f32; k * n];
            f(i * per_block, block, &mut sums);
            sums
        })
        .collect();
    for p in &partial {
        for (t, v) in tail.iter_mut().zip(p) {
            *t += v;
        }
    }
    out
}

/// The CPU side of a row-wise backward kernel (bias-GELU, LayerNorm): `input` `(rows, N)`, a
/// per-column `vector` of `N` (`what` names it in errors: bias, weight) and the output gradient
/// shaped like the input give `(rows + k, N)`: the input gradient's rows, then `k` column sums.
/// `f(input_rows, vector, grad_rows, gx_rows, sums)` computes one block of rows.
pub(crate) fn row_grad_cpu(
    op: &str,
    what: &str,
    (s1, l1): (&candle_core::CpuStorage, &candle_core::Layout),
    (s2, l2): (&candle_core::CpuStorage, &candle_core::Layout),
    (s3, l3): (&candle_core::CpuStorage, &candle_core::Layout),
    k: usize,
    f: impl Fn(&[f32], &[f32], &[f32], &mut [f32], &mut [f32]) + Sync,
) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
    let src = f32_slice(s1, l1, op, "input")?;
    let vector = f32_slice(s2, l2, op, what)?;
    let grad = f32_slice(s3, l3, op, "output gradient")?;
    let n = vector.len();
    if n == 0 || src.len() % n != 0 || grad.len() != src.len() {
        candle_core::bail!(
            "{op}: {} inputs, {} gradients, {what} of {n}",
            src.len(),
            grad.len()
        )
    }
    let rows = src.len() / n;
    let out = rows_with_column_sums(rows, n, k, |r0, gx, sums| {
        let span = r0 * n..r0 * n + gx.len();
        f(&src[span.clone()], vector, &grad[span], gx, sums)
    });
    Ok((
        candle_core::CpuStorage::F32(out),
        candle_core::Shape::from_dims(&[rows + k, n]),
    ))
}

/// Sum over every dimension but the last (a bias gradient), as one matrix-vector product:
/// candle's reduction over a leading dimension is strided and single-threaded.
pub(crate) fn sum_leading(t: &Tensor) -> candle_core::Result<Tensor> {
    let n = t.dims().last().copied().unwrap_or(1);
    let rows = t.elem_count() / n.max(1);
    let ones = Tensor::ones((1, rows), t.dtype(), t.device())?;
    ones.matmul(&t.reshape((rows, n))?.contiguous()?)?
        .reshape(n)
}

/// Largest absolute difference of two tensors of one shape (for the kernels' tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
        .expect("tensors of one shape")
}

/// Test support shared by the packed products' tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::Activation;
    use candle_core::{Device, Tensor};

    /// `(rows, k, n)` of the fused-activation check: rows spanning several tasks.
    pub(crate) const FUSED_DIMS: (usize, usize, usize) = (150, 40, 35);

    /// Checks a packed product's fused activation against the separate bias-activation pass:
    /// `product(bias, with_bias, act)` runs one kernel on the inputs of [`FUSED_DIMS`] built
    /// from `seq`. Equal bits (zeros of either sign).
    pub(crate) fn check_fused_activation(
        what: &str,
        seq: impl Fn(usize, f32) -> Vec<f32>,
        product: impl Fn(&[f32], &[f32], Option<Vec<f32>>, bool, Option<Activation>) -> Vec<f32>,
    ) {
        use super::gelu::bias_act;
        let (rows, k, n) = FUSED_DIMS;
        let (x, wt, b) = (seq(rows * k, 0.37), seq(k * n, 0.71), seq(n, 1.3));
        for bias in [Some(b), None] {
            let bias_t = Tensor::new(bias.clone().unwrap_or(vec![0.0; n]), &Device::Cpu).unwrap();
            let plain = product(&x, &wt, bias.clone(), false, None);
            let plain = Tensor::from_vec(plain, (rows, n), &Device::Cpu).unwrap();
            for act in [
                Activation::Gelu,
                Activation::QuickGelu,
                Activation::GeluTanh,
            ] {
                let want = bias_act(&plain, &bias_t, act).unwrap();
                let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let got = product(&x, &wt, bias.clone(), true, Some(act));
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(g, w)| g == w || (*g == 0.0 && *w == 0.0));
                assert!(same, "{what} {act:?} bias {}", bias.is_some());
            }
        }
    }
}
