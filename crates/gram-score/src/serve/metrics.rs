//! The server's counters and histograms, exposed at `GET /metrics` in Prometheus' text format.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Route {
    path: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Path {
    path: String,
}

fn seconds_buckets() -> Histogram {
    // 1 ms .. ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Everything `/metrics` reports.
pub struct Metrics {
    registry: Registry,
    requests: Family<Route, Counter>,
    latency: Family<Path, Histogram, fn() -> Histogram>,
    items: Counter,
    failed_items: Counter,
    batches: Counter,
    failed_batches: Counter,
    batch_size: Histogram,
    batch_seconds: Histogram,
    queue_wait: Histogram,
    connections: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("gram_score");
        let requests = Family::<Route, Counter>::default();
        let latency = Family::<Path, Histogram, fn() -> Histogram>::new_with_constructor(
            seconds_buckets as fn() -> Histogram,
        );
        let (items, failed_items, batches, failed_batches) = Default::default();
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        let (batch_seconds, queue_wait) = (seconds_buckets(), seconds_buckets());
        let connections = Gauge::default();
        r.register(
            "http_requests",
            "HTTP requests by path and status",
            requests.clone(),
        );
        r.register(
            "http_request_duration_seconds",
            "Time from request to answer",
            latency.clone(),
        );
        r.register(
            "items_scored",
            "Pairs scored (both orders)",
            Clone::clone(&items),
        );
        r.register(
            "items_failed",
            "Pairs answered without a score (reason in the answer)",
            Clone::clone(&failed_items),
        );
        r.register(
            "batches",
            "Batches run through onnxruntime",
            Clone::clone(&batches),
        );
        r.register(
            "batches_failed",
            "Batches that onnxruntime failed",
            Clone::clone(&failed_batches),
        );
        r.register("batch_pairs", "Pairs per batch", batch_size.clone());
        r.register(
            "batch_duration_seconds",
            "Time to score one batch",
            batch_seconds.clone(),
        );
        r.register(
            "queue_wait_seconds",
            "Time from a request's arrival to its first batch",
            queue_wait.clone(),
        );
        r.register(
            "open_connections",
            "Connections being served",
            connections.clone(),
        );
        Self {
            registry: r,
            requests,
            latency,
            items,
            failed_items,
            batches,
            failed_batches,
            batch_size,
            batch_seconds,
            queue_wait,
            connections,
        }
    }
}

impl Metrics {
    /// A request answered.
    pub fn request(&self, path: &str, status: u16, took: Duration) {
        // Unknown paths share one label, so a scanner cannot grow the families without bound.
        let path = if matches!(
            path,
            "/get_reward" | "/score/pairs" | "/health" | "/metrics"
        ) {
            path.to_string()
        } else {
            "other".to_string()
        };
        self.requests
            .get_or_create(&Route {
                path: path.clone(),
                status,
            })
            .inc();
        self.latency
            .get_or_create(&Path { path })
            .observe(took.as_secs_f64());
    }

    /// A request's items: scored, or answered without a score; and its wait for a batch.
    pub fn items(&self, scored: u64, failed: u64, queue_wait: Duration) {
        self.items.inc_by(scored);
        self.failed_items.inc_by(failed);
        self.queue_wait.observe(queue_wait.as_secs_f64());
    }

    /// A batch of `pairs` ran in `took`.
    pub fn batch(&self, pairs: usize, took: Duration) {
        self.batches.inc();
        self.batch_size.observe(pairs as f64);
        self.batch_seconds.observe(took.as_secs_f64());
    }

    /// A batch failed in onnxruntime.
    pub fn batch_failed(&self) {
        self.failed_batches.inc();
    }

    /// A connection opened (+1) or closed (-1).
    pub fn connection(&self, delta: i64) {
        self.connections.inc_by(delta);
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
