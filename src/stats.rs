//! Counters shared by the layers, and the text report of the stats file (spec section 7).

use std::fmt::Display;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::store::BlockStore;

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

    /// `(name, value)` in report order.
    pub fn lines(&self) -> impl Iterator<Item = (&str, &str)> {
        self.lines.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, value) in &self.lines {
            out.push_str(&format!("{name:<28} {value}\n"));
        }
        out
    }
}

/// Every counter of the stack, in the order of the stats file (spec 7).
pub fn report_of(store: &dyn BlockStore) -> StatsReport {
    let mut report = StatsReport::default();
    store.stats(&mut report);
    // C always ends with this counter; Rust aborts on allocation failure instead.
    report.add("out_of_memory_errors", 0);
    report
}

/// `--statsFileMirror`: a thread that rewrites a file with the stats text every interval
/// (spec 7). Deleting the file resets the counters, like unlinking the FUSE stats file.
/// Dropping the mirror stops the thread.
pub struct StatsMirror {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl StatsMirror {
    pub fn start(store: Arc<dyn BlockStore>, path: PathBuf, interval: Duration) -> StatsMirror {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("stats-mirror".into())
            .spawn(move || {
                let mut written = false;
                loop {
                    if written && !path.exists() {
                        tracing::info!(
                            "stats file mirror {} deleted: statistics reset",
                            path.display()
                        );
                        store.reset_stats();
                    }
                    match write_atomically(&path, report_of(store.as_ref()).render().as_bytes()) {
                        Ok(()) => written = true,
                        Err(e) => {
                            written = false;
                            tracing::warn!("can't write stats file mirror {}: {e}", path.display());
                        }
                    }
                    // Woken early (or disconnected) only to stop.
                    if !matches!(
                        stopped.recv_timeout(interval),
                        Err(mpsc::RecvTimeoutError::Timeout)
                    ) {
                        return;
                    }
                }
            })
            .expect("spawn stats mirror thread");
        StatsMirror {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for StatsMirror {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Replaces `path` with `data` so that readers see the old or the new text, never a mix.
fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut temp = path.as_os_str().to_owned();
    temp.push(format!(".{}.tmp", std::process::id()));
    let temp = PathBuf::from(temp);
    let result = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)
        .and_then(|mut file| file.write_all(data))
        .and_then(|()| std::fs::rename(&temp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
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

    #[test]
    fn mirror_rewrites_the_file_and_its_deletion_resets_the_counters() {
        use crate::backend::memory::MemoryBackend;
        use crate::geometry::{BlockId, Geometry};
        use crate::store::Block;
        use std::os::unix::fs::PermissionsExt as _;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mirror");
        let store = Arc::new(MemoryBackend::new(Geometry::new(4096, 512).unwrap()));
        store
            .write_block(BlockId(1), Block::Data(&[1; 512]))
            .unwrap();
        let mirror = StatsMirror::start(store.clone(), path.clone(), Duration::from_millis(5));
        let wait_for = |pred: &dyn Fn(&str) -> bool| {
            for _ in 0..2000 {
                if let Ok(text) = std::fs::read_to_string(&path)
                    && pred(&text)
                {
                    return text;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            panic!("mirror never matched");
        };
        let text = wait_for(&|t| t.contains("memory_writes"));
        assert!(text.ends_with("out_of_memory_errors         0\n"), "{text}");
        assert_eq!(text, report_of(store.as_ref()).render());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(store.writes.get(), 1);
        std::fs::remove_file(&path).unwrap();
        wait_for(&|_| true);
        assert_eq!(
            store.writes.get(),
            0,
            "deleting the mirror resets the stats"
        );
        drop(mirror); // joins the thread
        std::fs::remove_file(&path).unwrap();
        let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 0, "no temp files left");
    }
}
