//! Counters for `GET /metrics`, in Prometheus' text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

const LATENCY_BOUNDS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const BATCH_BOUNDS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

#[derive(Clone, Debug)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&mut self.counts) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Debug)]
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
    batch: Histogram,
    loaded: usize,
    loads: u64,
    evictions: u64,
}

/// The server's counters: requests by endpoint and status, latency, batch sizes, adapters
/// loaded, loads and evictions.
#[derive(Debug)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            inner: Mutex::new(Inner {
                requests: BTreeMap::new(),
                latency: BTreeMap::new(),
                batch: Histogram::new(&BATCH_BOUNDS),
                loaded: 0,
                loads: 0,
                evictions: 0,
            }),
        }
    }
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    /// A request to `endpoint` answered with `status` after `seconds`.
    pub fn request(&self, endpoint: &str, status: u16, seconds: f64) {
        self.with(|m| {
            *m.requests
                .entry((endpoint.to_string(), status))
                .or_default() += 1;
            m.latency
                .entry(endpoint.to_string())
                .or_insert_with(|| Histogram::new(&LATENCY_BOUNDS))
                .observe(seconds);
        });
    }

    /// A batch of `rows` rows ran.
    pub fn batch(&self, rows: usize) {
        self.with(|m| m.batch.observe(rows as f64));
    }

    pub(crate) fn set_loaded(&self, n: usize) {
        self.with(|m| m.loaded = n);
    }

    pub(crate) fn loaded(&self) {
        self.with(|m| m.loads += 1);
    }

    pub(crate) fn evicted(&self) {
        self.with(|m| m.evictions += 1);
    }

    /// Evictions so far.
    pub fn evictions(&self) -> u64 {
        self.with(|m| m.evictions)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.with(|m| {
            let mut out = String::new();
            out.push_str("# HELP peft_requests_total Requests answered, by endpoint and status.\n");
            out.push_str("# TYPE peft_requests_total counter\n");
            for ((e, s), n) in &m.requests {
                let _ = writeln!(
                    out,
                    "peft_requests_total{{endpoint=\"{e}\",status=\"{s}\"}} {n}"
                );
            }
            out.push_str("# HELP peft_request_duration_seconds Time to answer, by endpoint.\n");
            out.push_str("# TYPE peft_request_duration_seconds histogram\n");
            for (e, h) in &m.latency {
                h.render(
                    &mut out,
                    "peft_request_duration_seconds",
                    &format!("endpoint=\"{e}\""),
                );
            }
            out.push_str("# HELP peft_batch_size Rows in each batch the model ran.\n");
            out.push_str("# TYPE peft_batch_size histogram\n");
            m.batch.render(&mut out, "peft_batch_size", "");
            out.push_str("# HELP peft_adapters_loaded Adapters in memory now.\n");
            out.push_str("# TYPE peft_adapters_loaded gauge\n");
            let _ = writeln!(out, "peft_adapters_loaded {}", m.loaded);
            out.push_str("# HELP peft_adapter_loads_total Adapter loads from disk.\n");
            out.push_str("# TYPE peft_adapter_loads_total counter\n");
            let _ = writeln!(out, "peft_adapter_loads_total {}", m.loads);
            out.push_str("# HELP peft_adapter_evictions_total Adapters evicted to stay under --max-loaded.\n");
            out.push_str("# TYPE peft_adapter_evictions_total counter\n");
            let _ = writeln!(out, "peft_adapter_evictions_total {}", m.evictions);
            out
        })
    }
}
