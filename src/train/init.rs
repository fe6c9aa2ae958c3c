//! A starting point for a small ViT trained from scratch: a 2-D sine-cosine position embedding
//! and mimetic attention weights (Trockman & Kolter, "Mimetic Initialization of Self-Attention
//! Layers", ICML 2023). Both only set initial values of the ordinary timm tensors, so the model
//! stays a plain ViT.
//!
//! Why: trained ViTs attend to nearby and similar tokens and their value-projection products are
//! close to a negative identity; starting there, the demo ViT leaves its loss plateau after a
//! third of the images it needs from a random start (measured with
//! `scripts/train_probe_pytorch.py`, see scripts/README.md).

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::Result;
use crate::model::families::vit::random::{self, Arch};

/// The mimetic targets: per head `W_q W_k^T ~ QK.0 Z + QK.1 I`, per block
/// `W_v W_proj ~ VO.0 Z - VO.1 I`, `Z ~ N(0, 1/d)` (the paper's values for ViT-Tiny).
const QK: (f64, f64) = (0.7, 0.7);
const VO: (f64, f64) = (0.4, 0.4);

/// Replaces `pos_embed` (patch positions; prefix positions 0) and every block's `attn.qkv.weight`
/// (query and key rows) and value rows with `attn.proj.weight` in `state`, drawn from `seed`.
pub fn mimetic(
    state: &mut HashMap<String, Tensor>,
    arch: &Arch,
    seed: u64,
    device: &Device,
) -> Result<()> {
    let d = arch.dim;
    let grid = arch.image_size / arch.patch;
    if let Some(pos) = state.get("pos_embed") {
        let tokens = pos.dim(1)?;
        let mut values = vec![0f32; tokens * d];
        let prefix = tokens - grid * grid;
        for (k, row) in sincos_2d(grid, d).chunks(d).enumerate() {
            values[(prefix + k) * d..(prefix + k + 1) * d].copy_from_slice(row);
        }
        state.insert(
            "pos_embed".into(),
            Tensor::from_vec(values, (1, tokens, d), device)?,
        );
    }
    let heads = arch.heads;
    let hd = d / heads;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6d69_6d65);
    let target = |rng: &mut ChaCha8Rng, (a, b): (f64, f64), sign: f64| -> Vec<f64> {
        let z = random::normal(rng, d * d, 1.0);
        let scale = a / (d as f64).sqrt();
        (0..d * d)
            .map(|i| scale * f64::from(z[i]) + if i / d == i % d { sign * b } else { 0.0 })
            .collect()
    };
    for blk in 0..arch.depth {
        let mut qkv = vec![0f32; 3 * d * d];
        if let Some(t) = state.get(&format!("blocks.{blk}.attn.qkv.weight")) {
            qkv = t.flatten_all()?.to_vec1::<f32>()?;
        }
        // Query rows of head h are (U_h sqrt S_h)^T, key rows (V_h sqrt S_h)^T: the head's
        // W_q^T W_k is the best rank-hd approximation of its target.
        for h in 0..heads {
            let (u, s, v) = svd(&target(&mut rng, QK, 1.0), d);
            for r in 0..hd {
                let g = s[r].sqrt();
                for c in 0..d {
                    qkv[(h * hd + r) * d + c] = (u[c * d + r] * g) as f32;
                    qkv[(d + h * hd + r) * d + c] = (v[c * d + r] * g) as f32;
                }
            }
        }
        // W_v^T = U sqrt S, W_proj^T = sqrt S V^T, so x W_v^T W_proj^T = x (a Z - b I).
        let (u, s, v) = svd(&target(&mut rng, VO, -1.0), d);
        let mut proj = vec![0f32; d * d];
        for r in 0..d {
            let g = s[r].sqrt();
            for c in 0..d {
                qkv[(2 * d + r) * d + c] = (u[c * d + r] * g) as f32;
                // proj[c][r] = (sqrt S V^T)[r][c] = g * v[c][r]
                proj[c * d + r] = (v[c * d + r] * g) as f32;
            }
        }
        state.insert(
            format!("blocks.{blk}.attn.qkv.weight"),
            Tensor::from_vec(qkv, (3 * d, d), device)?,
        );
        state.insert(
            format!("blocks.{blk}.attn.proj.weight"),
            Tensor::from_vec(proj, (d, d), device)?,
        );
    }
    Ok(())
}

/// 2-D sine-cosine embedding of a `grid x grid` layout, row-major, `d` values per position: a
/// quarter each of sin and cos of x and of y at frequencies `10000^(-i / (d/4))`.
fn sincos_2d(grid: usize, d: usize) -> Vec<f32> {
    let q = d / 4;
    let mut out = vec![0f32; grid * grid * d];
    for y in 0..grid {
        for x in 0..grid {
            let row = &mut out[(y * grid + x) * d..(y * grid + x + 1) * d];
            for i in 0..q {
                let w = 1.0 / 10000f64.powf(i as f64 / q as f64);
                let (fx, fy) = (x as f64 * w, y as f64 * w);
                row[i] = fx.sin() as f32;
                row[q + i] = fx.cos() as f32;
                row[2 * q + i] = fy.sin() as f32;
                row[3 * q + i] = fy.cos() as f32;
            }
        }
    }
    out
}

/// Singular value decomposition of the square row-major `n x n` matrix `a` by one-sided Jacobi
/// rotations: `(U, S, V)` with `a = U diag(S) V^T`, `S` descending, `U` and `V` row-major with the
/// singular vectors as columns. Small matrices only (the attention widths of a demo ViT).
fn svd(a: &[f64], n: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut u = a.to_vec();
    let mut v = vec![0f64; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    for _sweep in 0..60 {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let (mut alpha, mut beta, mut gamma) = (0.0, 0.0, 0.0);
                for r in 0..n {
                    let (x, y) = (u[r * n + p], u[r * n + q]);
                    alpha += x * x;
                    beta += y * y;
                    gamma += x * y;
                }
                if gamma.abs() <= 1e-15 * (alpha * beta).sqrt() || gamma == 0.0 {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for m in [&mut u, &mut v] {
                    for r in 0..n {
                        let (x, y) = (m[r * n + p], m[r * n + q]);
                        m[r * n + p] = c * x - s * y;
                        m[r * n + q] = s * x + c * y;
                    }
                }
            }
        }
        if !rotated {
            break;
        }
    }
    let norms: Vec<f64> = (0..n)
        .map(|c| (0..n).map(|r| u[r * n + c].powi(2)).sum::<f64>().sqrt())
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| norms[j].total_cmp(&norms[i]));
    let (mut uo, mut vo) = (vec![0f64; n * n], vec![0f64; n * n]);
    for (k, &c) in order.iter().enumerate() {
        let inv = if norms[c] > 0.0 { 1.0 / norms[c] } else { 0.0 };
        for r in 0..n {
            uo[r * n + k] = u[r * n + c] * inv;
            vo[r * n + k] = v[r * n + c];
        }
    }
    (uo, order.iter().map(|&c| norms[c]).collect(), vo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svd_reconstructs_with_orthonormal_factors() {
        let n = 12;
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let a: Vec<f64> = random::normal(&mut rng, n * n, 1.0)
            .into_iter()
            .map(f64::from)
            .collect();
        let (u, s, v) = svd(&a, n);
        assert!(s.windows(2).all(|w| w[0] >= w[1]));
        for i in 0..n {
            for j in 0..n {
                let rec: f64 = (0..n).map(|k| u[i * n + k] * s[k] * v[j * n + k]).sum();
                assert!((rec - a[i * n + j]).abs() < 1e-9, "({i},{j})");
                let uu: f64 = (0..n).map(|r| u[r * n + i] * u[r * n + j]).sum();
                let vv: f64 = (0..n).map(|r| v[r * n + i] * v[r * n + j]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((uu - want).abs() < 1e-9 && (vv - want).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn mimetic_weights_make_value_output_near_negative_identity() {
        let arch = crate::train::demo_arch();
        let mut state = random::random_state_dict(&arch, 0, &Device::Cpu).unwrap();
        mimetic(&mut state, &arch, 0, &Device::Cpu).unwrap();
        let d = arch.dim;
        let qkv = state["blocks.0.attn.qkv.weight"].clone();
        let wv = qkv.narrow(0, 2 * d, d).unwrap();
        let proj = state["blocks.0.attn.proj.weight"].clone();
        // x W_v^T W_proj^T: diagonal near -VO.1, off-diagonal small.
        let p = wv.t().unwrap().matmul(&proj.t().unwrap()).unwrap();
        let p = p.to_vec2::<f32>().unwrap();
        let diag = (0..d).map(|i| p[i][i] as f64).sum::<f64>() / d as f64;
        assert!((diag + VO.1).abs() < 0.1, "mean diagonal {diag}");
        // Each head's query-key product has a positive trace (tokens attend to themselves).
        let (wq, wk) = (qkv.narrow(0, 0, d).unwrap(), qkv.narrow(0, d, d).unwrap());
        let hd = d / arch.heads;
        for h in 0..arch.heads {
            let q = wq.narrow(0, h * hd, hd).unwrap();
            let k = wk.narrow(0, h * hd, hd).unwrap();
            let m = q.t().unwrap().matmul(&k).unwrap().to_vec2::<f32>().unwrap();
            let trace: f32 = (0..d).map(|i| m[i][i]).sum();
            assert!(trace > 0.5 * hd as f32 * QK.1 as f32, "head {h}: {trace}");
        }
        // The position embedding is the sine-cosine grid after a zero [CLS] row.
        let pos = state["pos_embed"].to_vec3::<f32>().unwrap();
        assert!(pos[0][0].iter().all(|&v| v == 0.0));
        assert_eq!(pos[0][1][d / 4], 1.0); // cos(0) of x at (0, 0)
    }
}
