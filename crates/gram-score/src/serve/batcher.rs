//! Dynamic batching that is fair between requests: every request is cut into pieces, and each
//! batch takes an equal share of pieces from every waiting request, so a one-pair request that
//! arrives behind a 10,000-pair one waits for about one batch, not for all of it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::metrics::Metrics;
use crate::judge::{Judge, PairScore};

/// (prompt, first response, second response).
pub type Pair = (String, String, String);
/// One pair's score, or why it has none.
pub type ItemResult = Result<PairScore, String>;

/// What a request gets back.
pub struct Done {
    /// Each pair's result, in order; Err: scoring itself failed (onnxruntime), with the reason.
    pub scores: Result<Vec<ItemResult>, String>,
    /// From arrival to its first batch.
    pub queue_wait: Duration,
    /// Time its batches spent scoring.
    pub scoring: Duration,
}

/// A request's pairs and where to answer.
pub struct Job {
    /// The pairs.
    pub pairs: Vec<Pair>,
    /// The answer's way back.
    pub reply: oneshot::Sender<Done>,
}

struct Pending {
    pairs: Vec<Pair>,
    next: usize,
    results: Vec<ItemResult>,
    reply: oneshot::Sender<Done>,
    arrived: Instant,
    started: Option<Instant>,
    scoring: Duration,
    /// Whether the last batch had room for none of its pairs (it goes first in the next).
    skipped: bool,
}

impl Pending {
    fn new(job: Job) -> Self {
        Self {
            results: Vec::with_capacity(job.pairs.len()),
            pairs: job.pairs,
            next: 0,
            reply: job.reply,
            arrived: Instant::now(),
            started: None,
            scoring: Duration::ZERO,
            skipped: false,
        }
    }

    fn left(&self) -> usize {
        self.pairs.len() - self.next
    }

    fn answer(self, scores: Result<Vec<ItemResult>, String>) {
        let queue_wait = self.started.unwrap_or_else(Instant::now) - self.arrived;
        // A client that hung up has dropped its receiver: nothing to do.
        let _ = self.reply.send(Done {
            scores,
            queue_wait,
            scoring: self.scoring,
        });
    }
}

/// Settings of the batcher.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most pairs in one batch.
    pub max_batch: usize,
    /// Longest wait for more requests before scoring a partial batch.
    pub max_wait: Duration,
}

/// How many pairs each waiting request gives the next batch: an equal share each, then what
/// is left of the room in arrival order.
fn shares(left: &[usize], room: usize) -> Vec<usize> {
    let even = (room / left.len().max(1)).max(1);
    let mut take: Vec<usize> = left.iter().map(|&n| n.min(even)).collect();
    let mut free = room.saturating_sub(take.iter().sum());
    for (t, &n) in take.iter_mut().zip(left) {
        let more = (n - *t).min(free);
        *t += more;
        free -= more;
    }
    // Never more than the room, even when the shares of 1 exceed it.
    let mut total = 0;
    for t in &mut take {
        *t = (*t).min(room - total);
        total += *t;
    }
    take
}

/// Runs until every sender is gone: gathers requests, scores batches on a blocking thread, and
/// answers each request when its last pair is scored.
pub async fn run(judge: Arc<Judge>, mut rx: mpsc::Receiver<Job>, limits: Limits, m: Arc<Metrics>) {
    let max_batch = limits.max_batch.max(1);
    let mut active: VecDeque<Pending> = VecDeque::new();
    loop {
        if active.is_empty() {
            let Some(job) = rx.recv().await else { break };
            active.push_back(Pending::new(job));
            let deadline = tokio::time::Instant::now() + limits.max_wait;
            while active.iter().map(Pending::left).sum::<usize>() < max_batch {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(job)) => active.push_back(Pending::new(job)),
                    _ => break,
                }
            }
        }
        while let Ok(job) = rx.try_recv() {
            active.push_back(Pending::new(job));
        }
        let left: Vec<usize> = active.iter().map(Pending::left).collect();
        let take = shares(&left, max_batch);
        let mut pairs = Vec::new();
        let now = Instant::now();
        for (p, &k) in active.iter_mut().zip(&take) {
            if k > 0 {
                p.started.get_or_insert(now);
            }
            for pair in &mut p.pairs[p.next..p.next + k] {
                pairs.push(std::mem::take(pair));
            }
        }
        let n = pairs.len();
        let judge2 = judge.clone();
        let result = tokio::task::spawn_blocking(move || {
            let refs: Vec<(&str, &str, &str)> = pairs
                .iter()
                .map(|(x, a, b)| (x.as_str(), a.as_str(), b.as_str()))
                .collect();
            judge2.score_pairs(&refs).map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(format!("the scoring thread failed: {e}")));
        let took = now.elapsed();
        m.batch(n, took);
        let mut scores = match result {
            Ok(s) => Some(s.into_iter()),
            Err(e) => {
                tracing::error!(pairs = n, reason = %e, "scoring a batch failed");
                m.batch_failed();
                // Every request with a pair in this batch fails; the others go on.
                let mut keep = VecDeque::new();
                for (p, &k) in active.drain(..).zip(&take) {
                    if k > 0 {
                        p.answer(Err(e.clone()));
                    } else {
                        keep.push_back(p);
                    }
                }
                active = keep;
                None
            }
        };
        let Some(scores) = scores.as_mut() else {
            continue;
        };
        let mut keep = VecDeque::new();
        for (mut p, &k) in active.drain(..).zip(&take) {
            p.skipped = k == 0;
            if k > 0 {
                p.results.extend(scores.by_ref().take(k));
                p.next += k;
                p.scoring += took;
            }
            if p.left() == 0 {
                let results = std::mem::take(&mut p.results);
                p.answer(Ok(results));
            } else {
                keep.push_back(p);
            }
        }
        // With more requests than room, those left out go first next time (stable otherwise).
        keep.make_contiguous().sort_by_key(|p| !p.skipped);
        active = keep;
    }
}

#[cfg(test)]
mod tests {
    use super::shares;

    #[test]
    fn every_waiting_request_gets_a_share_of_each_batch() {
        // A big request and a small one behind it: the small one goes in the next batch.
        assert_eq!(shares(&[10_000, 1], 64), vec![63, 1]);
        assert_eq!(shares(&[5, 100], 64), vec![5, 59]);
        assert_eq!(shares(&[100, 100, 100, 100], 64), vec![16, 16, 16, 16]);
        // More requests than room: one each, in arrival order, never past the room.
        assert_eq!(shares(&[3, 3, 3], 2), vec![1, 1, 0]);
        assert_eq!(shares(&[7], 64), vec![7]);
    }
}
