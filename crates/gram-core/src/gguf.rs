//! GGUF reader (llama.cpp's format, version 2 and 3): metadata, tensor directory, and exact
//! dequantisation of F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 as ggml / gguf-py define
//! them; the `llama` architecture mapped onto HF names and [`ModelConfig`]; and the embedded
//! tokenizer (see [`crate::tokenizer::from_gguf`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::weights::{F32Tensor, Weights};

/// A GGUF metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    U64(u64),
    /// Any signed integer type.
    I64(i64),
    /// float32 or float64.
    F64(f64),
    /// bool.
    Bool(bool),
    /// UTF-8 string.
    Str(String),
    /// Array of values.
    Array(Vec<Value>),
}

impl Value {
    /// As an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(x) => Some(x),
            Value::I64(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }
    /// As a float, if numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::U64(x) => Some(x as f64),
            Value::I64(x) => Some(x as f64),
            Value::F64(x) => Some(x),
            _ => None,
        }
    }
    /// As a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    /// As an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml tensor types this reader knows by name (others are reported by number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    Bf16,
    /// 32 values: f16 scale, 32 x int8.
    Q8_0,
    /// 32 values: f16 scale, 32 x 4 bits, offset 8.
    Q4_0,
    /// 32 values: f16 scale and min, 32 x 4 bits.
    Q4_1,
    /// 32 values: f16 scale, 32 x 5 bits, offset 16.
    Q5_0,
    /// 32 values: f16 scale and min, 32 x 5 bits.
    Q5_1,
    /// A type this reader does not dequantise (its ggml number).
    Other(u32),
}

impl GgmlType {
    fn from_u32(x: u32) -> Self {
        match x {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            30 => Self::Bf16,
            other => Self::Other(other),
        }
    }

    /// (values per block, bytes per block), or None for unknown types.
    fn block(self) -> Option<(usize, usize)> {
        Some(match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::Bf16 => (1, 2),
            Self::Q8_0 => (32, 34),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Other(_) => return None,
        })
    }

    /// The name llama.cpp uses.
    pub fn name(self) -> String {
        match self {
            Self::F32 => "F32".into(),
            Self::F16 => "F16".into(),
            Self::Bf16 => "BF16".into(),
            Self::Q8_0 => "Q8_0".into(),
            Self::Q4_0 => "Q4_0".into(),
            Self::Q4_1 => "Q4_1".into(),
            Self::Q5_0 => "Q5_0".into(),
            Self::Q5_1 => "Q5_1".into(),
            Self::Other(n) => format!("ggml type {n}"),
        }
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// ggml dims, innermost first (`ne[0]` is the row length).
    pub dims: Vec<u64>,
    /// Storage type.
    pub ty: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Shape in PyTorch order (outermost first).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
    fn numel(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file over its bytes (memory-mapped when opened from disk).
pub struct GgufFile {
    /// The file.
    pub path: PathBuf,
    /// Format version.
    pub version: u32,
    /// Metadata, by key.
    pub metadata: BTreeMap<String, Value>,
    /// Tensor directory, in file order.
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
    bytes: crate::error::FileBytes,
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| {
                Error::format(
                    self.path,
                    format!(
                        "truncated GGUF: {what} needs {n} bytes at offset {}, file has {}",
                        self.pos,
                        self.b.len()
                    ),
                )
            })?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self, w: &str) -> Result<u8> {
        Ok(self.take(1, w)?[0])
    }
    fn u16(&mut self, w: &str) -> Result<u16> {
        let s = self.take(2, w)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, w: &str) -> Result<u32> {
        let s = self.take(4, w)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self, w: &str) -> Result<u64> {
        let s = self.take(8, w)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn len(&mut self, v1: bool, w: &str) -> Result<usize> {
        let n = if v1 {
            u64::from(self.u32(w)?)
        } else {
            self.u64(w)?
        };
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.b.len())
            .ok_or_else(|| {
                Error::format(
                    self.path,
                    format!("{w}: length {n} at offset {} exceeds the file", self.pos),
                )
            })
    }
    fn string(&mut self, v1: bool, w: &str) -> Result<String> {
        let n = self.len(v1, w)?;
        let at = self.pos;
        let s = self.take(n, w)?;
        String::from_utf8(s.to_vec()).map_err(|_| {
            Error::format(
                self.path,
                format!("{w}: string at offset {at} is not UTF-8"),
            )
        })
    }
    fn value(&mut self, ty: u32, v1: bool, key: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U64(u64::from(self.u8(key)?)),
            1 => Value::I64(i64::from(self.u8(key)? as i8)),
            2 => Value::U64(u64::from(self.u16(key)?)),
            3 => Value::I64(i64::from(self.u16(key)? as i16)),
            4 => Value::U64(u64::from(self.u32(key)?)),
            5 => Value::I64(i64::from(self.u32(key)? as i32)),
            6 => Value::F64(f64::from(f32::from_bits(self.u32(key)?))),
            7 => Value::Bool(self.u8(key)? != 0),
            8 => Value::Str(self.string(v1, key)?),
            9 => {
                if depth > 4 {
                    return Err(Error::format(
                        self.path,
                        format!("metadata `{key}`: arrays nested too deep"),
                    ));
                }
                let ety = self.u32(key)?;
                let n = self.len(v1, key)?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(ety, v1, key, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(self.u64(key)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(key)?)),
            other => {
                return Err(Error::format(
                    self.path,
                    format!("metadata `{key}` has unknown value type {other} (bad or newer GGUF?)"),
                ));
            }
        })
    }
}

impl GgufFile {
    /// Reads and parses a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        Self::parse(crate::error::map_file(path)?, path)
    }

    /// Parses GGUF bytes; `path` names them in errors.
    pub fn parse(bytes: impl Into<crate::error::FileBytes>, path: &Path) -> Result<Self> {
        let bytes = bytes.into();
        let mut c = Cursor {
            b: &bytes,
            pos: 0,
            path,
        };
        let magic = c.take(4, "magic")?;
        if magic != b"GGUF" {
            return Err(Error::format(
                path,
                format!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"),
            ));
        }
        let version = c.u32("version")?;
        if !(1..=3).contains(&version) {
            return Err(Error::unsupported(
                path,
                "GGUF version",
                format!("{version} (supported: 1-3)"),
            ));
        }
        let v1 = version == 1;
        let n_tensors = c.len(v1, "tensor count")?;
        let n_kv = c.len(v1, "metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string(v1, "metadata key")?;
            let ty = c.u32(&key)?;
            let v = c.value(ty, v1, &key, 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors.min(1 << 16));
        for _ in 0..n_tensors {
            let name = c.string(v1, "tensor name")?;
            let nd = c.u32(&name)? as usize;
            if nd == 0 || nd > 4 {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}` has {nd} dimensions (1-4 allowed)"),
                ));
            }
            let mut dims = Vec::with_capacity(nd);
            for _ in 0..nd {
                dims.push(if v1 {
                    u64::from(c.u32(&name)?)
                } else {
                    c.u64(&name)?
                });
            }
            if dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .is_none_or(|n| u128::from(n) > crate::config::MAX_PARAMETERS)
            {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor `{name}`: dimensions {dims:?} hold more values than any model loaded"
                    ),
                ));
            }
            let ty = GgmlType::from_u32(c.u32(&name)?);
            let offset = c.u64(&name)?;
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
            });
        }
        let align = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32)
            .max(1) as usize;
        let data_start = c.pos.div_ceil(align) * align;
        let f = GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_start,
            bytes,
        };
        // Check every tensor's extent now, so that truncation is reported before any compute,
        // and that no two tensors share bytes.
        let mut extents = f
            .tensors
            .iter()
            .map(|t| Ok((f.extent(t)?, t.name.as_str())))
            .collect::<Result<Vec<_>>>()?;
        extents.sort_unstable();
        for w in extents.windows(2) {
            let (((_, end), a), ((start, _), b)) = (w[0], w[1]);
            if start < end {
                return Err(Error::format(
                    path,
                    format!("tensors `{a}` and `{b}` overlap in the data section"),
                ));
            }
        }
        Ok(f)
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn req_u64(&self, key: &str) -> Result<u64> {
        self.get(key).and_then(Value::as_u64).ok_or_else(|| {
            Error::format(
                &self.path,
                format!("metadata `{key}` is missing or not an integer"),
            )
        })
    }

    fn raw(&self, t: &TensorInfo) -> Result<&[u8]> {
        let (start, end) = self.extent(t)?;
        Ok(&self.bytes[start as usize..end as usize])
    }

    /// The byte range `[start, end)` of a tensor's data in the file, checked against its size.
    fn extent(&self, t: &TensorInfo) -> Result<(u64, u64)> {
        let (bs, bb) = t.ty.block().ok_or_else(|| {
            Error::unsupported(
                &self.path,
                "tensor type",
                format!(
                    "tensor `{}` is {} (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1)",
                    t.name,
                    t.ty.name()
                ),
            )
        })?;
        if !t.dims[0].is_multiple_of(bs as u64) {
            return Err(Error::format(
                &self.path,
                format!(
                    "tensor `{}`: row length {} is not a multiple of the {}-value block",
                    t.name, t.dims[0], bs
                ),
            ));
        }
        let nbytes = (t.numel() / bs as u64).checked_mul(bb as u64);
        let start = (self.data_start as u64).checked_add(t.offset);
        match (start, nbytes) {
            (Some(s), Some(n))
                if s.checked_add(n)
                    .is_some_and(|e| e <= self.bytes.len() as u64) =>
            {
                Ok((s, s + n))
            }
            _ => Err(Error::format(
                &self.path,
                format!(
                    "truncated GGUF: tensor `{}` ({} {:?}) lies past the end of the file ({} bytes)",
                    t.name,
                    t.ty.name(),
                    t.shape(),
                    self.bytes.len()
                ),
            )),
        }
    }

    /// Dequantises one tensor to f32, exactly as gguf-py does.
    pub fn dequantize(&self, t: &TensorInfo) -> Result<F32Tensor> {
        let raw = self.raw(t)?;
        let data = dequantize(t.ty, raw, t.numel() as usize)
            .ok_or_else(|| Error::Internal(format!("dequantising {}", t.name)))?;
        Ok(F32Tensor {
            shape: t.shape(),
            data,
        })
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(Value::as_str)
    }

    /// The model configuration the metadata describes (llama architecture).
    pub fn model_config(&self) -> Result<ModelConfig> {
        let arch = self.architecture().unwrap_or("");
        if arch != "llama" {
            return Err(Error::unsupported(
                &self.path,
                "GGUF architecture",
                format!("`{arch}` (supported: llama)"),
            ));
        }
        let k = |s: &str| format!("{arch}.{s}");
        let hidden = self.req_u64(&k("embedding_length"))? as usize;
        let heads = self.req_u64(&k("attention.head_count"))? as usize;
        let kv = self
            .get(&k("attention.head_count_kv"))
            .and_then(Value::as_u64)
            .map_or(heads, |x| x as usize);
        let embd = self
            .tensors
            .iter()
            .find(|t| t.name == "token_embd.weight")
            .ok_or_else(|| Error::format(&self.path, "no tensor `token_embd.weight`"))?;
        let vocab = self
            .get(&k("vocab_size"))
            .and_then(Value::as_u64)
            .map_or(embd.dims[1] as usize, |x| x as usize);
        let head_dim = self
            .get(&k("attention.key_length"))
            .and_then(Value::as_u64)
            .map_or(hidden.checked_div(heads).unwrap_or(0), |x| x as usize);
        let rope_scaling = match self.get(&k("rope.scaling.type")).and_then(Value::as_str) {
            None | Some("none") => RopeScaling::Default,
            Some("linear") => RopeScaling::Linear {
                factor: self
                    .get(&k("rope.scaling.factor"))
                    .and_then(Value::as_f64)
                    .unwrap_or(1.0) as f32,
            },
            Some(other) => {
                return Err(Error::unsupported(
                    &self.path,
                    "rope.scaling.type",
                    format!("`{other}` (supported: none, linear)"),
                ));
            }
        };
        let tied = !self.tensors.iter().any(|t| t.name == "output.weight");
        let cfg = ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: self.req_u64(&k("feed_forward_length"))? as usize,
            num_hidden_layers: self.req_u64(&k("block_count"))? as usize,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: self
                .get(&k("attention.layer_norm_rms_epsilon"))
                .and_then(Value::as_f64)
                .unwrap_or(1e-5),
            rope_theta: self
                .get(&k("rope.freq_base"))
                .and_then(Value::as_f64)
                .unwrap_or(10_000.0) as f32,
            rope_scaling,
            max_position_embeddings: self
                .get(&k("context_length"))
                .and_then(Value::as_u64)
                .unwrap_or(2048) as usize,
            tie_word_embeddings: tied,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            bos_token_id: self
                .get("tokenizer.ggml.bos_token_id")
                .and_then(Value::as_u64)
                .map(|x| x as u32),
            eos_token_id: self
                .get("tokenizer.ggml.eos_token_id")
                .and_then(Value::as_u64)
                .map(|x| x as u32),
            dtype: self.stored_types(),
        };
        cfg.validate(&self.path)?;
        Ok(cfg)
    }

    fn stored_types(&self) -> String {
        let mut s: Vec<String> = self.tensors.iter().map(|t| t.ty.name()).collect();
        s.sort();
        s.dedup();
        s.join("+")
    }

    /// Every tensor dequantised to f32 under its HF name; q and k are un-permuted (llama.cpp's
    /// converter interleaves their rotary halves; transformers' GGUF loader undoes it too).
    pub fn weights(&self, cfg: &ModelConfig) -> Result<Weights> {
        let mut out = Weights {
            stored_dtype: self.stored_types(),
            files: vec![self.path.clone()],
            ..Default::default()
        };
        for t in &self.tensors {
            let hf = hf_name(&t.name).ok_or_else(|| {
                Error::unsupported(
                    &self.path,
                    "tensor",
                    format!("`{}` has no HF counterpart in the llama mapping", t.name),
                )
            })?;
            let mut x = self.dequantize(t)?;
            if hf.ends_with("self_attn.q_proj.weight") {
                x = unpermute(x, cfg.num_attention_heads, &self.path, &t.name)?;
            } else if hf.ends_with("self_attn.k_proj.weight") {
                x = unpermute(x, cfg.num_key_value_heads, &self.path, &t.name)?;
            }
            out.tensors.insert(hf, x);
        }
        Ok(out)
    }

    /// A string array from the metadata.
    pub fn strings(&self, key: &str) -> Option<Vec<&str>> {
        self.get(key)?
            .as_array()?
            .iter()
            .map(Value::as_str)
            .collect()
    }
}

/// GGUF tensor name -> HF name, for the llama architecture.
pub fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, what) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match what {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Undoes llama.cpp's `permute(w, n_head)`: rows `(head, 2, dim/2)` <- `(head, dim/2, 2)`.
fn unpermute(x: F32Tensor, n_head: usize, path: &Path, name: &str) -> Result<F32Tensor> {
    let (rows, cols) = match x.shape[..] {
        [r, c] => (r, c),
        _ => {
            return Err(Error::format(
                path,
                format!("tensor `{name}` should be 2-D, is {:?}", x.shape),
            ));
        }
    };
    if n_head == 0 || rows % (2 * n_head) != 0 {
        return Err(Error::format(
            path,
            format!("tensor `{name}`: {rows} rows do not split into {n_head} heads"),
        ));
    }
    let half = rows / n_head / 2;
    let mut out = vec![0f32; x.data.len()];
    for h in 0..n_head {
        for i in 0..half {
            for two in 0..2 {
                // source row in the permuted layout: (h, i, two); target: (h, two, i)
                let src = (h * half + i) * 2 + two;
                let dst = (h * 2 + two) * half + i;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&x.data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(F32Tensor {
        shape: x.shape,
        data: out,
    })
}

fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Dequantises `n` values of type `ty` from `raw`. None if `ty` is unknown or `raw` is short.
pub fn dequantize(ty: GgmlType, raw: &[u8], n: usize) -> Option<Vec<f32>> {
    let (bs, bb) = ty.block()?;
    if raw.len() < n / bs * bb {
        return None;
    }
    let mut out = Vec::with_capacity(n);
    match ty {
        GgmlType::F32 => out.extend(
            raw[..n * 4]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        GgmlType::F16 => out.extend(raw[..n * 2].chunks_exact(2).map(f16)),
        GgmlType::Bf16 => out.extend(
            raw[..n * 2]
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        GgmlType::Q8_0 => {
            for b in raw[..n / 32 * 34].chunks_exact(34) {
                let d = f16(&b[0..2]);
                out.extend(b[2..34].iter().map(|&q| d * f32::from(q as i8)));
            }
        }
        GgmlType::Q4_0 => {
            for b in raw[..n / 32 * 18].chunks_exact(18) {
                let d = f16(&b[0..2]);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|&q| d * f32::from((q & 0x0F) as i8 - 8)));
                out.extend(qs.iter().map(|&q| d * f32::from((q >> 4) as i8 - 8)));
            }
        }
        GgmlType::Q4_1 => {
            for b in raw[..n / 32 * 20].chunks_exact(20) {
                let (d, m) = (f16(&b[0..2]), f16(&b[2..4]));
                let qs = &b[4..20];
                out.extend(qs.iter().map(|&q| d * f32::from(q & 0x0F) + m));
                out.extend(qs.iter().map(|&q| d * f32::from(q >> 4) + m));
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let with_min = ty == GgmlType::Q5_1;
            for b in raw[..n / 32 * bb].chunks_exact(bb) {
                let d = f16(&b[0..2]);
                let (m, rest) = if with_min {
                    (f16(&b[2..4]), &b[4..])
                } else {
                    (0.0, &b[2..])
                };
                let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let qs = &rest[4..20];
                for hi in 0..2 {
                    for (j, &q) in qs.iter().enumerate() {
                        let lo = if hi == 0 { q & 0x0F } else { q >> 4 };
                        let h = ((qh >> (j + 16 * hi)) & 1) as u8;
                        let v = lo | (h << 4);
                        out.push(if with_min {
                            d * f32::from(v) + m
                        } else {
                            d * f32::from(v as i8 - 16)
                        });
                    }
                }
            }
        }
        GgmlType::Other(_) => return None,
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_block() {
        // d = 0.5, m = -1.0, nibbles 0..15 then 15..0
        let mut b = Vec::new();
        b.extend(half::f16::from_f32(0.5).to_le_bytes());
        b.extend(half::f16::from_f32(-1.0).to_le_bytes());
        for j in 0..16u8 {
            b.push(j | ((15 - j) << 4));
        }
        let v = dequantize(GgmlType::Q4_1, &b, 32).expect("known type");
        assert_eq!(v[0], -1.0);
        assert_eq!(v[15], 0.5 * 15.0 - 1.0);
        assert_eq!(v[16], 0.5 * 15.0 - 1.0);
        assert_eq!(v[31], -1.0);
    }

    #[test]
    fn q4_0_and_q8_0_blocks() {
        let mut b = Vec::new();
        b.extend(half::f16::from_f32(2.0).to_le_bytes());
        // Each byte: low nibble 15 (values 0..16: (15 - 8) x 2), high 0 (16..32: (0 - 8) x 2).
        b.extend(std::iter::repeat_n(0x0Fu8, 16));
        let v = dequantize(GgmlType::Q4_0, &b, 32).expect("known type");
        assert_eq!(v[0], 14.0);
        assert_eq!(v[16], -16.0);
        let mut b = Vec::new();
        b.extend(half::f16::from_f32(0.25).to_le_bytes());
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let v = dequantize(GgmlType::Q8_0, &b, 32).expect("known type");
        assert_eq!(v[0], -4.0);
        assert_eq!(v[31], 15.0 * 0.25);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() -> Result<()> {
        // llama.cpp: w.reshape(h, 2, d/2, c).swapaxes(1, 2)
        let (h, d, c) = (2, 4, 3);
        let orig: Vec<f32> = (0..h * d * c).map(|x| x as f32).collect();
        let mut perm = vec![0f32; orig.len()];
        for hh in 0..h {
            for two in 0..2 {
                for i in 0..d / 2 {
                    let src = (hh * 2 + two) * (d / 2) + i;
                    let dst = (hh * (d / 2) + i) * 2 + two;
                    perm[dst * c..(dst + 1) * c].copy_from_slice(&orig[src * c..(src + 1) * c]);
                }
            }
        }
        let back = unpermute(
            F32Tensor {
                shape: vec![h * d, c],
                data: perm,
            },
            h,
            Path::new("x"),
            "q",
        )?;
        assert_eq!(back.data, orig);
        Ok(())
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let p = Path::new("m.gguf");
        let e = GgufFile::parse(b"GGML\x03\x00\x00\x00".to_vec(), p)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("not a GGUF"), "{e}");
        let e = GgufFile::parse(b"GGUF\x03\x00\x00\x00\x01".to_vec(), p)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("truncated"), "{e}");
        let e = GgufFile::parse(b"GGUF\x09\x00\x00\x00".to_vec(), p)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("version"), "{e}");
    }
}
