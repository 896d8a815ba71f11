//! LoRA adapters in PEFT's on-disk layout: `adapter_config.json` and `adapter_model.safetensors`
//! with PEFT's key names (`base_model.model.<module>.lora_A.weight`, `[rank, in]`, and
//! `.lora_B.weight`, `[out, rank]`; heads trained whole, PEFT's `modules_to_save`, as
//! `base_model.model.<name>.weight`). Read, written, and merged into a base model's weights
//! (`W + scale · B·A`), so that every tool can open an adapter folder as a checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::config::ModelConfig;
use crate::error::{Error, Result, read_file};
use crate::weights::{F32Tensor, StoreDtype, Weights, write_safetensors_as};

/// The adapter's configuration file.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter's tensors.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// What PEFT puts before a module's name in a saved key.
const KEY_PREFIX: &str = "base_model.model.";

/// The PEFT keys of a module's two factors (`lora_A`, `lora_B`).
pub fn factor_keys(module: &str) -> [String; 2] {
    [
        format!("{KEY_PREFIX}{module}.lora_A.weight"),
        format!("{KEY_PREFIX}{module}.lora_B.weight"),
    ]
}

/// The PEFT key of a tensor trained whole (`score.weight` -> `base_model.model.score.weight`).
pub fn saved_key(name: &str) -> String {
    format!("{KEY_PREFIX}{name}")
}

/// A projection of a decoder layer that LoRA can adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// `self_attn.q_proj`.
    Q,
    /// `self_attn.k_proj`.
    K,
    /// `self_attn.v_proj`.
    V,
    /// `self_attn.o_proj`.
    O,
    /// `mlp.gate_proj`.
    Gate,
    /// `mlp.up_proj`.
    Up,
    /// `mlp.down_proj`.
    Down,
}

impl Target {
    /// Every target, in layer order.
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// The short name used on the command line (`q`, `gate`, ...).
    pub fn short(self) -> &'static str {
        match self {
            Target::Q => "q",
            Target::K => "k",
            Target::V => "v",
            Target::O => "o",
            Target::Gate => "gate",
            Target::Up => "up",
            Target::Down => "down",
        }
    }

    /// The module's path inside a decoder layer (`self_attn.q_proj`).
    pub fn path(self) -> &'static str {
        match self {
            Target::Q => "self_attn.q_proj",
            Target::K => "self_attn.k_proj",
            Target::V => "self_attn.v_proj",
            Target::O => "self_attn.o_proj",
            Target::Gate => "mlp.gate_proj",
            Target::Up => "mlp.up_proj",
            Target::Down => "mlp.down_proj",
        }
    }

    /// The module's own name (`q_proj`), as PEFT's `target_modules` lists it.
    pub fn module(self) -> &'static str {
        let p = self.path();
        &p[p.rfind('.').map_or(0, |i| i + 1)..]
    }

    /// A target by its short name (`q`) or module name (`q_proj`).
    pub fn parse(name: &str) -> std::result::Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|t| t.short() == name || t.module() == name)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::ALL.iter().map(|t| t.short()).collect();
                format!("unknown LoRA target `{name}` (known: {})", known.join(", "))
            })
    }

    /// The HF module name of this target in layer `layer` (`model.layers.3.self_attn.q_proj`).
    pub fn module_name(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}", self.path())
    }
}

/// The shape of a LoRA adapter: rank, scaling, dropout, which projections of which layers.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` of each low-rank update.
    pub rank: usize,
    /// Scaling numerator: the update is `alpha / r · B·A` (`alpha / sqrt(r)` with `rslora`).
    pub alpha: f64,
    /// Dropout on the adapter's input while training.
    pub dropout: f64,
    /// Adapted projections.
    pub targets: Vec<Target>,
    /// Rank-stabilised scaling (PEFT's `use_rslora`).
    pub rslora: bool,
    /// Adapted layers (PEFT's `layers_to_transform`); `None`: all.
    pub layers: Option<Vec<usize>>,
}

impl LoraConfig {
    /// The factor the low-rank product is multiplied by.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// Whether layer `layer` carries adapters.
    pub fn adapts_layer(&self, layer: usize) -> bool {
        self.layers.as_ref().is_none_or(|l| l.contains(&layer))
    }

    /// The modules this configuration adapts in a model of `num_layers` layers, as
    /// `(layer, target)`.
    pub fn modules(&self, num_layers: usize) -> Vec<(usize, Target)> {
        (0..num_layers)
            .filter(|&l| self.adapts_layer(l))
            .flat_map(|l| self.targets.iter().map(move |&t| (l, t)))
            .collect()
    }

    /// Checks the configuration against a model: a rank of at least 1, a layer list inside it.
    pub fn check(&self, config: &ModelConfig, origin: &Path) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::format(origin, "LoRA rank must be >= 1"));
        }
        if self.targets.is_empty() {
            return Err(Error::format(origin, "no LoRA targets"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::format(
                origin,
                format!("LoRA dropout must be in [0, 1), got {}", self.dropout),
            ));
        }
        if let Some(bad) = self
            .layers
            .iter()
            .flatten()
            .find(|&&l| l >= config.num_hidden_layers)
        {
            return Err(Error::format(
                origin,
                format!(
                    "adapter layer {bad} does not exist: the model has {} layers",
                    config.num_hidden_layers
                ),
            ));
        }
        Ok(())
    }
}

/// What the base model of an adapter is (PEFT's `task_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// A causal LM (`CAUSAL_LM`): the GRAM judge.
    CausalLm,
    /// A sequence classifier with a scalar head (`SEQ_CLS`): the Bradley-Terry reward model.
    SeqCls,
}

impl Task {
    fn peft_name(self) -> &'static str {
        match self {
            Task::CausalLm => "CAUSAL_LM",
            Task::SeqCls => "SEQ_CLS",
        }
    }
}

/// The two factors of one adapted projection, in PEFT's (PyTorch's) layout.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair {
    /// `lora_A.weight`: `[rank, in]`.
    pub a: F32Tensor,
    /// `lora_B.weight`: `[out, rank]`.
    pub b: F32Tensor,
}

/// A LoRA adapter: its configuration and tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    /// Rank, scaling and targets.
    pub lora: LoraConfig,
    /// What the base model is.
    pub task: Task,
    /// PEFT's `base_model_name_or_path`: where the base is (a path, or a hub id).
    pub base_model: Option<String>,
    /// Factors by HF module name (`model.layers.3.self_attn.q_proj`).
    pub pairs: BTreeMap<String, LoraPair>,
    /// Tensors trained whole (PEFT's `modules_to_save`), by HF tensor name (`score.weight`).
    pub saved: BTreeMap<String, F32Tensor>,
}

impl Adapter {
    /// Whether `dir` holds an adapter (an `adapter_config.json`).
    pub fn is_adapter_dir(dir: &Path) -> bool {
        dir.join(CONFIG_FILE).is_file()
    }

    /// Reads an adapter folder (ours, or one PEFT saved).
    pub fn read(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join(CONFIG_FILE);
        let v: Value = serde_json::from_slice(&read_file(&cfg_path)?)
            .map_err(|e| Error::format(&cfg_path, format!("not valid JSON: {e}")))?;
        let (lora, task, base_model) = parse_config(&v, &cfg_path)?;
        let w_path = dir.join(WEIGHTS_FILE);
        let weights = Weights::from_safetensors_file(&w_path)?;
        let (pairs, saved) = split_keys(weights.tensors, &lora, &w_path)?;
        Ok(Self {
            lora,
            task,
            base_model,
            pairs,
            saved,
        })
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir` (which must
    /// exist), each atomically, tensors stored as `dtype`.
    pub fn write(&self, dir: &Path, dtype: StoreDtype) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.config_json())
            .map_err(|e| Error::Internal(e.to_string()))?;
        crate::atomic_write(&dir.join(CONFIG_FILE), text.as_bytes())?;
        let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        write_safetensors_as(&dir.join(WEIGHTS_FILE), &self.tensors(), Some(meta), dtype)
    }

    /// The tensors under PEFT's key names.
    pub fn tensors(&self) -> BTreeMap<String, F32Tensor> {
        let mut out = BTreeMap::new();
        for (module, p) in &self.pairs {
            let [a, b] = factor_keys(module);
            out.insert(a, p.a.clone());
            out.insert(b, p.b.clone());
        }
        for (name, t) in &self.saved {
            out.insert(saved_key(name), t.clone());
        }
        out
    }

    /// PEFT's `adapter_config.json` for this adapter.
    pub fn config_json(&self) -> Value {
        let l = &self.lora;
        let saved: Vec<String> = self
            .saved
            .keys()
            .map(|k| k.trim_end_matches(".weight").to_string())
            .collect();
        json!({
            "peft_type": "LORA",
            "task_type": self.task.peft_name(),
            "base_model_name_or_path": self.base_model,
            "r": l.rank,
            "lora_alpha": l.alpha,
            "lora_dropout": l.dropout,
            "target_modules": l.targets.iter().map(|t| t.module()).collect::<Vec<_>>(),
            "layers_to_transform": l.layers,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_rslora": l.rslora,
            "use_dora": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": if saved.is_empty() { Value::Null } else { json!(saved) },
            "rank_pattern": {},
            "alpha_pattern": {},
        })
    }

    /// Checks every tensor against the base's shapes (`expected`: HF tensor name -> shape):
    /// each factor pair adapts a linear weight the base has, with matching sides.
    pub fn check_shapes(
        &self,
        expected: &BTreeMap<String, Vec<usize>>,
        origin: &Path,
    ) -> Result<()> {
        let r = self.lora.rank;
        for (module, p) in &self.pairs {
            let name = format!("{module}.weight");
            let Some(w) = expected.get(&name) else {
                return Err(Error::format(
                    origin,
                    format!("adapter module `{module}` matches no layer of the base model"),
                ));
            };
            let (out, inp) = (w[0], w[1]);
            for (which, got, want) in [
                ("lora_A", &p.a.shape, [r, inp]),
                ("lora_B", &p.b.shape, [out, r]),
            ] {
                if got.as_slice() != want {
                    return Err(Error::Shape {
                        path: origin.into(),
                        name: format!("{KEY_PREFIX}{module}.{which}.weight"),
                        expected: want.to_vec(),
                        got: got.clone(),
                    });
                }
            }
        }
        for (name, t) in &self.saved {
            if let Some(want) = expected.get(name)
                && *want != t.shape
            {
                return Err(Error::Shape {
                    path: origin.into(),
                    name: format!("{KEY_PREFIX}{name}"),
                    expected: want.clone(),
                    got: t.shape.clone(),
                });
            }
        }
        Ok(())
    }

    /// Adds every update into the base weights (`W += scale · B·A`, as PEFT's
    /// `merge_and_unload`) and puts the whole tensors in place; `origin` names the adapter in
    /// errors.
    pub fn merge_into(
        &self,
        weights: &mut BTreeMap<String, F32Tensor>,
        origin: &Path,
    ) -> Result<()> {
        let expected: BTreeMap<String, Vec<usize>> = weights
            .iter()
            .map(|(k, t)| (k.clone(), t.shape.clone()))
            .collect();
        self.check_shapes(&expected, origin)?;
        let scale = self.lora.scale() as f32;
        for (module, p) in &self.pairs {
            let w = weights
                .get_mut(&format!("{module}.weight"))
                .ok_or_else(|| Error::Internal(format!("{module} vanished")))?;
            add_low_rank(w, &p.b, &p.a, scale);
        }
        for (name, t) in &self.saved {
            weights.insert(name.clone(), t.clone());
        }
        Ok(())
    }
}

/// `w += scale · b·a` with `w` `[out, in]`, `b` `[out, r]`, `a` `[r, in]`.
fn add_low_rank(w: &mut F32Tensor, b: &F32Tensor, a: &F32Tensor, scale: f32) {
    let (out, inp, r) = (w.shape[0], w.shape[1], a.shape[0]);
    for o in 0..out {
        let row = &mut w.data[o * inp..(o + 1) * inp];
        for k in 0..r {
            let f = b.data[o * r + k] * scale;
            let a_row = &a.data[k * inp..(k + 1) * inp];
            for (x, y) in row.iter_mut().zip(a_row) {
                *x += f * y;
            }
        }
    }
}

/// `(lora config, task, base_model_name_or_path)` of an `adapter_config.json`.
fn parse_config(v: &Value, path: &Path) -> Result<(LoraConfig, Task, Option<String>)> {
    let bad = |msg: String| Error::format(path, msg);
    refuse_unsupported(v, path)?;
    let rank = v
        .get("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("no integer `r` (the LoRA rank)".into()))? as usize;
    let alpha = v
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| bad("no number `lora_alpha`".into()))?;
    let lora = LoraConfig {
        rank,
        alpha,
        dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        targets: parse_targets(v, path)?,
        rslora: v
            .get("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        layers: parse_layers(v, path)?,
    };
    let task = match v.get("task_type").and_then(Value::as_str) {
        Some("SEQ_CLS") => Task::SeqCls,
        None | Some("CAUSAL_LM") => Task::CausalLm,
        Some(t) => {
            return Err(Error::unsupported(
                path,
                "task_type",
                format!("`{t}` (supported: CAUSAL_LM, SEQ_CLS)"),
            ));
        }
    };
    let base = v
        .get("base_model_name_or_path")
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok((lora, task, base))
}

/// Refuses the PEFT variants whose arithmetic the plain LoRA path would get wrong: other PEFT
/// types, DoRA, transposed weights, per-module ranks, trained biases.
fn refuse_unsupported(v: &Value, path: &Path) -> Result<()> {
    let unsupported = |what: &str, msg: String| Err(Error::unsupported(path, what, msg));
    let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("LORA");
    if peft_type != "LORA" {
        return unsupported("peft_type", format!("`{peft_type}` (supported: LORA)"));
    }
    for (key, what) in [("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out")] {
        if v.get(key).and_then(Value::as_bool) == Some(true) {
            return unsupported(key, format!("{what} adapters are not supported"));
        }
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if v.get(key)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            return unsupported(key, "per-module ranks or alphas are not supported".into());
        }
    }
    match v.get("bias").and_then(Value::as_str) {
        Some(b) if b != "none" => unsupported("bias", format!("`{b}` (supported: none)")),
        _ => Ok(()),
    }
}

/// `target_modules`: a list of projection names (PEFT's regex form is refused).
fn parse_targets(v: &Value, path: &Path) -> Result<Vec<Target>> {
    let bad = |msg: String| Error::format(path, msg);
    match v.get("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| {
                let name = t
                    .as_str()
                    .ok_or_else(|| bad(format!("target_modules entry {t} is not a string")))?;
                Target::parse(name).map_err(|m| bad(format!("target_modules: {m}")))
            })
            .collect(),
        Some(Value::String(s)) => Err(Error::unsupported(
            path,
            "target_modules",
            format!("a pattern (`{s}`); list the modules instead"),
        )),
        _ => Err(bad("no `target_modules` list".into())),
    }
}

/// `layers_to_transform`: absent (every layer), one index, or a list.
fn parse_layers(v: &Value, path: &Path) -> Result<Option<Vec<usize>>> {
    let bad = |msg: String| Error::format(path, msg);
    match v.get("layers_to_transform") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(Some(vec![n.as_u64().unwrap_or(u64::MAX) as usize])),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_u64().map(|n| n as usize).ok_or_else(|| {
                    bad(format!(
                        "layers_to_transform entry {x} is not a layer index"
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(other) => Err(bad(format!(
            "layers_to_transform {other} is not a layer list"
        ))),
    }
}

/// Sorts an adapter file's tensors into factor pairs (by module) and whole tensors; every
/// key must name a factor of a configured target or a whole tensor.
#[allow(clippy::type_complexity)]
fn split_keys(
    tensors: BTreeMap<String, F32Tensor>,
    lora: &LoraConfig,
    path: &Path,
) -> Result<(BTreeMap<String, LoraPair>, BTreeMap<String, F32Tensor>)> {
    let bad = |msg: String| Error::format(path, msg);
    let mut halves: BTreeMap<String, (Option<F32Tensor>, Option<F32Tensor>)> = BTreeMap::new();
    let mut saved = BTreeMap::new();
    for (key, t) in tensors {
        let Some(name) = key.strip_prefix(KEY_PREFIX) else {
            return Err(bad(format!(
                "key `{key}` does not start with `{KEY_PREFIX}` (not a PEFT adapter file?)"
            )));
        };
        let (module, which) = if let Some(m) = name.strip_suffix(".lora_A.weight") {
            (m, 0)
        } else if let Some(m) = name.strip_suffix(".lora_B.weight") {
            (m, 1)
        } else if name.contains("lora_") {
            return Err(Error::unsupported(
                path,
                "adapter tensor",
                format!("`{key}` (supported: lora_A, lora_B)"),
            ));
        } else {
            saved.insert(name.to_string(), t);
            continue;
        };
        if !module_is_target(module, lora) {
            return Err(bad(format!(
                "key `{key}` matches no adapted layer (targets {:?})",
                lora.targets.iter().map(|t| t.module()).collect::<Vec<_>>()
            )));
        }
        let slot = halves.entry(module.to_string()).or_default();
        if which == 0 {
            slot.0 = Some(t);
        } else {
            slot.1 = Some(t);
        }
    }
    let mut pairs = BTreeMap::new();
    for (module, (a, b)) in halves {
        match (a, b) {
            (Some(a), Some(b)) => {
                pairs.insert(module, LoraPair { a, b });
            }
            _ => {
                return Err(bad(format!(
                    "module `{module}` has only one of lora_A and lora_B"
                )));
            }
        }
    }
    if pairs.is_empty() {
        return Err(bad("no LoRA tensors".into()));
    }
    Ok((pairs, saved))
}

/// Whether `module` is `model.layers.<i>.<target path>` for a configured target.
fn module_is_target(module: &str, lora: &LoraConfig) -> bool {
    let Some(rest) = module.strip_prefix("model.layers.") else {
        return false;
    };
    let Some((layer, path)) = rest.split_once('.') else {
        return false;
    };
    layer.parse::<usize>().is_ok_and(|l| lora.adapts_layer(l))
        && lora.targets.iter().any(|t| t.path() == path)
}

/// Where an adapter's base model is: `--base` when given, else `base_model_name_or_path` as a
/// path (absolute, or relative to the adapter folder, or to the working directory).
pub fn resolve_base(adapter_dir: &Path, adapter: &Adapter, base: Option<&Path>) -> Result<PathBuf> {
    if let Some(b) = base {
        return Ok(b.to_path_buf());
    }
    let cfg = adapter_dir.join(CONFIG_FILE);
    let Some(name) = adapter.base_model.as_deref().filter(|s| !s.is_empty()) else {
        return Err(Error::format(
            cfg,
            "names no base model (base_model_name_or_path); pass --base",
        ));
    };
    let p = Path::new(name);
    [adapter_dir.join(p), p.to_path_buf()]
        .into_iter()
        .find(|c| c.exists())
        .ok_or_else(|| {
            Error::format(
                cfg,
                format!("base model `{name}` is not a file or folder here; pass --base with its local copy"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], data: Vec<f32>) -> F32Tensor {
        F32Tensor {
            shape: shape.to_vec(),
            data,
        }
    }

    fn adapter() -> Adapter {
        let mut pairs = BTreeMap::new();
        pairs.insert(
            "model.layers.0.self_attn.q_proj".to_string(),
            LoraPair {
                a: t(&[1, 2], vec![1.0, 2.0]),
                b: t(&[2, 1], vec![3.0, -1.0]),
            },
        );
        Adapter {
            lora: LoraConfig {
                rank: 1,
                alpha: 2.0,
                dropout: 0.0,
                targets: vec![Target::Q],
                rslora: false,
                layers: None,
            },
            task: Task::CausalLm,
            base_model: Some("base".into()),
            pairs,
            saved: BTreeMap::new(),
        }
    }

    #[test]
    fn merge_adds_the_scaled_low_rank_product() -> Result<()> {
        let mut w = BTreeMap::new();
        w.insert(
            "model.layers.0.self_attn.q_proj.weight".to_string(),
            t(&[2, 2], vec![1.0, 0.0, 0.0, 1.0]),
        );
        adapter().merge_into(&mut w, Path::new("a"))?;
        // scale 2 · [[3], [-1]] · [[1, 2]] = [[6, 12], [-2, -4]]
        assert_eq!(
            w["model.layers.0.self_attn.q_proj.weight"].data,
            vec![7.0, 12.0, -2.0, -3.0]
        );
        Ok(())
    }

    #[test]
    fn write_then_read_is_the_same_adapter_and_bad_keys_are_named() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("gram-adapter-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let a = adapter();
        a.write(&dir, StoreDtype::F32)?;
        assert_eq!(Adapter::read(&dir)?, a);
        // A key for a projection the config does not target.
        let mut tensors = a.tensors();
        tensors.insert(
            "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight".into(),
            t(&[1, 2], vec![0.0, 0.0]),
        );
        crate::weights::write_safetensors(&dir.join(WEIGHTS_FILE), &tensors, None)?;
        let e = Adapter::read(&dir)
            .expect_err("an unknown key is refused")
            .to_string();
        assert!(
            e.contains("mlp.up_proj.lora_A") && e.contains("matches no adapted layer"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }

    #[test]
    fn shapes_of_another_base_are_refused() {
        let mut expected = BTreeMap::new();
        expected.insert(
            "model.layers.0.self_attn.q_proj.weight".to_string(),
            vec![4, 4],
        );
        let e = adapter()
            .check_shapes(&expected, Path::new("ad"))
            .expect_err("a 2x2 adapter on a 4x4 weight")
            .to_string();
        assert!(e.contains("lora_A") && e.contains("[1, 4]"), "{e}");
        expected.clear();
        let e = adapter()
            .check_shapes(&expected, Path::new("ad"))
            .expect_err("no such layer")
            .to_string();
        assert!(e.contains("matches no layer"), "{e}");
    }

    #[test]
    fn targets_parse_by_either_name() {
        assert_eq!(Target::parse("gate"), Ok(Target::Gate));
        assert_eq!(Target::parse("down_proj"), Ok(Target::Down));
        assert!(Target::parse("lm_head").is_err_and(|e| e.contains("unknown LoRA target")));
        assert_eq!(Target::O.module(), "o_proj");
    }
}
