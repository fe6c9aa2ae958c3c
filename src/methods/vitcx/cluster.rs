//! Complete-linkage agglomerative clustering of masks on a precomputed distance matrix
//! (ViT-CX, <https://arxiv.org/abs/2211.03064>, docs/algorithm.md §3.2), reproducing what the
//! reference gets from scikit-learn's `AgglomerativeClustering(linkage="complete",
//! distance_threshold=t)`: the dendrogram of SciPy's nearest-neighbour chain, the cut rule
//! `n_clusters = 1 + count(heights >= t)` and scikit-learn's `_hc_cut` label numbering, so the
//! clusters come out in the reference's order (which decides each mask's noise draw).

use crate::error::{Error, Result};

/// Result of agglomerative clustering.
#[derive(Debug, Clone, PartialEq)]
pub struct Clustering {
    /// Cluster of each input, in `0..n_clusters`.
    pub labels: Vec<usize>,
    /// Number of clusters after the cut.
    pub n_clusters: usize,
    /// All `n - 1` dendrogram heights, ascending.
    pub merge_distances: Vec<f64>,
}

/// One dendrogram merge in SciPy's linkage-matrix form: node ids `a < b` (leaves `0..n`,
/// merge `k` creates node `n + k`) and the height.
#[derive(Debug, Clone, Copy)]
struct Merge {
    a: usize,
    b: usize,
    height: f64,
}

/// Complete-linkage agglomerative clustering on a precomputed distance matrix `(n, n)`,
/// row-major (only the upper triangle is read, as scikit-learn does), cut with
/// scikit-learn's rule `n_clusters = 1 + count(merge distances >= threshold)`: merges strictly
/// below the threshold happen.
///
/// O(n^2) memory and time: SciPy's nearest-neighbour chain (`scipy.cluster.hierarchy.linkage`,
/// `_hierarchy.nn_chain`), including its tie-breaking, merges sorted stably by height.
///
/// Label rule: scikit-learn's `_hc_cut` — starting from the root, the node with the largest id
/// is split until `n_clusters` nodes remain (kept in a binary heap of negated ids); cluster `k`
/// is the `k`-th entry of that heap array. This matches the reference's cluster order exactly
/// whenever the dendrogram is the same (always, without tied distances).
///
/// Errors: `n == 0`, `dist.len() != n * n`, a NaN distance, threshold outside `[0, 1]`.
pub fn complete_linkage(dist: &[f64], n: usize, threshold: f64) -> Result<Clustering> {
    if !(0.0..=1.0).contains(&threshold) {
        return Err(Error::invalid(format!(
            "threshold {threshold} out of range; expected a value in [0, 1]"
        )));
    }
    if n == 0 {
        return Err(Error::invalid("no masks to cluster; expected at least one"));
    }
    if dist.len() != n * n {
        return Err(Error::invalid(format!(
            "distance matrix has {} values; expected {n} x {n} = {}",
            dist.len(),
            n * n
        )));
    }
    for i in 0..n {
        for j in (i + 1)..n {
            if dist[i * n + j].is_nan() {
                return Err(Error::invalid(format!(
                    "distance between masks {i} and {j} is NaN; expected a number"
                )));
            }
        }
    }
    let merges = nn_chain(dist, n);
    let n_clusters = 1 + merges.iter().filter(|m| m.height >= threshold).count();
    let labels = hc_cut(&merges, n, n_clusters);
    Ok(Clustering {
        labels,
        n_clusters,
        merge_distances: merges.iter().map(|m| m.height).collect(),
    })
}

/// SciPy's `nn_chain` for complete linkage, followed by its stable sort and `label` pass.
fn nn_chain(dist: &[f64], n: usize) -> Vec<Merge> {
    // full symmetric copy built from the upper triangle
    let mut d = vec![0.0f64; n * n];
    for i in 0..n {
        for j in (i + 1)..n {
            d[i * n + j] = dist[i * n + j];
            d[j * n + i] = dist[i * n + j];
        }
    }
    let mut size = vec![1usize; n];
    let mut chain: Vec<usize> = Vec::with_capacity(n);
    // (slot x, slot y, height) with x < y; slot y holds the merged cluster afterwards
    let mut raw: Vec<(usize, usize, f64)> = Vec::with_capacity(n.saturating_sub(1));
    for _ in 1..n {
        if chain.is_empty() {
            // n - 1 merges leave at least two live slots before each merge
            if let Some(first) = (0..n).find(|&i| size[i] > 0) {
                chain.push(first);
            }
        }
        let (x, y, height) = loop {
            let len = chain.len();
            let x = chain[len - 1];
            // prefer the previous element of the chain, to avoid cycles on ties
            let (mut y, mut current) = if len > 1 {
                (chain[len - 2], d[x * n + chain[len - 2]])
            } else {
                (usize::MAX, f64::INFINITY)
            };
            for i in 0..n {
                if size[i] == 0 || i == x {
                    continue;
                }
                let v = d[x * n + i];
                if v < current {
                    current = v;
                    y = i;
                }
            }
            if y == usize::MAX {
                // all remaining distances are +inf: take the first other live slot, as
                // SciPy's loop would leave y at its previous value (an arbitrary choice too)
                y = (0..n).find(|&i| size[i] > 0 && i != x).unwrap_or(x);
            }
            if len > 1 && y == chain[len - 2] {
                break (x, y, current);
            }
            chain.push(y);
        };
        chain.truncate(chain.len() - 2);
        let (x, y) = if x > y { (y, x) } else { (x, y) };
        let nxy = size[x] + size[y];
        raw.push((x, y, height));
        size[x] = 0;
        size[y] = nxy;
        for i in 0..n {
            if size[i] == 0 || i == y {
                continue;
            }
            let v = d[i * n + x].max(d[i * n + y]);
            d[i * n + y] = v;
            d[y * n + i] = v;
        }
    }
    // stable sort by height (numpy mergesort); total_cmp orders -0.0 before 0.0, which no
    // distance here distinguishes in practice
    raw.sort_by(|a, b| a.2.total_cmp(&b.2));
    // SciPy's `label`: union-find turns slot ids into node ids
    let mut parent: Vec<usize> = (0..2 * n - 1).collect();
    let find = |parent: &mut Vec<usize>, mut v: usize| {
        let mut root = v;
        while parent[root] != root {
            root = parent[root];
        }
        while parent[v] != root {
            let next = parent[v];
            parent[v] = root;
            v = next;
        }
        root
    };
    let mut merges = Vec::with_capacity(raw.len());
    for (k, &(x, y, height)) in raw.iter().enumerate() {
        let rx = find(&mut parent, x);
        let ry = find(&mut parent, y);
        let node = n + k;
        parent[rx] = node;
        parent[ry] = node;
        merges.push(Merge {
            a: rx.min(ry),
            b: rx.max(ry),
            height,
        });
    }
    merges
}

/// scikit-learn's `_hc_cut`: labels for `n_clusters` clusters, numbered by position in the heap
/// of negated node ids (Python `heapq` semantics reproduced exactly).
fn hc_cut(merges: &[Merge], n: usize, n_clusters: usize) -> Vec<usize> {
    if merges.is_empty() {
        return vec![0; n];
    }
    let root = merges[merges.len() - 1];
    let mut heap: Vec<i64> = vec![-(root.a.max(root.b) as i64 + 1)];
    for _ in 1..n_clusters {
        let node = (-heap[0]) as usize;
        let m = merges[node - n];
        heap_push(&mut heap, -(m.a as i64));
        heap_pushpop(&mut heap, -(m.b as i64));
    }
    let mut labels = vec![0usize; n];
    for (k, &neg) in heap.iter().enumerate() {
        let mut stack = vec![(-neg) as usize];
        while let Some(v) = stack.pop() {
            if v < n {
                labels[v] = k;
            } else {
                let m = merges[v - n];
                stack.push(m.a);
                stack.push(m.b);
            }
        }
    }
    labels
}

fn heap_push(heap: &mut Vec<i64>, item: i64) {
    heap.push(item);
    let last = heap.len() - 1;
    sift_down(heap, 0, last);
}

fn heap_pushpop(heap: &mut [i64], item: i64) -> i64 {
    if !heap.is_empty() && heap[0] < item {
        let top = heap[0];
        heap[0] = item;
        sift_up(heap, 0);
        top
    } else {
        item
    }
}

/// `heapq._siftdown`.
fn sift_down(heap: &mut [i64], start: usize, mut pos: usize) {
    let item = heap[pos];
    while pos > start {
        let parent = (pos - 1) >> 1;
        if item < heap[parent] {
            heap[pos] = heap[parent];
            pos = parent;
            continue;
        }
        break;
    }
    heap[pos] = item;
}

/// `heapq._siftup`.
fn sift_up(heap: &mut [i64], mut pos: usize) {
    let end = heap.len();
    let start = pos;
    let item = heap[pos];
    let mut child = 2 * pos + 1;
    while child < end {
        let right = child + 1;
        if right < end && heap[child] >= heap[right] {
            child = right;
        }
        heap[pos] = heap[child];
        pos = child;
        child = 2 * pos + 1;
    }
    heap[pos] = item;
    sift_down(heap, start, pos);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Naive O(n^3) complete linkage: merges the closest pair of clusters (largest member
    /// distance) while any is left; returns heights in merge order and the clusters formed by
    /// the merges strictly below `threshold`.
    fn brute_force(dist: &[f64], n: usize, threshold: f64) -> (Vec<f64>, Vec<Vec<usize>>) {
        let mut clusters: Vec<Vec<usize>> = (0..n).map(|i| vec![i]).collect();
        let mut heights = Vec::new();
        let mut cut = None;
        while clusters.len() > 1 {
            let mut best = (f64::INFINITY, 0, 0);
            for a in 0..clusters.len() {
                for b in (a + 1)..clusters.len() {
                    let link = clusters[a]
                        .iter()
                        .flat_map(|&i| clusters[b].iter().map(move |&j| dist[i * n + j]))
                        .fold(f64::NEG_INFINITY, f64::max);
                    if link < best.0 {
                        best = (link, a, b);
                    }
                }
            }
            if best.0 >= threshold && cut.is_none() {
                cut = Some(clusters.clone());
            }
            let merged = clusters.remove(best.2);
            clusters[best.1].extend(merged);
            heights.push(best.0);
        }
        let mut cut = cut.unwrap_or(clusters);
        for c in cut.iter_mut() {
            c.sort_unstable();
        }
        cut.sort();
        (heights, cut)
    }

    fn partition(labels: &[usize], k: usize) -> Vec<Vec<usize>> {
        let mut parts = vec![Vec::new(); k];
        for (i, &l) in labels.iter().enumerate() {
            parts[l].push(i);
        }
        assert!(
            parts.iter().all(|p| !p.is_empty()),
            "empty cluster in {labels:?}"
        );
        parts.sort();
        parts
    }

    fn random_matrix(seed: u64, n: usize, levels: Option<u32>) -> Vec<f64> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut d = vec![0.0; n * n];
        for i in 0..n {
            for j in (i + 1)..n {
                let v = match levels {
                    Some(l) => rng.random_range(0..l) as f64 / l as f64,
                    None => rng.random::<f64>(),
                };
                d[i * n + j] = v;
                d[j * n + i] = v;
            }
        }
        d
    }

    #[test]
    fn matches_brute_force_on_random_matrices() {
        for seed in 0..40u64 {
            let n = 2 + (seed as usize * 7) % 23;
            let dist = random_matrix(seed, n, None);
            for threshold in [0.0, 0.1, 0.3, 0.5, 0.8, 1.0] {
                let got = complete_linkage(&dist, n, threshold).unwrap();
                let (mut heights, cut) = brute_force(&dist, n, threshold);
                heights.sort_by(f64::total_cmp);
                assert_eq!(got.merge_distances, heights, "seed {seed} n {n}");
                assert_eq!(
                    got.n_clusters,
                    cut.len(),
                    "seed {seed} n {n} threshold {threshold}"
                );
                assert_eq!(partition(&got.labels, got.n_clusters), cut);
            }
        }
    }

    #[test]
    fn ties_give_valid_complete_linkage_clusters() {
        for seed in 0..20u64 {
            let n = 5 + seed as usize;
            let dist = random_matrix(100 + seed, n, Some(4));
            let threshold = 0.5;
            let got = complete_linkage(&dist, n, threshold).unwrap();
            assert_eq!(got.merge_distances.len(), n - 1);
            assert!(got.merge_distances.windows(2).all(|w| w[0] <= w[1]));
            // every pair inside a cluster is below the threshold (complete linkage)
            for i in 0..n {
                for j in 0..n {
                    if i != j && got.labels[i] == got.labels[j] {
                        assert!(dist[i * n + j] < threshold);
                    }
                }
            }
            let below = got
                .merge_distances
                .iter()
                .filter(|&&h| h < threshold)
                .count();
            assert_eq!(got.n_clusters, n - below);
            assert_eq!(
                complete_linkage(&dist, n, threshold).unwrap(),
                got,
                "deterministic"
            );
        }
        // all equal: no merge at the threshold, everything merged just above it
        let n = 6;
        let mut dist = vec![0.5; n * n];
        (0..n).for_each(|i| dist[i * n + i] = 0.0);
        assert_eq!(complete_linkage(&dist, n, 0.5).unwrap().n_clusters, n);
        let all = complete_linkage(&dist, n, 0.51).unwrap();
        assert_eq!((all.n_clusters, all.labels), (1, vec![0; n]));
        assert_eq!(all.merge_distances, vec![0.5; n - 1]);
    }

    #[test]
    fn threshold_is_strictly_below() {
        let dist = [0.0, 0.1, 0.1, 0.0];
        assert_eq!(complete_linkage(&dist, 2, 0.1).unwrap().n_clusters, 2);
        assert_eq!(
            complete_linkage(&dist, 2, 0.1 + 1e-12).unwrap().labels,
            vec![0, 0]
        );
    }

    #[test]
    fn threshold_zero_and_one() {
        let n = 7;
        let mut dist = random_matrix(5, n, None)
            .iter()
            .map(|v| v * 0.99)
            .collect::<Vec<_>>();
        let none = complete_linkage(&dist, n, 0.0).unwrap();
        assert_eq!(none.n_clusters, n);
        assert_eq!(partition(&none.labels, n).len(), n);
        assert_eq!(complete_linkage(&dist, n, 1.0).unwrap().n_clusters, 1);
        // mask 3 at distance exactly 1 from everything (a zero mask) stays alone at threshold 1
        for j in 0..n {
            if j != 3 {
                dist[3 * n + j] = 1.0;
                dist[j * n + 3] = 1.0;
            }
        }
        let got = complete_linkage(&dist, n, 1.0).unwrap();
        assert_eq!(got.n_clusters, 2);
        assert!((0..n).all(|j| j == 3 || got.labels[j] != got.labels[3]));
    }

    #[test]
    fn labels_follow_scikit_learn_hc_cut() {
        // points on a line (no tied distances): merges (3,4) -> 6, (1,2) -> 7, (5,6) -> 8,
        // (0,7) -> 9, (8,9) -> 10; the cut at 0.05 keeps nodes 8, 7 and leaf 0
        let x: [f64; 6] = [0.0, 10.0, 12.5, 30.0, 31.0, 33.0];
        let n = x.len();
        let dist: Vec<f64> = (0..n * n)
            .map(|k| (x[k / n] - x[k % n]).abs() / 100.0)
            .collect();
        let got = complete_linkage(&dist, n, 0.05).unwrap();
        // sklearn: AgglomerativeClustering(None, metric="precomputed", linkage="complete",
        // distance_threshold=0.05) numbers the heap [-8, -7, -0]: labels [2, 1, 1, 0, 0, 0]
        assert_eq!(got.labels, vec![2, 1, 1, 0, 0, 0]);
        assert_eq!(got.merge_distances, vec![0.01, 0.025, 0.03, 0.125, 0.33]);
    }

    #[test]
    fn single_input_and_errors() {
        let one = complete_linkage(&[0.0], 1, 0.1).unwrap();
        assert_eq!(
            (one.labels, one.n_clusters, one.merge_distances),
            (vec![0], 1, vec![])
        );
        let err = complete_linkage(&[0.0], 1, 1.5).unwrap_err().to_string();
        assert_eq!(
            err,
            "threshold 1.5 out of range; expected a value in [0, 1]"
        );
        assert!(complete_linkage(&[0.0, 0.2, 0.2], 2, 0.1)
            .unwrap_err()
            .to_string()
            .contains("3 values"));
        assert!(complete_linkage(&[], 0, 0.1).is_err());
        let err = complete_linkage(&[0.0, f64::NAN, f64::NAN, 0.0], 2, 0.1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("NaN"), "{err}");
    }

    #[test]
    fn golden_clustering() {
        for case in ["vit_timm", "deit_distilled_timm", "vit_hf"] {
            let path = |f: &str| format!("{}/tests/data/{case}/{f}", env!("CARGO_MANIFEST_DIR"));
            let fm = crate::io::npy::read_npy(path("feature_map.npy")).unwrap();
            let (d, gh, gw) = (fm.shape[0], fm.shape[1], fm.shape[2]);
            let dist = crate::methods::vitcx::mask::cosine_distances(
                &fm.to_f32(),
                d,
                (gh, gw),
                (224, 224),
            );
            let got = complete_linkage(&dist, d, 0.1).unwrap();
            let manifest: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(path("manifest.json")).unwrap())
                    .unwrap();
            assert_eq!(
                got.n_clusters as u64,
                manifest["N_masks"].as_u64().unwrap(),
                "{case}"
            );
            let mut golden = crate::io::npy::read_npy(path("merge_distances.npy"))
                .unwrap()
                .to_f64();
            golden.sort_by(f64::total_cmp);
            let diff = got
                .merge_distances
                .iter()
                .zip(&golden)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert_eq!(golden.len(), got.merge_distances.len());
            assert!(diff < 1e-5, "{case}: merge height max diff {diff}");
            let labels = crate::io::npy::read_npy(path("cluster_labels.npy")).unwrap();
            let labels: Vec<usize> = labels
                .as_i64()
                .unwrap()
                .iter()
                .map(|&l| l as usize)
                .collect();
            assert_eq!(
                partition(&got.labels, got.n_clusters),
                partition(&labels, got.n_clusters),
                "{case}"
            );
            assert_eq!(
                got.labels, labels,
                "{case}: same partition, other numbering than scikit-learn"
            );
            eprintln!(
                "{case}: N {} merge height max diff {diff:.3e}",
                got.n_clusters
            );
        }
    }
}
