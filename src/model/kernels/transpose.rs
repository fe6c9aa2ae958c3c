//! A 2-D transpose for the linear layers' weights at load time (`(out, in)` to `(in, out)`).
//!
//! candle's strided copy walks the source one element at a time down its columns; for ViT-B/16
//! that was a fifth of loading a checkpoint and running one image (`perf` of `vitcx predict`).
//! Here the matrix goes in square tiles that stay in L1, the tiles' rows in parallel.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

/// Side of the square tiles.
const TILE: usize = 32;

/// `w (r, c)` -> `w^T (c, r)`, contiguous. CPU f32 in tiles; anything else, and a weight that
/// is being trained (a variable, whose gradient must flow back through the transpose), through
/// candle.
pub(crate) fn transpose(w: &Tensor) -> candle_core::Result<Tensor> {
    let (r, c) = w.dims2()?;
    if !(w.device().is_cpu() && w.dtype() == DType::F32) || w.track_op() {
        return w.t()?.contiguous();
    }
    let out = super::with_cpu_f32(w, "vitcx transpose", "weight", |v| transpose_slice(v, r, c))?;
    Tensor::from_vec(out, (c, r), w.device())
}

/// `src (r, c)` row-major -> `(c, r)` row-major.
fn transpose_slice(src: &[f32], r: usize, c: usize) -> Vec<f32> {
    let mut out = vec![0f32; r * c];
    if r == 0 || c == 0 {
        return out;
    }
    // Each task fills TILE output rows (TILE source columns) across every source row, a
    // TILE x TILE block at a time through a local copy (fixed-size loops the compiler unrolls).
    out.par_chunks_mut(TILE * r)
        .enumerate()
        .for_each(|(t, dst)| {
            let (j0, cols) = (t * TILE, dst.len() / r);
            let mut block = [[0f32; TILE]; TILE];
            for i0 in (0..r).step_by(TILE) {
                let rows = TILE.min(r - i0);
                for (ii, b) in block.iter_mut().enumerate().take(rows) {
                    let at = (i0 + ii) * c + j0;
                    b[..cols].copy_from_slice(&src[at..at + cols]);
                }
                for (jj, line) in dst.chunks_exact_mut(r).enumerate() {
                    for (ii, v) in line[i0..i0 + rows].iter_mut().enumerate() {
                        *v = block[ii][jj];
                    }
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candles_transpose() {
        for (r, c) in [(1, 1), (3, 70), (65, 33), (64, 96), (0, 5), (100, 1)] {
            let v: Vec<f32> = (0..r * c).map(|i| i as f32 * 0.5 - 7.0).collect();
            let w = Tensor::from_vec(v, (r, c), &Device::Cpu).unwrap();
            let ours = transpose(&w).unwrap();
            let theirs = w.t().unwrap().contiguous().unwrap();
            assert_eq!(ours.dims(), &[c, r]);
            assert_eq!(
                ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "({r}, {c})"
            );
        }
        // A variable keeps its gradient through the transpose.
        let v = candle_core::Var::ones((4, 6), DType::F32, &Device::Cpu).unwrap();
        let t = transpose(v.as_tensor()).unwrap();
        let grads = (t * 2.0).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads
            .get(v.as_tensor())
            .expect("a gradient for the variable");
        assert_eq!(g.to_vec2::<f32>().unwrap(), vec![vec![2.0; 6]; 4]);
        // A non-contiguous input (itself a transposed view) is made contiguous first.
        let w = Tensor::arange(0f32, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let back = transpose(&w.t().unwrap()).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }
}
