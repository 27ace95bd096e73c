//! Counters shared by the layers, and the text report of the stats file (spec section 7).

use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A monotonically increasing counter that can be reset by unlinking the stats file.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    pub fn reset(&self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

/// Accumulated time of an operation, kept in microseconds.
#[derive(Debug, Default)]
pub struct TimeCounter(AtomicU64);

impl TimeCounter {
    pub fn add(&self, elapsed: Duration) {
        self.0
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn total(&self) -> Duration {
        Duration::from_micros(self.0.load(Ordering::Relaxed))
    }

    /// Average over `count` operations, in seconds.
    pub fn average_secs(&self, count: u64) -> f64 {
        if count == 0 {
            0.0
        } else {
            self.total().as_secs_f64() / count as f64
        }
    }

    pub fn reset(&self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

/// The stats text: one `name value` line per counter, names padded to 28 columns like C.
#[derive(Debug, Default)]
pub struct StatsReport {
    lines: Vec<(String, String)>,
}

impl StatsReport {
    pub fn add(&mut self, name: &str, value: impl Display) {
        self.lines.push((name.to_string(), value.to_string()));
    }

    /// Adds a duration as `S.mmm sec`.
    pub fn add_secs(&mut self, name: &str, secs: f64) {
        self.add(name, format!("{secs:.3} sec"));
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.lines
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, value) in &self.lines {
            out.push_str(&format!("{name:<28} {value}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_pads_names_like_c() {
        let mut r = StatsReport::default();
        r.add("http_gets", 12);
        r.add_secs("http_avg_get_time", 0.0125);
        assert_eq!(
            r.render(),
            "http_gets                    12\nhttp_avg_get_time            0.013 sec\n"
        );
        assert_eq!(r.get("http_gets"), Some("12"));
    }
}
