//! Trains the bundled demo ViT on the synthetic shapes benchmark and writes a timm checkpoint.
//!
//! ```text
//! cargo run --release --example train_demo -- --seed 0
//! ```
//!
//! Writes `models/demo/model.safetensors` and `models/demo/config.json` (override with `--out`),
//! then reports the accuracy on 1,000 held-out generated images. Every few minutes (and at the
//! end) it also writes the training state beside them, so that `--resume DIR` continues the run
//! exactly; `config.json` records every command of the run with its steps, seconds, machine and
//! held-out accuracy.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use vitcx::eval::synth::Scene;
use vitcx::train::{accuracy, TrainParams, Trainer, HELD_OUT_SEED, VALIDATION_SEED};

/// What the demo model trains on and is validated on (the benchmark's sizes are a subset).
const TRAINING: Scene = Scene::TRAINING;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "Train the vitcx demo ViT on generated shapes")]
struct Args {
    /// Seed of the weights, the training images and the augmentation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Optimiser steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Images per step.
    #[arg(long)]
    batch: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Output directory of the checkpoint (default models/demo; with --resume, the run's own).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Held-out images for the final accuracy.
    #[arg(long, default_value_t = 1000)]
    eval_count: usize,
    /// Attention heads (default: the demo architecture's).
    #[arg(long)]
    heads: Option<usize>,
    /// Token width.
    #[arg(long)]
    dim: Option<usize>,
    /// Blocks.
    #[arg(long)]
    depth: Option<usize>,
    /// Print the running loss every this many steps [default: 100; with --resume, the run's].
    #[arg(long)]
    log_every: Option<usize>,
    /// Check validation accuracy every this many steps (0: never) [default: 0; with --resume,
    /// the run's].
    #[arg(long)]
    val_every: Option<usize>,
    /// Warm-up steps.
    #[arg(long)]
    warmup: Option<usize>,
    /// Do not train: measure the held-out accuracy of the checkpoint in this directory and record
    /// it in its config.json (`vitcx_training.held_out_accuracy`).
    #[arg(long, value_name = "DIR")]
    evaluate: Option<PathBuf>,
    /// Stop after this many steps (the schedule still spans --steps); the checkpoint equals the
    /// one a full run saves at that step.
    #[arg(long)]
    stop_after: Option<usize>,
    /// Weight of the token-labelling loss (0: off).
    #[arg(long)]
    token_label_weight: Option<f64>,
    /// Turn augmentation off (for comparison).
    #[arg(long)]
    no_augment: bool,
    /// Curriculum: raise the background clutter from 0 to 1 over this many steps (0: none).
    #[arg(long, default_value_t = 0)]
    clutter_ramp: usize,
    /// Generate this many training images once and draw every batch from them (0: a fresh
    /// image for every sample; about half the time of a step goes into generating them).
    #[arg(long, default_value_t = 0)]
    pool: usize,
    /// Start from the weights of this checkpoint (same architecture) instead of fresh ones, with
    /// a fresh optimiser and schedule (a new run warm-started).
    #[arg(long, value_name = "DIR", conflicts_with = "resume")]
    init_from: Option<PathBuf>,
    /// Continue the run checkpointed in DIR exactly where it stopped: its settings, weights,
    /// optimiser state and step (the other training flags are taken from the checkpoint; only
    /// --stop-after, --out and the logging flags apply; unset, those are the run's too).
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// Start from timm's random weights instead of the sine-cosine position embedding and the
    /// mimetic attention weights.
    #[arg(long)]
    random_init: bool,
    /// Write a checkpoint (model, optimiser state, step) to --out every this many minutes.
    #[arg(long, default_value_t = 5.0)]
    checkpoint_minutes: f64,
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if let Some(dir) = &args.evaluate {
        return evaluate(dir, args.eval_count);
    }
    // The run's first command: a resumed run keeps the settings it started with.
    let mut argv: Vec<String> = std::env::args().collect();
    let mut commands: Vec<serde_json::Value> = Vec::new();
    let mut seconds_before = 0.0;
    if let Some(dir) = args.resume.clone() {
        let extra = stored_extra(&dir)?;
        argv = serde_json::from_value(extra["argv"].clone())
            .with_context(|| format!("{}: the checkpoint records no command", dir.display()))?;
        let stored = Args::try_parse_from(&argv)?;
        commands = serde_json::from_value(extra["commands"].clone()).unwrap_or_default();
        seconds_before = extra["train_seconds"].as_f64().unwrap_or(0.0);
        args = Args {
            stop_after: args.stop_after,
            out: args.out.or(Some(dir.clone())),
            log_every: args.log_every.or(stored.log_every),
            val_every: args.val_every.or(stored.val_every),
            checkpoint_minutes: args.checkpoint_minutes,
            eval_count: args.eval_count,
            resume: Some(dir),
            init_from: None,
            ..stored
        };
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("models/demo"));
    let params = params_of(&args);
    let (log_every, val_every) = (
        args.log_every.unwrap_or(100).max(1),
        args.val_every.unwrap_or(0),
    );
    eprintln!("training {:?}", params);
    let device = Device::Cpu;
    if params.pool > 0 {
        eprintln!("generating a pool of {} training images", params.pool);
    }
    let mut trainer = match (&args.resume, &args.init_from) {
        (Some(dir), _) => {
            Trainer::restore(params.clone(), dir, &device)
                .with_context(|| format!("cannot resume from {}", dir.display()))?
                .0
        }
        (None, Some(dir)) => Trainer::init_from(params.clone(), dir, &device)
            .with_context(|| format!("cannot start from {}", dir.display()))?,
        (None, None) => Trainer::new(params.clone(), &device)?,
    };
    let first_step = trainer.step_count();
    let last_step = args.stop_after.unwrap_or(params.steps).min(params.steps);
    let bar = ProgressBar::new(params.steps as u64).with_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps {elapsed_precise}<{eta_precise} {msg}",
        )
        .expect("valid template"),
    );
    bar.set_position(first_step as u64);
    let start = Instant::now();
    let cpu_start = cpu_seconds();
    let mut last_checkpoint = Instant::now();
    let this_command = std::env::args().collect::<Vec<_>>().join(" ");
    // What the checkpoint records beside the weights: the run's first command (to resume with
    // its settings) and every command so far with its steps and seconds.
    let record = |trainer: &Trainer, held_out: Option<f64>| {
        let mut all = commands.clone();
        all.push(serde_json::json!({
            "command": this_command,
            "steps": [first_step, trainer.step_count()],
            "seconds": start.elapsed().as_secs_f64(),
            "cpu_seconds": cpu_seconds() - cpu_start,
            "machine": machine(),
            "held_out_accuracy": held_out,
        }));
        serde_json::json!({
            "argv": argv,
            "commands": all,
            "train_seconds": seconds_before + start.elapsed().as_secs_f64(),
        })
    };
    let (mut loss_avg, mut acc_avg) = (0.0, 0.0);
    while trainer.step_count() < last_step {
        let r = trainer.train_step()?;
        let k = if r.step == first_step + 1 { 1.0 } else { 0.02 };
        loss_avg += k * (r.loss - loss_avg);
        acc_avg += k * (r.batch_accuracy - acc_avg);
        bar.set_message(format!(
            "loss {loss_avg:.3} acc {acc_avg:.3} lr {:.2e}",
            r.lr
        ));
        bar.inc(1);
        if r.step % log_every == 0 {
            say(
                &bar,
                format!(
                    "step {} loss {loss_avg:.4} batch-acc {acc_avg:.3} lr {:.2e} {:.0}s",
                    r.step,
                    r.lr,
                    start.elapsed().as_secs_f64()
                ),
            );
        }
        if val_every > 0 && r.step % val_every == 0 && r.step < params.steps {
            // Monitoring only, on a validation stream disjoint from the held-out test stream.
            let val = accuracy(
                &trainer.model()?,
                &TRAINING,
                VALIDATION_SEED,
                300,
                50,
                &mut |_| {},
            )?;
            say(
                &bar,
                format!(
                    "step {} validation accuracy {:.2}% (300 images) {:.0}s",
                    r.step,
                    100.0 * val,
                    start.elapsed().as_secs_f64()
                ),
            );
        }
        if last_checkpoint.elapsed().as_secs_f64() >= 60.0 * args.checkpoint_minutes {
            let extra = record(&trainer, None);
            trainer
                .checkpoint(
                    &out,
                    Some(report(&params, &extra, None, args.eval_count)),
                    extra,
                )
                .with_context(|| format!("cannot checkpoint to {}", out.display()))?;
            last_checkpoint = Instant::now();
        }
    }
    bar.finish();
    let model = trainer.model()?;
    let acc = accuracy(
        &model,
        &TRAINING,
        HELD_OUT_SEED,
        args.eval_count,
        50,
        &mut |_| {},
    )?;
    let extra = record(&trainer, Some(acc));
    trainer
        .checkpoint(
            &out,
            Some(report(&params, &extra, Some(acc), args.eval_count)),
            extra,
        )
        .with_context(|| format!("cannot save to {}", out.display()))?;
    println!(
        "saved {} at step {}/{} after {:.0} s; held-out accuracy {:.2}% on {} images",
        out.display(),
        trainer.step_count(),
        params.steps,
        start.elapsed().as_secs_f64(),
        100.0 * acc,
        args.eval_count
    );
    Ok(())
}

/// The training settings the flags ask for.
fn params_of(args: &Args) -> TrainParams {
    let d = TrainParams::default();
    TrainParams {
        seed: args.seed,
        steps: args.steps.unwrap_or(d.steps),
        batch: args.batch.unwrap_or(d.batch),
        lr: args.lr.unwrap_or(d.lr),
        warmup: args.warmup.unwrap_or(d.warmup),
        token_label_weight: args.token_label_weight.unwrap_or(d.token_label_weight),
        clutter_ramp: args.clutter_ramp,
        pool: args.pool,
        augment: !args.no_augment,
        mimetic_init: !args.random_init,
        arch: vitcx::model::families::vit::random::Arch {
            heads: args.heads.unwrap_or(d.arch.heads),
            dim: args.dim.unwrap_or(d.arch.dim),
            mlp_dim: 2 * args.dim.unwrap_or(d.arch.dim),
            depth: args.depth.unwrap_or(d.arch.depth),
            ..d.arch
        },
        ..d
    }
}

/// The `vitcx_training` record of config.json: the settings, every command of the run with its
/// steps, seconds, machine and held-out accuracy, and the accuracy now.
fn report(
    p: &TrainParams,
    extra: &serde_json::Value,
    held_out: Option<f64>,
    count: usize,
) -> serde_json::Value {
    serde_json::json!({
        "seed": p.seed,
        "steps_planned": p.steps,
        "batch": p.batch,
        "lr": p.lr,
        "warmup": p.warmup,
        "weight_decay": p.weight_decay,
        "augment": p.augment,
        "token_label_weight": p.token_label_weight,
        "clutter_ramp": p.clutter_ramp,
        "pool": p.pool,
        "mimetic_init": p.mimetic_init,
        "commands": extra["commands"],
        "train_seconds": extra["train_seconds"],
        "held_out_seed": HELD_OUT_SEED,
        "held_out_images": count,
        "held_out_accuracy": held_out,
    })
}

/// User + system CPU seconds of this process so far (all threads; 0 where /proc is missing):
/// on a shared machine wall time overstates what training cost.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    // Clock ticks of 1/100 s (USER_HZ on Linux).
    f.iter().sum::<f64>() / 100.0
}

/// The CPU this runs on and the threads it uses, for the record.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{cpu}, {threads} threads")
}

/// The `extra` record stored with the checkpoint in `dir`.
fn stored_extra(dir: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    let path = dir.join("train_state.json");
    let text = std::fs::read(&path).with_context(|| {
        format!(
            "cannot read {}; --resume needs a checkpoint written by train_demo",
            path.display()
        )
    })?;
    let state: serde_json::Value =
        serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    Ok(state["extra"].clone())
}

/// Measures the held-out accuracy of the checkpoint in `dir` and records it in its config.json.
fn evaluate(dir: &std::path::Path, count: usize) -> anyhow::Result<()> {
    let model = vitcx::model::load(dir, &Device::Cpu)
        .with_context(|| format!("cannot load {}", dir.display()))?;
    let acc = accuracy(&model, &TRAINING, HELD_OUT_SEED, count, 50, &mut |_| {})?;
    // The benchmark draws a subset of the training sizes (Scene::BENCHMARK); same seed.
    let on_benchmark = accuracy(
        &model,
        &Scene::BENCHMARK,
        HELD_OUT_SEED,
        count,
        50,
        &mut |_| {},
    )?;
    let path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?,
    )
    .with_context(|| format!("{} is not JSON", path.display()))?;
    if !config["vitcx_training"].is_object() {
        config["vitcx_training"] = serde_json::json!({});
    }
    let r = &mut config["vitcx_training"];
    r["held_out_seed"] = HELD_OUT_SEED.into();
    r["held_out_images"] = count.into();
    r["held_out_accuracy"] = acc.into();
    r["held_out_accuracy_benchmark_sizes"] = on_benchmark.into();
    vitcx::io::output::write_json_atomic(&path, &config)?;
    println!(
        "{}: held-out accuracy {:.2}% on {count} images ({:.2}% with the benchmark's object sizes)",
        dir.display(),
        100.0 * acc,
        100.0 * on_benchmark
    );
    Ok(())
}

/// A line above the progress bar, or on stderr when the bar is hidden (not a terminal).
fn say(bar: &ProgressBar, msg: String) {
    if bar.is_hidden() {
        eprintln!("{msg}");
    } else {
        bar.println(msg);
    }
}
