//! Masks from patch-token feature maps (docs/algorithm.md §2.3-2.4, §3.1, §3.3, §3.5): bilinear
//! upsampling, min-max normalisation, cosine distances between masks and the merge of
//! clustered masks.
//!
//! The distances are computed in the token-grid space: every raw mask is `a_i * U (f_i - min_i)`
//! with `U` the fixed bilinear upsampling matrix, so all inner products follow from the
//! `(gh*gw, gh*gw)` matrix `U^T U` instead of the `(D, H*W)` masks.

use crate::resample::{torch_bilinear, torch_sample, TorchAxis};

/// Masks `(N, H, W)`, row-major, values in `[0, 1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Masks {
    /// Number of masks `N`.
    pub n: usize,
    /// Height `H` in pixels.
    pub h: usize,
    /// Width `W` in pixels.
    pub w: usize,
    /// `N * H * W` values, mask after mask.
    pub data: Vec<f32>,
}

impl Masks {
    /// Mask `i` as a flat `(H*W)` slice.
    ///
    /// Panics if `i >= n` (like slice indexing).
    pub fn mask(&self, i: usize) -> &[f32] {
        let len = self.h * self.w;
        &self.data[i * len..(i + 1) * len]
    }
}

/// Min-max normalises each row of length `row_len` in place; a constant row becomes all zeros
/// (the reference gives NaN there, docs/algorithm.md §2.4).
pub fn normalise_rows(data: &mut [f32], row_len: usize) {
    if row_len == 0 {
        return;
    }
    for row in data.chunks_mut(row_len) {
        let (lo, hi) = row
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        let range = hi - lo;
        if range > 0.0 && range.is_finite() {
            for v in row.iter_mut() {
                *v = (*v - lo) / range;
            }
        } else {
            // departs from the reference (NaN): a constant mask carries no information
            row.fill(0.0);
        }
    }
}

/// Feature maps `(D, gh, gw)` -> `D` raw masks `(D, H, W)`: upsample + normalise
/// (docs/algorithm.md §2.3-2.4).
///
/// Panics if `feature_maps.len() != d * gh * gw`.
pub fn raw_masks(
    feature_maps: &[f32],
    d: usize,
    grid: (usize, usize),
    size: (usize, usize),
) -> Masks {
    let mut data = torch_bilinear(feature_maps, d, grid, size);
    normalise_rows(&mut data, size.0 * size.1);
    Masks {
        n: d,
        h: size.0,
        w: size.1,
        data,
    }
}

/// Cosine distances `1 - s_ij` `(D, D)`, row-major, f64, between the raw masks of
/// [`raw_masks`], computed in the token-grid space (docs/algorithm.md §3.1, §3.5).
///
/// Each raw mask is `a_i * U g_i` with `g_i = f_i - min_i` (bilinear rows sum to 1, so the
/// min-max shift moves into the grid) and `a_i > 0`, which cancels in the cosine; so
/// `s_ij = g_i^T G g_j / sqrt(g_i^T G g_i * g_j^T G g_j)` with `G = U^T U = Gy (x) Gx`.
/// The per-map min and max (deciding also which masks are constant, hence zero) are taken in
/// f32 over the rows/columns where the bilinear pieces have their extrema, with the same
/// formula as [`torch_bilinear`]. A zero mask has similarity 0 (distance 1); the diagonal
/// is 0. This replaces the reference's `(D, H*W)` product (`2 D^2 H W` flops).
///
/// Panics if `feature_maps.len() != d * gh * gw`.
pub fn cosine_distances(
    feature_maps: &[f32],
    d: usize,
    grid: (usize, usize),
    size: (usize, usize),
) -> Vec<f64> {
    let (gh, gw) = grid;
    let (h, w) = size;
    let p = gh * gw;
    assert_eq!(
        feature_maps.len(),
        d * p,
        "feature_maps must hold (D, gh, gw) values"
    );
    if d == 0 {
        return Vec::new();
    }
    if h == 0 || w == 0 || p == 0 {
        // every mask is empty (zero): distance 1 off the diagonal
        return unit_distances(d);
    }
    let ay = TorchAxis::new(gh, h);
    let ax = TorchAxis::new(gw, w);
    let ys = ay.extreme_candidates();
    let xs = ax.extreme_candidates();
    let gy = gram(&ay.dense(gh), h, gh);
    let gx = gram(&ax.dense(gw), w, gw);

    // g_i = f_i - min_i (f64), k_i = G g_i, norms
    let mut g = vec![0.0f64; d * p];
    let mut zero = vec![false; d];
    for i in 0..d {
        let map = &feature_maps[i * p..(i + 1) * p];
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for &y in &ys {
            for &x in &xs {
                let v = torch_sample(map, gw, &ay, &ax, y, x);
                lo = lo.min(v);
                hi = hi.max(v);
            }
        }
        let range = hi - lo;
        // same decision as normalise_rows
        zero[i] = !(range > 0.0 && range.is_finite());
        if !zero[i] {
            for (dst, &v) in g[i * p..(i + 1) * p].iter_mut().zip(map) {
                *dst = v as f64 - lo as f64;
            }
        }
    }
    let mut k = vec![0.0f64; d * p];
    let mut tmp = vec![0.0f64; p];
    for i in 0..d {
        if zero[i] {
            continue;
        }
        kron_apply(
            &gy,
            &gx,
            gh,
            gw,
            &g[i * p..(i + 1) * p],
            &mut tmp,
            &mut k[i * p..(i + 1) * p],
        );
    }
    let norms: Vec<f64> = (0..d)
        .map(|i| {
            dot(&g[i * p..(i + 1) * p], &k[i * p..(i + 1) * p])
                .max(0.0)
                .sqrt()
        })
        .collect();
    let mut out = unit_distances(d);
    for i in 0..d {
        if zero[i] || norms[i] == 0.0 {
            continue;
        }
        let gi = &g[i * p..(i + 1) * p];
        for j in (i + 1)..d {
            if zero[j] || norms[j] == 0.0 {
                continue;
            }
            let s = dot(gi, &k[j * p..(j + 1) * p]) / (norms[i] * norms[j]);
            let dist = 1.0 - s;
            out[i * d + j] = dist;
            out[j * d + i] = dist;
        }
    }
    out
}

/// `(D, D)` distances with 0 on the diagonal and 1 elsewhere (similarity 0), the starting
/// point for pairs involving a zero mask.
fn unit_distances(d: usize) -> Vec<f64> {
    let mut out = vec![1.0f64; d * d];
    for i in 0..d {
        out[i * d + i] = 0.0;
    }
    out
}

/// `A^T A` for a dense `(rows, cols)` matrix `A`, f64.
fn gram(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut g = vec![0.0f64; cols * cols];
    for r in 0..rows {
        let row = &a[r * cols..(r + 1) * cols];
        for (p, &vp) in row.iter().enumerate() {
            if vp == 0.0 {
                continue;
            }
            for (q, &vq) in row.iter().enumerate() {
                g[p * cols + q] += vp * vq;
            }
        }
    }
    g
}

/// `out = (Gy (x) Gx) v` for `v` a row-major `(gh, gw)` grid: `Gy V Gx^T` (both symmetric).
fn kron_apply(
    gy: &[f64],
    gx: &[f64],
    gh: usize,
    gw: usize,
    v: &[f64],
    tmp: &mut [f64],
    out: &mut [f64],
) {
    // tmp = V Gx  (gh, gw)
    for r in 0..gh {
        for c in 0..gw {
            let mut s = 0.0;
            for t in 0..gw {
                s += v[r * gw + t] * gx[t * gw + c];
            }
            tmp[r * gw + c] = s;
        }
    }
    // out = Gy tmp
    for r in 0..gh {
        for c in 0..gw {
            let mut s = 0.0;
            for t in 0..gh {
                s += gy[r * gh + t] * tmp[t * gw + c];
            }
            out[r * gw + c] = s;
        }
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Cosine distances `(N, N)` computed directly from the masks (f64 accumulation): the
/// reference's way, for tests and as a cross-check of [`cosine_distances`].
pub fn cosine_distances_direct(masks: &Masks) -> Vec<f64> {
    let n = masks.n;
    let norms: Vec<f64> = (0..n)
        .map(|i| {
            masks
                .mask(i)
                .iter()
                .map(|&v| v as f64 * v as f64)
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    let mut out = unit_distances(n);
    for i in 0..n {
        if norms[i] == 0.0 {
            continue;
        }
        let mi = masks.mask(i);
        for j in (i + 1)..n {
            if norms[j] == 0.0 {
                continue;
            }
            let ip: f64 = mi
                .iter()
                .zip(masks.mask(j))
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum();
            let dist = 1.0 - ip / (norms[i] * norms[j]);
            out[i * n + j] = dist;
            out[j * n + i] = dist;
        }
    }
    out
}

/// Sums the raw masks of each cluster (`labels[i]` in `0..n_clusters`) and min-max normalises
/// each sum (docs/algorithm.md §3.3) -> `(n_clusters, H, W)`. A cluster without members gives an all-zero mask.
///
/// The sums are f32, added in ascending member order, as PyTorch does: this reproduces the
/// reference's masks to the last bit (an f64 sum differs by up to 8e-7 on the golden cases).
///
/// Panics if `labels.len() != raw.n` or a label is `>= n_clusters`; the labels of
/// [`crate::methods::vitcx::cluster::complete_linkage`] always fit.
pub fn merge_clusters(raw: &Masks, labels: &[usize], n_clusters: usize) -> Masks {
    assert_eq!(labels.len(), raw.n, "one cluster label per mask");
    assert!(
        labels.iter().all(|&l| l < n_clusters),
        "cluster labels must be below n_clusters"
    );
    let len = raw.h * raw.w;
    let mut data = vec![0.0f32; n_clusters * len];
    for (i, &l) in labels.iter().enumerate() {
        for (a, &v) in data[l * len..(l + 1) * len].iter_mut().zip(raw.mask(i)) {
            *a += v;
        }
    }
    normalise_rows(&mut data, len);
    Masks {
        n: n_clusters,
        h: raw.h,
        w: raw.w,
        data,
    }
}

/// The merged masks of [`merge_clusters`] applied to [`raw_masks`], bit for bit, without
/// holding the `D` raw masks: each cluster upsamples and normalises its members one at a time,
/// in ascending order as the sums need, so memory is the `n_clusters` merged masks plus one
/// mask per thread instead of `D` (768 masks are 154 MB for ViT-B at 224 px, 824 MB for DINOv2
/// at 518). Clusters run in parallel.
///
/// Panics if `feature_maps.len() != d * gh * gw`, `labels.len() != d` or a label is
/// `>= n_clusters`.
pub fn merged_masks(
    feature_maps: &[f32],
    d: usize,
    grid: (usize, usize),
    size: (usize, usize),
    labels: &[usize],
    n_clusters: usize,
) -> Masks {
    use rayon::prelude::*;
    let p = grid.0 * grid.1;
    assert_eq!(
        feature_maps.len(),
        d * p,
        "feature_maps must hold (D, gh, gw) values"
    );
    assert_eq!(labels.len(), d, "one cluster label per mask");
    assert!(
        labels.iter().all(|&l| l < n_clusters),
        "cluster labels must be below n_clusters"
    );
    let len = size.0 * size.1;
    let mut members = vec![Vec::new(); n_clusters];
    for (i, &l) in labels.iter().enumerate() {
        members[l].push(i);
    }
    let mut data = vec![0.0f32; n_clusters * len];
    if len > 0 {
        data.par_chunks_mut(len)
            .zip(members.par_iter())
            .for_each(|(acc, members)| {
                for &i in members {
                    let one = raw_masks(&feature_maps[i * p..(i + 1) * p], 1, grid, size);
                    for (a, &v) in acc.iter_mut().zip(&one.data) {
                        *a += v;
                    }
                }
                normalise_rows(acc, len);
            });
    }
    Masks {
        n: n_clusters,
        h: size.0,
        w: size.1,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::npy::read_npy;
    use rand::{Rng, SeedableRng};

    const CASES: [&str; 3] = ["vit_timm", "deit_distilled_timm", "vit_hf"];

    fn case_path(case: &str, file: &str) -> String {
        format!("{}/tests/data/{case}/{file}", env!("CARGO_MANIFEST_DIR"))
    }

    fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    fn random_maps(seed: u64, d: usize, p: usize) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..d * p)
            .map(|_| rng.random::<f32>() * 4.0 - 2.0)
            .collect()
    }

    #[test]
    fn normalise_rows_scales_to_unit_range_and_zeroes_constant_rows() {
        let mut data = vec![2.0, 4.0, 3.0, 5.0, 5.0, 5.0];
        normalise_rows(&mut data, 3);
        assert_eq!(data, vec![0.0, 1.0, 0.5, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn constant_feature_map_gives_zero_mask_not_nan() {
        let mut maps = random_maps(3, 2, 9);
        maps[9..].fill(0.7);
        let m = raw_masks(&maps, 2, (3, 3), (10, 10));
        assert!(m.mask(1).iter().all(|&v| v == 0.0));
        assert!(m.data.iter().all(|v| v.is_finite()));
        let first = m.mask(0);
        assert_eq!(first.iter().cloned().fold(f32::INFINITY, f32::min), 0.0);
        assert_eq!(first.iter().cloned().fold(f32::NEG_INFINITY, f32::max), 1.0);
    }

    #[test]
    fn grid_distances_agree_with_direct_on_random_maps() {
        // (grid, size): upsampling, non-square, identity and downsampling
        for (k, &(grid, size)) in [
            ((14, 14), (224, 224)),
            ((3, 5), (17, 11)),
            ((4, 4), (4, 4)),
            ((6, 7), (4, 5)),
        ]
        .iter()
        .enumerate()
        {
            let d = 9;
            let p = grid.0 * grid.1;
            let mut maps = random_maps(10 + k as u64, d, p);
            maps[4 * p..5 * p].fill(-1.25); // constant map -> zero mask
            let fast = cosine_distances(&maps, d, grid, size);
            let direct = cosine_distances_direct(&raw_masks(&maps, d, grid, size));
            let diff = max_abs_diff(&fast, &direct);
            assert!(diff < 1e-5, "grid {grid:?} size {size:?}: max diff {diff}");
            for j in 0..d {
                assert_eq!(fast[j * d + j], 0.0);
                if j != 4 {
                    assert_eq!(fast[4 * d + j], 1.0);
                    assert_eq!(fast[j * d + 4], 1.0);
                }
            }
        }
    }

    #[test]
    fn merge_clusters_sums_then_normalises() {
        let raw = Masks {
            n: 3,
            h: 1,
            w: 3,
            data: vec![0.0, 0.5, 1.0, 1.0, 0.0, 0.0, 0.2, 0.2, 0.2],
        };
        let merged = merge_clusters(&raw, &[0, 1, 0], 2);
        assert_eq!(merged.n, 2);
        // From feature maps: the streamed merge equals raw masks + merge, bit for bit, with an
        // empty cluster, a constant map and a non-square grid and size.
        let maps = random_maps(5, 6, 12);
        let mut maps = maps;
        maps[2 * 12..3 * 12].fill(0.25);
        let labels = [2, 0, 2, 0, 2, 3];
        let raw6 = raw_masks(&maps, 6, (3, 4), (7, 10));
        assert_eq!(
            merged_masks(&maps, 6, (3, 4), (7, 10), &labels, 4),
            merge_clusters(&raw6, &labels, 4)
        );
        assert!(merged_masks(&maps, 6, (3, 4), (7, 10), &labels, 4)
            .mask(1)
            .iter()
            .all(|&v| v == 0.0));
        // cluster 0: [0.2, 0.7, 1.2] -> [0, 0.5, 1]
        let c0 = merged.mask(0);
        assert!(
            (c0[0] - 0.0).abs() < 1e-7 && (c0[1] - 0.5).abs() < 1e-6 && (c0[2] - 1.0).abs() < 1e-7
        );
        assert_eq!(merged.mask(1), &[1.0, 0.0, 0.0]);
    }

    /// Golden cases: grid distances vs direct ones, then clustering + merge vs `masks.npy`.
    #[test]
    fn golden_distances_and_merged_masks() {
        for case in CASES {
            let fm = read_npy(case_path(case, "feature_map.npy")).unwrap();
            let (d, gh, gw) = (fm.shape[0], fm.shape[1], fm.shape[2]);
            let maps = fm.to_f32();
            let raw = raw_masks(&maps, d, (gh, gw), (224, 224));
            let fast = cosine_distances(&maps, d, (gh, gw), (224, 224));
            let direct = cosine_distances_direct(&raw);
            let dist_diff = max_abs_diff(&fast, &direct);
            assert!(dist_diff < 1e-5, "{case}: distance max diff {dist_diff}");

            let clustering = super::super::cluster::complete_linkage(&fast, d, 0.1).unwrap();
            let merged = merge_clusters(&raw, &clustering.labels, clustering.n_clusters);
            let golden = read_npy(case_path(case, "masks.npy")).unwrap();
            assert_eq!(golden.shape, vec![merged.n, 224, 224], "{case}: mask count");
            let golden = golden.to_f32();
            let len = 224 * 224;
            // as a set: each golden mask matched by one of ours
            let mut set_diff = 0.0f32;
            let mut used = vec![false; merged.n];
            for g in golden.chunks_exact(len) {
                let (best, diff) = (0..merged.n)
                    .map(|i| {
                        let diff = merged
                            .mask(i)
                            .iter()
                            .zip(g)
                            .map(|(a, b)| (a - b).abs())
                            .fold(0.0f32, f32::max);
                        (i, diff)
                    })
                    .min_by(|a, b| a.1.total_cmp(&b.1))
                    .unwrap();
                assert!(!used[best], "{case}: mask {best} matched twice");
                used[best] = true;
                set_diff = set_diff.max(diff);
            }
            assert!(set_diff < 1e-5, "{case}: mask max diff {set_diff}");
            // in order: the labels follow scikit-learn's numbering, so the order is the reference's
            let order_diff = merged
                .data
                .iter()
                .zip(&golden)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(
                order_diff < 1e-5,
                "{case}: masks out of the reference order (diff {order_diff})"
            );
            // f32 arithmetic in PyTorch's order: the masks are bit-identical to the reference's
            assert_eq!(merged.data, golden, "{case}: masks differ in the last bits");
            // ... also when made cluster by cluster, without the raw masks.
            let streamed = merged_masks(
                &maps,
                d,
                (gh, gw),
                (224, 224),
                &clustering.labels,
                clustering.n_clusters,
            );
            assert_eq!(
                streamed, merged,
                "{case}: merged_masks differs from merge_clusters"
            );
            eprintln!(
                "{case}: N {} distance grid-vs-direct {dist_diff:.3e} mask (ordered) {order_diff:.3e}",
                merged.n
            );
        }
    }
}
