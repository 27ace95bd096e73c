//! Zero cache (spec 6.4): remembers which blocks are known to be all zeros, so their reads cost
//! no request and zero writes to them are dropped. `--listBlocks` fills it by listing the bucket
//! in the background at start-up. [`ZeroReads`] shares that knowledge below the block cache
//! (spec 6.1's lower zero cache), so read-ahead costs no GET for known-zero blocks either.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use tracing::{info, warn};

use crate::error::Result;
use crate::geometry::{BlockId, Geometry};
use crate::stats::{Counter, StatsReport};
use crate::store::{Block, BlockStore, Etag, ReadInfo, Revalidated, WriteInfo};

/// A fixed-size bitmap of atomics, one bit per block. It is zeroed lazily by the allocator, so a
/// 2^32-block disk costs address space, not resident memory, until bits are set.
struct Bitmap {
    words: Box<[AtomicU64]>,
}

// The cast in `Bitmap::new` relies on identical layouts.
const _: () = assert!(
    size_of::<AtomicU64>() == size_of::<u64>() && align_of::<AtomicU64>() == align_of::<u64>()
);

impl Bitmap {
    fn new(bits: u32) -> Self {
        let zeroed = vec![0u64; u64::from(bits).div_ceil(64) as usize].into_boxed_slice();
        // SAFETY: AtomicU64 has the size, alignment (asserted above) and bit validity of u64 and
        // the box is uniquely owned. `vec![0; n]` is a zeroed allocation; an iterator of
        // `AtomicU64::new(0)` would write (and so commit) every page.
        let words = unsafe { Box::from_raw(Box::into_raw(zeroed) as *mut [AtomicU64]) };
        Bitmap { words }
    }

    fn locate(block: BlockId) -> (usize, u64) {
        ((block.0 / 64) as usize, 1u64 << (block.0 % 64))
    }

    fn get(&self, block: BlockId) -> bool {
        let (word, mask) = Self::locate(block);
        self.words[word].load(Ordering::Acquire) & mask != 0
    }

    /// Sets the bit; returns whether it changed.
    fn set(&self, block: BlockId) -> bool {
        let (word, mask) = Self::locate(block);
        self.words[word].fetch_or(mask, Ordering::AcqRel) & mask == 0
    }

    /// Clears the bit; returns whether it changed.
    fn clear(&self, block: BlockId) -> bool {
        let (word, mask) = Self::locate(block);
        self.words[word].fetch_and(!mask, Ordering::AcqRel) & mask != 0
    }
}

/// Bookkeeping while the `--listBlocks` survey runs.
struct Survey {
    listed: Bitmap,
    /// Blocks read or written while the listing ran: the listing may predate them.
    touched: Bitmap,
}

/// Which blocks are known to read as zeros: one bit each, and how many are set.
pub struct KnownZero {
    bits: Bitmap,
    count: AtomicU64,
}

impl KnownZero {
    pub fn new(geometry: Geometry) -> Arc<KnownZero> {
        Arc::new(KnownZero {
            bits: Bitmap::new(geometry.num_blocks()),
            count: AtomicU64::new(0),
        })
    }

    fn get(&self, block: BlockId) -> bool {
        self.bits.get(block)
    }

    fn mark_zero(&self, block: BlockId) {
        if self.bits.set(block) {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn mark_unknown(&self, block: BlockId) {
        if self.bits.clear(block) {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

pub struct ZeroCache {
    inner: Arc<dyn BlockStore>,
    geometry: Geometry,
    known: Arc<KnownZero>,
    survey: Mutex<Option<Arc<Survey>>>,
    surveying: AtomicBool,
    read_hits: Counter,
    write_hits: Counter,
}

impl ZeroCache {
    /// Starts with nothing known.
    pub fn new(inner: Arc<dyn BlockStore>) -> Self {
        let known = KnownZero::new(inner.geometry());
        Self::sharing(inner, known)
    }

    /// Keeps its knowledge in `known`, which a [`ZeroReads`] lower in the stack reads too.
    pub fn sharing(inner: Arc<dyn BlockStore>, known: Arc<KnownZero>) -> Self {
        let geometry = inner.geometry();
        ZeroCache {
            inner,
            geometry,
            known,
            survey: Mutex::new(None),
            surveying: AtomicBool::new(false),
            read_hits: Counter::default(),
            write_hits: Counter::default(),
        }
    }

    /// Lists the stored blocks in a background thread; every block not listed becomes known zero.
    pub fn start_survey(self: &Arc<Self>, threads: usize) -> std::thread::JoinHandle<()> {
        let survey = Arc::new(Survey {
            listed: Bitmap::new(self.geometry.num_blocks()),
            touched: Bitmap::new(self.geometry.num_blocks()),
        });
        *self.survey.lock() = Some(survey.clone());
        self.surveying.store(true, Ordering::SeqCst);
        let this = self.clone();
        std::thread::Builder::new()
            .name("list-blocks".into())
            .spawn(move || this.run_survey(&survey, threads))
            .expect("spawn survey thread")
    }

    fn run_survey(&self, survey: &Survey, threads: usize) {
        let start = Instant::now();
        info!("listing non-zero blocks...");
        let found = AtomicU64::new(0);
        let result = self.inner.survey_non_zero(threads.max(1), &|block| {
            if self.geometry.contains(block) && survey.listed.set(block) {
                found.fetch_add(1, Ordering::Relaxed);
            }
        });
        match result {
            Ok(()) => {
                // Checking "touched" and marking zero happen under the lock `touch` takes, so a
                // write that starts meanwhile either is seen here or clears the mark after it.
                let blocks = self.geometry.num_blocks();
                for first in (0..blocks).step_by(64) {
                    let _touches = self.survey.lock();
                    for block in (first..blocks.min(first.saturating_add(64))).map(BlockId) {
                        if !survey.listed.get(block) && !survey.touched.get(block) {
                            self.known.mark_zero(block);
                        }
                    }
                }
                info!(
                    "found {} non-zero blocks in {:.1} s",
                    found.load(Ordering::Relaxed),
                    start.elapsed().as_secs_f64()
                );
            }
            Err(e) => warn!("listing blocks failed, zero cache stays empty: {e}"),
        }
        self.surveying.store(false, Ordering::SeqCst);
        *self.survey.lock() = None;
    }

    /// Notes, before any I/O, that a block's state may change while a survey runs.
    fn touch(&self, block: BlockId) {
        if self.surveying.load(Ordering::SeqCst)
            && let Some(survey) = self.survey.lock().as_ref()
        {
            survey.touched.set(block);
        }
    }

    fn record(&self, block: BlockId, zero: bool) {
        if zero {
            self.known.mark_zero(block);
        } else {
            self.known.mark_unknown(block);
        }
    }
}

impl BlockStore for ZeroCache {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn read_block(&self, block: BlockId, buf: &mut [u8]) -> Result<ReadInfo> {
        if self.known.get(block) {
            self.read_hits.inc();
            buf.fill(0);
            return Ok(ReadInfo {
                zero: true,
                etag: None,
            });
        }
        self.touch(block);
        let info = self.inner.read_block(block, buf)?;
        self.record(block, info.zero);
        Ok(info)
    }

    fn read_partial(&self, block: BlockId, offset: u32, buf: &mut [u8]) -> Result<()> {
        if self.known.get(block) {
            self.read_hits.inc();
            buf.fill(0);
            return Ok(());
        }
        self.inner.read_partial(block, offset, buf)
    }

    fn write_block(&self, block: BlockId, data: Block<'_>) -> Result<WriteInfo> {
        if data.is_zero() && self.known.get(block) {
            self.write_hits.inc();
            return Ok(WriteInfo::default());
        }
        self.touch(block);
        // Unknown while the write is under way, and after it if it fails.
        self.known.mark_unknown(block);
        let info = self.inner.write_block(block, data)?;
        self.record(block, data.is_zero());
        Ok(info)
    }

    fn write_partial(&self, block: BlockId, offset: u32, data: &[u8]) -> Result<()> {
        self.touch(block);
        if self.known.get(block) {
            // No need to read a block we know is zero.
            let mut whole = vec![0u8; self.geometry.block_size_usize()];
            let start = offset as usize;
            whole[start..start + data.len()].copy_from_slice(data);
            return self.write_block(block, Block::from_buf(&whole)).map(|_| ());
        }
        self.known.mark_unknown(block);
        self.inner.write_partial(block, offset, data)
    }

    fn bulk_zero(&self, blocks: &[BlockId]) -> Result<()> {
        let todo: Vec<BlockId> = blocks
            .iter()
            .copied()
            .filter(|&b| {
                let known = self.known.get(b);
                if known {
                    self.write_hits.inc();
                }
                !known
            })
            .collect();
        for &b in &todo {
            self.touch(b);
            self.known.mark_unknown(b);
        }
        self.inner.bulk_zero(&todo)?;
        todo.iter().for_each(|&b| self.known.mark_zero(b));
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    fn known_zero(&self, block: BlockId) -> bool {
        self.known.get(block) || self.inner.known_zero(block)
    }

    fn survey_non_zero(&self, threads: usize, found: &(dyn Fn(BlockId) + Sync)) -> Result<()> {
        self.inner.survey_non_zero(threads, found)
    }

    fn stats(&self, report: &mut StatsReport) {
        report.add(
            "zero_block_cache_size",
            format!("{} blocks", self.known.count()),
        );
        report.add("zero_block_cache_read_hits", self.read_hits.get());
        report.add("zero_block_cache_write_hits", self.write_hits.get());
        self.inner.stats(report);
    }

    fn reset_stats(&self) {
        self.read_hits.reset();
        self.write_hits.reset();
        self.inner.reset_stats();
    }

    fn shutdown(&self) -> Result<()> {
        self.inner.shutdown()
    }
}

/// Below the block cache: reads of blocks that the zero cache above knows are zero return
/// zeros without a request (read-ahead and misses alike). It learns nothing and drops no write:
/// a zero write the block cache holds is known zero above before its DELETE is uploaded, and
/// that DELETE must still reach the store.
pub struct ZeroReads {
    inner: Arc<dyn BlockStore>,
    known: Arc<KnownZero>,
}

impl ZeroReads {
    pub fn new(inner: Arc<dyn BlockStore>, known: Arc<KnownZero>) -> Self {
        ZeroReads { inner, known }
    }

    fn zero() -> ReadInfo {
        ReadInfo {
            zero: true,
            etag: None,
        }
    }
}

impl BlockStore for ZeroReads {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }

    fn read_block(&self, block: BlockId, buf: &mut [u8]) -> Result<ReadInfo> {
        if self.known.get(block) {
            buf.fill(0);
            return Ok(Self::zero());
        }
        self.inner.read_block(block, buf)
    }

    fn read_block_owned(&self, block: BlockId) -> Result<(ReadInfo, Vec<u8>)> {
        if self.known.get(block) {
            let zeros = vec![0u8; self.geometry().block_size_usize()];
            return Ok((Self::zero(), zeros));
        }
        self.inner.read_block_owned(block)
    }

    fn read_block_if_changed(
        &self,
        block: BlockId,
        buf: &mut [u8],
        cached: Etag,
    ) -> Result<Revalidated> {
        if self.known.get(block) {
            buf.fill(0);
            return Ok(Revalidated::Changed(Self::zero()));
        }
        self.inner.read_block_if_changed(block, buf, cached)
    }

    fn read_block_expect(&self, block: BlockId, buf: &mut [u8], expect: Etag) -> Result<ReadInfo> {
        self.inner.read_block_expect(block, buf, expect)
    }

    fn read_partial(&self, block: BlockId, offset: u32, buf: &mut [u8]) -> Result<()> {
        if self.known.get(block) {
            buf.fill(0);
            return Ok(());
        }
        self.inner.read_partial(block, offset, buf)
    }

    fn write_block(&self, block: BlockId, data: Block<'_>) -> Result<WriteInfo> {
        self.inner.write_block(block, data)
    }

    fn write_partial(&self, block: BlockId, offset: u32, data: &[u8]) -> Result<()> {
        self.inner.write_partial(block, offset, data)
    }

    fn bulk_zero(&self, blocks: &[BlockId]) -> Result<()> {
        self.inner.bulk_zero(blocks)
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    fn known_zero(&self, block: BlockId) -> bool {
        self.known.get(block) || self.inner.known_zero(block)
    }

    fn survey_non_zero(&self, threads: usize, found: &(dyn Fn(BlockId) + Sync)) -> Result<()> {
        self.inner.survey_non_zero(threads, found)
    }

    fn stats(&self, report: &mut StatsReport) {
        self.inner.stats(report);
    }

    fn reset_stats(&self) {
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

    fn setup(blocks: u32) -> (Arc<MemoryBackend>, Arc<ZeroCache>) {
        let mem = Arc::new(MemoryBackend::new(
            Geometry::new(u64::from(blocks) * 512, 512).unwrap(),
        ));
        (mem.clone(), Arc::new(ZeroCache::new(mem)))
    }

    #[test]
    fn zero_reads_below_answer_what_the_zero_cache_knows_and_pass_every_write() {
        let mem = Arc::new(MemoryBackend::new(Geometry::new(8 * 512, 512).unwrap()));
        mem.write_block(BlockId(5), Block::Data(&[7u8; 512]))
            .unwrap();
        let known = KnownZero::new(mem.geometry());
        let lower = Arc::new(ZeroReads::new(mem.clone(), known.clone()));
        let upper = ZeroCache::sharing(lower.clone(), known);
        let mut buf = vec![1u8; 512];
        assert!(upper.read_block(BlockId(3), &mut buf).unwrap().zero);
        assert_eq!(mem.reads.get(), 1);
        assert!(lower.read_block(BlockId(3), &mut buf).unwrap().zero);
        assert!(lower.read_block_owned(BlockId(3)).unwrap().0.zero);
        assert_eq!(mem.reads.get(), 1, "known zero above: no request below");
        assert!(!lower.read_block(BlockId(5), &mut buf).unwrap().zero);
        assert_eq!(mem.reads.get(), 2);
        // Known zero above once written, yet the lower view still passes the delete on.
        upper.write_block(BlockId(5), Block::Zero).unwrap();
        assert!(upper.known_zero(BlockId(5)));
        lower.write_block(BlockId(5), Block::Zero).unwrap();
        assert_eq!(mem.deletes.get(), 2);
    }

    #[test]
    fn read_ahead_under_the_zero_cache_costs_no_request_for_known_zero_blocks() {
        use crate::layer::block_cache::{BlockCache, BlockCacheOptions};
        let mem = Arc::new(MemoryBackend::new(Geometry::new(64 * 512, 512).unwrap()));
        for b in 0..4 {
            mem.write_block(BlockId(b), Block::Data(&[b as u8 + 1; 512]))
                .unwrap();
        }
        let known = KnownZero::new(mem.geometry());
        let opts = BlockCacheOptions {
            size: 32,
            read_ahead: 4,
            read_ahead_max: 4,
            ..BlockCacheOptions::default()
        };
        let cache = BlockCache::new(Arc::new(ZeroReads::new(mem.clone(), known.clone())), opts);
        let zc = Arc::new(ZeroCache::sharing(cache, known));
        zc.start_survey(1).join().unwrap();
        let mut buf = vec![0u8; 512];
        for b in 0..4 {
            zc.read_block(BlockId(b), &mut buf).unwrap();
        }
        // Read-ahead after block 3 takes blocks 4..=7 into the cache: 8 entries in all.
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while crate::stats::report_of(zc.as_ref()).get("block_cache_current_size")
            != Some("8 blocks")
        {
            assert!(Instant::now() < deadline, "read-ahead did not finish");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(mem.reads.get(), 4, "only the stored blocks were read");
        zc.shutdown().unwrap();
    }

    #[test]
    fn known_zero_blocks_cost_no_lower_request() {
        let (mem, zc) = setup(8);
        let mut buf = vec![1u8; 512];
        assert!(zc.read_block(BlockId(3), &mut buf).unwrap().zero);
        assert_eq!(mem.reads.get(), 1);
        assert!(zc.read_block(BlockId(3), &mut buf).unwrap().zero);
        zc.write_block(BlockId(3), Block::Zero).unwrap();
        assert_eq!(
            (mem.reads.get(), mem.deletes.get()),
            (1, 0),
            "served from the bitmap"
        );
        zc.write_block(BlockId(3), Block::Data(&[9u8; 512]))
            .unwrap();
        zc.read_block(BlockId(3), &mut buf).unwrap();
        assert_eq!(buf, vec![9u8; 512]);
        assert_eq!(mem.reads.get(), 2, "non-zero data is read from below");
        let mut report = StatsReport::default();
        zc.stats(&mut report);
        assert_eq!(report.get("zero_block_cache_read_hits"), Some("1"));
        assert_eq!(report.get("zero_block_cache_write_hits"), Some("1"));
        assert_eq!(report.get("zero_block_cache_size"), Some("0 blocks"));
    }

    #[test]
    fn known_zero_hint_follows_what_was_read_and_written() {
        let (_mem, zc) = setup(4);
        assert!(!zc.known_zero(BlockId(2)), "nothing known yet");
        zc.write_block(BlockId(2), Block::Zero).unwrap();
        assert!(zc.known_zero(BlockId(2)));
        zc.write_block(BlockId(2), Block::Data(&[3u8; 512]))
            .unwrap();
        assert!(!zc.known_zero(BlockId(2)));
        let mut buf = vec![0u8; 512];
        zc.read_block(BlockId(1), &mut buf).unwrap();
        assert!(zc.known_zero(BlockId(1)), "an absent block read as zero");
    }

    #[test]
    fn failed_write_leaves_the_block_unknown() {
        let (mem, zc) = setup(4);
        let mut buf = vec![0u8; 512];
        zc.read_block(BlockId(1), &mut buf).unwrap();
        mem.fail_block(BlockId(1));
        assert!(
            zc.write_block(BlockId(1), Block::Data(&[1u8; 512]))
                .is_err()
        );
        assert!(
            zc.read_block(BlockId(1), &mut buf).is_err(),
            "must ask the store again"
        );
    }

    #[test]
    fn survey_marks_exactly_the_absent_blocks() {
        let (mem, zc) = setup(16);
        for b in [2u32, 7, 15] {
            mem.write_block(BlockId(b), Block::Data(&[b as u8 + 1; 512]))
                .unwrap();
        }
        zc.start_survey(4).join().unwrap();
        let mut buf = vec![0u8; 512];
        for b in 0..16u32 {
            zc.read_block(BlockId(b), &mut buf).unwrap();
        }
        assert_eq!(mem.reads.get(), 3, "only the listed blocks are read");
        let mut report = StatsReport::default();
        zc.stats(&mut report);
        assert_eq!(report.get("zero_block_cache_size"), Some("13 blocks"));
    }

    /// A lower store whose listing waits until the test has written a block.
    struct SlowList {
        inner: MemoryBackend,
        gate: std::sync::Barrier,
    }

    impl BlockStore for SlowList {
        fn geometry(&self) -> Geometry {
            self.inner.geometry()
        }
        fn read_block(&self, b: BlockId, buf: &mut [u8]) -> Result<ReadInfo> {
            self.inner.read_block(b, buf)
        }
        fn write_block(&self, b: BlockId, d: Block<'_>) -> Result<WriteInfo> {
            self.inner.write_block(b, d)
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn survey_non_zero(&self, t: usize, found: &(dyn Fn(BlockId) + Sync)) -> Result<()> {
            // The listing is taken first (empty), then the write lands: a stale listing.
            let listing: Vec<BlockId> = {
                let v = std::sync::Mutex::new(Vec::new());
                self.inner
                    .survey_non_zero(t, &|b| v.lock().unwrap().push(b))?;
                v.into_inner().unwrap()
            };
            self.gate.wait();
            self.gate.wait();
            listing.into_iter().for_each(found);
            Ok(())
        }
        fn stats(&self, _: &mut StatsReport) {}
        fn reset_stats(&self) {}
    }

    #[test]
    fn block_written_during_the_survey_is_not_marked_zero() {
        let lower = Arc::new(SlowList {
            inner: MemoryBackend::new(Geometry::new(8 * 512, 512).unwrap()),
            gate: std::sync::Barrier::new(2),
        });
        let zc = Arc::new(ZeroCache::new(lower.clone()));
        let survey = zc.start_survey(1);
        lower.gate.wait();
        zc.write_block(BlockId(5), Block::Data(&[5u8; 512]))
            .unwrap();
        lower.gate.wait();
        survey.join().unwrap();
        let mut buf = vec![0u8; 512];
        let info = zc.read_block(BlockId(5), &mut buf).unwrap();
        assert!(!info.zero);
        assert_eq!(buf, vec![5u8; 512]);
        assert!(zc.read_block(BlockId(4), &mut buf).unwrap().zero);
    }

    #[test]
    fn partial_write_to_known_zero_block_does_not_read_below() {
        let (mem, zc) = setup(4);
        zc.start_survey(1).join().unwrap();
        zc.write_partial(BlockId(2), 100, &[7u8; 10]).unwrap();
        assert_eq!(mem.reads.get(), 0);
        let stored = mem.stored(BlockId(2)).unwrap();
        assert_eq!(&stored[100..110], &[7u8; 10]);
        assert!(stored[..100].iter().all(|&b| b == 0));
    }

    #[test]
    fn bulk_zero_skips_known_zero_blocks() {
        let (mem, zc) = setup(8);
        mem.write_block(BlockId(1), Block::Data(&[1u8; 512]))
            .unwrap();
        zc.start_survey(1).join().unwrap();
        zc.bulk_zero(&[BlockId(0), BlockId(1), BlockId(2)]).unwrap();
        assert_eq!(mem.deletes.get(), 1);
        assert_eq!(mem.stored_count(), 0);
    }
}
