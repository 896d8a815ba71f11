//! `gram-export`: compile GRAM models for deployment.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use gram_core::PromptStyle;
use gram_core::export::HeadKind;
use gram_core::weights::StoreDtype;
use gram_export::package::{PackageOptions, package_adapter};
use gram_export::{ExportOptions, Result, export};

/// Compile a trained (or imported) model for deployment.
#[derive(Parser)]
#[command(name = "gram-export", version, about, after_help = gram_core::env_help!(
    "  ORT_DYLIB_PATH       the onnxruntime library --verify and the judge prefix use",
    "                       (default: the copy scripts/setup.sh puts in GRAM_CACHE)",
    "  GRAM_CACHE           that cache (default: ~/.cache/gram-rs)",
))]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum HeadArg {
    /// The logits of `A` and `B` at the last position (what gram-score needs).
    Judge,
    /// Logits of the whole vocabulary at every position (the generic LM export).
    Lm,
    /// A Bradley-Terry reward model's scalar (`gram-train bt` output) at the last position.
    Reward,
}

#[derive(Clone, Copy, ValueEnum)]
enum StyleArg {
    /// The judge prompt inside the model's chat template.
    Chat,
    /// The judge prompt as plain text.
    Raw,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    /// bfloat16: half the bytes; what adapters are shipped as.
    Bf16,
    /// As trained.
    F32,
}

#[derive(Subcommand)]
enum Cmd {
    /// A LoRA adapter packaged for release: PEFT's layout (adapter_config.json +
    /// adapter_model.safetensors) with the tensors as bf16, base_model_name_or_path set, and
    /// nothing else of the training run (optimiser state, merged weights).
    ///
    /// Examples:
    ///   gram-export adapter --model runs/gram/final --out exports/my-judge
    ///   gram-export adapter --model runs/gram/checkpoints/step-0000040 --out exports/my-judge \
    ///       --base-name SmolLM2-135M-Instruct.Q4_1.gguf
    ///   gram-export onnx --model exports/my-judge --base SmolLM2-135M-Instruct.Q4_1.gguf --out exports/judge
    #[command(verbatim_doc_comment)]
    Adapter {
        /// The adapter folder: a gram-train final/ or checkpoint, or one Python peft saved.
        #[arg(long)]
        model: PathBuf,
        /// Output folder (appears complete or not at all).
        #[arg(long, short)]
        out: PathBuf,
        /// How the tensors are stored.
        #[arg(long, value_enum, default_value = "bf16")]
        dtype: DtypeArg,
        /// Written as base_model_name_or_path (a hub id, or a path relative to the adapter
        /// folder or the working directory); default: the adapter's own.
        #[arg(long)]
        base_name: Option<String>,
        /// Replace OUT if it exists.
        #[arg(long)]
        overwrite: bool,
    },
    /// An ONNX graph (opset 23, dynamic batch and sequence, left padding) with the tokenizer files
    /// and gram-export.json beside it.
    ///
    /// Writes OUT/model.onnx (OUT/model.onnx.data too past 1 GiB of weights), OUT/tokenizer.json
    /// (+ config, chat template) and OUT/gram-export.json. Inputs: input_ids, attention_mask
    /// (int64 [batch, sequence]; the judge head's default pair graph also takes shared_ids,
    /// shared_mask, see --no-pair-sharing); output: judge_logits [batch, 2] or logits
    /// [batch, sequence, vocab].
    ///
    /// Examples:
    ///   gram-export onnx --model runs/s2/final --out exports/judge --verify
    ///   gram-export onnx --model SmolLM2-135M-Instruct.Q4_1.gguf --out exports/smollm2-lm --head lm
    ///   gram-export onnx --model exports/gram-smollm2-135m-lora --base SmolLM2-135M-Instruct.Q4_1.gguf --out exports/judge
    ///   gram-export onnx --model runs/bt/final --out exports/bt --head reward --verify
    #[command(verbatim_doc_comment)]
    Onnx {
        /// Checkpoint: an HF folder (config.json, safetensors, tokenizer), a GGUF file, or a LoRA
        /// adapter folder (PEFT layout: adapter_config.json + adapter_model.safetensors).
        #[arg(long)]
        model: PathBuf,
        /// Base model of an adapter folder (default: its base_model_name_or_path).
        #[arg(long)]
        base: Option<PathBuf>,
        /// Tokenizer to use instead of the checkpoint's (a folder with tokenizer.json, or a GGUF).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Output folder (appears complete or not at all).
        #[arg(long, short)]
        out: PathBuf,
        /// What the graph outputs.
        #[arg(long, value_enum, default_value = "judge")]
        head: HeadArg,
        /// Prompt style recorded for the scorer (default: chat when the tokenizer has a template).
        #[arg(long, value_enum)]
        style: Option<StyleArg>,
        /// Longest sequence the scorer may feed (default: the model's context length).
        #[arg(long)]
        max_tokens: Option<usize>,
        /// Run onnxruntime against burn on sample prompts; fail the export beyond --tolerance.
        #[arg(long)]
        verify: bool,
        /// Largest allowed absolute logit difference for --verify.
        #[arg(long, default_value_t = 1e-4)]
        tolerance: f32,
        /// Replace OUT if it exists.
        #[arg(long)]
        overwrite: bool,
        /// Put the weights in OUT/model.onnx.data when they pass this many bytes (protobuf
        /// messages are limited to 2 GiB).
        #[arg(long, default_value_t = gram_export::graph::INLINE_LIMIT)]
        external_data_over: usize,
        /// Judge head: do not precompute the judge template's prefix into the graph (inputs are
        /// then whole sequences).
        #[arg(long)]
        no_prefix_cache: bool,
        /// Judge head: one sequence per row (inputs input_ids, attention_mask) instead of the
        /// pair graph, which runs the tokens both orders of a pair share once (inputs
        /// shared_ids, shared_mask [pairs, shared] + input_ids, attention_mask [2 x pairs, rest]).
        #[arg(long)]
        no_pair_sharing: bool,
        /// Worker threads (default: RAYON_NUM_THREADS, else one per core).
        #[arg(long)]
        threads: Option<usize>,
    },
}

fn main() -> ExitCode {
    gram_core::cli::quiet_on_closed_pipe();
    let result = match gram_core::cli::parse::<Cli>().cmd {
        Cmd::Adapter {
            model,
            out,
            dtype,
            base_name,
            overwrite,
        } => package(PackageOptions {
            model,
            out,
            dtype: match dtype {
                DtypeArg::Bf16 => StoreDtype::Bf16,
                DtypeArg::F32 => StoreDtype::F32,
            },
            base_name,
            overwrite,
        }),
        Cmd::Onnx {
            model,
            base,
            tokenizer,
            out,
            head,
            style,
            max_tokens,
            verify,
            tolerance,
            overwrite,
            external_data_over,
            no_prefix_cache,
            no_pair_sharing,
            threads,
        } => {
            gram_core::cli::set_threads(threads);
            onnx(ExportOptions {
                model,
                base,
                tokenizer,
                out,
                head: match head {
                    HeadArg::Judge => HeadKind::Judge,
                    HeadArg::Lm => HeadKind::Lm,
                    HeadArg::Reward => HeadKind::Reward,
                },
                style: style.map(|s| match s {
                    StyleArg::Chat => PromptStyle::Chat,
                    StyleArg::Raw => PromptStyle::Raw,
                }),
                max_tokens,
                verify,
                tolerance,
                overwrite,
                external_data_over,
                prefix: !no_prefix_cache,
                pairs: !no_pair_sharing,
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => gram_core::cli::exit_with(&e, e.is_user_error()),
    }
}

fn package(opts: PackageOptions) -> Result<()> {
    let r = package_adapter(&opts)?;
    println!(
        "packaged {} adapted modules + {} whole tensors ({} parameters, {:.1} MB) to {} (base: {})",
        r.modules,
        r.saved,
        r.parameters,
        r.bytes as f64 / 1e6,
        opts.out.display(),
        r.base_model
            .as_deref()
            .unwrap_or("none named; pass --base when loading")
    );
    Ok(())
}

fn onnx(opts: ExportOptions) -> Result<()> {
    let r = export(&opts)?;
    let m = &r.manifest;
    println!(
        "exported {} ({} parameters, {} graph nodes, {} head) to {}",
        m.architecture,
        m.num_parameters,
        r.nodes,
        m.output,
        opts.out.display()
    );
    println!("files: {}", r.files.join(", "));
    if let Some(v) = &r.verify {
        println!(
            "verified: onnxruntime vs burn on {} prompts (lengths {:?}): max |diff| {:.2e} (largest logit {:.2})",
            v.rows, v.lengths, v.max_abs_diff, v.max_abs_logit
        );
    }
    Ok(())
}
