//! The stats file's counters as Prometheus/OpenMetrics text, served on an optional loopback
//! HTTP listener (`--prometheusListen`, off by default).
//!
//! The listener is a plain std `TcpListener` thread answering `GET /metrics` with HTTP/1.0:
//! this project has no async runtime, and one scrape every few seconds needs none.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeMetric as _,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use crate::stats::report_of;
use crate::store::BlockStore;

/// Content type of `prometheus_client::encoding::text::encode`'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Renders every stats line of `store` as one metric named `s3backer_<line name>`.
pub fn render(store: Arc<dyn BlockStore>) -> String {
    let mut registry = Registry::with_prefix("s3backer");
    registry.register_collector(Box::new(StackCollector(store)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("writing to a String cannot fail");
    out
}

/// Reads the counters at scrape time, so they are exactly the stats file's.
struct StackCollector(Arc<dyn BlockStore>);

impl std::fmt::Debug for StackCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StackCollector")
    }
}

/// Lines whose value goes up and down; every other line only grows (until a reset).
fn is_gauge(name: &str) -> bool {
    name.ends_with("_size") || name.ends_with("_ratio") || name.contains("_avg_")
}

impl Collector for StackCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let report = report_of(self.0.as_ref());
        for (name, text) in report.lines() {
            // Values are "N", "N blocks", "0.12345678" or "S.mmm sec".
            let mut words = text.split_whitespace();
            let Some(number) = words.next() else {
                continue;
            };
            let unit = (words.next() == Some("sec")).then_some(Unit::Seconds);
            let help = format!("stats file line \"{name}\"");
            let gauge = is_gauge(name);
            // Whole numbers stay integers in the output ("7", not "7.0").
            if let Ok(value) = number.parse::<u64>() {
                encode_one(&mut encoder, name, &help, unit, gauge, value)?;
            } else if let Ok(value) = number.parse::<f64>() {
                encode_one(&mut encoder, name, &help, unit, gauge, value)?;
            }
        }
        Ok(())
    }
}

fn encode_one<N>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    gauge: bool,
    value: N,
) -> Result<(), std::fmt::Error>
where
    N: EncodeGaugeValue + EncodeCounterValue,
{
    if gauge {
        let metric = ConstGauge::new(value);
        let m = encoder.encode_descriptor(name, help, unit.as_ref(), metric.metric_type())?;
        metric.encode(m)
    } else {
        let metric = ConstCounter::new(value);
        let m = encoder.encode_descriptor(name, help, unit.as_ref(), metric.metric_type())?;
        metric.encode(m)
    }
}

/// The listener thread; dropping it stops the thread.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    pub fn start(store: Arc<dyn BlockStore>, addr: SocketAddr) -> std::io::Result<MetricsServer> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    if let Ok(stream) = stream
                        && let Err(e) = serve(stream, &store)
                    {
                        tracing::debug!("metrics request failed: {e}");
                    }
                }
            })?;
        tracing::info!("serving Prometheus metrics on http://{addr}/metrics");
        Ok(MetricsServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The bound address (the port is chosen by the system when given as 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept so the thread sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Answers one request: `GET /metrics` gets the metrics, anything else 404.
fn serve(stream: TcpStream, store: &Arc<dyn BlockStore>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    // Only the request line matters; headers are read (bounded) and ignored.
    let mut reader = BufReader::new(stream.try_clone()?.take(16 * 1024));
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut line = String::new();
    for _ in 0..100 {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next(), parts.next());
    let path = path.map(|p| p.split('?').next().unwrap_or(p));
    let (status, content_type, body) = match (method, path) {
        (Some("GET"), Some("/metrics")) => ("200 OK", CONTENT_TYPE, render(store.clone())),
        _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
    };
    let mut out = stream;
    write!(
        out,
        "HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryBackend;
    use crate::geometry::{BlockId, Geometry};
    use crate::store::Block;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = TcpStream::connect(addr).unwrap();
        write!(stream, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        reply
    }

    #[test]
    fn metrics_follow_the_counters_with_types_and_units() {
        let store = Arc::new(MemoryBackend::new(Geometry::new(4096, 512).unwrap()));
        let server = MetricsServer::start(store.clone(), "127.0.0.1:0".parse().unwrap()).unwrap();
        let before = get(server.addr(), "/metrics");
        assert!(before.starts_with("HTTP/1.0 200 OK\r\n"), "{before}");
        assert!(before.contains(CONTENT_TYPE));
        assert!(
            before.contains("# TYPE s3backer_memory_writes counter\n"),
            "{before}"
        );
        assert!(
            before.contains("\ns3backer_memory_writes_total 0\n"),
            "{before}"
        );
        assert!(before.contains("\ns3backer_out_of_memory_errors_total 0\n"));
        assert!(before.ends_with("# EOF\n"));
        store
            .write_block(BlockId(1), Block::Data(&[3; 512]))
            .unwrap();
        let after = get(server.addr(), "/metrics?x=1");
        assert!(
            after.contains("\ns3backer_memory_writes_total 1\n"),
            "{after}"
        );
        assert!(get(server.addr(), "/other").starts_with("HTTP/1.0 404"));
        let addr = server.addr();
        drop(server);
        assert!(TcpStream::connect(addr).is_err(), "listener closed");
    }

    #[test]
    fn seconds_and_sizes_get_units_and_gauges() {
        #[derive(Debug)]
        struct Fixed;
        impl BlockStore for Fixed {
            fn geometry(&self) -> Geometry {
                Geometry::new(4096, 512).unwrap()
            }
            fn read_block(
                &self,
                _: BlockId,
                _: &mut [u8],
            ) -> crate::Result<crate::store::ReadInfo> {
                unreachable!()
            }
            fn write_block(
                &self,
                _: BlockId,
                _: Block<'_>,
            ) -> crate::Result<crate::store::WriteInfo> {
                unreachable!()
            }
            fn flush(&self) -> crate::Result<()> {
                Ok(())
            }
            fn survey_non_zero(&self, _: usize, _: &(dyn Fn(BlockId) + Sync)) -> crate::Result<()> {
                Ok(())
            }
            fn stats(&self, r: &mut crate::stats::StatsReport) {
                r.add("md5_cache_current_size", "7 blocks");
                r.add_secs("md5_cache_full_delays", 1.5);
                r.add("block_cache_dirty_ratio", "0.25000000");
            }
            fn reset_stats(&self) {}
        }
        let text = render(Arc::new(Fixed));
        assert!(text.contains("# TYPE s3backer_md5_cache_current_size gauge\n"));
        assert!(
            text.contains("\ns3backer_md5_cache_current_size 7\n"),
            "{text}"
        );
        assert!(text.contains("# UNIT s3backer_md5_cache_full_delays_seconds seconds\n"));
        assert!(
            text.contains("\ns3backer_md5_cache_full_delays_seconds_total 1.5\n"),
            "{text}"
        );
        assert!(
            text.contains("\ns3backer_block_cache_dirty_ratio 0.25\n"),
            "{text}"
        );
    }
}
