//! `gram-score serve`: rewards over HTTP.
//!
//! - `POST /get_reward` — OpenRLHF's remote reward-model API: `{"query": [...], "prompts": [...],
//!   "labels": [...], "references": [...]}` -> `{"rewards": [...], "scores": [...],
//!   "extra_logs": {"p_first", "p_second", "truncated", "error"}}`. Each query is its prompt
//!   followed by the response ([`split::response`] finds where; without `prompts` the prompt is
//!   empty); the reward is the response's both-order score against its reference: `labels[i]`
//!   with `--reference-from labels`, else `references[i]`, else the server's `--reference`. An
//!   item that cannot be scored gets a null reward and its reason in `extra_logs.error`; the
//!   others are scored. Unknown fields are accepted (and logged once).
//! - `POST /score/pairs` — `{"pairs": [{"prompt", "response_a", "response_b"}]}` ->
//!   `{"scores": [{"score_a", "p_a_first", "p_a_second", "truncated", "error"}]}`.
//! - `GET /health`, `GET /metrics` (Prometheus / OpenMetrics text).
//!
//! Pairs from all requests are batched together, each request taking an equal share of every
//! batch ([`batcher`]); a request of any size is cut into batches. Bad requests get a 4xx with
//! `{"error": reason}`; onnxruntime failing a batch gives the requests in it a 500 with the
//! reason; nothing stops the server but Ctrl-C or SIGTERM, which drain it.

pub mod batcher;
pub mod listen;
pub mod metrics;
pub mod split;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::judge::{Judge, PairScore};
use batcher::{Done, ItemResult, Job, Pair};
use metrics::Metrics;
use split::ChatMarkup;

/// Where `/get_reward` finds each item's reference response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ReferenceFrom {
    /// The request's `references`, else the server's `--reference`.
    #[default]
    References,
    /// The request's `labels` (OpenRLHF's per-prompt field): `labels[i]` is the reference.
    Labels,
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Listen address.
    pub addr: SocketAddr,
    /// Reference response for `/get_reward` requests that bring none.
    pub reference: Option<String>,
    /// Where per-item references come from.
    pub reference_from: ReferenceFrom,
    /// Chat markup to strip from queries and prompts before splitting them.
    pub strip: Option<ChatMarkup>,
    /// Batching.
    pub batch: batcher::Limits,
    /// Most items in one request (larger ones are refused; smaller ones are cut into batches).
    pub max_items: usize,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Longest time to receive a request body once its headers are in.
    pub body_timeout: Duration,
    /// Connection limits.
    pub conn: listen::ConnLimits,
}

struct AppState {
    queue: mpsc::Sender<Job>,
    opts: ServeOptions,
    model: String,
    sessions: usize,
    metrics: Arc<Metrics>,
    /// Unknown request fields already logged.
    seen_fields: Mutex<HashSet<String>>,
}

/// An error answer.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        ApiError(r.status(), r.body_text())
    }
}

fn bad(m: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, m)
}

/// What the request log line reports besides path and status.
#[derive(Clone, Copy, Default)]
struct Work {
    items: usize,
    queue_wait: Duration,
    scoring: Duration,
}

type Extra = serde_json::Map<String, serde_json::Value>;

#[derive(Deserialize)]
struct RewardRequest {
    query: Vec<String>,
    #[serde(default)]
    prompts: Option<Vec<String>>,
    #[serde(default)]
    references: Option<Vec<String>>,
    #[serde(default)]
    labels: Option<Vec<serde_json::Value>>,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Serialize, Default)]
struct ExtraLogs {
    p_first: Vec<Option<f32>>,
    p_second: Vec<Option<f32>>,
    truncated: Vec<Option<bool>>,
    error: Vec<Option<String>>,
}

#[derive(Serialize)]
struct RewardResponse {
    rewards: Vec<Option<f32>>,
    scores: Vec<Option<f32>>,
    extra_logs: ExtraLogs,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PairIn {
    prompt: String,
    response_a: String,
    response_b: String,
}

#[derive(Deserialize)]
struct PairsRequest {
    pairs: Vec<PairIn>,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Serialize)]
struct PairOut {
    score_a: Option<f32>,
    p_a_first: Option<f32>,
    p_a_second: Option<f32>,
    truncated: Option<bool>,
    error: Option<String>,
}

#[derive(Serialize)]
struct PairsResponse {
    scores: Vec<PairOut>,
}

impl AppState {
    /// Logs each unknown field name the first time a request brings it.
    fn note_unknown(&self, path: &str, extra: &Extra) {
        let mut seen = self.seen_fields.lock().unwrap_or_else(|p| p.into_inner());
        for k in extra.keys() {
            if seen.len() < 1024 && seen.insert(format!("{path} {k}")) {
                tracing::warn!(path, field = %k, "ignoring an unknown request field (logged once)");
            }
        }
    }

    fn check_size(&self, n: usize, what: &str) -> Result<(), ApiError> {
        if n > self.opts.max_items {
            return Err(bad(format!(
                "{n} {what}; at most {} per request (--max-items)",
                self.opts.max_items
            )));
        }
        Ok(())
    }

    /// Scores the pairs of the items that have one (`Ok`); the others keep their reason.
    async fn score(
        &self,
        items: Vec<Result<Pair, String>>,
    ) -> Result<(Vec<ItemResult>, Work), ApiError> {
        let mut work = Work {
            items: items.len(),
            ..Work::default()
        };
        // The pairs move to the batcher; each item keeps only its reason when it has no pair.
        let mut pairs: Vec<Pair> = Vec::with_capacity(items.len());
        let reasons: Vec<Option<String>> = items
            .into_iter()
            .map(|i| match i {
                Ok(p) => {
                    pairs.push(p);
                    None
                }
                Err(e) => Some(e),
            })
            .collect();
        let mut scored = if pairs.is_empty() {
            Vec::new().into_iter()
        } else {
            let (reply, rx) = oneshot::channel();
            self.queue.send(Job { pairs, reply }).await.map_err(|_| {
                ApiError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the scorer has stopped".into(),
                )
            })?;
            let done: Done = rx.await.map_err(|_| {
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the scorer dropped the request".into(),
                )
            })?;
            work.queue_wait = done.queue_wait;
            work.scoring = done.scoring;
            let scores = done.scores.map_err(|e| {
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("scoring failed: {e}"),
                )
            })?;
            scores.into_iter()
        };
        let out: Vec<ItemResult> = reasons
            .into_iter()
            .map(|r| match r {
                Some(e) => Err(e),
                None => scored
                    .next()
                    .unwrap_or_else(|| Err("no score came back".into())),
            })
            .collect();
        let failed = out.iter().filter(|r| r.is_err()).count() as u64;
        self.metrics
            .items(out.len() as u64 - failed, failed, work.queue_wait);
        Ok((out, work))
    }

    /// The reference of item `i`.
    fn reference(&self, req: &RewardRequest, i: usize) -> Result<String, String> {
        match self.opts.reference_from {
            ReferenceFrom::Labels => match req.labels.as_ref().map(|l| &l[i]) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(v) => Err(format!("labels[{i}] is not a string but {v}")),
                None => Err("no labels (the server takes references from labels)".into()),
            },
            ReferenceFrom::References => match (&req.references, &self.opts.reference) {
                (Some(r), _) => Ok(r[i].clone()),
                (None, Some(r)) => Ok(r.clone()),
                (None, None) => Err("no reference".into()),
            },
        }
    }

    /// (prompt, response, reference) of item `i`, or why there is none.
    fn item(&self, req: &RewardRequest, i: usize) -> Result<Pair, String> {
        let stripped = |t: &str| match &self.opts.strip {
            Some(m) => m.strip(t),
            None => t.to_string(),
        };
        let query = stripped(&req.query[i]);
        let prompt = req
            .prompts
            .as_ref()
            .map_or(String::new(), |p| stripped(&p[i]));
        let response = split::response(&query, &prompt)?.to_string();
        Ok((prompt, response, self.reference(req, i)?))
    }
}

async fn get_reward(
    State(state): State<Arc<AppState>>,
    body: Result<Json<RewardRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    state.note_unknown("/get_reward", &req.extra);
    let n = req.query.len();
    state.check_size(n, "queries")?;
    for (name, len) in [
        ("prompts", req.prompts.as_ref().map(Vec::len)),
        ("references", req.references.as_ref().map(Vec::len)),
        ("labels", req.labels.as_ref().map(Vec::len)),
    ] {
        if let Some(k) = len
            && k != n
        {
            return Err(bad(format!("{k} {name} for {n} queries")));
        }
    }
    match state.opts.reference_from {
        ReferenceFrom::Labels if req.labels.is_none() => {
            return Err(bad("no `labels`: this server takes each reference from labels[i] (--reference-from labels)".into()));
        }
        ReferenceFrom::References if req.references.is_none() && state.opts.reference.is_none() => {
            return Err(bad(
                "no reference response: send `references` or start the server with --reference"
                    .into(),
            ));
        }
        _ => {}
    }
    let items = (0..n).map(|i| state.item(&req, i)).collect();
    let (results, work) = state.score(items).await?;
    let mut logs = ExtraLogs::default();
    let mut rewards = Vec::with_capacity(n);
    for r in results {
        let s = r.as_ref().ok();
        rewards.push(s.map(|s| s.score_a));
        logs.p_first.push(s.map(|s| s.p_ab));
        logs.p_second.push(s.map(PairScore::p_a_second));
        logs.truncated.push(s.map(|s| s.truncated));
        logs.error.push(r.err());
    }
    let body = RewardResponse {
        scores: rewards.clone(),
        rewards,
        extra_logs: logs,
    };
    Ok(with_work(body, work))
}

/// A JSON answer carrying the work behind it for the request's log line.
fn with_work(body: impl Serialize, work: Work) -> Response {
    let mut resp = Json(body).into_response();
    resp.extensions_mut().insert(work);
    resp
}

async fn score_pairs(
    State(state): State<Arc<AppState>>,
    body: Result<Json<PairsRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    state.note_unknown("/score/pairs", &req.extra);
    state.check_size(req.pairs.len(), "pairs")?;
    let items = req
        .pairs
        .into_iter()
        .map(|p| Ok((p.prompt, p.response_a, p.response_b)))
        .collect();
    let (results, work) = state.score(items).await?;
    let scores = results
        .into_iter()
        .map(|r| {
            let s = r.as_ref().ok();
            PairOut {
                score_a: s.map(|s| s.score_a),
                p_a_first: s.map(|s| s.p_ab),
                p_a_second: s.map(PairScore::p_a_second),
                truncated: s.map(|s| s.truncated),
                error: r.err(),
            }
        })
        .collect();
    Ok(with_work(PairsResponse { scores }, work))
}

async fn health(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok", "model": state.model, "sessions": state.sessions }))
}

async fn get_metrics(State(state): State<Arc<AppState>>) -> Response {
    let ct = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    ([(header::CONTENT_TYPE, ct)], state.metrics.encode()).into_response()
}

/// Reads the whole body within the body timeout and size limit before any handler runs, so a
/// client that stops sending cannot hold a connection.
async fn read_body(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let limit = state.opts.max_body_bytes;
    match tokio::time::timeout(state.opts.body_timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => ApiError(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {:?}",
                state.opts.body_timeout
            ),
        )
        .into_response(),
        Ok(Err(e)) => {
            let too_big = std::error::Error::source(&e)
                .is_some_and(|s| s.to_string().contains("length limit"));
            if too_big {
                ApiError(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body is over {limit} bytes (--max-body-mb)"),
                )
            } else {
                bad(format!("reading the request body: {e}"))
            }
            .into_response()
        }
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
    }
}

/// Milliseconds to 0.1.
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// One log line and the metrics of every request.
async fn log_request(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    let took = start.elapsed();
    let status = resp.status().as_u16();
    let w = resp.extensions().get::<Work>().copied().unwrap_or_default();
    state.metrics.request(&path, status, took);
    tracing::info!(
        path,
        status,
        items = w.items,
        queue_wait_ms = ms(w.queue_wait),
        scoring_ms = ms(w.scoring),
        total_ms = ms(took),
        "request"
    );
    resp
}

/// The router, with its batcher started on the current runtime.
pub fn router(judge: Arc<Judge>, opts: &ServeOptions) -> (Router, Arc<Metrics>) {
    let (tx, rx) = mpsc::channel(1024);
    let metrics = Arc::new(Metrics::default());
    tokio::spawn(batcher::run(judge.clone(), rx, opts.batch, metrics.clone()));
    let state = Arc::new(AppState {
        queue: tx,
        opts: opts.clone(),
        model: judge.dir.display().to_string(),
        sessions: judge.sessions(),
        metrics: metrics.clone(),
        seen_fields: Mutex::new(HashSet::new()),
    });
    let router = Router::new()
        .route("/get_reward", post(get_reward))
        .route("/score/pairs", post(score_pairs))
        .route("/health", get(health))
        .route("/metrics", get(get_metrics))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            read_body,
        ))
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            log_request,
        ))
        .with_state(state);
    (router, metrics)
}

/// Serves until Ctrl-C or SIGTERM, then drains: no new connections, every request in flight
/// answered.
pub async fn serve(judge: Arc<Judge>, opts: ServeOptions) -> crate::Result<()> {
    let listener = tokio::net::TcpListener::bind(opts.addr)
        .await
        .map_err(|e| crate::Error::Input(format!("cannot listen on {}: {e}", opts.addr)))?;
    let local = listener
        .local_addr()
        .map_err(|e| crate::Error::Runtime(e.to_string()))?;
    let (app, metrics) = router(judge, &opts);
    // The line tests and scripts wait for.
    eprintln!("gram-score: listening on http://{local}");
    listen::run(listener, app, opts.conn, metrics, listen::signal()).await;
    eprintln!("gram-score: stopped");
    Ok(())
}
