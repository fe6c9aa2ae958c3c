//! The f32 product of the linear layers on CPUs with AVX-512F, with the weight packed once at
//! load into panels of 16 output columns (the layout the micro-kernel streams).
//!
//! `gemm` (what candle's matmul calls) packs both operands on every call and picks its blocking
//! from the matrix sizes. With the weight packed once and an 8-row by 48-column micro-tile (24
//! of the 32 vector registers accumulate; three weight loads and eight broadcasts per step), the
//! ViT-B/16 shapes run 2-4% faster than `gemm` here, fc1 level (`vitcx bench --linears`,
//! docs/performance.md).
//!
//! Each output sums its products in a fixed order (partial sums of [`KC`] along `k`, each added
//! to the bias, or to zero when an activation follows, which then adds the bias as the separate
//! pass does): a row's result does not depend on the other rows, the batch size or the thread
//! count, where `gemm`'s blocking, and so its rounding, depends on all three.

// The micro-kernel indexes its register tile (rows x blocks) by position.
#![allow(clippy::needless_range_loop)]

use super::gelu::{bias_act_in_place, Activation};
use super::Tile;

/// Output columns per block: one 512-bit vector of f32.
const LANES: usize = 16;
/// Rows per micro-tile.
const MR: usize = 8;
/// Column blocks per micro-tile: `MR * NB` = 24 accumulators.
const NB: usize = 3;
/// Products summed per partial sum along k (a fixed number, so that the rounding does not
/// depend on the matrix sizes).
const KC: usize = 256;
/// Rows per parallel task at most: the task's input rows stay in L2 while it sweeps the panels.
const MC: usize = 104;

/// A linear layer's weight `(k, n)` packed for the AVX-512F kernel: `panels[(block * k + i) *
/// 16 + lane]` is element `i` of column `16 * block + lane` (zero past `n`).
#[derive(Debug, Clone)]
pub(crate) struct PackedF32 {
    k: usize,
    n: usize,
    panels: Vec<f32>,
    bias: Option<Vec<f32>>,
}

impl PackedF32 {
    /// Whether this CPU runs the kernel (AVX-512F); elsewhere the layers keep `gemm`.
    pub(crate) fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Packs `wt (k, n)` row-major and an optional bias of `n`.
    pub(crate) fn new(
        wt: &[f32],
        k: usize,
        n: usize,
        bias: Option<Vec<f32>>,
    ) -> candle_core::Result<Self> {
        Self::packed(k, n, bias, wt.len(), |panel, j0, width| {
            for (row, dst) in wt.chunks_exact(n).zip(panel.chunks_exact_mut(LANES)) {
                dst[..width].copy_from_slice(&row[j0..j0 + width]);
            }
        })
    }

    /// Packs a checkpoint's `w (n, k)` (PyTorch's `(out, in)`) directly, without the
    /// transposed copy in between.
    pub(crate) fn from_out_in(
        w: &[f32],
        n: usize,
        k: usize,
        bias: Option<Vec<f32>>,
    ) -> candle_core::Result<Self> {
        Self::packed(k, n, bias, w.len(), |panel, j0, width| {
            // One output column at a time: a contiguous source row written 16 apart into a
            // panel that stays in L2.
            for l in 0..width {
                let src = &w[(j0 + l) * k..(j0 + l + 1) * k];
                for (dst, &v) in panel.chunks_exact_mut(LANES).zip(src) {
                    dst[l] = v;
                }
            }
        })
    }

    /// The panels of `(k, n)` filled in parallel by `fill(panel, first_column, width)`.
    fn packed(
        k: usize,
        n: usize,
        bias: Option<Vec<f32>>,
        len: usize,
        fill: impl Fn(&mut [f32], usize, usize) + Sync,
    ) -> candle_core::Result<Self> {
        use rayon::prelude::*;
        if len != k * n || bias.as_ref().is_some_and(|b| b.len() != n) {
            candle_core::bail!(
                "vitcx f32: weight of {len} values for ({k}, {n}), bias of {:?}",
                bias.as_ref().map(Vec::len)
            )
        }
        let blocks = n.div_ceil(LANES);
        let mut panels = vec![0f32; blocks * k * LANES];
        if k > 0 {
            panels
                .par_chunks_mut(k * LANES)
                .enumerate()
                .for_each(|(b, panel)| fill(panel, b * LANES, (n - b * LANES).min(LANES)));
        }
        Ok(PackedF32 { k, n, panels, bias })
    }

    /// `x (rows, k) @ W` -> `(rows, n)`, plus the bias if `with_bias`, then `act` if given
    /// (each task's rows while they are in cache).
    pub(crate) fn forward(
        &self,
        x: &[f32],
        with_bias: bool,
        act: Option<Activation>,
    ) -> candle_core::Result<Vec<f32>> {
        let n = self.n;
        if !Self::available() {
            candle_core::bail!("vitcx f32: the packed kernel needs AVX-512F")
        }
        // Without an activation the sums start from the bias (as `addmm`).
        let bias = self.bias.as_deref().filter(|_| with_bias);
        let (rows, mut dst) = super::packed_output("vitcx f32", x, (self.k, n), bias, act)?;
        if rows == 0 || n == 0 {
            return Ok(dst);
        }
        super::for_each_tile(
            &mut dst,
            n,
            (task_rows(rows, rayon::current_num_threads()), MR, NB),
            |t, c| {
                // SAFETY: AVX-512F was checked above; `for_each_tile` gives tiles inside `dst`,
                // whose blocks lie in the panels and whose rows lie in `x`.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    self.tile(x, t, c)
                }
            },
            |rows| {
                if let Some(act) = act {
                    bias_act_in_place(rows, bias, act)
                }
            },
        );
        Ok(dst)
    }

    /// One micro-tile; `c` points at the tile's first output row.
    ///
    /// # Safety
    /// AVX-512F; `c` valid for `tile.rows` rows of `n`, the tile inside `x` and the panels.
    #[cfg(target_arch = "x86_64")]
    unsafe fn tile(&self, x: &[f32], tile: Tile, c: *mut f32) {
        let (k, n) = (self.k, self.n);
        let a = x.as_ptr().add(tile.row * k);
        let w = self.panels.as_ptr().add(tile.block * k * LANES);
        let c = c.add(tile.block * LANES);
        let mask = |b: usize| super::lane_mask((n - (tile.block + b) * LANES).min(LANES));
        let args = (a, k, w, c, n);
        match (tile.rows, tile.blocks) {
            (MR, NB) => tile_avx512::<MR, NB>(args, [mask(0), mask(1), mask(2)]),
            (MR, _) => tile_avx512::<MR, 1>(args, [mask(0)]),
            (_, NB) => tile_avx512::<1, NB>(args, [mask(0), mask(1), mask(2)]),
            _ => tile_avx512::<1, 1>(args, [mask(0)]),
        }
    }
}

/// Rows per parallel task: a multiple of [`MR`] from half of [`MC`] (smaller tasks would sweep
/// the weights more often) up to [`MC`], the one whose busiest thread gets the least work when
/// the tasks are dealt out in turn (ties to the larger). Rows past the last multiple of [`MR`]
/// count four times: they run one row per tile. ViT-B/16 at batch 1 (197 rows) gets two tasks
/// of 104 and 93 rows, not four of 56 (the last 29), which left one core 112 rows and the
/// other 85.
fn task_rows(rows: usize, threads: usize) -> usize {
    let threads = threads.max(1);
    let cost = |size: usize| size + 3 * (size % MR);
    let busiest = |mc: usize| {
        let (chunks, rest) = (rows.div_ceil(mc), rows % mc);
        (0..threads)
            .map(|t| {
                let dealt = chunks / threads + usize::from(t < chunks % threads);
                if rest > 0 && t == (chunks - 1) % threads {
                    (dealt - 1) * mc + cost(rest)
                } else {
                    dealt * mc
                }
            })
            .max()
            .unwrap_or(0)
    };
    (MC / MR / 2..=MC / MR)
        .map(|u| u * MR)
        .min_by_key(|&mc| (busiest(mc), std::cmp::Reverse(mc)))
        .unwrap_or(MC)
}

/// `c (R rows, ldc apart) += a (R rows of k, k apart) @ w (B panels of k x 16, k * 16 apart)`,
/// the blocks' lanes limited to `masks`. Each output sums [`KC`] products at a time in a chain
/// of FMAs from zero, and each partial sum is added to `c`, as `gemm` blocks along k: one chain
/// over all of k rounded worse (the golden cases' probabilities up to 1.5e-6 off the
/// reference's, against 4.2e-7 blocked), for about 2% of the speed.
///
/// # Safety
/// AVX-512F; the operands as described, `c` writable at the masked lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<const R: usize, const B: usize>(
    (a, k, w, c, ldc): (*const f32, usize, *const f32, *mut f32, usize),
    masks: [u16; B],
) {
    use std::arch::x86_64::*;
    for k0 in (0..k).step_by(KC) {
        let mut acc = [[_mm512_setzero_ps(); B]; R];
        for i in k0..(k0 + KC).min(k) {
            let mut wv = [_mm512_setzero_ps(); B];
            for b in 0..B {
                wv[b] = _mm512_loadu_ps(w.add((b * k + i) * LANES));
            }
            for r in 0..R {
                let av = _mm512_set1_ps(*a.add(r * k + i));
                for b in 0..B {
                    acc[r][b] = _mm512_fmadd_ps(av, wv[b], acc[r][b]);
                }
            }
        }
        let mut sum = super::load_tile::<R, B>(c, ldc, masks);
        for r in 0..R {
            for b in 0..B {
                sum[r][b] = _mm512_add_ps(sum[r][b], acc[r][b]);
            }
        }
        super::store_tile(c, ldc, masks, &sum);
    }
}

packed_by_inherent_methods!(PackedF32, "vitcx f32");

impl super::Panels for PackedF32 {
    /// Row `i`'s 16 columns from `16 * block` (zero past `n`): one panel row.
    fn panel_row(&self, block: usize, i: usize) -> &[f32] {
        let at = (block * self.k + i) * LANES;
        &self.panels[at..at + LANES]
    }

    /// The weight back as `(k, n)` row-major (for the gradient path): the same values.
    fn unpack(&self) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        let mut wt = vec![0f32; k * n];
        for (b, panel) in self.panels.chunks_exact(k.max(1) * LANES).enumerate() {
            let (j0, width) = (b * LANES, (n - b * LANES).min(LANES));
            for (row, src) in wt.chunks_exact_mut(n).zip(panel.chunks_exact(LANES)) {
                row[j0..j0 + width].copy_from_slice(&src[..width]);
            }
        }
        wt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::Panels;
    use candle_core::{Device, Tensor};

    fn seq(n: usize, k: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32) * k).sin()).collect()
    }

    /// The plain product, partial sums of `KC` products added to the bias in `k` order (what
    /// the kernel computes, so bits can be compared).
    fn reference(x: &[f32], wt: &[f32], b: Option<&[f32]>, k: usize, n: usize) -> Vec<f32> {
        let rows = x.len() / k;
        let mut out = vec![0f32; rows * n];
        for r in 0..rows {
            for j in 0..n {
                let mut s = b.map_or(0.0, |b| b[j]);
                for k0 in (0..k).step_by(KC) {
                    let mut part = 0f32;
                    for i in k0..(k0 + KC).min(k) {
                        part = x[r * k + i].mul_add(wt[i * n + j], part);
                    }
                    s += part;
                }
                out[r * n + j] = s;
            }
        }
        out
    }

    #[test]
    fn packs_and_unpacks_the_same_values() {
        for (k, n) in [(5, 37), (16, 16), (3, 1), (1, 48), (0, 3)] {
            let wt = seq(k * n, 0.7);
            let p = PackedF32::new(&wt, k, n, None).unwrap();
            assert_eq!(p.unpack(), wt, "({k}, {n})");
            // From the checkpoint's (out, in) layout: the same panels.
            let mut w = vec![0f32; k * n];
            for i in 0..k {
                for j in 0..n {
                    w[j * k + i] = wt[i * n + j];
                }
            }
            let q = PackedF32::from_out_in(&w, n, k, None).unwrap();
            assert_eq!(q.panels, p.panels, "({k}, {n})");
        }
        assert!(PackedF32::new(&[0.0; 5], 2, 3, None).is_err());
        assert!(PackedF32::new(&[0.0; 6], 2, 3, Some(vec![0.0; 2])).is_err());
    }

    #[test]
    fn every_tile_shape_gives_the_blocked_sums() {
        if !PackedF32::available() {
            eprintln!("skipped: no AVX-512F");
            return;
        }
        // Rows: full tiles, tail rows and several tasks; columns: full 48-column tiles, single
        // blocks and a partial block.
        for (rows, k, n) in [
            (1, 3, 1),
            (7, 19, 37),
            (200, 40, 35),
            (300, 64, 150),
            (17, 5, 96),
        ] {
            let (x, wt, b) = (seq(rows * k, 0.37), seq(k * n, 0.71), seq(n, 1.3));
            let p = PackedF32::new(&wt, k, n, Some(b.clone())).unwrap();
            for with_bias in [true, false] {
                let got = p.forward(&x, with_bias, None).unwrap();
                let want = reference(&x, &wt, Some(&b[..]).filter(|_| with_bias), k, n);
                assert_eq!(got, want, "({rows}, {k}, {n}) bias {with_bias}");
            }
        }
    }

    #[test]
    fn a_row_does_not_depend_on_the_batch() {
        if !PackedF32::available() {
            eprintln!("skipped: no AVX-512F");
            return;
        }
        let (k, n) = (64, 100);
        let (x, wt) = (seq(500 * k, 0.37), seq(k * n, 0.71));
        let p = PackedF32::new(&wt, k, n, None).unwrap();
        let all = p.forward(&x, false, None).unwrap();
        let one = p.forward(&x[123 * k..124 * k], false, None).unwrap();
        assert_eq!(&all[123 * n..124 * n], &one[..]);
    }

    #[test]
    fn close_to_candles_matmul_and_fuses_the_activation() {
        if !PackedF32::available() {
            eprintln!("skipped: no AVX-512F");
            return;
        }
        let (rows, k, n) = (150, 300, 70);
        let (x, wt, b) = (seq(rows * k, 0.37), seq(k * n, 0.71), seq(n, 1.3));
        let p = PackedF32::new(&wt, k, n, Some(b.clone())).unwrap();
        let got =
            Tensor::from_vec(p.forward(&x, true, None).unwrap(), (rows, n), &Device::Cpu).unwrap();
        let xt = Tensor::from_vec(x.clone(), (rows, k), &Device::Cpu).unwrap();
        let wtt = Tensor::from_vec(wt.clone(), (k, n), &Device::Cpu).unwrap();
        let bt = Tensor::from_vec(b.clone(), n, &Device::Cpu).unwrap();
        let want = xt.matmul(&wtt).unwrap().broadcast_add(&bt).unwrap();
        assert!(super::super::max_abs_diff(&got, &want) < 1e-4);
        super::super::testing::check_fused_activation("f32", seq, |x, wt, bias, with_bias, act| {
            let (rows, k, n) = super::super::testing::FUSED_DIMS;
            assert_eq!(x.len(), rows * k);
            let p = PackedF32::new(wt, k, n, bias).unwrap();
            p.forward(x, with_bias, act).unwrap()
        });
        assert!(p.forward(&x[..k + 1], true, None).is_err());
    }

    #[test]
    fn tasks_split_the_rows_evenly() {
        assert_eq!(task_rows(1576, 2), 88); // 18 tasks of 88 (the last 80): 792 and 784 rows
        assert_eq!(task_rows(197, 2), 104); // 104 and 93
        assert_eq!(task_rows(6304, 2), 96); // 66 tasks (the last 64): 3168 and 3136
        assert_eq!(task_rows(3, 2), 104); // one task of 3
        assert_eq!(task_rows(0, 2), 104);
        assert_eq!(task_rows(6304, 1), 104);
    }
}
