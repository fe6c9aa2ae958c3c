//! `vitcx bench`: times a random-weight ViT's forward pass and one explanation on this machine.
//!
//! Progress goes to stderr; the report (text, or one JSON object with `--json`) to stdout, with
//! the same keys `scripts/bench_pytorch.py` prints for PyTorch.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use vitcx::bench::{
    machine_info, peak_rss_bytes, random_vit, synthetic_image, time_explanation, time_forward,
    ExplainTiming, ForwardTiming, Preset,
};
use vitcx::explain::VitCxParams;
use vitcx::model::Backbone;

use crate::args::BenchArgs;

/// Batch sizes timed when `--batch` is not given.
const DEFAULT_BATCHES: [usize; 3] = [1, 8, 32];

pub fn run(a: BenchArgs) -> Result<ExitCode> {
    let preset: Preset = a.preset.parse()?;
    let batches = match a.batch {
        Some(0) => bail!("batch 0 out of range; expected at least 1"),
        Some(b) => vec![b],
        None => DEFAULT_BATCHES.to_vec(),
    };
    if a.repeats == 0 {
        bail!("repeats 0 out of range; expected at least 1");
    }
    let max_masks = match a.explain_masks.as_str() {
        "all" => None,
        s => match s.parse::<usize>() {
            Ok(n) if n > 0 => Some(n),
            _ => bail!("explain masks '{s}' invalid; expected a positive integer or 'all'"),
        },
    };
    let arch = preset.arch();
    let flops = arch.flops_per_image();

    eprintln!(
        "vitcx bench: building {} ({:.2} GFLOP per image) with random weights (seed {})",
        preset.timm_name(),
        flops / 1e9,
        a.seed
    );
    let device = candle_core::Device::Cpu;
    let model = random_vit(preset, a.seed, &device).context("cannot build the random model")?;
    let pre = &model.config().preprocess;
    let x = synthetic_image(model.spec().input_size, pre.mean, pre.std);

    let mut forward: Vec<ForwardTiming> = Vec::new();
    for &b in &batches {
        let t = time_forward(&model, &x, b, a.repeats, flops)?;
        eprintln!(
            "  forward batch {b:>3}: {:.4} s/image, {:.1} GFLOP/s",
            t.s_per_image, t.gflops
        );
        forward.push(t);
    }

    let explain = if a.no_explain {
        None
    } else {
        let params = VitCxParams {
            batch: a.explain_batch,
            ..VitCxParams::default()
        };
        let e = time_explanation(&model, &x, &params, max_masks)?;
        eprintln!(
            "  explanation: {} of {} masks in {:.2} s ({:.4} s/mask)",
            e.n_masks, e.n_masks_clustered, e.total_s, e.explain_s_per_mask
        );
        Some(e)
    };

    let report = report_json(preset, &a, &forward, explain.as_ref());
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        write_text(&mut out, preset, &forward, explain.as_ref(), &report)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// One value for a single batch size, else a map `"batch" -> value`.
fn per_batch(forward: &[ForwardTiming], f: impl Fn(&ForwardTiming) -> f64) -> Value {
    match forward {
        [one] => json!(f(one)),
        many => Value::Object(
            many.iter()
                .map(|t| (t.batch.to_string(), json!(f(t))))
                .collect::<Map<_, _>>(),
        ),
    }
}

fn report_json(
    preset: Preset,
    a: &BenchArgs,
    forward: &[ForwardTiming],
    explain: Option<&ExplainTiming>,
) -> Value {
    let arch = preset.arch();
    let explain_json = explain.map(|e| {
        json!({
            "stages_s": e.stages.iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect::<Map<_, _>>(),
            "total_s": e.total_s,
            "n_masks": e.n_masks,
            "n_masks_clustered": e.n_masks_clustered,
            "batch": e.batch,
            "perturbed_forward_s_per_image": e.perturbed_forward_s_per_image,
            "explain_s_per_mask": e.explain_s_per_mask,
            "projected_full_s": e.projected_full_s,
        })
    });
    json!({
        "tool": "vitcx",
        "version": env!("CARGO_PKG_VERSION"),
        "build_profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "model": preset.timm_name(),
        "preset": preset.name(),
        "arch": arch,
        "gflop_per_image": arch.flops_per_image() / 1e9,
        "seed": a.seed,
        "repeats": a.repeats,
        "dtype": "f32",
        "forward_s_per_image": per_batch(forward, |t| t.s_per_image),
        "forward_gflops": per_batch(forward, |t| t.gflops),
        "forward_runs_s": forward.iter()
            .map(|t| (t.batch.to_string(), json!(t.runs_s)))
            .collect::<Map<_, _>>(),
        "forward_s_per_image_bf16": Value::Null,
        "bf16": "not implemented",
        "explain_s_per_mask": explain.map(|e| e.explain_s_per_mask),
        "perturbed_forward_s_per_image": explain.map(|e| e.perturbed_forward_s_per_image),
        "explain": explain_json,
        "peak_rss_bytes": peak_rss_bytes(),
        "machine": machine_info(),
    })
}

fn write_text(
    out: &mut impl Write,
    preset: Preset,
    forward: &[ForwardTiming],
    explain: Option<&ExplainTiming>,
    report: &Value,
) -> Result<()> {
    let m = &report["machine"];
    writeln!(
        out,
        "{} (random weights, {:.2} GFLOP per image), f32, {} build",
        preset.timm_name(),
        preset.arch().flops_per_image() / 1e9,
        report["build_profile"].as_str().unwrap_or("?")
    )?;
    writeln!(
        out,
        "cpu: {} ({} logical, {} usable, candle threads {}); features: {}",
        m["cpu_model"].as_str().unwrap_or("?"),
        m["logical_cpus"],
        m["available_parallelism"],
        m["candle_threads"],
        m["features"]
            .as_array()
            .map(|f| f
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" "))
            .unwrap_or_default()
    )?;
    writeln!(
        out,
        "load average: {}",
        m["loadavg"].as_str().unwrap_or("?")
    )?;
    writeln!(out)?;
    writeln!(out, "batch   s/image   GFLOP/s   runs (s)")?;
    for t in forward {
        let runs: Vec<String> = t.runs_s.iter().map(|r| format!("{r:.3}")).collect();
        writeln!(
            out,
            "{:>5}   {:>7.4}   {:>7.1}   {}",
            t.batch,
            t.s_per_image,
            t.gflops,
            runs.join(" ")
        )?;
    }
    writeln!(out, "bf16: not implemented")?;
    if let Some(e) = explain {
        writeln!(out)?;
        writeln!(
            out,
            "explanation of a synthetic image: N = {} masks scored ({} after clustering), batch {}",
            e.n_masks, e.n_masks_clustered, e.batch
        )?;
        for (stage, s) in &e.stages {
            writeln!(out, "  {stage:<18} {s:>9.3} s")?;
        }
        writeln!(out, "  {:<18} {:>9.3} s", "total", e.total_s)?;
        writeln!(
            out,
            "  per perturbed image {:.4} s; per mask (total / N) {:.4} s",
            e.perturbed_forward_s_per_image, e.explain_s_per_mask
        )?;
        if e.n_masks < e.n_masks_clustered {
            writeln!(
                out,
                "  projected with all {} masks: {:.1} s",
                e.n_masks_clustered, e.projected_full_s
            )?;
        }
    }
    match report["peak_rss_bytes"].as_u64() {
        Some(b) => writeln!(
            out,
            "\npeak memory (VmHWM): {:.1} MiB",
            b as f64 / 1048576.0
        )?,
        None => writeln!(out, "\npeak memory: unknown on this system")?,
    }
    Ok(())
}
