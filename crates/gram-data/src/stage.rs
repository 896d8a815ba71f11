//! Stage rows: a checked pair as its stage-1 row and stage-2 rows (tokenised when a model is
//! given), and rows as Arrow batches of the stage and rejects schemas.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, ListBuilder, StringBuilder, UInt32Builder, UInt64Builder,
};
use arrow::record_batch::RecordBatch;
use gram_core::fit::{Tokenizer, Tokens};
use gram_core::schema::Dataset;

use crate::build::BuildOptions;
use crate::error::{OrInternal, Result};
use crate::pairs::{Pair, hash64};
use crate::read::Reject;

/// One row of a stage dataset, before it is columnised.
pub(crate) struct StageRow {
    pub(crate) id: String,
    pub(crate) pair_id: String,
    pub(crate) source: String,
    pub(crate) split: &'static str,
    pub(crate) prompt: String,
    pub(crate) a: String,
    pub(crate) b: String,
    pub(crate) label: Option<&'static str>,
    pub(crate) swapped: bool,
    pub(crate) tokens: Option<Tokens>,
    pub(crate) label_token: Option<u32>,
    pub(crate) metadata: Option<String>,
}

/// Stage rows of one dataset as an Arrow batch of its schema.
pub(crate) fn stage_batch(rows: &[&StageRow], dataset: Dataset) -> Result<RecordBatch> {
    let mut c: Vec<StringBuilder> = (0..7).map(|_| StringBuilder::new()).collect();
    let mut label = StringBuilder::new();
    let mut swapped = BooleanBuilder::new();
    let mut ids = ListBuilder::new(UInt32Builder::new());
    let mut plen = UInt32Builder::new();
    let mut ltok = UInt32Builder::new();
    let mut ntok = UInt32Builder::new();
    let mut trunc = BooleanBuilder::new();
    let mut meta = StringBuilder::new();
    for r in rows {
        for (b, v) in c.iter_mut().zip([
            &r.id,
            &r.pair_id,
            &r.source,
            &r.split.to_string(),
            &r.prompt,
            &r.a,
            &r.b,
        ]) {
            b.append_value(v);
        }
        label.append_option(r.label);
        swapped.append_value(r.swapped);
        match &r.tokens {
            Some(t) => {
                ids.values().append_slice(&t.ids);
                ids.append(true);
                plen.append_value(t.prompt_len as u32);
                ntok.append_value(t.ids.len() as u32);
                trunc.append_value(t.truncated);
            }
            None => {
                ids.append(false);
                plen.append_null();
                ntok.append_null();
                trunc.append_null();
            }
        }
        ltok.append_option(r.label_token);
        meta.append_option(r.metadata.as_deref());
    }
    let mut cols: Vec<ArrayRef> = c
        .into_iter()
        .map(|mut b| Arc::new(b.finish()) as ArrayRef)
        .collect();
    match dataset {
        Dataset::Stage1 => {
            cols.push(Arc::new(swapped.finish()));
            cols.push(Arc::new(ids.finish()));
            cols.push(Arc::new(plen.finish()));
        }
        _ => {
            cols.push(Arc::new(label.finish()));
            cols.push(Arc::new(swapped.finish()));
            cols.push(Arc::new(ids.finish()));
            cols.push(Arc::new(ltok.finish()));
        }
    }
    cols.push(Arc::new(ntok.finish()));
    cols.push(Arc::new(trunc.finish()));
    if dataset == Dataset::Stage2 {
        cols.push(Arc::new(meta.finish()));
    }
    RecordBatch::try_new(dataset.schema(), cols).or_internal("building a stage batch")
}

/// Rejects of one source as an Arrow batch of the rejects schema.
pub(crate) fn rejects_batch(source: &str, rejects: &[Reject]) -> Result<RecordBatch> {
    let (mut s, mut f, mut row, mut reason, mut raw) = (
        StringBuilder::new(),
        StringBuilder::new(),
        UInt64Builder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
    );
    for r in rejects {
        s.append_value(source);
        f.append_value(&r.file);
        row.append_value(r.row);
        reason.append_value(&r.reason);
        raw.append_option(r.raw.as_deref());
    }
    RecordBatch::try_new(
        Dataset::Rejects.schema(),
        vec![
            Arc::new(s.finish()),
            Arc::new(f.finish()),
            Arc::new(row.finish()),
            Arc::new(reason.finish()),
            Arc::new(raw.finish()),
        ],
    )
    .or_internal("building a rejects batch")
}

/// Which token ids of a pair: its stage-1 example (in the pair's seeded order), or a stage-2
/// example with the responses as given (`swapped: false`) or exchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Example {
    Stage1,
    Stage2 { swapped: bool },
}

/// The seeded order of a pair's stage-1 example (and of its one stage-2 example with
/// `--one-order`): true when the responses are exchanged.
pub(crate) fn swapped(p: &Pair, opts: &BuildOptions) -> bool {
    hash64(&[&opts.seed.to_le_bytes(), p.id.as_bytes()]) & 1 == 1
}

/// The stage-2 orders a pair with a label is presented in.
pub(crate) fn stage2_orders(p: &Pair, opts: &BuildOptions) -> Vec<bool> {
    if opts.both_orders {
        vec![false, true]
    } else {
        vec![swapped(p, opts)]
    }
}

/// Stage-1 row (every pair, labels dropped, one seeded order) and stage-2 rows (labeled pairs,
/// both orders by default), or why the pair cannot be tokenised within the limits, tokenised
/// here by `tz` (none: text only).
pub(crate) fn stage_rows(
    p: &Pair,
    opts: &BuildOptions,
    tz: Option<&Tokenizer<'_>>,
) -> std::result::Result<(Vec<StageRow>, Vec<StageRow>), String> {
    let labels = tz.map(|t| (t.labels.a, t.labels.b));
    assemble(p, opts, labels, |example, a, b| {
        let Some(t) = tz else { return Ok(None) };
        match example {
            Example::Stage1 => t.stage1(&p.prompt, a, b),
            Example::Stage2 { .. } => t.stage2(&p.prompt, a, b),
        }
        .map(Some)
        .map_err(|e| e.to_string())
    })
}

/// A pair's stage rows from its examples' token ids, wherever those were made: `tokens` gives
/// an example's ids (None: text only) or why it cannot be made; `labels` are the ids of `A`
/// and `B`. The first example that fails (in the order stage 1, stage 2 as given, exchanged)
/// rejects the pair.
pub(crate) fn assemble(
    p: &Pair,
    opts: &BuildOptions,
    labels: Option<(u32, u32)>,
    mut tokens: impl FnMut(Example, &str, &str) -> std::result::Result<Option<Tokens>, String>,
) -> std::result::Result<(Vec<StageRow>, Vec<StageRow>), String> {
    let swap = swapped(p, opts);
    let order = |swapped: bool| {
        if swapped {
            (p.b.clone(), p.a.clone())
        } else {
            (p.a.clone(), p.b.clone())
        }
    };
    let check_len = |t: Option<Tokens>| -> std::result::Result<Option<Tokens>, String> {
        match (opts.drop_over, &t) {
            (Some(limit), Some(x)) if x.full_len > limit => Err(format!(
                "{} tokens before truncation > --drop-over {limit}",
                x.full_len
            )),
            _ => Ok(t),
        }
    };
    let (a1, b1) = order(swap);
    let t1 = check_len(tokens(Example::Stage1, &a1, &b1)?)?;
    let s1 = vec![StageRow {
        id: format!("{}-s1", p.id),
        pair_id: p.id.clone(),
        source: p.source.clone(),
        split: p.split,
        prompt: p.prompt.clone(),
        a: a1,
        b: b1,
        label: None,
        swapped: swap,
        tokens: t1,
        label_token: None,
        metadata: None,
    }];
    let mut s2 = Vec::new();
    if let Some(l) = p.label.filter(|l| *l != "tie") {
        for swapped in stage2_orders(p, opts) {
            let (a, b) = order(swapped);
            // After a swap the preferred response sits in the other slot.
            let label = match (l, swapped) {
                ("a", false) | ("b", true) => "a",
                _ => "b",
            };
            let tokens = check_len(tokens(Example::Stage2 { swapped }, &a, &b)?)?;
            let label_token = match (&tokens, labels) {
                (Some(_), Some((la, lb))) => Some(if label == "a" { la } else { lb }),
                _ => None,
            };
            s2.push(StageRow {
                id: format!("{}-s2{}", p.id, if swapped { "ba" } else { "ab" }),
                pair_id: p.id.clone(),
                source: p.source.clone(),
                split: p.split,
                prompt: p.prompt.clone(),
                a,
                b,
                label: Some(label),
                swapped,
                tokens,
                label_token,
                metadata: p.metadata.clone(),
            });
        }
    }
    Ok((s1, s2))
}
