//! Combining shards: the records of several output folders, checked to come from one run (same
//! command, settings, shard count and image total; every shard once; every image once), give
//! the images done in the run's own order. `vitcx merge` then writes an evaluation's report
//! from their rows (the same numbers as one run over everything: same rows, same order) or
//! copies explanations' files into one folder.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::record::{Record, Status};
use crate::error::{Error, Result};
use crate::eval::harness::Row;
use crate::eval::metrics::CurveParams;
use crate::eval::report::MethodInfo;

/// One image's result, from the shard folder that holds it.
#[derive(Debug, Clone)]
pub struct Done {
    /// The image's key.
    pub image: String,
    /// The folder holding its files and record.
    pub dir: PathBuf,
    /// Seconds it took.
    pub seconds: f64,
    /// The command's result (its position in the run under `index`).
    pub result: Value,
}

/// What the shards hold together.
#[derive(Debug, Clone)]
pub struct Merged {
    /// `explain` or `eval`.
    pub command: String,
    /// The settings every shard shares.
    pub settings: Value,
    /// The number of shards of the run.
    pub shards: usize,
    /// Images in the whole run.
    pub total: usize,
    /// The images done, in the run's order (each result's `index`).
    pub done: Vec<Done>,
    /// Images of a present shard that failed, with the reason.
    pub failed: Vec<(String, String)>,
    /// Images of a present shard neither done nor failed (the shard did not finish).
    pub pending: Vec<String>,
    /// Shards with no record in any folder.
    pub missing_shards: Vec<usize>,
}

impl Merged {
    /// One line per problem (missing shards, unfinished or failed images), for the user.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.missing_shards.is_empty() {
            out.push(format!(
                "shard(s) {} of {} missing: no folder given holds their record",
                list(&self.missing_shards),
                self.shards
            ));
        }
        if !self.pending.is_empty() {
            out.push(format!(
                "{} image(s) not done yet (a shard did not finish; rerun it to resume): {}",
                self.pending.len(),
                list(&self.pending)
            ));
        }
        if !self.failed.is_empty() {
            let names: Vec<String> = self
                .failed
                .iter()
                .map(|(k, why)| format!("{k} ({why})"))
                .collect();
            out.push(format!(
                "{} image(s) failed (rerun with --retry-failed): {}",
                self.failed.len(),
                list(&names)
            ));
        }
        out
    }
}

/// The first few items of a list, then how many more.
fn list<T: std::fmt::Display>(items: &[T]) -> String {
    let mut s: Vec<String> = items.iter().take(5).map(|x| x.to_string()).collect();
    if items.len() > 5 {
        s.push(format!("and {} more", items.len() - 5));
    }
    s.join(", ")
}

/// Reads the records in `dirs` and checks they are shards of one run.
pub fn gather(dirs: &[PathBuf]) -> Result<Merged> {
    let mut records: Vec<Record> = Vec::new();
    for d in dirs {
        if !d.is_dir() {
            return Err(Error::invalid(format!("{} is not a folder", d.display())));
        }
        let found = Record::read_all(d)?;
        if found.is_empty() {
            return Err(Error::invalid(format!(
                "{} holds no vitcx run record (vitcx-run.*.jsonl); is it an explain or eval --out?",
                d.display()
            )));
        }
        records.extend(found);
    }
    let first = &records[0];
    let where_ = |r: &Record| r.path.display().to_string();
    for r in &records[1..] {
        let (a, b) = (&first.header, &r.header);
        let mismatch = a.difference(b);
        if let Some(d) = mismatch {
            return Err(Error::invalid(format!(
                "{} and {} are not shards of one run: {d}",
                where_(first),
                where_(r)
            )));
        }
    }
    let shards = first.header.shard.count;
    let mut by_shard: BTreeMap<usize, &Record> = BTreeMap::new();
    for r in &records {
        if let Some(other) = by_shard.insert(r.header.shard.index, r) {
            return Err(Error::invalid(format!(
                "shard {} is in both {} and {}; give each shard once",
                r.header.shard,
                where_(other),
                where_(r)
            )));
        }
    }
    let missing_shards: Vec<usize> = (0..shards).filter(|i| !by_shard.contains_key(i)).collect();

    let mut owner: BTreeMap<&str, &Record> = BTreeMap::new();
    let mut done = Vec::new();
    let mut failed = Vec::new();
    let mut pending = Vec::new();
    for r in by_shard.values() {
        let assigned: BTreeSet<&str> = r.header.images.iter().map(String::as_str).collect();
        for key in &r.header.images {
            if let Some(other) = owner.insert(key, r) {
                return Err(Error::invalid(format!(
                    "image {key} belongs to both {} and {}; were the shards made from the same \
                     image list?",
                    where_(other),
                    where_(r)
                )));
            }
            match r.status.get(key) {
                Some(Status::Done { seconds, result }) => done.push(Done {
                    image: key.clone(),
                    dir: r.path.parent().unwrap_or(Path::new(".")).to_path_buf(),
                    seconds: *seconds,
                    result: result.clone(),
                }),
                Some(Status::Failed { reason, .. }) => failed.push((key.clone(), reason.clone())),
                None => pending.push(key.clone()),
            }
        }
        if let Some(stray) = r.status.keys().find(|k| !assigned.contains(k.as_str())) {
            return Err(Error::invalid(format!(
                "{} records image {stray}, which its shard does not hold",
                where_(r)
            )));
        }
    }
    let index = |d: &Done| d.result.get("index").and_then(Value::as_u64);
    if let Some(d) = done.iter().find(|d| index(d).is_none()) {
        return Err(Error::invalid(format!(
            "the record in {} has no index for image {}",
            d.dir.display(),
            d.image
        )));
    }
    done.sort_by_key(|d| index(d));
    Ok(Merged {
        command: first.header.command.clone(),
        settings: first.header.settings.clone(),
        shards,
        total: first.header.total,
        done,
        failed,
        pending,
        missing_shards,
    })
}

/// The rows of evaluation results (as `eval` records them: `rows`, each with its `seconds`), in
/// the order given, and each method's total seconds.
pub fn rows<'a>(
    results: impl Iterator<Item = &'a Value>,
    methods: &[MethodInfo],
) -> Result<(Vec<Row>, Vec<f64>)> {
    let mut rows = Vec::new();
    let mut seconds = vec![0f64; methods.len()];
    for r in results {
        for v in r["rows"].as_array().into_iter().flatten() {
            let row = Row::from_json(v)?;
            let Some(k) = methods.iter().position(|m| m.name == row.method) else {
                return Err(Error::invalid(format!(
                    "a record holds a {} row, a method its run does not name",
                    row.method
                )));
            };
            seconds[k] += v["seconds"].as_f64().unwrap_or(0.0);
            rows.push(row);
        }
    }
    Ok((rows, seconds))
}

/// An evaluation's methods and curve settings, from its record's settings.
pub fn eval_settings(settings: &Value) -> Result<(Vec<MethodInfo>, CurveParams)> {
    let bad = |what: &str| Error::invalid(format!("the run record's settings lack {what}"));
    let names = settings["methods"]
        .as_array()
        .ok_or_else(|| bad("methods"))?;
    let methods = names
        .iter()
        .map(|n| {
            let name = n.as_str().ok_or_else(|| bad("method names"))?;
            MethodInfo::named(name, settings["method_params"][name].clone())
        })
        .collect::<Result<Vec<_>>>()?;
    let curve: CurveParams = serde_json::from_value(settings["curve"].clone())
        .map_err(|e| Error::invalid(format!("the run record's curve settings: {e}")))?;
    Ok((methods, curve))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::record::{path_for, Header, Line, Writer};
    use crate::run::Shard;
    use serde_json::json;

    fn shard_dir(root: &Path, shard: Shard, images: &[(&str, usize)], settings: Value) -> PathBuf {
        let dir = root.join(shard.tag());
        std::fs::create_dir_all(&dir).unwrap();
        let header = Header {
            command: "eval".into(),
            settings,
            shard,
            images: images.iter().map(|(k, _)| k.to_string()).collect(),
            total: 4,
            shard_from: String::new(),
            vitcx_version: "0".into(),
        };
        let mut w = Writer::open(&path_for(&dir, shard), &header, false).unwrap();
        for (k, i) in images {
            w.append(&Line::Done {
                image: k.to_string(),
                seconds: 1.0,
                result: json!({ "index": i }),
            })
            .unwrap();
        }
        dir
    }

    #[test]
    fn shards_merge_in_run_order_and_differences_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let s = json!({"model": "demo"});
        let a = shard_dir(
            root.path(),
            Shard::new(0, 2).unwrap(),
            &[("c", 2), ("a", 0)],
            s.clone(),
        );
        let b = shard_dir(
            root.path(),
            Shard::new(1, 2).unwrap(),
            &[("b", 1), ("d", 3)],
            s,
        );
        let m = gather(&[b.clone(), a.clone()]).unwrap();
        let order: Vec<&str> = m.done.iter().map(|d| d.image.as_str()).collect();
        assert_eq!(order, ["a", "b", "c", "d"]);
        assert!(m.problems().is_empty());

        // Only one shard: the other is reported missing, not silently dropped.
        let m = gather(std::slice::from_ref(&a)).unwrap();
        assert_eq!(m.missing_shards, vec![1]);
        assert!(m.problems()[0].contains("shard(s) 1 of 2 missing"));

        // The same shard twice, and a shard made with other settings.
        let err = gather(&[a.clone(), a.clone()]).unwrap_err().to_string();
        assert!(err.contains("give each shard once"), "{err}");
        let other = shard_dir(
            &root.path().join("x"),
            Shard::new(1, 2).unwrap(),
            &[("b", 1), ("d", 3)],
            json!({"model": "other"}),
        );
        let err = gather(&[a, other]).unwrap_err().to_string();
        assert!(err.contains("model: \"demo\" vs \"other\""), "{err}");
        assert!(gather(&[root.path().to_path_buf()]).is_err());
    }
}
