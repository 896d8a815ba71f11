//! `gram-data build` end to end: the three real sets of `../shared/data/` with the SmolLM2
//! tokenizer (counts against the sources, splits, decoding), the list specs, and every kind of
//! bad input.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use arrow::array::{Array, AsArray};
use arrow::datatypes::UInt32Type;
use arrow::record_batch::RecordBatch;
use gram_core::{GramTokenizer, PromptStyle, Templates};

use crate::common::{bin, fixtures, repo_root, scratch};

fn gram_data(args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new(bin("gram-data")?)
        .args(args)
        .env("NO_PROGRESS", "1")
        .output()?)
}

fn read_parquet_dir(dir: &Path, prefix: &str) -> Result<Vec<RecordBatch>> {
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    for f in files {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !name.starts_with(prefix) || !name.ends_with(".parquet") {
            continue;
        }
        let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(&f)?,
        )?
        .build()?;
        for b in r {
            out.push(b?);
        }
    }
    Ok(out)
}

fn col<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a arrow::array::StringArray> {
    Ok(b.column_by_name(name)
        .with_context(|| format!("column {name}"))?
        .as_string::<i32>())
}

fn stats(out: &Path) -> Result<serde_json::Value> {
    Ok(serde_json::from_slice(&std::fs::read(
        out.join("stats.json"),
    )?)?)
}

fn n(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

#[test]
fn builds_the_three_real_sets_with_the_smollm2_tokenizer() -> Result<()> {
    let root = repo_root();
    let out = scratch("data-real")?.join("out");
    let model = fixtures().join("smollm2");
    let p = |f: &str| root.join("pipelines").join(f).display().to_string();
    let o = gram_data(&[
        "build",
        &p("hh-rlhf-harmless.toml"),
        &p("pandalm.toml"),
        &p("llmbar.toml"),
        "--model",
        &model.display().to_string(),
        "--out",
        &out.display().to_string(),
        "--max-tokens",
        "1024",
        "--quiet",
    ])?;
    let stderr = String::from_utf8_lossy(&o.stderr);
    println!("{stderr}");
    ensure!(o.status.success(), "gram-data build failed:\n{stderr}");
    let s = stats(&out)?;
    ensure!(s["lossless"] == true);
    // Counts against the source files: every row is written or rejected with a reason.
    for (name, rows) in [
        ("hh-rlhf-harmless", 2312u64),
        ("pandalm", 999),
        ("llmbar", 885),
    ] {
        let x = &s["sources"][name];
        ensure!(
            n(&x["rows_read"]) == rows,
            "{name}: read {} rows, source has {rows}",
            x["rows_read"]
        );
        ensure!(
            n(&x["pairs_written"]) + n(&x["rows_rejected"]) + n(&x["pairs_rejected"]) == rows,
            "{name}: {x}"
        );
        ensure!(
            n(&x["pairs_written"]) > rows * 8 / 10,
            "{name}: only {} pairs written",
            x["pairs_written"]
        );
    }
    let rejects = read_parquet_dir(&out, "rejects")?;
    let nrej: usize = rejects.iter().map(RecordBatch::num_rows).sum();
    ensure!(
        nrej as u64 == n(&s["rejected"]),
        "rejects table has {nrej} rows, stats say {}",
        s["rejected"]
    );
    for b in &rejects {
        let r = col(b, "reason")?;
        ensure!(
            (0..b.num_rows()).all(|i| !r.value(i).is_empty()),
            "a reject without a reason"
        );
    }
    // PandaLM: the majority labels of the source (1: 422, 2: 472, tie: 105), ties kept for stage 1 only.
    let pl = &s["sources"]["pandalm"]["labels"];
    let rej_pl = n(&s["sources"]["pandalm"]["pairs_rejected"])
        + n(&s["sources"]["pandalm"]["rows_rejected"]);
    ensure!(n(&pl["a"]) + n(&pl["b"]) + n(&pl["tie"]) + rej_pl == 999);
    ensure!(
        n(&pl["tie"]) <= 105 && n(&pl["tie"]) + rej_pl >= 105,
        "pandalm ties: {pl}"
    );
    ensure!(n(&pl["a"]) <= 422 && n(&pl["b"]) <= 472);

    let s1 = read_parquet_dir(&out.join("stage1"), "")?;
    let s2 = read_parquet_dir(&out.join("stage2"), "")?;
    let rows1: usize = s1.iter().map(RecordBatch::num_rows).sum();
    let rows2: usize = s2.iter().map(RecordBatch::num_rows).sum();
    ensure!(
        rows1 as u64 == n(&s["pairs_written"]),
        "stage 1 holds every written pair once"
    );
    // No prompt in two splits; ties and their pairs never reach stage 2.
    let mut split_of: HashMap<String, HashSet<String>> = HashMap::new();
    let mut tie_pairs = 0usize;
    for b in s1.iter().chain(&s2) {
        let (p, sp) = (col(b, "prompt")?, col(b, "split")?);
        for i in 0..b.num_rows() {
            split_of
                .entry(p.value(i).to_string())
                .or_default()
                .insert(sp.value(i).to_string());
        }
    }
    ensure!(
        split_of.values().all(|v| v.len() == 1),
        "a prompt is in two splits"
    );
    let labeled = n(&s["pairs_written"]) - n(&pl["tie"]);
    ensure!(
        rows2 as u64 == 2 * labeled,
        "stage 2 has {rows2} rows, expected both orders of {labeled} labeled pairs"
    );
    let mut per_pair: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for b in &s2 {
        let (id, l) = (col(b, "pair_id")?, col(b, "label")?);
        for i in 0..b.num_rows() {
            per_pair
                .entry(id.value(i).to_string())
                .or_default()
                .push(l.value(i).to_string());
        }
    }
    for (id, ls) in &per_pair {
        let mut ls = ls.clone();
        ls.sort();
        if ls != ["a", "b"] {
            tie_pairs += 1;
            ensure!(
                false,
                "pair {id}: stage-2 labels {ls:?}, expected one A and one B"
            );
        }
    }
    ensure!(tie_pairs == 0);
    // The raw pair's metadata reaches stage 2: every LLMBar row names its subset (the folder
    // under Dataset/), so evaluation can report per subset.
    let mut subsets: BTreeMap<String, usize> = BTreeMap::new();
    for b in &s2 {
        let (src, md) = (col(b, "source")?, col(b, "metadata")?);
        for i in 0..b.num_rows() {
            if src.value(i) != "llmbar" {
                continue;
            }
            ensure!(!md.is_null(i), "an LLMBar stage-2 row without metadata");
            let v: serde_json::Value = serde_json::from_str(md.value(i))?;
            let sub = v["subset"].as_str().context("metadata without subset")?;
            *subsets.entry(sub.to_string()).or_default() += 1;
        }
    }
    println!("LLMBar stage-2 rows per subset: {subsets:?}");
    ensure!(
        subsets.contains_key("LLMBar/Natural")
            && subsets.contains_key("LLMBar/Adversarial/Neighbor"),
        "LLMBar subsets in stage 2: {subsets:?}"
    );
    // Decoding a tokenised stage-2 row gives back the judge prompt of METHOD.md and its label.
    let tok = GramTokenizer::from_dir(&fixtures().join("smollm2"))?;
    let t = Templates::new(&tok, PromptStyle::Chat)?;
    let mut checked = 0;
    for b in &s2 {
        let ids = b
            .column_by_name("input_ids")
            .context("input_ids")?
            .as_list::<i32>();
        let lt = b
            .column_by_name("label_token")
            .context("label_token")?
            .as_primitive::<UInt32Type>();
        let tr = b
            .column_by_name("truncated")
            .context("truncated")?
            .as_boolean();
        let (p, a, bb, l) = (
            col(b, "prompt")?,
            col(b, "response_a")?,
            col(b, "response_b")?,
            col(b, "label")?,
        );
        for i in (0..b.num_rows()).step_by(7) {
            if tr.value(i) {
                continue;
            }
            let mut v: Vec<u32> = ids.value(i).as_primitive::<UInt32Type>().values().to_vec();
            // The ids are exactly those of tokenising the whole judge prompt (gram-data reuses the
            // ids of its fixed prefix: this is the check that doing so changes nothing).
            let prompt = t.stage2(p.value(i), a.value(i), bb.value(i))?;
            ensure!(
                v == t.encode(&prompt, true)?,
                "row {i}: ids differ from tokenising the whole prompt"
            );
            v.push(lt.value(i));
            let decoded = tok.decode(&v)?;
            let want = format!("{prompt}{}", l.value(i).to_uppercase());
            ensure!(
                decoded == want,
                "row {i}: decoded stage-2 row differs:\n{decoded}\n---\n{want}"
            );
            ensure!(
                want.contains("[User Question]\n")
                    && want.contains("#Preferred:<|im_end|>\n<|im_start|>assistant\n")
            );
            checked += 1;
        }
    }
    ensure!(checked > 500, "only {checked} rows decoded");
    Ok(())
}

#[test]
fn list_specs_make_cross_and_all_pairs() -> Result<()> {
    let root = repo_root();
    let out = scratch("data-lists")?;
    let p = |f: &str| root.join("pipelines").join(f).display().to_string();
    let o1 = out.join("cross");
    let r = gram_data(&[
        "build",
        &p("chosen-rejected-lists.toml"),
        "--out",
        &o1.display().to_string(),
        "--quiet",
        "--valid",
        "0",
        "--test",
        "0",
    ])?;
    ensure!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    ensure!(
        n(&stats(&o1)?["sources"]["chosen-rejected-lists"]["pairs_written"]) == 6,
        "2 chosen x 3 rejected"
    );
    let o2 = out.join("multi");
    // A killed earlier build left its partial folder; the next build clears it.
    let stale = out.join(".multi.partial-4000000000");
    std::fs::create_dir_all(stale.join("stage1"))?;
    let r = gram_data(&[
        "build",
        &p("multi-response.toml"),
        "--out",
        &o2.display().to_string(),
        "--quiet",
    ])?;
    ensure!(!stale.exists(), "stale partial folder not removed");
    ensure!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let s = stats(&o2)?;
    ensure!(
        n(&s["sources"]["multi-response"]["pairs_written"]) == 7,
        "C(4,2) + C(2,2) pairs: {s}"
    );
    ensure!(
        s["stage2"]
            .as_object()
            .is_none_or(|m| m.values().all(|v| v == 0)),
        "unlabeled pairs must not reach stage 2"
    );
    Ok(())
}

/// Runs a one-file build of `spec_body` over `input` bytes; returns (status ok, stderr, out dir).
/// A failed build must have exited with status 1 (the input's fault).
fn run_bad(
    name: &str,
    format: &str,
    columns: &str,
    sql: &str,
    file: &str,
    input: &[u8],
) -> Result<(bool, String, PathBuf)> {
    let dir = scratch(&format!("bad-{name}"))?;
    std::fs::write(dir.join(file), input)?;
    let spec = format!(
        "name = \"{name}\"\n[source]\nformat = \"{format}\"\nfiles = [\"{file}\"]\ncolumns = {columns}\n[map]\nsql = \"\"\"{sql}\"\"\"\n"
    );
    let spec_path = dir.join("spec.toml");
    std::fs::write(&spec_path, spec)?;
    let out = dir.join("out");
    let o = gram_data(&[
        "build",
        &spec_path.display().to_string(),
        "--out",
        &out.display().to_string(),
        "--quiet",
    ])?;
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    // Every failure here is the input's fault: exit status 1, never 2 (ours) or a panic (101).
    ensure!(
        o.status.success() || o.status.code() == Some(1),
        "{name}: exit {:?} for bad input: {stderr}",
        o.status.code()
    );
    Ok((o.status.success(), stderr, out))
}

const COLS: &str = "{ prompt = \"utf8\", chosen = \"utf8\", rejected = \"utf8\" }";
const SQL: &str = "SELECT _file, _row, prompt, chosen AS response_a, rejected AS response_b, 'a' AS label FROM source";

fn reasons(out: &Path) -> Result<Vec<(u64, String)>> {
    let mut v = Vec::new();
    for b in read_parquet_dir(out, "rejects")? {
        let rows = b
            .column_by_name("row")
            .context("row")?
            .as_primitive::<arrow::datatypes::UInt64Type>();
        let r = col(&b, "reason")?;
        for i in 0..b.num_rows() {
            v.push((rows.value(i), r.value(i).to_string()));
        }
    }
    Ok(v)
}

#[test]
fn bad_rows_become_rejects_with_reasons() -> Result<()> {
    let good = r#"{"prompt": "p1", "chosen": "yes", "rejected": "no"}"#;
    let mut input = Vec::new();
    for line in [
        good,
        r#"{"prompt": "p2", "chosen": "yes", "rejected": "no""#, // malformed JSON
        r#"{"prompt": "p3", "chosen": "yes"}"#,                  // missing column
        r#"{"prompt": "p4", "chosen": 7, "rejected": "no"}"#,    // mistyped column
        r#"{"prompt": "p5", "chosen": "same", "rejected": "same"}"#, // identical responses
        good,                                                    // duplicate
    ] {
        input.extend_from_slice(line.as_bytes());
        input.push(b'\n');
    }
    input.extend_from_slice(
        b"{\"prompt\": \"p7\", \"chosen\": \"caf\xe9\", \"rejected\": \"no\"}\n",
    ); // not UTF-8
    let (ok, err, out) = run_bad("rows", "jsonl", COLS, SQL, "in.jsonl", &input)?;
    ensure!(ok, "{err}");
    let r = reasons(&out)?;
    let want = [
        (2, "malformed JSON"),
        (3, "column `rejected` is missing"),
        (4, "column `chosen`: expected a string, got a number"),
        (5, "responses are identical"),
        (6, "duplicate of pair"),
        (7, "not UTF-8"),
    ];
    for (row, text) in want {
        ensure!(
            r.iter().any(|(rr, t)| *rr == row && t.contains(text)),
            "no reject ({row}, {text}) in {r:?}"
        );
    }
    let s = stats(&out)?;
    ensure!(
        n(&s["rows_read"]) == 7 && n(&s["pairs_written"]) == 1 && n(&s["rejected"]) == 6,
        "{s}"
    );

    // A label outside its domain.
    let sql = "SELECT _file, _row, prompt, chosen AS response_a, rejected AS response_b, 'maybe' AS label FROM source";
    let (ok, err, out) = run_bad(
        "label",
        "jsonl",
        COLS,
        sql,
        "in.jsonl",
        format!("{good}\n").as_bytes(),
    )?;
    ensure!(ok, "{err}");
    ensure!(
        reasons(&out)?
            .iter()
            .any(|(_, t)| t.contains("label `maybe` is not one of a, b, tie"))
    );
    Ok(())
}

#[test]
fn bad_files_and_specs_are_one_line_errors() -> Result<()> {
    let good = format!("{}\n", r#"{"prompt": "p", "chosen": "y", "rejected": "n"}"#);
    // Empty file.
    let (ok, err, out) = run_bad("empty", "jsonl", COLS, SQL, "in.jsonl", b"")?;
    ensure!(
        !ok && err.contains("in.jsonl") && err.contains("empty"),
        "{err}"
    );
    ensure!(!out.exists(), "a failed build must leave no output folder");
    // Truncated gzip.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, good.repeat(2000).as_bytes())?;
    let gz = gz.finish()?;
    let (ok, err, _) = run_bad("gz", "jsonl", COLS, SQL, "in.jsonl.gz", &gz[..gz.len() / 2])?;
    ensure!(
        !ok && err.contains("in.jsonl.gz") && err.contains("truncated"),
        "{err}"
    );
    // Truncated Parquet.
    let (ok, err, _) = run_bad(
        "pq",
        "parquet",
        COLS,
        SQL,
        "in.parquet",
        b"PAR1 not really parquet",
    )?;
    ensure!(
        !ok && err.contains("in.parquet") && err.contains("Parquet"),
        "{err}"
    );
    // Unknown format.
    let (ok, err, _) = run_bad("fmt", "xml", COLS, SQL, "in.xml", good.as_bytes())?;
    ensure!(
        !ok && err.contains("spec.toml") && err.contains("xml"),
        "{err}"
    );
    // A spec whose SQL names an unknown column, and bad SQL.
    let (ok, err, _) = run_bad(
        "col",
        "jsonl",
        COLS,
        "SELECT _file, _row, nope AS prompt, chosen AS response_a, rejected AS response_b FROM source",
        "in.jsonl",
        good.as_bytes(),
    )?;
    ensure!(
        !ok && err.contains("spec.toml") && err.contains("nope"),
        "{err}"
    );
    let (ok, err, _) = run_bad(
        "sql",
        "jsonl",
        COLS,
        "SELEC oops",
        "in.jsonl",
        good.as_bytes(),
    )?;
    ensure!(
        !ok && err.contains("spec.toml") && err.contains("sql"),
        "{err}"
    );
    // Missing column in Parquet input: the file lacks a declared column.
    ensure!(
        err.lines().filter(|l| l.starts_with("error")).count() == 1,
        "one line: {err}"
    );
    Ok(())
}

#[test]
fn csv_and_parquet_sources_and_truncation() -> Result<()> {
    // CSV with a header, typed columns parsed from text.
    let csv = "question,good,bad,score\n\"What is 2+2?\",4,5,1\n\"Say hi, politely\",\"Hello, nice to meet you.\",yo,2\nshort,x,y,notanumber\n";
    let cols = "{ question = \"utf8\", good = \"utf8\", bad = \"utf8\", score = \"int64\" }";
    let sql = "SELECT _file, _row, question AS prompt, good AS response_a, bad AS response_b, 'a' AS label FROM source";
    let (ok, err, out) = run_bad("csv", "csv", cols, sql, "in.csv", csv.as_bytes())?;
    ensure!(ok, "{err}");
    let s = stats(&out)?;
    ensure!(n(&s["pairs_written"]) == 2 && n(&s["rejected"]) == 1, "{s}");
    ensure!(
        reasons(&out)?
            .iter()
            .any(|(row, t)| *row == 4 && t.contains("`notanumber` is not an integer")),
        "{:?}",
        reasons(&out)?
    );

    // Parquet: read back a stage-1 shard this tool wrote, with a tokenizer, and a tight token
    // budget so that texts are cut but the template survives.
    let root = repo_root();
    let big = scratch("data-pq")?;
    let long = "word ".repeat(400);
    std::fs::write(
        big.join("in.jsonl"),
        format!(
            "{}\n",
            serde_json::json!({"prompt": format!("Q {long}"), "chosen": format!("A {long}"), "rejected": format!("B {long}")})
        ),
    )?;
    let o = big.join("out");
    let r = gram_data(&[
        "build",
        &root
            .join("pipelines/chosen-rejected.toml")
            .display()
            .to_string(),
        "--input",
        &big.join("in.jsonl").display().to_string(),
        "--out",
        &o.display().to_string(),
        "--model",
        &fixtures().join("smollm2").display().to_string(),
        "--max-tokens",
        "300",
        "--valid",
        "0",
        "--test",
        "0",
        "--quiet",
    ])?;
    ensure!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let s2 = read_parquet_dir(&o.join("stage2"), "train")?;
    let tok = GramTokenizer::from_dir(&fixtures().join("smollm2"))?;
    for b in &s2 {
        let ids = b
            .column_by_name("input_ids")
            .context("input_ids")?
            .as_list::<i32>();
        let tr = b
            .column_by_name("truncated")
            .context("truncated")?
            .as_boolean();
        for i in 0..b.num_rows() {
            let v: Vec<u32> = ids.value(i).as_primitive::<UInt32Type>().values().to_vec();
            ensure!(
                tr.value(i) && v.len() <= 299,
                "row {i}: {} tokens, truncated {}",
                v.len(),
                tr.value(i)
            );
            let text = tok.decode(&v)?;
            ensure!(text.contains(" [...] ") && text.contains("[The End of Assistant B's Answer]\n\n#Preferred:<|im_end|>\n<|im_start|>assistant\n"), "{text}");
        }
    }
    let (ok, err, out) = run_bad(
        "pq",
        "parquet",
        "{ prompt = \"utf8\", response_a = \"utf8\", response_b = \"utf8\" }",
        "SELECT _file, _row, prompt, response_a, response_b FROM source",
        "in.parquet",
        &std::fs::read(o.join("stage1/train-00000.parquet"))?,
    )?;
    ensure!(ok, "{err}");
    ensure!(n(&stats(&out)?["pairs_written"]) == 1);
    // --drop-over rejects instead of cutting.
    let o2 = big.join("out2");
    let r = gram_data(&[
        "build",
        &root
            .join("pipelines/chosen-rejected.toml")
            .display()
            .to_string(),
        "--input",
        &big.join("in.jsonl").display().to_string(),
        "--out",
        &o2.display().to_string(),
        "--model",
        &fixtures().join("smollm2").display().to_string(),
        "--drop-over",
        "300",
        "--quiet",
    ])?;
    ensure!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    // The reject names the input row (line 1), not a placeholder.
    ensure!(
        reasons(&o2)?
            .iter()
            .any(|(row, t)| *row == 1 && t.contains("> --drop-over 300")),
        "{:?}",
        reasons(&o2)?
    );
    Ok(())
}

#[test]
fn byte_order_marks_are_skipped_and_runaway_texts_rejected() -> Result<()> {
    const BOM: &[u8] = b"\xEF\xBB\xBF";
    let with_bom = |body: &str| [BOM, body.as_bytes()].concat();
    let jsonl = "{\"prompt\": \"p1\", \"chosen\": \"yes\", \"rejected\": \"no\"}\n\
                 {\"prompt\": \"p2\", \"chosen\": \"yes\", \"rejected\": \"no\"}\n";
    let json = "[{\"prompt\": \"p1\", \"chosen\": \"yes\", \"rejected\": \"no\"},\
                 {\"prompt\": \"p2\", \"chosen\": \"yes\", \"rejected\": \"no\"}]";
    let csv = "prompt,chosen,rejected\np1,yes,no\np2,yes,no\n";
    for (format, file, body) in [
        ("jsonl", "in.jsonl", jsonl),
        ("json", "in.json", json),
        ("csv", "in.csv", csv),
    ] {
        let (ok, err, out) = run_bad(
            &format!("bom-{format}"),
            format,
            COLS,
            SQL,
            file,
            &with_bom(body),
        )?;
        ensure!(ok, "{format} with a BOM: {err}");
        let s = stats(&out)?;
        ensure!(
            n(&s["pairs_written"]) == 2 && n(&s["rejected"]) == 0,
            "{format} with a BOM: {s} {:?}",
            reasons(&out)?
        );
    }
    // A response of 1.5 MB: rejected with its size, before tokenising; the other row is kept.
    let huge = format!(
        "{{\"prompt\": \"p1\", \"chosen\": \"{}\", \"rejected\": \"no\"}}\n{{\"prompt\": \"p2\", \"chosen\": \"yes\", \"rejected\": \"no\"}}\n",
        "x".repeat(1_500_000)
    );
    let (ok, err, out) = run_bad("huge", "jsonl", COLS, SQL, "in.jsonl", huge.as_bytes())?;
    ensure!(ok, "{err}");
    let r = reasons(&out)?;
    ensure!(
        r.len() == 1
            && r[0].0 == 1
            && r[0]
                .1
                .contains("response_a is 1500000 bytes, over --max-text-bytes"),
        "{r:?}"
    );
    ensure!(n(&stats(&out)?["pairs_written"]) == 1);
    Ok(())
}
