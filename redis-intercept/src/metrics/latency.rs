//! A latency histogram that workers add to without a lock: fixed buckets of relaxed atomic
//! counters, fed a batch of observations at a time. (prometheus-client's own histogram takes
//! a lock per observation, and several workers observe the same node.)

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Upper bounds of the buckets, in nanoseconds: 100 µs to 2.5 s, then +Inf.
const BOUNDS_NS: [u64; 14] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
];

/// How many buckets, +Inf included.
const BUCKETS: usize = BOUNDS_NS.len() + 1;

/// A histogram of durations (exported in seconds). Cloning gives another handle to it.
#[derive(Clone, Debug, Default)]
pub struct Latency(Arc<Shared>);

#[derive(Debug, Default)]
struct Shared {
    /// Observations per bucket (not cumulative; the encoder sums them).
    buckets: [AtomicU64; BUCKETS],
    /// Observations.
    count: AtomicU64,
    /// Their sum, in nanoseconds.
    sum_ns: AtomicU64,
}

impl Latency {
    /// Adds a batch of observations.
    pub fn add(&self, batch: &LatencyBatch) {
        if batch.count == 0 {
            return;
        }
        for (shared, local) in self.0.buckets.iter().zip(&batch.buckets) {
            if *local > 0 {
                shared.fetch_add(u64::from(*local), Ordering::Relaxed);
            }
        }
        self.0.count.fetch_add(batch.count, Ordering::Relaxed);
        self.0.sum_ns.fetch_add(batch.sum_ns, Ordering::Relaxed);
    }

    /// Adds one observation (three atomic adds; gather a [`LatencyBatch`] for many).
    pub fn observe(&self, d: Duration) {
        let ns = nanos(d);
        if let Some(b) = self.0.buckets.get(bucket_of(ns)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.0.count.fetch_add(1, Ordering::Relaxed);
        self.0.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

/// `d` in nanoseconds, saturating (u64 arithmetic: this runs once per reply).
fn nanos(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(d.subsec_nanos()))
}

/// The bucket an observation of `ns` nanoseconds falls in.
fn bucket_of(ns: u64) -> usize {
    BOUNDS_NS
        .iter()
        .position(|b| ns <= *b)
        .unwrap_or(BOUNDS_NS.len())
}

/// Observations gathered on one thread, added to a [`Latency`] at once.
#[derive(Debug, Default)]
pub struct LatencyBatch {
    /// Observations per bucket.
    buckets: [u32; BUCKETS],
    /// Observations.
    count: u64,
    /// Their sum, in nanoseconds.
    sum_ns: u64,
}

impl LatencyBatch {
    /// Records one duration.
    pub fn observe(&mut self, d: Duration) {
        let ns = nanos(d);
        if let Some(b) = self.buckets.get_mut(bucket_of(ns)) {
            *b = b.saturating_add(1);
        }
        self.count += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
    }
}

impl TypedMetric for Latency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = BOUNDS_NS
            .iter()
            .map(|ns| *ns as f64 / 1e9)
            .chain(std::iter::once(f64::INFINITY))
            .zip(&self.0.buckets)
            .map(|(bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect();
        encoder.encode_histogram::<NoLabelSet>(
            self.0.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            self.0.count.load(Ordering::Relaxed),
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_buckets_and_encode_cumulatively() {
        let latency = Latency::default();
        let mut batch = LatencyBatch::default();
        batch.observe(Duration::from_micros(80));
        batch.observe(Duration::from_micros(100));
        batch.observe(Duration::from_micros(101));
        batch.observe(Duration::from_secs(9));
        latency.add(&batch);
        latency.add(&LatencyBatch::default());
        latency.observe(Duration::from_millis(2));
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("t", "test", latency);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("t_bucket{le=\"0.0001\"} 2\n"), "{text}");
        assert!(text.contains("t_bucket{le=\"0.00025\"} 3\n"), "{text}");
        assert!(text.contains("t_bucket{le=\"0.001\"} 3\n"), "{text}");
        assert!(text.contains("t_bucket{le=\"0.0025\"} 4\n"), "{text}");
        assert!(text.contains("t_bucket{le=\"2.5\"} 4\n"), "{text}");
        assert!(text.contains("t_bucket{le=\"+Inf\"} 5\n"), "{text}");
        assert!(text.contains("t_count 5\n"), "{text}");
        assert!(text.contains("t_sum 9.002281\n"), "{text}");
    }
}
