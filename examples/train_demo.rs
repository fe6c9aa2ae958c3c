//! Trains the bundled demo ViT on the synthetic shapes benchmark and writes a timm checkpoint.
//!
//! ```text
//! cargo run --release --example train_demo -- --seed 0
//! ```
//!
//! Writes `models/demo/model.safetensors` and `models/demo/config.json` (override with `--out`),
//! then reports the accuracy on 1,000 held-out generated images.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use vitcx::train::{accuracy, TrainParams, Trainer, HELD_OUT_SEED, VALIDATION_SEED};

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
    /// Output directory of the checkpoint.
    #[arg(long, default_value = "models/demo")]
    out: PathBuf,
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
    /// Print the running loss every this many steps.
    #[arg(long, default_value_t = 100)]
    log_every: usize,
    /// Check validation accuracy and save a checkpoint every this many steps (0: never).
    #[arg(long, default_value_t = 0)]
    val_every: usize,
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
    /// Start from the weights of this checkpoint (same architecture) instead of fresh ones.
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(dir) = &args.evaluate {
        return evaluate(dir, args.eval_count);
    }
    let d = TrainParams::default();
    let params = TrainParams {
        seed: args.seed,
        steps: args.steps.unwrap_or(d.steps),
        batch: args.batch.unwrap_or(d.batch),
        lr: args.lr.unwrap_or(d.lr),
        warmup: args.warmup.unwrap_or(d.warmup),
        token_label_weight: args.token_label_weight.unwrap_or(d.token_label_weight),
        clutter_ramp: args.clutter_ramp,
        pool: args.pool,
        augment: !args.no_augment,
        arch: vitcx::model::families::vit::random::Arch {
            heads: args.heads.unwrap_or(d.arch.heads),
            dim: args.dim.unwrap_or(d.arch.dim),
            mlp_dim: 2 * args.dim.unwrap_or(d.arch.dim),
            depth: args.depth.unwrap_or(d.arch.depth),
            ..d.arch
        },
        ..d
    };
    eprintln!("training {:?}", params);
    let device = Device::Cpu;
    if params.pool > 0 {
        eprintln!("generating a pool of {} training images", params.pool);
    }
    let mut trainer = match &args.resume {
        Some(dir) => Trainer::resume(params.clone(), dir, &device)
            .with_context(|| format!("cannot resume from {}", dir.display()))?,
        None => Trainer::new(params.clone(), &device)?,
    };
    let bar = ProgressBar::new(params.steps as u64).with_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps {elapsed_precise}<{eta_precise} {msg}",
        )
        .expect("valid template"),
    );
    let start = Instant::now();
    let (mut loss_avg, mut acc_avg) = (0.0, 0.0);
    for _ in 0..args.stop_after.unwrap_or(params.steps).min(params.steps) {
        let r = trainer.train_step()?;
        let k = if r.step == 1 { 1.0 } else { 0.02 };
        loss_avg += k * (r.loss - loss_avg);
        acc_avg += k * (r.batch_accuracy - acc_avg);
        bar.set_message(format!(
            "loss {loss_avg:.3} acc {acc_avg:.3} lr {:.2e}",
            r.lr
        ));
        bar.inc(1);
        if r.step % args.log_every == 0 {
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
        if args.val_every > 0 && r.step % args.val_every == 0 && r.step < params.steps {
            // Monitoring only, on a validation stream disjoint from the held-out test stream.
            let val = accuracy(&trainer.model()?, VALIDATION_SEED, 300, 50, &mut |_| {})?;
            say(
                &bar,
                format!(
                    "step {} validation accuracy {:.2}% (300 images)",
                    r.step,
                    100.0 * val
                ),
            );
            trainer.save(&args.out, None)?;
        }
    }
    bar.finish();
    let model = trainer.model()?;
    let acc = accuracy(&model, HELD_OUT_SEED, args.eval_count, 50, &mut |_| {})?;
    let report = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "seed": params.seed,
        "steps_planned": params.steps,
        "steps_taken": trainer.step_count(),
        "batch": params.batch,
        "lr": params.lr,
        "warmup": params.warmup,
        "weight_decay": params.weight_decay,
        "augment": params.augment,
        "token_label_weight": params.token_label_weight,
        "clutter_ramp": params.clutter_ramp,
        "pool": params.pool,
        "resumed_from": args.resume.as_ref().map(|d| d.display().to_string()),
        // How the starting weights were made, so the chain of runs stays on record.
        "resumed_from_training": args.resume.as_ref().and_then(|d| previous_training(d)),
        "held_out_seed": HELD_OUT_SEED,
        "held_out_images": args.eval_count,
        "held_out_accuracy": acc,
        "train_seconds": start.elapsed().as_secs_f64(),
    });
    trainer
        .save(&args.out, Some(report))
        .with_context(|| format!("cannot save to {}", args.out.display()))?;
    println!(
        "saved {} after {:.0} s; held-out accuracy {:.2}% on {} images",
        args.out.display(),
        start.elapsed().as_secs_f64(),
        100.0 * acc,
        args.eval_count
    );
    Ok(())
}

/// Measures the held-out accuracy of the checkpoint in `dir` and records it in its config.json.
fn evaluate(dir: &std::path::Path, count: usize) -> anyhow::Result<()> {
    let model = vitcx::model::load(dir, &Device::Cpu)
        .with_context(|| format!("cannot load {}", dir.display()))?;
    let acc = accuracy(&model, HELD_OUT_SEED, count, 50, &mut |_| {})?;
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
    vitcx::io::output::write_json_atomic(&path, &config)?;
    println!(
        "{}: held-out accuracy {:.2}% on {count} images",
        dir.display(),
        100.0 * acc
    );
    Ok(())
}

/// The `vitcx_training` record of the checkpoint in `dir`, if it has one.
fn previous_training(dir: &std::path::Path) -> Option<serde_json::Value> {
    let text = std::fs::read(dir.join("config.json")).ok()?;
    let config: serde_json::Value = serde_json::from_slice(&text).ok()?;
    config.get("vitcx_training").cloned()
}

/// A line above the progress bar, or on stderr when the bar is hidden (not a terminal).
fn say(bar: &ProgressBar, msg: String) {
    if bar.is_hidden() {
        eprintln!("{msg}");
    } else {
        bar.println(msg);
    }
}
