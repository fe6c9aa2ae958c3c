//! `vitcx bench`: times a random-weight ViT's forward pass and one explanation on this machine.
//!
//! Progress goes to stderr; the report (text, or one JSON object with `--json`) to stdout, with
//! the same keys `scripts/bench_pytorch.py` prints for PyTorch.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use vitcx::bench::{
    fidelity, fma_peak_gflops, machine_info, peak_rss_bytes, random_model, synthetic_image,
    time_explanation, time_forward, time_linear, vit_linear_shapes, ExplainTiming, Fidelity,
    ForwardTiming, LinearTiming, Preset, PresetArch,
};
use vitcx::methods::vitcx::VitCxParams;
use vitcx::model::{Backbone, Precision};

use crate::args::BenchArgs;

/// Batch sizes timed when `--batch` is not given.
const DEFAULT_BATCHES: [usize; 3] = [1, 8, 32];

pub fn run(a: BenchArgs, device: &candle_core::Device) -> Result<ExitCode> {
    let preset: Preset = a.arch.as_deref().unwrap_or(&a.preset).parse()?;
    let batches = match a.batch {
        Some(b) => {
            vitcx::methods::driver::check_batch(b, "batch")?;
            vec![b]
        }
        None => DEFAULT_BATCHES.to_vec(),
    };
    if a.repeats == 0 || a.repeats > 1000 {
        bail!("repeats {} out of range; expected 1 to 1000", a.repeats);
    }
    vitcx::methods::driver::check_batch(a.explain_batch, "explain batch")?;
    let max_masks = match a.explain_masks.as_str() {
        "all" => None,
        s => match s.parse::<usize>() {
            Ok(n) if n > 0 => Some(n),
            _ => bail!("explain masks '{s}' invalid; expected a positive integer or 'all'"),
        },
    };
    let precisions = match a.precision.as_str() {
        "all" => Precision::ALL.to_vec(),
        "both" => vec![Precision::F32, Precision::Bf16],
        p => vec![Precision::parse(p).map_err(|_| {
            anyhow::anyhow!("precision '{p}' unknown; expected f32, bf16, int8, int16, both or all")
        })?],
    };
    let arch = preset.arch();
    let flops = arch.flops_per_image();
    let linear_arch = match (&arch, a.linears) {
        (PresetArch::Vit(v), true) if device.is_cpu() => Some(*v),
        (_, true) if !device.is_cpu() => bail!("--linears times the CPU kernels; drop --device"),
        (PresetArch::Swin(_), true) => {
            bail!(
                "--linears times plain-block ViTs; {} is a Swin",
                preset.timm_name()
            )
        }
        _ => None,
    };

    eprintln!(
        "vitcx bench: building {} ({:.2} GFLOP per image) with random weights (seed {})",
        preset.timm_name(),
        flops / 1e9,
        a.seed
    );
    let model = random_model(preset, a.seed, device).context("cannot build the random model")?;
    let pre = &model.spec().preprocess;
    let x = synthetic_image(model.spec().input_size, pre.mean, pre.std);

    // The CPU's peak says nothing about a GPU run.
    let peak = device
        .is_cpu()
        .then(|| fma_peak_gflops(candle_core::utils::get_num_threads()))
        .flatten();
    if let Some(p) = peak {
        eprintln!("  f32 FMA peak of this machine: {p:.0} GFLOP/s");
    }
    let mut forward: Vec<(Precision, ForwardTiming)> = Vec::new();
    for &b in &batches {
        // Both precisions at one batch size back to back, so a change of machine load hits both.
        for &p in &precisions {
            let t = time_forward(&model, &x, b, a.repeats, flops, p)?;
            eprintln!(
                "  forward batch {b:>3} {:>4}: {:.4} s/image, {:.1} GFLOP/s",
                p.name(),
                t.s_per_image,
                t.gflops
            );
            forward.push((p, t));
        }
    }

    let mut linears: Vec<(usize, LinearTiming)> = Vec::new();
    if let Some(v) = &linear_arch {
        for &b in &batches {
            for (layer, rows, k, n) in vit_linear_shapes(v, b) {
                for &p in &precisions {
                    let t = time_linear(layer, (rows, k, n), p, a.repeats)?;
                    eprintln!(
                        "  linear batch {b:>3} {layer:<4} {:>4} ({rows} x {k}) @ ({k} x {n}): {:.1} GFLOP/s",
                        p.name(),
                        t.gflops
                    );
                    linears.push((b, t));
                }
            }
        }
    }

    let mut explain: Vec<(Precision, ExplainTiming)> = Vec::new();
    if !a.no_explain {
        for &p in &precisions {
            let params = VitCxParams {
                batch: a.explain_batch,
                precision: p,
                ..VitCxParams::default()
            };
            let e = time_explanation(&model, &x, &params, max_masks)?;
            eprintln!(
                "  explanation {:>4}: {} of {} masks in {:.2} s ({:.4} s/mask)",
                p.name(),
                e.n_masks,
                e.n_masks_clustered,
                e.total_s,
                e.explain_s_per_mask
            );
            explain.push((p, e));
        }
    }
    // Each reduced precision against f32, when both were explained.
    let mut fidelities = Vec::new();
    if let Some((_, e32)) = explain.iter().find(|(p, _)| *p == Precision::F32) {
        for (p, e) in explain.iter().filter(|(p, _)| *p != Precision::F32) {
            let f = fidelity(&model, &x, *p, &e32.saliency, &e.saliency)
                .context("cannot compare the precisions")?;
            fidelities.push(f);
        }
    }

    let bf16_kernel = if device.is_cpu() {
        Precision::bf16_kernel()
    } else {
        "candle bf16 matmul"
    };
    let report = report_json(
        preset,
        &a,
        Measured {
            forward: &forward,
            linears: &linears,
            explain: &explain,
            fidelities: &fidelities,
            peak,
            bf16_kernel,
            int8_kernel: Precision::int8_kernel(),
        },
    );
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        write_text(&mut out, preset, &forward, &explain, &report)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The timings of one precision: `null` if it was not timed, one value for a single batch size,
/// else a map `"batch" -> value`.
fn per_batch(
    forward: &[(Precision, ForwardTiming)],
    precision: Precision,
    f: impl Fn(&ForwardTiming) -> Value,
) -> Value {
    let mine: Vec<&ForwardTiming> = forward
        .iter()
        .filter(|(p, _)| *p == precision)
        .map(|(_, t)| t)
        .collect();
    match mine.as_slice() {
        [] => Value::Null,
        [one] => f(one),
        many => Value::Object(
            many.iter()
                .map(|t| (t.batch.to_string(), f(t)))
                .collect::<Map<_, _>>(),
        ),
    }
}

/// Every timed run of one precision, as a map `"batch" -> [seconds]`.
fn runs_map(forward: &[(Precision, ForwardTiming)], precision: Precision) -> Value {
    Value::Object(
        forward
            .iter()
            .filter(|(p, _)| *p == precision)
            .map(|(_, t)| (t.batch.to_string(), json!(t.runs_s)))
            .collect(),
    )
}

fn explain_json(e: &ExplainTiming) -> Value {
    json!({
        "stages_s": e.stages.iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect::<Map<_, _>>(),
        "total_s": e.total_s,
        "n_masks": e.n_masks,
        "n_masks_clustered": e.n_masks_clustered,
        "batch": e.batch,
        "class": e.class,
        "perturbed_forward_s_per_image": e.perturbed_forward_s_per_image,
        "explain_s_per_mask": e.explain_s_per_mask,
        "projected_full_s": e.projected_full_s,
    })
}

/// The linear layers timed alone at one precision (`--linears`): a list, empty if none. The
/// share is of the f32 FMA peak for every precision (bf16 and int8 can pass it).
fn linears_json(
    linears: &[(usize, LinearTiming)],
    precision: Precision,
    peak: Option<f64>,
) -> Value {
    linears
        .iter()
        .filter(|(_, t)| t.precision == precision)
        .map(|(b, t)| {
            json!({
                "batch": b,
                "layer": t.layer,
                "shape": t.shape,
                "runs_s": t.runs_s,
                "gflops": t.gflops,
                "share_of_peak": peak.map(|p| t.gflops / p),
                "kernel": t.kernel,
                "gemm": t.gemm,
            })
        })
        .collect()
}

/// What one `vitcx bench` run measured.
struct Measured<'a> {
    forward: &'a [(Precision, ForwardTiming)],
    linears: &'a [(usize, LinearTiming)],
    explain: &'a [(Precision, ExplainTiming)],
    fidelities: &'a [Fidelity],
    peak: Option<f64>,
    bf16_kernel: &'static str,
    int8_kernel: &'static str,
}

/// One precision's fidelity as `vitcx bench --json` gives it (`top1_bf16`, `top1_int8`).
fn fidelity_json(f: &Fidelity) -> Value {
    json!({
        "saliency_pearson": f.saliency_pearson,
        "top1_f32": f.top1_f32,
        format!("top1_{}", f.precision.name()): f.top1,
        "same_top1": f.same_top1,
        "max_abs_prob_diff": f.max_abs_prob_diff,
        "logits_rel_l2": f.logits_rel_l2,
    })
}

fn report_json(preset: Preset, a: &BenchArgs, m: Measured) -> Value {
    let Measured {
        forward,
        linears,
        explain,
        fidelities,
        peak,
        bf16_kernel,
        int8_kernel,
    } = m;
    let arch = preset.arch();
    let ex = |p: Precision| explain.iter().find(|(q, _)| *q == p).map(|(_, e)| e);
    let mut report = json!({
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
        "forward_s_per_image": per_batch(forward, Precision::F32, |t| json!(t.s_per_image)),
        "forward_gflops": per_batch(forward, Precision::F32, |t| json!(t.gflops)),
        "fma_peak_gflops": peak,
        "forward_share_of_peak": per_batch(forward, Precision::F32, |t| {
            json!(peak.map(|p| t.gflops / p))
        }),
        "forward_runs_s": runs_map(forward, Precision::F32),
        "linear_f32": linears_json(linears, Precision::F32, peak),
        "f32_kernel": Precision::f32_kernel(),
        "bf16_kernel": bf16_kernel,
        "int8_kernel": int8_kernel,
        "int16_kernel": Precision::int16_kernel(),
        "explain_s_per_mask": ex(Precision::F32).map(|e| e.explain_s_per_mask),
        "perturbed_forward_s_per_image": ex(Precision::F32).map(|e| e.perturbed_forward_s_per_image),
        "explain": ex(Precision::F32).map(explain_json),
        "peak_rss_bytes": peak_rss_bytes(),
        "machine": machine_info(),
    });
    // The reduced precisions' keys: the f32 ones with `_bf16` / `_int8` appended.
    for p in Precision::REDUCED {
        let n = p.name();
        let e = ex(p);
        let keys = [
            (
                "forward_s_per_image",
                per_batch(forward, p, |t| json!(t.s_per_image)),
            ),
            ("forward_gflops", per_batch(forward, p, |t| json!(t.gflops))),
            ("forward_runs_s", runs_map(forward, p)),
            ("explain_s_per_mask", json!(e.map(|e| e.explain_s_per_mask))),
            (
                "perturbed_forward_s_per_image",
                json!(e.map(|e| e.perturbed_forward_s_per_image)),
            ),
            ("explain", json!(e.map(explain_json))),
        ];
        for (k, v) in keys {
            report[format!("{k}_{n}")] = v;
        }
        report[format!("linear_{n}")] = linears_json(linears, p, peak);
        let f = fidelities.iter().find(|f| f.precision == p);
        report[format!("{n}_fidelity")] = json!(f.map(fidelity_json));
    }
    report
}

fn write_text(
    out: &mut impl Write,
    preset: Preset,
    forward: &[(Precision, ForwardTiming)],
    explain: &[(Precision, ExplainTiming)],
    report: &Value,
) -> Result<()> {
    let m = &report["machine"];
    writeln!(
        out,
        "{} (random weights, {:.2} GFLOP per image), {} build",
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
    if let Some(p) = report["fma_peak_gflops"].as_f64() {
        writeln!(out, "f32 FMA peak (same threads): {p:.0} GFLOP/s")?;
    }
    writeln!(
        out,
        "f32 kernel: {}; bf16 kernel: {}; int8 kernel: {}; int16 kernel: {}",
        report["f32_kernel"].as_str().unwrap_or("?"),
        report["bf16_kernel"].as_str().unwrap_or("?"),
        report["int8_kernel"].as_str().unwrap_or("?"),
        report["int16_kernel"].as_str().unwrap_or("?")
    )?;
    writeln!(out)?;
    writeln!(out, "batch   dtype   s/image   GFLOP/s   runs (s)")?;
    for (p, t) in forward {
        let runs: Vec<String> = t.runs_s.iter().map(|r| format!("{r:.3}")).collect();
        writeln!(
            out,
            "{:>5}   {:>5}   {:>7.4}   {:>7.1}   {}",
            t.batch,
            p.name(),
            t.s_per_image,
            t.gflops,
            runs.join(" ")
        )?;
    }
    for p in Precision::ALL {
        let Some(lin) = report[format!("linear_{}", p.name())]
            .as_array()
            .filter(|l| !l.is_empty())
        else {
            continue;
        };
        writeln!(out)?;
        writeln!(
            out,
            "{} linear layers alone (share of the f32 FMA peak)",
            p.name()
        )?;
        // f32 on the packed kernel: gemm on the same operands, run by run (the anchor).
        let anchored = lin.iter().any(|l| l["gemm"].is_object());
        writeln!(
            out,
            "batch   layer   rows x k x n          GFLOP/s   of peak{}",
            if anchored {
                "   gemm GFLOP/s   gemm s / ours (median of pairs)"
            } else {
                ""
            }
        )?;
        for l in lin {
            let s = &l["shape"];
            let shape = format!("{} x {} x {}", s[0], s[1], s[2]);
            let share = l["share_of_peak"]
                .as_f64()
                .map_or("?".to_string(), |f| format!("{:.0}%", 100.0 * f));
            let gemm = match (l["gemm"]["gflops"].as_f64(), l["gemm"]["speedup"].as_f64()) {
                (Some(g), Some(r)) => format!("   {g:>12.1}   {r:>5.3}"),
                _ => String::new(),
            };
            writeln!(
                out,
                "{:>5}   {:<5}   {shape:<20}  {:>7.1}   {share:>7}{gemm}",
                l["batch"].as_u64().unwrap_or(0),
                l["layer"].as_str().unwrap_or("?"),
                l["gflops"].as_f64().unwrap_or(f64::NAN),
            )?;
        }
    }
    for (p, e) in explain {
        writeln!(out)?;
        writeln!(
            out,
            "explanation of a synthetic image, {} perturbed passes: N = {} masks scored ({} after clustering), batch {}",
            p.name(), e.n_masks, e.n_masks_clustered, e.batch
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
    for p in Precision::REDUCED {
        let n = p.name();
        if let Some(f) = report[format!("{n}_fidelity")].as_object() {
            writeln!(
                out,
                "\n{n} vs f32: saliency pearson {:.6}; top-1 {} vs {}; largest probability difference {:.2e}; logits relative L2 error {:.2e}",
                f["saliency_pearson"].as_f64().unwrap_or(f64::NAN),
                f[&format!("top1_{n}")],
                f["top1_f32"],
                f["max_abs_prob_diff"].as_f64().unwrap_or(f64::NAN),
                f["logits_rel_l2"].as_f64().unwrap_or(f64::NAN)
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
