//! Protection against eventually consistent stores (spec 6.5): remembers the ETag of recently
//! written blocks so that a read never returns an older version, and spaces out writes of the
//! same block by `--minWriteDelay`.
//!
//! Each remembered block is either being written (other readers and writers of it wait) or
//! written at a known time with known content: zero (answered locally), an ETag (the read below
//! must find exactly that object, else it is retried), or unknown (the backend gave no ETag).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::backend::s3::Backoff;
use crate::error::{Error, Result};
use crate::geometry::{BlockId, Geometry};
use crate::stats::{Counter, StatsReport, TimeCounter};
use crate::store::{Block, BlockStore, Etag, ReadInfo, Revalidated, WriteInfo};

/// Settings of the layer (`--md5CacheSize`, `--md5CacheTime`, `--minWriteDelay`).
#[derive(Clone, Debug)]
pub struct EcProtectOptions {
    /// Blocks remembered at once; capped to the number of blocks. Must be > 0.
    pub cache_size: usize,
    /// How long a written block is remembered; `None` = forever.
    pub cache_time: Option<Duration>,
    /// Minimum gap between the end of one write of a block and the start of the next.
    pub min_write_delay: Duration,
    /// Backoff of reads that found an older version (`--initialRetryPause`, `--maxRetryPause`).
    pub stale_retry_initial: Duration,
    pub stale_retry_max: Duration,
}

impl EcProtectOptions {
    /// Spec 6.5: with an infinite cache time, entries never leave, so a cache smaller than the
    /// disk would eventually block every writer.
    pub fn validate(&self, geometry: Geometry) -> std::result::Result<(), String> {
        if self.cache_time.is_none() && self.cache_size < geometry.num_blocks() as usize {
            return Err(format!(
                "`--md5CacheTime' is infinite but `--md5CacheSize' ({}) is less than the number of blocks ({}), so eventual deadlock would result",
                self.cache_size,
                geometry.num_blocks()
            ));
        }
        if let Some(time) = self.cache_time
            && time < self.min_write_delay
        {
            return Err("`--md5CacheTime' must not be smaller than `--minWriteDelay'".into());
        }
        Ok(())
    }
}

/// What the last completed write stored.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Known {
    Zero,
    Etag(Etag),
    /// The store reported no ETag: nothing to check a read against.
    Unknown,
}

#[derive(Copy, Clone, Debug)]
enum Entry {
    Writing,
    Written { at: Instant, known: Known },
}

#[derive(Default)]
struct State {
    entries: HashMap<BlockId, Entry>,
    /// Completed writes in completion order, for expiry; records of since-rewritten blocks
    /// are skipped when they come up. Empty when entries never expire.
    expiry: VecDeque<(BlockId, Instant)>,
}

#[derive(Debug, Default)]
struct Stats {
    data_hits: Counter,
    full_delays: TimeCounter,
    write_delays: TimeCounter,
}

/// The ec_protect layer over any `BlockStore`.
pub struct EcProtect {
    inner: Arc<dyn BlockStore>,
    opts: EcProtectOptions,
    state: Mutex<State>,
    /// Signalled whenever a write of any block completes.
    changed: Condvar,
    stats: Stats,
}

impl EcProtect {
    pub fn new(inner: Arc<dyn BlockStore>, mut opts: EcProtectOptions) -> Self {
        let num_blocks = inner.geometry().num_blocks() as usize;
        opts.cache_size = opts.cache_size.clamp(1, num_blocks.max(1));
        EcProtect {
            inner,
            opts,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            stats: Stats::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        let mut st = self.state.lock();
        self.expire(&mut st, Instant::now());
        st
    }

    fn expire(&self, st: &mut State, now: Instant) {
        let Some(time) = self.opts.cache_time else {
            return;
        };
        while let Some(&(block, at)) = st.expiry.front() {
            if now < at + time {
                break;
            }
            st.expiry.pop_front();
            if matches!(st.entries.get(&block), Some(Entry::Written { at: a, .. }) if *a == at) {
                st.entries.remove(&block);
            }
        }
    }

    /// Waits until `block` may be written, then marks it as being written.
    fn begin_write(&self, block: BlockId) {
        let mut st = self.lock();
        loop {
            let now = Instant::now();
            match st.entries.get(&block).copied() {
                // Writes of one block are serialized so their order is the callers' order.
                Some(Entry::Writing) => self.changed.wait(&mut st),
                Some(Entry::Written { at, .. }) => {
                    let due = at + self.opts.min_write_delay;
                    if now >= due {
                        break;
                    }
                    self.changed.wait_until(&mut st, due);
                    self.stats.write_delays.add(now.elapsed());
                }
                None if st.entries.len() < self.opts.cache_size => break,
                None => {
                    // Full: wait for the oldest entry to expire, or for any write to finish.
                    let oldest = st.expiry.front().map(|&(_, at)| at);
                    match (oldest, self.opts.cache_time) {
                        (Some(at), Some(time)) => {
                            self.changed.wait_until(&mut st, at + time);
                        }
                        _ => self.changed.wait(&mut st),
                    }
                    self.stats.full_delays.add(now.elapsed());
                }
            }
            self.expire(&mut st, Instant::now());
        }
        st.entries.insert(block, Entry::Writing);
    }

    fn end_write(&self, block: BlockId, outcome: Option<Known>) {
        let mut st = self.state.lock();
        match outcome {
            Some(known) => {
                let at = Instant::now();
                st.entries.insert(block, Entry::Written { at, known });
                if self.opts.cache_time.is_some() {
                    st.expiry.push_back((block, at));
                }
            }
            // A failed write may or may not have reached the store: nothing is known.
            None => {
                st.entries.remove(&block);
            }
        }
        drop(st);
        self.changed.notify_all();
    }

    /// What the last write of `block` stored, waiting for a write in progress to finish.
    fn known(&self, block: BlockId) -> Option<Known> {
        let mut st = self.lock();
        loop {
            match st.entries.get(&block) {
                Some(Entry::Writing) => self.changed.wait(&mut st),
                Some(Entry::Written { known, .. }) => return Some(*known),
                None => return None,
            }
        }
    }
}

impl BlockStore for EcProtect {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }

    fn read_block(&self, block: BlockId, buf: &mut [u8]) -> Result<ReadInfo> {
        let mut backoff = Backoff::new(self.opts.stale_retry_initial, self.opts.stale_retry_max);
        loop {
            let expect = match self.known(block) {
                Some(Known::Zero) => {
                    buf.fill(0);
                    self.stats.data_hits.inc();
                    return Ok(ReadInfo {
                        zero: true,
                        etag: None,
                    });
                }
                Some(Known::Etag(etag)) => etag,
                Some(Known::Unknown) | None => return self.inner.read_block(block, buf),
            };
            match self.inner.read_block_expect(block, buf, expect) {
                Err(Error::Stale(msg)) => match backoff.next_pause(rand::random::<f64>()) {
                    Some(pause) => {
                        tracing::debug!("block {block}: {msg}; retrying in {pause:?}");
                        std::thread::sleep(pause);
                    }
                    None => return Err(Error::Stale(msg)),
                },
                other => return other,
            }
        }
    }

    fn read_block_if_changed(
        &self,
        block: BlockId,
        buf: &mut [u8],
        cached: Etag,
    ) -> Result<Revalidated> {
        match self.known(block) {
            // We wrote that very version: no need to ask a store that may lag behind.
            Some(Known::Etag(etag)) if etag == cached => Ok(Revalidated::Unchanged),
            Some(Known::Etag(_) | Known::Zero) => {
                self.read_block(block, buf).map(Revalidated::Changed)
            }
            Some(Known::Unknown) | None => self.inner.read_block_if_changed(block, buf, cached),
        }
    }

    fn write_block(&self, block: BlockId, data: Block<'_>) -> Result<WriteInfo> {
        self.begin_write(block);
        let result = self.inner.write_block(block, data);
        let outcome = result.as_ref().ok().map(|info| match (data, info.etag) {
            (Block::Zero, _) => Known::Zero,
            (Block::Data(_), Some(etag)) => Known::Etag(etag),
            (Block::Data(_), None) => Known::Unknown,
        });
        self.end_write(block, outcome);
        result
    }

    fn bulk_zero(&self, blocks: &[BlockId]) -> Result<()> {
        // Each block needs its own write-delay bookkeeping: through write_block, in parallel.
        crate::store::zero_in_parallel(self, blocks, 16)
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    fn survey_non_zero(&self, threads: usize, found: &(dyn Fn(BlockId) + Sync)) -> Result<()> {
        self.inner.survey_non_zero(threads, found)
    }

    fn stats(&self, report: &mut StatsReport) {
        self.inner.stats(report);
        let size = self.lock().entries.len();
        report.add("md5_cache_current_size", format!("{size} blocks"));
        report.add("md5_cache_data_hits", self.stats.data_hits.get());
        report.add_secs(
            "md5_cache_full_delays",
            self.stats.full_delays.total().as_secs_f64(),
        );
        report.add_secs(
            "md5_cache_write_delays",
            self.stats.write_delays.total().as_secs_f64(),
        );
    }

    fn reset_stats(&self) {
        self.stats.data_hits.reset();
        self.stats.full_delays.reset();
        self.stats.write_delays.reset();
        self.inner.reset_stats();
    }

    fn shutdown(&self) -> Result<()> {
        self.inner.shutdown()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryBackend;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const BS: usize = 512;

    fn geometry(blocks: u64) -> Geometry {
        Geometry::new(blocks * BS as u64, BS as u32).unwrap()
    }

    /// A block's content before its last write (`None`: absent), and how many reads still see it.
    type Previous = (Option<Vec<u8>>, usize);

    /// An eventually consistent store: after each write of a block, the next `lag` reads of it
    /// still see the version before that write. Records when each write started and ended.
    struct Lagging {
        inner: MemoryBackend,
        lag: usize,
        old: Mutex<HashMap<BlockId, Previous>>,
        reads: AtomicUsize,
        writes: Mutex<Vec<(BlockId, Instant, Instant)>>,
    }

    impl Lagging {
        fn new(blocks: u64, lag: usize) -> Arc<Self> {
            Arc::new(Lagging {
                inner: MemoryBackend::new(geometry(blocks)),
                lag,
                old: Mutex::new(HashMap::new()),
                reads: AtomicUsize::new(0),
                writes: Mutex::new(Vec::new()),
            })
        }
    }

    impl BlockStore for Lagging {
        fn geometry(&self) -> Geometry {
            self.inner.geometry()
        }
        fn read_block(&self, block: BlockId, buf: &mut [u8]) -> Result<ReadInfo> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let mut old = self.old.lock();
            if let Some((data, left)) = old.get_mut(&block)
                && *left > 0
            {
                *left -= 1;
                return Ok(match data {
                    Some(data) => {
                        buf.copy_from_slice(data);
                        ReadInfo {
                            zero: false,
                            etag: Some(<md5::Md5 as md5::Digest>::digest(data.as_slice()).into()),
                        }
                    }
                    None => {
                        buf.fill(0);
                        ReadInfo {
                            zero: true,
                            etag: None,
                        }
                    }
                });
            }
            drop(old);
            self.inner.read_block(block, buf)
        }
        fn write_block(&self, block: BlockId, data: Block<'_>) -> Result<WriteInfo> {
            let started = Instant::now();
            let previous = self.inner.stored(block);
            self.old.lock().insert(block, (previous, self.lag));
            let info = self.inner.write_block(block, data)?;
            self.writes.lock().push((block, started, Instant::now()));
            Ok(info)
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn survey_non_zero(&self, t: usize, f: &(dyn Fn(BlockId) + Sync)) -> Result<()> {
            self.inner.survey_non_zero(t, f)
        }
        fn stats(&self, _: &mut StatsReport) {}
        fn reset_stats(&self) {}
    }

    fn options(cache_size: usize) -> EcProtectOptions {
        EcProtectOptions {
            cache_size,
            cache_time: None,
            min_write_delay: Duration::ZERO,
            stale_retry_initial: Duration::from_millis(1),
            stale_retry_max: Duration::from_secs(5),
        }
    }

    fn block_of(byte: u8) -> Vec<u8> {
        vec![byte; BS]
    }

    fn report(store: &dyn BlockStore) -> StatsReport {
        let mut r = StatsReport::default();
        store.stats(&mut r);
        r
    }

    #[test]
    fn the_lagging_store_really_returns_old_data() {
        let store = Lagging::new(4, 2);
        store
            .write_block(BlockId(1), Block::Data(&block_of(1)))
            .unwrap();
        store
            .write_block(BlockId(1), Block::Data(&block_of(2)))
            .unwrap();
        let mut buf = vec![0; BS];
        store.read_block(BlockId(1), &mut buf).unwrap();
        assert_eq!(buf, block_of(1));
    }

    #[test]
    fn reads_after_writes_never_return_an_older_version() {
        let lower = Lagging::new(4, 3);
        let ec = EcProtect::new(lower.clone(), options(4));
        let mut buf = vec![0; BS];
        for version in 1..=10u8 {
            ec.write_block(BlockId(2), Block::Data(&block_of(version)))
                .unwrap();
            let info = ec.read_block(BlockId(2), &mut buf).unwrap();
            assert_eq!(buf, block_of(version), "version {version}");
            assert!(!info.zero);
        }
        // Each read met three stale answers before the fresh one.
        assert_eq!(lower.reads.load(Ordering::SeqCst), 10 * 4);
    }

    #[test]
    fn a_block_not_yet_visible_is_not_read_as_zero() {
        let lower = Lagging::new(4, 2);
        let ec = EcProtect::new(lower.clone(), options(4));
        ec.write_block(BlockId(0), Block::Data(&block_of(7)))
            .unwrap();
        let mut buf = vec![0; BS];
        let info = ec.read_block(BlockId(0), &mut buf).unwrap();
        assert_eq!((buf, info.zero), (block_of(7), false));
    }

    #[test]
    fn a_store_that_stays_stale_gives_estale_not_old_data() {
        let lower = Lagging::new(4, usize::MAX);
        let mut opts = options(4);
        opts.stale_retry_max = Duration::from_millis(20);
        let ec = EcProtect::new(lower.clone(), opts);
        ec.write_block(BlockId(1), Block::Data(&block_of(1)))
            .unwrap();
        let mut buf = vec![0; BS];
        let err = ec.read_block(BlockId(1), &mut buf).unwrap_err();
        assert_eq!(err.errno(), libc::ESTALE, "{err}");
        assert!(lower.reads.load(Ordering::SeqCst) > 1, "retried");
    }

    #[test]
    fn a_block_written_as_zero_is_read_locally() {
        let lower = Lagging::new(4, 5);
        let ec = EcProtect::new(lower.clone(), options(4));
        ec.write_block(BlockId(3), Block::Data(&block_of(9)))
            .unwrap();
        ec.write_block(BlockId(3), Block::Zero).unwrap();
        let mut buf = block_of(1);
        let info = ec.read_block(BlockId(3), &mut buf).unwrap();
        assert!(info.zero);
        assert_eq!(buf, vec![0; BS]);
        assert_eq!(lower.reads.load(Ordering::SeqCst), 0);
        assert_eq!(report(&ec).get("md5_cache_data_hits"), Some("1"));
    }

    #[test]
    fn unremembered_blocks_are_read_plainly() {
        let lower = Lagging::new(4, 0);
        lower
            .write_block(BlockId(1), Block::Data(&block_of(4)))
            .unwrap();
        let ec = EcProtect::new(lower.clone(), options(4));
        let mut buf = vec![0; BS];
        ec.read_block(BlockId(1), &mut buf).unwrap();
        assert_eq!(buf, block_of(4));
        assert_eq!(report(&ec).get("md5_cache_current_size"), Some("0 blocks"));
    }

    #[test]
    fn rewrites_of_a_block_wait_for_the_min_write_delay() {
        let lower = Lagging::new(4, 0);
        let mut opts = options(4);
        opts.min_write_delay = Duration::from_millis(30);
        let ec = EcProtect::new(lower.clone(), opts);
        for version in 1..=3u8 {
            ec.write_block(BlockId(1), Block::Data(&block_of(version)))
                .unwrap();
        }
        let writes = lower.writes.lock().clone();
        assert_eq!(writes.len(), 3);
        for pair in writes.windows(2) {
            let gap = pair[1].1.duration_since(pair[0].2);
            assert!(gap >= Duration::from_millis(30), "gap {gap:?}");
        }
        assert_ne!(report(&ec).get("md5_cache_write_delays"), Some("0.000 sec"));
    }

    #[test]
    fn a_full_cache_makes_new_writers_wait_for_the_oldest_entry_to_expire() {
        let lower = Lagging::new(8, 0);
        let mut opts = options(2);
        opts.cache_time = Some(Duration::from_millis(40));
        let ec = EcProtect::new(lower.clone(), opts);
        for b in 0..3 {
            ec.write_block(BlockId(b), Block::Data(&block_of(1)))
                .unwrap();
        }
        let writes = lower.writes.lock().clone();
        let first_done = writes[0].2;
        let third_started = writes[2].1;
        assert!(third_started.duration_since(first_done) >= Duration::from_millis(40));
        let r = report(&ec);
        assert_ne!(r.get("md5_cache_full_delays"), Some("0.000 sec"));
        // Block 1 may have expired meanwhile too; never more than the cache size.
        let size = r.get("md5_cache_current_size").unwrap();
        assert!(["1 blocks", "2 blocks"].contains(&size), "{size}");
    }

    #[test]
    fn concurrent_writers_of_one_block_are_serialized_and_the_last_one_is_read() {
        let lower = Lagging::new(4, 2);
        let ec = Arc::new(EcProtect::new(lower.clone(), options(4)));
        std::thread::scope(|s| {
            for t in 1..=4u8 {
                let ec = ec.clone();
                s.spawn(move || {
                    for _ in 0..10 {
                        ec.write_block(BlockId(0), Block::Data(&block_of(t)))
                            .unwrap();
                    }
                });
            }
        });
        let last = lower.inner.stored(BlockId(0)).unwrap();
        let mut buf = vec![0; BS];
        ec.read_block(BlockId(0), &mut buf).unwrap();
        assert_eq!(buf, last);
        let writes = lower.writes.lock().clone();
        for pair in writes.windows(2) {
            assert!(pair[1].1 >= pair[0].2, "writes of one block overlapped");
        }
    }

    #[test]
    fn infinite_time_needs_a_cache_as_large_as_the_disk() {
        let g = geometry(100);
        let err = options(99).validate(g).unwrap_err();
        assert!(err.contains("eventual deadlock"), "{err}");
        options(100).validate(g).unwrap();
        let mut finite = options(10);
        finite.cache_time = Some(Duration::from_secs(1));
        finite.validate(g).unwrap();
        finite.min_write_delay = Duration::from_secs(2);
        assert!(finite.validate(g).is_err());
    }
}
