//! Checkpoint tensors in f32, by HF name: read from safetensors (one file or shards listed in
//! `model.safetensors.index.json`; f32, f16 and bf16 are widened to f32) or from a GGUF
//! (see [`crate::gguf`]). The burn model maps HF names onto its modules with one table.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result, read_file};

/// One tensor, widened to f32, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct F32Tensor {
    /// Shape, outermost first (PyTorch order).
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

impl F32Tensor {
    /// Number of elements the shape implies.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// A 2-D tensor transposed: `[rows, cols]` row-major -> `[cols, rows]` (PyTorch's linear
    /// layout `[out, in]` to burn's and ONNX MatMul's `[in, out]`, and back).
    pub fn transposed(&self) -> F32Tensor {
        let (rows, cols) = (self.shape[0], self.shape[1]);
        let mut data = vec![0f32; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                data[c * rows + r] = self.data[r * cols + c];
            }
        }
        F32Tensor {
            shape: vec![cols, rows],
            data,
        }
    }
}

/// A checkpoint's tensors by HF name, with where they came from.
#[derive(Debug, Default)]
pub struct Weights {
    /// Tensors by HF name (`model.layers.0.self_attn.q_proj.weight`, ...).
    pub tensors: BTreeMap<String, F32Tensor>,
    /// The dtype(s) stored in the files, for display (`"bf16"`, `"Q4_1+Q8_0+F32"`, ...).
    pub stored_dtype: String,
    /// The files read.
    pub files: Vec<PathBuf>,
}

impl Weights {
    /// Total number of values.
    pub fn num_values(&self) -> usize {
        self.tensors.values().map(F32Tensor::numel).sum()
    }

    /// Reads every `*.safetensors` a model folder holds: `model.safetensors`, or the shards named by
    /// `model.safetensors.index.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files = if index.exists() {
            shard_files(&index)?
        } else if single.exists() {
            vec![single]
        } else {
            return Err(Error::format(
                dir,
                "no model.safetensors or model.safetensors.index.json in this folder",
            ));
        };
        let mut out = Weights::default();
        let mut dtypes = std::collections::BTreeSet::new();
        for f in &files {
            let bytes = crate::error::map_file(f)?;
            read_safetensors_into(&bytes, f, &mut out.tensors, &mut dtypes)?;
        }
        out.stored_dtype = dtypes.into_iter().collect::<Vec<_>>().join("+");
        out.files = files;
        Ok(out)
    }

    /// Reads one safetensors file.
    pub fn from_safetensors_file(path: &Path) -> Result<Self> {
        let bytes = crate::error::map_file(path)?;
        let mut out = Weights::default();
        let mut dtypes = std::collections::BTreeSet::new();
        read_safetensors_into(&bytes, path, &mut out.tensors, &mut dtypes)?;
        out.stored_dtype = dtypes.into_iter().collect::<Vec<_>>().join("+");
        out.files = vec![path.to_path_buf()];
        Ok(out)
    }
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let bytes = read_file(index)?;
    let v: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::format(index, format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::format(index, "no `weight_map` object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::format(index, format!("weight_map[`{name}`] is not a file name"))
        })?;
        if file.contains('/') || file.contains("..") {
            return Err(Error::format(
                index,
                format!("weight_map[`{name}`] = `{file}` leaves the folder"),
            ));
        }
        let p = dir.join(file);
        if !files.contains(&p) {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(Error::format(index, "`weight_map` is empty"));
    }
    Ok(files)
}

fn read_safetensors_into(
    bytes: &[u8],
    path: &Path,
    out: &mut BTreeMap<String, F32Tensor>,
    dtypes: &mut std::collections::BTreeSet<String>,
) -> Result<()> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let data = view.data();
        let numel: usize = shape.iter().product();
        let values = match view.dtype() {
            Dtype::F32 => {
                dtypes.insert("f32".into());
                data.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect::<Vec<_>>()
            }
            Dtype::F16 => {
                dtypes.insert("f16".into());
                data.chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect()
            }
            Dtype::BF16 => {
                dtypes.insert("bf16".into());
                data.chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect()
            }
            // Integer tensors (e.g. buffers) are not model weights we read.
            other => {
                return Err(Error::unsupported(
                    path,
                    "tensor dtype",
                    format!("tensor `{name}` is {other:?} (supported: F32, F16, BF16)"),
                ));
            }
        };
        if values.len() != numel {
            return Err(Error::format(
                path,
                format!(
                    "tensor `{name}` holds {} values, shape says {numel}",
                    values.len()
                ),
            ));
        }
        if out.contains_key(&name) {
            return Err(Error::format(
                path,
                format!("tensor `{name}` appears in two files"),
            ));
        }
        out.insert(
            name,
            F32Tensor {
                shape,
                data: values,
            },
        );
    }
    Ok(())
}

/// How tensors are stored in a written safetensors file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreDtype {
    /// As they are.
    F32,
    /// Rounded to bfloat16 (half the size; what adapters are shipped as).
    Bf16,
}

/// Writes tensors as one f32 safetensors file, atomically (temp file + rename).
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, F32Tensor>,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    write_safetensors_as(path, tensors, metadata, StoreDtype::F32)
}

/// Writes tensors as one safetensors file in `dtype`, atomically (temp file + rename).
pub fn write_safetensors_as(
    path: &Path,
    tensors: &BTreeMap<String, F32Tensor>,
    metadata: Option<std::collections::HashMap<String, String>>,
    dtype: StoreDtype,
) -> Result<()> {
    let encode = |x: &f32| -> Vec<u8> {
        match dtype {
            StoreDtype::F32 => x.to_le_bytes().to_vec(),
            StoreDtype::Bf16 => half::bf16::from_f32(*x).to_le_bytes().to_vec(),
        }
    };
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                t.data.iter().flat_map(encode).collect(),
                t.shape.clone(),
            )
        })
        .collect();
    let st_dtype = match dtype {
        StoreDtype::F32 => Dtype::F32,
        StoreDtype::Bf16 => Dtype::BF16,
    };
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, b, s)| {
            safetensors::tensor::TensorView::new(st_dtype, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Internal(format!("tensor {n}: {e}")))
        })
        .collect::<Result<_>>()?;
    let out = safetensors::tensor::serialize(views, metadata)
        .map_err(|e| Error::Internal(format!("serialising {}: {e}", path.display())))?;
    crate::atomic_write(path, &out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_a_format_error() {
        let dir = std::env::temp_dir().join(format!("gram-weights-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        let p = dir.join("model.safetensors");
        std::fs::write(&p, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......").ok();
        let e = Weights::from_hf_dir(&dir)
            .expect_err("a broken header is refused")
            .to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("not a valid safetensors"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn roundtrip_f32() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("gram-weights-rt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let p = dir.join("model.safetensors");
        let mut m = BTreeMap::new();
        m.insert(
            "a".to_string(),
            F32Tensor {
                shape: vec![2, 3],
                data: vec![1., 2., 3., 4., 5., 6.],
            },
        );
        write_safetensors(&p, &m, None)?;
        let w = Weights::from_hf_dir(&dir)?;
        assert_eq!(w.tensors, m);
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }
}
