//! The build's row-wise functions (`gram_split`, `gram_tokens`) as DataFusion functions, run in
//! a plain DataFusion session and on Ballista (a scheduler and an executor in this process):
//! both give, row for row, the splits and token ids `gram-data build` wrote. And
//! `gram-data build --cluster` (`local`, `standalone`, and `df://` with the scheduler and
//! executor binaries) writes the same datasets, rejects and stats as a build without it, with
//! every stage shard written by a task of the plan.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, UInt32Type};
use datafusion::prelude::{ParquetReadOptions, SessionContext};

use crate::common::{bin, fixtures, repo_root, run_ok, scratch};

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
        let local = gram_cluster::connect(&gram_cluster::Target::Local).await?;
        remade_equal(&local, &out, &model, "in-process").await?;
        let ballista = gram_cluster::connect(&gram_cluster::Target::Standalone).await?;
        is_distributed(&ballista).await?;
        remade_equal(&ballista, &out, &model, "Ballista standalone").await
    })
}

/// Runs `gram-data build` on `pipelines` into `out` with `extra` arguments.
pub(crate) fn gram_data_build(pipelines: &[&str], out: &Path, extra: &[&str]) -> Result<()> {
    gram_data_build_env(pipelines, out, extra, &[])
}

/// [`gram_data_build`] with `env` set for gram-data.
pub(crate) fn gram_data_build_env(
    pipelines: &[&str],
    out: &Path,
    extra: &[&str],
    env: &[(&str, String)],
) -> Result<()> {
    let root = repo_root();
    let model = fixtures().join("smollm2");
    let mut cmd = std::process::Command::new(bin("gram-data")?);
    cmd.arg("build")
        .args(pipelines.iter().map(|p| root.join("pipelines").join(p)))
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(out)
        .args(extra)
        .arg("--quiet")
        .envs(env.iter().map(|(k, v)| (k, v)));
    run_ok(&mut cmd, &format!("gram-data build {extra:?}"))?;
    Ok(())
}

/// Every row of a build's folder as text, whole: stage rows by (folder, file's split prefix,
/// id); rejects sorted; the stats without their time.
pub(crate) type Built = (BTreeMap<String, String>, Vec<String>, serde_json::Value);

pub(crate) fn built(dir: &Path) -> Result<Built> {
    use arrow::util::display::{ArrayFormatter, FormatOptions};
    let read = |path: &Path| -> Result<Vec<RecordBatch>> {
        let f = std::fs::File::open(path)?;
        let r =
            parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)?.build()?;
        Ok(r.collect::<std::result::Result<_, _>>()?)
    };
    let line = |b: &RecordBatch, i: usize| -> Result<String> {
        let mut cells = Vec::new();
        for (f, c) in b.schema().fields().iter().zip(b.columns()) {
            let fmt = ArrayFormatter::try_new(c.as_ref(), &FormatOptions::default())?;
            cells.push(format!("{}={}", f.name(), fmt.value(i)));
        }
        Ok(cells.join(" | "))
    };
    let mut rows = BTreeMap::new();
    for stage in ["stage1", "stage2"] {
        for e in std::fs::read_dir(dir.join(stage))? {
            let path = e?.path();
            let name = path.file_name().and_then(|n| n.to_str()).context("name")?;
            ensure!(
                name.ends_with(".parquet"),
                "{stage}/{name}: not a whole shard"
            );
            let split = name.split('-').next().context("shard name")?.to_string();
            for b in read(&path)? {
                let ids = b.column_by_name("id").context("id")?.as_string::<i32>();
                for i in 0..b.num_rows() {
                    let key = format!("{stage}/{split}/{}", ids.value(i));
                    ensure!(
                        rows.insert(key.clone(), line(&b, i)?).is_none(),
                        "{key} twice"
                    );
                }
            }
        }
    }
    let mut rejects = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let path = e?.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("rejects"))
        {
            for b in read(&path)? {
                for i in 0..b.num_rows() {
                    rejects.push(line(&b, i)?);
                }
            }
        }
    }
    rejects.sort();
    let mut stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("stats.json"))?)?;
    for timing in ["seconds", "plan_seconds"] {
        stats.as_object_mut().context("stats")?.remove(timing);
    }
    ensure!(
        !dir.join(".pairs").exists(),
        "the staged pairs were left in {}",
        dir.display()
    );
    listed_in_manifest(dir)?;
    Ok((rows, rejects, stats))
}

/// The manifest of the build in `dir` names exactly its data files.
fn listed_in_manifest(dir: &Path) -> Result<()> {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json"))?)?;
    let listed: Vec<String> = serde_json::from_value(manifest["files"].clone())?;
    let mut present = Vec::new();
    for sub in ["", "stage1/", "stage2/"] {
        let Ok(entries) = std::fs::read_dir(dir.join(sub)) else {
            continue;
        };
        for e in entries {
            let e = e?;
            if e.path().is_file() {
                present.push(format!("{sub}{}", e.file_name().to_string_lossy()));
            }
        }
    }
    present.retain(|f| f.ends_with(".parquet"));
    present.sort();
    ensure!(
        listed == present,
        "{}: the manifest names {listed:?}, the folder holds {present:?}",
        dir.display()
    );
    Ok(())
}

/// Every stage shard of the build in `dir` was written by a task of its plan (named after
/// its partition, `{split}-pHHHH-NNNNN.parquet`), none by the client; the partitions seen.
pub(crate) fn written_by_tasks(dir: &Path) -> Result<usize> {
    let mut n = 0;
    let mut partitions = std::collections::BTreeSet::new();
    for stage in ["stage1", "stage2"] {
        for e in std::fs::read_dir(dir.join(stage))? {
            let name = e?.file_name().to_string_lossy().to_string();
            let partition = name.split('-').nth(1).unwrap_or_default().to_string();
            ensure!(
                partition.starts_with('p'),
                "{stage}/{name} was not written by a task of the plan"
            );
            partitions.insert(partition);
            n += 1;
        }
    }
    ensure!(n > 0, "no shard in {}", dir.display());
    Ok(partitions.len())
}

/// `b` equals the reference build `a`, row for row.
pub(crate) fn same_build(a: &Built, b: &Built, what: &str) -> Result<()> {
    ensure!(
        a.0.len() == b.0.len(),
        "{what}: {} stage rows, reference {}",
        b.0.len(),
        a.0.len()
    );
    for (k, v) in &a.0 {
        let other = b.0.get(k).with_context(|| format!("{what}: no row {k}"))?;
        ensure!(other == v, "{what}: row {k} differs:\n  {v}\n  {other}");
    }
    ensure!(
        a.1 == b.1,
        "{what}: rejects differ ({} vs {} rows)",
        a.1.len(),
        b.1.len()
    );
    ensure!(a.2 == b.2, "{what}: stats differ:\n  {}\n  {}", a.2, b.2);
    println!(
        "{what}: {} stage rows, {} rejects equal to the build without --cluster",
        a.0.len(),
        a.1.len()
    );
    Ok(())
}

#[test]
fn cluster_builds_of_the_three_real_sets_equal_the_plain_build() -> Result<()> {
    let dir = scratch("cluster-build")?;
    let sets = ["hh-rlhf-harmless.toml", "pandalm.toml", "llmbar.toml"];
    // Truncation and --drop-over rejects both happen at these limits.
    let limits = [
        "--max-tokens",
        "512",
        "--drop-over",
        "700",
        "--chunk-rows",
        "1000",
    ];
    gram_data_build(&sets, &dir.join("plain"), &limits)?;
    let reference = built(&dir.join("plain"))?;
    let s = &reference.2;
    ensure!(s["lossless"] == true, "{s}");
    ensure!(
        reference.1.iter().any(|r| r.contains("--drop-over")),
        "no --drop-over reject: the test does not reach the plan's rejects"
    );
    ensure!(
        reference.0.values().any(|r| r.contains("truncated=true")),
        "no truncated row"
    );
    // Standalone in 3 tasks (after the repartition by dedup key).
    for (target, partitions) in [("local", None), ("standalone", Some("3"))] {
        let out = dir.join(target);
        let mut args = [&limits[..], &["--cluster", target]].concat();
        args.extend(partitions.iter().flat_map(|p| ["--partitions", p]));
        gram_data_build(&sets, &out, &args)?;
        same_build(&reference, &built(&out)?, &format!("--cluster {target}"))?;
        let written = written_by_tasks(&out)?;
        if let Some(p) = partitions {
            ensure!(
                written.to_string() == p,
                "{written} partitions wrote, not {p}"
            );
        }
    }
    // The other settings the plan carries: one seeded order per pair, plain prompts, a seed.
    let other = ["--one-order", "--raw", "--seed", "7", "--max-tokens", "512"];
    gram_data_build(&["llmbar.toml"], &dir.join("one-order"), &other)?;
    let on_plan = dir.join("one-order-local");
    gram_data_build(
        &["llmbar.toml"],
        &on_plan,
        &[&other[..], &["--cluster", "local"]].concat(),
    )?;
    same_build(
        &built(&dir.join("one-order"))?,
        &built(&on_plan)?,
        "--one-order --raw --cluster local",
    )?;
    // Text only (no model): the plan only carries the pairs through.
    for (name, cluster) in [("text", None), ("text-local", Some("local"))] {
        let o = std::process::Command::new(bin("gram-data")?)
            .arg("build")
            .arg(repo_root().join("pipelines/llmbar.toml"))
            .arg("--out")
            .arg(dir.join(name))
            .arg("--quiet")
            .args(cluster.map(|c| ["--cluster", c]).into_iter().flatten())
            .output()?;
        ensure!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    same_build(
        &built(&dir.join("text"))?,
        &built(&dir.join("text-local"))?,
        "text only, --cluster local",
    )?;
    Ok(())
}

/// `gram-data build SPEC --out OUT` without a model (text only) and with `extra` arguments.
fn build_text_only(spec: &Path, out: &Path, extra: &[&str]) -> Result<()> {
    let mut cmd = std::process::Command::new(bin("gram-data")?);
    cmd.arg("build")
        .arg(spec)
        .arg("--out")
        .arg(out)
        .arg("--quiet")
        .args(extra);
    run_ok(&mut cmd, &format!("gram-data build {extra:?}")).map(|_| ())
}

/// Rows rejected at every step before the plan's dedup (unreadable, mapped to no pair, failing
/// the checks) and a duplicate across two files: the same rejects and counts from the plan's
/// read tasks as from the build without `--cluster`; an unreadable file stops the job with one
/// line that names it, and leaves no dataset.
#[test]
fn the_plan_reads_maps_and_checks_the_inputs_as_the_plain_build() -> Result<()> {
    let dir = scratch("cluster-rejects")?;
    let good = r#"{"prompt": "p1", "chosen": "yes", "rejected": "no"}"#;
    let a = [
        good,
        r#"{"prompt": "p2", "chosen": "yes", "rejected": "no""#,
        r#"{"prompt": "p3", "chosen": "yes"}"#,
        r#"{"prompt": "p4", "chosen": 7, "rejected": "no"}"#,
        r#"{"prompt": "p5", "chosen": "same", "rejected": "same"}"#,
        r#"{"prompt": "skip", "chosen": "yes", "rejected": "no"}"#,
    ];
    let mut first = a.join("\n").into_bytes();
    first.extend_from_slice(
        b"\n{\"prompt\": \"p7\", \"chosen\": \"caf\xe9\", \"rejected\": \"no\"}\n",
    );
    std::fs::write(dir.join("a.jsonl"), first)?;
    let b = [
        r#"{"prompt": "p8", "chosen": "yes", "rejected": "no"}"#,
        good,
    ];
    std::fs::write(dir.join("b.jsonl"), b.join("\n") + "\n")?;
    let columns = r#"{ prompt = "utf8", chosen = "utf8", rejected = "utf8" }"#;
    let sql = "SELECT _file, _row, prompt, chosen AS response_a, rejected AS response_b, 'a' AS label \
               FROM source WHERE prompt <> 'skip'";
    let spec = dir.join("spec.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"bad\"\n[source]\nformat = \"jsonl\"\nfiles = [\"*.jsonl\"]\ncolumns = {columns}\n[map]\nsql = \"{sql}\"\n"
        ),
    )?;
    let build = |out: &str, extra: &[&str]| build_text_only(&spec, &dir.join(out), extra);
    build("plain", &[])?;
    let cluster = ["--cluster", "standalone", "--partitions", "2"];
    build("standalone", &cluster)?;
    let reference = built(&dir.join("plain"))?;
    for reason in [
        "malformed JSON",
        "column `rejected` is missing",
        "expected a string, got a number",
        "responses are identical",
        "mapping produced no pair",
        "not UTF-8",
        "duplicate of pair at",
    ] {
        ensure!(
            reference.1.iter().any(|r| r.contains(reason)),
            "no reject `{reason}` in the reference: {:?}",
            reference.1
        );
    }
    same_build(
        &reference,
        &built(&dir.join("standalone"))?,
        "rejects, --cluster standalone",
    )?;

    // A truncated gzip file: the task that reads it fails the job.
    let gz = dir.join("c.jsonl.gz");
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut z, format!("{good}\n").repeat(2000).as_bytes())?;
    let z = z.finish()?;
    std::fs::write(&gz, &z[..z.len() / 2])?;
    for target in ["standalone", "local"] {
        let mut cmd = std::process::Command::new(bin("gram-data")?);
        cmd.arg("build")
            .arg(&spec)
            .arg("--input")
            .arg(&gz)
            .arg("--out")
            .arg(dir.join("broken"))
            .args(["--cluster", target]);
        let says = format!(
            "--cluster {target}: {}: unreadable after line",
            gz.display()
        );
        crate::common::refused_in_one_line(&mut cmd, &says)?;
    }
    ensure!(
        !dir.join("broken").exists(),
        "a failed build left its output"
    );
    Ok(())
}

/// A JSON Lines file larger than `--split-mib` is read by several tasks, cut at line starts:
/// the same rows, line numbers in rejects, duplicates across the cuts and stats as the build
/// without `--cluster`.
#[test]
fn a_large_json_lines_file_is_read_in_ranges_as_one_file() -> Result<()> {
    let dir = scratch("cluster-ranges")?;
    let mut text = String::new();
    let filler = "x".repeat(400);
    for i in 0..6000 {
        let line = match i % 997 {
            13 => "{\"prompt\": \"broken\"".to_string(),
            500 => String::new(),
            // The same pair again, in another range.
            700 => r#"{"prompt": "p-1", "chosen": "yes", "rejected": "no"}"#.to_string(),
            _ => format!(r#"{{"prompt": "p-{i}", "chosen": "yes {filler}", "rejected": "no"}}"#),
        };
        text.push_str(&line);
        text.push('\n');
    }
    text.insert_str(
        0,
        "{\"prompt\": \"p-1\", \"chosen\": \"yes\", \"rejected\": \"no\"}\n",
    );
    ensure!(
        text.len() > 2 << 20,
        "{} bytes: too small to cut",
        text.len()
    );
    std::fs::write(dir.join("big.jsonl"), &text)?;
    let spec = dir.join("spec.toml");
    std::fs::write(
        &spec,
        "name = \"big\"\n[source]\nformat = \"jsonl\"\nfiles = [\"big.jsonl\"]\n\
         columns = { prompt = \"utf8\", chosen = \"utf8\", rejected = \"utf8\" }\n[map]\n\
         sql = \"SELECT _file, _row, prompt, chosen AS response_a, rejected AS response_b, 'a' AS label FROM source\"\n",
    )?;
    let build = |out: &str, extra: &[&str]| build_text_only(&spec, &dir.join(out), extra);
    build("plain", &[])?;
    build(
        "ranges",
        &[
            "--cluster",
            "standalone",
            "--partitions",
            "2",
            "--split-mib",
            "1",
        ],
    )?;
    let reference = built(&dir.join("plain"))?;
    ensure!(
        reference.1.iter().any(|r| r.contains("duplicate of pair")),
        "no duplicate in the reference"
    );
    ensure!(
        reference
            .1
            .iter()
            .filter(|r| r.contains("malformed JSON"))
            .count()
            >= 6,
        "too few malformed lines in the reference"
    );
    same_build(&reference, &built(&dir.join("ranges"))?, "--split-mib 1")?;
    Ok(())
}

/// A free TCP port on the loopback interface.
pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts the binary `program` with `args` and `env`, its output in `dir/NAME.log`.
fn spawn_logged(
    dir: &Path,
    name: &str,
    program: &str,
    args: &[String],
    env: &[(&str, String)],
) -> Result<std::process::Child> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    Ok(std::process::Command::new(bin(program)?)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?)
}

/// Child processes killed when the test ends, however it ends.
pub(crate) struct Kill(pub(crate) Vec<std::process::Child>);

impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A gram-scheduler and `executors` gram-executor processes on this machine (logs in `dir`),
/// each executor with `slots` task slots; the scheduler's URL. Returns once every executor has
/// registered.
fn start_cluster(dir: &Path, executors: usize, slots: usize, fast: bool) -> Result<(Kill, String)> {
    start_cluster_env(dir, executors, slots, fast, &[])
}

/// [`start_cluster`] with `env` set for the executors.
pub(crate) fn start_cluster_env(
    dir: &Path,
    executors: usize,
    slots: usize,
    fast: bool,
    env: &[(&str, String)],
) -> Result<(Kill, String)> {
    let sched = free_port()?;
    let mut args = vec![format!("--bind=127.0.0.1:{sched}")];
    if fast {
        // Executors lost are noticed within seconds.
        args.push("--executor-timeout=4".into());
    }
    let mut procs = Kill(vec![spawn_logged(
        dir,
        "gram-scheduler",
        "gram-scheduler",
        &args,
        &[],
    )?]);
    for i in 0..executors {
        let mut args = vec![
            format!("--scheduler=127.0.0.1:{sched}"),
            "--bind-host=127.0.0.1".into(),
            "--external-host=127.0.0.1".into(),
            format!("--port={}", free_port()?),
            format!("--grpc-port={}", free_port()?),
            format!("--task-slots={slots}"),
        ];
        if fast {
            args.push("--heartbeat=1".into());
        }
        let name = format!("gram-executor-{i}");
        procs
            .0
            .push(spawn_logged(dir, &name, "gram-executor", &args, env)?);
    }
    for i in 0..executors {
        let log = dir.join(format!("gram-executor-{i}.log"));
        ensure!(
            wait_for_log(&log, "registration succeed", 30)?,
            "executor {i} did not register"
        );
    }
    Ok((procs, format!("df://127.0.0.1:{sched}")))
}

#[test]
fn scheduler_and_executor_binaries_run_the_functions() -> Result<()> {
    let (out, model) = build("cluster-bins")?;
    let logs = out.parent().context("scratch")?;
    let (procs, url) = start_cluster(logs, 1, 2, false)?;
    tokio::runtime::Runtime::new()?.block_on(async {
        let mut ctx = None;
        for _ in 0..100 {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            if let Ok(c) = gram_cluster::connect(&gram_cluster::Target::Remote(url.clone())).await
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
    // The same build submitted to the scheduler equals the one made without it; the output
    // is given relative to gram-data's folder, which is not the executors'.
    let on_cluster = logs.join("on-cluster");
    let o = std::process::Command::new(bin("gram-data")?)
        .current_dir(logs)
        .arg("build")
        .arg(repo_root().join("pipelines/llmbar.toml"))
        .arg("--model")
        .arg(&model)
        .args([
            "--out",
            "on-cluster",
            "--max-tokens",
            "512",
            "--valid",
            "0.1",
        ])
        .args(["--test", "0.12", "--quiet", "--cluster", &url])
        // Cut into 2 tasks: the setting reaches the scheduler.
        .args(["--chunk-rows", "100", "--partitions", "2"])
        .output()?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    same_build(
        &built(&out)?,
        &built(&on_cluster)?,
        &format!("--cluster {url}"),
    )?;
    let written = written_by_tasks(&on_cluster)?;
    ensure!(written == 2, "{written} partitions wrote, not 2");
    drop(procs);
    let log = std::fs::read_to_string(logs.join("gram-executor-0.log"))?;
    ensure!(
        log.contains("Executor"),
        "the executor logged nothing:\n{log}"
    );
    Ok(())
}

/// Waits up to `secs` for `path`'s text to contain `what`.
pub(crate) fn wait_for_log(path: &Path, what: &str, secs: u64) -> Result<bool> {
    let t0 = std::time::Instant::now();
    while t0.elapsed().as_secs() < secs {
        if std::fs::read_to_string(path)
            .unwrap_or_default()
            .contains(what)
        {
            return Ok(true);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(false)
}

#[test]
fn a_build_survives_or_cleanly_fails_when_an_executor_is_killed() -> Result<()> {
    let dir = scratch("cluster-kill")?;
    let sets = ["hh-rlhf-harmless.toml", "pandalm.toml", "llmbar.toml"];
    // Small chunks: many staged files, so many tasks for both executors.
    let args = ["--max-tokens", "512", "--chunk-rows", "100"];
    gram_data_build(&sets, &dir.join("plain"), &args)?;
    let (mut procs, url) = start_cluster(&dir, 2, 1, true)?;
    let out = dir.join("killed");
    let mut build = std::process::Command::new(bin("gram-data")?)
        .arg("build")
        .args(sets.iter().map(|p| repo_root().join("pipelines").join(p)))
        .arg("--model")
        .arg(fixtures().join("smollm2"))
        .arg("--out")
        .arg(&out)
        .args(args)
        .args(["--quiet", "--cluster", &url])
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // Kill the second executor as soon as it runs a task of the build.
    ensure!(
        wait_for_log(&dir.join("gram-executor-1.log"), "Execute task", 120)?,
        "executor 1 ran no task"
    );
    let victim = &mut procs.0[2];
    victim.kill()?;
    victim.wait()?;
    let killed_while_running = build.try_wait()?.is_none();
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = build.try_wait()? {
            break s;
        }
        ensure!(
            t0.elapsed().as_secs() < 300,
            "the build hangs after an executor was killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut build.stderr.take().context("stderr")?, &mut stderr)?;
    ensure!(
        killed_while_running,
        "the build ended before the executor was killed"
    );
    let partials: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".killed.partial")
        })
        .collect();
    ensure!(partials.is_empty(), "a partial build was left behind");
    if status.success() {
        same_build(
            &built(&dir.join("plain"))?,
            &built(&out)?,
            "a build that lost an executor",
        )?;
        written_by_tasks(&out)?;
        println!("the build completed on the remaining executor, every row exactly once");
    } else {
        ensure!(!out.exists(), "a failed build left {}", out.display());
        let line = stderr.trim();
        ensure!(
            line.starts_with("error: --cluster df://") && line.lines().count() == 1,
            "not a one-line --cluster error:\n{line}"
        );
        println!("the build failed cleanly: {line}");
    }
    Ok(())
}

#[test]
fn an_unreachable_scheduler_is_a_one_line_error_before_any_work() -> Result<()> {
    let dir = scratch("cluster-unreachable")?;
    // A port nothing listens on: bound, then released.
    let url = format!("df://127.0.0.1:{}", free_port()?);
    for (target, why) in [
        (url.as_str(), "no scheduler answers"),
        ("df://nohost.invalid:50050", "not a reachable HOST:PORT"),
        ("scheduler:50050", "give df://HOST:PORT"),
    ] {
        let out = dir.join("out");
        let o = std::process::Command::new(bin("gram-data")?)
            .arg("build")
            .arg(repo_root().join("pipelines/llmbar.toml"))
            .arg("--out")
            .arg(&out)
            .args(["--quiet", "--cluster", target])
            .output()?;
        let err = String::from_utf8_lossy(&o.stderr);
        ensure!(
            o.status.code() == Some(1),
            "{target}: exit {:?}: {err}",
            o.status
        );
        ensure!(
            err.lines().next().is_some_and(|l| l.contains(why)),
            "{target}: {err}"
        );
        ensure!(!out.exists(), "{target}: an output folder was made");
        println!("{target}: {}", err.lines().next().unwrap_or(""));
    }
    Ok(())
}

/// Column `n` of `b` as UTF-8 strings, whatever string type it was read as.
fn utf8_column(b: &RecordBatch, n: &str) -> Result<arrow::array::StringArray> {
    let c = b.column_by_name(n).with_context(|| format!("column {n}"))?;
    Ok(arrow::compute::cast(c, &DataType::Utf8)?
        .as_string::<i32>()
        .clone())
}

/// The largest difference between two float columns' values (nulls must match), or an error.
fn float_diff(a: &dyn Array, b: &dyn Array, what: &str) -> Result<f32> {
    use arrow::datatypes::Float32Type;
    let (a, b) = (
        a.as_primitive::<Float32Type>(),
        b.as_primitive::<Float32Type>(),
    );
    let mut worst = 0f32;
    for i in 0..a.len() {
        ensure!(
            a.is_null(i) == b.is_null(i),
            "{what}: row {i}: null in one output only"
        );
        if a.is_valid(i) {
            worst = worst.max((a.value(i) - b.value(i)).abs());
        }
    }
    Ok(worst)
}

/// Two gram-score outputs: the same rows and columns, equal but for float scores, which differ
/// by at most the returned amount (0: a score does not depend on where or with what it ran).
pub(crate) fn same_scores(a: &Path, b: &Path, what: &str) -> Result<f32> {
    use arrow::util::display::{ArrayFormatter, FormatOptions};
    let read = |p: &Path| -> Result<RecordBatch> {
        let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(p)?,
        )?
        .build()?;
        let batches = r.collect::<std::result::Result<Vec<_>, _>>()?;
        let schema = batches.first().context("an empty output")?.schema();
        Ok(arrow::compute::concat_batches(&schema, &batches)?)
    };
    let (x, y) = (read(a)?, read(b)?);
    ensure!(x.schema() == y.schema(), "{what}: the schemas differ");
    ensure!(x.num_rows() == y.num_rows(), "{what}: row counts differ");
    let mut worst = 0f32;
    for (f, (c, d)) in x
        .schema()
        .fields()
        .iter()
        .zip(x.columns().iter().zip(y.columns()))
    {
        let col = format!("{what}: column {}", f.name());
        match f.data_type() {
            DataType::Float32 => worst = worst.max(float_diff(c, d, &col)?),
            DataType::List(item) if item.data_type() == &DataType::Float32 => {
                let (c, d) = (c.as_list::<i32>(), d.as_list::<i32>());
                ensure!(c.offsets() == d.offsets(), "{col}: list lengths differ");
                worst = worst.max(float_diff(c.values(), d.values(), &col)?);
            }
            _ => {
                let opts = FormatOptions::default();
                let (fc, fd) = (
                    ArrayFormatter::try_new(c, &opts)?,
                    ArrayFormatter::try_new(d, &opts)?,
                );
                for i in 0..c.len() {
                    ensure!(
                        fc.value(i).to_string() == fd.value(i).to_string(),
                        "{col}: row {i} differs"
                    );
                }
            }
        }
    }
    Ok(worst)
}

/// A best-of-n input from a stage-2 table: each row's two responses and their concatenation.
fn candidates_file(stage2: &Path, out: &Path) -> Result<()> {
    use arrow::array::{ListBuilder, StringBuilder};
    let f = std::fs::File::open(stage2)?;
    let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)?.build()?;
    let (mut prompts, mut lists) = (StringBuilder::new(), ListBuilder::new(StringBuilder::new()));
    for b in r {
        let b = b?;
        let s = |n: &str| utf8_column(&b, n);
        let (p, x, y) = (s("prompt")?, s("response_a")?, s("response_b")?);
        for i in 0..b.num_rows() {
            prompts.append_value(p.value(i));
            for c in [
                x.value(i).to_string(),
                y.value(i).to_string(),
                format!("{} {}", x.value(i), y.value(i)),
            ] {
                lists.values().append_value(c);
            }
            lists.append(true);
        }
    }
    let batch = RecordBatch::try_from_iter([
        (
            "prompt",
            std::sync::Arc::new(prompts.finish()) as arrow::array::ArrayRef,
        ),
        ("responses", std::sync::Arc::new(lists.finish())),
    ])?;
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(out)?, batch.schema(), None)?;
    w.write(&batch)?;
    w.close()?;
    Ok(())
}

#[test]
fn scoring_jobs_on_the_cluster_equal_the_in_process_job() -> Result<()> {
    let dir = scratch("cluster-score")?;
    let data = dir.join("data");
    gram_data_build(
        &["llmbar.toml", "pandalm.toml"],
        &data,
        &["--max-tokens", "512"],
    )?;
    let split = data.join("stage2/test-00000.parquet");
    let cands = dir.join("candidates.parquet");
    candidates_file(&split, &cands)?;
    let judge = crate::score::judge()?;
    // The scheduler and executor processes (which load onnxruntime as this process does).
    let (_procs, url) = start_cluster(&dir, 1, 2, false)?;
    let jobs: [(&str, &Path, &[&str]); 3] = [
        ("pairwise", &split, &[]),
        (
            "reference",
            &split,
            &[
                "--response-col",
                "response_a",
                "--reference-col",
                "response_b",
            ],
        ),
        ("best-of-n", &cands, &[]),
    ];
    for (mode, input, extra) in jobs {
        let run = |name: &str, cluster: &[&str]| -> Result<std::path::PathBuf> {
            let out = dir.join(format!("{mode}-{name}.parquet"));
            let o = std::process::Command::new(bin("gram-score")?)
                .args([mode, "--quiet", "--chunk-rows", "64", "--model"])
                .arg(judge)
                .arg("--input")
                .arg(input)
                .arg("--out")
                .arg(&out)
                .args(extra)
                .args(cluster)
                .output()?;
            ensure!(
                o.status.success(),
                "{mode} {cluster:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            Ok(out)
        };
        let plain = run("plain", &[])?;
        for target in ["local", "standalone", url.as_str()] {
            let name = target.split(':').next().unwrap_or(target);
            let other = run(name, &["--cluster", target])?;
            let worst = same_scores(&plain, &other, &format!("{mode} --cluster {target}"))?;
            println!(
                "{mode} --cluster {target}: every row and column equal, scores within {worst:.2e}"
            );
            ensure!(
                worst == 0.0,
                "{mode} --cluster {target}: scores differ by {worst:.2e}"
            );
        }
    }
    Ok(())
}

/// A cluster scoring job over JSON Lines (written as Parquet for the tasks first) equals the
/// job without `--cluster`; one whose parts folder holds a finished part keeps that part and
/// scores only the other chunks.
#[test]
fn cluster_scoring_reads_json_lines_and_resumes_from_its_parts() -> Result<()> {
    use crate::score::{f32s, read};
    let dir = scratch("cluster-score-resume")?;
    let data = dir.join("data");
    gram_data_build(&["llmbar.toml"], &data, &["--max-tokens", "512"])?;
    let stage2 = read(&data.join("stage2/test-00000.parquet"))?;
    let text = |n: &str| utf8_column(&stage2, n);
    let (p, a, b) = (text("prompt")?, text("response_a")?, text("response_b")?);
    let n = p.len().min(80);
    ensure!(n > 40, "only {n} rows to score");
    let mut jsonl = String::new();
    for i in 0..n {
        let row = serde_json::json!({"prompt": p.value(i), "response_a": a.value(i), "response_b": b.value(i)});
        jsonl.push_str(&format!("{row}\n"));
    }
    let input = dir.join("pairs.jsonl");
    std::fs::write(&input, jsonl)?;
    let judge = crate::score::judge()?;
    let score = |out: &Path, cluster: &[&str]| {
        let mut cmd = std::process::Command::new(bin("gram-score")?);
        cmd.args(["pairwise", "--chunk-rows", "16", "--model"])
            .arg(judge)
            .arg("--input")
            .arg(&input)
            .arg("--out")
            .arg(out)
            .args(cluster);
        Ok::<_, anyhow::Error>(cmd)
    };
    let plain = dir.join("plain.parquet");
    run_ok(&mut score(&plain, &[])?, "pairwise without --cluster")?;
    let local = dir.join("local.parquet");
    run_ok(
        &mut score(&local, &["--cluster", "local"])?,
        "pairwise --cluster local",
    )?;
    let worst = same_scores(&plain, &local, "JSON Lines, --cluster local")?;
    ensure!(
        worst == 0.0,
        "JSON Lines on the cluster: scores differ by {worst:.2e}"
    );

    // Sharded: the executors' parts are the output, in input order, named by the manifest.
    let sharded = dir.join("sharded");
    run_ok(
        &mut score(&sharded, &["--cluster", "standalone", "--sharded"])?,
        "pairwise --sharded on standalone",
    )?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sharded.join("manifest.json"))?)?;
    let files: Vec<&str> = manifest["files"]
        .as_array()
        .context("no files in the manifest")?
        .iter()
        .filter_map(|f| f.as_str())
        .collect();
    ensure!(
        files.len() == n.div_ceil(16) && manifest["rows"] == n,
        "{manifest}"
    );
    let parts: Vec<RecordBatch> = files
        .iter()
        .map(|f| read(&sharded.join(f)))
        .collect::<Result<_>>()?;
    let joined = dir.join("sharded-joined.parquet");
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&joined)?,
        parts[0].schema(),
        None,
    )?;
    for b in &parts {
        w.write(b)?;
    }
    w.close()?;
    let worst = same_scores(&plain, &joined, "--sharded on standalone")?;
    ensure!(worst == 0.0, "sharded output: scores differ by {worst:.2e}");

    // A job that stopped after writing its job.json (no scheduler there), then a finished
    // part planted with a score no judge gives: the resumed job keeps it.
    let resumed = dir.join("resumed.parquet");
    let port = free_port()?;
    let nowhere = format!("df://127.0.0.1:{port}");
    crate::common::refused_in_one_line(
        &mut score(&resumed, &["--cluster", &nowhere])?,
        "no scheduler answers",
    )?;
    let parts = dir.join("resumed.parquet.parts");
    ensure!(
        parts.join("job.json").exists(),
        "no job.json in {}",
        parts.display()
    );
    let first = read(&plain)?.slice(0, 16);
    let mut cols = first.columns().to_vec();
    let at = first.schema().index_of("score_a")?;
    let mut planted = f32s(&first, "score_a")?;
    planted[0] = Some(42.0);
    cols[at] = std::sync::Arc::new(arrow::array::Float32Array::from(planted));
    let part = RecordBatch::try_new(first.schema(), cols)?;
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(parts.join("part-000000.parquet"))?,
        part.schema(),
        None,
    )?;
    w.write(&part)?;
    w.close()?;
    let o = run_ok(
        &mut score(&resumed, &["--cluster", "standalone"])?,
        "resumed on standalone",
    )?;
    let said = String::from_utf8_lossy(&o.stdout);
    ensure!(said.contains("; 16 from an earlier run"), "{said}");
    let (want, got) = (
        f32s(&read(&plain)?, "score_a")?,
        f32s(&read(&resumed)?, "score_a")?,
    );
    ensure!(
        got.len() == n && got[0] == Some(42.0),
        "the planted part was not kept: {:?}",
        got.first()
    );
    for (i, (x, y)) in want.iter().zip(&got).enumerate().skip(1) {
        ensure!(
            x.map(f32::to_bits) == y.map(f32::to_bits),
            "row {i}: {x:?} vs {y:?}"
        );
    }
    ensure!(!parts.exists(), "the finished job left its parts");
    Ok(())
}
