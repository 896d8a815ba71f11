//! `gram-score serve` on the tiny exported judge, as an RLHF trainer and a hostile client use
//! it: concurrent OpenRLHF-shaped requests get the library's rewards; per-item references from
//! `labels`; queries that do not start with their prompt; bad requests; fairness between a big
//! and a small request; slow clients; /metrics; SIGTERM drains.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use crate::common::bin;
use crate::score::{judge, words};

/// One HTTP/1.1 request on loopback; returns (status, body).
fn http(
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    read_response(&mut s)
}

fn read_response(s: &mut TcpStream) -> Result<(u16, String)> {
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status: u16 = resp
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn post(addr: &str, path: &str, body: &Value) -> Result<(u16, Value)> {
    let (st, out) = http(addr, "POST", path, "application/json", &body.to_string())?;
    let v = serde_json::from_str(&out).with_context(|| format!("{path}: {st} {out}"))?;
    Ok((st, v))
}

/// A running server; killed when dropped.
struct Server {
    child: Child,
    addr: String,
    log: mpsc::Receiver<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `gram-score serve` on the tiny judge with `args`, and waits for it to listen.
fn start(args: &[&str]) -> Result<Server> {
    let mut child = Command::new(bin("gram-score")?)
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--max-wait-ms",
            "20",
            "--model",
        ])
        .arg(judge()?)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, log) = mpsc::channel();
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .context("the server exited before listening")??;
        if let Some(a) = line.split("http://").nth(1) {
            break a.trim().to_string();
        }
    };
    // Keep draining its stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || {
        for l in lines.map_while(std::result::Result::ok) {
            let _ = tx.send(l);
        }
    });
    Ok(Server { child, addr, log })
}

/// Whether a reward read from JSON is the library's f32 (JSON carries its shortest decimal).
fn same_f32(json: f64, library: f64) -> bool {
    (json as f32).to_bits() == (library as f32).to_bits()
}

fn floats(v: &Value) -> Vec<Option<f64>> {
    v.as_array()
        .map_or(Vec::new(), |a| a.iter().map(Value::as_f64).collect())
}

/// Both-order scores of (prompt, response, reference) from the library in this process, scored
/// together (a server batches them with other requests' pairs: the scores must not change).
fn expected(pairs: &[(&str, &str, &str)]) -> Result<Vec<f64>> {
    let judge = gram_score::Judge::open(
        judge()?,
        gram_score::Threads::split(1, 1),
        gram_score::BatchLimits::default(),
    )?;
    judge
        .score_pairs(pairs)?
        .into_iter()
        .map(|r| {
            r.map(|s| f64::from(s.score_a))
                .map_err(|e| anyhow::anyhow!(e))
        })
        .collect()
}

#[test]
fn server_answers_concurrent_clients_and_rejects_bad_requests() -> Result<()> {
    let server = start(&["--reference", "The default reference."])?;
    let addr = server.addr.clone();
    let (st, body) = http(&addr, "GET", "/health", "text/plain", "")?;
    ensure!(st == 200 && body.contains("\"ok\""), "health: {st} {body}");

    let (clients, per_client) = (8, 6);
    let t0 = Instant::now();
    let results: Vec<Result<usize>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..clients)
            .map(|c| {
                let addr = addr.clone();
                s.spawn(move || -> Result<usize> {
                    let mut seed = 1000 + c as u64;
                    for r in 0..per_client {
                        let n = 1 + (c + r) % 4;
                        let prompts: Vec<String> = (0..n).map(|_| words(&mut seed, 5)).collect();
                        let resp: Vec<String> = (0..n).map(|_| words(&mut seed, 3 + r)).collect();
                        let refs: Vec<String> = (0..n).map(|_| words(&mut seed, 4)).collect();
                        let query: Vec<String> = prompts
                            .iter()
                            .zip(&resp)
                            .map(|(p, x)| format!("{p}{x}"))
                            .collect();
                        let (st, v) = post(
                            &addr,
                            "/get_reward",
                            &json!({"query": query, "prompts": prompts, "references": refs}),
                        )?;
                        ensure!(st == 200, "client {c} request {r}: {st} {v}");
                        let got = floats(&v["rewards"]);
                        ensure!(
                            got == floats(&v["scores"]),
                            "scores differ from rewards: {v}"
                        );
                        let pairs: Vec<(&str, &str, &str)> = (0..n)
                            .map(|i| (prompts[i].as_str(), resp[i].as_str(), refs[i].as_str()))
                            .collect();
                        let want = expected(&pairs)?;
                        ensure!(got.len() == n, "client {c}: {} rewards for {n}", got.len());
                        for (g, w) in got.iter().zip(want) {
                            let g = g.context("null reward")?;
                            ensure!(same_f32(g, w), "client {c}: reward {g} vs {w}");
                        }
                    }
                    Ok(per_client)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("client panicked")))
            })
            .collect()
    });
    let mut done = 0;
    for r in results {
        done += r?;
    }
    println!(
        "server: {done} requests from {clients} concurrent clients, 0 errors, {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    // The server's default reference and the typed pairs endpoint.
    let (st, v) = post(
        &addr,
        "/get_reward",
        &json!({"query": ["Q? A."], "prompts": ["Q?"]}),
    )?;
    ensure!(st == 200 && floats(&v["rewards"])[0].is_some(), "{st} {v}");
    let (st, v) = post(
        &addr,
        "/score/pairs",
        &json!({"pairs": [{"prompt": "Q?", "response_a": "yes", "response_b": "no"}]}),
    )?;
    ensure!(st == 200 && v["scores"][0]["score_a"].is_f64(), "{st} {v}");

    let bad: &[(&str, &str, &str, &str)] = &[
        ("POST", "/get_reward", "application/json", "{not json"),
        (
            "POST",
            "/get_reward",
            "application/json",
            r#"{"prompts": ["x"]}"#,
        ),
        (
            "POST",
            "/get_reward",
            "application/json",
            r#"{"query": ["a", "b"], "prompts": ["a"]}"#,
        ),
        (
            "POST",
            "/get_reward",
            "application/json",
            r#"{"query": ["a"], "labels": ["x", "y"]}"#,
        ),
        ("POST", "/get_reward", "text/plain", r#"{"query": ["a"]}"#),
        (
            "POST",
            "/get_reward",
            "application/json",
            r#"{"query": "not a list"}"#,
        ),
        (
            "POST",
            "/get_reward",
            "application/json",
            "{\"query\": [\"\u{0}\"], \"prompts\": 7}",
        ),
        (
            "POST",
            "/score/pairs",
            "application/json",
            r#"{"pairs": [{"prompt": "x"}]}"#,
        ),
        ("GET", "/get_reward", "application/json", ""),
        ("POST", "/nope", "application/json", "{}"),
    ];
    for (m, p, ct, body) in bad {
        let (st, out) = http(&addr, m, p, ct, body)?;
        ensure!(
            (400..500).contains(&st),
            "{m} {p} {body:?}: status {st} {out}"
        );
    }
    // Not UTF-8.
    let mut s = TcpStream::connect(&addr)?;
    s.write_all(b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 14\r\nConnection: close\r\n\r\n{\"query\":[\"\xff\"]}")?;
    let (st, out) = read_response(&mut s)?;
    ensure!(
        (400..500).contains(&st) && out.contains("error"),
        "non-UTF-8 body: {st} {out}"
    );
    let (st, _) = http(&addr, "GET", "/health", "text/plain", "")?;
    ensure!(st == 200, "the server did not survive bad requests");
    Ok(())
}

#[test]
fn openrlhf_requests_take_labels_split_loosely_and_never_fail_whole() -> Result<()> {
    let server = start(&["--reference-from", "labels"])?;
    let addr = &server.addr;
    let p = [
        "Name a river.",
        "What is  the capital\nof France?",
        "Write a haiku about snow.",
        "",
        "\n\nBlank lines first.",
        "  Two spaces.",
        "\t\tTwo tabs.",
    ];
    let r = [
        "The Nile.",
        "Paris.",
        "White on white, hush.",
        "Just an answer.",
        "OK.",
        "Sure.",
        "Fine.",
    ];
    let refs = [
        "The Amazon.",
        "Lyon.",
        "Snow falls.",
        "Another answer.",
        "No.",
        "Never.",
        "Bad.",
    ];
    // Queries as a trainer decodes them: spacing changed, the prompt cut short, a stray one.
    let mut query: Vec<String> = p.iter().zip(&r).map(|(p, r)| format!("{p}{r}")).collect();
    query[1] = format!("What is the capital of France? {}", r[1]);
    query[2] = format!("Write a haiku about{}", r[2]);
    let mut prompts: Vec<String> = p.iter().map(|s| s.to_string()).collect();
    query.push("Something else entirely".into());
    prompts.push("A prompt this query does not start with".into());
    let mut labels: Vec<Value> = refs.iter().map(|s| json!(s)).collect();
    labels.push(json!("x"));
    let body =
        json!({"query": query, "prompts": prompts, "labels": labels, "future_field": {"x": 1}});
    let (st, v) = post(addr, "/get_reward", &body)?;
    ensure!(st == 200, "{st} {v}");
    let got = floats(&v["rewards"]);
    ensure!(
        got.len() == query.len() && got == floats(&v["scores"]),
        "{v}"
    );
    let mut pairs: Vec<(&str, &str, &str)> = (0..p.len()).map(|i| (p[i], r[i], refs[i])).collect();
    // Cut prompts are scored as the request gave them; spacing is the response's own.
    pairs[1].1 = r[1];
    pairs[2].1 = r[2];
    let want = expected(&pairs)?;
    for (i, w) in want.iter().enumerate() {
        let g = got[i]
            .with_context(|| format!("item {i} has no reward: {}", v["extra_logs"]["error"][i]))?;
        // Items 1 and 2 reach the judge with the query's spacing, not the plain texts': close.
        let close = if i == 1 || i == 2 {
            (g - w).abs() <= 1e-5
        } else {
            same_f32(g, *w)
        };
        ensure!(close, "item {i}: reward {g}, the library gives {w}");
        let (pf, ps) = (
            v["extra_logs"]["p_first"][i].as_f64(),
            v["extra_logs"]["p_second"][i].as_f64(),
        );
        let (pf, ps) = (pf.context("p_first")?, ps.context("p_second")?);
        ensure!(
            ((pf + ps) / 2.0 - g).abs() <= 1e-5,
            "item {i}: p_first {pf}, p_second {ps}, reward {g}"
        );
        ensure!(v["extra_logs"]["truncated"][i] == json!(false), "{v}");
    }
    let last = query.len() - 1;
    ensure!(
        got[last].is_none(),
        "a query without its prompt was scored: {v}"
    );
    let why = v["extra_logs"]["error"][last].as_str().unwrap_or_default();
    ensure!(
        why.contains("does not start with its prompt"),
        "reason: {why:?}"
    );

    // A label that is not a string fails its item only; no prompts at all is allowed.
    let (st, v) = post(
        addr,
        "/get_reward",
        &json!({"query": ["A.", "B."], "labels": [7, "ref"]}),
    )?;
    ensure!(st == 200 && got_some(&v) == [false, true], "{st} {v}");
    ensure!(
        v["extra_logs"]["error"][0]
            .as_str()
            .is_some_and(|e| e.contains("labels[0]")),
        "{v}"
    );

    // One OpenRLHF-sized request: cut into batches, not refused.
    let n = 4096;
    let q: Vec<String> = (0..n).map(|i| format!("Q{i}? A{}.", i % 7)).collect();
    let ps: Vec<String> = (0..n).map(|i| format!("Q{i}?")).collect();
    let ls: Vec<String> = (0..n).map(|i| format!("B{}.", i % 5)).collect();
    let t = Instant::now();
    let (st, v) = post(
        addr,
        "/get_reward",
        &json!({"query": q, "prompts": ps, "labels": ls}),
    )?;
    ensure!(
        st == 200 && got_some(&v).iter().all(|&x| x) && got_some(&v).len() == n,
        "{n} items: {st}"
    );
    println!(
        "one request of {n} items: {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let (st, m) = http(addr, "GET", "/metrics", "text/plain", "")?;
    ensure!(st == 200, "metrics: {st}");
    let value = |name: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|x| x.parse().ok())
            .unwrap_or(-1.0)
    };
    ensure!(
        value("gram_score_http_requests_total{path=\"/get_reward\",status=\"200\"}") == 3.0,
        "{m}"
    );
    ensure!(
        value("gram_score_items_scored_total") >= n as f64 + 8.0,
        "{m}"
    );
    ensure!(value("gram_score_items_failed_total") == 2.0, "{m}");
    ensure!(
        m.contains("gram_score_batch_pairs_bucket")
            && m.contains("gram_score_http_request_duration_seconds_bucket"),
        "{m}"
    );
    // The unknown field was logged, once.
    let log: Vec<String> = server.log.try_iter().collect();
    ensure!(
        log.iter().filter(|l| l.contains("future_field")).count() == 1,
        "{log:#?}"
    );
    ensure!(
        log.iter().any(|l| l.contains("/get_reward")
            && l.contains("status=200")
            && l.contains("items=4096")),
        "no request line: {log:#?}"
    );
    Ok(())
}

fn got_some(v: &Value) -> Vec<bool> {
    floats(&v["rewards"]).iter().map(Option::is_some).collect()
}

/// `n` OpenRLHF-shaped items with long responses: (body, items).
fn big_request(n: usize, seed: u64) -> Value {
    let mut seed = seed;
    let q: Vec<String> = (0..n)
        .map(|i| format!("P{i}: {}", words(&mut seed, 60)))
        .collect();
    let p: Vec<String> = (0..n).map(|i| format!("P{i}: ")).collect();
    json!({"query": q, "prompts": p, "references": vec!["A reference."; n]})
}

#[test]
fn small_requests_overtake_big_ones_and_sigterm_drains() -> Result<()> {
    let mut server = start(&["--max-batch", "16"])?;
    let addr = server.addr.clone();
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| -> Result<()> {
        let (a, t) = (addr.clone(), tx.clone());
        s.spawn(move || {
            let r = post(&a, "/get_reward", &big_request(1500, 1));
            let _ = t.send(("big", r.map(|(st, v)| (st, got_some(&v).len()))));
        });
        std::thread::sleep(Duration::from_millis(500));
        let (a, t) = (addr.clone(), tx.clone());
        s.spawn(move || {
            let body = json!({"query": ["Q? A."], "prompts": ["Q?"], "references": ["B."]});
            let r = post(&a, "/get_reward", &body);
            let _ = t.send(("small", r.map(|(st, v)| (st, got_some(&v).len()))));
        });
        let first = rx.recv_timeout(Duration::from_secs(600))?;
        let second = rx.recv_timeout(Duration::from_secs(600))?;
        ensure!(
            first.0 == "small",
            "the 1-item request waited for the 1500-item one"
        );
        for (name, r) in [first, second] {
            let (st, k) = r?;
            ensure!(
                st == 200 && k == if name == "big" { 1500 } else { 1 },
                "{name}: {st}, {k} rewards"
            );
        }
        Ok(())
    })?;

    // SIGTERM while a request is being scored: it still gets every reward, and the server exits 0.
    let (a, t) = (addr.clone(), tx.clone());
    let client = std::thread::spawn(move || {
        let r = post(&a, "/get_reward", &big_request(600, 2));
        let _ = t.send((
            "drained",
            r.map(|(st, v)| (st, got_some(&v).iter().filter(|&&x| x).count())),
        ));
    });
    // Long enough for the request to arrive, well short of scoring 600 pairs.
    std::thread::sleep(Duration::from_millis(700));
    let pid = server.child.id().to_string();
    ensure!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()?
            .success(),
        "kill -TERM"
    );
    let (_, r) = rx.recv_timeout(Duration::from_secs(600))?;
    let (st, k) = r?;
    ensure!(
        st == 200 && k == 600,
        "the request in flight at SIGTERM: {st}, {k} of 600 rewards"
    );
    let _ = client.join();
    let status = server.child.wait()?;
    ensure!(
        status.success(),
        "after SIGTERM the server exited with {status}"
    );
    // New connections are refused once it has stopped.
    ensure!(
        TcpStream::connect(&addr).is_err(),
        "still accepting after SIGTERM"
    );
    Ok(())
}

#[test]
fn slow_and_idle_clients_are_cut_off() -> Result<()> {
    let server = start(&[
        "--read-timeout-s",
        "2",
        "--max-connections",
        "3",
        "--reference",
        "R.",
    ])?;
    let addr = &server.addr;
    // Two connections that never send a byte, one that sends headers and then no body.
    let idle: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(addr))
        .collect::<std::io::Result<_>>()?;
    let mut stalled = TcpStream::connect(addr)?;
    stalled.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        stalled,
        "POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"query\""
    )?;
    // All three slots are taken; this request is answered once the server drops the others.
    let (st, v) = post(
        addr,
        "/get_reward",
        &json!({"query": ["Q? A."], "prompts": ["Q?"]}),
    )?;
    ensure!(st == 200, "{st} {v}");
    let (st, out) = read_response(&mut stalled)?;
    ensure!(
        st == 408 && out.contains("did not arrive"),
        "a body that never came: {st} {out}"
    );
    for mut c in idle {
        c.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut buf = [0u8; 64];
        // Closed by the server: end of stream (or a reset).
        let n = c.read(&mut buf).unwrap_or(0);
        ensure!(
            n == 0 || buf.starts_with(b"HTTP/1.1 408"),
            "an idle connection got {:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    Ok(())
}

#[test]
fn chat_markup_is_stripped_before_splitting() -> Result<()> {
    let policy = crate::common::fixtures().join("smollm2");
    let server = start(&[
        "--strip-chat-template",
        &policy.display().to_string(),
        "--reference",
        "Rome.",
    ])?;
    // What OpenRLHF sends for a chat policy: the rendered prompt, and the same with the
    // decoded response and end-of-turn appended.
    let tok = gram_core::GramTokenizer::from_dir(&policy)?;
    let template = tok
        .chat_template
        .as_ref()
        .context("SmolLM2 has a chat template")?;
    let prompt = template.render(&[gram_core::chat::Message::user("Name a river.")], true)?;
    let query = format!("{prompt}The Nile.<|im_end|>\n");
    let (st, v) = post(
        &server.addr,
        "/get_reward",
        &json!({"query": [query], "prompts": [prompt]}),
    )?;
    ensure!(st == 200, "{st} {v}");
    let got = floats(&v["rewards"])[0].context("no reward")?;
    let want = expected(&[("Name a river.", "The Nile.", "Rome.")])?[0];
    ensure!(
        (got - want).abs() <= 1e-5,
        "stripped reward {got}, plain texts give {want}"
    );
    Ok(())
}
