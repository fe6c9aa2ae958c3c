//! The bf16 matrix product behind `--precision bf16` (the linear layers of the perturbed
//! forward passes): inputs and weights rounded to bf16 (to nearest, ties to even; denormals to
//! zero), products accumulated in f32. These are the numerics of the AVX512-BF16 instruction
//! `vdpbf16ps`, which multiplies pairs of bf16 values along the reduction and adds both
//! products to an f32 lane, the odd element first.
//!
//! Three kernels over the same packed weights, chosen at run time:
//! - AVX512-BF16 (AMD Zen 4 and later, Intel Sapphire Rapids and later): `vdpbf16ps`, twice the
//!   multiply-adds of an f32 FMA per instruction and half the bytes of weights to stream;
//! - AVX-512F without BF16: each pair widened to two f32 with a shift and a mask, then two FMAs
//!   in the order `vdpbf16ps` adds them;
//! - anything else: the same in portable code (FMA instructions where the CPU has them).
//!
//! The last two give the same bits; only the first is faster than f32. They exist so that a
//! bf16 run computes the same numbers on every machine, and so that the packing, tiling and
//! tails, which all three share, are tested on machines without AVX512-BF16.

// The micro-kernels index their register tiles (rows x blocks x lanes) by position, with the
// same index into several arrays; iterator chains would hide that and not unroll as well.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use super::gelu::{bias_act_in_place, Activation};
use super::{columns_of, Panels, Tile};

/// Output columns per block: one 512-bit vector of f32.
const LANES: usize = 16;
/// Rows per micro-tile.
const MR: usize = 8;
/// Column blocks per micro-tile (`MR * NB` accumulators stay in registers).
const NB: usize = 2;
/// Rows per parallel task: one task's input rows stay in L2 while it sweeps the weights.
const MC: usize = 64;

/// `x` rounded to the nearest bf16 (ties to even), denormals flushed to signed zero, NaN kept a
/// (quiet) NaN; the result's 16 bits. Branch-free so the row conversions vectorise.
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    let tiny = b & 0x7f80_0000 == 0;
    let out = if nan {
        (b >> 16) | 0x40
    } else if tiny {
        (b >> 16) & 0x8000
    } else {
        rounded
    };
    out as u16
}

/// `x` rounded to bf16 as [`bf16_bits`] does, back as an f32.
pub(crate) fn round_bf16(x: f32) -> f32 {
    f32::from_bits(u32::from(bf16_bits(x)) << 16)
}

/// A linear layer's weight `(k, n)` (the pre-transposed layout of the ViT's linear layers) as
/// bf16 pairs along `k` in blocks of 16 output columns, with its bias kept in f32.
///
/// `panels[(block * pairs + pair) * 16 + lane]` holds element `2 * pair` of column
/// `16 * block + lane` in its low half and element `2 * pair + 1` in its high half: the operand
/// layout of `vdpbf16ps`. Entries past `k` or `n` are zero.
#[derive(Debug, Clone)]
pub(crate) struct PackedBf16 {
    k: usize,
    n: usize,
    pairs: usize,
    panels: Vec<u32>,
    bias: Option<Vec<f32>>,
}

impl PackedBf16 {
    /// Packs `wt (k, n)` row-major and an optional bias of `n`.
    pub(crate) fn new(
        wt: &[f32],
        k: usize,
        n: usize,
        bias: Option<Vec<f32>>,
    ) -> candle_core::Result<Self> {
        if wt.len() != k * n {
            candle_core::bail!("vitcx bf16: weight of {} values for ({k}, {n})", wt.len())
        }
        Self::from_columns(k, n, bias, |block, i| columns_of(wt, n, block, i))
    }

    /// [`Self::new`] from the f32 panels the layer keeps, read in place (the same 16-column
    /// blocks).
    pub(crate) fn from_panels(
        p: &impl Panels,
        bias: Option<Vec<f32>>,
    ) -> candle_core::Result<Self> {
        let (k, n) = p.dims();
        Self::from_columns(k, n, bias, |block, i| p.columns(block, i))
    }

    /// Packs a weight `(k, n)` given by `cols(block, i)`, row `i`'s columns from `16 * block`
    /// to the next 16 or `n`, one block of columns per task.
    fn from_columns<'w>(
        k: usize,
        n: usize,
        bias: Option<Vec<f32>>,
        cols: impl Fn(usize, usize) -> &'w [f32] + Sync,
    ) -> candle_core::Result<Self> {
        if bias.as_ref().is_some_and(|b| b.len() != n) {
            candle_core::bail!(
                "vitcx bf16: bias of {:?} for ({k}, {n})",
                bias.as_ref().map(Vec::len)
            )
        }
        let pairs = k.div_ceil(2);
        let blocks = n.div_ceil(LANES);
        let mut panels = vec![0u32; blocks * pairs * LANES];
        panels
            .par_chunks_exact_mut((pairs * LANES).max(1))
            .enumerate()
            .for_each(|(bi, block)| {
                for (p, pair) in block.chunks_exact_mut(LANES).enumerate() {
                    let lo = cols(bi, 2 * p);
                    let hi = if 2 * p + 1 < k {
                        cols(bi, 2 * p + 1)
                    } else {
                        &[]
                    };
                    for (l, v) in pair.iter_mut().enumerate().take(lo.len()) {
                        let hi = hi.get(l).map_or(0, |&h| bf16_bits(h));
                        *v = u32::from(bf16_bits(lo[l])) | (u32::from(hi) << 16);
                    }
                }
            });
        Ok(PackedBf16 {
            k,
            n,
            pairs,
            panels,
            bias,
        })
    }

    /// `x (rows, k) @ W` -> `(rows, n)`, plus the bias if `with_bias`, then `act` if given, on
    /// the fastest kernel this CPU has.
    pub(crate) fn forward(
        &self,
        x: &[f32],
        with_bias: bool,
        act: Option<Activation>,
    ) -> candle_core::Result<Vec<f32>> {
        self.forward_on(Kernel::detect(), x, with_bias, act)
    }

    fn forward_on(
        &self,
        kernel: Kernel,
        x: &[f32],
        with_bias: bool,
        act: Option<Activation>,
    ) -> candle_core::Result<Vec<f32>> {
        let (k, n) = (self.k, self.n);
        // With an activation the bias is added after the sums, as the separate bias-GELU pass
        // did (the same roundings); without, the sums start from it.
        let bias = self.bias.as_deref().filter(|_| with_bias);
        let (rows, mut dst) = super::packed_output("vitcx bf16", x, (k, n), bias, act)?;
        if rows == 0 || n == 0 {
            return Ok(dst);
        }
        let a = Operand::new(kernel, x, k, self.pairs);
        super::for_each_tile(
            &mut dst,
            n,
            (MC, MR, NB),
            |t, c| {
                // SAFETY: `for_each_tile` gives tiles inside `dst`; its blocks in the panels and its input rows in `a`.
                unsafe { self.tile(kernel, &a, t, c) }
            },
            |rows| {
                if let Some(act) = act {
                    bias_act_in_place(rows, bias, act)
                }
            },
        );
        Ok(dst)
    }

    /// One micro-tile on `kernel`; `c` points at the tile's first output row.
    ///
    /// # Safety
    /// `c` must be valid for `tile.rows` rows of `n` values, and the tile inside the operands.
    unsafe fn tile(&self, kernel: Kernel, a: &Operand, tile: Tile, c: *mut f32) {
        let w = self.panels.as_ptr().add(tile.block * self.pairs * LANES);
        let c = c.add(tile.block * LANES);
        let valid = |b: usize| (self.n - (tile.block + b) * LANES).min(LANES);
        macro_rules! dispatch {
            ($f:ident, $a:expr, $lda:expr) => {{
                let t = TileArgs {
                    a: $a,
                    lda: $lda,
                    pairs: self.pairs,
                    w,
                    ldw: self.pairs * LANES,
                    c,
                    ldc: self.n,
                    valid: [],
                };
                match (tile.rows, tile.blocks) {
                    (MR, NB) => $f::<MR, NB>(t.blocks([valid(0), valid(1)])),
                    (MR, _) => $f::<MR, 1>(t.blocks([valid(0)])),
                    (_, NB) => $f::<1, NB>(t.blocks([valid(0), valid(1)])),
                    _ => $f::<1, 1>(t.blocks([valid(0)])),
                }
            }};
        }
        match (kernel, a) {
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx512Bf16, Operand::Pairs(p)) => {
                let ap = p.as_ptr().add(tile.row * self.pairs);
                dispatch!(tile_avx512bf16, ap, self.pairs)
            }
            #[cfg(all(test, target_arch = "x86_64"))]
            (Kernel::PairsModelled, Operand::Pairs(p)) => {
                let ap = p.as_ptr().add(tile.row * self.pairs);
                dispatch!(tile_pairs_modelled, ap, self.pairs)
            }
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx512, Operand::Rounded(x)) => {
                let ap = x.as_ptr().add(tile.row * 2 * self.pairs);
                dispatch!(tile_avx512, ap, 2 * self.pairs)
            }
            #[cfg(target_arch = "x86_64")]
            (Kernel::Fma, Operand::Rounded(x)) => {
                let ap = x.as_ptr().add(tile.row * 2 * self.pairs);
                dispatch!(tile_fma, ap, 2 * self.pairs)
            }
            (_, Operand::Rounded(x)) => {
                let ap = x.as_ptr().add(tile.row * 2 * self.pairs);
                dispatch!(tile_portable_body, ap, 2 * self.pairs)
            }
            (_, Operand::Pairs(_)) => {
                unreachable!("pairs are only made for the pair kernels")
            }
        }
    }
}

/// One micro-tile's operands: `R` input rows from `a`, `lda` units apart; `B` weight panels of
/// `pairs` pairs from `w`, `ldw` apart; the output rows from `c`, `ldc` apart, of whose blocks
/// `valid[b]` columns exist.
#[derive(Clone, Copy)]
struct TileArgs<T, const B: usize> {
    a: *const T,
    lda: usize,
    pairs: usize,
    w: *const u32,
    ldw: usize,
    c: *mut f32,
    ldc: usize,
    valid: [usize; B],
}

impl<T> TileArgs<T, 0> {
    /// The same operands over `B` column blocks with these valid widths.
    fn blocks<const B: usize>(self, valid: [usize; B]) -> TileArgs<T, B> {
        let TileArgs {
            a,
            lda,
            pairs,
            w,
            ldw,
            c,
            ldc,
            ..
        } = self;
        TileArgs {
            a,
            lda,
            pairs,
            w,
            ldw,
            c,
            ldc,
            valid,
        }
    }
}

/// Which kernel runs the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// `vdpbf16ps`.
    Avx512Bf16,
    /// The `vdpbf16ps` kernel with the instruction modelled in AVX-512F (tests only).
    #[cfg(test)]
    PairsModelled,
    /// AVX-512F, pairs widened to f32.
    Avx512,
    /// AVX2 + FMA, portable code compiled for them.
    Fma,
    /// Portable code for any CPU.
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16") {
                return Kernel::Avx512Bf16;
            }
            if is_x86_feature_detected!("avx512f") {
                return Kernel::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Kernel::Fma;
            }
        }
        Kernel::Portable
    }

    /// Every kernel this CPU can run.
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Self> {
        let mut out = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                out.push(Kernel::Fma);
            }
            if is_x86_feature_detected!("avx512f") {
                out.push(Kernel::Avx512);
                out.push(Kernel::PairsModelled);
                if is_x86_feature_detected!("avx512bf16") {
                    out.push(Kernel::Avx512Bf16);
                }
            }
        }
        out
    }

    /// How `vitcx bench` names the kernel.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kernel::Avx512Bf16 => "avx512-bf16 (vdpbf16ps)",
            #[cfg(test)]
            Kernel::PairsModelled => "avx512f (vdpbf16ps modelled)",
            Kernel::Avx512 => "avx512f (bf16 widened to f32)",
            Kernel::Fma => "avx2+fma (bf16 widened to f32)",
            Kernel::Portable => "portable (bf16 widened to f32)",
        }
    }
}

/// The input rows, rounded to bf16, in the layout the kernel reads.
enum Operand {
    /// `(rows, pairs)` bf16 pairs, for `vdpbf16ps`.
    Pairs(Vec<u32>),
    /// `(rows, 2 * pairs)` f32 holding bf16 values (zero-padded to even `k`).
    Rounded(Vec<f32>),
}

impl Operand {
    fn new(kernel: Kernel, x: &[f32], k: usize, pairs: usize) -> Self {
        const ROWS: usize = 16;
        let pairs_layout = match kernel {
            Kernel::Avx512Bf16 => true,
            #[cfg(test)]
            Kernel::PairsModelled => true,
            _ => false,
        };
        match pairs_layout {
            true => {
                let mut out = vec![0u32; x.len() / k * pairs];
                out.par_chunks_mut(ROWS * pairs)
                    .zip(x.par_chunks(ROWS * k))
                    .for_each(|(o, xs)| {
                        for (orow, xrow) in o.chunks_exact_mut(pairs).zip(xs.chunks_exact(k)) {
                            for (p, v) in orow.iter_mut().enumerate() {
                                let lo = bf16_bits(xrow[2 * p]);
                                let hi = xrow.get(2 * p + 1).map_or(0, |&h| bf16_bits(h));
                                *v = u32::from(lo) | (u32::from(hi) << 16);
                            }
                        }
                    });
                Operand::Pairs(out)
            }
            false => {
                let w = 2 * pairs;
                let mut out = vec![0f32; x.len() / k * w];
                out.par_chunks_mut(ROWS * w)
                    .zip(x.par_chunks(ROWS * k))
                    .for_each(|(o, xs)| {
                        for (orow, xrow) in o.chunks_exact_mut(w).zip(xs.chunks_exact(k)) {
                            for (v, &xv) in orow.iter_mut().zip(xrow) {
                                *v = round_bf16(xv);
                            }
                        }
                    });
                Operand::Rounded(out)
            }
        }
    }
}

/// The widened pair `(even, odd)` of one packed u32.
#[inline(always)]
fn widen_pair(v: u32) -> (f32, f32) {
    (f32::from_bits(v << 16), f32::from_bits(v & 0xffff_0000))
}

/// Portable micro-tile: `R` rows by `B` blocks of 16 columns, `c += a @ w` over all pairs, the
/// odd element of each pair first (as `vdpbf16ps`). `valid[b]` is how many of block `b`'s 16
/// columns exist.
///
/// # Safety
/// `a` must hold `R` rows of `2 * pairs` values `lda` apart, `w` `B` panels `ldw` apart, and `c`
/// `R` rows `ldc` apart with `16 * (B - 1) + valid[B - 1]` columns.
#[inline(always)]
unsafe fn tile_portable_body<const R: usize, const B: usize>(t: TileArgs<f32, B>) {
    let TileArgs {
        a,
        lda,
        pairs,
        w,
        ldw,
        c,
        ldc,
        valid,
    } = t;
    let mut acc = [[[0f32; LANES]; B]; R];
    for r in 0..R {
        for b in 0..B {
            for l in 0..valid[b] {
                acc[r][b][l] = *c.add(r * ldc + b * LANES + l);
            }
        }
    }
    for p in 0..pairs {
        let mut lo = [[0f32; LANES]; B];
        let mut hi = [[0f32; LANES]; B];
        for b in 0..B {
            for l in 0..LANES {
                (lo[b][l], hi[b][l]) = widen_pair(*w.add(b * ldw + p * LANES + l));
            }
        }
        for r in 0..R {
            let al = *a.add(r * lda + 2 * p);
            let ah = *a.add(r * lda + 2 * p + 1);
            for b in 0..B {
                for l in 0..LANES {
                    let s = ah.mul_add(hi[b][l], acc[r][b][l]);
                    acc[r][b][l] = al.mul_add(lo[b][l], s);
                }
            }
        }
    }
    for r in 0..R {
        for b in 0..B {
            for l in 0..valid[b] {
                *c.add(r * ldc + b * LANES + l) = acc[r][b][l];
            }
        }
    }
}

/// [`tile_portable_body`] compiled for AVX2 + FMA (`mul_add` becomes one instruction).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_fma<const R: usize, const B: usize>(t: TileArgs<f32, B>) {
    tile_portable_body::<R, B>(t)
}

/// AVX-512F micro-tile, same contract and same bits as [`tile_portable_body`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<const R: usize, const B: usize>(t: TileArgs<f32, B>) {
    let TileArgs {
        a,
        lda,
        pairs,
        w,
        ldw,
        c,
        ldc,
        valid,
    } = t;
    use std::arch::x86_64::*;
    let masks = valid.map(super::lane_mask);
    let mut acc = super::load_tile::<R, B>(c, ldc, masks);
    let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
    for p in 0..pairs {
        let mut lo = [_mm512_setzero_ps(); B];
        let mut hi = [_mm512_setzero_ps(); B];
        for b in 0..B {
            let v = _mm512_loadu_epi32(w.add(b * ldw + p * LANES) as *const i32);
            lo[b] = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
            hi[b] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
        }
        for r in 0..R {
            let al = _mm512_set1_ps(*a.add(r * lda + 2 * p));
            let ah = _mm512_set1_ps(*a.add(r * lda + 2 * p + 1));
            for b in 0..B {
                acc[r][b] = _mm512_fmadd_ps(al, lo[b], _mm512_fmadd_ps(ah, hi[b], acc[r][b]));
            }
        }
    }
    super::store_tile(c, ldc, masks, &acc);
}

/// Micro-tiles over packed pairs: `a` holds `R` rows of `pairs` packed bf16 pairs, `lda` apart;
/// otherwise the contract of [`tile_portable_body`]. `$dot(acc, a, w)` is `vdpbf16ps`: the
/// hardware instruction in [`tile_avx512bf16`], and in the tests an AVX-512F model of it, so
/// that everything but the instruction (pair packing, broadcasts, strides, masks) runs on
/// machines without AVX512-BF16 too.
#[cfg(target_arch = "x86_64")]
macro_rules! pair_tile {
    ($(#[$attr:meta])* $name:ident, $features:literal, $dot:ident) => {
        $(#[$attr])*
        #[target_feature(enable = $features)]
                unsafe fn $name<const R: usize, const B: usize>(
            t: TileArgs<u32, B>,
        ) {
            let TileArgs {
                a,
                lda,
                pairs,
                w,
                ldw,
                c,
                ldc,
                valid,
            } = t;
            use std::arch::x86_64::*;
            let masks = valid.map(super::lane_mask);
            let mut acc = super::load_tile::<R, B>(c, ldc, masks);
            for p in 0..pairs {
                let mut wv = [_mm512_setzero_si512(); B];
                for b in 0..B {
                    wv[b] = _mm512_loadu_epi32(w.add(b * ldw + p * LANES) as *const i32);
                }
                for r in 0..R {
                    let av = _mm512_set1_epi32(*a.add(r * lda + p) as i32);
                    for b in 0..B {
                        acc[r][b] = $dot(acc[r][b], av, wv[b]);
                    }
                }
            }
            super::store_tile(c, ldc, masks, &acc);
        }
    };
}

#[cfg(target_arch = "x86_64")]
pair_tile!(
    /// AVX512-BF16 micro-tile (`vdpbf16ps`).
    tile_avx512bf16,
    "avx512f,avx512bf16",
    dot_bf16
);

#[cfg(all(test, target_arch = "x86_64"))]
pair_tile!(
    /// [`tile_avx512bf16`] with `vdpbf16ps` modelled in AVX-512F, for the tests.
    tile_pairs_modelled,
    "avx512f",
    dot_modelled
);

/// `acc + a.odd * w.odd + a.even * w.even` per lane, in hardware.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
fn dot_bf16(
    acc: std::arch::x86_64::__m512,
    a: std::arch::x86_64::__m512i,
    w: std::arch::x86_64::__m512i,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // SAFETY: same-size vector types; bf16 pairs are what the u32 lanes hold.
    let (a, w) = unsafe {
        (
            std::mem::transmute::<__m512i, __m512bh>(a),
            std::mem::transmute::<__m512i, __m512bh>(w),
        )
    };
    _mm512_dpbf16_ps(acc, a, w)
}

/// [`dot_bf16`] in AVX-512F: the odd elements' product added first, then the even ones', each
/// product exact in f32 and each addition rounded once, as Intel documents `vdpbf16ps`.
#[cfg(all(test, target_arch = "x86_64"))]
#[inline]
#[target_feature(enable = "avx512f")]
fn dot_modelled(
    acc: std::arch::x86_64::__m512,
    a: std::arch::x86_64::__m512i,
    w: std::arch::x86_64::__m512i,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
    let odd = |v| _mm512_castsi512_ps(_mm512_and_si512(v, high));
    let even = |v| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
    let acc = _mm512_fmadd_ps(odd(a), odd(w), acc);
    _mm512_fmadd_ps(even(a), even(w), acc)
}

packed_by_inherent_methods!([] PackedBf16, "vitcx bf16 linear", from_panels);

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: usize, k: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32) * k).sin() * 1.7).collect()
    }

    #[test]
    fn fused_activation_is_the_separate_bias_activation_pass() {
        let (_, k, n) = super::super::testing::FUSED_DIMS;
        for kernel in Kernel::available() {
            super::super::testing::check_fused_activation(
                &format!("{kernel:?}"),
                seq,
                |x, wt, bias, with_bias, act| {
                    let packed = PackedBf16::new(wt, k, n, bias).unwrap();
                    packed.forward_on(kernel, x, with_bias, act).unwrap()
                },
            );
        }
    }

    #[test]
    fn rounding_is_to_nearest_even_with_denormals_flushed() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even (1.0).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to the even (1 + 2^-6).
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16_bits(1.0 + 1.0 / 200.0), 0x3f81);
        assert_eq!(bf16_bits(-2.5), 0xc020);
        assert_eq!(bf16_bits(f32::from_bits(1)), 0);
        assert_eq!(bf16_bits(-f32::from_bits(1)), 0x8000);
        assert_eq!(bf16_bits(f32::INFINITY), 0x7f80);
        assert_eq!(bf16_bits(f32::MAX), 0x7f80, "rounds up to infinity");
        assert!(round_bf16(f32::NAN).is_nan());
        for &x in &[0.1f32, -3.3, 1e-20, 6.5e4, 0.333] {
            let h = half::bf16::from_f32(x).to_f32();
            assert_eq!(round_bf16(x), h, "{x}");
        }
    }

    /// The product in f64 of the rounded operands: what every kernel approximates.
    fn reference(x: &[f32], wt: &[f32], b: &[f32], k: usize, n: usize) -> Vec<f64> {
        let rows = x.len() / k;
        let mut out = vec![0f64; rows * n];
        for i in 0..rows {
            for j in 0..n {
                let mut s = f64::from(b[j]);
                for t in 0..k {
                    s += f64::from(round_bf16(x[i * k + t])) * f64::from(round_bf16(wt[t * n + j]));
                }
                out[i * n + j] = s;
            }
        }
        out
    }

    #[test]
    fn every_kernel_computes_the_rounded_product() {
        // Odd k (a padded pair), n not a multiple of 16, rows spanning tasks and tile tails.
        for &(rows, k, n) in &[
            (1, 1, 1),
            (3, 5, 17),
            (9, 33, 50),
            (70, 64, 40),
            (133, 19, 33),
            // A ViT-B reduction: rounding differences would accumulate here.
            (40, 768, 48),
        ] {
            let x = seq(rows * k, 0.37);
            let wt = seq(k * n, 0.71);
            let b = seq(n, 1.3);
            let packed = PackedBf16::new(&wt, k, n, Some(b.clone())).unwrap();
            let want = reference(&x, &wt, &b, k, n);
            let portable = packed.forward_on(Kernel::Portable, &x, true, None).unwrap();
            for (i, (&got, &w)) in portable.iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(got) - w).abs() < 1e-5 * (k as f64 + 1.0),
                    "({rows},{k},{n}) {i}: {got} vs {w}"
                );
            }
            for kernel in Kernel::available() {
                // The instruction itself included: on an AMD Zen 5 `vdpbf16ps` gave the bits of
                // Intel's pseudocode (odd product first, each addition rounded, DAZ/FTZ).
                let got = packed.forward_on(kernel, &x, true, None).unwrap();
                assert_eq!(got, portable, "{kernel:?} ({rows}, {k}, {n})");
            }
        }
    }

    #[test]
    fn packing_from_f32_panels_is_packing_the_plain_weight() {
        use super::super::packed_f32::PackedF32;
        for &(k, n) in &[(1, 1), (5, 17), (33, 50), (768, 48)] {
            let wt = seq(k * n, 0.71);
            let b = Some(seq(n, 1.3));
            let plain = PackedBf16::new(&wt, k, n, b.clone()).unwrap();
            let panels = PackedF32::new(&wt, k, n, None).unwrap();
            let from = PackedBf16::from_panels(&panels, b).unwrap();
            assert_eq!(
                (plain.k, plain.n, plain.pairs),
                (from.k, from.n, from.pairs)
            );
            assert_eq!(plain.panels, from.panels, "({k}, {n})");
            assert_eq!(plain.bias, from.bias);
        }
        let panels = PackedF32::new(&[1.0; 8], 2, 4, None).unwrap();
        assert!(PackedBf16::from_panels(&panels, Some(vec![0.0; 3])).is_err());
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(PackedBf16::new(&[1.0; 6], 2, 4, None).is_err());
        assert!(PackedBf16::new(&[1.0; 8], 2, 4, Some(vec![0.0; 3])).is_err());
        let p = PackedBf16::new(&[1.0; 8], 2, 4, None).unwrap();
        assert!(p.forward(&[1.0; 3], true, None).is_err());
        assert_eq!(p.forward(&[], true, None).unwrap(), Vec::<f32>::new());
        // Without the bias flag the packed bias is left out.
        let p = PackedBf16::new(&[1.0; 8], 2, 4, Some(vec![5.0; 4])).unwrap();
        assert_eq!(p.forward(&[1.0, 2.0], false, None).unwrap(), vec![3.0; 4]);
        assert_eq!(p.forward(&[1.0, 2.0], true, None).unwrap(), vec![8.0; 4]);
    }
}
