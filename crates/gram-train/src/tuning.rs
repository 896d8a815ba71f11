//! What a run trains: every parameter, a LoRA adapter (new, or continued from a PEFT folder),
//! or only the top layers. Resolved from the settings against the model's configuration before
//! any compute, so that an adapter of another base, an unknown target or too many layers is a
//! one-line error, not a failure halfway.

use std::path::{Path, PathBuf};

use gram_core::adapter::Task;
use gram_core::{Adapter, LoraConfig, ModelConfig};
use gram_model::load::expected_shapes;
use gram_model::lora::Trainable;
use gram_model::reward::SCORE_WEIGHT;

use crate::error::{Error, Result};
use crate::settings::{Settings, Stage};

/// How a run trains.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// The adapter's shape, for a LoRA run.
    pub lora: Option<LoraConfig>,
    /// The adapter a LoRA run continues (with its folder), if any.
    pub adapter: Option<(PathBuf, Adapter)>,
    /// Which parameters take gradients.
    pub trainable: Trainable,
}

impl Tuning {
    /// The tuning of `s` for a model of `config`; `adapter_dir` is the adapter to continue
    /// (`--adapter`, or the checkpoint a LoRA run resumes from).
    pub fn resolve(s: &Settings, config: &ModelConfig, adapter_dir: Option<&Path>) -> Result<Self> {
        let layers = config.num_hidden_layers;
        if let Some(n) = s.train_layers
            && n > layers
        {
            return Err(Error::Input(format!(
                "--train-layers {n} is more than the model's {layers} decoder layers"
            )));
        }
        let adapter = adapter_dir
            .map(|dir| read_adapter(dir, s, config).map(|a| (dir.to_path_buf(), a)))
            .transpose()?;
        let lora = match (&adapter, s.lora_rank) {
            (Some((_, a)), _) => Some(a.lora.clone()),
            (None, 0) => None,
            (None, rank) => Some(LoraConfig {
                rank,
                alpha: s.lora_alpha.unwrap_or(2.0 * rank as f64),
                dropout: s.lora_dropout,
                targets: s.lora_targets()?,
                rslora: false,
                layers: s.train_layers.map(|n| (layers - n..layers).collect()),
            }),
        };
        let trainable = Trainable {
            lora: lora.is_some(),
            top_layers: if lora.is_some() { None } else { s.train_layers },
            heads: if s.stage == Stage::Bt {
                vec!["score".into()]
            } else {
                Vec::new()
            },
        };
        Ok(Self {
            lora,
            adapter,
            trainable,
        })
    }

    /// One phrase for the run's announcement (`full`, `LoRA r=16 on q,k,...`, `top 8 layers`).
    pub fn describe(&self, num_layers: usize) -> String {
        match (&self.lora, self.trainable.top_layers) {
            (Some(l), _) => {
                let targets: Vec<&str> = l.targets.iter().map(|t| t.short()).collect();
                let layers = l
                    .layers
                    .as_ref()
                    .map_or_else(String::new, |v| format!(" of the top {} layers", v.len()));
                format!(
                    "LoRA r={} alpha={} on {}{layers}",
                    l.rank,
                    l.alpha,
                    targets.join(",")
                )
            }
            (None, Some(n)) => format!("top {n} of {num_layers} layers"),
            (None, None) => "full fine-tuning".into(),
        }
    }
}

/// Reads the adapter in `dir` and checks it against the run and the base model.
fn read_adapter(dir: &Path, s: &Settings, config: &ModelConfig) -> Result<Adapter> {
    let a = Adapter::read(dir)?;
    let cfg_file = dir.join(gram_core::adapter::CONFIG_FILE);
    if s.lora_rank > 0 && s.lora_rank != a.lora.rank {
        return Err(Error::Input(format!(
            "{}: the adapter has rank {}, the settings ask for {}; drop --lora-rank to continue it",
            cfg_file.display(),
            a.lora.rank,
            s.lora_rank
        )));
    }
    if a.task == Task::SeqCls && s.stage != Stage::Bt {
        return Err(Error::Input(format!(
            "{}: a reward-model (SEQ_CLS) adapter cannot continue as a {} run",
            cfg_file.display(),
            s.stage.name()
        )));
    }
    a.lora.check(config, &cfg_file)?;
    let mut shapes = expected_shapes(config);
    shapes.insert(SCORE_WEIGHT.into(), vec![1, config.hidden_size]);
    a.check_shapes(&shapes, &dir.join(gram_core::adapter::WEIGHTS_FILE))?;
    if let Some(extra) = a.saved.keys().find(|k| !shapes.contains_key(*k)) {
        return Err(Error::Input(format!(
            "{}: tensor `{extra}` matches no parameter of the model",
            dir.join(gram_core::adapter::WEIGHTS_FILE).display()
        )));
    }
    Ok(a)
}
