//! The training loop shared by the three objectives: batches in a seeded order, AdamW with a
//! warm-up + cosine schedule, gradient accumulation and global-norm clipping, validation,
//! metrics (JSONL + PNG), checkpoints, and exact resumption.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use gram_core::adapter::Task;
use gram_core::weights::StoreDtype;
use gram_core::{Adapter, Checkpoint, GramTokenizer, LabelIds, ModelConfig, Templates, Weights};
use gram_model::model::Decoder;
use gram_model::reward::{SCORE_WEIGHT, new_head, reward_config_json};
use gram_model::{CausalLm, ParamIds, RewardModel, from_weights_with_ids, hf_tensors, lora};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use crate::checkpoint::{self, ModelCard, SaveModel, TrainState};
use crate::data::{self, Example, Split};
use crate::error::{Error, Result};
use crate::objective::{BatchStats, Ctx, Eval, Objective};
use crate::settings::{Settings, Stage, lr_at};
use crate::tuning::Tuning;

/// How a run is started.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue the run in `settings.out` from its latest checkpoint.
    pub resume: bool,
    /// Replace an existing run folder.
    pub overwrite: bool,
    /// Draw a progress bar (else log lines).
    pub progress: bool,
}

/// What a finished run reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    /// Run folder.
    pub out: PathBuf,
    /// The trained model (HF folder).
    pub final_model: PathBuf,
    /// Steps trained.
    pub steps: usize,
    /// Last training loss (mean of the last logging window).
    pub train_loss: f64,
    /// First training loss (first logging window).
    pub first_train_loss: f64,
    /// Final validation.
    pub valid: Option<Eval>,
    /// Training tokens per second (this process).
    pub tokens_per_s: f64,
}

/// Everything loaded and checked before the first step.
struct Prepared {
    settings: Settings,
    config: ModelConfig,
    tokenizer: GramTokenizer,
    labels: LabelIds,
    train: Vec<Example>,
    valid: Vec<Example>,
    weights: Weights,
    /// How the starting checkpoint stored its tensors (e.g. `bf16`, `f32+f16`, `Q4_1`).
    base_dtype: String,
    origin: String,
    tuning: Tuning,
    resume: Option<(PathBuf, TrainState)>,
    progress: bool,
}

/// Runs (or resumes) a training run to its end.
pub fn run(settings: Settings, opts: &RunOptions) -> Result<Summary> {
    let mut p = prepare(settings, opts)?;
    // The weights move into the model; Prepared keeps an empty set.
    let weights = std::mem::take(&mut p.weights);
    let base = gram_model::device(p.settings.backend)?;
    let device = base.clone().autodiff();
    device.seed(p.settings.seed);
    let ids = p.resume.as_ref().map(|(_, s)| s.param_ids.clone());
    let layers = p.config.num_hidden_layers;
    match p.settings.stage {
        Stage::Pretrain | Stage::Finetune => {
            let mut model =
                from_weights_with_ids(&p.config, weights, ids.as_ref(), &p.origin, &device)?;
            attach_adapter(&mut model.model, &p, ids.as_ref(), &device)?;
            let model = p.tuning.trainable.apply(model, layers)?;
            train_loop(model, p, &device, &base)
        }
        Stage::Bt => {
            let mut weights = weights;
            if let Some((_, a)) = &p.tuning.adapter {
                weights.tensors.extend(a.saved.clone());
            }
            let seed = p.settings.seed;
            weights
                .tensors
                .entry(SCORE_WEIGHT.to_string())
                .or_insert_with(|| new_head(p.config.hidden_size, seed));
            let mut model =
                RewardModel::from_weights(&p.config, weights, ids.as_ref(), &p.origin, &device)?;
            attach_adapter(&mut model.model, &p, ids.as_ref(), &device)?;
            let model = p.tuning.trainable.apply(model, layers)?;
            train_loop(model, p, &device, &base)
        }
    }
}

/// Attaches the run's LoRA adapters (new, or the one it continues) to the decoder.
fn attach_adapter(
    decoder: &mut Decoder,
    p: &Prepared,
    ids: Option<&ParamIds>,
    device: &Device,
) -> Result<()> {
    let Some(cfg) = &p.tuning.lora else {
        return Ok(());
    };
    let (init, origin) = match &p.tuning.adapter {
        Some((dir, a)) => (lora::Init::From(a), dir.display().to_string()),
        None => (lora::Init::Fresh(p.settings.seed), p.origin.clone()),
    };
    lora::attach(decoder, cfg, init, ids, &origin, device)?;
    Ok(())
}

fn prepare(mut settings: Settings, opts: &RunOptions) -> Result<Prepared> {
    let out = settings.out.clone();
    let resume = if opts.resume {
        let saved = out.join("settings.toml");
        if !saved.exists() {
            return Err(Error::Input(format!(
                "{}: nothing to resume (no settings.toml)",
                out.display()
            )));
        }
        let s = Settings::from_toml_file(&saved)?;
        settings = Settings {
            out: out.clone(),
            ..s
        };
        Some(checkpoint::latest(&out)?)
    } else {
        None
    };
    settings.validate()?;

    // The model to start from: the base, or the checkpoint being resumed (whose adapter, in a
    // LoRA run, goes over the base).
    let lora_run = settings.lora_rank > 0 || settings.adapter.is_some();
    if lora_run && Adapter::is_adapter_dir(&settings.model) {
        return Err(Error::Input(format!(
            "{}: is an adapter; start a new adapter from its merged/ folder, or continue it with --adapter",
            settings.model.display()
        )));
    }
    let (start, adapter_dir) = match &resume {
        Some((dir, _)) if lora_run => (settings.model.clone(), Some(dir.clone())),
        Some((dir, _)) => (dir.clone(), None),
        None => (settings.model.clone(), settings.adapter.clone()),
    };
    let ckpt = Checkpoint::open(&start)?;
    let config = ckpt.config.clone();
    let tuning = Tuning::resolve(&settings, &config, adapter_dir.as_deref())?;
    let tokenizer = ckpt.tokenizer()?;
    let labels = LabelIds::resolve(&tokenizer)?;

    // Data, checked against the model before any compute.
    let train_split = data::read_split(&settings.data, settings.stage, "train")?;
    check_meta(&train_split, &tokenizer, &labels, &settings.data)?;
    let valid_split = data::read_split(&settings.data, settings.stage, "valid")?;
    if !valid_split.files.is_empty() {
        check_meta(&valid_split, &tokenizer, &labels, &settings.data)?;
    }
    let (train, valid) = if settings.stage == Stage::Bt {
        let max = settings.bt_max_tokens.min(config.max_position_embeddings);
        let enc = gram_core::fit::Tokenizer::new(&tokenizer, Templates::auto(&tokenizer), max)?;
        let (t, _) = data::bt_pairs(&settings.data, "train", &enc)?;
        let (v, _) = if valid_split.files.is_empty() {
            (Vec::new(), 0)
        } else {
            data::bt_pairs(&settings.data, "valid", &enc)?
        };
        (t, v)
    } else {
        (train_split.examples, valid_split.examples)
    };
    let train = data::subset_pairs(train, settings.max_train_pairs);
    if train.is_empty() {
        return Err(Error::data(
            settings.data.join(settings.stage.dataset_dir()),
            "the train split is empty",
        ));
    }
    let ctx_len = config.max_position_embeddings;
    for (split, rows) in [("train", &train), ("valid", &valid)] {
        if let Some(r) = rows.iter().find(|r| r.len() > ctx_len) {
            return Err(Error::data(
                &settings.data,
                format!(
                    "{split} pair {} has {} tokens, more than the model's context ({ctx_len}); rebuild the data with --max-tokens {ctx_len}",
                    r.pair_id,
                    r.len()
                ),
            ));
        }
    }
    let valid = data::subset_rows(valid, settings.max_valid);

    // The run folder.
    if !opts.resume {
        if out.exists()
            && std::fs::read_dir(&out)
                .map(|mut d| d.next().is_some())
                .unwrap_or(true)
        {
            if !opts.overwrite {
                return Err(Error::Input(format!(
                    "{}: run folder exists; pass --resume to continue it or --overwrite to replace it",
                    out.display()
                )));
            }
            std::fs::remove_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        }
        std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        gram_core::atomic_write(&out.join("settings.toml"), settings.to_toml()?.as_bytes())?;
    }
    let weights = ckpt.weights()?;
    Ok(Prepared {
        base_dtype: weights.stored_dtype.clone(),
        origin: start.display().to_string(),
        settings,
        config,
        tokenizer,
        labels,
        train,
        valid,
        weights,
        tuning,
        resume,
        progress: opts.progress,
    })
}

fn check_meta(split: &Split, tok: &GramTokenizer, labels: &LabelIds, data: &Path) -> Result<()> {
    let file = split
        .files
        .first()
        .map_or_else(|| data.to_path_buf(), Clone::clone);
    match &split.meta.tokenizer {
        None => {
            return Err(Error::data(
                &file,
                "the dataset records no tokenizer (built without --model?)",
            ));
        }
        Some(f) if *f != tok.fingerprint() => {
            return Err(Error::data(
                &file,
                format!(
                    "tokenised with another tokenizer (fingerprint {f}) than the model's ({}, {}); rebuild the data with --model <this model>",
                    tok.fingerprint(),
                    tok.source.display()
                ),
            ));
        }
        Some(_) => {}
    }
    if let Some(l) = split.meta.label_ids
        && l != *labels
    {
        return Err(Error::data(
            &file,
            format!("label ids {l:?} differ from the model's {labels:?}"),
        ));
    }
    Ok(())
}

/// What the loop needs to save a model of either kind.
trait Saveable: Objective {
    /// What an adapter of this model says its base is.
    const TASK: Task;
    fn config_json(config: &ModelConfig, tok: &GramTokenizer) -> serde_json::Value;
    fn decoder(&self) -> &Decoder;
}

impl Saveable for CausalLm {
    const TASK: Task = Task::CausalLm;
    fn config_json(config: &ModelConfig, _tok: &GramTokenizer) -> serde_json::Value {
        config.to_hf_json()
    }
    fn decoder(&self) -> &Decoder {
        &self.model
    }
}

impl Saveable for RewardModel {
    const TASK: Task = Task::SeqCls;
    fn config_json(config: &ModelConfig, tok: &GramTokenizer) -> serde_json::Value {
        reward_config_json(config, tok.pad_id())
    }
    fn decoder(&self) -> &Decoder {
        &self.model
    }
}

/// Sums squares of every gradient of a module.
struct SquaredNorm<'a> {
    grads: &'a GradientsParams,
    parts: Vec<Tensor<1>>,
}

impl ModuleVisitor for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            self.parts.push(g.powi_scalar(2).sum());
        }
    }
}

/// Scales every gradient of a module.
struct Scale<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl ModuleVisitor for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.remove::<D>(param.id) {
            self.grads
                .register::<D>(param.id, g.mul_scalar(self.factor));
        }
    }
}

/// Clips the global L2 norm of all gradients to `max_norm` (as torch's `clip_grad_norm_`);
/// returns the norm before clipping.
fn clip_global<M: Module>(model: &M, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    let mut v = SquaredNorm {
        grads,
        parts: Vec::new(),
    };
    model.visit(&mut v);
    if v.parts.is_empty() {
        return 0.0;
    }
    let norm = f64::from(Tensor::cat(v.parts, 0).sum().into_scalar::<f32>()).sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let mut s = Scale {
            grads,
            factor: max_norm / (norm + 1e-6),
        };
        model.visit(&mut s);
    }
    norm
}

/// Metrics file: one JSON object per line; on resume, lines past the checkpoint are dropped.
struct Metrics {
    file: std::fs::File,
    path: PathBuf,
}

impl Metrics {
    fn open(run: &Path, resume_step: Option<usize>) -> Result<Self> {
        let path = run.join("metrics.jsonl");
        if let Some(step) = resume_step
            && path.exists()
        {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            let kept: String = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64))
                        .is_some_and(|s| s as usize <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            gram_core::atomic_write(&path, kept.as_bytes())?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(Self { file, path })
    }

    fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}").map_err(|e| Error::io(&self.path, e))
    }
}

fn eval_json(step: usize, e: &Eval) -> serde_json::Value {
    json!({"step": step, "split": "valid", "loss": e.loss, "acc": e.acc, "row_acc": e.row_acc, "n": e.n, "by_source": e.by_source})
}

fn describe(e: &Eval) -> String {
    match e.acc {
        Some(a) => format!(
            "valid loss {:.4} acc {:.1}% ({} pairs)",
            e.loss,
            100.0 * a,
            e.n
        ),
        None => format!("valid loss {:.4} ({} rows)", e.loss, e.n),
    }
}

/// The statistics a run keeps while it trains: the window of batches since the last log line,
/// the first and last logged mean losses, and the tokens this process trained on.
#[derive(Debug)]
struct Running {
    loss: f64,
    correct: usize,
    rows: usize,
    batches: usize,
    tokens: usize,
    since: Instant,
    first_loss: f64,
    last_loss: f64,
    process_tokens: u64,
}

/// What one log line reports: the window's means.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Logged {
    loss: f64,
    acc: Option<f64>,
    tokens_per_s: f64,
}

impl Running {
    fn new() -> Self {
        Self {
            loss: 0.0,
            correct: 0,
            rows: 0,
            batches: 0,
            tokens: 0,
            since: Instant::now(),
            first_loss: f64::NAN,
            last_loss: f64::NAN,
            process_tokens: 0,
        }
    }

    /// One batch: its loss, rows judged correctly, and sizes.
    fn add(&mut self, loss: f64, correct: usize, stats: &BatchStats) {
        self.loss += loss;
        self.correct += correct;
        self.rows += stats.rows;
        self.batches += 1;
        self.tokens += stats.tokens;
        self.process_tokens += stats.tokens as u64;
    }

    /// The window's means (`acc` when the objective has one), or none for an empty window; the
    /// window then starts anew, and the mean loss becomes the last (and maybe first) loss.
    fn take(&mut self, with_acc: bool) -> Option<Logged> {
        if self.batches == 0 {
            return None;
        }
        let secs = self.since.elapsed().as_secs_f64().max(1e-9);
        let logged = Logged {
            loss: self.loss / self.batches as f64,
            acc: with_acc.then(|| self.correct as f64 / self.rows.max(1) as f64),
            tokens_per_s: self.tokens as f64 / secs,
        };
        if self.first_loss.is_nan() {
            self.first_loss = logged.loss;
        }
        self.last_loss = logged.loss;
        (
            self.loss,
            self.correct,
            self.rows,
            self.batches,
            self.tokens,
        ) = (0.0, 0, 0, 0, 0);
        self.since = Instant::now();
        Some(logged)
    }
}

/// The batches of the current epoch in their seeded order; a new epoch's order is drawn when
/// one runs out.
struct Batches {
    lengths: Vec<usize>,
    batch_size: usize,
    window: usize,
    seed: u64,
    order: Vec<Vec<usize>>,
}

impl Batches {
    fn new(train: &[Example], s: &Settings, epoch: usize) -> Self {
        let lengths: Vec<usize> = train.iter().map(Example::len).collect();
        let order = data::epoch_batches(&lengths, s.batch_size, s.bucket_window, s.seed, epoch);
        Self {
            lengths,
            batch_size: s.batch_size,
            window: s.bucket_window,
            seed: s.seed,
            order,
        }
    }

    /// The rows of the next batch, moving `state` past it.
    fn next<'e>(&mut self, state: &mut TrainState, train: &'e [Example]) -> Vec<&'e Example> {
        if state.batch_in_epoch >= self.order.len() {
            state.epoch += 1;
            state.batch_in_epoch = 0;
            self.order = data::epoch_batches(
                &self.lengths,
                self.batch_size,
                self.window,
                self.seed,
                state.epoch,
            );
        }
        let rows = self.order[state.batch_in_epoch]
            .iter()
            .map(|&i| &train[i])
            .collect();
        state.batch_in_epoch += 1;
        rows
    }
}

/// A run between its first and last step: the optimiser, where the run stands, and what it
/// writes as it goes.
struct Trainer<'a> {
    p: &'a Prepared,
    ctx: Ctx,
    device: &'a Device,
    eval_device: &'a Device,
    total: usize,
    warmup_steps: usize,
    optim: ModuleOptimizer,
    state: TrainState,
    batches: Batches,
    running: Running,
    metrics: Metrics,
    bar: ProgressBar,
    last_eval: Option<Eval>,
    started: Instant,
    elapsed0: f64,
}

impl<'a> Trainer<'a> {
    /// The optimiser and the state of a new run, or those of the checkpoint it resumes.
    fn new(p: &'a Prepared, device: &'a Device, eval_device: &'a Device) -> Result<Self> {
        let s = &p.settings;
        let steps_per_epoch = p.train.len().div_ceil(s.batch_size).div_ceil(s.grad_accum);
        let total = s.max_steps.unwrap_or(s.epochs * steps_per_epoch);
        let mut optim: ModuleOptimizer = crate::optim::adamw(
            (s.betas.0 as f32, s.betas.1 as f32),
            s.adam_eps as f32,
            s.weight_decay as f32,
        );
        let mut state = TrainState {
            stage: s.stage,
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            total_steps: total,
            tokens: 0,
            elapsed_s: 0.0,
            param_ids: ParamIds::new(),
        };
        if let Some((dir, saved)) = &p.resume {
            let opt_path = dir.join("optimizer.bpk");
            optim = optim
                .load(&opt_path)
                .map_err(|e| Error::data(&opt_path, format!("optimizer state: {e}")))?;
            state = saved.clone();
            if state.total_steps != total {
                return Err(Error::Input(format!(
                    "{}: the run was planned for {} steps, the data and settings now give {total}; did the dataset change?",
                    dir.display(),
                    state.total_steps
                )));
            }
        }
        let metrics = Metrics::open(&s.out, p.resume.as_ref().map(|(_, st)| st.step))?;
        Ok(Self {
            ctx: Ctx {
                stage: s.stage,
                pad: p.tokenizer.pad_id(),
                pad_multiple: s.pad_multiple(),
                labels: p.labels,
                eps: s.label_smoothing,
            },
            device,
            eval_device,
            total,
            warmup_steps: (s.warmup * total as f64).ceil() as usize,
            optim,
            batches: Batches::new(&p.train, s, state.epoch),
            elapsed0: state.elapsed_s,
            state,
            running: Running::new(),
            metrics,
            bar: progress_bar(p, total)?,
            last_eval: None,
            started: Instant::now(),
            p,
        })
    }

    /// One line on what the run will do (or where it resumes).
    fn announce(&self) {
        let (s, p, total) = (&self.p.settings, self.p, self.total);
        self.bar.set_position(self.state.step as u64);
        if self.state.step > 0 {
            eprintln!(
                "gram-train {}: resuming {} at step {}/{total}",
                s.stage.name(),
                s.out.display(),
                self.state.step,
            );
            return;
        }
        let unit = if s.stage == Stage::Bt {
            "pairs"
        } else {
            "rows"
        };
        eprintln!(
            "gram-train {}: {} train {} / valid {} ({unit}), {total} steps of {} x {} rows, lr {} on {:?}, {}",
            s.stage.name(),
            p.origin,
            p.train.len(),
            p.valid.len(),
            s.grad_accum,
            s.batch_size,
            s.lr,
            s.backend,
            p.tuning.describe(p.config.num_hidden_layers)
        );
    }

    /// One optimiser step over `grad_accum` batches; returns the updated model, the learning
    /// rate and the gradient norm before clipping.
    fn step<M: Saveable>(&mut self, model: M) -> Result<(M, f64, f64)> {
        let p = self.p;
        let s = &p.settings;
        let lr = lr_at(self.state.step, self.total, self.warmup_steps, s.lr);
        // Dropout draws from the device's generator: seeded per step, a resumed run draws what
        // the uninterrupted one did.
        self.device
            .seed(s.seed ^ (self.state.step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut acc = GradientsAccumulator::<M>::new();
        for _ in 0..s.grad_accum {
            let rows = self.batches.next(&mut self.state, &p.train);
            let ((loss, correct, stats), tape) = gram_model::recompute::record(s.recompute, || {
                model.batch_loss(&rows, &self.ctx, self.device)
            });
            let loss_v = f64::from(loss.clone().into_scalar::<f32>());
            if !loss_v.is_finite() {
                self.bar.abandon();
                return Err(Error::Input(format!(
                    "loss is {loss_v} at step {} (lr {lr:e}); lower --lr or check the data",
                    self.state.step
                )));
            }
            let correct = if s.stage == Stage::Pretrain {
                0
            } else {
                correct.into_scalar::<f32>() as usize
            };
            let grads = tape.backward(loss.div_scalar(s.grad_accum as f64), &model);
            acc.accumulate(&model, grads);
            self.running.add(loss_v, correct, &stats);
            self.state.tokens += stats.tokens as u64;
        }
        let mut grads = acc.grads();
        let gnorm = clip_global(&model, &mut grads, s.clip);
        let model = self.optim.step(lr, model, grads);
        self.state.step += 1;
        self.state.elapsed_s = self.elapsed0 + self.started.elapsed().as_secs_f64();
        Ok((model, lr, gnorm))
    }

    /// A metrics line (and a log line or the bar's message) every `log_every` steps.
    fn log(&mut self, lr: f64, gnorm: f64) -> Result<()> {
        let step = self.state.step;
        let due = step.is_multiple_of(self.p.settings.log_every.max(1)) || step == self.total;
        let with_acc = self.p.settings.stage != Stage::Pretrain;
        if let Some(w) = due.then(|| self.running.take(with_acc)).flatten() {
            self.metrics.write(&json!({
                "step": step, "epoch": self.state.epoch, "split": "train", "loss": w.loss, "acc": w.acc,
                "lr": lr, "grad_norm": gnorm, "tokens_per_s": w.tokens_per_s, "elapsed_s": self.state.elapsed_s,
            }))?;
            let acc_txt = w
                .acc
                .map(|a| format!(" acc {:.1}%", 100.0 * a))
                .unwrap_or_default();
            let msg = format!("loss {:.4}{acc_txt} {:.0} tok/s", w.loss, w.tokens_per_s);
            if self.bar.is_hidden() {
                eprintln!("step {step}/{} {msg} lr {lr:.2e}", self.total);
            }
            self.bar.set_message(msg);
        }
        self.bar.set_position(step as u64);
        Ok(())
    }

    /// Validation every `eval_every` steps and at the end; a checkpoint every `save_every`
    /// steps and at the end.
    fn evaluate_and_save<M: Saveable>(&mut self, model: &M) -> Result<()> {
        let p = self.p;
        let (s, step) = (&p.settings, self.state.step);
        let last = step == self.total;
        if !self.p.valid.is_empty()
            && ((s.eval_every > 0 && step.is_multiple_of(s.eval_every)) || last)
        {
            let e = model.valid().evaluate(
                &self.p.valid,
                &self.ctx,
                s.batch_size * 2,
                self.eval_device,
            );
            self.metrics.write(&eval_json(step, &e))?;
            self.bar.println(format!("step {step}: {}", describe(&e)));
            self.last_eval = Some(e);
        }
        if (s.save_every > 0 && step.is_multiple_of(s.save_every)) || last {
            let m = save_model(self.p, model, step)?;
            checkpoint::save_checkpoint(&s.out, m, &self.optim, self.state.clone(), s.keep)?;
        }
        Ok(())
    }

    /// Saves the final model, plots the curves and writes `summary.json`.
    fn finish<M: Saveable>(self, model: &M) -> Result<Summary> {
        self.bar.finish();
        let run = &self.p.settings.out;
        let mut m = save_model(self.p, model, self.state.step)?;
        m.dtype = final_dtype(self.p.settings.save_dtype, &self.p.base_dtype);
        let final_model = checkpoint::save_final(run, m)?;
        let plot = run.join("curves.png");
        if let Err(e) =
            crate::plot::plot_metrics(&run.join("metrics.jsonl"), &plot, self.p.settings.stage)
        {
            eprintln!("warning: no plot: {e}");
        }
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let summary = Summary {
            out: run.clone(),
            final_model,
            steps: self.state.step,
            train_loss: self.running.last_loss,
            first_train_loss: self.running.first_loss,
            valid: self.last_eval,
            tokens_per_s: self.running.process_tokens as f64 / secs,
        };
        let text =
            serde_json::to_string_pretty(&summary).map_err(|e| Error::Internal(e.to_string()))?;
        gram_core::atomic_write(&run.join("summary.json"), text.as_bytes())?;
        Ok(summary)
    }
}

/// What a checkpoint or the final folder holds of `model` at `step`: the model, or for a LoRA
/// run the adapter and the merged model.
/// What `final/` is stored as: `auto` keeps a bf16 checkpoint's bf16, anything else is f32.
fn final_dtype(want: crate::settings::SaveDtype, base: &str) -> StoreDtype {
    use crate::settings::SaveDtype;
    match want {
        SaveDtype::F32 => StoreDtype::F32,
        SaveDtype::Bf16 => StoreDtype::Bf16,
        // An adapter loaded over the base adds " + LoRA r=N" to its description.
        SaveDtype::Auto if base.split(" + LoRA").next() == Some("bf16") => StoreDtype::Bf16,
        SaveDtype::Auto => StoreDtype::F32,
    }
}

fn save_model<'p, M: Saveable>(p: &'p Prepared, model: &M, step: usize) -> Result<SaveModel<'p>> {
    let s = &p.settings;
    let mut tensors = hf_tensors(model)?;
    let adapter = match &p.tuning.lora {
        None => None,
        Some(cfg) => Some(adapter_and_merge::<M>(
            p,
            cfg,
            model.decoder(),
            &mut tensors,
        )?),
    };
    Ok(SaveModel {
        config_json: M::config_json(&p.config, &p.tokenizer),
        tensors,
        adapter,
        tokenizer: &p.tokenizer,
        dtype: StoreDtype::F32,
        card: Some(ModelCard {
            trainer: format!("gram-train {}", env!("CARGO_PKG_VERSION")),
            stage: s.stage,
            base_model: s.model.clone(),
            data: s.data.clone(),
            label_ids: p.labels,
            step,
        }),
    })
}

/// The decoder's adapter in PEFT's layout (a reward head, trained whole, beside it) with the
/// parameter ids by PEFT key; merges it into `tensors` (the base's) in place.
fn adapter_and_merge<M: Saveable>(
    p: &Prepared,
    cfg: &gram_core::LoraConfig,
    decoder: &Decoder,
    tensors: &mut std::collections::BTreeMap<String, (gram_core::F32Tensor, u64)>,
) -> Result<(Adapter, ParamIds)> {
    let (pairs, mut ids) = lora::adapter_of(decoder)?;
    let mut saved = std::collections::BTreeMap::new();
    if let Some((t, id)) = tensors.get(SCORE_WEIGHT) {
        saved.insert(SCORE_WEIGHT.to_string(), t.clone());
        ids.insert(SCORE_WEIGHT.to_string(), *id);
    }
    let base =
        std::fs::canonicalize(&p.settings.model).unwrap_or_else(|_| p.settings.model.clone());
    let adapter = Adapter {
        lora: cfg.clone(),
        task: M::TASK,
        base_model: Some(base.display().to_string()),
        pairs,
        saved,
    };
    let mut plain: std::collections::BTreeMap<String, gram_core::F32Tensor> =
        std::mem::take(tensors)
            .into_iter()
            .map(|(k, (t, _))| (k, t))
            .collect();
    adapter.merge_into(&mut plain, Path::new(&p.origin))?;
    *tensors = plain.into_iter().map(|(k, t)| (k, (t, 0))).collect();
    Ok((adapter, ids))
}

/// The run's progress bar (hidden when not on a terminal: log lines then).
fn progress_bar(p: &Prepared, total: usize) -> Result<ProgressBar> {
    let bar = if !p.progress || !progress_enabled() {
        ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::hidden())
    } else {
        ProgressBar::new(total as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} (ETA {eta})")
            .map_err(|e| Error::Internal(e.to_string()))?
            .progress_chars("=> "),
    );
    bar.set_prefix(p.settings.stage.name());
    Ok(bar)
}

/// Trains `model` to the run's last step.
fn train_loop<M: Saveable>(
    mut model: M,
    p: Prepared,
    device: &Device,
    eval_device: &Device,
) -> Result<Summary> {
    let mut t = Trainer::new(&p, device, eval_device)?;
    t.announce();
    while t.state.step < t.total {
        let (next, lr, gnorm) = t.step(model)?;
        model = next;
        t.log(lr, gnorm)?;
        t.evaluate_and_save(&model)?;
    }
    t.finish(&model)
}

fn progress_enabled() -> bool {
    gram_core::cli::progress(false) && std::io::IsTerminal::is_terminal(&std::io::stderr())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_weights_keep_a_bf16_start_in_bf16() {
        use crate::settings::SaveDtype;
        assert_eq!(final_dtype(SaveDtype::Auto, "bf16"), StoreDtype::Bf16);
        for base in ["f32", "f16", "bf16+f32", "Q4_1+F32", "bf16 + LoRA r=8"] {
            let want = if base == "bf16 + LoRA r=8" {
                StoreDtype::Bf16
            } else {
                StoreDtype::F32
            };
            assert_eq!(final_dtype(SaveDtype::Auto, base), want, "{base}");
        }
        assert_eq!(final_dtype(SaveDtype::F32, "bf16"), StoreDtype::F32);
        assert_eq!(final_dtype(SaveDtype::Bf16, "f32"), StoreDtype::Bf16);
    }
    use burn::nn::LinearConfig;

    #[test]
    fn running_statistics_average_a_window_and_start_anew() {
        let mut r = Running::new();
        assert_eq!(r.take(true), None, "an empty window logs nothing");
        let batch = |rows, tokens| BatchStats {
            rows,
            tokens,
            ..BatchStats::default()
        };
        r.add(2.0, 3, &batch(4, 100));
        r.add(1.0, 1, &batch(4, 50));
        let w = r.take(true).expect("a window of two batches");
        assert_eq!((w.loss, w.acc), (1.5, Some(0.5)));
        assert!(w.tokens_per_s > 0.0);
        r.add(0.5, 2, &batch(2, 10));
        let w = r.take(false).expect("a window of one batch");
        assert_eq!((w.loss, w.acc), (0.5, None));
        assert_eq!((r.first_loss, r.last_loss), (1.5, 0.5));
        assert_eq!(r.process_tokens, 160, "tokens count across windows");
        assert_eq!(r.take(true), None, "taken windows start empty");
    }

    #[test]
    fn clipping_scales_the_global_norm_down_to_the_limit_and_only_above_it() {
        let device = Device::flex().autodiff();
        let lin = LinearConfig::new(2, 2).init(&device);
        let bias = lin.bias.as_ref().expect("bias").val();
        // loss = sum(W * cw) + sum(b * cb): the gradients are cw and cb, whose global norm is
        // sqrt(3^2 + 4^2 + 12^2) = 13.
        let cw = Tensor::<2>::from_floats([[3.0, 0.0], [0.0, 4.0]], &device);
        let cb = Tensor::<1>::from_floats([12.0, 0.0], &device);
        let grads_of = || {
            let loss = (lin.weight.val() * cw.clone()).sum() + (bias.clone() * cb.clone()).sum();
            GradientsParams::from_grads(loss.backward(), &lin)
        };
        let values = |g: &GradientsParams| -> Vec<f32> {
            let w = g.get::<2>(lin.weight.id).expect("weight gradient");
            let b = g
                .get::<1>(lin.bias.as_ref().expect("bias").id)
                .expect("bias gradient");
            let mut v = w.into_data().try_to_vec::<f32>().expect("f32");
            v.extend(b.into_data().try_to_vec::<f32>().expect("f32"));
            v
        };
        let mut g = grads_of();
        let norm = clip_global(&lin, &mut g, 6.5);
        assert!((norm - 13.0).abs() < 1e-5, "norm before clipping {norm}");
        let clipped = values(&g);
        let want = [1.5f32, 0.0, 0.0, 2.0, 6.0, 0.0];
        for (c, w) in clipped.iter().zip(want) {
            assert!((c - w).abs() < 1e-5, "{clipped:?} vs {want:?}");
        }
        let after: f32 = clipped.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((after - 6.5).abs() < 1e-4, "norm after clipping {after}");
        // Under the limit (and with clipping off) the gradients are left as they are.
        for limit in [100.0, 0.0] {
            let mut g = grads_of();
            assert!((clip_global(&lin, &mut g, limit) - 13.0).abs() < 1e-5);
            assert_eq!(values(&g), vec![3.0, 0.0, 0.0, 4.0, 12.0, 0.0]);
        }
    }
}
