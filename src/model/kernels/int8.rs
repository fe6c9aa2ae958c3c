//! The int8 product behind `--precision int8` (the linear layers of the perturbed forward
//! passes), as PyTorch's dynamic quantisation of `nn.Linear` computes it, with a finer
//! activation grain: weights quantised once per output channel (symmetric int8, scale
//! `max|w| / 127`), each input row (token) quantised when it arrives (symmetric, scale
//! `max|x| / 127`; PyTorch quantises the whole tensor at once), products summed exactly in i32,
//! and the sum scaled back to f32 with the bias added.
//!
//! The CPU's byte dot product (`vpdpbusd`, AVX512-VNNI) multiplies unsigned by signed bytes, so
//! the input is stored as `q + 128` and `128 * sum(q_w)` of each column is subtracted after the
//! sum. Integer sums are exact, so every kernel gives the same bits:
//! - AVX512-VNNI (Intel Cascade Lake and later, AMD Zen 4 and later): `vpdpbusd`, four
//!   multiply-adds per 32-bit lane per instruction;
//! - anything else: the same sums in portable code (compiled once more for AVX2, where the
//!   compiler turns the byte products into 16-bit multiply-adds).

// The micro-kernels index their register tiles (rows x blocks x lanes) by position, with the
// same index into several arrays; iterator chains would hide that and not unroll as well.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use super::gelu::{bias_act_in_place, Activation};
use super::Tile;

/// Output columns per block: one 512-bit vector of i32.
const LANES: usize = 16;
/// Rows per micro-tile.
const MR: usize = 6;
/// Column blocks per micro-tile (`MR * NB` accumulators stay in registers).
const NB: usize = 4;
/// Rows per parallel task: one task's input rows stay in L2 while it sweeps the weights.
const MC: usize = 72;
/// The largest quantised weight magnitude (symmetric: -127..=127, as PyTorch's per-channel
/// weights).
const QMAX: f32 = 127.0;
/// Adding and subtracting 1.5 * 2^23 rounds any |y| < 2^22 to an integer in the default rounding
/// mode (to nearest, ties to even, as `torch.round`), in plain arithmetic that vectorises, where
/// `round_ties_even` is a library call on baseline x86-64.
const MAGIC: f32 = 12_582_912.0;

/// A weight `v / scale` clamped to the symmetric int8 range and rounded to the nearest integer;
/// a zero scale (an all-zero column) gives zero.
#[inline(always)]
fn quantise(v: f32, inv_scale: f32) -> i8 {
    (((v * inv_scale).clamp(-QMAX, QMAX) + MAGIC) - MAGIC) as i8
}

/// An input row's quantisation: `x ~ scale * (u - 128)` with `u` in 1..=255, symmetric (scale
/// `max|x| / 127`, so `u - 128` is the int8 PyTorch would use). A row
/// holding a NaN or an infinity gets a NaN scale, so its outputs are NaN as the f32 product's
/// would be.
///
/// Asymmetric rows (`[min, max]` over 256 levels) were tried: the golden maps' Pearson moved
/// both ways (0.9989 to 0.99998 against 0.9991 to 0.99999 symmetric), no better overall.
#[derive(Debug, Clone, Copy)]
struct RowQuant {
    scale: f32,
    inv: f32,
}

impl RowQuant {
    fn of(row: &[f32]) -> Self {
        let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        if !amax.is_finite() || row.iter().any(|v| v.is_nan()) {
            return RowQuant {
                scale: f32::NAN,
                inv: 0.0,
            };
        }
        let (scale, inv) = scale_of(amax);
        RowQuant { scale, inv }
    }

    /// `v` as its unsigned byte.
    #[inline(always)]
    fn byte(self, v: f32) -> u8 {
        (i32::from(quantise(v, self.inv)) + 128) as u8
    }
}

/// The scale of a row or column with largest magnitude `amax`, and its inverse (0 for 0).
fn scale_of(amax: f32) -> (f32, f32) {
    if amax == 0.0 {
        (0.0, 0.0)
    } else {
        (amax / QMAX, QMAX / amax)
    }
}

/// A linear layer's weight `(k, n)` (the pre-transposed layout of the linear layers) as int8 in
/// groups of four along `k`, in blocks of 16 output columns, with per-column scales, the
/// unsigned-input correction and the bias kept in f32/i32.
///
/// `panels[(block * quads + quad) * 16 + lane]` holds elements `4 * quad .. 4 * quad + 4` of
/// column `16 * block + lane`, lowest byte first: the operand layout of `vpdpbusd`. Entries past
/// `k` or `n` are zero.
#[derive(Debug, Clone)]
pub(crate) struct PackedI8 {
    k: usize,
    n: usize,
    quads: usize,
    panels: Vec<i32>,
    /// Per column: `max|w| / 127` (padded with zeros to whole blocks).
    scale: Vec<f32>,
    /// Per column: `128 * sum(q_w)`, what the `+ 128` of the inputs adds to the sum.
    offset: Vec<i32>,
    /// The bias, padded with zeros to whole blocks.
    bias: Option<Vec<f32>>,
}

impl PackedI8 {
    /// Quantises and packs `wt (k, n)` row-major and an optional bias of `n`. A weight that is
    /// not finite is an error: no int8 value stands for it.
    pub(crate) fn new(
        wt: &[f32],
        k: usize,
        n: usize,
        bias: Option<Vec<f32>>,
    ) -> candle_core::Result<Self> {
        if wt.len() != k * n || bias.as_ref().is_some_and(|b| b.len() != n) {
            candle_core::bail!(
                "vitcx int8: weight of {} values for ({k}, {n}), bias of {:?}",
                wt.len(),
                bias.as_ref().map(Vec::len)
            )
        }
        if let Some(i) = wt.iter().position(|v| !v.is_finite()) {
            candle_core::bail!(
                "vitcx int8: weight ({}, {}) is {}; int8 needs finite weights",
                i / n.max(1),
                i % n.max(1),
                wt[i]
            )
        }
        let quads = k.div_ceil(4);
        let blocks = n.div_ceil(LANES);
        let padded = blocks * LANES;
        let mut scale = vec![0f32; padded];
        let mut inv = vec![0f32; padded];
        for j in 0..n {
            let amax = (0..k).fold(0f32, |m, t| m.max(wt[t * n + j].abs()));
            (scale[j], inv[j]) = scale_of(amax);
        }
        let mut offset = vec![0i32; padded];
        let mut panels = vec![0i32; blocks * quads * LANES];
        for (bi, block) in panels.chunks_exact_mut(quads * LANES).enumerate() {
            for (q, quad) in block.chunks_exact_mut(LANES).enumerate() {
                for (l, v) in quad.iter_mut().enumerate() {
                    let j = bi * LANES + l;
                    if j >= n {
                        break;
                    }
                    let mut bytes = [0i8; 4];
                    for (e, byte) in bytes.iter_mut().enumerate() {
                        let t = 4 * q + e;
                        if t < k {
                            *byte = quantise(wt[t * n + j], inv[j]);
                            offset[j] += 128 * i32::from(*byte);
                        }
                    }
                    *v = i32::from_le_bytes(bytes.map(|b| b as u8));
                }
            }
        }
        let bias = bias.map(|mut b| {
            b.resize(padded, 0.0);
            b
        });
        Ok(PackedI8 {
            k,
            n,
            quads,
            panels,
            scale,
            offset,
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
        // Zeros: the epilogue adds the bias.
        let (rows, mut dst) = super::packed_output("vitcx int8", x, (k, n), None, act)?;
        if rows == 0 || n == 0 {
            return Ok(dst);
        }
        let a = Operand::new(x, k, self.quads);
        let bias = self.bias.as_deref().filter(|_| with_bias);
        // The epilogue adds the bias (`sum * scale + bias`, one rounding each, as a separate
        // bias pass would), so the fused activation gets no bias of its own.
        super::for_each_tile(
            &mut dst,
            n,
            (MC, MR, NB),
            |t, c| {
                // SAFETY: `for_each_tile` gives tiles inside `dst`; its blocks in the panels and column vectors (all padded to whole blocks) and its input rows in `a`.
                unsafe { self.tile(kernel, &a, bias, t, c) }
            },
            |rows| {
                if let Some(act) = act {
                    bias_act_in_place(rows, None, act)
                }
            },
        );
        Ok(dst)
    }

    /// One micro-tile on `kernel`; `c` points at the tile's first output row.
    ///
    /// # Safety
    /// `c` must be valid for `tile.rows` rows of `n` values, and the tile inside the operands.
    unsafe fn tile(
        &self,
        kernel: Kernel,
        a: &Operand,
        bias: Option<&[f32]>,
        tile: Tile,
        c: *mut f32,
    ) {
        let col = tile.block * LANES;
        let valid = |b: usize| (self.n - (tile.block + b) * LANES).min(LANES);
        let t = TileArgs {
            a: a.bytes.as_ptr().add(tile.row * 4 * self.quads),
            row_scale: a.scale.as_ptr().add(tile.row),
            quads: self.quads,
            w: self.panels.as_ptr().add(tile.block * self.quads * LANES),
            ldw: self.quads * LANES,
            col_scale: self.scale.as_ptr().add(col),
            offset: self.offset.as_ptr().add(col),
            bias: bias.map_or(std::ptr::null(), |b| b.as_ptr().add(col)),
            c: c.add(col),
            ldc: self.n,
            valid: [],
        };
        macro_rules! dispatch {
            ($f:ident) => {
                match (tile.rows, tile.blocks) {
                    (MR, NB) => $f::<MR, NB>(t.blocks(std::array::from_fn(valid))),
                    (MR, _) => $f::<MR, 1>(t.blocks([valid(0)])),
                    (_, NB) => $f::<1, NB>(t.blocks(std::array::from_fn(valid))),
                    _ => $f::<1, 1>(t.blocks([valid(0)])),
                }
            };
        }
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni => dispatch!(tile_vnni),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => dispatch!(tile_avx2),
            _ => dispatch!(tile_portable_body),
        }
    }
}

/// One micro-tile's operands: `R` input rows of `4 * quads` bytes from `a` (as many apart)
/// with their scales from `row_scale`; `B` weight panels from `w`, `ldw` apart, with their
/// columns' scales, offsets and bias (null: none); the output rows from `c`, `ldc` apart, of
/// whose blocks `valid[b]` columns exist.
#[derive(Clone, Copy)]
struct TileArgs<const B: usize> {
    a: *const u8,
    row_scale: *const f32,
    quads: usize,
    w: *const i32,
    ldw: usize,
    col_scale: *const f32,
    offset: *const i32,
    bias: *const f32,
    c: *mut f32,
    ldc: usize,
    valid: [usize; B],
}

impl TileArgs<0> {
    /// The same operands over `B` column blocks with these valid widths.
    fn blocks<const B: usize>(self, valid: [usize; B]) -> TileArgs<B> {
        TileArgs {
            a: self.a,
            row_scale: self.row_scale,
            quads: self.quads,
            w: self.w,
            ldw: self.ldw,
            col_scale: self.col_scale,
            offset: self.offset,
            bias: self.bias,
            c: self.c,
            ldc: self.ldc,
            valid,
        }
    }
}

/// The f32 result of one exact sum: `(sum - offset) * (row scale * column scale) + bias`, in
/// this order in every kernel so that all give the same bits.
#[inline(always)]
fn epilogue(sum: i32, offset: i32, row_scale: f32, col_scale: f32, bias: f32) -> f32 {
    sum.wrapping_sub(offset) as f32 * (row_scale * col_scale) + bias
}

/// Which kernel runs the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// `vpdpbusd` on 512-bit vectors.
    Vnni,
    /// Portable code compiled for AVX2.
    Avx2,
    /// Portable code for any CPU.
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni") {
                return Kernel::Vnni;
            }
            if is_x86_feature_detected!("avx2") {
                return Kernel::Avx2;
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
            if is_x86_feature_detected!("avx2") {
                out.push(Kernel::Avx2);
            }
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni") {
                out.push(Kernel::Vnni);
            }
        }
        out
    }

    /// How `vitcx bench` names the kernel.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kernel::Vnni => "avx512-vnni (vpdpbusd)",
            Kernel::Avx2 => "avx2 (portable int8)",
            Kernel::Portable => "portable int8",
        }
    }
}

/// The input rows quantised per row ([`RowQuant`]): unsigned bytes, `4 * quads` per row (the
/// padding past `k` meets zero weights), and each row's scale.
struct Operand {
    bytes: Vec<u8>,
    scale: Vec<f32>,
}

impl Operand {
    fn new(x: &[f32], k: usize, quads: usize) -> Self {
        const ROWS: usize = 16;
        let (rows, width) = (x.len() / k, 4 * quads);
        let mut bytes = vec![0u8; rows * width];
        let mut quant = vec![RowQuant::of(&[]); rows];
        bytes
            .par_chunks_mut(ROWS * width)
            .zip(quant.par_chunks_mut(ROWS))
            .zip(x.par_chunks(ROWS * k))
            .for_each(|((o, qs), xs)| {
                for ((orow, q), xrow) in o.chunks_exact_mut(width).zip(qs).zip(xs.chunks_exact(k)) {
                    *q = RowQuant::of(xrow);
                    for (b, &v) in orow.iter_mut().zip(xrow) {
                        *b = q.byte(v);
                    }
                }
            });
        Operand {
            bytes,
            scale: quant.iter().map(|q| q.scale).collect(),
        }
    }
}

/// Portable micro-tile: `R` rows by `B` blocks of 16 columns, exact i32 sums of byte products
/// over all quads, then [`epilogue`].
///
/// # Safety
/// `a` must hold `R` rows of `4 * quads` bytes, `w` `B` panels `ldw` apart, the column vectors
/// `16 * B` values, and `c` `R` rows `ldc` apart with `16 * (B - 1) + valid[B - 1]` columns.
#[inline(always)]
unsafe fn tile_portable_body<const R: usize, const B: usize>(t: TileArgs<B>) {
    let mut acc = [[[0i32; LANES]; B]; R];
    for q in 0..t.quads {
        let mut wb = [[[0i32; LANES]; 4]; B];
        for b in 0..B {
            for l in 0..LANES {
                let v = (*t.w.add(b * t.ldw + q * LANES + l)).to_le_bytes();
                for e in 0..4 {
                    wb[b][e][l] = i32::from(v[e] as i8);
                }
            }
        }
        for r in 0..R {
            for b in 0..B {
                for e in 0..4 {
                    let ae = i32::from(*t.a.add(r * 4 * t.quads + 4 * q + e));
                    for l in 0..LANES {
                        acc[r][b][l] += ae * wb[b][e][l];
                    }
                }
            }
        }
    }
    for r in 0..R {
        let rs = *t.row_scale.add(r);
        for b in 0..B {
            for l in 0..t.valid[b] {
                let j = b * LANES + l;
                let bias = if t.bias.is_null() {
                    0.0
                } else {
                    *t.bias.add(j)
                };
                let sum = acc[r][b][l];
                *t.c.add(r * t.ldc + j) =
                    epilogue(sum, *t.offset.add(j), rs, *t.col_scale.add(j), bias);
            }
        }
    }
}

/// [`tile_portable_body`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn tile_avx2<const R: usize, const B: usize>(t: TileArgs<B>) {
    tile_portable_body::<R, B>(t)
}

/// AVX512-VNNI micro-tile (`vpdpbusd`), same contract and same bits as [`tile_portable_body`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn tile_vnni<const R: usize, const B: usize>(t: TileArgs<B>) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_si512(); B]; R];
    for q in 0..t.quads {
        let mut wv = [_mm512_setzero_si512(); B];
        for b in 0..B {
            wv[b] = _mm512_loadu_epi32(t.w.add(b * t.ldw + q * LANES));
        }
        for r in 0..R {
            // Four bytes of row r, in the order `vpdpbusd` pairs them with the panel's.
            let quad = (t.a.add(r * 4 * t.quads + 4 * q) as *const i32).read_unaligned();
            let av = _mm512_set1_epi32(quad);
            for b in 0..B {
                acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], av, wv[b]);
            }
        }
    }
    for b in 0..B {
        let mask = if t.valid[b] >= LANES {
            u16::MAX
        } else {
            (1u16 << t.valid[b]) - 1
        };
        let off = _mm512_loadu_epi32(t.offset.add(b * LANES));
        let cs = _mm512_loadu_ps(t.col_scale.add(b * LANES));
        let bias = if t.bias.is_null() {
            _mm512_setzero_ps()
        } else {
            _mm512_loadu_ps(t.bias.add(b * LANES))
        };
        for r in 0..R {
            let rs = _mm512_set1_ps(*t.row_scale.add(r));
            let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][b], off));
            let y = _mm512_add_ps(_mm512_mul_ps(v, _mm512_mul_ps(rs, cs)), bias);
            _mm512_mask_storeu_ps(t.c.add(r * t.ldc + b * LANES), mask, y);
        }
    }
}

packed_by_inherent_methods!(PackedI8, "vitcx int8 linear");

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: usize, k: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32) * k).sin() * 1.7).collect()
    }

    /// Quantisation and product written out plainly, one output at a time: what every kernel
    /// must give bit for bit.
    fn reference(x: &[f32], wt: &[f32], b: &[f32], k: usize, n: usize) -> Vec<f32> {
        let rows = x.len() / k;
        let cols: Vec<_> = (0..n)
            .map(|j| {
                let col: Vec<f32> = (0..k).map(|t| wt[t * n + j]).collect();
                let amax = col.iter().fold(0f32, |m, x| m.max(x.abs()));
                let (s, inv) = scale_of(amax);
                let q: Vec<i32> = col.iter().map(|&x| i32::from(quantise(x, inv))).collect();
                (q, s)
            })
            .collect();
        let mut out = vec![0f32; rows * n];
        for i in 0..rows {
            let row = &x[i * k..(i + 1) * k];
            let rq = RowQuant::of(row);
            let qx: Vec<i32> = row.iter().map(|&v| i32::from(rq.byte(v)) - 128).collect();
            for (j, (qw, sw)) in cols.iter().enumerate() {
                let dot: i32 = qx.iter().zip(qw).map(|(a, w)| a * w).sum();
                out[i * n + j] = dot as f32 * (rq.scale * sw) + b[j];
            }
        }
        out
    }

    #[test]
    fn fused_activation_is_the_separate_bias_activation_pass() {
        let (_, k, n) = super::super::testing::FUSED_DIMS;
        for kernel in Kernel::available() {
            super::super::testing::check_fused_activation(
                &format!("{kernel:?}"),
                seq,
                |x, wt, bias, with_bias, act| {
                    let packed = PackedI8::new(wt, k, n, bias).unwrap();
                    packed.forward_on(kernel, x, with_bias, act).unwrap()
                },
            );
        }
    }

    #[test]
    fn every_kernel_gives_the_plain_quantised_product() {
        // k not a multiple of 4 (a padded quad), n not a multiple of 16, rows spanning tasks and
        // tile tails, and a ViT-B reduction.
        for &(rows, k, n) in &[
            (1, 1, 1),
            (3, 5, 17),
            (9, 33, 50),
            (70, 64, 40),
            (133, 19, 33),
            (40, 768, 48),
            (17, 3072, 20),
        ] {
            let x = seq(rows * k, 0.37);
            let wt = seq(k * n, 0.71);
            let b = seq(n, 1.3);
            let packed = PackedI8::new(&wt, k, n, Some(b.clone())).unwrap();
            let want = reference(&x, &wt, &b, k, n);
            for kernel in Kernel::available() {
                let got = packed.forward_on(kernel, &x, true, None).unwrap();
                assert_eq!(got, want, "{kernel:?} ({rows}, {k}, {n})");
            }
            // And close to the f32 product: each operand is off by at most half a step.
            let exact: Vec<f64> = (0..rows * n)
                .map(|o| {
                    let (i, j) = (o / n, o % n);
                    f64::from(b[j])
                        + (0..k)
                            .map(|t| f64::from(x[i * k + t]) * f64::from(wt[t * n + j]))
                            .sum::<f64>()
                })
                .collect();
            let bound = 2.0 * k as f64 * 1.7 * 1.7 / 127.0;
            for (g, e) in want.iter().zip(&exact) {
                assert!((f64::from(*g) - e).abs() <= bound, "{g} vs {e}");
            }
        }
    }

    #[test]
    fn zero_rows_and_columns_and_non_finite_inputs() {
        let (k, n) = (6, 3);
        let mut wt = seq(k * n, 0.5);
        for t in 0..k {
            wt[t * n + 1] = 0.0; // column 1 all zero
        }
        let p = PackedI8::new(&wt, k, n, Some(vec![1.0, 2.0, 3.0])).unwrap();
        let mut x = vec![0f32; 3 * k]; // row 0 all zero
        x[k..].copy_from_slice(&seq(2 * k, 0.3));
        x[2 * k + 2] = f32::NAN;
        for kernel in Kernel::available() {
            let y = p.forward_on(kernel, &x, true, None).unwrap();
            assert_eq!(
                &y[..3],
                &[1.0, 2.0, 3.0],
                "{kernel:?}: zero row gives the bias"
            );
            assert_eq!(y[3 + 1], 2.0, "{kernel:?}: zero column gives the bias");
            assert!(
                y[6..].iter().all(|v| v.is_nan()),
                "{kernel:?}: NaN row stays NaN"
            );
            let no_bias = p.forward_on(kernel, &x[..k], false, None).unwrap();
            assert_eq!(no_bias, vec![0.0; 3]);
        }
    }

    #[test]
    fn bad_shapes_and_weights_are_errors() {
        assert!(PackedI8::new(&[1.0; 6], 2, 4, None).is_err());
        assert!(PackedI8::new(&[1.0; 8], 2, 4, Some(vec![0.0; 3])).is_err());
        assert!(PackedI8::new(&[1.0, f32::INFINITY, 0.0, 0.0], 2, 2, None).is_err());
        let p = PackedI8::new(&[1.0; 8], 2, 4, None).unwrap();
        assert!(p.forward(&[1.0; 3], true, None).is_err());
        assert_eq!(p.forward(&[], true, None).unwrap(), Vec::<f32>::new());
    }
}
