//! The run record: one JSON Lines file per shard in the output folder
//! (`vitcx-run.shard-I-of-N.jsonl`) saying what the run is (its settings, the images its shard
//! holds) and, as it goes, each image done (with its seconds and, for `eval`, its result rows)
//! or failed (with the reason). A rerun reads it to skip what is done; `vitcx merge` reads it to
//! combine shards.
//!
//! Each line is appended with one `write` and flushed, so a crash leaves at most a torn last
//! line, which is ignored on reading (that image is simply done again). A rerun appends; a later
//! line about an image replaces an earlier one.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::shard::Shard;
use crate::error::{Error, Result};

/// The record file's name prefix; the shard tag and `.jsonl` follow.
pub const PREFIX: &str = "vitcx-run.";

/// One line of a record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Line {
    /// Written when a run starts (again at each resume).
    Header(Header),
    /// An image whose results are complete.
    Done {
        /// The image's key (path relative to the input root, or the manifest's `image`).
        image: String,
        /// Seconds it took.
        seconds: f64,
        /// What the command keeps of it (`eval`: its result rows).
        #[serde(default, skip_serializing_if = "Value::is_null")]
        result: Value,
    },
    /// An image that failed, and why.
    Failed {
        /// The image's key.
        image: String,
        /// The error, one line.
        reason: String,
        /// Seconds until it failed.
        seconds: f64,
    },
}

/// What a run is: compared between reruns and between shards before anything is mixed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Header {
    /// `explain` or `eval`.
    pub command: String,
    /// Everything that decides the results (model, method parameters, targets, data); two
    /// runs whose settings differ never share an output.
    pub settings: Value,
    /// This record's shard.
    pub shard: Shard,
    /// The keys of this shard's images, in run order.
    pub images: Vec<String>,
    /// Images in the whole run (every shard).
    pub total: usize,
    /// Where the shard came from (`--shard 1/4`, `SLURM_ARRAY_TASK_ID=...`), for people.
    #[serde(default)]
    pub shard_from: String,
    /// The vitcx version that wrote it.
    pub vitcx_version: String,
}

impl Header {
    /// The first way `other` is not the same run as `self` (command, shard count, images in the
    /// run, then the settings by path), as `what: mine vs theirs`; `None`: the same run (the
    /// shard index may differ).
    pub fn difference(&self, other: &Header) -> Option<String> {
        if self.command != other.command {
            Some(format!("command: {} vs {}", self.command, other.command))
        } else if self.shard.count != other.shard.count {
            Some(format!(
                "shard count: {} vs {}",
                self.shard.count, other.shard.count
            ))
        } else if self.total != other.total {
            Some(format!(
                "images in the run: {} vs {}",
                self.total, other.total
            ))
        } else {
            difference(&self.settings, &other.settings)
        }
    }
}

/// What an image's last line says.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Complete, in this many seconds, with this result.
    Done {
        /// Seconds.
        seconds: f64,
        /// The command's result (`eval`: rows).
        result: Value,
    },
    /// Failed for this reason.
    Failed {
        /// The error.
        reason: String,
        /// Seconds.
        seconds: f64,
    },
}

/// A record as read: its first header and each image's last status.
#[derive(Debug, Clone)]
pub struct Record {
    /// The file.
    pub path: PathBuf,
    /// The header of the first run.
    pub header: Header,
    /// Each image's last status.
    pub status: BTreeMap<String, Status>,
}

/// The record file of `shard` in `dir`.
pub fn path_for(dir: &Path, shard: Shard) -> PathBuf {
    dir.join(format!("{PREFIX}{}.jsonl", shard.tag()))
}

/// The record files in `dir`, sorted by name.
pub fn files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for e in rd {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(PREFIX) && name.ends_with(".jsonl") && e.path().is_file() {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Records are read whole; a record of a few million images is a few hundred MB.
const MAX_RECORD_BYTES: u64 = 4 << 30;

impl Record {
    /// Reads the record at `path`. A torn last line (a crash mid-write) is ignored; any other
    /// line that does not parse is an error naming the line.
    pub fn read(path: &Path) -> Result<Record> {
        let bytes = crate::io::read_bounded(path, MAX_RECORD_BYTES)?;
        let text = String::from_utf8_lossy(&bytes);
        let complete = text.ends_with('\n');
        let lines: Vec<&str> = text.lines().collect();
        let mut header = None;
        let mut status = BTreeMap::new();
        for (k, line) in lines.iter().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let parsed: Line = match serde_json::from_str(line) {
                Ok(l) => l,
                Err(_) if k + 1 == lines.len() && !complete => break,
                Err(e) => {
                    return Err(Error::invalid(format!(
                        "run record {} line {}: {e}",
                        path.display(),
                        k + 1
                    )))
                }
            };
            match parsed {
                Line::Header(h) => {
                    header.get_or_insert(h);
                }
                Line::Done {
                    image,
                    seconds,
                    result,
                } => {
                    status.insert(image, Status::Done { seconds, result });
                }
                Line::Failed {
                    image,
                    reason,
                    seconds,
                } => {
                    status.insert(image, Status::Failed { reason, seconds });
                }
            }
        }
        let header = header.ok_or_else(|| {
            Error::invalid(format!(
                "run record {} has no header line; remove it to start over",
                path.display()
            ))
        })?;
        Ok(Record {
            path: path.to_path_buf(),
            header,
            status,
        })
    }

    /// Every record in `dir`.
    pub fn read_all(dir: &Path) -> Result<Vec<Record>> {
        files_in(dir)?.iter().map(|p| Record::read(p)).collect()
    }

    /// The images done, with their status.
    pub fn done(&self) -> impl Iterator<Item = (&String, f64, &Value)> {
        self.status.iter().filter_map(|(k, s)| match s {
            Status::Done { seconds, result } => Some((k, *seconds, result)),
            Status::Failed { .. } => None,
        })
    }
}

/// Appends lines to a record, each in one write.
#[derive(Debug)]
pub struct Writer {
    path: PathBuf,
    file: std::fs::File,
}

impl Writer {
    /// Opens `path` for appending (creating it), and writes `header`. With `fresh`, what was
    /// there is discarded first (`--force`).
    pub fn open(path: &Path, header: &Header, fresh: bool) -> Result<Writer> {
        if fresh {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(path, e)),
            }
        }
        // A torn line left by a crash would glue onto the next one: cut it off first.
        drop_torn_tail(path)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        let mut w = Writer {
            path: path.to_path_buf(),
            file,
        };
        w.append(&Line::Header(header.clone()))?;
        Ok(w)
    }

    /// Appends one line.
    pub fn append(&mut self, line: &Line) -> Result<()> {
        let mut bytes =
            serde_json::to_vec(line).map_err(|e| Error::invalid(format!("run record: {e}")))?;
        bytes.push(b'\n');
        self.file
            .write_all(&bytes)
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }

    /// The record's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Truncates `path` after its last newline (nothing to do if it ends with one or is absent).
fn drop_torn_tail(path: &Path) -> Result<()> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path, e)),
    };
    if bytes.is_empty() || bytes.ends_with(b"\n") {
        return Ok(());
    }
    let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(keep as u64))
        .map_err(|e| Error::io(path, e))
}

/// The first difference between two settings, as `path: a vs b` (`None`: equal).
pub fn difference(a: &Value, b: &Value) -> Option<String> {
    fn walk(path: &str, a: &Value, b: &Value) -> Option<String> {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    match (x.get(k), y.get(k)) {
                        (Some(u), Some(v)) => {
                            if let Some(d) = walk(&p, u, v) {
                                return Some(d);
                            }
                        }
                        (u, v) => return Some(format!("{p}: {} vs {}", show(u), show(v))),
                    }
                }
                None
            }
            _ if a == b => None,
            _ => Some(format!(
                "{}: {} vs {}",
                if path.is_empty() { "settings" } else { path },
                show(Some(a)),
                show(Some(b))
            )),
        }
    }
    fn show(v: Option<&Value>) -> String {
        match v {
            None => "(absent)".into(),
            Some(v) => {
                let s = v.to_string();
                if s.chars().count() > 80 {
                    format!("{}...", s.chars().take(77).collect::<String>())
                } else {
                    s
                }
            }
        }
    }
    walk("", a, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn header() -> Header {
        Header {
            command: "eval".into(),
            settings: json!({"model": "demo", "params": {"n": 1}}),
            shard: Shard::ALL,
            images: vec!["a.png".into(), "b.png".into()],
            total: 2,
            shard_from: String::new(),
            vitcx_version: "0".into(),
        }
    }

    #[test]
    fn lines_round_trip_and_the_last_status_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(dir.path(), Shard::ALL);
        let mut w = Writer::open(&path, &header(), false).unwrap();
        w.append(&Line::Failed {
            image: "a.png".into(),
            reason: "bad".into(),
            seconds: 0.5,
        })
        .unwrap();
        w.append(&Line::Done {
            image: "a.png".into(),
            seconds: 0.1 + 0.2,
            result: json!([1.0000000000000002]),
        })
        .unwrap();
        drop(w);
        let r = Record::read(&path).unwrap();
        assert_eq!(r.header, header());
        match &r.status["a.png"] {
            Status::Done { seconds, result } => {
                assert_eq!(*seconds, 0.1 + 0.2);
                assert_eq!(result[0].as_f64().unwrap(), 1.0000000000000002);
            }
            s => panic!("{s:?}"),
        }
        assert_eq!(files_in(dir.path()).unwrap(), vec![path]);
    }

    #[test]
    fn a_torn_last_line_is_ignored_and_the_next_run_starts_on_a_new_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(dir.path(), Shard::ALL);
        let mut w = Writer::open(&path, &header(), false).unwrap();
        w.append(&Line::Done {
            image: "a.png".into(),
            seconds: 1.0,
            result: Value::Null,
        })
        .unwrap();
        drop(w);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(br#"{"kind":"done","image":"b.pn"#).unwrap();
        drop(f);
        let r = Record::read(&path).unwrap();
        assert_eq!(r.status.len(), 1);
        let mut w = Writer::open(&path, &header(), false).unwrap();
        w.append(&Line::Done {
            image: "b.png".into(),
            seconds: 1.0,
            result: Value::Null,
        })
        .unwrap();
        let r = Record::read(&path).unwrap();
        assert_eq!(r.done().count(), 2);
        // A bad line that is not the last is an error, not silently skipped.
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replacen("{\"kind\":\"done\"", "{oops", 1)).unwrap();
        assert!(Record::read(&path).is_err());
    }

    #[test]
    fn differences_are_named_by_path() {
        let a = json!({"model": "demo", "params": {"n": 1, "noise": 0.1}});
        assert_eq!(difference(&a, &a), None);
        let b = json!({"model": "demo", "params": {"n": 2, "noise": 0.1}});
        assert_eq!(difference(&a, &b).unwrap(), "params.n: 1 vs 2");
        let c = json!({"model": "demo"});
        assert_eq!(
            difference(&a, &c).unwrap(),
            "params: {\"n\":1,\"noise\":0.1} vs (absent)"
        );
    }
}
