//! `gram-model`: look inside a checkpoint. `inspect` loads an HF folder or a GGUF, says what it
//! is (architecture, sizes, parameters, dtype, tokenizer, chat template, GRAM label tokens) and,
//! given `--text`, prints the most likely next tokens.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use clap::{Parser, Subcommand};
use gram_core::{Checkpoint, LabelIds, RopeScaling, chat::Message};
use gram_model::Backend;

const ENV_HELP: &str = gram_core::env_help!(
    "  CUBECL_WGPU_DEFAULT_DEVICE  the wgpu device --backend wgpu takes (Cpu: lavapipe)"
);

/// Inspect GRAM-rs checkpoints.
#[derive(Parser)]
#[command(name = "gram-model", version, about, long_about = None, after_help = ENV_HELP)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load a checkpoint, describe it, and optionally print the top next tokens for a text.
    ///
    /// Examples:
    ///   gram-model inspect ./Qwen3-0.6B
    ///   gram-model inspect --model ./Qwen3-0.6B
    ///   gram-model inspect SmolLM2-135M-Instruct.Q4_1.gguf --text "The capital of France is"
    ///   gram-model inspect ./model --chat --text "Say hi" --top 10
    #[command(verbatim_doc_comment)]
    Inspect {
        /// An HF model folder (config.json, *.safetensors, tokenizer.json) or a .gguf file.
        #[arg(required_unless_present = "model")]
        checkpoint: Option<PathBuf>,
        /// The same, as a flag (as the other tools take it).
        #[arg(long, conflicts_with = "checkpoint")]
        model: Option<PathBuf>,
        /// Text whose next token to predict (repeatable).
        #[arg(long)]
        text: Vec<String>,
        /// Wrap each text as a user turn in the model's chat template (generation prompt added).
        #[arg(long)]
        chat: bool,
        /// How many next tokens to list.
        #[arg(long, default_value_t = 5)]
        top: usize,
        /// Where to run the forward pass.
        #[arg(long, value_enum, default_value_t = Backend::Cpu)]
        backend: Backend,
        /// Worker threads on the CPU (default: RAYON_NUM_THREADS, else one per core).
        #[arg(long)]
        threads: Option<usize>,
    },
}

fn main() -> ExitCode {
    gram_core::cli::quiet_on_closed_pipe();
    let cli = gram_core::cli::parse::<Cli>();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let user = e.chain().any(|c| {
                c.downcast_ref::<gram_core::Error>()
                    .is_some_and(gram_core::Error::is_user_error)
                    || c.downcast_ref::<gram_model::Error>()
                        .is_some_and(|e| !matches!(e, gram_model::Error::Internal(_)))
            });
            gram_core::cli::exit_with(&format!("{e:#}"), user)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Inspect {
            checkpoint,
            model,
            text,
            chat,
            top,
            backend,
            threads,
        } => {
            gram_core::cli::set_threads(threads);
            let path = checkpoint
                .or(model)
                .context("give the checkpoint (or --model)")?;
            inspect(&path, &text, chat, top, backend)
        }
    }
}

fn inspect(
    path: &std::path::Path,
    texts: &[String],
    chat: bool,
    top: usize,
    backend: Backend,
) -> Result<()> {
    let ckpt = Checkpoint::open(path).with_context(|| format!("opening {}", path.display()))?;
    let c = &ckpt.config;
    println!("checkpoint      {} ({:?})", path.display(), ckpt.format);
    println!("architecture    {:?}", c.architecture);
    println!("layers          {}", c.num_hidden_layers);
    println!(
        "hidden          {}  (mlp {})",
        c.hidden_size, c.intermediate_size
    );
    println!(
        "heads           {} query / {} key-value, head_dim {}",
        c.num_attention_heads, c.num_key_value_heads, c.head_dim
    );
    println!("vocab           {}", c.vocab_size);
    let rope = match &c.rope_scaling {
        RopeScaling::Default => String::new(),
        other => format!(", scaling {other:?}"),
    };
    println!("rope            theta {}{rope}", c.rope_theta);
    println!("context         {}", c.max_position_embeddings);
    println!("tied head       {}", c.tie_word_embeddings);
    println!(
        "parameters      {} ({:.1} M)",
        c.num_parameters(),
        c.num_parameters() as f64 / 1e6
    );
    println!("stored dtype    {}", c.dtype);
    let tok = ckpt.tokenizer().context("loading the tokenizer")?;
    println!(
        "tokenizer       {} tokens, bos {:?}, eos {:?}, pad {:?}",
        tok.vocab_size(),
        tok.bos_token,
        tok.eos_token,
        tok.pad_token
    );
    match &tok.chat_template {
        Some(t) => println!("chat template   yes ({} chars)", t.source().len()),
        None => println!("chat template   none"),
    }
    match LabelIds::resolve(&tok) {
        Ok(l) => println!("GRAM labels     A = {}, B = {}", l.a, l.b),
        Err(e) => println!("GRAM labels     unusable: {e}"),
    }
    if texts.is_empty() {
        return Ok(());
    }
    let device = gram_model::device(backend)?;
    let model = gram_model::load(&ckpt, &device).context("loading the weights")?;
    for text in texts {
        let ids = if chat {
            let t = tok
                .chat_template
                .as_ref()
                .context("--chat: this tokenizer has no chat template")?;
            tok.encode(&t.render(&[Message::user(text)], true)?, false)?
        } else {
            tok.encode(text, true)?
        };
        anyhow::ensure!(!ids.is_empty(), "text {text:?} has no tokens");
        let n = ids.len();
        let ids_t = Tensor::<2, Int>::from_data(
            TensorData::new(
                ids.iter().map(|&x| i64::from(x)).collect::<Vec<_>>(),
                [1, n],
            ),
            &device,
        );
        let mask = Tensor::<2, Int>::ones([1, n], &device);
        let logits = model
            .forward(ids_t, mask)
            .slice([0..1, n - 1..n, 0..c.vocab_size])
            .reshape([c.vocab_size]);
        let probs: Vec<f32> = softmax(logits, 0)
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        println!("\ntext            {text:?} ({n} tokens)");
        for &i in order.iter().take(top) {
            let piece = tok.decode(&[i as u32]).unwrap_or_default();
            println!("  {:>8}  {:>7.4}  {:?}", i, probs[i], piece);
        }
    }
    Ok(())
}
