//! The build's row-wise functions (`gram_split`, `gram_tokens`) as DataFusion functions, run in
//! a plain DataFusion session and on Ballista (a scheduler and an executor in this process):
//! both give, row for row, the splits and token ids `gram-data build` wrote.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, UInt32Type};
use datafusion::prelude::{ParquetReadOptions, SessionContext};

use crate::common::{bin, fixtures, repo_root, scratch};

/// One stage row as the comparison sees it: split, ids, prompt length, truncated.
type Row = (String, Vec<u32>, Option<u32>, bool);

/// `id -> row` from batches with the columns `id, split, ids, prompt_len, truncated`.
fn rows(batches: &[RecordBatch]) -> Result<BTreeMap<String, Row>> {
    let mut out = BTreeMap::new();
    for b in batches {
        // Parquet strings come back as Utf8View, the functions' as Utf8.
        let utf8 = |i: usize| arrow::compute::cast(b.column(i), &DataType::Utf8);
        let (id, split) = (utf8(0)?, utf8(1)?);
        let (id, split) = (id.as_string::<i32>(), split.as_string::<i32>());
        let ids = b.column(2).as_list::<i32>();
        let plen = b.column(3).as_primitive::<UInt32Type>();
        let trunc = b.column(4).as_boolean();
        for i in 0..b.num_rows() {
            ensure!(!ids.is_null(i), "row {} has no ids", id.value(i));
            let v = ids.value(i);
            let v: Vec<u32> = v.as_primitive::<UInt32Type>().values().to_vec();
            let p = (!plen.is_null(i)).then(|| plen.value(i));
            let row = (split.value(i).to_string(), v, p, trunc.value(i));
            ensure!(
                out.insert(id.value(i).to_string(), row).is_none(),
                "duplicate id"
            );
        }
    }
    Ok(out)
}

/// The stage table's rows as written, and as the functions make them again from its texts.
async fn written_and_remade(
    ctx: &SessionContext,
    dir: &Path,
    stage: &str,
    model: &Path,
) -> Result<(BTreeMap<String, Row>, BTreeMap<String, Row>)> {
    let table = format!("{stage}_{}", ctx.session_id().replace('-', "_"));
    ctx.register_parquet(
        &table,
        dir.join(stage).to_str().context("path")?,
        ParquetReadOptions::default(),
    )
    .await?;
    let plen = if stage == "stage1" {
        "prompt_len"
    } else {
        "CAST(NULL AS INT UNSIGNED)"
    };
    let written = ctx
        .sql(&format!(
            "SELECT id, split, input_ids, {plen}, truncated FROM {table}"
        ))
        .await?
        .collect()
        .await?;
    let t = format!(
        "gram_tokens('{stage}', '{}', 'auto', 512, prompt, response_a, response_b)",
        model.display()
    );
    let plen = if stage == "stage1" {
        format!("{t}['prompt_len']")
    } else {
        plen.to_string()
    };
    let remade = ctx
        .sql(&format!(
            "SELECT id, gram_split(prompt, 0.1, 0.12), {t}['ids'], {plen}, {t}['truncated'] \
             FROM {table}"
        ))
        .await?
        .collect()
        .await?;
    Ok((rows(&written)?, rows(&remade)?))
}

/// A gram-data build of LLMBar with the SmolLM2 tokenizer, the functions' reference.
fn build(name: &str) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let out = scratch(name)?.join("data");
    let model = fixtures().join("smollm2");
    let spec = repo_root().join("pipelines/llmbar.toml");
    let o = std::process::Command::new(bin("gram-data")?)
        .args([
            "build",
            &spec.display().to_string(),
            "--model",
            &model.display().to_string(),
        ])
        .args(["--out", &out.display().to_string(), "--max-tokens", "512"])
        .args(["--valid", "0.1", "--test", "0.12", "--quiet"])
        .output()?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Ok((out, model))
}

/// Both stages remade by `ctx` equal the build's rows.
async fn remade_equal(ctx: &SessionContext, out: &Path, model: &Path, what: &str) -> Result<()> {
    for stage in ["stage1", "stage2"] {
        let (written, remade) = written_and_remade(ctx, out, stage, model).await?;
        ensure!(written.len() > 500, "{stage}: only {} rows", written.len());
        ensure!(
            remade == written,
            "{stage}: {what}: rows differ from the build's"
        );
        println!("{stage}: {} rows equal ({what})", written.len());
    }
    Ok(())
}

/// The session hands its queries to a scheduler (they are not run in this process's session).
async fn is_distributed(ctx: &SessionContext) -> Result<()> {
    let plan = ctx
        .sql("SELECT gram_split('a prompt', 0.1, 0.1)")
        .await?
        .create_physical_plan()
        .await?;
    let shown = datafusion::physical_plan::displayable(plan.as_ref())
        .indent(false)
        .to_string();
    ensure!(
        shown.contains("DistributedQueryExec"),
        "not a distributed plan:\n{shown}"
    );
    Ok(())
}

#[test]
fn split_and_tokens_functions_match_the_build_in_process_and_on_ballista() -> Result<()> {
    let (out, model) = build("cluster-udf")?;
    tokio::runtime::Runtime::new()?.block_on(async {
        let local = gram_cluster::with_functions(SessionContext::new());
        remade_equal(&local, &out, &model, "in-process").await?;
        let ballista = gram_cluster::standalone().await?;
        is_distributed(&ballista).await?;
        remade_equal(&ballista, &out, &model, "Ballista standalone").await
    })
}

/// A free TCP port on the loopback interface.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Child processes killed when the test ends, however it ends.
struct Kill(Vec<std::process::Child>);

impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn scheduler_and_executor_binaries_run_the_functions() -> Result<()> {
    let (out, model) = build("cluster-bins")?;
    let logs = out.parent().context("scratch")?;
    let spawn = |name: &str, args: &[String]| -> Result<std::process::Child> {
        let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
        Ok(std::process::Command::new(bin(name)?)
            .args(args)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?)
    };
    let sched = free_port()?;
    let mut procs = Kill(vec![spawn(
        "gram-scheduler",
        &[format!("--bind=127.0.0.1:{sched}")],
    )?]);
    let ports = (free_port()?, free_port()?);
    procs.0.push(spawn(
        "gram-executor",
        &[
            format!("--scheduler=127.0.0.1:{sched}"),
            "--bind-host=127.0.0.1".into(),
            "--external-host=127.0.0.1".into(),
            format!("--port={}", ports.0),
            format!("--grpc-port={}", ports.1),
            "--task-slots=2".into(),
        ],
    )?);
    tokio::runtime::Runtime::new()?.block_on(async {
        // The scheduler needs a moment to listen, the executor to register.
        let url = format!("df://127.0.0.1:{sched}");
        let mut ctx = None;
        for _ in 0..100 {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            if let Ok(c) = gram_cluster::remote(&url).await
                && c.sql("SELECT gram_split('x', 0.1, 0.1)")
                    .await?
                    .collect()
                    .await
                    .is_ok()
            {
                ctx = Some(c);
                break;
            }
        }
        let ctx = ctx.context("no answer from gram-scheduler and gram-executor in 20 s")?;
        is_distributed(&ctx).await?;
        remade_equal(&ctx, &out, &model, "gram-scheduler + gram-executor").await
    })?;
    drop(procs);
    let log = std::fs::read_to_string(logs.join("gram-executor.log"))?;
    ensure!(
        log.contains("Executor"),
        "the executor logged nothing:\n{log}"
    );
    Ok(())
}
