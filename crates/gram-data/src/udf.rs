//! The row-wise work of a build as DataFusion scalar functions, so that a plan holding them runs
//! the same in-process or on a Ballista cluster (whose scheduler and executors register
//! [`functions`]):
//!
//! - `gram_split(prompt, valid, test)`: the prompt's split (`train`, `valid` or `test`), as
//!   [`crate::build::split_of`];
//! - `gram_tokens(stage, model, chat, max_tokens, prompt, a, b)`: the stage-1 or stage-2 ids of a
//!   pair, as `gram-data build` writes them: a struct of `ids`, `prompt_len`, `n_tokens`,
//!   `truncated`, `full_len` and `error` (the reason a pair cannot be tokenised; the other fields
//!   are then null, so the row becomes a reject rather than vanishing).
//!
//! Every setting is an argument (a literal), not state captured at registration: a plan
//! serialised to an executor names the function and carries its arguments, and the executor
//! loads the model's tokenizer on first use (once per process and setting).

use std::collections::HashMap;
use std::hash::Hash;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanBuilder, ListBuilder, StringBuilder, StructArray,
    UInt32Builder,
};
use arrow::datatypes::{DataType, Field, Fields};
use datafusion::common::{DataFusionError, Result as DfResult, ScalarValue, exec_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use gram_core::fit::{Tokenizer, Tokens};
use gram_core::{GramTokenizer, PromptStyle, Templates};

use crate::build::split_of;

/// The functions a build's plan uses; a scheduler and every executor register all of them.
pub fn functions() -> Vec<Arc<ScalarUDF>> {
    vec![
        Arc::new(ScalarUDF::from(SplitUdf::new())),
        Arc::new(ScalarUDF::from(TokensUdf::new())),
    ]
}

/// A scalar argument of a call as the given type, or a planning error naming the function.
fn literal<'a>(name: &str, args: &'a [ColumnarValue], i: usize) -> DfResult<&'a ScalarValue> {
    match args.get(i) {
        Some(ColumnarValue::Scalar(s)) => Ok(s),
        _ => exec_err!("{name}: argument {} must be a literal", i + 1),
    }
}

fn literal_str(name: &str, args: &[ColumnarValue], i: usize) -> DfResult<String> {
    match literal(name, args, i)? {
        ScalarValue::Utf8(Some(s)) | ScalarValue::LargeUtf8(Some(s)) => Ok(s.clone()),
        s => exec_err!("{name}: argument {} must be a string, not {s}", i + 1),
    }
}

fn literal_f64(name: &str, args: &[ColumnarValue], i: usize) -> DfResult<f64> {
    match literal(name, args, i)? {
        ScalarValue::Float64(Some(x)) => Ok(*x),
        s => exec_err!("{name}: argument {} must be a number, not {s}", i + 1),
    }
}

/// The `i`th argument as a string array of `rows` rows (a literal is repeated).
fn strings(args: &[ColumnarValue], i: usize, rows: usize) -> DfResult<ArrayRef> {
    let a = args[i].to_array(rows)?;
    Ok(arrow::compute::cast(&a, &DataType::Utf8)?)
}

/// `gram_split(prompt, valid, test)`.
#[derive(Debug, PartialEq, Eq, Hash)]
struct SplitUdf {
    signature: Signature,
}

impl SplitUdf {
    fn new() -> Self {
        Self {
            signature: Signature::exact(
                vec![DataType::Utf8, DataType::Float64, DataType::Float64],
                Volatility::Immutable,
            ),
        }
    }
}

impl ScalarUDFImpl for SplitUdf {
    fn name(&self) -> &str {
        "gram_split"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Utf8)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let (valid, test) = (
            literal_f64(self.name(), &args.args, 1)?,
            literal_f64(self.name(), &args.args, 2)?,
        );
        let prompts = strings(&args.args, 0, args.number_rows)?;
        let prompts = prompts.as_string::<i32>();
        let mut out = StringBuilder::with_capacity(prompts.len(), prompts.len() * 5);
        for p in prompts.iter() {
            out.append_option(p.map(|p| split_of(p, valid, test)));
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

/// Which rows `gram_tokens` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Stage {
    One,
    Two,
}

/// A tokenizer setting: model path, prompt style (None: the model's own), longest example.
type Setting = (String, Option<bool>, usize);

/// The tokenizers loaded in this process, one per setting, for the process's lifetime (an
/// executor serves a handful of models).
fn tokenizer(setting: &Setting) -> DfResult<&'static Tokenizer<'static>> {
    static LOADED: OnceLock<Mutex<HashMap<Setting, &'static Tokenizer<'static>>>> = OnceLock::new();
    let mut loaded = LOADED
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| DataFusionError::Internal("gram_tokens: a poisoned lock".into()))?;
    if let Some(t) = loaded.get(setting) {
        return Ok(t);
    }
    let (model, chat, max_tokens) = setting;
    let fail = |e: gram_core::Error| {
        gram_session::task_error(format!(
            "gram_tokens: loading the tokenizer of {model}: {e}"
        ))
    };
    let tok: &'static GramTokenizer = Box::leak(Box::new(
        GramTokenizer::from_path(Path::new(model)).map_err(fail)?,
    ));
    let t: &'static Tokenizer<'static> =
        Box::leak(Box::new(fitting(tok, *chat, *max_tokens).map_err(fail)?));
    loaded.insert(setting.clone(), t);
    Ok(t)
}

/// The fitting tokenizer over `tok`: templates in the given style (None: the chat template
/// when the tokenizer has one) and the token budget. One place for `gram-data build` and
/// `gram_tokens`.
pub(crate) fn fitting(
    tok: &GramTokenizer,
    chat: Option<bool>,
    max_tokens: usize,
) -> gram_core::Result<Tokenizer<'_>> {
    let templates = match chat {
        Some(true) => Templates::new(tok, PromptStyle::Chat)?,
        Some(false) => Templates::new(tok, PromptStyle::Raw)?,
        None => Templates::auto(tok),
    };
    Tokenizer::new(tok, templates, max_tokens)
}

/// `gram_tokens(stage, model, chat, max_tokens, prompt, a, b)`.
#[derive(Debug, PartialEq, Eq, Hash)]
struct TokensUdf {
    signature: Signature,
}

impl TokensUdf {
    fn new() -> Self {
        let s = DataType::Utf8;
        Self {
            signature: Signature::exact(
                vec![
                    s.clone(),
                    s.clone(),
                    s.clone(),
                    DataType::Int64,
                    s.clone(),
                    s.clone(),
                    s,
                ],
                Volatility::Immutable,
            ),
        }
    }

    /// The struct the function returns.
    fn fields() -> Fields {
        let u32f = |n: &str| Field::new(n, DataType::UInt32, true);
        Fields::from(vec![
            Field::new(
                "ids",
                DataType::List(Arc::new(Field::new("item", DataType::UInt32, true))),
                true,
            ),
            u32f("prompt_len"),
            u32f("n_tokens"),
            Field::new("truncated", DataType::Boolean, true),
            u32f("full_len"),
            Field::new("error", DataType::Utf8, true),
        ])
    }

    fn setting(&self, args: &[ColumnarValue]) -> DfResult<(Stage, Setting)> {
        let name = self.name();
        let stage = match literal_str(name, args, 0)?.as_str() {
            "stage1" => Stage::One,
            "stage2" => Stage::Two,
            s => return exec_err!("{name}: stage must be 'stage1' or 'stage2', not '{s}'"),
        };
        let chat = match literal_str(name, args, 2)?.as_str() {
            "auto" => None,
            "chat" => Some(true),
            "raw" => Some(false),
            s => return exec_err!("{name}: chat must be 'auto', 'chat' or 'raw', not '{s}'"),
        };
        let max_tokens = match literal(name, args, 3)? {
            ScalarValue::Int64(Some(n)) if *n > 0 => *n as usize,
            s => return exec_err!("{name}: max_tokens must be a positive integer, not {s}"),
        };
        Ok((stage, (literal_str(name, args, 1)?, chat, max_tokens)))
    }
}

/// The columns of `gram_tokens`'s struct while they are filled.
#[derive(Default)]
struct TokenColumns {
    ids: ListBuilder<UInt32Builder>,
    prompt_len: UInt32Builder,
    n_tokens: UInt32Builder,
    truncated: BooleanBuilder,
    full_len: UInt32Builder,
    error: StringBuilder,
}

impl TokenColumns {
    fn push(&mut self, r: Result<Tokens, String>) {
        match r {
            Ok(t) => {
                self.ids.values().append_slice(&t.ids);
                self.ids.append(true);
                self.prompt_len.append_value(t.prompt_len as u32);
                self.n_tokens.append_value(t.ids.len() as u32);
                self.truncated.append_value(t.truncated);
                self.full_len.append_value(t.full_len as u32);
                self.error.append_null();
            }
            Err(e) => {
                self.ids.append(false);
                self.prompt_len.append_null();
                self.n_tokens.append_null();
                self.truncated.append_null();
                self.full_len.append_null();
                self.error.append_value(e);
            }
        }
    }

    fn finish(mut self) -> DfResult<ArrayRef> {
        let cols: Vec<ArrayRef> = vec![
            Arc::new(self.ids.finish()),
            Arc::new(self.prompt_len.finish()),
            Arc::new(self.n_tokens.finish()),
            Arc::new(self.truncated.finish()),
            Arc::new(self.full_len.finish()),
            Arc::new(self.error.finish()),
        ];
        Ok(Arc::new(StructArray::try_new(
            TokensUdf::fields(),
            cols,
            None,
        )?))
    }
}

impl ScalarUDFImpl for TokensUdf {
    fn name(&self) -> &str {
        "gram_tokens"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Struct(Self::fields()))
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        use rayon::prelude::*;
        let (stage, setting) = self.setting(&args.args)?;
        let t = tokenizer(&setting)?;
        let rows = args.number_rows;
        let cols: Vec<ArrayRef> = (4..7)
            .map(|i| strings(&args.args, i, rows))
            .collect::<DfResult<_>>()?;
        let [x, a, b] = [0, 1, 2].map(|i| cols[i].as_string::<i32>());
        let made: Vec<Result<Tokens, String>> = (0..rows)
            .into_par_iter()
            .map(|i| {
                if x.is_null(i) || a.is_null(i) || b.is_null(i) {
                    return Err("a null prompt or response".to_string());
                }
                let (x, a, b) = (x.value(i), a.value(i), b.value(i));
                match stage {
                    Stage::One => t.stage1(x, a, b),
                    Stage::Two => t.stage2(x, a, b),
                }
                .map_err(|e| e.to_string())
            })
            .collect();
        let mut out = TokenColumns::default();
        for r in made {
            out.push(r);
        }
        Ok(ColumnarValue::Array(out.finish()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;

    fn ctx() -> SessionContext {
        let ctx = SessionContext::new();
        for f in functions() {
            ctx.register_udf((*f).clone());
        }
        ctx
    }

    async fn one(ctx: &SessionContext, sql: &str) -> DfResult<arrow::record_batch::RecordBatch> {
        let b = ctx.sql(sql).await?.collect().await?;
        Ok(arrow::compute::concat_batches(&b[0].schema(), &b)?)
    }

    fn df(e: impl std::fmt::Display) -> DataFusionError {
        DataFusionError::Execution(e.to_string())
    }

    fn smollm2() -> String {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/fixtures/smollm2")
            .display()
            .to_string()
    }

    #[tokio::test]
    async fn split_is_split_of_and_nulls_stay_null() -> DfResult<()> {
        let ctx = ctx();
        let prompts = ["What is 2+2?", "  what is 2+2? ", "Tell me a story", "x"];
        let values: Vec<String> = prompts.iter().map(|p| format!("('{p}')")).collect();
        let b = one(
            &ctx,
            &format!(
                "SELECT gram_split(p, 0.3, 0.3) FROM (VALUES {}, (NULL)) AS t(p)",
                values.join(", ")
            ),
        )
        .await?;
        let got = b.column(0).as_string::<i32>();
        for (i, p) in prompts.iter().enumerate() {
            assert_eq!(got.value(i), split_of(p, 0.3, 0.3), "{p}");
        }
        assert!(got.is_null(prompts.len()));
        Ok(())
    }

    #[tokio::test]
    async fn tokens_are_the_fitting_tokenizers_and_failures_are_rows() -> DfResult<()> {
        let ctx = ctx();
        let m = smollm2();
        let sql = |stage: &str, max: usize| {
            format!(
                "SELECT gram_tokens('{stage}', '{m}', 'auto', {max}, x, a, b) AS t \
                 FROM (VALUES ('Which is larger?', 'Two', 'Three'), ('Hi', NULL, 'b')) AS v(x, a, b)"
            )
        };
        let tok = GramTokenizer::from_path(Path::new(&m)).map_err(df)?;
        let t = fitting(&tok, None, 256).map_err(df)?;
        for stage in ["stage1", "stage2"] {
            let b = one(&ctx, &sql(stage, 256)).await?;
            let s = b.column(0).as_struct();
            let ids = s.column_by_name("ids").expect("ids").as_list::<i32>();
            let want = match stage {
                "stage1" => t.stage1("Which is larger?", "Two", "Three"),
                _ => t.stage2("Which is larger?", "Two", "Three"),
            }
            .map_err(df)?;
            let got: Vec<u32> = ids
                .value(0)
                .as_primitive::<arrow::datatypes::UInt32Type>()
                .values()
                .to_vec();
            assert_eq!(got, want.ids, "{stage}");
            let err = s.column_by_name("error").expect("error").as_string::<i32>();
            assert!(err.is_null(0));
            assert!(ids.is_null(1), "{stage}: a null response gives no ids");
            assert_eq!(err.value(1), "a null prompt or response");
        }
        // Bad settings are errors naming the function and the argument.
        for (bad, what) in [
            (sql("stage3", 256), "stage must be"),
            (sql("stage1", 0), "max_tokens must be"),
            (
                sql("stage1", 256).replace(&m, "/no/such/model"),
                "loading the tokenizer of /no/such/model",
            ),
        ] {
            let e = match ctx.sql(&bad).await {
                Ok(df) => df
                    .collect()
                    .await
                    .expect_err("a bad setting must fail")
                    .to_string(),
                Err(e) => e.to_string(),
            };
            assert!(e.contains("gram_tokens") && e.contains(what), "{e}");
        }
        Ok(())
    }
}
