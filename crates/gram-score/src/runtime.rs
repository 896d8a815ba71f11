//! onnxruntime through `ort`: the process-wide environment (the shared library is loaded from
//! `ORT_DYLIB_PATH`, with a clear error instead of ort's panic when it is missing) and a pool of
//! sessions, since `Session::run` takes `&mut self`: each worker borrows one.

use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, OnceLock};

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::Tensor;

use crate::error::{Error, Result};

/// Where the onnxruntime library is: `ORT_DYLIB_PATH`, else the copy `scripts/setup.sh` puts in
/// the cache.
pub fn library_path() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("ORT_DYLIB_PATH")
        && !p.is_empty()
    {
        let p = PathBuf::from(p);
        return if p.exists() {
            Ok(p)
        } else {
            Err(Error::Runtime(format!(
                "ORT_DYLIB_PATH={} does not exist",
                p.display()
            )))
        };
    }
    let cache = std::env::var_os("GRAM_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/gram-rs")));
    if let Some(c) = cache {
        let p = c.join("onnxruntime-1.31.1/libonnxruntime.so.1.31.1");
        if p.exists() {
            return Ok(p);
        }
    }
    Err(Error::Runtime(
        "onnxruntime library not found: set ORT_DYLIB_PATH to libonnxruntime.so (scripts/setup.sh installs 1.31.1 into ~/.cache/gram-rs)".into(),
    ))
}

fn environment() -> Result<&'static ort::environment::Environment> {
    static ENV: OnceLock<std::result::Result<ort::environment::Environment, String>> =
        OnceLock::new();
    ENV.get_or_init(|| {
        let path = library_path().map_err(|e| e.to_string())?;
        ort::init_from(&path)
            .map_err(|e| format!("loading onnxruntime from {}: {e}", path.display()))?
            .with_name("gram-score")
            .build()
            .map_err(|e| format!("starting onnxruntime: {e}"))
    })
    .as_ref()
    .map_err(|e| Error::Runtime(e.clone()))
}

/// How sessions use the cores.
#[derive(Debug, Clone, Copy)]
pub struct Threads {
    /// Sessions in the pool (batches run in parallel, one per session).
    pub sessions: usize,
    /// Threads inside each session.
    pub intra: usize,
}

impl Threads {
    /// `sessions` sessions sharing `cores` cores.
    pub fn split(sessions: usize, cores: usize) -> Self {
        let sessions = sessions.max(1);
        Self {
            sessions,
            intra: (cores / sessions).max(1),
        }
    }
}

/// Opens one session on `model` with all graph optimisations. For looking inside a run:
/// `GRAM_ORT_PROFILE=<prefix>` writes onnxruntime's per-operator profile (`<prefix>_<time>.json`,
/// one per session, when it closes) and `GRAM_ORT_OPTIMIZED=<file.onnx>` the graph as
/// onnxruntime optimised it.
pub fn open_session(model: &Path, intra_threads: usize) -> Result<Session> {
    let env = environment()?;
    let err = |e: String| Error::Runtime(format!("{}: {e}", model.display()));
    let mut b = Session::builder(env)
        .map_err(|e| err(e.to_string()))?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(|e| err(e.to_string()))?;
    if let Ok(p) = std::env::var("GRAM_ORT_PROFILE") {
        b = b.with_profiling(p).map_err(|e| err(e.to_string()))?;
    }
    if let Ok(p) = std::env::var("GRAM_ORT_OPTIMIZED") {
        b = b
            .with_optimized_model_path(p)
            .map_err(|e| err(e.to_string()))?;
    }
    b.with_intra_threads(intra_threads)
        .map_err(|e| err(e.to_string()))?
        // Failures come back as errors and are reported once, in one line; onnxruntime's own
        // log would print them a second time.
        .with_log_level(ort::logging::LogLevel::Fatal)
        .map_err(|e| err(e.to_string()))?
        .commit_from_file(model)
        .map_err(|e| err(e.to_string()))
}

/// Sessions on one model, lent out one at a time per caller.
pub struct SessionPool {
    free: Mutex<Vec<Session>>,
    ready: Condvar,
    size: usize,
}

impl SessionPool {
    /// Opens `threads.sessions` sessions.
    pub fn open(model: &Path, threads: Threads) -> Result<Self> {
        let sessions = (0..threads.sessions)
            .map(|_| open_session(model, threads.intra))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            size: sessions.len(),
            free: Mutex::new(sessions),
            ready: Condvar::new(),
        })
    }

    /// Number of sessions.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Runs `f` with a free session (waits for one).
    pub fn with<T>(&self, f: impl FnOnce(&mut Session) -> T) -> T {
        let mut s = {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(s) = free.pop() {
                    break s;
                }
                free = self.ready.wait(free).unwrap_or_else(|p| p.into_inner());
            }
        };
        let out = f(&mut s);
        self.free.lock().unwrap_or_else(|p| p.into_inner()).push(s);
        self.ready.notify_one();
        out
    }
}

/// Where the two orders of a pair part: the tokens both share from the start (their longest
/// common prefix, leaving each order at least its last token).
pub fn shared_len(ab: &[u32], ba: &[u32]) -> usize {
    let common = ab.iter().zip(ba).take_while(|(x, y)| x == y).count();
    common
        .min(ab.len().saturating_sub(1))
        .min(ba.len().saturating_sub(1))
}

/// A batch for a pair graph (`gram-export`'s default judge graph): each pair's shared tokens
/// once (`shared_ids`/`shared_mask` `[pairs, shared width]`) and each order's remaining tokens
/// (`input_ids`/`attention_mask` `[2 x pairs, width]`, rows 2k and 2k+1 continuing pair k), all
/// left-padded.
pub struct PairBatch {
    /// The shared parts.
    pub shared: Batch,
    /// The two continuations of each pair, in order.
    pub rest: Batch,
}

impl PairBatch {
    /// Splits each pair `(ab, ba)` at [`shared_len`] and pads both parts on the left to their
    /// longest.
    pub fn new(pairs: &[(&[u32], &[u32])], pad: u32) -> Self {
        Self::padded_to(pairs, pad, [0, 0])
    }

    /// As [`PairBatch::new`], padding the shared parts to at least `widths[0]` and the
    /// continuations to at least `widths[1]`.
    pub fn padded_to(pairs: &[(&[u32], &[u32])], pad: u32, widths: [usize; 2]) -> Self {
        let mut shared = Vec::with_capacity(pairs.len());
        let mut rest = Vec::with_capacity(2 * pairs.len());
        for &(ab, ba) in pairs {
            let n = shared_len(ab, ba);
            shared.push(&ab[..n]);
            rest.push(&ab[n..]);
            rest.push(&ba[n..]);
        }
        Self {
            shared: Batch::left_padded_to(&shared, pad, widths[0]),
            rest: Batch::left_padded_to(&rest, pad, widths[1]),
        }
    }

    /// Runs the batch and returns the named float output with its shape.
    pub fn run(self, session: &mut Session, output: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let mut inputs = self.shared.named("shared_ids", "shared_mask");
        inputs.extend(self.rest.named("input_ids", "attention_mask"));
        take(&mut run_named(session, inputs)?, output)
    }
}

/// Every float output of a run, by name, with its shape.
pub type Outputs = std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>;

/// An int64 `[rows, width]` graph input: name, rows, width, data.
type NamedInput = (&'static str, usize, usize, Vec<i64>);

/// Runs `session` on the inputs given by name and returns its float outputs.
fn run_named(session: &mut Session, inputs: Vec<NamedInput>) -> Result<Outputs> {
    let inputs = inputs
        .into_iter()
        .map(|(name, rows, width, data)| {
            Tensor::from_array(([rows, width], data))
                .map(|t| (name, t))
                .map_err(|e| Error::Runtime(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let out = session
        .run(inputs)
        .map_err(|e| Error::Runtime(format!("onnxruntime: {e}")))?;
    let mut all = Outputs::new();
    for (name, value) in out.iter() {
        let (shape, data) = value
            .try_extract_tensor::<f32>()
            .map_err(|e| Error::Runtime(e.to_string()))?;
        all.insert(
            name.to_string(),
            (shape.iter().map(|&d| d as usize).collect(), data.to_vec()),
        );
    }
    Ok(all)
}

/// The named output of a run.
fn take(outputs: &mut Outputs, output: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    outputs
        .remove(output)
        .ok_or_else(|| Error::Runtime(format!("the graph has no output `{output}`")))
}

/// A left-padded batch: `[rows, width]` ids and mask.
pub struct Batch {
    /// Rows.
    pub rows: usize,
    /// Sequence length (the longest row, or the width asked for).
    pub width: usize,
    /// Token ids, row-major.
    pub ids: Vec<i64>,
    /// 1 on real tokens.
    pub mask: Vec<i64>,
}

impl Batch {
    /// Pads every sequence on the left to the longest.
    pub fn left_padded(seqs: &[&[u32]], pad: u32) -> Self {
        Self::left_padded_to(seqs, pad, 0)
    }

    /// Pads every sequence on the left to `width`, or to the longest where that is longer.
    pub fn left_padded_to(seqs: &[&[u32]], pad: u32, width: usize) -> Self {
        let width = seqs.iter().map(|s| s.len()).fold(width, usize::max).max(1);
        let rows = seqs.len();
        let mut ids = vec![i64::from(pad); rows * width];
        let mut mask = vec![0i64; rows * width];
        for (r, s) in seqs.iter().enumerate() {
            let off = r * width + width - s.len();
            for (j, &t) in s.iter().enumerate() {
                ids[off + j] = i64::from(t);
                mask[off + j] = 1;
            }
        }
        Self {
            rows,
            width,
            ids,
            mask,
        }
    }

    /// Runs the batch and returns every float output by name, with its shape.
    pub fn run_all(self, session: &mut Session) -> Result<Outputs> {
        run_named(session, self.named("input_ids", "attention_mask"))
    }

    /// The ids and the mask as graph inputs of the given names.
    fn named(self, ids: &'static str, mask: &'static str) -> Vec<NamedInput> {
        vec![
            (ids, self.rows, self.width, self.ids),
            (mask, self.rows, self.width, self.mask),
        ]
    }

    /// Runs the batch and returns the named float output with its shape.
    pub fn run(self, session: &mut Session, output: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        take(&mut self.run_all(session)?, output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_part_after_their_common_tokens_and_keep_a_token_each() {
        assert_eq!(shared_len(&[1, 2, 3, 4], &[1, 2, 5, 6, 7]), 2);
        // Identical orders (equal responses): each keeps its last token.
        assert_eq!(shared_len(&[1, 2, 3], &[1, 2, 3]), 2);
        assert_eq!(shared_len(&[1, 2], &[1, 2, 3]), 1);
        assert_eq!(shared_len(&[7], &[8, 9]), 0);
        let b = PairBatch::new(
            &[
                (&[1, 2, 3, 4][..], &[1, 2, 5][..]),
                (&[9, 8][..], &[9, 7][..]),
            ],
            0,
        );
        assert_eq!((b.shared.rows, b.shared.width), (2, 2));
        assert_eq!(b.shared.ids, vec![1, 2, 0, 9]);
        assert_eq!(b.shared.mask, vec![1, 1, 0, 1]);
        assert_eq!((b.rest.rows, b.rest.width), (4, 2));
        assert_eq!(b.rest.ids, vec![3, 4, 0, 5, 0, 8, 0, 7]);
        assert_eq!(b.rest.mask, vec![1, 1, 0, 1, 0, 1, 0, 1]);
    }
}
