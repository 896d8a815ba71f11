//! `gram-train`: train GRAM's stages and the Bradley-Terry baseline.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use gram_model::Backend;
use gram_train::{RunOptions, Settings, Stage};

/// Train GRAM reward models (stage 1, stage 2) and a Bradley-Terry baseline with burn.
#[derive(Parser)]
#[command(name = "gram-train", version, about, after_help = gram_core::env_help!(
    "  CUBECL_WGPU_DEFAULT_DEVICE  the wgpu device --backend wgpu takes (Cpu: lavapipe)"
))]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Stage 1: learn to generate the response pair of a prompt (prompt masked), from DATA/stage1.
    ///
    /// Examples:
    ///   gram-train pretrain --model ./SmolLM2 --data data/all --out runs/s1 --lr 1e-5
    ///   gram-train pretrain --config runs/s1.toml --backend wgpu
    #[command(verbatim_doc_comment)]
    Pretrain(TrainArgs),
    /// Stage 2: label-smoothed A/B fine-tuning on judge prompts, from DATA/stage2.
    ///
    /// Writes RUN/settings.toml, RUN/metrics.jsonl, RUN/checkpoints/step-N (HF folder +
    /// optimizer.bpk + trainer_state.json), RUN/final (HF folder), RUN/curves.png, RUN/summary.json.
    /// With --lora-rank, RUN/final and each checkpoint hold the adapter (PEFT layout:
    /// adapter_config.json + adapter_model.safetensors) and the merged model in merged/.
    ///
    /// Examples:
    ///   gram-train finetune --model runs/s1/final --data data/all --out runs/s2 --epochs 2
    ///   gram-train finetune --model model.gguf --data data/all --out runs/s2 --backend wgpu
    ///   gram-train finetune --model model.gguf --data data/all --out runs/s2 --lora-rank 16 --lr 2e-4
    ///   gram-train finetune --model model.gguf --adapter runs/s1/final --data data/all --out runs/s2
    ///   gram-train finetune --model model.gguf --data data/all --out runs/s2 --train-layers 8
    ///   gram-train finetune --out runs/s2 --resume          # after a crash or kill
    #[command(verbatim_doc_comment)]
    Finetune(TrainArgs),
    /// Baseline: a scalar head on the last token trained with the Bradley-Terry loss (DATA/stage2).
    ///
    /// Examples:
    ///   gram-train bt --model ./SmolLM2 --data data/all --out runs/bt
    #[command(verbatim_doc_comment)]
    Bt(TrainArgs),
    /// Time training steps of a model config on random tokens (prints JSON); see benches/.
    ///
    /// Examples:
    ///   gram-train bench --model-config benches/train/llama-40m.json --seq-len 256 --batch-size 8
    ///   gram-train bench --model-config benches/train/smollm2-135m.json --batch-size 4 --seq-len 512 --lora-rank 16
    #[command(verbatim_doc_comment)]
    Bench {
        /// An HF config.json.
        #[arg(long)]
        model_config: PathBuf,
        /// Objective whose step is timed.
        #[arg(long, value_enum, default_value = "finetune")]
        stage: Stage,
        /// Rows per step.
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Tokens per row.
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        /// Timed steps.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Untimed steps first.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Device.
        #[arg(long, value_enum, default_value = "cpu")]
        backend: Backend,
        /// LoRA rank on all seven projections (0: full fine-tuning).
        #[arg(long, default_value_t = 0)]
        lora_rank: usize,
        /// Train only the top N layers.
        #[arg(long)]
        train_layers: Option<usize>,
        /// Activation checkpointing.
        #[arg(long)]
        recompute: bool,
    },
    /// Write a randomly initialised model (HF folder) of a config.json with a given tokenizer.
    ///
    /// Example:
    ///   gram-train init --model-config tiny.json --tokenizer ./SmolLM2 --out models/tiny
    #[command(verbatim_doc_comment)]
    Init {
        /// An HF config.json (llama, qwen2 or qwen3).
        #[arg(long)]
        model_config: PathBuf,
        /// Tokenizer: a model folder with tokenizer.json, or a .gguf.
        #[arg(long)]
        tokenizer: PathBuf,
        /// Output folder (must not exist or be empty).
        #[arg(long, short)]
        out: PathBuf,
        /// Seed of the initialisation.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

/// Flags of a training run; each overrides the TOML file given with --config, which overrides
/// the defaults.
#[derive(Args)]
struct TrainArgs {
    /// Starting checkpoint: HF folder, .gguf, or an earlier run's final/.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Dataset: a `gram-data build` output folder.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Run folder.
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Settings file (TOML; keys as these flags with underscores). Flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Device: cpu or wgpu (Vulkan, Metal, DX12). [default: cpu]
    #[arg(long, value_enum)]
    backend: Option<Backend>,
    /// Peak learning rate. [default: 2e-5]
    #[arg(long)]
    lr: Option<f64>,
    /// Share of steps for linear warm-up. [default: 0.1]
    #[arg(long)]
    warmup: Option<f64>,
    /// Passes over the train split. [default: 1]
    #[arg(long)]
    epochs: Option<usize>,
    /// Stop after this many optimiser steps (overrides --epochs).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Rows per micro-batch (pairs for bt). [default: 8]
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per optimiser step. [default: 1]
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Global gradient-norm clip, 0 for none. [default: 1.0]
    #[arg(long)]
    clip: Option<f64>,
    /// AdamW weight decay. [default: 0]
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Stage-2 label smoothing eps. [default: 0.1]
    #[arg(long)]
    label_smoothing: Option<f64>,
    /// Seed (data order, new heads). [default: 0]
    #[arg(long)]
    seed: Option<u64>,
    /// Length bucketing window in batches (1: none). [default: 32]
    #[arg(long)]
    bucket_window: Option<usize>,
    /// Pad batches to a multiple of N tokens (fewer shapes for wgpu to compile kernels for).
    /// [default: 64 on wgpu, 1 on cpu]
    #[arg(long)]
    pad_multiple: Option<usize>,
    /// Validate every N steps (0: at the end only). [default: 0]
    #[arg(long)]
    eval_every: Option<usize>,
    /// At most N validation rows (0: all). [default: 2000]
    #[arg(long)]
    max_valid: Option<usize>,
    /// Train on N pairs of the train split, the same N for every stage and seed (0: all). [default: 0]
    #[arg(long)]
    max_train_pairs: Option<usize>,
    /// Checkpoint every N steps (0: at the end only). [default: 0]
    #[arg(long)]
    save_every: Option<usize>,
    /// Checkpoints kept. [default: 2]
    #[arg(long)]
    keep: Option<usize>,
    /// Log every N steps. [default: 10]
    #[arg(long)]
    log_every: Option<usize>,
    /// bt: longest prompt + response in tokens (longer texts are cut, head and tail kept). [default: 2048]
    #[arg(long)]
    bt_max_tokens: Option<usize>,
    /// Train a LoRA adapter of this rank (base frozen); 0: train every parameter. [default: 0]
    #[arg(long)]
    lora_rank: Option<usize>,
    /// LoRA scaling numerator (update = alpha / rank * B·A). [default: 2 x rank]
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// Projections that get adapters, comma-separated. [default: q,k,v,o,gate,up,down]
    #[arg(long, value_delimiter = ',')]
    lora_targets: Option<Vec<String>>,
    /// Dropout on the adapters' input. [default: 0]
    #[arg(long)]
    lora_dropout: Option<f64>,
    /// Continue this LoRA adapter (PEFT folder: ours or Python peft's) over --model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Train only the top N decoder layers (+ final norm); with --lora-rank, adapters only there.
    #[arg(long)]
    train_layers: Option<usize>,
    /// Activation checkpointing: keep layer inputs, recompute the rest in the backward pass.
    #[arg(long)]
    recompute: bool,
    /// How final/ stores its weights: auto (as the starting checkpoint: bf16 stays bf16), f32,
    /// bf16. Checkpoints are f32.
    #[arg(long, value_enum)]
    save_dtype: Option<gram_train::settings::SaveDtype>,
    /// Continue the run in --out from its latest checkpoint, with its saved settings.
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Replace an existing run folder.
    #[arg(long)]
    overwrite: bool,
    /// No progress bar (log lines instead).
    #[arg(long, short)]
    quiet: bool,
    /// Worker threads of the CPU backend and the data loader (default: RAYON_NUM_THREADS, else
    /// one per core).
    #[arg(long)]
    threads: Option<usize>,
}

macro_rules! set {
    ($s:ident, $a:ident, $($f:ident),*) => { $( if let Some(v) = $a.$f { $s.$f = v; } )* };
}

impl TrainArgs {
    fn settings(self, stage: Stage) -> anyhow::Result<(Settings, RunOptions)> {
        let mut s = match &self.config {
            Some(p) => Settings::from_toml_file(p)?,
            None => Settings::default(),
        };
        s.stage = stage;
        set!(
            s,
            self,
            model,
            data,
            out,
            backend,
            lr,
            warmup,
            epochs,
            batch_size,
            grad_accum,
            clip,
            weight_decay,
            label_smoothing,
            seed,
            bucket_window,
            eval_every,
            max_valid,
            max_train_pairs,
            save_every,
            keep,
            log_every,
            bt_max_tokens,
            lora_rank,
            lora_targets,
            lora_dropout,
            save_dtype
        );
        for (field, value) in [
            (&mut s.max_steps, self.max_steps),
            (&mut s.train_layers, self.train_layers),
            (&mut s.pad_multiple, self.pad_multiple),
        ] {
            if value.is_some() {
                *field = value;
            }
        }
        if self.lora_alpha.is_some() {
            s.lora_alpha = self.lora_alpha;
        }
        if self.adapter.is_some() {
            s.adapter = self.adapter;
        }
        s.recompute |= self.recompute;
        let opts = RunOptions {
            resume: self.resume,
            overwrite: self.overwrite,
            progress: !self.quiet,
        };
        Ok((s, opts))
    }
}

/// Keeps freed memory in the process (glibc): a training step allocates and frees the same
/// activation and gradient buffers every step, and with glibc's defaults the larger ones went
/// back to the kernel at each free (mmap'd above its threshold, or trimmed off the heap top), so
/// every step page-faulted and zeroed them afresh. On the 40M bench (8 x 256), 4 alternating runs
/// each way: step 2.59-3.03 s without, 2.33-2.69 s with (about 10%). The price is that the
/// process keeps its peak heap until it exits.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    #[allow(unsafe_code)]
    // SAFETY: mallopt only changes two tuning parameters of glibc's allocator, called before
    // any other thread exists; it has no memory-safety preconditions.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn main() -> ExitCode {
    gram_core::cli::quiet_on_closed_pipe();
    keep_freed_memory();
    let cli = gram_core::cli::parse::<Cli>();
    let res: Result<(), gram_train::Error> = (|| {
        let (stage, args) = match cli.cmd {
            Cmd::Pretrain(a) => (Stage::Pretrain, a),
            Cmd::Finetune(a) => (Stage::Finetune, a),
            Cmd::Bt(a) => (Stage::Bt, a),
            Cmd::Bench {
                model_config,
                stage,
                batch_size,
                seq_len,
                steps,
                warmup,
                backend,
                lora_rank,
                train_layers,
                recompute,
            } => {
                let r = gram_train::bench::bench(&gram_train::bench::BenchSpec {
                    config: model_config,
                    stage,
                    batch_size,
                    seq_len,
                    steps,
                    warmup,
                    backend,
                    lora_rank,
                    train_layers,
                    recompute,
                })?;
                println!(
                    "{}",
                    serde_json::to_string(&r)
                        .map_err(|e| gram_train::Error::Internal(e.to_string()))?
                );
                return Ok(());
            }
            Cmd::Init {
                model_config,
                tokenizer,
                out,
                seed,
            } => {
                let out = gram_train::init::init_model(&model_config, &tokenizer, &out, seed)?;
                println!("wrote {}", out.display());
                return Ok(());
            }
        };
        gram_core::cli::set_threads(args.threads);
        let (settings, opts) = args
            .settings(stage)
            .map_err(|e| gram_train::Error::Input(format!("{e:#}")))?;
        let summary = gram_train::run(settings, &opts)?;
        println!("model:   {}", summary.final_model.display());
        println!("metrics: {}", summary.out.join("metrics.jsonl").display());
        println!("curves:  {}", summary.out.join("curves.png").display());
        if let Some(v) = &summary.valid {
            match v.acc {
                Some(a) => println!(
                    "valid:   loss {:.4}, pairwise accuracy {:.2}% on {} pairs",
                    v.loss,
                    100.0 * a,
                    v.n
                ),
                None => println!("valid:   loss {:.4} on {} rows", v.loss, v.n),
            }
        }
        println!("speed:   {:.0} tokens/s", summary.tokens_per_s);
        Ok(())
    })();
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => gram_core::cli::exit_with(&e, e.is_user_error()),
    }
}
