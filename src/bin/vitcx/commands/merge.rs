//! `vitcx merge`: the outputs of a run's shards combined into one folder, as one run over every
//! image would have written it: an evaluation's report from every shard's rows in the run's
//! order, or every explanation's files.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use vitcx::eval::report;
use vitcx::run::merge::{gather, Merged};
use vitcx::run::{Header, Line, Shard, Writer};

use crate::args::MergeArgs;

pub fn run(a: MergeArgs) -> Result<ExitCode> {
    let m = gather(&a.dirs)?;
    let out = &a.out;
    for d in &a.dirs {
        if same_dir(d, out) {
            bail!(
                "--out {} is one of the shards' folders; merge into a folder of its own",
                out.display()
            );
        }
    }
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create output directory {}", out.display()))?;
    for r in vitcx::run::Record::read_all(out)? {
        if r.header.settings != m.settings || r.header.shard != Shard::ALL {
            bail!(
                "--out {} holds another run ({}); merge into an empty folder",
                out.display(),
                r.path.display()
            );
        }
    }
    match m.command.as_str() {
        "eval" => merge_eval(&m, out)?,
        "explain" => merge_explain(&m, out)?,
        other => bail!("the records are of a '{other}' run, which merge does not know"),
    }
    write_record(&m, out)?;
    let problems = m.problems();
    for p in &problems {
        eprintln!("vitcx: {p}");
    }
    eprintln!(
        "vitcx: merged {} of {} images from {} shard folder(s) into {}",
        m.done.len(),
        m.total,
        a.dirs.len(),
        out.display()
    );
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

fn merge_eval(m: &Merged, out: &Path) -> Result<()> {
    let (methods, curve) = vitcx::run::merge::eval_settings(&m.settings)?;
    let (rows, seconds) = vitcx::run::merge::rows(m.done.iter().map(|d| &d.result), &methods)?;
    let mut info = serde_json::Map::new();
    info.insert("model".into(), m.settings["model"]["id"].clone());
    info.insert("data".into(), m.settings["data"].clone());
    for key in ["background_curves", "sanity"] {
        if let Some(v) = m.settings.get(key) {
            info.insert(key.into(), v.clone());
        }
    }
    report::write(out, &methods, &curve, &rows, &seconds, info)?;
    Ok(())
}

/// Copies each image's files, one image's set at a time (all or none).
fn merge_explain(m: &Merged, out: &Path) -> Result<()> {
    for d in &m.done {
        let files = d.result["files"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        if files.is_empty() {
            bail!(
                "the record in {} lists no files for {}",
                d.dir.display(),
                d.image
            );
        }
        let mut set = vitcx::io::output::OutputSet::new();
        for f in files {
            let name = f.as_str().unwrap_or_default();
            // Names come from a file a user could edit: a plain name only.
            if name.is_empty() || Path::new(name).file_name() != Some(name.as_ref()) {
                bail!("the record in {} names a file '{name}'", d.dir.display());
            }
            let src = d.dir.join(name);
            let bytes = std::fs::read(&src).with_context(|| {
                format!("{} is recorded done but {name} cannot be read", d.image)
            })?;
            set.add(&out.join(name), &bytes)?;
        }
        set.commit()?;
    }
    Ok(())
}

/// The merged folder's own record, as one run over every image writes it: so it can be merged
/// again or resumed.
fn write_record(m: &Merged, out: &Path) -> Result<()> {
    let mut images: Vec<String> = m.done.iter().map(|d| d.image.clone()).collect();
    images.extend(m.failed.iter().map(|(k, _)| k.clone()));
    images.extend(m.pending.iter().cloned());
    let header = Header {
        command: m.command.clone(),
        settings: m.settings.clone(),
        shard: Shard::ALL,
        images,
        total: m.total,
        shard_from: format!("vitcx merge of {} shards", m.shards),
        vitcx_version: env!("CARGO_PKG_VERSION").into(),
    };
    let path = vitcx::run::record::path_for(out, Shard::ALL);
    let mut w = Writer::open(&path, &header, true)?;
    for d in &m.done {
        w.append(&Line::Done {
            image: d.image.clone(),
            seconds: d.seconds,
            result: d.result.clone(),
        })?;
    }
    for (k, why) in &m.failed {
        w.append(&Line::Failed {
            image: k.clone(),
            reason: why.clone(),
            seconds: 0.0,
        })?;
    }
    Ok(())
}
