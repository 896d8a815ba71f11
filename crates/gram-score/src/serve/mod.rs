//! `gram-score serve`: rewards over HTTP.
//!
//! - `POST /get_reward` — OpenRLHF's remote reward-model API: `{"query": [...], "prompts": [...],
//!   "references": [...]}` -> `{"rewards": [...]}`. Each query is the prompt followed by the
//!   response (`prompts[i]` is cut off its front; without `prompts` the prompt is empty); the
//!   reward is the response's both-order score against its reference (`references[i]`, else the
//!   server's `--reference`).
//! - `POST /score/pairs` — `{"pairs": [{"prompt", "response_a", "response_b"}]}` ->
//!   `{"scores": [{"score_a", "p_a_first", "p_a_second", "truncated"}]}`.
//! - `GET /health` — `{"status": "ok", ...}`.
//!
//! Requests are batched dynamically: pairs from concurrent requests are gathered until
//! `max_batch` pairs or `max_wait` have passed, scored together, and the answers split back.
//! Bad requests get a 4xx status with `{"error": reason}`; a scoring failure of one pair gives
//! that request a 422 with the reason, never a crash.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::judge::{Judge, PairScore};

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Listen address.
    pub addr: SocketAddr,
    /// Reference response for `/get_reward` requests that bring none.
    pub reference: Option<String>,
    /// Most pairs scored together.
    pub max_batch: usize,
    /// Longest wait for more requests before scoring a partial batch.
    pub max_wait: Duration,
    /// Most items in one request.
    pub max_items: usize,
}

type Pair = (String, String, String);
type Reply = oneshot::Sender<Vec<std::result::Result<PairScore, String>>>;

struct AppState {
    queue: mpsc::Sender<(Vec<Pair>, Reply)>,
    reference: Option<String>,
    max_items: usize,
    model: String,
    sessions: usize,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RewardRequest {
    query: Vec<String>,
    #[serde(default)]
    prompts: Option<Vec<String>>,
    #[serde(default)]
    references: Option<Vec<String>>,
    /// OpenRLHF sends labels for rule-based rewards; a judge does not use them.
    #[serde(default)]
    #[allow(dead_code)]
    labels: Option<serde_json::Value>,
}

#[derive(Serialize)]
struct RewardResponse {
    rewards: Vec<f32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PairIn {
    prompt: String,
    response_a: String,
    response_b: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PairsRequest {
    pairs: Vec<PairIn>,
}

#[derive(Serialize)]
struct PairOut {
    score_a: f32,
    p_a_first: f32,
    p_a_second: f32,
    truncated: bool,
}

#[derive(Serialize)]
struct PairsResponse {
    scores: Vec<PairOut>,
}

async fn score(state: &AppState, pairs: Vec<Pair>) -> Result<Vec<PairScore>, ApiError> {
    if pairs.is_empty() {
        return Ok(Vec::new());
    }
    let (tx, rx) = oneshot::channel();
    state.queue.send((pairs, tx)).await.map_err(|_| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the scorer has stopped".into(),
        )
    })?;
    let results = rx.await.map_err(|_| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "scoring failed; see the server log".into(),
        )
    })?;
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.map_err(|e| ApiError(StatusCode::UNPROCESSABLE_ENTITY, format!("item {i}: {e}")))
        })
        .collect()
}

async fn get_reward(
    State(state): State<Arc<AppState>>,
    body: Result<Json<RewardRequest>, JsonRejection>,
) -> Result<Json<RewardResponse>, ApiError> {
    let Json(req) = body?;
    let n = req.query.len();
    let bad = |m: String| ApiError(StatusCode::BAD_REQUEST, m);
    if n > state.max_items {
        return Err(bad(format!(
            "{n} queries; at most {} per request",
            state.max_items
        )));
    }
    if let Some(p) = &req.prompts
        && p.len() != n
    {
        return Err(bad(format!("{} prompts for {n} queries", p.len())));
    }
    if let Some(r) = &req.references
        && r.len() != n
    {
        return Err(bad(format!("{} references for {n} queries", r.len())));
    }
    let mut pairs = Vec::with_capacity(n);
    for (i, q) in req.query.into_iter().enumerate() {
        let prompt = req.prompts.as_ref().map_or("", |p| p[i].as_str());
        let response = q
            .strip_prefix(prompt)
            .ok_or_else(|| bad(format!("query {i} does not start with prompts[{i}]")))?
            .to_string();
        let reference = match (&req.references, &state.reference) {
            (Some(r), _) => r[i].clone(),
            (None, Some(r)) => r.clone(),
            (None, None) => {
                return Err(bad(
                    "no reference response: send `references` or start the server with --reference"
                        .into(),
                ));
            }
        };
        pairs.push((prompt.to_string(), response, reference));
    }
    let scores = score(&state, pairs).await?;
    Ok(Json(RewardResponse {
        rewards: scores.into_iter().map(|s| s.score_a).collect(),
    }))
}

async fn score_pairs(
    State(state): State<Arc<AppState>>,
    body: Result<Json<PairsRequest>, JsonRejection>,
) -> Result<Json<PairsResponse>, ApiError> {
    let Json(req) = body?;
    if req.pairs.len() > state.max_items {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "{} pairs; at most {} per request",
                req.pairs.len(),
                state.max_items
            ),
        ));
    }
    let pairs = req
        .pairs
        .into_iter()
        .map(|p| (p.prompt, p.response_a, p.response_b))
        .collect();
    let scores = score(&state, pairs).await?;
    Ok(Json(PairsResponse {
        scores: scores
            .into_iter()
            .map(|s| PairOut {
                score_a: s.score_a,
                p_a_first: s.p_ab,
                p_a_second: 1.0 - s.p_ba,
                truncated: s.truncated,
            })
            .collect(),
    }))
}

async fn health(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok", "model": state.model, "sessions": state.sessions }))
}

/// Gathers queued requests into batches and scores them on a blocking thread.
async fn batcher(
    judge: Arc<Judge>,
    mut rx: mpsc::Receiver<(Vec<Pair>, Reply)>,
    max_batch: usize,
    max_wait: Duration,
) {
    while let Some(first) = rx.recv().await {
        let mut items = vec![first];
        let mut count = items[0].0.len();
        let deadline = tokio::time::Instant::now() + max_wait;
        while count < max_batch {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(item)) => {
                    count += item.0.len();
                    items.push(item);
                }
                _ => break,
            }
        }
        let judge = judge.clone();
        let pairs: Vec<Pair> = items.iter().flat_map(|(p, _)| p.iter().cloned()).collect();
        let result = tokio::task::spawn_blocking(move || {
            let refs: Vec<(&str, &str, &str)> = pairs
                .iter()
                .map(|(x, a, b)| (x.as_str(), a.as_str(), b.as_str()))
                .collect();
            judge.score_pairs(&refs)
        })
        .await;
        match result {
            Ok(Ok(mut scores)) => {
                for (p, reply) in items {
                    let rest = scores.split_off(p.len());
                    let _ = reply.send(scores);
                    scores = rest;
                }
            }
            Ok(Err(e)) => {
                tracing::error!("scoring a batch of {count} pairs failed: {e}");
                // Dropping the replies answers each request with a 500.
            }
            Err(e) => tracing::error!("the scoring thread failed: {e}"),
        }
    }
}

/// The router, with its batcher started on the current runtime.
pub fn router(judge: Arc<Judge>, opts: &ServeOptions) -> Router {
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(batcher(
        judge.clone(),
        rx,
        opts.max_batch.max(1),
        opts.max_wait,
    ));
    let state = Arc::new(AppState {
        queue: tx,
        reference: opts.reference.clone(),
        max_items: opts.max_items,
        model: judge.dir.display().to_string(),
        sessions: judge.sessions(),
    });
    Router::new()
        .route("/get_reward", post(get_reward))
        .route("/score/pairs", post(score_pairs))
        .route("/health", get(health))
        .layer(DefaultBodyLimit::max(32 << 20))
        .with_state(state)
}

/// Serves until Ctrl-C / SIGTERM.
pub async fn serve(judge: Arc<Judge>, opts: ServeOptions) -> crate::Result<()> {
    let listener = tokio::net::TcpListener::bind(opts.addr)
        .await
        .map_err(|e| crate::Error::Input(format!("cannot listen on {}: {e}", opts.addr)))?;
    let local = listener
        .local_addr()
        .map_err(|e| crate::Error::Runtime(e.to_string()))?;
    // The line tests and scripts wait for.
    eprintln!("gram-score: listening on http://{local}");
    axum::serve(listener, router(judge, &opts))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(|e| crate::Error::Runtime(format!("server: {e}")))
}
