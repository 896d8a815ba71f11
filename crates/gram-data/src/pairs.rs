//! From a mapped raw pair to a checked one: required fields, the label's domain, empty or
//! identical responses, duplicates ([`crate::dedup`]), a stable id, and the split by a hash of
//! the prompt.

use std::collections::HashMap;
use std::path::Path;

use crate::build::BuildOptions;
use crate::error::{OrInternal, Result};
use crate::map::{MappedPair, Mapper};
use crate::read::{Chunk, Reject};
use crate::spec::Spec;

/// Whitespace-normalised text (what dedup and the split compare).
pub(crate) fn norm(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The first 64 bits of a blake3 hash of length-prefixed parts.
pub(crate) fn hash64(parts: &[&[u8]]) -> u64 {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    let b = h.finalize();
    let mut x = [0u8; 8];
    x.copy_from_slice(&b.as_bytes()[..8]);
    u64::from_le_bytes(x)
}

/// The split of a prompt: a hash of its normalised text, so a prompt never crosses splits and the
/// split does not depend on the seed or the order of the input.
pub fn split_of(prompt: &str, valid: f64, test: f64) -> &'static str {
    let u = (hash64(&[norm(prompt).as_bytes()]) >> 11) as f64 / (1u64 << 53) as f64;
    if u < test {
        "test"
    } else if u < test + valid {
        "valid"
    } else {
        "train"
    }
}

/// A checked pair, ready for the stages.
pub(crate) struct Pair {
    /// Input file and row it came from (for rejects).
    pub(crate) file: String,
    pub(crate) row: u64,
    pub(crate) id: String,
    pub(crate) source: String,
    pub(crate) split: &'static str,
    pub(crate) prompt: String,
    pub(crate) a: String,
    pub(crate) b: String,
    pub(crate) label: Option<&'static str>,
    /// The raw pair's metadata (JSON), carried into stage 2.
    pub(crate) metadata: Option<String>,
    /// The label as the mapping gave it (for a duplicate's reject).
    pub(crate) raw_label: Option<String>,
    /// What makes two pairs duplicates: a hash of the normalised prompt and responses (the
    /// responses in either order).
    pub(crate) key: u128,
}

impl Pair {
    /// The reject of this pair as a duplicate of the one `first` names ([`crate::dedup::seen_at`]).
    pub(crate) fn duplicate(&self, first: &str) -> Reject {
        Reject {
            file: self.file.clone(),
            row: self.row,
            reason: format!("duplicate of pair {first}"),
            raw: Some(raw_json(
                Some(&self.prompt),
                Some(&self.a),
                Some(&self.b),
                self.raw_label.as_deref(),
            )),
        }
    }
}

/// A mapped pair as its reject's `raw` column holds it.
fn raw_json(prompt: Option<&str>, a: Option<&str>, b: Option<&str>, label: Option<&str>) -> String {
    serde_json::json!({"prompt": prompt, "response_a": a, "response_b": b, "label": label})
        .to_string()
}

/// A mapped pair checked: its fields present, its label in the domain, its responses non-empty
/// and distinct; with its id, split and duplicate key (whether it was seen before is the
/// caller's check: [`crate::dedup::Seen`], or the `--cluster` plan). Otherwise the reject, with
/// its reason.
pub(crate) fn check_pair(
    m: MappedPair,
    idx: u32,
    spec: &Spec,
    opts: &BuildOptions,
) -> std::result::Result<Pair, Reject> {
    let rej = |reason: String, m: &MappedPair| Reject {
        file: m.file.clone(),
        row: m.row,
        reason,
        raw: Some(raw_json(
            m.prompt.as_deref(),
            m.response_a.as_deref(),
            m.response_b.as_deref(),
            m.label.as_deref(),
        )),
    };
    if let Some(r) = &m.reject {
        return Err(rej(r.clone(), &m));
    }
    let (Some(prompt), Some(a), Some(b)) = (&m.prompt, &m.response_a, &m.response_b) else {
        let which = if m.prompt.is_none() {
            "prompt"
        } else if m.response_a.is_none() {
            "response_a"
        } else {
            "response_b"
        };
        return Err(rej(format!("{which} is missing"), &m));
    };
    for (name, text) in [("prompt", prompt), ("response_a", a), ("response_b", b)] {
        if text.len() > opts.max_text_bytes {
            return Err(rej(
                format!(
                    "{name} is {} bytes, over --max-text-bytes {}",
                    text.len(),
                    opts.max_text_bytes
                ),
                &m,
            ));
        }
    }
    let label = match m.label.as_deref().map(str::trim) {
        None => None,
        Some("a" | "A") => Some("a"),
        Some("b" | "B") => Some("b"),
        Some("tie" | "TIE" | "Tie") => Some("tie"),
        Some(other) => return Err(rej(format!("label `{other}` is not one of a, b, tie"), &m)),
    };
    let (na, nb) = (norm(a), norm(b));
    if norm(prompt).is_empty() {
        return Err(rej("prompt is empty".into(), &m));
    }
    if na.is_empty() || nb.is_empty() {
        return Err(rej(
            format!(
                "{} is empty",
                if na.is_empty() {
                    "response_a"
                } else {
                    "response_b"
                }
            ),
            &m,
        ));
    }
    if na == nb {
        return Err(rej("responses are identical".into(), &m));
    }
    let id = m.id.clone().unwrap_or_else(|| {
        // The file as seen from the spec's folder: stable across machines, distinct for files of
        // the same name in different folders (LLMBar's subsets are all `dataset.json`).
        let base = spec.path.parent().unwrap_or(Path::new("."));
        let file = Path::new(&m.file)
            .strip_prefix(base)
            .unwrap_or(Path::new(&m.file))
            .to_string_lossy()
            .into_owned();
        format!(
            "{:016x}",
            hash64(&[
                spec.name.as_bytes(),
                file.as_bytes(),
                &m.row.to_le_bytes(),
                &idx.to_le_bytes()
            ])
        )
    });
    let (lo, hi) = if na <= nb { (&na, &nb) } else { (&nb, &na) };
    let key = blake3::hash([norm(prompt).as_str(), lo, hi].join("\u{0}").as_bytes());
    let mut k = [0u8; 16];
    k.copy_from_slice(&key.as_bytes()[..16]);
    Ok(Pair {
        file: m.file.clone(),
        row: m.row,
        id,
        source: spec.name.clone(),
        split: split_of(prompt, opts.valid_frac, opts.test_frac),
        prompt: prompt.clone(),
        a: a.clone(),
        b: b.clone(),
        label,
        metadata: m.metadata.clone(),
        raw_label: m.label.clone(),
        key: u128::from_le_bytes(k),
    })
}

/// One chunk of a source file, mapped and checked: what a build without `--cluster` and a plan's
/// read tasks ([`crate::scan`]) both make of it.
pub(crate) struct Checked {
    /// Input rows in the chunk (read or not).
    pub(crate) rows_read: u64,
    /// Rows that became no pair: unreadable, or mapped to none.
    pub(crate) row_rejects: Vec<Reject>,
    /// Every pair the mapping produced, in its order: checked, or its reject.
    pub(crate) pairs: Vec<std::result::Result<Pair, Reject>>,
}

/// Maps and checks one chunk of `file` (whether a pair was seen before is the caller's check).
pub(crate) fn check_chunk(
    spec: &Spec,
    file: &Path,
    mapper: &Mapper,
    chunk: Chunk,
    opts: &BuildOptions,
) -> Result<Checked> {
    let rows_read = (chunk.batch.num_rows() + chunk.rejects.len()) as u64;
    let Mapped { pairs, rejects } = map_chunk(mapper, file, chunk)?;
    Ok(Checked {
        rows_read,
        row_rejects: rejects,
        pairs: pairs
            .into_iter()
            .map(|(m, idx)| check_pair(m, idx, spec, opts))
            .collect(),
    })
}

/// The rows of one chunk after mapping: each pair with its index within its input row, and the
/// rejects so far (unreadable rows, and rows the mapping turned into no pair).
struct Mapped {
    pairs: Vec<(MappedPair, u32)>,
    rejects: Vec<Reject>,
}

/// Maps a chunk of `file`. Rows the mapping turned into no pair are rejected, never dropped.
fn map_chunk(mapper: &Mapper, file: &Path, chunk: Chunk) -> Result<Mapped> {
    use arrow::array::{Array, AsArray};
    let mut rejects = chunk.rejects;
    let b = &chunk.batch;
    let files = b
        .column_by_name("_file")
        .or_internal("a source chunk without `_file`")?
        .as_string::<i32>()
        .clone();
    let rows = b
        .column_by_name("_row")
        .or_internal("a source chunk without `_row`")?
        .as_primitive::<arrow::datatypes::UInt64Type>()
        .clone();
    let mapped = mapper.map(chunk.batch, file)?;
    // Each pair's index within its input row (part of its id); the keys are the rows that
    // produced pairs.
    let mut per_row: HashMap<(String, u64), u32> = HashMap::new();
    let pairs = mapped
        .into_iter()
        .map(|m| {
            let k = per_row.entry((m.file.clone(), m.row)).or_default();
            *k += 1;
            let idx = *k - 1;
            (m, idx)
        })
        .collect();
    for i in 0..files.len() {
        let (f, r) = (files.value(i).to_string(), rows.value(i));
        if !per_row.contains_key(&(f.clone(), r)) {
            rejects.push(Reject {
                file: f,
                row: r,
                reason: "the pipeline's mapping produced no pair for this row".into(),
                raw: None,
            });
        }
    }
    Ok(Mapped { pairs, rejects })
}
