//! The integer products behind `--precision int8` and `--precision int16` (the linear layers
//! of the perturbed forward passes), as PyTorch's dynamic quantisation of `nn.Linear` computes
//! them, with a finer activation grain: weights quantised once per output channel (symmetric,
//! scale `max|w| / WMAX`), each input row (token) quantised when it arrives (symmetric, scale
//! `max|x| / AMAX`; PyTorch quantises the whole tensor at once), products summed exactly in
//! i32, and the sum scaled back to f32 with the bias added.
//!
//! Two schemes share the tiling and the epilogue ([`Scheme`]):
//! - [`I8`]: int8 weights and inputs, four products per 32-bit lane (`vpdpbusd`). The
//!   instruction multiplies unsigned by signed bytes, so the input is stored as `q + 128` and
//!   `128 * sum(q_w)` of each column is subtracted after the sum.
//! - [`I16`]: 12-bit weights and 14-bit inputs in 16-bit words, two products per lane
//!   (`vpdpwssd`): half int8's rate, twice f32's. It exists because int8 cannot keep the maps
//!   of nearly flat explanations: with int8 weights and exact f32 inputs, 3 of the zoo's 25
//!   maps already fall below Pearson 0.999 against f32, and 12-bit inputs with 12-bit weights
//!   still leave two there; 14-bit inputs with 12-bit weights keep all 25 (README). Its sums
//!   run in blocks of 128 products, whose i32 total cannot overflow (`128 * 8191 * 2047 <
//!   2^31`), added in f32 in order.
//!
//! Integer sums are exact, so every kernel gives the same bits:
//! - AVX512-VNNI (Intel Cascade Lake and later, AMD Zen 4 and later): `vpdpbusd` / `vpdpwssd`;
//! - anything else: the same sums in portable code (compiled once more for AVX2, where the
//!   compiler turns the products into 16-bit multiply-adds).

// The micro-kernels index their register tiles (rows x blocks x lanes) by position, with the
// same index into several arrays; iterator chains would hide that and not unroll as well.
#![allow(clippy::needless_range_loop)]

use std::marker::PhantomData;

use rayon::prelude::*;

use super::gelu::{bias_act_in_place, Activation};
use super::Tile;
use super::{columns_of, Panels};

/// Output columns per block: one 512-bit vector of i32.
const LANES: usize = 16;
/// Rows per parallel task: one task's input rows stay in L2 while it sweeps the weights.
const MC: usize = 72;
/// Adding and subtracting 1.5 * 2^23 rounds any |y| < 2^22 to an integer in the default rounding
/// mode (to nearest, ties to even, as `torch.round`), in plain arithmetic that vectorises, where
/// `round_ties_even` is a library call on baseline x86-64.
const MAGIC: f32 = 12_582_912.0;

/// One integer scheme: how many values share a 32-bit word, their ranges, and how a word holds
/// them (little-endian, the operand layout of the VNNI instruction).
pub(crate) trait Scheme: Copy + Send + Sync + std::fmt::Debug + 'static {
    /// The product's name in errors.
    const NAME: &'static str;
    /// Values per 32-bit word: 4 (bytes) or 2 (16-bit).
    const PER_WORD: usize;
    /// The largest quantised weight magnitude.
    const WMAX: f32;
    /// The largest quantised input magnitude.
    const AMAX: f32;
    /// What each stored input adds to its quantised value (128: stored unsigned).
    const INPUT_OFFSET: i32;
    /// Words summed in i32 before the sum is added in f32 (`usize::MAX`: all of `k` at once).
    const BLOCK_WORDS: usize;
    /// Bytes per stored value.
    const BYTES: usize = 4 / Self::PER_WORD;

    /// Value `e` of a weight word.
    fn weight(word: i32, e: usize) -> i32;
    /// Value `e` of an input word (as stored, offset included).
    fn input(word: i32, e: usize) -> i32;
    /// Quantised weight `q` in its place `e` of a word (the other bits zero).
    fn field(q: i32, e: usize) -> u32;
    /// Stores input value `q` (quantised, before the offset) at `dst`.
    fn put_input(dst: &mut [u8], q: i32);
}

/// int8 weights and inputs (`vpdpbusd`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct I8;

impl Scheme for I8 {
    const NAME: &'static str = "vitcx int8 linear";
    const PER_WORD: usize = 4;
    const WMAX: f32 = 127.0;
    const AMAX: f32 = 127.0;
    const INPUT_OFFSET: i32 = 128;
    const BLOCK_WORDS: usize = usize::MAX;

    #[inline(always)]
    fn weight(word: i32, e: usize) -> i32 {
        i32::from(word.to_le_bytes()[e] as i8)
    }
    #[inline(always)]
    fn input(word: i32, e: usize) -> i32 {
        i32::from(word.to_le_bytes()[e])
    }
    #[inline(always)]
    fn field(q: i32, e: usize) -> u32 {
        (q as u32 & 0xff) << (8 * e)
    }
    #[inline(always)]
    fn put_input(dst: &mut [u8], q: i32) {
        dst[0] = (q + Self::INPUT_OFFSET) as u8;
    }
}

/// 12-bit weights and 14-bit inputs in 16-bit words (`vpdpwssd`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct I16;

impl Scheme for I16 {
    const NAME: &'static str = "vitcx int16 linear";
    const PER_WORD: usize = 2;
    const WMAX: f32 = 2047.0;
    const AMAX: f32 = 8191.0;
    const INPUT_OFFSET: i32 = 0;
    /// 128 products per lane: `128 * 8191 * 2047 < 2^31`.
    const BLOCK_WORDS: usize = 64;

    #[inline(always)]
    fn weight(word: i32, e: usize) -> i32 {
        i32::from((word >> (16 * e)) as i16)
    }
    #[inline(always)]
    fn input(word: i32, e: usize) -> i32 {
        Self::weight(word, e)
    }
    #[inline(always)]
    fn field(q: i32, e: usize) -> u32 {
        (q as u32 & 0xffff) << (16 * e)
    }
    #[inline(always)]
    fn put_input(dst: &mut [u8], q: i32) {
        dst[..2].copy_from_slice(&(q as i16).to_le_bytes());
    }
}

/// `v / scale` clamped to `[-max, max]` and rounded to the nearest integer; a zero scale (an
/// all-zero row or column) gives zero.
#[inline(always)]
fn quantise(v: f32, inv_scale: f32, max: f32) -> i32 {
    (((v * inv_scale).clamp(-max, max) + MAGIC) - MAGIC) as i32
}

/// The scale of a row or column with largest magnitude `amax` on `max` levels, and its inverse
/// (0 for 0).
fn scale_of(amax: f32, max: f32) -> (f32, f32) {
    if amax == 0.0 {
        (0.0, 0.0)
    } else {
        (amax / max, max / amax)
    }
}

/// An input row's quantisation: `x ~ scale * q`, symmetric (scale `max|x| / AMAX`). A row
/// holding a NaN or an infinity gets a NaN scale, so its outputs are NaN as the f32 product's
/// would be.
///
/// Asymmetric int8 rows (`[min, max]` over 256 levels) were tried: the golden maps' Pearson
/// moved both ways (0.9989 to 0.99998 against 0.9991 to 0.99999 symmetric), no better overall.
#[derive(Debug, Clone, Copy)]
struct RowQuant {
    scale: f32,
    inv: f32,
}

impl RowQuant {
    #[inline(always)]
    fn of<S: Scheme>(row: &[f32]) -> Self {
        // 16 lanes of running maxima and NaN flags, in one pass the compiler vectorises
        // (`f32::max` over the row did not). NaN compares false, so only the flag sees it.
        let (mut m, mut nan) = ([0f32; LANES], [false; LANES]);
        let mut chunks = row.chunks_exact(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                let a = c[l].abs();
                nan[l] |= a.is_nan();
                if a > m[l] {
                    m[l] = a;
                }
            }
        }
        for (l, v) in chunks.remainder().iter().enumerate() {
            let a = v.abs();
            nan[l] |= a.is_nan();
            if a > m[l] {
                m[l] = a;
            }
        }
        let amax = m.iter().fold(0f32, |a, &b| if b > a { b } else { a });
        if !amax.is_finite() || nan.iter().any(|&b| b) {
            return RowQuant {
                scale: f32::NAN,
                inv: 0.0,
            };
        }
        let (scale, inv) = scale_of(amax, S::AMAX);
        RowQuant { scale, inv }
    }

    /// `v` quantised (before the stored offset).
    #[inline(always)]
    fn q<S: Scheme>(self, v: f32) -> i32 {
        quantise(v, self.inv, S::AMAX)
    }
}

/// A linear layer's weight `(k, n)` (the pre-transposed layout of the linear layers) quantised
/// as `S` in words of `S::PER_WORD` values along `k`, in blocks of 16 output columns, with
/// per-column scales, the unsigned-input correction and the bias kept in f32/i32.
///
/// `panels[(block * words + word) * 16 + lane]` holds elements `PER_WORD * word ..` of column
/// `16 * block + lane`, lowest first: the operand layout of `vpdpbusd` / `vpdpwssd`. Entries
/// past `k` or `n` are zero.
#[derive(Debug, Clone)]
pub(crate) struct PackedInt<S> {
    k: usize,
    n: usize,
    words: usize,
    panels: Vec<i32>,
    /// Per column: `max|w| / WMAX` (padded with zeros to whole blocks).
    scale: Vec<f32>,
    /// Per column: `INPUT_OFFSET * sum(q_w)`, what the stored inputs' offset adds to the sum.
    offset: Vec<i32>,
    /// The bias, padded with zeros to whole blocks.
    bias: Option<Vec<f32>>,
    scheme: PhantomData<S>,
}

/// int8 products (`--precision int8`).
pub(crate) type PackedI8 = PackedInt<I8>;
/// 16-bit products (`--precision int16`).
pub(crate) type PackedI16 = PackedInt<I16>;

impl<S: Scheme> PackedInt<S> {
    /// Quantises and packs `wt (k, n)` row-major and an optional bias of `n`. A weight that is
    /// not finite is an error: no integer stands for it.
    pub(crate) fn new(
        wt: &[f32],
        k: usize,
        n: usize,
        bias: Option<Vec<f32>>,
    ) -> candle_core::Result<Self> {
        if wt.len() != k * n {
            candle_core::bail!("{}: weight of {} values for ({k}, {n})", S::NAME, wt.len())
        }
        Self::from_columns(k, n, bias, |block, i| columns_of(wt, n, block, i))
    }

    /// [`Self::new`] from the f32 panels the layer keeps, read in place: they hold the same
    /// 16-column blocks (a ViT-B/16 packed in 0.18 s instead of 0.58 s through row-major copies).
    pub(crate) fn from_panels(
        p: &impl Panels,
        bias: Option<Vec<f32>>,
    ) -> candle_core::Result<Self> {
        let (k, n) = p.dims();
        Self::from_columns(k, n, bias, |block, i| p.columns(block, i))
    }

    /// Quantises and packs a weight `(k, n)` given by `cols(block, i)`: row `i`'s columns from
    /// `16 * block` to the next 16 or `n`.
    fn from_columns<'w>(
        k: usize,
        n: usize,
        bias: Option<Vec<f32>>,
        cols: impl Fn(usize, usize) -> &'w [f32] + Sync,
    ) -> candle_core::Result<Self> {
        if bias.as_ref().is_some_and(|b| b.len() != n) {
            candle_core::bail!(
                "{}: bias of {:?} for ({k}, {n})",
                S::NAME,
                bias.as_ref().map(Vec::len)
            )
        }
        let words = k.div_ceil(S::PER_WORD);
        let blocks = n.div_ceil(LANES);
        let padded = blocks * LANES;
        // Both passes run over blocks of 16 columns on all cores, reading rows in order (a
        // ViT-B/16 took 0.5 s to pack column by column on one core).
        let mut scale = vec![0f32; padded];
        let mut inv = vec![0f32; padded];
        // Each block's first value that is not finite, in row-major order, for the error.
        let bad = scale
            .par_chunks_mut(LANES)
            .zip(inv.par_chunks_mut(LANES))
            .enumerate()
            .filter_map(|(bi, (scale, inv))| {
                let (mut amax, mut finite) = ([0f32; LANES], true);
                for i in 0..k {
                    for (m, &v) in amax.iter_mut().zip(cols(bi, i)) {
                        *m = m.max(v.abs());
                        finite &= v.is_finite();
                    }
                }
                for l in 0..LANES {
                    (scale[l], inv[l]) = scale_of(amax[l], S::WMAX);
                }
                (!finite).then(|| {
                    (0..k)
                        .find_map(|i| {
                            let l = cols(bi, i).iter().position(|v| !v.is_finite())?;
                            Some((i, bi * LANES + l))
                        })
                        .unwrap_or((0, bi * LANES))
                })
            })
            .min();
        if let Some((i, j)) = bad {
            candle_core::bail!(
                "{}: weight ({i}, {j}) is {}; integer products need finite weights",
                S::NAME,
                cols(j / LANES, i)[j % LANES]
            )
        }
        let mut offset = vec![0i32; padded];
        let mut panels = vec![0i32; blocks * words * LANES];
        panels
            .par_chunks_exact_mut((words * LANES).max(1))
            .zip(offset.par_chunks_mut(LANES))
            .enumerate()
            .for_each(|(bi, (block, offset))| {
                let j0 = bi * LANES;
                let inv = &inv[j0..j0 + LANES];
                for (w, word) in block.chunks_exact_mut(LANES).enumerate() {
                    // Lane by lane over the 16 columns, so that the compiler vectorises it.
                    let mut packed = [0u32; LANES];
                    for e in 0..S::PER_WORD {
                        let t = S::PER_WORD * w + e;
                        if t >= k {
                            break;
                        }
                        let mut q = [0i32; LANES];
                        for (l, &v) in cols(bi, t).iter().enumerate() {
                            q[l] = quantise(v, inv[l], S::WMAX);
                        }
                        for l in 0..LANES {
                            offset[l] += S::INPUT_OFFSET * q[l];
                            packed[l] |= S::field(q[l], e);
                        }
                    }
                    for (v, p) in word.iter_mut().zip(packed) {
                        *v = p as i32;
                    }
                }
            });
        let bias = bias.map(|mut b| {
            b.resize(padded, 0.0);
            b
        });
        Ok(PackedInt {
            k,
            n,
            words,
            panels,
            scale,
            offset,
            bias,
            scheme: PhantomData,
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
        let (rows, mut dst) = super::packed_output(S::NAME, x, (k, n), None, act)?;
        if rows == 0 || n == 0 {
            return Ok(dst);
        }
        let a = Operand::new::<S>(x, k, self.words);
        let bias = self.bias.as_deref().filter(|_| with_bias);
        let (mr, nb) = tile_shape::<S>();
        // The epilogue adds the bias (`sum * scale + bias`, one rounding each, as a separate
        // bias pass would), so the fused activation gets no bias of its own.
        super::for_each_tile(
            &mut dst,
            n,
            (MC, mr, nb),
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
            a: a.bytes.as_ptr().add(tile.row * 4 * self.words),
            row_scale: a.scale.as_ptr().add(tile.row),
            words: self.words,
            w: self.panels.as_ptr().add(tile.block * self.words * LANES),
            ldw: self.words * LANES,
            col_scale: self.scale.as_ptr().add(col),
            offset: self.offset.as_ptr().add(col),
            bias: bias.map_or(std::ptr::null(), |b| b.as_ptr().add(col)),
            c: c.add(col),
            ldc: self.n,
            valid: [],
        };
        // Register tiles: int8 keeps 6 x 4 i32 accumulators; int16 also keeps the f32 totals of
        // its blocks, so 4 x 3 of each.
        macro_rules! dispatch {
            ($f:ident, $mr:literal, $nb:literal) => {
                match (tile.rows, tile.blocks) {
                    ($mr, $nb) => $f::<S, $mr, $nb>(t.blocks(std::array::from_fn(valid))),
                    ($mr, _) => $f::<S, $mr, 1>(t.blocks([valid(0)])),
                    (_, $nb) => $f::<S, 1, $nb>(t.blocks(std::array::from_fn(valid))),
                    _ => $f::<S, 1, 1>(t.blocks([valid(0)])),
                }
            };
        }
        let blocked = S::BLOCK_WORDS != usize::MAX;
        match (kernel, blocked) {
            #[cfg(target_arch = "x86_64")]
            (Kernel::Vnni, false) => dispatch!(tile_vnni, 6, 4),
            #[cfg(target_arch = "x86_64")]
            (Kernel::Vnni, true) => dispatch!(tile_vnni, 4, 3),
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2, false) => dispatch!(tile_avx2, 6, 4),
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2, true) => dispatch!(tile_avx2, 4, 3),
            (_, false) => dispatch!(tile_portable_body, 6, 4),
            (_, true) => dispatch!(tile_portable_body, 4, 3),
        }
    }
}

/// `(rows, column blocks)` of a micro-tile for `S` (must match `tile`'s dispatch).
fn tile_shape<S: Scheme>() -> (usize, usize) {
    if S::BLOCK_WORDS == usize::MAX {
        (6, 4)
    } else {
        (4, 3)
    }
}

packed_by_inherent_methods!([S: Scheme] PackedInt<S>, S::NAME, from_panels);

/// One micro-tile's operands: `R` input rows of `4 * words` bytes from `a` (as many apart)
/// with their scales from `row_scale`; `B` weight panels from `w`, `ldw` apart, with their
/// columns' scales, offsets and bias (null: none); the output rows from `c`, `ldc` apart, of
/// whose blocks `valid[b]` columns exist.
#[derive(Clone, Copy)]
struct TileArgs<const B: usize> {
    a: *const u8,
    row_scale: *const f32,
    words: usize,
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
            words: self.words,
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

impl<const B: usize> TileArgs<B> {
    /// The word ranges summed in i32 before their sum joins the f32 total, in order.
    #[inline(always)]
    fn blocks_of<S: Scheme>(&self) -> impl Iterator<Item = std::ops::Range<usize>> {
        let (words, step) = (self.words, S::BLOCK_WORDS.min(self.words.max(1)));
        (0..words.div_ceil(step).max(1)).map(move |i| i * step..((i + 1) * step).min(words))
    }
}

/// The f32 result of the sums: `(total + (last - offset)) * (row scale * column scale) +
/// bias`, where `total` is the f32 sum of the earlier blocks' i32 sums (none for int8), in this
/// order in every kernel so that all give the same bits.
#[inline(always)]
fn epilogue(total: f32, last: i32, offset: i32, row_scale: f32, col_scale: f32, bias: f32) -> f32 {
    (total + last.wrapping_sub(offset) as f32) * (row_scale * col_scale) + bias
}

/// Which kernel runs the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// `vpdpbusd` / `vpdpwssd` on 512-bit vectors.
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

    /// How `vitcx bench` names the kernel for `S`.
    pub(crate) fn name<S: Scheme>(self) -> &'static str {
        match (self, S::PER_WORD) {
            (Kernel::Vnni, 4) => "avx512-vnni (vpdpbusd)",
            (Kernel::Vnni, _) => "avx512-vnni (vpdpwssd)",
            (Kernel::Avx2, 4) => "avx2 (portable int8)",
            (Kernel::Avx2, _) => "avx2 (portable int16)",
            (Kernel::Portable, 4) => "portable int8",
            (Kernel::Portable, _) => "portable int16",
        }
    }
}

/// The input rows quantised per row ([`RowQuant`]) as `S` stores them, `4 * words` bytes per
/// row (the padding past `k` meets zero weights), and each row's scale.
struct Operand {
    bytes: Vec<u8>,
    scale: Vec<f32>,
}

impl Operand {
    fn new<S: Scheme>(x: &[f32], k: usize, words: usize) -> Self {
        const ROWS: usize = 16;
        let (rows, width) = (x.len() / k, 4 * words);
        let mut bytes = vec![0u8; rows * width];
        let mut quant = vec![RowQuant::of::<S>(&[]); rows];
        let avx512 = avx512_quantiser();
        bytes
            .par_chunks_mut(ROWS * width)
            .zip(quant.par_chunks_mut(ROWS))
            .zip(x.par_chunks(ROWS * k))
            .for_each(|((o, qs), xs)| {
                if avx512 {
                    // SAFETY: `avx512_quantiser` checked the CPU.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        quantise_rows_avx512::<S>(o, qs, xs, k, width)
                    }
                } else {
                    quantise_rows::<S>(o, qs, xs, k, width)
                }
            });
        Operand {
            bytes,
            scale: quant.iter().map(|q| q.scale).collect(),
        }
    }
}

/// Whether the rows can be quantised by [`quantise_rows`] compiled for AVX-512.
fn avx512_quantiser() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Rows `xs` (`k` values each) quantised into `o` (`width` bytes each) with their scales in
/// `qs`.
#[inline(always)]
fn quantise_rows<S: Scheme>(o: &mut [u8], qs: &mut [RowQuant], xs: &[f32], k: usize, width: usize) {
    for ((orow, q), xrow) in o.chunks_exact_mut(width).zip(qs).zip(xs.chunks_exact(k)) {
        *q = RowQuant::of::<S>(xrow);
        for (b, &v) in orow.chunks_exact_mut(S::BYTES).zip(xrow) {
            S::put_input(b, q.q::<S>(v));
        }
    }
}

/// [`quantise_rows`] compiled for AVX-512 (16 values per instruction instead of baseline
/// x86-64's 4); the same values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
unsafe fn quantise_rows_avx512<S: Scheme>(
    o: &mut [u8],
    qs: &mut [RowQuant],
    xs: &[f32],
    k: usize,
    width: usize,
) {
    quantise_rows::<S>(o, qs, xs, k, width)
}

/// Portable micro-tile: `R` rows by `B` blocks of 16 columns, exact i32 sums of the products
/// over each block of words, then [`epilogue`].
///
/// # Safety
/// `a` must hold `R` rows of `4 * words` bytes, `w` `B` panels `ldw` apart, the column vectors
/// `16 * B` values, and `c` `R` rows `ldc` apart with `16 * (B - 1) + valid[B - 1]` columns.
#[inline(always)]
unsafe fn tile_portable_body<S: Scheme, const R: usize, const B: usize>(t: TileArgs<B>) {
    let mut total = [[[0f32; LANES]; B]; R];
    let mut acc = [[[0i32; LANES]; B]; R];
    let mut first = true;
    for range in t.blocks_of::<S>() {
        if !first {
            for r in 0..R {
                for b in 0..B {
                    for l in 0..LANES {
                        total[r][b][l] += acc[r][b][l] as f32;
                        acc[r][b][l] = 0;
                    }
                }
            }
        }
        first = false;
        for q in range {
            let mut wb = [[[0i32; LANES]; 4]; B];
            for b in 0..B {
                for l in 0..LANES {
                    let v = *t.w.add(b * t.ldw + q * LANES + l);
                    for e in 0..S::PER_WORD {
                        wb[b][e][l] = S::weight(v, e);
                    }
                }
            }
            for r in 0..R {
                let word = (t.a.add(r * 4 * t.words + 4 * q) as *const i32).read_unaligned();
                for b in 0..B {
                    for e in 0..S::PER_WORD {
                        let ae = S::input(word, e);
                        for l in 0..LANES {
                            acc[r][b][l] += ae * wb[b][e][l];
                        }
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
                *t.c.add(r * t.ldc + j) = epilogue(
                    total[r][b][l],
                    acc[r][b][l],
                    *t.offset.add(j),
                    rs,
                    *t.col_scale.add(j),
                    bias,
                );
            }
        }
    }
}

/// [`tile_portable_body`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn tile_avx2<S: Scheme, const R: usize, const B: usize>(t: TileArgs<B>) {
    tile_portable_body::<S, R, B>(t)
}

/// AVX512-VNNI micro-tile (`vpdpbusd` for 4 values per word, `vpdpwssd` for 2), same contract
/// and same bits as [`tile_portable_body`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn tile_vnni<S: Scheme, const R: usize, const B: usize>(t: TileArgs<B>) {
    use std::arch::x86_64::*;
    let mut total = [[_mm512_setzero_ps(); B]; R];
    let mut acc = [[_mm512_setzero_si512(); B]; R];
    let sweep = |acc: &mut [[__m512i; B]; R], range: std::ops::Range<usize>| {
        for q in range {
            let mut wv = [_mm512_setzero_si512(); B];
            for b in 0..B {
                wv[b] = _mm512_loadu_epi32(t.w.add(b * t.ldw + q * LANES));
            }
            for r in 0..R {
                // One word of row r, in the order the instruction pairs it with the panel's.
                let word = (t.a.add(r * 4 * t.words + 4 * q) as *const i32).read_unaligned();
                let av = _mm512_set1_epi32(word);
                for b in 0..B {
                    acc[r][b] = if S::PER_WORD == 4 {
                        _mm512_dpbusd_epi32(acc[r][b], av, wv[b])
                    } else {
                        _mm512_dpwssd_epi32(acc[r][b], av, wv[b])
                    };
                }
            }
        }
    };
    let blocked = S::BLOCK_WORDS != usize::MAX;
    if blocked {
        let mut first = true;
        for range in t.blocks_of::<S>() {
            if !first {
                for r in 0..R {
                    for b in 0..B {
                        total[r][b] = _mm512_add_ps(total[r][b], _mm512_cvtepi32_ps(acc[r][b]));
                        acc[r][b] = _mm512_setzero_si512();
                    }
                }
            }
            first = false;
            sweep(&mut acc, range);
        }
    } else {
        sweep(&mut acc, 0..t.words);
    }
    for b in 0..B {
        let mask = super::lane_mask(t.valid[b]);
        let off = _mm512_loadu_epi32(t.offset.add(b * LANES));
        let cs = _mm512_loadu_ps(t.col_scale.add(b * LANES));
        let bias = if t.bias.is_null() {
            _mm512_setzero_ps()
        } else {
            _mm512_loadu_ps(t.bias.add(b * LANES))
        };
        for r in 0..R {
            let rs = _mm512_set1_ps(*t.row_scale.add(r));
            let last = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][b], off));
            // 0 + x is x for every converted integer: int8 keeps its single sum's bits.
            let v = if blocked {
                _mm512_add_ps(total[r][b], last)
            } else {
                last
            };
            let y = _mm512_add_ps(_mm512_mul_ps(v, _mm512_mul_ps(rs, cs)), bias);
            _mm512_mask_storeu_ps(t.c.add(r * t.ldc + b * LANES), mask, y);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: usize, k: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32) * k).sin() * 1.7).collect()
    }

    /// Quantisation and product written out plainly, one output at a time: what every kernel
    /// must give bit for bit (`S`'s blocks of `BLOCK_WORDS` words summed exactly, then in f32).
    fn reference<S: Scheme>(x: &[f32], wt: &[f32], b: &[f32], k: usize, n: usize) -> Vec<f32> {
        let rows = x.len() / k;
        let cols: Vec<_> = (0..n)
            .map(|j| {
                let col: Vec<f32> = (0..k).map(|t| wt[t * n + j]).collect();
                let amax = col.iter().fold(0f32, |m, x| m.max(x.abs()));
                let (s, inv) = scale_of(amax, S::WMAX);
                let q: Vec<i32> = col.iter().map(|&x| quantise(x, inv, S::WMAX)).collect();
                (q, s)
            })
            .collect();
        let block = S::BLOCK_WORDS.saturating_mul(S::PER_WORD);
        let mut out = vec![0f32; rows * n];
        for i in 0..rows {
            let row = &x[i * k..(i + 1) * k];
            let rq = RowQuant::of::<S>(row);
            let qx: Vec<i32> = row.iter().map(|&v| rq.q::<S>(v)).collect();
            for (j, (qw, sw)) in cols.iter().enumerate() {
                let sums: Vec<i32> = qx
                    .chunks(block)
                    .zip(qw.chunks(block))
                    .map(|(a, w)| a.iter().zip(w).map(|(a, w)| a * w).sum())
                    .collect();
                let (last, earlier) = sums.split_last().map_or((0, &[][..]), |(l, e)| (*l, e));
                let total = earlier.iter().fold(0f32, |t, s| t + *s as f32);
                out[i * n + j] = epilogue(total, last, 0, rq.scale, *sw, b[j]);
            }
        }
        out
    }

    #[test]
    fn fused_activation_is_the_separate_bias_activation_pass() {
        let (_, k, n) = super::super::testing::FUSED_DIMS;
        for kernel in Kernel::available() {
            super::super::testing::check_fused_activation(
                &format!("{kernel:?} int8"),
                seq,
                |x, wt, bias, with_bias, act| {
                    let packed = PackedI8::new(wt, k, n, bias).unwrap();
                    packed.forward_on(kernel, x, with_bias, act).unwrap()
                },
            );
            super::super::testing::check_fused_activation(
                &format!("{kernel:?} int16"),
                seq,
                |x, wt, bias, with_bias, act| {
                    let packed = PackedI16::new(wt, k, n, bias).unwrap();
                    packed.forward_on(kernel, x, with_bias, act).unwrap()
                },
            );
        }
    }

    /// Every kernel gives [`reference`]'s bits, and the result is within the quantisation's
    /// bound of the exact product (`steps` levels on each side).
    fn check_scheme<S: Scheme>() {
        // k not a multiple of 4 (a padded word), n not a multiple of 16, rows spanning tasks and
        // tile tails, several int16 blocks (k > 128, not a multiple), and a ViT-B reduction.
        for &(rows, k, n) in &[
            (1, 1, 1),
            (3, 5, 17),
            (9, 33, 50),
            (70, 64, 40),
            (133, 19, 33),
            (5, 301, 35),
            (40, 768, 48),
            (17, 3072, 20),
        ] {
            let x = seq(rows * k, 0.37);
            let wt = seq(k * n, 0.71);
            let b = seq(n, 1.3);
            let packed = PackedInt::<S>::new(&wt, k, n, Some(b.clone())).unwrap();
            let want = reference::<S>(&x, &wt, &b, k, n);
            for kernel in Kernel::available() {
                let got = packed.forward_on(kernel, &x, true, None).unwrap();
                assert_eq!(got, want, "{:?} {kernel:?} ({rows}, {k}, {n})", S::NAME);
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
            let steps = f64::from(S::WMAX.min(S::AMAX));
            let bound = 2.0 * k as f64 * 1.7 * 1.7 / steps + 1e-4 * k as f64;
            for (g, e) in want.iter().zip(&exact) {
                assert!((f64::from(*g) - e).abs() <= bound, "{g} vs {e}");
            }
        }
    }

    /// The AVX-512 build of the row quantiser stores the same bytes and scales as the portable
    /// one, NaN and infinite rows included.
    #[test]
    fn both_row_quantisers_agree() {
        fn check<S: Scheme>() {
            let (k, rows) = (37usize, 5);
            let width = 4 * k.div_ceil(S::PER_WORD);
            let mut x = seq(rows * k, 0.61);
            x[k + 3] = f32::NAN;
            x[2 * k + 30] = f32::INFINITY;
            x[3 * k..4 * k].fill(0.0);
            let run = |avx: bool| {
                let mut o = vec![0u8; rows * width];
                let mut q = vec![RowQuant::of::<S>(&[]); rows];
                if avx {
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        quantise_rows_avx512::<S>(&mut o, &mut q, &x, k, width)
                    }
                } else {
                    quantise_rows::<S>(&mut o, &mut q, &x, k, width)
                }
                let bits: Vec<u32> = q.iter().map(|q| q.scale.to_bits()).collect();
                (o, bits)
            };
            let portable = run(false);
            assert!(
                f32::from_bits(portable.1[1]).is_nan() && f32::from_bits(portable.1[2]).is_nan()
            );
            assert_eq!(portable.1[3], 0);
            if avx512_quantiser() {
                assert_eq!(run(true), portable, "{}", S::NAME);
            }
        }
        check::<I8>();
        check::<I16>();
    }

    #[test]
    fn every_kernel_gives_the_plain_quantised_product() {
        check_scheme::<I8>();
        check_scheme::<I16>();
    }

    /// The int16 products sit 16 times closer to f32's than int8's (a ViT-B-sized reduction),
    /// and their blocks cannot overflow at the extreme values.
    #[test]
    fn int16_is_closer_and_its_blocks_do_not_overflow() {
        let (rows, k, n) = (8, 3072, 32);
        let x = seq(rows * k, 0.37);
        let wt = seq(k * n, 0.71);
        let exact: Vec<f64> = (0..rows * n)
            .map(|o| {
                let (i, j) = (o / n, o % n);
                (0..k)
                    .map(|t| f64::from(x[i * k + t]) * f64::from(wt[t * n + j]))
                    .sum::<f64>()
            })
            .collect();
        let rms = |p: Vec<f32>| {
            let e: f64 = p
                .iter()
                .zip(&exact)
                .map(|(g, e)| (f64::from(*g) - e).powi(2))
                .sum();
            (e / exact.len() as f64).sqrt()
        };
        let e8 = rms(PackedI8::new(&wt, k, n, None)
            .unwrap()
            .forward(&x, true, None)
            .unwrap());
        let e16 = rms(PackedI16::new(&wt, k, n, None)
            .unwrap()
            .forward(&x, true, None)
            .unwrap());
        assert!(e16 * 16.0 < e8, "int16 error {e16} vs int8 {e8}");
        // Every input and weight at full scale with the same sign: each block sums to
        // 128 * 8191 * 2047, just under 2^31.
        let (x, wt) = (vec![1.0f32; 2 * k], vec![-1.0f32; k * 3]);
        for kernel in Kernel::available() {
            let y = PackedI16::new(&wt, k, 3, None)
                .unwrap()
                .forward_on(kernel, &x, false, None)
                .unwrap();
            // (An overflow would wrap to a large positive sum.)
            let want = -(k as f32);
            assert!(
                y.iter().all(|v| (v - want).abs() < 1e-3),
                "{kernel:?}: {y:?}"
            );
        }
    }

    #[test]
    fn zero_rows_and_columns_and_non_finite_inputs() {
        zero_rows_and_columns::<I8>();
        zero_rows_and_columns::<I16>();
    }

    fn zero_rows_and_columns<S: Scheme>() {
        let (k, n) = (6, 3);
        let mut wt = seq(k * n, 0.5);
        for t in 0..k {
            wt[t * n + 1] = 0.0; // column 1 all zero
        }
        let p = PackedInt::<S>::new(&wt, k, n, Some(vec![1.0, 2.0, 3.0])).unwrap();
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
    fn packing_from_f32_panels_is_packing_the_plain_weight() {
        use super::super::packed_f32::PackedF32;
        fn check<S: Scheme>(k: usize, n: usize) {
            let wt: Vec<f32> = (0..k * n)
                .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0)
                .collect();
            let bias = Some((0..n).map(|j| j as f32 * 0.25).collect::<Vec<_>>());
            let panels = PackedF32::new(&wt, k, n, None).unwrap();
            let a = PackedInt::<S>::new(&wt, k, n, bias.clone()).unwrap();
            let b = PackedInt::<S>::from_panels(&panels, bias).unwrap();
            assert_eq!(
                (a.k, a.n, a.words),
                (b.k, b.n, b.words),
                "{} {k}x{n}",
                S::NAME
            );
            assert_eq!(a.panels, b.panels, "{} {k}x{n}", S::NAME);
            assert_eq!(a.scale, b.scale);
            assert_eq!(a.offset, b.offset);
            assert_eq!(a.bias, b.bias);
        }
        for (k, n) in [(37, 45), (130, 17), (5, 16), (1, 1)] {
            check::<I8>(k, n);
            check::<I16>(k, n);
        }
        // The first weight that is not finite in row-major order is named, either way.
        let (k, n) = (9, 40);
        let mut wt = vec![0.5f32; k * n];
        wt[5 * n + 2] = f32::INFINITY;
        wt[3 * n + 20] = f32::NAN;
        wt[3 * n + 33] = f32::NEG_INFINITY;
        let plain = PackedI8::new(&wt, k, n, None).unwrap_err().to_string();
        let panels = PackedF32::new(&wt, k, n, None).unwrap();
        let from = PackedI16::from_panels(&panels, None)
            .unwrap_err()
            .to_string();
        assert!(plain.contains("weight (3, 20) is NaN"), "{plain}");
        assert!(from.contains("weight (3, 20) is NaN"), "{from}");
    }

    #[test]
    fn bad_shapes_and_weights_are_errors() {
        assert!(PackedI16::new(&[1.0; 6], 2, 4, None).is_err());
        assert!(PackedI8::new(&[1.0; 8], 2, 4, Some(vec![0.0; 3])).is_err());
        assert!(PackedI8::new(&[1.0, f32::INFINITY, 0.0, 0.0], 2, 2, None).is_err());
        let p = PackedI8::new(&[1.0; 8], 2, 4, None).unwrap();
        assert!(p.forward(&[1.0; 3], true, None).is_err());
        assert_eq!(p.forward(&[], true, None).unwrap(), Vec::<f32>::new());
    }
}
