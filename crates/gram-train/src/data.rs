//! Training data: the Parquet shards of `gram-data build`, checked against their schema and
//! against the model (tokenizer, label tokens, context length) before any compute is spent,
//! then batched with length bucketing in an order that depends only on (seed, epoch).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::UInt32Type;
use gram_core::LabelIds;
use gram_core::fit::Tokenizer;
use gram_core::schema::Dataset as Schema;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rand::{RngCore, SeedableRng};

use crate::error::{Error, Result};
use crate::settings::Stage;

/// One training example.
#[derive(Debug, Clone)]
pub struct Example {
    /// Token ids: the stage-1 prompt + pair target, or the judge prompt (stage 2), or for `bt`
    /// the chosen response's sequence.
    pub ids: Vec<u32>,
    /// Stage 1: tokens of the masked prompt. Stage 2 and bt: 0.
    pub prompt_len: usize,
    /// Stage 2: the label is B.
    pub label_is_b: bool,
    /// bt: the rejected response's sequence.
    pub other: Vec<u32>,
    /// Raw pair id (both orders share it).
    pub pair_id: String,
    /// Stage 2: A is the raw pair's second response.
    pub swapped: bool,
    /// Source name.
    pub source: String,
}

impl Example {
    /// Padded length this example needs (the longer sequence for bt).
    pub fn len(&self) -> usize {
        self.ids.len().max(self.other.len())
    }

    /// Whether it holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the builder recorded in the shards' metadata.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Meta {
    /// Tokenizer fingerprint.
    pub tokenizer: Option<String>,
    /// Label token ids.
    pub label_ids: Option<LabelIds>,
    /// Token limit of the build.
    pub max_tokens: Option<usize>,
}

/// One split of a dataset, read.
#[derive(Debug, Default)]
pub struct Split {
    /// Examples in file order.
    pub examples: Vec<Example>,
    /// The shards read.
    pub files: Vec<PathBuf>,
    /// Their metadata (identical across shards, checked).
    pub meta: Meta,
}

/// The shards of one split: `DATA/stageN/SPLIT-*.parquet`, in name order.
pub fn shard_files(data: &Path, stage: Stage, split: &str) -> Result<Vec<PathBuf>> {
    let dir = data.join(stage.dataset_dir());
    if !dir.is_dir() {
        let hint = if data.join(gram_core::schema::DATASET_MANIFEST).exists() {
            "this build wrote no such dataset"
        } else {
            "not a `gram-data build` output folder (no manifest.json)"
        };
        return Err(Error::data(&dir, format!("missing: {hint}")));
    }
    gram_core::schema::split_files(&dir, split).map_err(|e| Error::io(&dir, e))
}

fn meta_of(kv: Option<&Vec<parquet::file::metadata::KeyValue>>, path: &Path) -> Result<Meta> {
    let get = |k: &str| {
        kv.and_then(|kv| kv.iter().find(|e| e.key == k))
            .and_then(|e| e.value.clone())
    };
    let label_ids = match get("gram.label_ids") {
        Some(s) => Some(
            serde_json::from_str::<LabelIds>(&s)
                .map_err(|e| Error::data(path, format!("metadata gram.label_ids `{s}`: {e}")))?,
        ),
        None => None,
    };
    let max_tokens = match get("gram.max_tokens") {
        Some(s) => Some(s.parse().map_err(|_| {
            Error::data(
                path,
                format!("metadata gram.max_tokens `{s}` is not a number"),
            )
        })?),
        None => None,
    };
    Ok(Meta {
        tokenizer: get("gram.tokenizer"),
        label_ids,
        max_tokens,
    })
}

fn column<'a>(batch: &'a RecordBatch, name: &str, path: &Path) -> Result<&'a dyn Array> {
    batch
        .column_by_name(name)
        .map(|c| c.as_ref())
        .ok_or_else(|| Error::data(path, format!("column `{name}` is missing")))
}

/// Reads one split. `bt` also needs the texts, to build its own single-response sequences.
pub fn read_split(data: &Path, stage: Stage, split: &str) -> Result<Split> {
    let files = shard_files(data, stage, split)?;
    let schema = if stage == Stage::Pretrain {
        Schema::Stage1
    } else {
        Schema::Stage2
    };
    let mut out = Split {
        files: files.clone(),
        ..Split::default()
    };
    for (i, path) in files.iter().enumerate() {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| Error::data(path, format!("not a readable Parquet file: {e}")))?;
        gram_core::schema::check(builder.schema(), schema, path)?;
        let meta = meta_of(
            builder.metadata().file_metadata().key_value_metadata(),
            path,
        )?;
        if i == 0 {
            out.meta = meta;
        } else if meta != out.meta {
            return Err(Error::data(
                path,
                format!(
                    "metadata differs from {}'s (built by another run?)",
                    files[0].display()
                ),
            ));
        }
        let reader = builder
            .with_batch_size(8192)
            .build()
            .map_err(|e| Error::data(path, e.to_string()))?;
        let mut row0 = 0usize;
        for batch in reader {
            let batch =
                batch.map_err(|e| Error::data(path, format!("reading after row {row0}: {e}")))?;
            read_batch(&batch, stage, path, row0, &mut out.examples)?;
            row0 += batch.num_rows();
        }
    }
    Ok(out)
}

fn read_batch(
    batch: &RecordBatch,
    stage: Stage,
    path: &Path,
    row0: usize,
    out: &mut Vec<Example>,
) -> Result<()> {
    let ids = column(batch, "input_ids", path)?.as_list::<i32>();
    let values = ids.values().as_primitive::<UInt32Type>();
    let pair_id = column(batch, "pair_id", path)?.as_string::<i32>();
    let source = column(batch, "source", path)?.as_string::<i32>();
    let prompt_len = match stage {
        Stage::Pretrain => Some(column(batch, "prompt_len", path)?.as_primitive::<UInt32Type>()),
        _ => None,
    };
    let (label, swapped) = match stage {
        Stage::Pretrain => (None, None),
        _ => (
            Some(column(batch, "label", path)?.as_string::<i32>()),
            Some(column(batch, "swapped", path)?.as_boolean()),
        ),
    };
    for r in 0..batch.num_rows() {
        let row = row0 + r;
        if ids.is_null(r) {
            return Err(Error::data(
                path,
                format!(
                    "row {row}: input_ids is null: the dataset was built without --model, so it holds no tokens"
                ),
            ));
        }
        let (s, e) = (
            ids.value_offsets()[r] as usize,
            ids.value_offsets()[r + 1] as usize,
        );
        let toks = values.values()[s..e].to_vec();
        if toks.is_empty() {
            return Err(Error::data(path, format!("row {row}: input_ids is empty")));
        }
        let plen = match prompt_len {
            Some(p) if p.is_null(r) => {
                return Err(Error::data(path, format!("row {row}: prompt_len is null")));
            }
            Some(p) => p.value(r) as usize,
            None => 0,
        };
        if stage == Stage::Pretrain && plen >= toks.len() {
            return Err(Error::data(
                path,
                format!(
                    "row {row}: prompt_len {plen} leaves no target tokens of {}",
                    toks.len()
                ),
            ));
        }
        let label_is_b = match label.map(|l| l.value(r)) {
            None => false,
            Some("a") => false,
            Some("b") => true,
            Some(other) => {
                return Err(Error::data(
                    path,
                    format!("row {row}: label `{other}` is not a or b"),
                ));
            }
        };
        out.push(Example {
            ids: toks,
            prompt_len: plen,
            label_is_b,
            other: Vec::new(),
            pair_id: pair_id.value(r).to_string(),
            swapped: swapped.is_some_and(|s| s.value(r)),
            source: source.value(r).to_string(),
        });
    }
    Ok(())
}

/// Bradley-Terry pairs from stage-2 rows: one per raw pair (the first of its orders), the chosen
/// and rejected responses each rendered as prompt + response and tokenised by
/// [`Tokenizer::reward`] (texts cut to fit its length limit, as a reward export's scorer cuts
/// them). Returns the pairs and how many sequences were cut.
pub fn bt_pairs(data: &Path, split: &str, enc: &Tokenizer<'_>) -> Result<(Vec<Example>, usize)> {
    let files = shard_files(data, Stage::Bt, split)?;
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut cut = 0usize;
    for path in &files {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| Error::data(path, format!("not a readable Parquet file: {e}")))?;
        gram_core::schema::check(builder.schema(), Schema::Stage2, path)?;
        let reader = builder
            .with_batch_size(8192)
            .build()
            .map_err(|e| Error::data(path, e.to_string()))?;
        let mut row0 = 0usize;
        for batch in reader {
            let batch =
                batch.map_err(|e| Error::data(path, format!("reading after row {row0}: {e}")))?;
            let text =
                |n: &str| -> Result<_> { Ok(column(&batch, n, path)?.as_string::<i32>().clone()) };
            let (prompt, ra, rb, label, pair, source) = (
                text("prompt")?,
                text("response_a")?,
                text("response_b")?,
                text("label")?,
                text("pair_id")?,
                text("source")?,
            );
            for r in 0..batch.num_rows() {
                if !seen.insert(pair.value(r).to_string()) {
                    continue;
                }
                let (chosen, rejected) = match label.value(r) {
                    "a" => (ra.value(r), rb.value(r)),
                    "b" => (rb.value(r), ra.value(r)),
                    other => {
                        return Err(Error::data(
                            path,
                            format!("row {}: label `{other}` is not a or b", row0 + r),
                        ));
                    }
                };
                let mut enc = |resp: &str| -> Result<Vec<u32>> {
                    let t = enc.reward(prompt.value(r), resp)?;
                    cut += usize::from(t.truncated);
                    Ok(t.ids)
                };
                let c = enc(chosen)?;
                let j = enc(rejected)?;
                out.push(Example {
                    ids: c,
                    prompt_len: 0,
                    label_is_b: false,
                    other: j,
                    pair_id: pair.value(r).to_string(),
                    swapped: false,
                    source: source.value(r).to_string(),
                });
            }
            row0 += batch.num_rows();
        }
    }
    Ok((out, cut))
}

/// The generator of epoch `epoch`'s shuffles: ChaCha8 keyed by (seed, epoch), whose stream
/// rand_chacha fixes by contract, so `--resume` replays the same order whatever rand's version.
fn epoch_rng(seed: u64, epoch: usize) -> rand_chacha::ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&(epoch as u64).to_le_bytes());
    rand_chacha::ChaCha8Rng::from_seed(key)
}

/// Fisher-Yates with our own bounded draws (Lemire's multiply-and-reject on 64-bit words):
/// the order depends on the generator's words alone, not on how a rand version samples.
fn shuffle<T>(items: &mut [T], rng: &mut impl RngCore) {
    for i in (1..items.len()).rev() {
        let n = i as u64 + 1;
        let j = loop {
            let m = u128::from(rng.next_u64()) * u128::from(n);
            // Reject the few low words that would favour small values.
            if (m as u64) >= n.wrapping_neg() % n {
                break (m >> 64) as usize;
            }
        };
        items.swap(i, j);
    }
}

/// The batches of one epoch, as indices into the examples: shuffled by (seed, epoch), sorted
/// by length within windows of `window` batches (so a batch pads to similar lengths), and the
/// batches shuffled again so lengths do not trend through the epoch.
pub fn epoch_batches(
    lengths: &[usize],
    batch_size: usize,
    window: usize,
    seed: u64,
    epoch: usize,
) -> Vec<Vec<usize>> {
    let mut rng = epoch_rng(seed, epoch);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    shuffle(&mut order, &mut rng);
    let mut batches = Vec::with_capacity(lengths.len().div_ceil(batch_size));
    for chunk in order.chunks(batch_size * window) {
        let mut chunk = chunk.to_vec();
        chunk.sort_by_key(|&i| lengths[i]);
        batches.extend(chunk.chunks(batch_size).map(<[usize]>::to_vec));
    }
    shuffle(&mut batches, &mut rng);
    batches
}

/// Pair ids in the order [`subset_pairs`] and [`subset_rows`] take them: by a hash of the id
/// (FNV-1a 64, mixed), so every stage and run reading the same dataset picks alike, whatever its seed or
/// row order, and a subset spans every source the split holds.
fn hash_order(rows: &[Example]) -> Vec<&str> {
    // FNV-1a's high bits barely depend on a short id's last bytes (ids `hh-0`..`hh-39` all
    // sorted after other sources' ids), so the hash goes through splitmix64's finaliser.
    let fnv = |s: &str| {
        let h = s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        let h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        let h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^ (h >> 31)
    };
    let mut ids: Vec<(u64, &str)> = rows
        .iter()
        .map(|r| (fnv(&r.pair_id), r.pair_id.as_str()))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids.into_iter().map(|(_, id)| id).collect()
}

/// The rows of the `n` pairs first in hash order; all rows of a pair (both orders) stay
/// together. `n = 0` keeps everything.
pub fn subset_pairs(rows: Vec<Example>, n: usize) -> Vec<Example> {
    if n == 0 {
        return rows;
    }
    let keep: HashSet<String> = hash_order(&rows)
        .into_iter()
        .take(n)
        .map(str::to_string)
        .collect();
    rows.into_iter()
        .filter(|r| keep.contains(&r.pair_id))
        .collect()
}

/// About `max_rows` rows: whole pairs in hash order until the count reaches `max_rows` (the last
/// pair kept whole). `max_rows = 0` keeps everything.
pub fn subset_rows(rows: Vec<Example>, max_rows: usize) -> Vec<Example> {
    if max_rows == 0 || rows.len() <= max_rows {
        return rows;
    }
    let mut per_pair: HashMap<&str, usize> = HashMap::new();
    for r in &rows {
        *per_pair.entry(r.pair_id.as_str()).or_default() += 1;
    }
    let mut keep = HashSet::new();
    let mut taken = 0;
    for id in hash_order(&rows) {
        if taken >= max_rows {
            break;
        }
        taken += per_pair[id];
        keep.insert(id.to_string());
    }
    rows.into_iter()
        .filter(|r| keep.contains(&r.pair_id))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(pair: &str, swapped: bool) -> Example {
        Example {
            ids: vec![1, 2],
            prompt_len: 1,
            label_is_b: swapped,
            other: Vec::new(),
            pair_id: pair.into(),
            swapped,
            source: "s".into(),
        }
    }

    #[test]
    fn pair_subsets_keep_whole_pairs_and_do_not_depend_on_row_order() {
        let rows: Vec<Example> = (0..50)
            .flat_map(|i| [ex(&format!("p{i}"), false), ex(&format!("p{i}"), true)])
            .collect();
        let ids = |v: &[Example]| {
            v.iter()
                .map(|r| r.pair_id.clone())
                .collect::<std::collections::BTreeSet<_>>()
        };
        let a = subset_pairs(rows.clone(), 7);
        assert_eq!(
            (a.len(), ids(&a).len()),
            (14, 7),
            "7 pairs, both orders of each"
        );
        let mut reversed = rows.clone();
        reversed.reverse();
        assert_eq!(ids(&subset_pairs(reversed, 7)), ids(&a));
        assert_eq!(subset_pairs(rows.clone(), 0).len(), 100);
        assert_eq!(subset_pairs(rows, 500).len(), 100);
    }

    #[test]
    fn row_subsets_span_the_split_not_its_head() {
        // Sources in blocks, as gram-data writes them: a head-of-file cut would hold one source.
        let rows: Vec<Example> = ["hh", "llmbar", "pandalm"]
            .iter()
            .flat_map(|s| (0..40).map(move |i| format!("{s}-{i}")))
            .flat_map(|id| [ex(&id, false), ex(&id, true)])
            .collect();
        let sub = subset_rows(rows.clone(), 41);
        assert_eq!(sub.len(), 42, "41 rows rounded up to whole pairs");
        for s in ["hh-", "llmbar-", "pandalm-"] {
            assert!(sub.iter().any(|r| r.pair_id.starts_with(s)), "no {s} rows");
        }
        let ids = |v: &[Example]| v.iter().map(|r| r.pair_id.clone()).collect::<Vec<_>>();
        assert_eq!(
            ids(&sub),
            ids(&subset_pairs(rows.clone(), 21)),
            "the pairs subset_pairs takes"
        );
        assert_eq!(subset_rows(rows.clone(), 0).len(), 240);
        assert_eq!(subset_rows(rows, 1000).len(), 240);
    }

    #[test]
    fn batches_cover_every_row_once_and_depend_on_seed_and_epoch() {
        let lengths: Vec<usize> = (0..103).map(|i| (i * 37) % 50 + 1).collect();
        let b = epoch_batches(&lengths, 8, 4, 7, 0);
        let mut all: Vec<usize> = b.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..103).collect::<Vec<_>>());
        assert_eq!(b, epoch_batches(&lengths, 8, 4, 7, 0));
        assert_ne!(b, epoch_batches(&lengths, 8, 4, 7, 1));
        assert_ne!(b, epoch_batches(&lengths, 8, 4, 8, 0));
        // Bucketing: padding with windows is below padding without.
        let pad = |bs: &[Vec<usize>]| -> usize {
            bs.iter()
                .map(|x| {
                    let m = x.iter().map(|&i| lengths[i]).max().unwrap_or(0);
                    x.iter().map(|&i| m - lengths[i]).sum::<usize>()
                })
                .sum()
        };
        assert!(
            pad(&b) * 2 < pad(&epoch_batches(&lengths, 8, 1, 7, 0)),
            "bucketing should cut padding"
        );
    }

    #[test]
    fn shuffles_are_uniform_and_their_stream_is_pinned() {
        // Every order of 3 items about equally often.
        let mut rng = epoch_rng(1, 0);
        let mut counts = std::collections::HashMap::new();
        for _ in 0..60_000 {
            let mut v = [0u8, 1, 2];
            shuffle(&mut v, &mut rng);
            *counts.entry(v).or_insert(0usize) += 1;
        }
        assert_eq!(counts.len(), 6);
        assert!(
            counts.values().all(|&c| (9_400..10_600).contains(&c)),
            "{counts:?}"
        );
        // The order --resume replays: a change here (of rand_chacha's stream or of this
        // shuffle) would make resumed runs see other batches; it must be deliberate.
        let mut v: Vec<usize> = (0..10).collect();
        shuffle(&mut v, &mut epoch_rng(7, 0));
        assert_eq!(v, PINNED_ORDER);
    }

    const PINNED_ORDER: [usize; 10] = [5, 3, 9, 8, 1, 6, 2, 0, 4, 7];
}
