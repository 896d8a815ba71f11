//! gram-score on a tiny exported judge (random weights, SmolLM2's tokenizer): batch jobs keep
//! every row in order, resume after SIGKILL to the same scores, are position-independent; best-
//! of-n and reference modes; eval.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use arrow::array::{Array, ArrayRef, Float32Array, Int32Array, Int64Array, ListArray, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::common::{bin, fixtures, scratch};
use crate::export::export;

const WORDS: &[&str] = &[
    "apple", "river", "stone", "cloud", "green", "quick", "silver", "music", "garden", "paper",
    "light", "ocean", "tiger", "winter", "yellow", "bread", "orange", "window", "summer", "forest",
    "good", "bad",
];

/// Deterministic word salad of `n` words.
pub(crate) fn words(seed: &mut u64, n: usize) -> String {
    (0..n)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            WORDS[((*seed >> 33) as usize) % WORDS.len()]
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The tiny judge export, made once: `gram-train init` (2 layers, width 64) + `gram-export onnx`.
pub(crate) fn judge() -> Result<&'static PathBuf> {
    static J: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    J.get_or_init(|| make_judge().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn make_judge() -> Result<PathBuf> {
    let root = scratch("score-judge")?;
    let cfg = root.join("config.json");
    std::fs::write(
        &cfg,
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
            "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu", "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": true
        })
        .to_string(),
    )?;
    let model = root.join("model");
    let out = Command::new(bin("gram-train")?)
        .args(["init", "--seed", "7", "--model-config"])
        .arg(&cfg)
        .arg("--tokenizer")
        .arg(fixtures().join("smollm2"))
        .arg("--out")
        .arg(&model)
        .output()?;
    ensure!(
        out.status.success(),
        "gram-train init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = root.join("judge");
    export(&model, &dir, "judge", &["--verify", "--max-tokens", "512"])?;
    Ok(dir)
}

/// A pairs Parquet: id, prompt, response_a, response_b (row `null_row` has a null response_b).
fn pairs_parquet(path: &Path, n: usize, null_row: Option<usize>, swap: bool) -> Result<()> {
    let mut seed = 42u64;
    let (mut p, mut a, mut b) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let len = 5 + i % 60;
        let q = format!("Question {i}: {}?", words(&mut seed, 4 + i % 7));
        // Every 25 rows, a prompt whose first characters merge with the judge template's last
        // line when tokenised (the graph's cached prefix must not include that line).
        p.push(Some(match i % 25 {
            3 => String::new(),
            8 => format!("\n\n{q}"),
            13 => format!("  {q}"),
            18 => format!("\t\t{q}"),
            _ => q,
        }));
        let x = words(&mut seed, len);
        let y = words(&mut seed, 3 + (i * 7) % 50);
        let (x, y) = if swap { (y, x) } else { (x, y) };
        a.push(Some(x));
        b.push(if Some(i) == null_row { None } else { Some(y) });
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("prompt", DataType::Utf8, true),
        Field::new("response_a", DataType::Utf8, true),
        Field::new("response_b", DataType::Utf8, true),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(0..n as i64)),
        Arc::new(StringArray::from(p)),
        Arc::new(StringArray::from(a)),
        Arc::new(StringArray::from(b)),
    ];
    write(path, RecordBatch::try_new(schema, cols)?)
}

fn write(path: &Path, batch: RecordBatch) -> Result<()> {
    let mut w = ArrowWriter::try_new(std::fs::File::create(path)?, batch.schema(), None)?;
    w.write(&batch)?;
    w.close()?;
    Ok(())
}

pub(crate) fn read(path: &Path) -> Result<RecordBatch> {
    let r = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path)?)?.build()?;
    let batches = r.collect::<Result<Vec<_>, _>>()?;
    ensure!(!batches.is_empty(), "{} is empty", path.display());
    Ok(arrow::compute::concat_batches(
        &batches[0].schema(),
        &batches,
    )?)
}

pub(crate) fn f32s(b: &RecordBatch, name: &str) -> Result<Vec<Option<f32>>> {
    let c = b
        .column_by_name(name)
        .with_context(|| format!("no column {name}"))?;
    let c = c
        .as_any()
        .downcast_ref::<Float32Array>()
        .context("not f32")?;
    Ok((0..c.len())
        .map(|i| (!c.is_null(i)).then(|| c.value(i)))
        .collect())
}

fn score_cmd(mode: &str, input: &Path, output: &Path) -> Result<Command> {
    let mut c = Command::new(bin("gram-score")?);
    c.args([mode, "--quiet", "--model"])
        .arg(judge()?)
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output);
    Ok(c)
}

fn ok(cmd: &mut Command) -> Result<String> {
    let out = cmd.output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "{cmd:?}: {text}");
    Ok(text)
}

#[test]
fn pairwise_keeps_every_row_resumes_after_kill_and_is_position_independent() -> Result<()> {
    let root = scratch("score-pairwise")?;
    let n = 1200;
    let input = root.join("pairs.parquet");
    pairs_parquet(&input, n, Some(17), false)?;
    let swapped = root.join("swapped.parquet");
    pairs_parquet(&swapped, n, Some(17), true)?;

    // Uninterrupted.
    let full = root.join("full.parquet");
    let t = Instant::now();
    println!(
        "{}",
        ok(score_cmd("pairwise", &input, &full)?.args(["--chunk-rows", "100"]))?.trim()
    );
    println!("pairwise: {n} pairs in {:.1} s", t.elapsed().as_secs_f64());
    let out = read(&full)?;
    ensure!(out.num_rows() == n, "{} rows out of {n}", out.num_rows());
    let ids = out
        .column_by_name("id")
        .context("id kept")?
        .as_any()
        .downcast_ref::<Int64Array>()
        .context("id")?;
    ensure!(
        (0..n).all(|i| ids.value(i) == i as i64),
        "rows out of order"
    );
    for c in ["prompt", "response_a", "response_b"] {
        ensure!(out.column_by_name(c).is_some(), "input column {c} dropped");
    }
    let s = f32s(&out, "score_a")?;
    let err = out
        .column_by_name("score_error")
        .context("error column")?
        .as_any()
        .downcast_ref::<StringArray>()
        .context("utf8")?;
    ensure!(
        s[17].is_none() && err.value(17).contains("response_b") && err.value(17).contains("null"),
        "row 17: {:?}",
        err.value(17)
    );
    ensure!(
        s.iter()
            .enumerate()
            .all(|(i, x)| i == 17 || x.is_some_and(|v| (0.0..=1.0).contains(&v))),
        "scores missing or out of range"
    );
    ensure!(
        !root.join("full.parquet.parts").exists(),
        "parts left behind"
    );
    // An existing output is never replaced without --overwrite.
    let before = std::fs::metadata(&full)?.modified()?;
    let again = score_cmd("pairwise", &input, &full)?.output()?;
    ensure!(
        again.status.code() == Some(1)
            && String::from_utf8_lossy(&again.stderr).contains("--overwrite")
            && std::fs::metadata(&full)?.modified()? == before,
        "re-running onto {}: {:?} {}",
        full.display(),
        again.status,
        String::from_utf8_lossy(&again.stderr)
    );

    // Killed mid-way, then re-run: the same scores, nothing duplicated or lost.
    let resumed = root.join("resumed.parquet");
    let parts = root.join("resumed.parquet.parts");
    let mut child = score_cmd("pairwise", &input, &resumed)?
        .args(["--chunk-rows", "50", "--sessions", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = std::fs::read_dir(&parts)
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("part-"))
                })
                .count()
            })
            .unwrap_or(0);
        if done >= 3 {
            child.kill()?;
            break;
        }
        if child.try_wait()?.is_some() {
            bail!("the job finished before it could be killed (make it longer)");
        }
        ensure!(Instant::now() < deadline, "no parts appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait()?;
    ensure!(
        !resumed.exists(),
        "a killed job left a complete-looking output"
    );
    let text = ok(score_cmd("pairwise", &input, &resumed)?.args([
        "--chunk-rows",
        "50",
        "--sessions",
        "1",
    ]))?;
    println!("after kill: {}", text.trim());
    ensure!(text.contains("from an earlier run"), "{text}");
    let again = f32s(&read(&resumed)?, "score_a")?;
    ensure!(again.len() == n, "{} rows after resume", again.len());
    let max = s
        .iter()
        .zip(&again)
        .filter_map(|(x, y)| Some((x.as_ref()? - y.as_ref()?).abs()))
        .fold(0f32, f32::max);
    ensure!(
        s.iter()
            .zip(&again)
            .all(|(x, y)| x.is_some() == y.is_some()),
        "null pattern changed"
    );
    println!("resumed vs uninterrupted: max |diff| {max:.2e}");
    ensure!(max <= 1e-5, "resumed scores differ by {max}");

    // A re-run with other options refuses to mix parts (--overwrite replaces a finished
    // output, only --restart discards parts).
    std::fs::create_dir_all(&parts)?;
    std::fs::write(parts.join("job.json"), "{}")?;
    let out = score_cmd("pairwise", &input, &resumed)?
        .arg("--overwrite")
        .output()?;
    ensure!(
        out.status.code() == Some(1) && String::from_utf8_lossy(&out.stderr).contains("--restart"),
        "{out:?}"
    );
    std::fs::remove_dir_all(&parts)?;

    // Swapping a and b gives 1 - score.
    let sw = root.join("sw.parquet");
    ok(&mut score_cmd("pairwise", &swapped, &sw)?)?;
    let ssw = f32s(&read(&sw)?, "score_a")?;
    let max = s
        .iter()
        .zip(&ssw)
        .filter_map(|(x, y)| Some((x.as_ref()? + y.as_ref()? - 1.0).abs()))
        .fold(0f32, f32::max);
    println!("score(a, b) + score(b, a) - 1: max {max:.2e}");
    ensure!(max <= 1e-5, "not position-independent: {max}");
    std::fs::remove_dir_all(&root)?;
    Ok(())
}

/// A pair's score does not depend on which pairs share its batch: the same 200 pairs scored in
/// batches of one pair, under the default limits, and in large batches on one two-threaded
/// session give the same bits (a server's batches are other pairs' company too).
#[test]
fn scores_do_not_depend_on_how_pairs_are_batched() -> Result<()> {
    let root = scratch("score-batch-invariant")?;
    let input = root.join("pairs.parquet");
    pairs_parquet(&input, 200, None, false)?;
    let settings: [&[&str]; 3] = [
        &["--batch-rows", "2"],
        &[],
        &[
            "--batch-rows",
            "64",
            "--batch-tokens",
            "16384",
            "--sessions",
            "1",
            "--threads",
            "2",
        ],
    ];
    let mut runs = Vec::new();
    for (k, args) in settings.iter().enumerate() {
        let out = root.join(format!("out{k}.parquet"));
        ok(score_cmd("pairwise", &input, &out)?.args(*args))?;
        let b = read(&out)?;
        runs.push((
            f32s(&b, "score_a")?,
            f32s(&b, "p_a_first")?,
            f32s(&b, "p_a_second")?,
        ));
    }
    let bits = |v: &[Option<f32>]| v.iter().map(|x| x.map(f32::to_bits)).collect::<Vec<_>>();
    for (k, r) in runs.iter().enumerate().skip(1) {
        for (name, a, b) in [
            ("score_a", &runs[0].0, &r.0),
            ("p_a_first", &runs[0].1, &r.1),
            ("p_a_second", &runs[0].2, &r.2),
        ] {
            ensure!(a.iter().all(Option::is_some), "{name}: a row failed");
            let differ = (0..a.len()).filter(|&i| a[i] != b[i]).count();
            let worst = (0..a.len())
                .filter_map(|i| Some((a[i]? - b[i]?).abs()))
                .fold(0f32, f32::max);
            ensure!(
                bits(a) == bits(b),
                "{name} under {:?}: {differ} of {} rows differ from batches of one pair (max {worst:e})",
                settings[k],
                a.len()
            );
        }
    }
    Ok(())
}

#[test]
fn reference_and_best_of_n_modes() -> Result<()> {
    let root = scratch("score-modes")?;
    let n = 40;
    let mut seed = 9u64;
    let prompts: Vec<String> = (0..n)
        .map(|i| format!("Prompt {i} {}", words(&mut seed, 3)))
        .collect();
    let cands: Vec<Vec<String>> = (0..n)
        .map(|i| {
            (0..(1 + i % 6))
                .map(|_| words(&mut seed, 4 + i % 9))
                .collect()
        })
        .collect();
    let mut lb = arrow::array::ListBuilder::new(arrow::array::StringBuilder::new());
    for c in &cands {
        for r in c {
            lb.values().append_value(r);
        }
        lb.append(true);
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("prompt", DataType::Utf8, false),
        Field::new(
            "responses",
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            true,
        ),
    ]));
    let bon_in = root.join("bon.parquet");
    write(
        &bon_in,
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(prompts.clone())),
                Arc::new(lb.finish()),
            ],
        )?,
    )?;

    // Knockout and tournament on the same candidates: every winner beats (>= 0.5) each candidate
    // it met; with a transitive judge both give the same winner on most rows.
    for method in ["knockout", "tournament"] {
        let out = root.join(format!("{method}.parquet"));
        ok(score_cmd("best-of-n", &bon_in, &out)?.args(["--method", method]))?;
        let b = read(&out)?;
        let best = b
            .column_by_name("best_index")
            .context("best_index")?
            .as_any()
            .downcast_ref::<Int32Array>()
            .context("i32")?;
        let comps = b
            .column_by_name("comparisons")
            .context("comparisons")?
            .as_any()
            .downcast_ref::<Int32Array>()
            .context("i32")?;
        let scores = b
            .column_by_name("scores")
            .context("scores")?
            .as_any()
            .downcast_ref::<ListArray>()
            .context("list")?;
        ensure!(b.num_rows() == n, "{method}: {} rows for {n}", b.num_rows());
        for (i, cand) in cands.iter().enumerate() {
            let k = cand.len();
            ensure!(
                (best.value(i) as usize) < k,
                "{method} row {i}: best {} of {k}",
                best.value(i)
            );
            ensure!(
                comps.value(i) as usize == k - 1,
                "{method} row {i}: {} comparisons for {k} candidates",
                comps.value(i)
            );
            let s = scores.value(i);
            let s = s
                .as_any()
                .downcast_ref::<Float32Array>()
                .context("f32 scores")?;
            ensure!(s.len() == k, "{method} row {i}: {} scores", s.len());
            if k > 1 {
                ensure!(
                    s.value(best.value(i) as usize) >= 0.5,
                    "{method} row {i}: the winner's last score < 0.5"
                );
            }
        }
        println!("best-of-n {method}: {n} rows ok");
    }

    // Reference mode equals pairwise with b = the reference.
    let reference = "A fixed reference answer about apples.";
    let rin = root.join("ref.parquet");
    let responses: Vec<String> = cands.iter().map(|c| c[0].clone()).collect();
    let schema = Arc::new(Schema::new(vec![
        Field::new("prompt", DataType::Utf8, false),
        Field::new("response", DataType::Utf8, false),
    ]));
    write(
        &rin,
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(prompts.clone())),
                Arc::new(StringArray::from(responses.clone())),
            ],
        )?,
    )?;
    let rout = root.join("ref-out.parquet");
    ok(score_cmd("reference", &rin, &rout)?.args(["--reference", reference]))?;
    let rewards = f32s(&read(&rout)?, "reward")?;
    let (prompts_again, responses_again) = (prompts.clone(), responses.clone());
    let pin = root.join("pw.parquet");
    let schema = Arc::new(Schema::new(vec![
        Field::new("prompt", DataType::Utf8, false),
        Field::new("response_a", DataType::Utf8, false),
        Field::new("response_b", DataType::Utf8, false),
    ]));
    write(
        &pin,
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(prompts)),
                Arc::new(StringArray::from(responses)),
                Arc::new(StringArray::from(vec![reference; n])),
            ],
        )?,
    )?;
    let pout = root.join("pw-out.parquet");
    ok(&mut score_cmd("pairwise", &pin, &pout)?)?;
    let pw = f32s(&read(&pout)?, "score_a")?;
    let max = rewards
        .iter()
        .zip(&pw)
        .map(|(x, y)| (x.unwrap_or(f32::NAN) - y.unwrap_or(f32::NAN)).abs())
        .fold(0f32, f32::max);
    ensure!(max <= 1e-5, "reward vs pairwise score: {max}");

    // The same rows as JSON Lines (a blank line among them) give the same rewards, and every
    // output is ZSTD-compressed Parquet.
    let jin = root.join("ref.jsonl");
    let mut lines: Vec<String> = prompts_again
        .iter()
        .zip(&responses_again)
        .map(|(p, r)| serde_json::json!({"prompt": p, "response": r}).to_string())
        .collect();
    lines.insert(3, String::new());
    std::fs::write(&jin, lines.join("\n") + "\n")?;
    let jout = root.join("ref-jsonl-out.parquet");
    ok(score_cmd("reference", &jin, &jout)?.args(["--reference", reference]))?;
    ensure!(
        f32s(&read(&jout)?, "reward")? == rewards,
        "JSON Lines input scored differently"
    );
    let meta = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&jout)?)?
        .metadata()
        .clone();
    let codec = meta.row_group(0).column(0).compression();
    ensure!(
        matches!(codec, parquet::basic::Compression::ZSTD(_)),
        "output compression {codec:?}"
    );
    std::fs::write(
        root.join("bad.jsonl"),
        "{\"prompt\": \"x\", \"response\": \"y\"}\n{oops\n",
    )?;
    let out = score_cmd(
        "reference",
        &root.join("bad.jsonl"),
        &root.join("y.parquet"),
    )?
    .args(["--reference", reference])
    .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1) && err.lines().count() == 1 && err.contains("bad.jsonl"),
        "bad JSON Lines: {err}"
    );

    // Bad input: a missing column is one line naming the file and the column.
    let out = score_cmd("pairwise", &rin, &root.join("x.parquet"))?.output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1)
            && err.lines().count() == 1
            && err.contains("ref.parquet")
            && err.contains("response_a"),
        "{err}"
    );
    let out = score_cmd(
        "pairwise",
        &root.join("missing.parquet"),
        &root.join("x.parquet"),
    )?
    .output()?;
    ensure!(
        out.status.code() == Some(1)
            && String::from_utf8_lossy(&out.stderr).contains("missing.parquet"),
        "{out:?}"
    );
    std::fs::write(root.join("junk.parquet"), b"not parquet")?;
    let out = score_cmd(
        "pairwise",
        &root.join("junk.parquet"),
        &root.join("x.parquet"),
    )?
    .output()?;
    ensure!(
        out.status.code() == Some(1)
            && String::from_utf8_lossy(&out.stderr).contains("junk.parquet"),
        "{out:?}"
    );
    std::fs::remove_dir_all(&root)?;
    Ok(())
}

/// A labeled Parquet file of `n` rows (pairs p0, p1, ... in both orders as ids repeat by two;
/// sources alpha/beta; subsets s0/s1 in `metadata`, one pair without): (file, prompts, a, b,
/// labels), row by row.
#[allow(clippy::type_complexity)]
fn labeled_file(
    root: &Path,
    n: usize,
) -> Result<(
    PathBuf,
    Vec<String>,
    Vec<String>,
    Vec<String>,
    Vec<&'static str>,
)> {
    let mut seed = 5u64;
    let schema = Arc::new(Schema::new(vec![
        Field::new("pair_id", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("prompt", DataType::Utf8, false),
        Field::new("response_a", DataType::Utf8, false),
        Field::new("response_b", DataType::Utf8, false),
        Field::new("label", DataType::Utf8, false),
        Field::new("metadata", DataType::Utf8, true),
    ]));
    let ids: Vec<String> = (0..n).map(|i| format!("p{}", i / 2)).collect();
    let src: Vec<&str> = (0..n)
        .map(|i| if i % 4 < 2 { "alpha" } else { "beta" })
        .collect();
    let pr: Vec<String> = (0..n).map(|_| words(&mut seed, 4)).collect();
    let a: Vec<String> = (0..n).map(|_| words(&mut seed, 6)).collect();
    let b: Vec<String> = (0..n).map(|_| words(&mut seed, 6)).collect();
    let l: Vec<&str> = (0..n).map(|i| if i % 3 == 0 { "a" } else { "b" }).collect();
    // As gram-data's stage 2 carries it: the raw pair's metadata, here two subsets (and one
    // pair without metadata, which only counts overall and per source).
    let md: Vec<Option<String>> = (0..n)
        .map(|i| (i / 2 != 14).then(|| format!(r#"{{"subset":"s{}"}}"#, (i / 2) % 2)))
        .collect();
    let file = root.join("labeled.parquet");
    write(
        &file,
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(ids)),
                Arc::new(StringArray::from(src)),
                Arc::new(StringArray::from(pr.clone())),
                Arc::new(StringArray::from(a.clone())),
                Arc::new(StringArray::from(b.clone())),
                Arc::new(StringArray::from(l.clone())),
                Arc::new(StringArray::from(md)),
            ],
        )?,
    )?;
    Ok((file, pr, a, b, l))
}

#[test]
fn eval_reports_accuracy_per_source() -> Result<()> {
    let root = scratch("score-eval")?;
    let n = 30;
    let (file, pr, a, b, l) = labeled_file(&root, n)?;
    let json = root.join("eval.json");
    let text = ok(Command::new(bin("gram-score")?)
        .args(["eval", "--quiet", "--model"])
        .arg(judge()?)
        .arg("--data")
        .arg(&file)
        .arg("--json")
        .arg(&json))?;
    println!("{text}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json)?)?;
    ensure!(
        r["overall"]["pairs"] == 15,
        "pairs counted once: {}",
        r["overall"]
    );
    ensure!(
        r["by_source"]["alpha"]["pairs"].as_u64().unwrap_or(0)
            + r["by_source"]["beta"]["pairs"].as_u64().unwrap_or(0)
            == 15,
        "{r}"
    );
    let subsets: u64 = ["alpha/s0", "alpha/s1", "beta/s0", "beta/s1"]
        .iter()
        .map(|k| r["by_subset"][*k]["pairs"].as_u64().unwrap_or(0))
        .sum();
    ensure!(subsets == 14, "pairs per subset: {}", r["by_subset"]);
    // The same decisions recomputed from the library's both-order scores, one per pair id.
    let judge = gram_score::Judge::open(
        judge()?,
        gram_score::Threads::split(1, 1),
        gram_score::BatchLimits::default(),
    )?;
    let pairs: Vec<(&str, &str, &str)> = (0..n)
        .step_by(2)
        .map(|i| (pr[i].as_str(), a[i].as_str(), b[i].as_str()))
        .collect();
    let (mut want, mut want_orders) = (0, 0);
    for (k, s) in judge.score_pairs(&pairs)?.into_iter().enumerate() {
        let s = s.map_err(|e| anyhow::anyhow!(e))?;
        let a_preferred = l[2 * k] == "a";
        want += usize::from(s.score_a != 0.5 && (s.score_a > 0.5) == a_preferred);
        // Each order on its own: a shown first, then b shown first.
        want_orders += usize::from((s.p_ab > 0.5) == a_preferred);
        want_orders += usize::from((s.p_ba > 0.5) != a_preferred);
    }
    ensure!(
        r["overall"]["orders_correct"] == want_orders
            && r["overall"]["single_order_accuracy"].as_f64() == Some(want_orders as f64 / 30.0),
        "single-order {} vs recomputed {want_orders}",
        r["overall"]
    );
    let acc = r["overall"]["accuracy"].as_f64().context("accuracy")?;
    ensure!(
        r["overall"]["correct"] == want,
        "correct {} vs recomputed {want}",
        r["overall"]["correct"]
    );
    ensure!((acc - want as f64 / 15.0).abs() < 1e-9, "{r}");
    ensure!(text.contains("overall") && text.contains("alpha"), "{text}");
    std::fs::remove_dir_all(&root)?;
    Ok(())
}

#[test]
fn judge_prefix_and_pair_graphs_give_the_whole_sequence_scores() -> Result<()> {
    let root = scratch("score-prefix")?;
    let j = judge()?;
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(j.join("gram-export.json"))?)?;
    let plen = m["prefix_tokens"].as_array().map_or(0, Vec::len);
    ensure!(
        plen > 100,
        "the tiny judge should hold the chat + judge prefix ({plen} tokens)"
    );
    ensure!(
        m["inputs"]
            == serde_json::json!(["shared_ids", "shared_mask", "input_ids", "attention_mask"]),
        "the default judge graph should read pairs: {}",
        m["inputs"]
    );
    let model = j.parent().context("judge root")?.join("model");
    // The plain graph: whole sequences, one per row; and the prefix graph without pairs.
    let (whole, single) = (root.join("whole"), root.join("single"));
    export(
        &model,
        &whole,
        "judge",
        &[
            "--no-prefix-cache",
            "--no-pair-sharing",
            "--max-tokens",
            "512",
            "--verify",
        ],
    )?;
    export(
        &model,
        &single,
        "judge",
        &["--no-pair-sharing", "--max-tokens", "512", "--verify"],
    )?;
    let manifest = |d: &Path| -> Result<serde_json::Value> {
        Ok(serde_json::from_slice(&std::fs::read(
            d.join("gram-export.json"),
        )?)?)
    };
    let (m2, m3) = (manifest(&whole)?, manifest(&single)?);
    ensure!(
        m2["prefix_tokens"].is_null(),
        "--no-prefix-cache still baked a prefix"
    );
    let plain = serde_json::json!(["input_ids", "attention_mask"]);
    ensure!(
        m2["inputs"] == plain && m3["inputs"] == plain,
        "--no-pair-sharing still reads pairs: {} {}",
        m2["inputs"],
        m3["inputs"]
    );
    let input = root.join("pairs.parquet");
    pairs_parquet(&input, 200, None, false)?;
    let out = |name: &str| root.join(format!("scores-{name}.parquet"));
    ok(&mut score_cmd("pairwise", &input, &out("pairs"))?)?;
    for (name, dir) in [("whole", &whole), ("single", &single)] {
        let mut c = Command::new(bin("gram-score")?);
        ok(c.args(["pairwise", "--quiet", "--model"])
            .arg(dir)
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(out(name)))?;
    }
    let scores = |name: &str| f32s(&read(&out(name))?, "score_a");
    let (sp, sw, ss) = (scores("pairs")?, scores("whole")?, scores("single")?);
    // A missing or NaN score counts as an infinite difference (f32::max would drop a NaN).
    let max_diff = |x: &[Option<f32>], y: &[Option<f32>]| {
        x.iter()
            .zip(y)
            .map(|(a, b)| match (a, b) {
                (Some(a), Some(b)) if !(a - b).is_nan() => (a - b).abs(),
                _ => f32::INFINITY,
            })
            .fold(0f32, f32::max)
    };
    let (pair_diff, single_diff) = (max_diff(&sp, &sw), max_diff(&ss, &sw));
    println!(
        "vs the whole-sequence graph ({plen} prefix tokens): pair graph max |score diff| {pair_diff:.2e}, prefix graph {single_diff:.2e}"
    );
    ensure!(
        sp.len() == 200 && sw.len() == 200 && ss.len() == 200,
        "rows"
    );
    ensure!(pair_diff <= 1e-5, "pair graph scores differ by {pair_diff}");
    ensure!(
        single_diff <= 1e-5,
        "prefix graph scores differ by {single_diff}"
    );
    std::fs::remove_dir_all(&root)?;
    Ok(())
}

#[test]
fn eval_ranks_pairs_with_a_reward_model_export_and_gives_intervals() -> Result<()> {
    let root = scratch("score-reward")?;
    // A reward model: the judge's tiny LLaMA with a scalar head.
    let model = judge()?.parent().context("judge root")?.join("model");
    let rm = root.join("rm");
    std::fs::create_dir_all(&rm)?;
    for e in std::fs::read_dir(&model)? {
        let e = e?;
        if e.file_name() != "model.safetensors" {
            std::fs::copy(e.path(), rm.join(e.file_name()))?;
        }
    }
    let mut w = gram_core::Weights::from_hf_dir(&model)?;
    let head: Vec<f32> = (0..64).map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.0).collect();
    w.tensors.insert(
        "score.weight".into(),
        gram_core::F32Tensor {
            shape: vec![1, 64],
            data: head,
        },
    );
    gram_core::weights::write_safetensors(&rm.join("model.safetensors"), &w.tensors, None)?;
    let dir = root.join("reward");
    export(&rm, &dir, "reward", &["--verify", "--max-tokens", "512"])?;

    let n = 30;
    let (file, pr, a, b, l) = labeled_file(&root, n)?;
    let json = root.join("eval.json");
    let text = ok(Command::new(bin("gram-score")?)
        .args(["eval", "--quiet", "--model"])
        .arg(&dir)
        .arg("--data")
        .arg(&file)
        .arg("--json")
        .arg(&json))?;
    println!("{text}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json)?)?;
    // The same decisions from the library's rewards: the preferred response's is higher.
    let judge = gram_score::Judge::open(
        &dir,
        gram_score::Threads::split(1, 1),
        gram_score::BatchLimits::default(),
    )?;
    let pairs: Vec<(&str, &str, &str)> = (0..n)
        .step_by(2)
        .map(|i| (pr[i].as_str(), a[i].as_str(), b[i].as_str()))
        .collect();
    let mut want = 0;
    for (k, x) in judge.pair_rewards(&pairs)?.into_iter().enumerate() {
        let (ra, rb, _) = x.map_err(|e| anyhow::anyhow!(e))?;
        ensure!(
            ra.is_finite() && rb.is_finite() && ra != rb,
            "rewards {ra} {rb}"
        );
        want += usize::from((ra > rb) == (l[2 * k] == "a"));
    }
    ensure!(
        r["overall"]["pairs"] == 15 && r["overall"]["correct"] == want,
        "eval {} vs recomputed {want} correct",
        r["overall"]
    );
    let acc = r["overall"]["accuracy"].as_f64().context("accuracy")?;
    let ci = &r["overall"]["ci95"];
    let (lo, hi) = (ci[0].as_f64().context("ci")?, ci[1].as_f64().context("ci")?);
    ensure!(
        lo <= acc && acc <= hi && hi - lo > 0.1,
        "interval {lo}-{hi} around {acc}"
    );
    ensure!(text.contains("95% CI"), "{text}");
    ensure!(
        r["overall"]["single_order_accuracy"].is_null(),
        "a reward model has no orders: {}",
        r["overall"]
    );
    // The pairwise commands need a judge: one line saying so, exit 1.
    let input = root.join("pairs.parquet");
    pairs_parquet(&input, 4, None, false)?;
    let out = Command::new(bin("gram-score")?)
        .args(["pairwise", "--quiet", "--model"])
        .arg(&dir)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(root.join("scored.parquet"))
        .output()?;
    let e = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1) && e.contains("--head judge"),
        "{e}"
    );
    Ok(())
}
