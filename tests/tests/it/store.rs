//! `gram-data build --out URL`: a build onto an object store (`file://`, and `s3://` on moto's
//! S3 server, from a standalone cluster and from executor processes) holds, row for row, what a build into a folder holds; its manifest names every
//! file and comes last; an occupied prefix is refused without `--overwrite` and emptied with it.
//! `gram-score` puts a finished job's output on the same stores.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, ensure};

use crate::cluster::{
    Kill, built, free_port, gram_data_build, gram_data_build_env, same_build, same_scores,
    start_cluster_env, written_by_tasks,
};
use crate::common::{bin, refused_in_one_line, repo_root, run_ok, scratch};

/// The limits every build here uses (truncation and `--drop-over` rejects both happen).
const LIMITS: [&str; 4] = ["--max-tokens", "512", "--drop-over", "700"];

/// The folder `work` holds nothing (a build's local files went up and were removed).
fn emptied(work: &Path) -> Result<()> {
    let left: Vec<_> = std::fs::read_dir(work)?
        .flatten()
        .map(|e| e.path())
        .collect();
    ensure!(left.is_empty(), "left in the work folder: {left:?}");
    Ok(())
}

/// `gram-data build llmbar --out url` without `--overwrite` is refused.
fn refused(url: &str, env: &[(&str, String)]) -> Result<()> {
    let mut cmd = Command::new(bin("gram-data")?);
    cmd.arg("build")
        .arg(repo_root().join("pipelines/llmbar.toml"))
        .args(["--out", url, "--quiet"])
        .envs(env.iter().map(|(k, v)| (k, v)));
    refused_in_one_line(&mut cmd, "already exists")
}

#[test]
fn builds_onto_file_urls_equal_the_folder_build() -> Result<()> {
    let dir = scratch("store-file")?;
    gram_data_build(&["llmbar.toml"], &dir.join("plain"), &LIMITS)?;
    let reference = built(&dir.join("plain"))?;
    let work = dir.join("work");
    std::fs::create_dir_all(&work)?;
    let work_arg = work.display().to_string();
    let tasks = ["--cluster", "standalone", "--partitions", "2"];
    for (name, cluster) in [("url", &[][..]), ("url-standalone", &tasks[..])] {
        let url = format!("file://{}", dir.join(name).display());
        let args = [&LIMITS[..], &["--work-dir", &work_arg], cluster].concat();
        gram_data_build(&["llmbar.toml"], Path::new(&url), &args)?;
        same_build(
            &reference,
            &built(&dir.join(name))?,
            &format!("--out {url}"),
        )?;
        emptied(&work)?;
        if !cluster.is_empty() {
            let n = written_by_tasks(&dir.join(name))?;
            ensure!(n == 2, "{n} partitions wrote, not 2");
        }
    }
    // An occupied prefix: refused, then replaced whole with --overwrite (a stray shard that
    // was there goes too; read as a shard it would fail the comparison).
    let url = format!("file://{}", dir.join("url").display());
    refused(&url, &[])?;
    let stray = dir.join("url/stage1/train-p00000000000000ff-00000.parquet");
    std::fs::write(&stray, b"not a shard")?;
    let args = [&LIMITS[..], &["--work-dir", &work_arg, "--overwrite"]].concat();
    gram_data_build(&["llmbar.toml"], Path::new(&url), &args)?;
    ensure!(!stray.exists(), "--overwrite left an old object");
    same_build(&reference, &built(&dir.join("url"))?, "--overwrite")?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A Python with moto's S3 server and boto3 (scripts/setup.sh installs them into
/// `$GRAM_CACHE/s3-venv`).
fn moto_python() -> Option<std::path::PathBuf> {
    let cache = std::env::var_os("GRAM_CACHE").map_or_else(
        || {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/gram-rs")
        },
        std::path::PathBuf::from,
    );
    [cache.join("s3-venv/bin/python"), "python3".into()]
        .into_iter()
        .find(|p| {
            Command::new(p)
                .args(["-c", "import moto.server, boto3"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

/// boto3 against the S3 server at `endpoint`: `create BUCKET`, or `download BUCKET PREFIX
/// DIR` (prints the keys under PREFIX, relative to it).
const S3_CLIENT: &str = r#"
import os, sys, boto3
endpoint, action, bucket = sys.argv[1:4]
s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test",
                  aws_secret_access_key="test", region_name="us-east-1")
if action == "create":
    s3.create_bucket(Bucket=bucket)
else:
    prefix, dest = sys.argv[4:6]
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            rel = o["Key"][len(prefix) + 1:]
            path = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            s3.download_file(bucket, o["Key"], path)
            print(rel)
"#;

fn s3_client(py: &Path, endpoint: &str, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(py);
    cmd.args(["-c", S3_CLIENT, endpoint]).args(args);
    let o = run_ok(&mut cmd, &format!("boto3 {args:?}"))?;
    Ok(String::from_utf8(o.stdout)?)
}

/// moto's S3 server on a free loopback port (killed when the test ends); its endpoint.
fn start_moto(py: &Path, dir: &Path) -> Result<(Kill, String)> {
    let port = free_port()?;
    let log = std::fs::File::create(dir.join("moto.log"))?;
    let child = Command::new(py)
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let procs = Kill(vec![child]);
    let t0 = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        ensure!(
            t0.elapsed().as_secs() < 60,
            "moto's S3 server did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Ok((procs, format!("http://127.0.0.1:{port}")))
}

/// The settings that point object_store's S3 client at moto's server.
fn s3_env(endpoint: &str) -> [(&'static str, String); 5] {
    [
        ("AWS_ENDPOINT_URL", endpoint.to_string()),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ("AWS_REGION", "us-east-1".into()),
    ]
}

#[test]
fn a_cluster_build_puts_its_shards_on_s3() -> Result<()> {
    let Some(py) = moto_python() else {
        println!(
            "SKIPPED: no Python with moto's S3 server and boto3 (scripts/setup.sh installs them into ~/.cache/gram-rs/s3-venv)"
        );
        return Ok(());
    };
    let dir = scratch("store-s3")?;
    let (_moto, endpoint) = start_moto(&py, &dir)?;
    s3_client(&py, &endpoint, &["create", "gram"])?;
    let env = s3_env(&endpoint);
    gram_data_build(&["llmbar.toml"], &dir.join("plain"), &LIMITS)?;
    let reference = built(&dir.join("plain"))?;
    let work = dir.join("work");
    std::fs::create_dir_all(&work)?;
    let work_arg = work.display().to_string();
    // In this process's executor (standalone), then on a gram-scheduler and two gram-executor
    // processes that reach S3 with their own environment.
    let (_procs, scheduler) = start_cluster_env(&dir, 2, 1, false, &env)?;
    for (name, target) in [
        ("standalone", "standalone"),
        ("processes", scheduler.as_str()),
    ] {
        let url = format!("s3://gram/builds/{name}");
        let tasks = ["--cluster", target, "--partitions", "2"];
        let args = [&LIMITS[..], &["--work-dir", &work_arg], &tasks[..]].concat();
        gram_data_build_env(&["llmbar.toml"], Path::new(&url), &args, &env)?;
        emptied(&work)?;
        let copy = dir.join(name);
        let copy_arg = copy.display().to_string();
        let prefix = format!("builds/{name}");
        let keys = s3_client(&py, &endpoint, &["download", "gram", &prefix, &copy_arg])?;
        ensure!(
            keys.lines().any(|k| k == "manifest.json"),
            "no manifest on S3: {keys}"
        );
        same_build(
            &reference,
            &built(&copy)?,
            &format!("--out {url} --cluster {target}"),
        )?;
        let n = written_by_tasks(&copy)?;
        ensure!(n == 2, "{n} partitions wrote, not 2");
        refused(&url, &env)?;
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// `gram-score pairwise` of the first rows of `input` into `out` with `extra` arguments and
/// `env`.
fn score_command(
    input: &Path,
    out: &str,
    extra: &[&str],
    env: &[(&str, String)],
) -> Result<Command> {
    let mut cmd = Command::new(bin("gram-score")?);
    cmd.args(["pairwise", "--quiet", "--limit", "6", "--chunk-rows", "4"])
        .arg("--model")
        .arg(crate::score::judge()?)
        .arg("--input")
        .arg(input)
        .args(["--out", out])
        .args(extra)
        .envs(env.iter().map(|(k, v)| (k, v)));
    Ok(cmd)
}

/// Runs [`score_command`]; fails unless it succeeds.
fn score(input: &Path, out: &str, extra: &[&str], env: &[(&str, String)]) -> Result<()> {
    let mut cmd = score_command(input, out, extra, env)?;
    run_ok(&mut cmd, &format!("gram-score --out {out} {extra:?}"))?;
    Ok(())
}

#[test]
fn a_scoring_job_puts_its_output_on_object_stores() -> Result<()> {
    let dir = scratch("store-score")?;
    gram_data_build(
        &["llmbar.toml"],
        &dir.join("data"),
        &["--max-tokens", "512"],
    )?;
    let input = dir.join("data/stage2/test-00000.parquet");
    let local = dir.join("local.parquet");
    score(&input, &local.display().to_string(), &[], &[])?;
    let work = dir.join("work");
    let work_arg = work.display().to_string();
    // file://, scored on a standalone cluster: the same rows and scores, nothing left behind.
    let url = format!("file://{}/store/scored.parquet", dir.display());
    let on_store = ["--work-dir", &work_arg, "--cluster", "standalone"];
    score(&input, &url, &on_store, &[])?;
    let worst = same_scores(&local, &dir.join("store/scored.parquet"), &url)?;
    ensure!(worst == 0.0, "{url}: scores differ by {worst:.2e}");
    emptied(&work)?;
    refused_in_one_line(&mut score_command(&input, &url, &[], &[])?, "exists")?;
    // --sharded onto a file:// prefix: the parts, 6 rows in chunks of 4, and the manifest.
    let prefix = format!("file://{}/store/sharded/", dir.display());
    let sharded = [&on_store[..], &["--sharded"]].concat();
    score(&input, &prefix, &sharded, &[])?;
    let manifest = std::fs::read_to_string(dir.join("store/sharded/manifest.json"))?;
    for part in ["part-000000.parquet", "part-000001.parquet"] {
        ensure!(manifest.contains(part), "{manifest}");
        ensure!(dir.join("store/sharded").join(part).is_file(), "no {part}");
    }
    emptied(&work)?;
    refused_in_one_line(
        &mut score_command(&input, &prefix, &["--sharded"], &[])?,
        "exists",
    )?;
    // s3:// on moto's server.
    let Some(py) = moto_python() else {
        println!("SKIPPED the s3:// half: no Python with moto's S3 server and boto3");
        return Ok(());
    };
    let (_moto, endpoint) = start_moto(&py, &dir)?;
    s3_client(&py, &endpoint, &["create", "gram"])?;
    score(
        &input,
        "s3://gram/scores/pairs.parquet",
        &["--work-dir", &work_arg],
        &s3_env(&endpoint),
    )?;
    let copy = dir.join("copy");
    let copy_arg = copy.display().to_string();
    s3_client(&py, &endpoint, &["download", "gram", "scores", &copy_arg])?;
    let worst = same_scores(&local, &copy.join("pairs.parquet"), "s3://")?;
    ensure!(worst == 0.0, "s3://: scores differ by {worst:.2e}");
    emptied(&work)?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
