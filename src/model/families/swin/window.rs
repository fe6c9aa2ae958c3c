//! Shifted-window attention's bookkeeping, as timm's `swin_transformer.py` defines it: window
//! partition and reverse as tensor ops batched over all windows (the window index fastest within
//! each image), the relative position index, the attention mask of shifted windows, and the
//! additive bias `(G, H, T, T)` they make together for
//! [`crate::model::kernels::attention::self_attention_biased`].

use candle_core::Tensor;

use crate::error::Result;

/// The value timm and transformers add to the scores of token pairs from different regions of a
/// shifted window (not `-inf`: a softmax over them stays finite).
pub const MASKED: f32 = -100.0;

/// `(B, H, W, C)` -> `(B * nW, wh * ww, C)`, windows in row-major order within each image
/// (timm `window_partition`).
pub fn partition(xs: &Tensor, window: (usize, usize)) -> Result<Tensor> {
    let (b, h, w, c) = xs.dims4()?;
    let (wh, ww) = window;
    Ok(xs
        .reshape((b, h / wh, wh, w / ww, ww, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .contiguous()?
        .reshape((b * (h / wh) * (w / ww), wh * ww, c))?)
}

/// `(B * nW, wh * ww, C)` -> `(B, H, W, C)`, the inverse of [`partition`] (timm
/// `window_reverse`).
pub fn reverse(windows: &Tensor, grid: (usize, usize), window: (usize, usize)) -> Result<Tensor> {
    let (bn, _, c) = windows.dims3()?;
    let ((h, w), (wh, ww)) = (grid, window);
    let n = (h / wh) * (w / ww);
    let b = bn / n;
    Ok(windows
        .reshape((b, h / wh, w / ww, wh, ww, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .contiguous()?
        .reshape((b, h, w, c))?)
}

/// The cyclic shift of `(B, H, W, C)` by `-shift` (`forward`) or back by `+shift`, as
/// `torch.roll` over dims 1 and 2.
pub fn roll(xs: &Tensor, shift: (usize, usize), forward: bool) -> Result<Tensor> {
    let (sh, sw) = (shift.0 as i32, shift.1 as i32);
    let sign = if forward { -1 } else { 1 };
    Ok(xs.roll(sign * sh, 1)?.roll(sign * sw, 2)?)
}

/// For every pair of tokens `(i, j)` of a `wh x ww` window, the row of the relative position
/// bias table (timm `get_relative_position_index`): `(dy + wh - 1) * (2 ww - 1) + dx + ww - 1`.
pub fn relative_position_index(window: (usize, usize)) -> Vec<usize> {
    let (wh, ww) = window;
    let t = wh * ww;
    let mut out = Vec::with_capacity(t * t);
    for i in 0..t {
        let (yi, xi) = (i / ww, i % ww);
        for j in 0..t {
            let (yj, xj) = (j / ww, j % ww);
            out.push((yi + wh - 1 - yj) * (2 * ww - 1) + (xi + ww - 1 - xj));
        }
    }
    out
}

/// The attention mask of shifted windows over a `grid` tiled by `window` after a cyclic shift
/// by `shift`: `(nW, T, T)` values, 0 where two tokens come from the same region of the
/// unshifted grid and [`MASKED`] where the shift brought them together (timm `get_attn_mask`).
pub fn shift_mask(grid: (usize, usize), window: (usize, usize), shift: (usize, usize)) -> Vec<f32> {
    let ((h, w), (wh, ww), (sh, sw)) = (grid, window, shift);
    let region = |p: usize, n: usize, win: usize, s: usize| {
        usize::from(p >= n - win) + usize::from(p >= n - s)
    };
    let (nh, nw) = (h / wh, w / ww);
    let t = wh * ww;
    let mut out = Vec::with_capacity(nh * nw * t * t);
    for a in 0..nh {
        for b in 0..nw {
            let ids: Vec<usize> = (0..t)
                .map(|k| {
                    let (y, x) = (a * wh + k / ww, b * ww + k % ww);
                    region(y, h, wh, sh) * 3 + region(x, w, ww, sw)
                })
                .collect();
            for &i in &ids {
                out.extend(ids.iter().map(|&j| if i == j { 0.0 } else { MASKED }));
            }
        }
    }
    out
}

/// The additive attention bias of one block: its relative position bias `(H, T, T)` from
/// `table` (`rows x heads`, row-major), plus, for a shifted block, `mask` (`nW` masks of
/// `T x T`): `(1, H, T, T)` unshifted, `(nW, H, T, T)` shifted.
pub fn block_bias(
    table: &[f32],
    heads: usize,
    window: (usize, usize),
    mask: Option<&[f32]>,
) -> (Vec<f32>, usize) {
    let index = relative_position_index(window);
    let tt = index.len();
    let mut rel = vec![0f32; heads * tt];
    for (k, &row) in index.iter().enumerate() {
        for h in 0..heads {
            rel[h * tt + k] = table[row * heads + h];
        }
    }
    match mask {
        None => (rel, 1),
        Some(m) => {
            let groups = m.len() / tt;
            let mut out = Vec::with_capacity(groups * heads * tt);
            for g in 0..groups {
                let mg = &m[g * tt..(g + 1) * tt];
                for h in 0..heads {
                    out.extend(rel[h * tt..(h + 1) * tt].iter().zip(mg).map(|(r, m)| r + m));
                }
            }
            (out, groups)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn partition_and_reverse_round_trip() {
        let xs = Tensor::arange(0f32, 2.0 * 4.0 * 6.0 * 3.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 4, 6, 3))
            .unwrap();
        let w = partition(&xs, (2, 3)).unwrap();
        assert_eq!(w.dims(), &[2 * 4, 6, 3]);
        // Image 0, window (0, 1): rows 0-1, columns 3-5; its first token is (0, 3).
        let first = w.get(1).unwrap().get(0).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(first, vec![9.0, 10.0, 11.0]);
        // Image 1's first window follows image 0's four.
        let img1 = w.get(4).unwrap().get(0).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(img1[0], 72.0);
        let back = reverse(&w, (4, 6), (2, 3)).unwrap();
        let d = (back - &xs).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn roll_is_torch_roll_and_inverts() {
        let xs = Tensor::arange(0f32, 16.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 4, 4, 1))
            .unwrap();
        let s = roll(&xs, (1, 2), true).unwrap();
        // torch.roll(x, (-1, -2), (1, 2))[0, 0, 0] = x[0, 1, 2].
        let v = s.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v[0], 6.0);
        let back = roll(&s, (1, 2), false).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            xs.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let _ = DType::F32;
    }

    #[test]
    fn relative_index_matches_timm() {
        // timm get_relative_position_index(2, 2): [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]].
        assert_eq!(
            relative_position_index((2, 2)),
            vec![4, 3, 1, 0, 5, 4, 2, 1, 7, 6, 4, 3, 8, 7, 5, 4]
        );
        let idx = relative_position_index((7, 7));
        assert_eq!(idx.iter().max(), Some(&168));
        // The diagonal (no offset) is the table's centre row.
        assert!((0..49).all(|i| idx[i * 49 + i] == 84));
    }

    #[test]
    fn shift_mask_separates_regions() {
        // A 4x4 grid, 2x2 windows shifted by 1: window (0, 0) holds one region, the last
        // window four.
        let m = shift_mask((4, 4), (2, 2), (1, 1));
        assert_eq!(m.len(), 4 * 16);
        assert!(m[..16].iter().all(|&v| v == 0.0));
        let last = &m[48..];
        let zeros = last.iter().filter(|&&v| v == 0.0).count();
        assert_eq!(zeros, 4, "only the diagonal: four regions of one token");
        assert!(last.iter().all(|&v| v == 0.0 || v == MASKED));
    }

    #[test]
    fn bias_adds_the_mask_per_window() {
        let table: Vec<f32> = (0..9 * 2).map(|v| v as f32).collect();
        let (rel, g) = block_bias(&table, 2, (2, 2), None);
        assert_eq!((rel.len(), g), (2 * 16, 1));
        // Head 1, pair (0, 0): table row 4, column 1.
        assert_eq!(rel[16], 9.0);
        let mask = shift_mask((4, 4), (2, 2), (1, 1));
        let (b, g) = block_bias(&table, 2, (2, 2), Some(&mask));
        assert_eq!(g, 4);
        assert_eq!(b.len(), 4 * 2 * 16);
        assert_eq!(b[3 * 32 + 16 + 1], rel[16 + 1] + mask[3 * 16 + 1]);
    }
}
