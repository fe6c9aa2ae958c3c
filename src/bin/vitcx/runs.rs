//! What `explain` and `eval` share to run as shards and resume: which shard this task is, and
//! the run record in `--out` (checked against the settings of what is already there).

use std::path::Path;

use anyhow::{bail, Result};
use vitcx::run::{record, Header, Record, Shard, Writer};

use crate::args::RunArgs;

/// This task's shard (`--shard`, `--shards` with the scheduler's index, or a Slurm array) and
/// where it came from, said on stderr (even with `--quiet`: a job's log should say which part
/// it ran) when it is not the whole run.
pub fn shard(a: &RunArgs) -> Result<(Shard, String)> {
    let found =
        vitcx::run::shard::resolve(a.shard.as_deref(), a.shards, |k| std::env::var(k).ok())?;
    Ok(match found {
        Some((s, from)) => {
            eprintln!("vitcx: shard {s} (from {from})");
            (s, from)
        }
        None => (Shard::ALL, String::new()),
    })
}

/// Opens this shard's record in `out` after checking what `out` holds: records made with other
/// settings are refused (unless `--force`, which starts this shard's record afresh), and, where
/// `alone` (an evaluation, whose report files are per folder), so is another shard's record.
/// Returns the writer and what an earlier run of this shard recorded.
pub fn open(
    out: &Path,
    header: &Header,
    a: &RunArgs,
    alone: bool,
) -> Result<(Writer, Option<Record>)> {
    let mine = record::path_for(out, header.shard);
    let mut earlier = None;
    for r in Record::read_all(out)? {
        let same_shard = r.path == mine;
        if !same_shard && alone {
            bail!(
                "--out {} holds shard {}'s run; give each {} shard its own --out and combine \
                 them with `vitcx merge`",
                out.display(),
                r.header.shard,
                header.command
            );
        }
        let differs = r.header.difference(header);
        match differs {
            Some(d) if !a.force => bail!(
                "--out {} holds a run with other settings ({}: {d}); use another --out, or \
                 --force to redo this shard's images over it",
                out.display(),
                r.path.file_name().unwrap_or_default().to_string_lossy()
            ),
            _ if same_shard && !a.force => earlier = Some(r),
            _ => {}
        }
    }
    let writer = Writer::open(&mine, header, a.force)?;
    Ok((writer, earlier))
}

/// A run's header.
pub fn header(
    command: &str,
    settings: serde_json::Value,
    (shard, shard_from): (Shard, String),
    images: Vec<String>,
    total: usize,
) -> Header {
    Header {
        command: command.into(),
        settings,
        shard,
        images,
        total,
        shard_from,
        vitcx_version: env!("CARGO_PKG_VERSION").into(),
    }
}
