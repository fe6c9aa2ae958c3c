//! Which images a task of a job array explains: `--shard I/N`, or the index a scheduler gives
//! (Slurm's `SLURM_ARRAY_TASK_ID`, a Kubernetes Indexed Job's `JOB_COMPLETION_INDEX`).
//!
//! An image belongs to shard `h(key) mod N`, where `key` is its path relative to the input
//! root (or the manifest's `image`) and `h` is 64-bit FNV-1a finished by SplitMix64's mixer: the
//! assignment depends only on the key, not on the order files are listed in, and adding images
//! moves none of the others.

use crate::error::{Error, Result};

/// One task's part of a run: shard `index` of `count` (index from 0, as `JOB_COMPLETION_INDEX`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shard {
    /// This task's index, `0..count`.
    pub index: usize,
    /// The number of shards.
    pub count: usize,
}

/// More shards than this is a typo, not a cluster.
pub const MAX_SHARDS: usize = 1_000_000;

impl Shard {
    /// The whole run as one shard.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Shard `index` of `count`, checked.
    pub fn new(index: usize, count: usize) -> Result<Self> {
        if count == 0 || count > MAX_SHARDS {
            return Err(Error::invalid(format!(
                "shard count {count} out of range; expected 1..={MAX_SHARDS}"
            )));
        }
        if index >= count {
            return Err(Error::invalid(format!(
                "shard index {index} out of range for {count} shards; indices count from 0 to {}",
                count - 1
            )));
        }
        Ok(Shard { index, count })
    }

    /// `I/N`, as `--shard` takes it.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(format!(
                "--shard '{s}': expected I/N with 0 <= I < N, e.g. 0/4 for the first of four"
            ))
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let i = i.trim().parse().map_err(|_| bad())?;
        let n = n.trim().parse().map_err(|_| bad())?;
        Shard::new(i, n)
    }

    /// Whether the image with this key is in this shard.
    pub fn contains(&self, key: &str) -> bool {
        self.count == 1 || key_hash(key) % self.count as u64 == self.index as u64
    }

    /// `shard-I-of-N`, for file names.
    pub fn tag(&self) -> String {
        format!("shard-{}-of-{}", self.index, self.count)
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// The shard of this task from `--shard`, else from the scheduler's environment, with where it
/// came from (for the run's output): `SLURM_ARRAY_TASK_ID` and `SLURM_ARRAY_TASK_COUNT` (the
/// index made 0-based with `SLURM_ARRAY_TASK_MIN`), or, with `--shards N`,
/// `JOB_COMPLETION_INDEX` (Kubernetes Indexed Jobs) or `SLURM_ARRAY_TASK_ID`. `None`: one run
/// over everything. `env` reads a variable (`std::env::var` outside tests).
pub fn resolve(
    flag: Option<&str>,
    shards: Option<usize>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<(Shard, String)>> {
    if let Some(s) = flag {
        if shards.is_some() {
            return Err(Error::invalid(
                "--shard I/N and --shards N both given; use one",
            ));
        }
        return Ok(Some((Shard::parse(s)?, format!("--shard {s}"))));
    }
    let num =
        |name: &str| -> Result<Option<usize>> {
            match env(name) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| {
                    Error::invalid(format!("{name}='{v}' is not a non-negative integer"))
                }),
            }
        };
    let slurm = || -> Result<Option<(usize, String)>> {
        let Some(id) = num("SLURM_ARRAY_TASK_ID")? else {
            return Ok(None);
        };
        let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
        let index = id.checked_sub(min).ok_or_else(|| {
            Error::invalid(format!(
                "SLURM_ARRAY_TASK_ID={id} is below SLURM_ARRAY_TASK_MIN={min}"
            ))
        })?;
        Ok(Some((
            index,
            format!("SLURM_ARRAY_TASK_ID={id}, SLURM_ARRAY_TASK_MIN={min}"),
        )))
    };
    if let Some(n) = shards {
        if let Some(i) = num("JOB_COMPLETION_INDEX")? {
            let shard = Shard::new(i, n)?;
            return Ok(Some((
                shard,
                format!("JOB_COMPLETION_INDEX={i}, --shards {n}"),
            )));
        }
        if let Some((i, from)) = slurm()? {
            return Ok(Some((Shard::new(i, n)?, format!("{from}, --shards {n}"))));
        }
        return Err(Error::invalid(format!(
            "--shards {n} without a task index: set --shard I/{n}, or run as a Kubernetes \
             Indexed Job (JOB_COMPLETION_INDEX) or a Slurm array (SLURM_ARRAY_TASK_ID)"
        )));
    }
    let Some((i, from)) = slurm()? else {
        return Ok(None);
    };
    let Some(n) = num("SLURM_ARRAY_TASK_COUNT")? else {
        return Err(Error::invalid(format!(
            "{from} set without SLURM_ARRAY_TASK_COUNT; give --shards N or --shard I/N"
        )));
    };
    // A Slurm array with a step (--array=0-15:4) has gaps: its indices do not count shards.
    if let Some(step) = num("SLURM_ARRAY_TASK_STEP")? {
        if step > 1 {
            return Err(Error::invalid(format!(
                "SLURM_ARRAY_TASK_STEP={step}: an array with a step cannot number shards; \
                 use --array=0-{} or --shard I/N",
                n.saturating_sub(1)
            )));
        }
    }
    Ok(Some((
        Shard::new(i, n)?,
        format!("{from}, SLURM_ARRAY_TASK_COUNT={n}"),
    )))
}

/// 64-bit FNV-1a of the key's bytes, then SplitMix64's finaliser (FNV alone clusters in its low
/// bits for keys that differ only at the end, as numbered file names do).
pub fn key_hash(key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn parses_and_checks_i_of_n() {
        assert_eq!(Shard::parse("2/4").unwrap(), Shard { index: 2, count: 4 });
        for bad in ["4/4", "1/0", "x/2", "2", "-1/3", "1/2/3"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Shard::parse("0/3").unwrap().tag(), "shard-0-of-3");
    }

    #[test]
    fn each_key_is_in_exactly_one_shard_and_the_split_is_even() {
        let keys: Vec<String> = (0..4000).map(|i| format!("img_{i:05}.png")).collect();
        let shards: Vec<Shard> = (0..4).map(|i| Shard::new(i, 4).unwrap()).collect();
        let mut sizes = [0usize; 4];
        for k in &keys {
            let owners: Vec<usize> = (0..4).filter(|&i| shards[i].contains(k)).collect();
            assert_eq!(owners.len(), 1, "{k}");
            sizes[owners[0]] += 1;
        }
        // A fair split of 4000 is 1000 each; a hash this good stays within a few percent.
        assert!(
            sizes.iter().all(|&s| (900..=1100).contains(&s)),
            "{sizes:?}"
        );
    }

    #[test]
    fn the_hash_is_fixed() {
        // Written down so that a change of the assignment (which would reshuffle every running
        // job's shards) fails here first.
        // (The same three lines of Python reproduce them.)
        assert_eq!(key_hash(""), 0xf52a_15e9_a9b5_e89b);
        assert_eq!(key_hash("a.png"), 0xd0f4_8356_9cce_eb56);
        let k = "n01440764/ILSVRC2012_val_00000293.JPEG";
        assert_eq!(key_hash(k), 0xa98f_ce81_0a57_a940);
        assert!(Shard::new(0, 4).unwrap().contains(k));
    }

    #[test]
    fn reads_the_schedulers_environment() {
        let none = resolve(None, None, env(&[])).unwrap();
        assert!(none.is_none());
        let (s, from) = resolve(
            None,
            None,
            env(&[
                ("SLURM_ARRAY_TASK_ID", "3"),
                ("SLURM_ARRAY_TASK_MIN", "1"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(s, Shard { index: 2, count: 4 });
        assert!(from.contains("SLURM_ARRAY_TASK_ID=3"), "{from}");
        let (s, _) = resolve(None, Some(5), env(&[("JOB_COMPLETION_INDEX", "4")]))
            .unwrap()
            .unwrap();
        assert_eq!(s, Shard { index: 4, count: 5 });
        // The flag wins over the environment.
        let (s, _) = resolve(Some("1/2"), None, env(&[("SLURM_ARRAY_TASK_ID", "0")]))
            .unwrap()
            .unwrap();
        assert_eq!(s, Shard { index: 1, count: 2 });
        for (flag, shards, vars) in [
            (None, Some(4), vec![]),
            (None, Some(4), vec![("JOB_COMPLETION_INDEX", "4")]),
            (None, Some(4), vec![("JOB_COMPLETION_INDEX", "x")]),
            (None, None, vec![("SLURM_ARRAY_TASK_ID", "1")]),
            (
                None,
                None,
                vec![
                    ("SLURM_ARRAY_TASK_ID", "4"),
                    ("SLURM_ARRAY_TASK_COUNT", "4"),
                    ("SLURM_ARRAY_TASK_STEP", "4"),
                ],
            ),
            (Some("0/2"), Some(2), vec![]),
        ] {
            assert!(
                resolve(flag, shards, env(&vars)).is_err(),
                "{flag:?} {vars:?}"
            );
        }
    }
}
