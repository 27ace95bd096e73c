use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use proptest::prelude::*;

use super::*;
use crate::backend::memory::MemoryBackend;

const BS: usize = 512;
/// Upper bound of every wait in these tests.
const WAIT: Duration = Duration::from_secs(10);
/// How long a test watches for something that must not happen.
const QUIET: Duration = Duration::from_millis(150);

fn geometry(blocks: u32) -> Geometry {
    Geometry::new(u64::from(blocks) * BS as u64, BS as u32).unwrap()
}

fn opts() -> BlockCacheOptions {
    BlockCacheOptions {
        size: 16,
        threads: 4,
        write_delay: Duration::ZERO,
        max_dirty: 0,
        timeout: Duration::ZERO,
        sync: false,
        num_protected: 0,
        read_ahead: 0,
        read_ahead_max: 0,
        read_ahead_trigger: 2,
        retry_pause: Duration::from_millis(20),
        file: None,
    }
}

fn filled(byte: u8) -> Vec<u8> {
    vec![byte; BS]
}

/// Polls `cond` until it holds; fails the test after `WAIT`.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A lower store that records the order of writes and can hold them at a gate or fail them.
struct Probe {
    mem: MemoryBackend,
    /// Writes in the order they reached the store: block and first byte (`None` for zero).
    log: Mutex<Vec<(u32, Option<u8>)>>,
    /// Blocks whose writes wait at the gate; `None` holds every block.
    held: Mutex<Option<Vec<u32>>>,
    gate: Condvar,
    fail_writes: AtomicBool,
    writes_started: AtomicUsize,
    writes_refused: AtomicUsize,
}

impl Probe {
    fn new(blocks: u32) -> Arc<Probe> {
        Self::with_latency(blocks, Duration::ZERO)
    }

    fn with_latency(blocks: u32, latency: Duration) -> Arc<Probe> {
        Arc::new(Probe {
            mem: MemoryBackend::with_latency(geometry(blocks), latency),
            log: Mutex::new(Vec::new()),
            held: Mutex::new(Some(Vec::new())),
            gate: Condvar::new(),
            fail_writes: AtomicBool::new(false),
            writes_started: AtomicUsize::new(0),
            writes_refused: AtomicUsize::new(0),
        })
    }

    fn set_gate(&self, open: bool) {
        *self.held.lock() = if open { Some(Vec::new()) } else { None };
        self.gate.notify_all();
    }

    /// Holds writes of exactly these blocks at the gate.
    fn hold(&self, blocks: &[u32]) {
        *self.held.lock() = Some(blocks.to_vec());
        self.gate.notify_all();
    }

    fn log(&self) -> Vec<(u32, Option<u8>)> {
        self.log.lock().clone()
    }

    /// Stores `data` directly below the cache.
    fn preload(&self, block: u32, data: &[u8]) {
        self.mem
            .write_block(BlockId(block), Block::from_buf(data))
            .unwrap();
    }

    fn stored_byte(&self, block: u32) -> Option<u8> {
        self.mem.stored(BlockId(block)).map(|d| d[0])
    }
}

impl BlockStore for Probe {
    fn geometry(&self) -> Geometry {
        self.mem.geometry()
    }

    fn read_block(&self, block: BlockId, buf: &mut [u8]) -> Result<ReadInfo> {
        self.mem.read_block(block, buf)
    }

    fn write_block(&self, block: BlockId, data: Block<'_>) -> Result<WriteInfo> {
        self.writes_started.fetch_add(1, Ordering::SeqCst);
        let mut held = self.held.lock();
        let deadline = Instant::now() + WAIT;
        while held.as_ref().is_none_or(|blocks| blocks.contains(&block.0)) {
            if self.gate.wait_until(&mut held, deadline).timed_out() {
                return Err(Error::Timeout("probe gate stayed closed".into()));
            }
        }
        drop(held);
        if self.fail_writes.load(Ordering::SeqCst) {
            self.writes_refused.fetch_add(1, Ordering::SeqCst);
            return Err(Error::Other(format!("probe refuses block {block}")));
        }
        let mut log = self.log.lock();
        let info = self.mem.write_block(block, data)?;
        let first = match data {
            Block::Zero => None,
            Block::Data(bytes) => Some(bytes[0]),
        };
        log.push((block.0, first));
        Ok(info)
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn survey_non_zero(&self, threads: usize, found: &(dyn Fn(BlockId) + Sync)) -> Result<()> {
        self.mem.survey_non_zero(threads, found)
    }

    fn stats(&self, report: &mut StatsReport) {
        self.mem.stats(report)
    }

    fn reset_stats(&self) {
        self.mem.reset_stats()
    }
}

/// Opens the probe's gate when dropped, so a failing test never leaves workers stuck.
struct OpenGateOnDrop(Arc<Probe>);

impl Drop for OpenGateOnDrop {
    fn drop(&mut self) {
        self.0.set_gate(true);
    }
}

fn cache_over(probe: &Arc<Probe>, opts: BlockCacheOptions) -> (Arc<BlockCache>, OpenGateOnDrop) {
    let cache = BlockCache::new(Arc::clone(probe) as Arc<dyn BlockStore>, opts);
    (cache, OpenGateOnDrop(Arc::clone(probe)))
}

fn read(cache: &BlockCache, block: u32) -> Vec<u8> {
    let mut buf = vec![0u8; BS];
    cache.read_block(BlockId(block), &mut buf).unwrap();
    buf
}

fn write(cache: &BlockCache, block: u32, byte: u8) {
    cache
        .write_block(BlockId(block), Block::Data(&filled(byte)))
        .unwrap();
}

fn stat(cache: &BlockCache, name: &str) -> String {
    let mut report = StatsReport::default();
    cache.stats(&mut report);
    report.get(name).unwrap().to_string()
}

fn is_cached(cache: &BlockCache, block: u32) -> bool {
    cache
        .shared
        .state
        .lock()
        .entries
        .contains_key(&BlockId(block))
}

/// Runs `f` on a thread; the receiver gets its result.
fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> mpsc::Receiver<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

#[test]
fn written_block_reads_back_from_cache() {
    let probe = Probe::new(16);
    let opts = BlockCacheOptions {
        write_delay: Duration::from_secs(60),
        ..opts()
    };
    let (cache, _gate) = cache_over(&probe, opts);
    write(&cache, 3, 7);
    assert_eq!(read(&cache, 3), filled(7));
    assert_eq!(probe.mem.reads.get(), 0);
    assert_eq!(
        probe.stored_byte(3),
        None,
        "uploaded before the write delay"
    );
    assert_eq!(stat(&cache, "block_cache_read_hits"), "1");
    assert_eq!(stat(&cache, "block_cache_write_misses"), "1");
}

#[test]
fn write_back_happens_after_the_delay_and_not_before() {
    let probe = Probe::new(1024);
    let delay = Duration::from_millis(300);
    let opts = BlockCacheOptions {
        size: 1000,
        write_delay: delay,
        ..opts()
    };
    let (cache, _gate) = cache_over(&probe, opts);
    let start = Instant::now();
    write(&cache, 1, 5);
    eventually("write-back", || probe.stored_byte(1) == Some(5));
    let elapsed = start.elapsed();
    // The dirty ratio (1/1000) shortens the delay by about 0.1%.
    assert!(elapsed >= delay.mul_f64(0.95), "uploaded after {elapsed:?}");
}

#[test]
fn flush_returns_only_when_everything_written_before_is_uploaded() {
    let probe = Probe::new(16);
    let opts = BlockCacheOptions {
        write_delay: Duration::from_secs(60),
        ..opts()
    };
    let (cache, _gate) = cache_over(&probe, opts);
    probe.set_gate(false);
    for block in 0..5 {
        write(&cache, block, block as u8 + 1);
    }
    let flushing = {
        let cache = Arc::clone(&cache);
        spawn(move || cache.flush())
    };
    assert!(
        flushing.recv_timeout(QUIET).is_err(),
        "flush returned before the uploads"
    );
    probe.set_gate(true);
    flushing.recv_timeout(WAIT).unwrap().unwrap();
    for block in 0..5 {
        assert_eq!(probe.stored_byte(block), Some(block as u8 + 1));
    }
}

#[test]
fn writes_after_a_flush_reach_the_store_only_after_all_writes_before_it() {
    let probe = Probe::new(16);
    let opts = BlockCacheOptions {
        threads: 2,
        ..opts()
    };
    let (cache, _gate) = cache_over(&probe, opts);
    // Epoch 1: blocks 0..4 hold 1; the uploads of 0 and 1 hang, 2 and 3 are queued.
    probe.hold(&[0, 1]);
    for block in 0..4 {
        write(&cache, block, 1);
    }
    eventually("two uploads in flight", || {
        probe.writes_started.load(Ordering::SeqCst) == 2
    });
    let first_flush = {
        let cache = Arc::clone(&cache);
        spawn(move || cache.flush())
    };
    eventually("epoch 1 closed", || {
        cache.shared.state.lock().current_epoch == 1
    });
    // Epoch 2, due at once: rewrite block 0 (in flight) and 2 (queued), add blocks 8 and 9.
    for block in [0, 2, 8, 9] {
        write(&cache, block, 2);
    }
    assert_eq!(read(&cache, 0), filled(2));
    assert_eq!(read(&cache, 2), filled(2));
    // Let everything but block 0 through: a worker is idle, yet epoch 2 must wait for block 0.
    probe.hold(&[0]);
    eventually("rest of epoch 1 uploaded", || probe.log().len() == 3);
    std::thread::sleep(QUIET);
    assert!(
        probe.log().iter().all(|&(_, b)| b == Some(1)),
        "epoch 2 uploaded while epoch 1 is incomplete: {:?}",
        probe.log()
    );
    assert!(
        first_flush.try_recv().is_err(),
        "flush returned before block 0 was uploaded"
    );
    probe.set_gate(true);
    first_flush.recv_timeout(WAIT).unwrap().unwrap();
    cache.flush().unwrap();

    let log = probe.log();
    let first_epoch2 = log.iter().position(|&(_, b)| b == Some(2)).unwrap();
    let epoch1_done = log.iter().rposition(|&(_, b)| b == Some(1)).unwrap();
    assert!(epoch1_done < first_epoch2, "order broken: {log:?}");
    assert_eq!(log.len(), 8, "{log:?}");
    for block in [0, 2, 8, 9] {
        assert_eq!(probe.stored_byte(block), Some(2), "block {block}");
    }
    assert_eq!(probe.stored_byte(3), Some(1));
}

#[test]
fn rewrite_during_upload_ends_with_the_newest_data_below() {
    let probe = Probe::new(16);
    let (cache, _gate) = cache_over(&probe, opts());
    probe.set_gate(false);
    write(&cache, 1, 0xa);
    eventually("upload started", || {
        probe.writes_started.load(Ordering::SeqCst) == 1
    });
    write(&cache, 1, 0xb);
    assert_eq!(read(&cache, 1), filled(0xb));
    probe.set_gate(true);
    cache.flush().unwrap();
    assert_eq!(probe.stored_byte(1), Some(0xb));
    assert_eq!(probe.log(), vec![(1, Some(0xa)), (1, Some(0xb))]);
    assert_eq!(read(&cache, 1), filled(0xb));
}

#[test]
fn failed_uploads_are_retried_and_flush_reports_them_until_the_store_recovers() {
    let probe = Probe::new(16);
    let (cache, _gate) = cache_over(&probe, opts());
    probe.fail_writes.store(true, Ordering::SeqCst);
    write(&cache, 4, 9);
    let err = cache.flush().unwrap_err();
    assert!(err.to_string().contains("block 00000004"), "{err}");
    assert_eq!(err.errno(), libc::EIO);
    assert_eq!(
        read(&cache, 4),
        filled(9),
        "dirty data lost after a failure"
    );
    let attempts = probe.writes_started.load(Ordering::SeqCst);
    eventually("a retry", || {
        probe.writes_started.load(Ordering::SeqCst) > attempts
    });
    probe.fail_writes.store(false, Ordering::SeqCst);
    cache.flush().unwrap();
    assert_eq!(probe.mem.stored(BlockId(4)), Some(filled(9)));
}

#[test]
fn an_upload_that_began_before_a_flush_and_fails_does_not_fail_the_flush() {
    let probe = Probe::new(16);
    let opts = BlockCacheOptions {
        retry_pause: Duration::from_millis(300),
        ..opts()
    };
    let (cache, _gate) = cache_over(&probe, opts);
    probe.fail_writes.store(true, Ordering::SeqCst);
    probe.set_gate(false);
    write(&cache, 4, 9);
    eventually("upload started", || {
        probe.writes_started.load(Ordering::SeqCst) == 1
    });
    // The store comes back while that attempt is still on its way to failing.
    let flushed = {
        let cache = Arc::clone(&cache);
        spawn(move || cache.flush())
    };
    assert!(flushed.recv_timeout(QUIET).is_err(), "flush did not wait");
    probe.set_gate(true);
    eventually("the old attempt failed", || {
        probe.writes_refused.load(Ordering::SeqCst) == 1
    });
    probe.fail_writes.store(false, Ordering::SeqCst);
    flushed
        .recv_timeout(WAIT)
        .unwrap()
        .expect("the retry after the store came back succeeds, and so does the flush");
    assert_eq!(probe.mem.stored(BlockId(4)), Some(filled(9)));
}

#[test]
fn writer_waits_while_max_dirty_is_reached() {
    let probe = Probe::new(16);
    let opts = BlockCacheOptions {
        max_dirty: 2,
        ..opts()
    };
    let (cache, _gate) = cache_over(&probe, opts);
    probe.set_gate(false);
    write(&cache, 0, 1);
    write(&cache, 1, 1);
    let third = {
        let cache = Arc::clone(&cache);
        spawn(move || write(&cache, 2, 1))
    };
    assert!(
        third.recv_timeout(QUIET).is_err(),
        "writer passed the dirty limit"
    );
    probe.set_gate(true);
    third.recv_timeout(WAIT).unwrap();
    cache.flush().unwrap();
    assert_eq!(probe.stored_byte(2), Some(1));
}

#[test]
fn lru_evicts_the_least_recently_used_clean_block() {
    let probe = Probe::new(16);
    for block in 0..4 {
        probe.preload(block, &filled(block as u8 + 1));
    }
    let opts = BlockCacheOptions { size: 3, ..opts() };
    let (cache, _gate) = cache_over(&probe, opts);
    for block in [0, 1, 2, 0, 3] {
        assert_eq!(read(&cache, block), filled(block as u8 + 1));
    }
    assert_eq!(probe.mem.reads.get(), 4);
    assert!(!is_cached(&cache, 1), "block 1 was the least recently used");
    assert!(is_cached(&cache, 0) && is_cached(&cache, 2) && is_cached(&cache, 3));
}

#[test]
fn eviction_never_drops_a_dirty_block() {
    let probe = Probe::new(16);
    let opts = BlockCacheOptions {
        size: 2,
        write_delay: Duration::from_secs(60),
        ..opts()
    };
    let (cache, _gate) = cache_over(&probe, opts);
    write(&cache, 5, 8);
    for block in 0..4 {
        read(&cache, block);
    }
    assert!(is_cached(&cache, 5));
    assert_eq!(probe.stored_byte(5), None);
    assert_eq!(read(&cache, 5), filled(8));
    cache.flush().unwrap();
    assert_eq!(probe.stored_byte(5), Some(8));
}

#[test]
fn protected_blocks_are_evicted_last() {
    let probe = Probe::new(16);
    let opts = BlockCacheOptions {
        size: 2,
        num_protected: 1,
        ..opts()
    };
    let (cache, _gate) = cache_over(&probe, opts);
    for block in [0, 1, 2] {
        read(&cache, block);
    }
    assert!(is_cached(&cache, 0), "protected block evicted first");
    assert!(!is_cached(&cache, 1));
    read(&cache, 3);
    read(&cache, 4);
    assert!(is_cached(&cache, 0));
}

#[test]
fn concurrent_misses_of_one_block_read_it_from_below_once() {
    let probe = Probe::with_latency(16, Duration::from_millis(100));
    probe.preload(4, &filled(4));
    probe.mem.reset_stats();
    let (cache, _gate) = cache_over(&probe, opts());
    let barrier = Arc::new(std::sync::Barrier::new(8));
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let cache = Arc::clone(&cache);
            let barrier = Arc::clone(&barrier);
            spawn(move || {
                barrier.wait();
                read(&cache, 4)
            })
        })
        .collect();
    for reader in readers {
        assert_eq!(reader.recv_timeout(WAIT).unwrap(), filled(4));
    }
    assert_eq!(probe.mem.reads.get(), 1);
    assert_eq!(stat(&cache, "block_cache_read_misses"), "1");
    assert_eq!(stat(&cache, "block_cache_read_hits"), "7");
}

#[test]
fn read_ahead_starts_after_the_trigger_and_stops_at_the_end_of_the_disk() {
    let probe = Probe::new(16);
    let opts = BlockCacheOptions {
        read_ahead: 3,
        read_ahead_trigger: 2,
        ..opts()
    };
    let (cache, _gate) = cache_over(&probe, opts);
    read(&cache, 5);
    std::thread::sleep(QUIET);
    assert_eq!(probe.mem.reads.get(), 1, "read-ahead before the trigger");
    read(&cache, 6);
    eventually("prefetch of 7..=9", || probe.mem.reads.get() == 5);
    for block in 7..=9 {
        assert!(is_cached(&cache, block));
    }
    assert!(!is_cached(&cache, 10));
    read(&cache, 7);
    assert_eq!(stat(&cache, "block_cache_read_misses"), "2");

    // A jump restarts the run; near the end only the blocks that exist are prefetched.
    read(&cache, 13);
    read(&cache, 14);
    eventually("prefetch of 15", || is_cached(&cache, 15));
    eventually("prefetch settled", || {
        cache.shared.state.lock().prefetch.is_empty()
    });
    assert!(cache.shared.state.lock().entries.keys().all(|b| b.0 < 16));
}

/// A cache of `size` blocks whose read-ahead starts at 2 blocks and may grow to `max`.
fn growing_read_ahead(size: usize, max: u32) -> BlockCacheOptions {
    BlockCacheOptions {
        size,
        read_ahead: 2,
        read_ahead_max: max,
        read_ahead_trigger: 2,
        ..opts()
    }
}

#[test]
fn read_ahead_window_grows_with_the_run_up_to_its_max_and_a_jump_shrinks_it() {
    let probe = Probe::new(256);
    let (cache, _gate) = cache_over(&probe, growing_read_ahead(64, 8));
    let highest_cached = |cache: &BlockCache| {
        eventually("prefetch settled", || {
            let st = cache.shared.state.lock();
            st.prefetch.is_empty()
                && !st
                    .entries
                    .values()
                    .any(|e| matches!(e, EntryState::Reading))
        });
        cache
            .shared
            .state
            .lock()
            .entries
            .keys()
            .map(|b| b.0)
            .max()
            .unwrap()
    };
    read(&cache, 0);
    read(&cache, 1);
    assert_eq!(
        highest_cached(&cache),
        3,
        "run of 2: the initial window of 2"
    );
    for block in 2..6 {
        read(&cache, block);
    }
    assert_eq!(highest_cached(&cache), 11, "run of 6: 6 ahead");
    for block in 6..40 {
        read(&cache, block);
    }
    assert_eq!(highest_cached(&cache), 47, "a long run: capped at 8");
    // A jump starts a new run with the initial window again.
    read(&cache, 100);
    read(&cache, 101);
    assert_eq!(highest_cached(&cache), 103);
}

#[test]
fn read_ahead_window_is_at_most_a_quarter_of_the_cache() {
    let probe = Probe::new(256);
    let (cache, _gate) = cache_over(&probe, growing_read_ahead(16, 32));
    for block in 0..20 {
        read(&cache, block);
    }
    eventually("prefetch of 20..=23", || is_cached(&cache, 23));
    std::thread::sleep(QUIET);
    assert!(
        !is_cached(&cache, 24),
        "window above a quarter of 16 blocks"
    );
}

#[test]
fn partial_write_of_a_cached_block_does_not_read_below() {
    let probe = Probe::new(16);
    probe.preload(3, &filled(3));
    let (cache, _gate) = cache_over(&probe, opts());
    write(&cache, 2, 2);
    cache.write_partial(BlockId(2), 10, &[9; 5]).unwrap();
    assert_eq!(probe.mem.reads.get(), 0);
    let mut expected = filled(2);
    expected[10..15].fill(9);
    assert_eq!(read(&cache, 2), expected);

    // An uncached block is read once, then patched.
    cache.write_partial(BlockId(3), 0, &[7; 4]).unwrap();
    assert_eq!(probe.mem.reads.get(), 1);
    let mut part = [0u8; 6];
    cache.read_partial(BlockId(3), 2, &mut part).unwrap();
    assert_eq!(part, [7, 7, 3, 3, 3, 3]);
    cache.flush().unwrap();
    assert_eq!(probe.mem.stored(BlockId(2)), Some(expected));
}

#[test]
fn zero_blocks_hold_no_buffer_and_are_deleted_below() {
    let probe = Probe::new(16);
    probe.preload(1, &filled(1));
    let (cache, _gate) = cache_over(&probe, opts());
    cache.write_block(BlockId(1), Block::Zero).unwrap();
    // A partial write that leaves a block all zero makes it a zero block too.
    let mut one = filled(0);
    one[7] = 1;
    cache.write_block(BlockId(2), Block::Data(&one)).unwrap();
    cache.write_partial(BlockId(2), 7, &[0]).unwrap();
    {
        let st = cache.shared.state.lock();
        for block in [1, 2] {
            let data = match &st.entries[&BlockId(block)] {
                EntryState::Dirty { versions, .. } => versions.back().unwrap().data.clone(),
                EntryState::Clean { data, .. } => data.clone(),
                EntryState::Reading => panic!("block {block} reading"),
            };
            assert!(data.is_zero(), "block {block} holds a buffer");
        }
    }
    cache.flush().unwrap();
    assert_eq!(probe.mem.stored_count(), 0);
    let mut buf = filled(5);
    assert!(cache.read_block(BlockId(1), &mut buf).unwrap().zero);
    assert_eq!(buf, filled(0));
}

#[test]
fn survey_reports_dirty_blocks_as_the_cache_sees_them() {
    let probe = Probe::new(16);
    probe.preload(1, &filled(1));
    probe.preload(2, &filled(2));
    let opts = BlockCacheOptions {
        write_delay: Duration::from_secs(60),
        ..opts()
    };
    let (cache, _gate) = cache_over(&probe, opts);
    cache.write_block(BlockId(1), Block::Zero).unwrap();
    write(&cache, 3, 3);
    let found = Mutex::new(Vec::new());
    cache
        .survey_non_zero(1, &|block| found.lock().push(block.0))
        .unwrap();
    let mut found = found.into_inner();
    found.sort();
    assert_eq!(found, vec![2, 3]);
}

#[test]
fn sync_mode_write_returns_after_the_upload() {
    let probe = Probe::new(16);
    let opts = BlockCacheOptions {
        sync: true,
        ..opts()
    };
    let (cache, _gate) = cache_over(&probe, opts);
    write(&cache, 6, 6);
    assert_eq!(probe.stored_byte(6), Some(6));
    probe.fail_writes.store(true, Ordering::SeqCst);
    assert!(
        cache
            .write_block(BlockId(7), Block::Data(&filled(7)))
            .is_err()
    );
}

#[test]
fn clean_blocks_expire_after_the_timeout() {
    let probe = Probe::new(16);
    let opts = BlockCacheOptions {
        timeout: Duration::from_millis(50),
        ..opts()
    };
    let (cache, _gate) = cache_over(&probe, opts);
    read(&cache, 1);
    assert!(is_cached(&cache, 1));
    eventually("expiry", || !is_cached(&cache, 1));
    read(&cache, 1);
    assert_eq!(probe.mem.reads.get(), 2);
}

#[test]
fn stats_lines_precede_the_lower_layers() {
    let probe = Probe::new(16);
    let (cache, _gate) = cache_over(&probe, opts());
    write(&cache, 1, 1);
    read(&cache, 1);
    read(&cache, 2);
    cache.flush().unwrap();
    let mut report = StatsReport::default();
    cache.stats(&mut report);
    let text = report.render();
    let names: Vec<&str> = text
        .lines()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "block_cache_current_size",
            "block_cache_initial_size",
            "block_cache_dirty_ratio",
            "block_cache_read_hits",
            "block_cache_read_misses",
            "block_cache_read_hit_ratio",
            "block_cache_write_hits",
            "block_cache_write_misses",
            "block_cache_write_hit_ratio",
            "block_cache_verified",
            "block_cache_mismatch",
            "memory_reads",
            "memory_writes",
            "memory_deletes",
        ]
    );
    assert_eq!(report.get("block_cache_current_size"), Some("2 blocks"));
    assert_eq!(report.get("block_cache_dirty_ratio"), Some("0.00000000"));
    assert_eq!(report.get("block_cache_read_hit_ratio"), Some("0.50000000"));
    cache.reset_stats();
    assert_eq!(stat(&cache, "block_cache_read_hits"), "0");
    assert_eq!(stat(&cache, "memory_writes"), "0");
}

#[test]
fn shutdown_flushes_and_refuses_later_writes() {
    let probe = Probe::new(16);
    let opts = BlockCacheOptions {
        write_delay: Duration::from_secs(60),
        ..opts()
    };
    let (cache, _gate) = cache_over(&probe, opts);
    write(&cache, 2, 2);
    cache.shutdown().unwrap();
    assert_eq!(probe.stored_byte(2), Some(2));
    assert!(
        cache
            .write_block(BlockId(2), Block::Data(&filled(3)))
            .is_err()
    );
}

/// Operations of the model test.
#[derive(Clone, Debug)]
enum Op {
    Write(u32, u8),
    WriteZero(u32),
    Partial(u32, usize, usize, u8),
    Read(u32),
    ReadPartial(u32, usize, usize),
    Flush,
}

const MODEL_BLOCKS: u32 = 8;

/// True when the store below the cache holds exactly the model's blocks.
fn below_equals(probe: &Probe, model: &[Vec<u8>]) -> bool {
    model.iter().enumerate().all(|(b, expected)| {
        probe
            .mem
            .stored(BlockId(b as u32))
            .unwrap_or_else(|| filled(0))
            == *expected
    })
}

fn op() -> impl Strategy<Value = Op> {
    let block = 0..MODEL_BLOCKS;
    prop_oneof![
        3 => (block.clone(), 1u8..=255).prop_map(|(b, v)| Op::Write(b, v)),
        1 => block.clone().prop_map(Op::WriteZero),
        3 => (block.clone(), 0..BS, 1..BS, any::<u8>())
            .prop_map(|(b, o, l, v)| Op::Partial(b, o, l.min(BS - o), v)),
        3 => block.clone().prop_map(Op::Read),
        2 => (block, 0..BS, 1..BS).prop_map(|(b, o, l)| Op::ReadPartial(b, o, l.min(BS - o))),
        1 => Just(Op::Flush),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn cache_behaves_like_a_plain_disk(ops in prop::collection::vec(op(), 1..60)) {
        let probe = Probe::new(MODEL_BLOCKS);
        let opts = BlockCacheOptions {
            size: 4,
            threads: 2,
            max_dirty: 3,
            write_delay: Duration::from_millis(1),
            read_ahead: 2,
            read_ahead_trigger: 1,
            ..opts()
        };
        let (cache, _gate) = cache_over(&probe, opts);
        let mut model = vec![vec![0u8; BS]; MODEL_BLOCKS as usize];
        for op in ops {
            match op {
                Op::Write(b, v) => {
                    write(&cache, b, v);
                    model[b as usize] = filled(v);
                }
                Op::WriteZero(b) => {
                    cache.write_block(BlockId(b), Block::Zero).unwrap();
                    model[b as usize] = filled(0);
                }
                Op::Partial(b, o, l, v) => {
                    cache.write_partial(BlockId(b), o as u32, &vec![v; l]).unwrap();
                    model[b as usize][o..o + l].fill(v);
                }
                Op::Read(b) => prop_assert_eq!(&read(&cache, b), &model[b as usize]),
                Op::ReadPartial(b, o, l) => {
                    let mut buf = vec![0u8; l];
                    cache.read_partial(BlockId(b), o as u32, &mut buf).unwrap();
                    prop_assert_eq!(&buf[..], &model[b as usize][o..o + l]);
                }
                Op::Flush => {
                    cache.flush().unwrap();
                    prop_assert!(below_equals(&probe, &model), "lower store differs after flush");
                }
            }
        }
        cache.flush().unwrap();
        prop_assert!(below_equals(&probe, &model), "lower store differs after the last flush");
    }
}
