//! The `vitcx` command: a thin layer over the library (arguments -> checked values -> library
//! calls -> files and text). Errors print once as `vitcx: <cause chain>` and exit with code 2.

mod args;
mod commands;
mod inputs;
mod progress;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;

use args::{Cli, Command, InspectArgs, PredictArgs};
use candle_core::Device;
use vitcx::model::{Backbone, VisionTransformer};

/// candle allocates a fresh buffer per tensor op; mimalloc reuses freed memory instead of
/// returning it to the kernel and faulting zeroed pages back in each op.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            eprintln!("vitcx: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn run(cli: Cli) -> Result<ExitCode> {
    let device = vitcx::model::device(&cli.device)?;
    match cli.command {
        Command::Explain(a) => commands::explain::run(a, &device),
        Command::Predict(a) => predict(a, &device),
        Command::Inspect(a) => inspect(a, &device),
        Command::Synth(a) => commands::synth::run(a),
        Command::Eval(a) => commands::eval::run(a, &device),
        Command::Compare(a) => commands::compare::run(a, &device),
        Command::Bench(a) => commands::bench::run(a, &device),
    }
}

/// Model name for reports: the `--model` value, or `demo` when it was left out.
pub fn model_name(arg: &Option<String>) -> &str {
    arg.as_deref().unwrap_or(vitcx::model::DEMO_NAME)
}

/// Resolves `--model` (local path or Hub id) and loads it on `device`.
///
/// No `--model` means the bundled demo model, announced in one line on stderr; `--model demo`
/// asks for it explicitly (unless a local `demo` path exists, which wins).
pub fn load_model(arg: Option<&str>, device: &Device) -> Result<VisionTransformer> {
    let demo = vitcx::model::DEMO_NAME;
    if arg.is_none() || (arg == Some(demo) && !std::path::Path::new(demo).exists()) {
        let model = vitcx::model::demo(device).context("cannot load the bundled demo model")?;
        if arg.is_none() {
            let acc = vitcx::model::demo_held_out_accuracy()
                .map(|a| format!("; {:.1}% right on held-out shapes", 100.0 * a))
                .unwrap_or_default();
            eprintln!(
                "vitcx: no --model given; using the bundled demo model (a small ViT trained on generated shapes: {}{acc})",
                model.config().labels.join(", ")
            );
        }
        return Ok(model);
    }
    let arg = arg.unwrap_or(demo);
    let opts = vitcx::model::hub::HubOptions::from_env();
    let path = vitcx::model::hub::resolve_model(arg, &opts)?;
    let model =
        vitcx::model::load(&path, device).with_context(|| format!("cannot load model '{arg}'"))?;
    Ok(model)
}

fn predict(a: PredictArgs, device: &Device) -> Result<ExitCode> {
    use std::io::Write;
    let model = load_model(a.model.as_deref(), device)?;
    let cfg = model.config().clone();
    let (h, w) = model.spec().input_size;
    let mut out = std::io::stdout().lock();
    let mut failed = false;
    let mut reports = Vec::new();
    for path in inputs::expand(&a.images)? {
        let img = match vitcx::image::load_rgb(&path) {
            Ok(img) => img,
            Err(e) => {
                eprintln!("vitcx: {e}");
                failed = true;
                continue;
            }
        };
        let (_, x) =
            vitcx::image::model_input(&img, (h, w), cfg.preprocess.mean, cfg.preprocess.std);
        let px = candle_core::Tensor::from_vec(x, (1, 3, h, w), model.device())?;
        let probs = vitcx::methods::clean_probs(&model, &px)?;
        let top = vitcx::methods::vitcx::top_k(&probs, a.top_k);
        if a.json {
            reports.push(serde_json::json!({
                "image": path.display().to_string(),
                "top": top.iter().map(|&c| serde_json::json!({
                    "class": c, "label": cfg.labels.get(c), "probability": probs[c],
                })).collect::<Vec<_>>(),
            }));
        } else {
            writeln!(out, "{}", path.display())?;
            for (rank, &c) in top.iter().enumerate() {
                let label = cfg.labels.get(c).map(String::as_str).unwrap_or("?");
                writeln!(out, "  {}. {:>5}  {:.4}  {}", rank + 1, c, probs[c], label)?;
            }
        }
    }
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&reports)?)?;
    }
    Ok(if failed {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

fn inspect(a: InspectArgs, device: &Device) -> Result<ExitCode> {
    use std::io::Write;
    let model = load_model(a.model.as_deref(), device)?;
    let cfg = model.config();
    let spec = model.spec();
    let mut out = std::io::stdout().lock();
    if a.json {
        let v = serde_json::json!({ "model": model_name(&a.model), "config": cfg, "spec": spec });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let labels = &cfg.labels;
    let shown: Vec<&str> = labels.iter().take(5).map(String::as_str).collect();
    writeln!(out, "model          {}", model_name(&a.model))?;
    writeln!(out, "format         {:?}", cfg.format)?;
    writeln!(
        out,
        "family         {:?} ({})",
        cfg.family, cfg.architecture
    )?;
    writeln!(out, "dim            {}", spec.dim)?;
    writeln!(
        out,
        "depth          {} blocks (layers 0..{})",
        spec.depth,
        spec.depth.saturating_sub(1)
    )?;
    writeln!(out, "heads          {}", spec.heads)?;
    writeln!(out, "mlp dim        {}", cfg.mlp_dim)?;
    writeln!(out, "patch          {}", spec.patch)?;
    writeln!(
        out,
        "input size     {} x {}",
        spec.input_size.0, spec.input_size.1
    )?;
    writeln!(out, "token grid     {} x {}", spec.grid.0, spec.grid.1)?;
    writeln!(
        out,
        "prefix tokens  {} ({})",
        spec.num_prefix_tokens,
        if spec.num_prefix_tokens == 2 {
            "[CLS], [DIST]"
        } else {
            "[CLS]"
        }
    )?;
    writeln!(out, "layer norm eps {:e}", cfg.layer_norm_eps)?;
    writeln!(out, "mean           {:?}", cfg.preprocess.mean)?;
    writeln!(out, "std            {:?}", cfg.preprocess.std)?;
    writeln!(
        out,
        "classes        {}: {}{}",
        spec.num_classes,
        shown.join(", "),
        if labels.len() > shown.len() {
            ", ..."
        } else {
            ""
        }
    )?;
    for note in &cfg.notes {
        writeln!(out, "note           {note}")?;
    }
    Ok(ExitCode::SUCCESS)
}
