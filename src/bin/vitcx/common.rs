//! What every command shares: loading `--model` (a path, a Hub id or the bundled demo model)
//! and printing an error chain on one line.

use anyhow::{Context, Result};
use candle_core::Device;
use vitcx::model::Backbone;

/// Model name for reports: the `--model` value, or `demo` when it was left out.
pub fn model_name(arg: &Option<String>) -> &str {
    arg.as_deref().unwrap_or(vitcx::model::DEMO_NAME)
}

/// Resolves `--model` (local path or Hub id) and loads it on `device`.
///
/// No `--model` means the bundled demo model, announced in one line on stderr; `--model demo`
/// asks for it explicitly (unless a local `demo` path exists, which wins).
pub fn load_model(arg: Option<&str>, device: &Device) -> Result<Box<dyn Backbone>> {
    load_model_at(arg, device, None)
}

/// [`load_model`] built for `input_size` (`--input-size`) when given.
pub fn load_model_at(
    arg: Option<&str>,
    device: &Device,
    input_size: Option<(usize, usize)>,
) -> Result<Box<dyn Backbone>> {
    let demo = vitcx::model::DEMO_NAME;
    if is_demo(arg) {
        if input_size.is_some() {
            anyhow::bail!(
                "--input-size needs --model: the bundled demo model runs at its own 224 x 224"
            );
        }
        let model = vitcx::model::demo(device).context("cannot load the bundled demo model")?;
        if arg.is_none() {
            let acc = vitcx::model::demo_held_out_accuracy()
                .map(|a| format!("; {:.1}% right on held-out shapes", 100.0 * a))
                .unwrap_or_default();
            eprintln!(
                "vitcx: no --model given; using the bundled demo model (a small ViT trained on generated shapes: {}{acc})",
                model.spec().labels.join(", ")
            );
        }
        return Ok(model);
    }
    let arg = arg.unwrap_or(demo);
    let opts = vitcx::model::hub::HubOptions::from_env();
    let path = vitcx::model::hub::resolve_model(arg, &opts)?;
    let model = vitcx::model::load_at(&path, device, input_size)
        .with_context(|| format!("cannot load model '{arg}'"))?;
    Ok(model)
}

/// Whether `--model` stands for the bundled demo model: left out, or `demo` where no local
/// `demo` path exists.
fn is_demo(arg: Option<&str>) -> bool {
    let demo = vitcx::model::DEMO_NAME;
    arg.is_none() || (arg == Some(demo) && !std::path::Path::new(demo).exists())
}

/// Where `--model`'s checkpoint is on disk (a Hub id resolved through the cache), or `None` for
/// the bundled demo model.
pub fn model_path(arg: Option<&str>) -> Result<Option<std::path::PathBuf>> {
    match arg {
        _ if is_demo(arg) => Ok(None),
        Some(a) => {
            let opts = vitcx::model::hub::HubOptions::from_env();
            Ok(Some(vitcx::model::hub::resolve_model(a, &opts)?))
        }
        None => Ok(None),
    }
}

/// The error and its causes on one line, `a: b: c`. A cause whose text its parent already
/// shows (a library error that prints its source) is not repeated, and line breaks inside a
/// message (some decoders put them there) become spaces.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let full = cause.to_string();
        // A library error that carries a captured stack trace (with RUST_BACKTRACE set) prints
        // it after the message: the user sees the message only.
        let text = ["\nstack backtrace:", "\n   0: "]
            .iter()
            .filter_map(|m| full.find(m))
            .min()
            .map_or(full.as_str(), |i| &full[..i])
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if parts.last().is_some_and(|p| p.ends_with(&text)) {
            continue;
        }
        parts.push(text);
    }
    parts.join(": ")
}

/// Whether the error comes from writing to a closed pipe (`vitcx predict | head`).
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_drops_repeated_sources_and_line_breaks() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let lib = vitcx::Error::io("/x/a.png", io);
        let err = anyhow::Error::new(lib).context("cannot read the image");
        let shown = one_line(&err);
        assert_eq!(shown.matches("not found").count(), 1, "{shown}");
        assert!(
            shown.starts_with("cannot read the image: /x/a.png: "),
            "{shown}"
        );
        let err = anyhow::anyhow!("corrupt jpeg:\n  bad marker");
        assert_eq!(one_line(&err), "corrupt jpeg: bad marker");
        let err = anyhow::anyhow!("unsupported storage\n   0: candle::pickle::read\n   1: main");
        assert_eq!(one_line(&err), "unsupported storage");
    }
}
