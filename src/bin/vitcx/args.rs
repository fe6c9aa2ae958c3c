//! Command-line arguments (clap derive) and their conversion to the library's settings. Values
//! are validated by the library before any work.

use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, Parser, Subcommand};
use vitcx::eval::metrics::{Baseline, CurveParams};

/// Explain what a Vision Transformer looks at, with ViT-CX (causal explanations, IJCAI 2023).
#[derive(Debug, Parser)]
#[command(name = "vitcx", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Where the model runs: cpu, or cuda / cuda:N (needs a build with `--features cuda`).
    #[arg(long, global = true, default_value = "cpu")]
    pub device: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Explain the model's prediction for one or more images (saliency .npy, PNG overlay, JSON).
    Explain(ExplainArgs),
    /// Print the top classes with labels and probabilities.
    Predict(PredictArgs),
    /// Show what was detected in a checkpoint: family, sizes, tokens, grid, preprocessing, labels.
    Inspect(InspectArgs),
    /// Write a seeded benchmark: one shape (the class) per image on clutter, with masks, the
    /// scenes without their objects, and a manifest.
    Synth(SynthArgs),
    /// Score explanations over a data set: deletion/insertion AUC, pointing games, accuracy.
    Eval(EvalArgs),
    /// Explain one image with several methods side by side: one PNG with each map and its
    /// deletion/insertion AUC, plus JSON.
    Compare(CompareArgs),
    /// Combine the outputs of shards (`--shard I/N`) into one: the same files a single run
    /// over every image writes.
    Merge(MergeArgs),
    /// Time a random-weight ViT (default ViT-B/16) forward pass and one explanation on this machine.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Images: files, directories (their png/jpg/jpeg/bmp/webp files) or glob patterns.
    #[arg(required = true)]
    pub images: Vec<String>,
    /// Read image folders with their subfolders.
    #[arg(long)]
    pub recursive: bool,
    /// Checkpoint: a local directory or file, a Hugging Face Hub id (owner/name[@revision]), or
    /// `demo` (the bundled shapes model, also used when this is left out).
    #[arg(long, short)]
    pub model: Option<String>,
    /// Build the model for another input size, `N` or `HxW` (a multiple of the patch), its
    /// position embedding resampled as timm's `create_model(..., img_size=...)` does.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub input_size: Option<(usize, usize)>,
    /// Output directory.
    #[arg(long, short, default_value = "vitcx-out")]
    pub out: PathBuf,
    /// Class to explain (id or exact label); repeatable. Default: the top-1 class.
    #[arg(long = "class", value_name = "CLASS")]
    pub classes: Vec<String>,
    /// Explain the K most probable classes (all from the same forward passes).
    #[arg(long, value_name = "K", conflicts_with = "classes")]
    pub top_k: Option<usize>,
    /// Explanation method: vitcx, rollout (Attention Rollout), rise, gradcam, or a control map
    /// (random, center).
    #[arg(long, default_value = "vitcx")]
    pub method: String,
    #[command(flatten)]
    pub vitcx: VitCxArgs,
    #[command(flatten)]
    pub other: MethodArgs,
    /// How images reach the model's input size: `stretch` (the reference's bilinear stretch of
    /// the whole image) or `processor` (the checkpoint's own resize and centre crop).
    #[arg(long, value_enum, default_value_t = ResizeArg::Stretch)]
    pub resize: ResizeArg,
    /// Do not write the PNG overlay.
    #[arg(long)]
    pub no_overlay: bool,
    #[command(flatten)]
    pub run: RunArgs,
    /// No progress bars.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Running over many images as shards of a job array, resumably.
#[derive(Debug, Args, Clone, Default)]
pub struct RunArgs {
    /// Take only shard I of N (I from 0): each image belongs to one shard by a hash of its path
    /// relative to the input folder (or its manifest entry). Without it, a Slurm array's
    /// SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT are used when set.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
    /// The number of shards, the index coming from the environment: JOB_COMPLETION_INDEX
    /// (Kubernetes Indexed Job) or SLURM_ARRAY_TASK_ID.
    #[arg(long, value_name = "N")]
    pub shards: Option<usize>,
    /// Redo images of this shard even where --out holds results made with other settings
    /// (which are overwritten), and start the run record afresh.
    #[arg(long)]
    pub force: bool,
    /// Try again the images an earlier run of this shard recorded as failed (by default a rerun
    /// skips them and reports them again).
    #[arg(long)]
    pub retry_failed: bool,
}

#[derive(Debug, Args)]
pub struct PredictArgs {
    /// Images: files, directories or glob patterns.
    #[arg(required = true)]
    pub images: Vec<String>,
    /// Read image folders with their subfolders.
    #[arg(long)]
    pub recursive: bool,
    /// Checkpoint: a local directory or file, a Hugging Face Hub id (owner/name[@revision]), or
    /// `demo` (the bundled shapes model, also used when this is left out).
    #[arg(long, short)]
    pub model: Option<String>,
    /// Build the model for another input size, `N` or `HxW` (a multiple of the patch), its
    /// position embedding resampled as timm's `create_model(..., img_size=...)` does.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub input_size: Option<(usize, usize)>,
    /// How many classes to print.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// How images reach the model's input size (see `explain --help`).
    #[arg(long, value_enum, default_value_t = ResizeArg::Stretch)]
    pub resize: ResizeArg,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Checkpoint: a local directory or file, a Hugging Face Hub id, or `demo` (the bundled shapes
    /// model, also used when this is left out).
    pub model: Option<String>,
    /// Build the model for another input size, `N` or `HxW` (a multiple of the patch), its
    /// position embedding resampled as timm's `create_model(..., img_size=...)` does.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub input_size: Option<(usize, usize)>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Number of samples (224x224 images).
    #[arg(long, default_value_t = 100)]
    pub count: usize,
    /// Seed: the same seed writes byte-identical files.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory (created if missing): NNNNN.png, NNNNN.mask.png, NNNNN.background.png
    /// (the scene without its object), manifest.jsonl.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Background clutter in [0, 1]: 1 is the benchmark, 0 a plain gradient (for ablations).
    #[arg(long, default_value_t = 1.0)]
    pub clutter: f32,
    /// The object's diameter as a fraction of the image side, `LO-HI` (uniform): 0.35-0.45 is
    /// the benchmark; the demo model trained on 0.35-0.70.
    #[arg(long, value_name = "LO-HI", value_parser = parse_range, default_value = "0.35-0.45")]
    pub object_size: (f32, f32),
    /// No progress bar or summary line.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Checkpoint: a local directory or file, a Hugging Face Hub id (owner/name[@revision]), or
    /// `demo` (the bundled shapes model, also used when this is left out).
    #[arg(long, short)]
    pub model: Option<String>,
    /// A manifest.jsonl, a directory holding one, or a directory of images (no ground truth).
    #[arg(long)]
    pub data: PathBuf,
    /// Let the manifest name files outside its folder (absolute paths, `..`).
    #[arg(long)]
    pub allow_outside: bool,
    /// Methods to score, comma-separated: vitcx, rollout, rise, gradcam, and the control maps
    /// random (uniform noise per pixel) and center (a centred Gaussian blob).
    #[arg(long = "methods", alias = "method", default_value = "vitcx")]
    pub methods: String,
    /// Output directory (per_image.csv, summary.json, table.csv, table.md, deletion.png,
    /// insertion.png).
    #[arg(long, short, default_value = "vitcx-eval")]
    pub out: PathBuf,
    #[command(flatten)]
    pub curve: CurveArgs,
    /// Also score deletion to, and insertion from, each image without its object (the
    /// manifest's `background`, which `vitcx synth` writes), beside the configured curves:
    /// `deletion_auc_background` and `insertion_auc_background`. An image without a background
    /// fails.
    #[arg(long)]
    pub background_curves: bool,
    /// Sanity check (Adebayo et al. 2018): explain each image again with the model's weights
    /// randomised, cascading from the head down and all at once (seeded by --seed), and report
    /// the Spearman correlation with the trained model's map (sanity.csv, sanity.md).
    #[arg(long)]
    pub sanity: bool,
    /// Evaluate only the first N images.
    #[arg(long)]
    pub limit: Option<usize>,
    /// ViT-CX settings; `--batch` also sets the images per pass of the curves and of RISE.
    #[command(flatten)]
    pub vitcx: VitCxArgs,
    #[command(flatten)]
    pub other: MethodArgs,
    #[command(flatten)]
    pub run: RunArgs,
    /// No progress bars.
    #[arg(long, short)]
    pub quiet: bool,
}

/// `vitcx merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The shards' output folders (each holding a vitcx-run.*.jsonl record).
    #[arg(required = true)]
    pub dirs: Vec<PathBuf>,
    /// Where the combined results go: an evaluation's per_image.csv, summary.json, tables and
    /// plots, or every explanation's files.
    #[arg(long, short)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// The image to explain.
    pub image: PathBuf,
    /// Checkpoint: a local directory or file, a Hugging Face Hub id (owner/name[@revision]), or
    /// `demo` (the bundled shapes model, also used when this is left out).
    #[arg(long, short)]
    pub model: Option<String>,
    /// Methods, comma-separated, in the order shown.
    #[arg(long, default_value = "vitcx,rollout,rise,gradcam")]
    pub methods: String,
    /// Class to explain (id or exact label). Default: the top-1 class.
    #[arg(long = "class", value_name = "CLASS")]
    pub class: Option<String>,
    /// Output directory (<image>.compare.png and <image>.compare.json).
    #[arg(long, short, default_value = "vitcx-compare")]
    pub out: PathBuf,
    #[command(flatten)]
    pub curve: CurveArgs,
    #[command(flatten)]
    pub vitcx: VitCxArgs,
    #[command(flatten)]
    pub other: MethodArgs,
    /// No progress bars.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Deletion/insertion curve settings shared by `eval` and `compare` (RISE protocol defaults).
#[derive(Debug, Args)]
pub struct CurveArgs {
    /// Pixels changed per step of the deletion/insertion curves (RISE: 224).
    #[arg(long, default_value_t = 224)]
    pub step: usize,
    /// What deleted pixels become: zero (the dataset mean), blur, or background (`eval` only:
    /// the image without its object, from the manifest).
    #[arg(long, default_value = "zero")]
    pub deletion_baseline: String,
    /// Where insertion starts: blur, zero, or background (`eval` only: the image without its
    /// object, from the manifest).
    #[arg(long, default_value = "blur")]
    pub insertion_baseline: String,
    /// Blur baseline kernel size in pixels, odd (RISE: 11).
    #[arg(long, default_value_t = 11)]
    pub blur_kernel: usize,
    /// Blur baseline standard deviation in pixels (RISE: 5).
    #[arg(long, default_value_t = 5.0, allow_negative_numbers = true)]
    pub blur_sigma: f32,
}

/// Settings of the methods other than ViT-CX (`--layer` also sets Grad-CAM's layer, `--seed`
/// the RISE masks and the random control, `--batch` RISE's images per pass).
#[derive(Debug, Args)]
pub struct MethodArgs {
    /// Attention Rollout: fraction of each block's smallest head-averaged attention entries set
    /// to zero, in [0, 1) (vit-explain's default 0.9; 0 is the paper's plain rollout).
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true)]
    pub discard_ratio: f64,
    /// RISE: number of random masks.
    #[arg(long, default_value_t = 4000)]
    pub masks: usize,
    /// RISE: grid cells per side of a mask.
    #[arg(long, default_value_t = 8)]
    pub rise_cells: usize,
    /// RISE: probability that a grid cell is kept.
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    pub rise_p1: f64,
}

/// Each method-specific flag (clap's id, the flag) and the methods that read it.
const METHOD_FLAGS: &[(&str, &str, &[&str])] = &[
    ("threshold", "--threshold", &["vitcx"]),
    ("noise_std", "--noise-std", &["vitcx"]),
    ("precision", "--precision", &["vitcx"]),
    ("layer", "--layer", &["vitcx", "gradcam"]),
    ("tap", "--tap", &["vitcx", "gradcam"]),
    ("discard_ratio", "--discard-ratio", &["rollout"]),
    ("masks", "--masks", &["rise"]),
    ("rise_cells", "--rise-cells", &["rise"]),
    ("rise_p1", "--rise-p1", &["rise"]),
];

/// One line for each flag given on the command line that none of the chosen methods reads
/// (`--precision int8 --method rise`): a user would otherwise believe it took effect. Empty
/// for commands without methods, and when a method name is unknown (that error comes later).
pub fn unread_flags(command: &Command, matches: &ArgMatches) -> Vec<String> {
    let methods = match command {
        Command::Explain(a) => a.method.as_str(),
        Command::Eval(a) => a.methods.as_str(),
        Command::Compare(a) => a.methods.as_str(),
        _ => return Vec::new(),
    };
    let Ok(chosen) = vitcx::methods::parse_list(methods) else {
        return Vec::new();
    };
    let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    METHOD_FLAGS
        .iter()
        .filter(|(id, _, readers)| given(id) && !chosen.iter().any(|m| readers.contains(&m.name)))
        .map(|(_, flag, readers)| {
            let names: Vec<_> = chosen.iter().map(|m| m.name).collect();
            format!(
                "{flag} is read by {} only; ignored for {}",
                readers.join(" and "),
                names.join(", ")
            )
        })
        .collect()
}

/// All methods' settings from the shared flags (validated later, per method).
pub fn method_params(v: &VitCxArgs, o: &MethodArgs) -> vitcx::MethodParams {
    vitcx::MethodParams {
        vitcx: v.params(),
        rollout: vitcx::methods::rollout::RolloutParams {
            discard_ratio: o.discard_ratio,
        },
        rise: vitcx::methods::rise::RiseParams {
            masks: o.masks,
            cells: o.rise_cells,
            p1: o.rise_p1,
            seed: v.seed,
            batch: v.batch,
        },
        gradcam: vitcx::methods::gradcam::GradCamParams {
            layer: v.layer,
            tap: v.tap.clone(),
            ..Default::default()
        },
        control_seed: v.seed,
    }
}

/// Curve settings from the flags, checked before any model or image is read.
pub fn curve_params(c: &CurveArgs, batch: usize) -> anyhow::Result<CurveParams> {
    let baseline = |name: &str, flag: &str| {
        Baseline::parse(name, c.blur_kernel, c.blur_sigma)
            .map_err(|e| anyhow::anyhow!("{flag}: {e}"))
    };
    let curve = CurveParams {
        step: c.step,
        deletion_baseline: baseline(&c.deletion_baseline, "--deletion-baseline")?,
        insertion_baseline: baseline(&c.insertion_baseline, "--insertion-baseline")?,
        batch,
    };
    if curve.step == 0 {
        anyhow::bail!("--step 0; expected at least 1 pixel per step");
    }
    curve.check()?;
    Ok(curve)
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model size: base (ViT-B/16, 35.1 GFLOP per image) or tiny (ViT-Ti/16, for quick runs).
    #[arg(long, default_value = "base")]
    pub preset: String,
    /// A plain-block family at its base size, by timm name: deit3_base_patch16_224,
    /// vit_base_patch14_dinov2, vit_base_patch14_reg4_dinov2, vit_base_patch16_clip_224,
    /// vit_base_patch16_clip_quickgelu_224, vit_base_patch16_siglip_224,
    /// vit_base_patch16_224.mae (avg pooling), beit_base_patch16_224, eva02_base_patch14_224;
    /// or swin_tiny (swin_tiny_patch4_window7_224);
    /// overrides --preset.
    #[arg(long)]
    pub arch: Option<String>,
    /// Forward batch size to time; default 1, 8 and 32.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Timed runs per batch size (after one warm-up run); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Masks to score in the timed explanation: "all" (a full explanation) or the first K after
    /// clustering (quicker; the full time is then projected).
    #[arg(long, default_value = "all")]
    pub explain_masks: String,
    /// Images per perturbed forward pass in the timed explanation.
    #[arg(long, default_value_t = 32)]
    pub explain_batch: usize,
    /// Skip the timed explanation.
    #[arg(long)]
    pub no_explain: bool,
    /// Also time each linear layer alone (q/k/v, projection, MLP) at the model's shapes, the
    /// batch sizes and precisions timed, with its share of the f32 FMA peak (plain-block ViTs
    /// only).
    #[arg(long)]
    pub linears: bool,
    /// Which precisions to time: f32, bf16, int8, int16, both (f32 and bf16) or all (side by
    /// side, and their saliency maps compared with f32's).
    #[arg(long, default_value = "all")]
    pub precision: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// ViT-CX settings shared by `explain`, `eval` and `compare`; defaults as [`vitcx::VitCxParams`].
#[derive(Debug, Args)]
pub struct VitCxArgs {
    /// Block whose first LayerNorm gives the feature maps (and Grad-CAM's layer); negative
    /// counts from the end.
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub layer: i64,
    /// Read the feature maps (and Grad-CAM's tokens) at this tap instead, by name
    /// (`blocks.5`, `blocks.5.norm1`; `vitcx inspect --json` lists them).
    #[arg(long, conflicts_with = "layer")]
    pub tap: Option<String>,
    /// Clustering distance threshold in [0, 1].
    #[arg(long, default_value_t = 0.1, allow_negative_numbers = true)]
    pub threshold: f64,
    /// Standard deviation of the noise added outside each mask (normalised pixel units).
    #[arg(long, default_value_t = 0.1, allow_negative_numbers = true)]
    pub noise_std: f32,
    /// Seed of the noise generator (and of RISE's masks and the random control map).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Arithmetic of ViT-CX's perturbed passes: f32 (as the reference), bf16 (bf16 products,
    /// f32 sums in the linear layers; fast on CPUs with AVX512-BF16), int8 (weights per
    /// channel and tokens quantised to int8, exact sums; fast on CPUs with AVX512-VNNI) or
    /// int16 (12-bit weights, 14-bit tokens: half int8's speed, maps as f32's).
    #[arg(long, default_value = "f32", value_parser = parse_precision)]
    pub precision: vitcx::model::Precision,
}

fn parse_precision(s: &str) -> Result<vitcx::model::Precision, String> {
    vitcx::model::Precision::parse(s).map_err(|e| e.to_string())
}

impl VitCxArgs {
    /// The library's parameters (validated later against the model).
    pub fn params(&self) -> vitcx::VitCxParams {
        vitcx::VitCxParams {
            layer: self.layer,
            tap: self.tap.clone(),
            threshold: self.threshold,
            noise_std: self.noise_std,
            seed: self.seed,
            batch: self.batch,
            precision: self.precision,
        }
    }
}

/// `--resize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ResizeArg {
    /// The whole image stretched, bilinear, as the reference.
    Stretch,
    /// The checkpoint's own processor: shortest edge, centre crop, bicubic.
    Processor,
}

impl ResizeArg {
    /// The library's [`vitcx::image::Resize`] for a model's preprocessing.
    pub fn resize(self, pre: &vitcx::model::Preprocess) -> vitcx::image::Resize {
        match self {
            ResizeArg::Stretch => vitcx::image::Resize::Stretch,
            ResizeArg::Processor => vitcx::image::Resize::Processor {
                shortest_edge: pre.resize_shortest,
                crop: pre.crop,
            },
        }
    }
}

/// `--input-size`: `N` (square) or `HxW`, each at least 1.
fn parse_size(v: &str) -> std::result::Result<(usize, usize), String> {
    let parse = |t: &str| match t.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "'{v}' is not a size; expected N or HxW with positive integers"
        )),
    };
    match v.split_once(['x', 'X']) {
        Some((h, w)) => Ok((parse(h)?, parse(w)?)),
        None => parse(v).map(|n| (n, n)),
    }
}

/// `--object-size`: `LO-HI` (or one value), fractions of the image side; the library checks
/// the range ([`vitcx::eval::synth::Scene::validate`]).
fn parse_range(v: &str) -> std::result::Result<(f32, f32), String> {
    let parse = |t: &str| {
        t.trim()
            .parse::<f32>()
            .ok()
            .filter(|x| x.is_finite())
            .ok_or_else(|| format!("'{v}' is not a range; expected LO-HI, e.g. 0.35-0.45"))
    };
    match v.split_once('-') {
        Some((lo, hi)) => Ok((parse(lo)?, parse(hi)?)),
        None => parse(v).map(|x| (x, x)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    fn unread(argv: &[&str]) -> Vec<String> {
        let matches = Cli::command().try_get_matches_from(argv).unwrap();
        let cli = Cli::from_arg_matches(&matches).unwrap();
        unread_flags(&cli.command, matches.subcommand().unwrap().1)
    }

    #[test]
    fn flags_no_chosen_method_reads_are_named() {
        let lines = unread(&[
            "vitcx",
            "explain",
            "x.png",
            "--method",
            "rise",
            "--precision",
            "int8",
            "--masks",
            "9",
        ]);
        assert_eq!(
            lines,
            ["--precision is read by vitcx only; ignored for rise"]
        );
        let lines = unread(&[
            "vitcx",
            "eval",
            "--data",
            "d",
            "--methods",
            "rollout,center",
            "--layer",
            "2",
            "--rise-p1",
            "0.3",
        ]);
        assert_eq!(
            lines,
            [
                "--layer is read by vitcx and gradcam only; ignored for rollout, center",
                "--rise-p1 is read by rise only; ignored for rollout, center"
            ]
        );
    }

    #[test]
    fn flags_a_chosen_method_reads_or_left_at_their_defaults_pass_quietly() {
        for argv in [
            &[
                "vitcx",
                "explain",
                "x.png",
                "--precision",
                "int8",
                "--threshold",
                "0.2",
            ][..],
            &["vitcx", "explain", "x.png", "--method", "rise"],
            &[
                "vitcx",
                "compare",
                "x.png",
                "--methods",
                "gradcam,rise",
                "--layer",
                "1",
                "--masks",
                "5",
            ],
            &[
                "vitcx", "explain", "x.png", "--method", "nonsense", "--masks", "5",
            ],
            &["vitcx", "synth", "--out", "o"],
        ] {
            assert!(unread(argv).is_empty(), "{argv:?}");
        }
    }
}
