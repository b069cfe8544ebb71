//! Results: latency histograms, their percentiles, and one step's figures as text and JSON.

use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// Highest latency a histogram tells apart, in microseconds (longer ones count as this).
const MAX_LATENCY_US: u64 = 120_000_000;

/// An empty latency histogram in microseconds, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    // The bounds are constants that `new_with_bounds` accepts (low ≥ 1, high ≥ 2 × low).
    match Histogram::new_with_bounds(1, MAX_LATENCY_US, 3) {
        Ok(h) => h,
        Err(e) => unreachable!("constant histogram bounds: {e:?}"),
    }
}

/// Percentiles of one latency histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest sample.
    pub max: f64,
}

impl Latency {
    /// The percentiles of `h`.
    pub fn of(h: &Histogram<u64>) -> Latency {
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }

    fn json(&self) -> Value {
        json!({"count": self.count, "p50": self.p50, "p90": self.p90, "p99": self.p99,
               "p99_9": self.p999, "max": self.max})
    }

    fn text(&self) -> String {
        if self.count == 0 {
            return "no samples".into();
        }
        format!(
            "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms ({} samples)",
            self.p50, self.p90, self.p99, self.p999, self.max, self.count
        )
    }
}

/// What one run at one offered rate measured (messages intended inside the measured window).
#[derive(Debug, Clone)]
pub struct Step {
    /// Offered rate asked for, messages per second.
    pub rate: f64,
    /// Length of the measured window, seconds.
    pub secs: f64,
    /// Messages scheduled in the window.
    pub offered: u64,
    /// Of those, sent.
    pub sent: u64,
    /// Acknowledged.
    pub acked: u64,
    /// `message` events received by members.
    pub deliveries: u64,
    /// Deliveries there would be if every offered message reached every member of its room.
    pub expected_deliveries: u64,
    /// Error frames received.
    pub errors: u64,
    /// Connections that closed during the run.
    pub lost_connections: u64,
    /// Send (intended) → ack.
    pub ack: Latency,
    /// Send (intended) → delivery.
    pub delivery: Latency,
}

impl Step {
    /// Deliveries over expected deliveries (1.0 when nothing was expected).
    pub fn delivered_fraction(&self) -> f64 {
        if self.expected_deliveries == 0 {
            1.0
        } else {
            self.deliveries as f64 / self.expected_deliveries as f64
        }
    }

    /// The step's figures as JSON (rates per second, latencies in ms).
    pub fn json(&self) -> Value {
        json!({
            "offered_rate": self.rate,
            "secs": self.secs,
            "offered": self.offered,
            "sent": self.sent,
            "acked": self.acked,
            "deliveries": self.deliveries,
            "expected_deliveries": self.expected_deliveries,
            "delivered_fraction": self.delivered_fraction(),
            "sent_rate": self.sent as f64 / self.secs,
            "ack_rate": self.acked as f64 / self.secs,
            "delivery_rate": self.deliveries as f64 / self.secs,
            "errors": self.errors,
            "lost_connections": self.lost_connections,
            "ack_ms": self.ack.json(),
            "delivery_ms": self.delivery.json(),
        })
    }

    /// The step's figures for a person.
    pub fn text(&self) -> String {
        format!(
            "offered {:.0} msg/s: sent {}, acked {} ({:.0} msg/s), errors {}, lost connections {}, \
             deliveries {} ({:.0}/s, {:.2}% of expected)\n\
             send → ack:      {}\n\
             send → delivery: {}",
            self.rate,
            self.sent,
            self.acked,
            self.acked as f64 / self.secs,
            self.errors,
            self.lost_connections,
            self.deliveries,
            self.deliveries as f64 / self.secs,
            100.0 * self.delivered_fraction(),
            self.ack.text(),
            self.delivery.text(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_in_milliseconds() {
        let mut h = histogram();
        for us in 1..=1000 {
            h.saturating_record(us * 1000);
        }
        let l = Latency::of(&h);
        assert_eq!(l.count, 1000);
        assert!((l.p50 - 500.0).abs() < 1.0, "{l:?}");
        assert!((l.p99 - 990.0).abs() < 1.0, "{l:?}");
        assert!((l.max - 1000.0).abs() < 1.0, "{l:?}");
    }

    #[test]
    fn a_latency_past_the_bound_saturates() {
        let mut h = histogram();
        h.saturating_record(u64::MAX);
        assert!(Latency::of(&h).max >= MAX_LATENCY_US as f64 / 1000.0 * 0.99);
    }
}
