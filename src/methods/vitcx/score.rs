//! Causal impact scores of masks and the saliency they add up to (ViT-CX,
//! <https://arxiv.org/abs/2211.03064>, docs/algorithm.md §5): `S[c, i] = PA[i, c] - PB[i, c] + class_p`,
//! pixel-coverage-bias correction `W_i(u) = M_i(u) / sum_j M_j(u)` and
//! `sal[c](u) = (1/N) sum_i S[c, i] W_i(u)`.

use crate::error::{Error, Result};
use crate::methods::vitcx::mask::Masks;

/// Pixel-coverage-bias correction weights `W_i(u) = M_i(u) / sum_j M_j(u)`, 0 where the sum
/// is 0 (the reference gives NaN there; docs/algorithm.md §5.2) -> `(N, H, W)`. The sum and the division are
/// done in f64, the result is cast to f32.
pub fn coverage_weights(masks: &Masks) -> Vec<f32> {
    let len = masks.h * masks.w;
    let mut total = vec![0.0f64; len];
    for i in 0..masks.n {
        for (t, &v) in total.iter_mut().zip(masks.mask(i)) {
            *t += v as f64;
        }
    }
    let mut out = Vec::with_capacity(masks.n * len);
    for i in 0..masks.n {
        out.extend(masks.mask(i).iter().zip(&total).map(|(&v, &t)| {
            if t == 0.0 {
                0.0
            } else {
                (v as f64 / t) as f32
            }
        }));
    }
    out
}

/// Causal impact scores `S[c, i] = PA[i, c] - PB[i, c] + class_p` (docs/algorithm.md §5.1) as a `(C, N)`
/// row-major matrix (one row per class). `pa`, `pb`: `(N, C)` row-major probabilities of the
/// masked images and of the noisy originals; `class_p` is the clean probability of the
/// explained class, the same for every `c`.
pub fn scores(pa: &[f32], pb: &[f32], num_classes: usize, class_p: f32) -> Result<Vec<f32>> {
    if num_classes == 0 {
        return Err(Error::invalid("0 classes; expected at least one"));
    }
    if pa.len() != pb.len() || !pa.len().is_multiple_of(num_classes) {
        return Err(Error::invalid(format!(
            "probabilities of masked images ({} values) and of noisy originals ({} values) \
             must both be (N, {num_classes})",
            pa.len(),
            pb.len()
        )));
    }
    let n = pa.len() / num_classes;
    let mut s = vec![0.0f32; num_classes * n];
    for i in 0..n {
        for c in 0..num_classes {
            let k = i * num_classes + c;
            s[c * n + i] = pa[k] - pb[k] + class_p;
        }
    }
    Ok(s)
}

/// Saliency for each requested class: `sal[c](u) = (1/N) sum_i S[c, i] W_i(u)` with the scores
/// of [`scores`] and the weights of [`coverage_weights`] -> one `(H*W)` map per class in
/// `classes`, in that order. `pa`, `pb`: `(N, C)` row-major, `N = masks.n`. The sum over masks
/// accumulates in f64.
///
/// Errors: a class id `>= num_classes`, probabilities not of shape `(N, C)`, no masks.
pub fn saliency(
    pa: &[f32],
    pb: &[f32],
    num_classes: usize,
    class_p: f32,
    masks: &Masks,
    classes: &[usize],
) -> Result<Vec<Vec<f32>>> {
    if let Some(&bad) = classes.iter().find(|&&c| c >= num_classes) {
        return Err(Error::invalid(format!(
            "class {bad} out of range; model has {num_classes} classes"
        )));
    }
    let n = masks.n;
    if n == 0 {
        return Err(Error::invalid("no masks to score; expected at least one"));
    }
    if pa.len() != n * num_classes || pb.len() != n * num_classes {
        return Err(Error::invalid(format!(
            "probabilities have {} and {} values; expected {n} masks x {num_classes} classes = {}",
            pa.len(),
            pb.len(),
            n * num_classes
        )));
    }
    if masks.data.len() != n * masks.h * masks.w {
        return Err(Error::invalid(format!(
            "masks hold {} values; expected {n} x {} x {}",
            masks.data.len(),
            masks.h,
            masks.w
        )));
    }
    let s = scores(pa, pb, num_classes, class_p)?;
    let weights = coverage_weights(masks);
    let len = masks.h * masks.w;
    let mut out = Vec::with_capacity(classes.len());
    for &c in classes {
        let mut acc = vec![0.0f64; len];
        for i in 0..n {
            let si = s[c * n + i] as f64;
            for (a, &w) in acc.iter_mut().zip(&weights[i * len..(i + 1) * len]) {
                *a += si * w as f64;
            }
        }
        out.push(acc.into_iter().map(|a| (a / n as f64) as f32).collect());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masks(n: usize, h: usize, w: usize, data: Vec<f32>) -> Masks {
        Masks { n, h, w, data }
    }

    #[test]
    fn coverage_weights_sum_to_one_where_covered() {
        // pixel 3 is covered by no mask
        let m = masks(
            3,
            2,
            2,
            vec![0.2, 1.0, 0.0, 0.0, 0.3, 0.0, 0.5, 0.0, 0.5, 0.0, 0.25, 0.0],
        );
        let w = coverage_weights(&m);
        for u in 0..4 {
            let total: f32 = (0..3).map(|i| w[i * 4 + u]).sum();
            let want = if u == 3 { 0.0 } else { 1.0 };
            assert!((total - want).abs() < 1e-6, "pixel {u}: {total}");
        }
        assert!(w.iter().all(|v| v.is_finite()));
        assert!(
            (w[0] - 0.2).abs() < 1e-7 && (w[4] - 0.3).abs() < 1e-7 && (w[8] - 0.5).abs() < 1e-7
        );
        assert_eq!((w[2], w[6], w[10]), (0.0, 0.5 / 0.75, 0.25 / 0.75));
    }

    #[test]
    fn equal_probabilities_give_class_p_times_mean_coverage() {
        let m = masks(
            3,
            1,
            4,
            vec![0.2, 1.0, 0.0, 0.0, 0.3, 0.0, 0.5, 0.0, 0.5, 0.0, 0.25, 0.0],
        );
        let pa = [0.1, 0.7, 0.2, 0.3, 0.3, 0.4, 0.5, 0.25, 0.25];
        let class_p = 0.6;
        let sal = saliency(&pa, &pa, 3, class_p, &m, &[0, 1, 2]).unwrap();
        let w = coverage_weights(&m);
        for map in &sal {
            for u in 0..4 {
                let want = class_p * (w[u] + w[4 + u] + w[8 + u]) / 3.0;
                assert!((map[u] - want).abs() < 1e-7, "{} vs {want}", map[u]);
            }
            assert_eq!(map[3], 0.0);
        }
    }

    #[test]
    fn hand_computed_two_masks_two_pixels() {
        // M_1 = [1, 0.5], M_2 = [0, 0.5]; W_1 = [1, 0.5], W_2 = [0, 0.5]
        let m = masks(2, 1, 2, vec![1.0, 0.5, 0.0, 0.5]);
        // two classes; class_p = 0.5
        let pa = [0.9, 0.1, 0.2, 0.8];
        let pb = [0.6, 0.4, 0.4, 0.6];
        // S[0] = [0.3 + 0.5, -0.2 + 0.5] = [0.8, 0.3]; S[1] = [-0.3 + 0.5, 0.2 + 0.5] = [0.2, 0.7]
        let s = scores(&pa, &pb, 2, 0.5).unwrap();
        for (got, want) in s.iter().zip([0.8, 0.3, 0.2, 0.7]) {
            assert!((got - want).abs() < 1e-6);
        }
        let sal = saliency(&pa, &pb, 2, 0.5, &m, &[1, 0]).unwrap();
        // class 1: pixel 0: (0.2 * 1 + 0.7 * 0) / 2 = 0.1; pixel 1: (0.2 * 0.5 + 0.7 * 0.5) / 2 = 0.225
        // class 0: pixel 0: 0.8 / 2 = 0.4; pixel 1: (0.8 * 0.5 + 0.3 * 0.5) / 2 = 0.275
        let want = [[0.1, 0.225], [0.4, 0.275]];
        for (map, want) in sal.iter().zip(want) {
            for (g, w) in map.iter().zip(want) {
                assert!((g - w).abs() < 1e-6, "{g} vs {w}");
            }
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let m = masks(2, 1, 2, vec![1.0, 0.5, 0.0, 0.5]);
        let p = [0.5, 0.5, 0.5, 0.5];
        let err = saliency(&p, &p, 2, 0.5, &m, &[0, 2])
            .unwrap_err()
            .to_string();
        assert_eq!(err, "class 2 out of range; model has 2 classes");
        let err = saliency(&p[..3], &p, 2, 0.5, &m, &[0])
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected 2 masks x 2 classes"), "{err}");
        assert!(scores(&p, &p[..2], 2, 0.5).is_err());
        assert!(scores(&p, &p, 0, 0.5).is_err());
    }
}
