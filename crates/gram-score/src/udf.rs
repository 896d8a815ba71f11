//! Scoring as a DataFusion scalar function, so that a plan holding it runs the same in this
//! process or on a Ballista cluster (whose executors register [`functions`]):
//!
//! `gram_judge(model, batch_rows, batch_tokens, prompt, a, b)`: the both-order score of each
//! pair by the judge exported at `model` (a folder every executor reads), as a struct of
//! `score_a`, `p_ab`, `p_ba` (see [`PairScore`]), `truncated` and `error` (why a pair could not
//! be encoded; the scores are then null). Each process opens a judge once per model and batch
//! setting, with one onnxruntime session per core.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanBuilder, Float32Builder, StringBuilder, StructArray,
};
use arrow::datatypes::{DataType, Field, Fields};
use datafusion::common::{DataFusionError, Result as DfResult, ScalarValue, exec_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

use crate::judge::{BatchLimits, Judge, PairScore};
use crate::runtime::Threads;

/// The functions scoring plans use; a scheduler and every executor register them.
pub fn functions() -> Vec<Arc<ScalarUDF>> {
    vec![Arc::new(ScalarUDF::from(JudgeUdf::new()))]
}

/// What scoring plans add to a session: [`functions`], and the leaf of a `--cluster` job's
/// chunks ([`crate::cluster`]).
pub fn extensions() -> gram_session::Extensions {
    use gram_session::work::WorkNode;
    gram_session::Extensions {
        functions: functions(),
        nodes: vec![Arc::new(WorkNode(Arc::new(crate::cluster::ChunkWork)))],
    }
}

/// A judge setting: model folder, most rows and most tokens per batch.
type Setting = (String, usize, usize);

/// The judges opened in this process, one per setting, for the process's lifetime.
pub(crate) fn judge(setting: &Setting) -> DfResult<&'static Judge> {
    static OPEN: OnceLock<Mutex<HashMap<Setting, &'static Judge>>> = OnceLock::new();
    let mut open = OPEN
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| DataFusionError::Internal("gram_judge: a poisoned lock".into()))?;
    if let Some(j) = open.get(setting) {
        return Ok(j);
    }
    let (model, max_rows, max_tokens) = setting;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let limits = BatchLimits {
        max_rows: *max_rows,
        max_tokens: *max_tokens,
    };
    let j = Judge::open(
        std::path::Path::new(model),
        Threads::split(cores, cores),
        limits,
    )
    .map_err(|e| gram_session::task_error(format!("gram_judge: opening {model}: {e}")))?;
    let j: &'static Judge = Box::leak(Box::new(j));
    open.insert(setting.clone(), j);
    Ok(j)
}

/// `gram_judge(model, batch_rows, batch_tokens, prompt, a, b)`.
#[derive(Debug, PartialEq, Eq, Hash)]
struct JudgeUdf {
    signature: Signature,
}

impl JudgeUdf {
    fn new() -> Self {
        let s = DataType::Utf8;
        let n = DataType::Int64;
        Self {
            signature: Signature::exact(
                vec![s.clone(), n.clone(), n, s.clone(), s.clone(), s],
                Volatility::Immutable,
            ),
        }
    }

    /// The struct the function returns.
    pub(crate) fn fields() -> Fields {
        let f = |n: &str| Field::new(n, DataType::Float32, true);
        Fields::from(vec![
            f("score_a"),
            f("p_ab"),
            f("p_ba"),
            Field::new("truncated", DataType::Boolean, true),
            Field::new("error", DataType::Utf8, true),
        ])
    }

    fn setting(&self, args: &[ColumnarValue]) -> DfResult<Setting> {
        let name = self.name();
        let positive = |i: usize| match args.get(i) {
            Some(ColumnarValue::Scalar(ScalarValue::Int64(Some(n)))) if *n > 0 => Ok(*n as usize),
            _ => exec_err!(
                "{name}: argument {} must be a positive integer literal",
                i + 1
            ),
        };
        let model = match args.first() {
            Some(ColumnarValue::Scalar(
                ScalarValue::Utf8(Some(s)) | ScalarValue::LargeUtf8(Some(s)),
            )) => s.clone(),
            _ => return exec_err!("{name}: argument 1 must be the model folder, a string literal"),
        };
        Ok((model, positive(1)?, positive(2)?))
    }
}

/// The columns of `gram_judge`'s struct while they are filled.
#[derive(Default)]
struct ScoreColumns {
    score_a: Float32Builder,
    p_ab: Float32Builder,
    p_ba: Float32Builder,
    truncated: BooleanBuilder,
    error: StringBuilder,
}

impl ScoreColumns {
    fn push(&mut self, r: Result<PairScore, String>) {
        match r {
            Ok(s) => {
                self.score_a.append_value(s.score_a);
                self.p_ab.append_value(s.p_ab);
                self.p_ba.append_value(s.p_ba);
                self.truncated.append_value(s.truncated);
                self.error.append_null();
            }
            Err(e) => {
                self.score_a.append_null();
                self.p_ab.append_null();
                self.p_ba.append_null();
                self.truncated.append_null();
                self.error.append_value(e);
            }
        }
    }

    fn finish(mut self) -> DfResult<ArrayRef> {
        let cols: Vec<ArrayRef> = vec![
            Arc::new(self.score_a.finish()),
            Arc::new(self.p_ab.finish()),
            Arc::new(self.p_ba.finish()),
            Arc::new(self.truncated.finish()),
            Arc::new(self.error.finish()),
        ];
        Ok(Arc::new(StructArray::try_new(
            JudgeUdf::fields(),
            cols,
            None,
        )?))
    }
}

impl ScalarUDFImpl for JudgeUdf {
    fn name(&self) -> &str {
        "gram_judge"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Struct(Self::fields()))
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let j = judge(&self.setting(&args.args)?)?;
        let rows = args.number_rows;
        let cols: Vec<ArrayRef> = (3..6)
            .map(|i| {
                let a = args.args[i].to_array(rows)?;
                Ok(arrow::compute::cast(&a, &DataType::Utf8)?)
            })
            .collect::<DfResult<_>>()?;
        let [x, a, b] = [0, 1, 2].map(|i| cols[i].as_string::<i32>());
        // Rows with a null text get their reason; the others are scored together.
        let mut out: Vec<Option<Result<PairScore, String>>> = vec![None; rows];
        let mut pairs = Vec::with_capacity(rows);
        let mut at = Vec::with_capacity(rows);
        for (i, slot) in out.iter_mut().enumerate() {
            if x.is_valid(i) && a.is_valid(i) && b.is_valid(i) {
                pairs.push((x.value(i), a.value(i), b.value(i)));
                at.push(i);
            } else {
                *slot = Some(Err("a null prompt or response".to_string()));
            }
        }
        let scores = j
            .score_pairs(&pairs)
            .map_err(|e| DataFusionError::Execution(format!("gram_judge: {e}")))?;
        for (i, s) in at.into_iter().zip(scores) {
            out[i] = Some(s);
        }
        let mut cols = ScoreColumns::default();
        for r in out {
            cols.push(r.unwrap_or_else(|| Err("not scored".to_string())));
        }
        Ok(ColumnarValue::Array(cols.finish()?))
    }
}
