//! Byte-range access on top of a block store (spec 6.3): a request is split into per-block
//! pieces; whole blocks go straight down, partial blocks use `read_partial` or a
//! read-modify-write. Shared by the FUSE frontend and (later) the NBD server.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Mutex, MutexGuard};
use tracing::warn;

use crate::error::{Error, Result};
use crate::geometry::{BlockId, BlockSpan, Geometry};
use crate::store::{Block, BlockStore};

/// Block operations of one request that run at once: each is a network round trip.
pub const DEFAULT_PARALLELISM: usize = 32;

/// Stripes of the per-block write lock table; two blocks share a lock only when their numbers
/// are equal modulo this, which is rare for the blocks of concurrent requests.
const LOCK_STRIPES: usize = 4096;

/// Whole zero blocks handed to one `bulk_zero` call (and held locked meanwhile).
const ZERO_BATCH: usize = 128;

/// Byte-range reads, writes and hole punching over any [`BlockStore`].
pub struct BlockPart {
    store: Arc<dyn BlockStore>,
    geometry: Geometry,
    /// Serialises writers of one block, so a read-modify-write cannot lose a concurrent write.
    /// Readers need no lock: the store replaces a block atomically.
    write_locks: Box<[Mutex<()>]>,
    parallelism: usize,
}

impl BlockPart {
    pub fn new(store: Arc<dyn BlockStore>) -> Self {
        Self::with_parallelism(store, DEFAULT_PARALLELISM)
    }

    /// `parallelism` bounds the block operations one request runs at once (at least 1).
    pub fn with_parallelism(store: Arc<dyn BlockStore>, parallelism: usize) -> Self {
        let geometry = store.geometry();
        BlockPart {
            store,
            geometry,
            write_locks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            parallelism: parallelism.max(1),
        }
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub fn store(&self) -> &Arc<dyn BlockStore> {
        &self.store
    }

    /// Reads into `buf` at `offset`; returns the bytes read, fewer than `buf.len()` only at the
    /// end of the disk. An offset past the end is an error.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let len = self.clamp(offset, buf.len() as u64)?;
        let buf = &mut buf[..len];
        let pieces = split_spans(self.geometry.spans(offset, len as u64), buf);
        self.run_parallel(pieces, |(span, piece)| self.read_span(span, piece))?;
        Ok(len)
    }

    /// Writes `data` at `offset`; returns the bytes written, fewer than `data.len()` only at
    /// the end of the disk. An offset past the end is an error.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<usize> {
        let len = self.clamp(offset, data.len() as u64)?;
        let data = &data[..len];
        let pieces: Vec<_> = self
            .geometry
            .spans(offset, len as u64)
            .map(|span| {
                (
                    span,
                    &data[span.buf_offset..span.buf_offset + span.len as usize],
                )
            })
            .collect();
        self.run_parallel(pieces, |(span, piece)| self.write_span(span, piece))?;
        Ok(len)
    }

    /// Makes `[offset, offset+len)` read as zeros: partial edge blocks by read-modify-write,
    /// whole blocks deleted (via `bulk_zero`). The whole range must lie inside the disk.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        if self.geometry.clamp(offset, len) != Some(len) {
            return Err(Error::Invalid(format!(
                "zero range {offset}+{len} beyond end of disk ({} bytes)",
                self.geometry.file_size()
            )));
        }
        let (whole, edges): (Vec<_>, Vec<_>) = self
            .geometry
            .spans(offset, len)
            .partition(|span| span.is_whole(&self.geometry));
        let whole: Vec<BlockId> = whole.into_iter().map(|span| span.block).collect();
        let jobs = edges
            .into_iter()
            .map(ZeroJob::Edge)
            .chain(whole.chunks(ZERO_BATCH).map(ZeroJob::Whole))
            .collect();
        self.run_parallel(jobs, |job| match job {
            ZeroJob::Edge(span) => {
                let zeros = vec![0u8; span.len as usize];
                self.write_span(span, &zeros)
            }
            ZeroJob::Whole(blocks) => {
                let _guards = self.lock_many(blocks);
                self.store.bulk_zero(blocks).inspect_err(|err| {
                    warn!(
                        first = %blocks[0],
                        count = blocks.len(),
                        "zeroing blocks failed: {err}"
                    )
                })
            }
        })
    }

    /// Returns when every earlier write is durable.
    pub fn flush(&self) -> Result<()> {
        self.store.flush()
    }

    fn clamp(&self, offset: u64, len: u64) -> Result<usize> {
        match self.geometry.clamp(offset, len) {
            Some(len) => Ok(len as usize),
            None => Err(Error::Invalid(format!(
                "offset {offset} beyond end of disk ({} bytes)",
                self.geometry.file_size()
            ))),
        }
    }

    fn read_span(&self, span: BlockSpan, piece: &mut [u8]) -> Result<()> {
        let result = if span.is_whole(&self.geometry) {
            self.store.read_block(span.block, piece).map(|_| ())
        } else {
            self.store.read_partial(span.block, span.offset, piece)
        };
        result.inspect_err(|err| warn!(block = %span.block, "read failed: {err}"))
    }

    fn write_span(&self, span: BlockSpan, piece: &[u8]) -> Result<()> {
        let _guard = self.lock(span.block);
        let result = if span.is_whole(&self.geometry) {
            self.store
                .write_block(span.block, Block::from_buf(piece))
                .map(|_| ())
        } else {
            self.store.write_partial(span.block, span.offset, piece)
        };
        result.inspect_err(|err| warn!(block = %span.block, "write failed: {err}"))
    }

    fn stripe(&self, block: BlockId) -> usize {
        block.0 as usize % LOCK_STRIPES
    }

    fn lock(&self, block: BlockId) -> MutexGuard<'_, ()> {
        self.write_locks[self.stripe(block)].lock()
    }

    /// Locks the stripes of several blocks in ascending stripe order, the one order every
    /// multi-lock holder uses, so two of them cannot deadlock.
    fn lock_many(&self, blocks: &[BlockId]) -> Vec<MutexGuard<'_, ()>> {
        let mut stripes: Vec<usize> = blocks.iter().map(|&b| self.stripe(b)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        stripes
            .into_iter()
            .map(|s| self.write_locks[s].lock())
            .collect()
    }

    /// Runs `op` on every item, up to `parallelism` at once; returns the first error.
    /// After an error no new items start, but running ones finish.
    fn run_parallel<T: Send>(
        &self,
        items: Vec<T>,
        op: impl Fn(T) -> Result<()> + Sync,
    ) -> Result<()> {
        if items.len() <= 1 {
            return items.into_iter().try_for_each(op);
        }
        let workers = items.len().min(self.parallelism);
        let queue = Mutex::new(items.into_iter());
        let failed = AtomicBool::new(false);
        let first_error = Mutex::new(None);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    while !failed.load(Ordering::Relaxed) {
                        let Some(item) = queue.lock().next() else {
                            break;
                        };
                        if let Err(err) = op(item) {
                            failed.store(true, Ordering::Relaxed);
                            first_error.lock().get_or_insert(err);
                        }
                    }
                });
            }
        });
        match first_error.into_inner() {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }
}

enum ZeroJob<'a> {
    Edge(BlockSpan),
    Whole(&'a [BlockId]),
}

/// Pairs each span with its own disjoint piece of `buf`.
fn split_spans(
    spans: impl Iterator<Item = BlockSpan>,
    mut buf: &mut [u8],
) -> Vec<(BlockSpan, &mut [u8])> {
    spans
        .map(|span| {
            let (piece, rest) = std::mem::take(&mut buf).split_at_mut(span.len as usize);
            buf = rest;
            (span, piece)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryBackend;
    use std::time::Duration;

    const BS: usize = 512;

    fn setup(blocks: u64) -> (Arc<MemoryBackend>, BlockPart) {
        let mem = Arc::new(MemoryBackend::new(
            Geometry::new(blocks * BS as u64, BS as u32).unwrap(),
        ));
        let part = BlockPart::new(mem.clone());
        (mem, part)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    #[test]
    fn unaligned_write_reads_back_and_keeps_neighbours() {
        let (mem, part) = setup(8);
        part.write(0, &vec![0xaa; 8 * BS]).unwrap();
        let data = pattern(2 * BS + 100, 3);
        assert_eq!(part.write(BS as u64 - 50, &data).unwrap(), data.len());

        let mut all = vec![0u8; 8 * BS];
        assert_eq!(part.read(0, &mut all).unwrap(), 8 * BS);
        let start = BS - 50;
        assert_eq!(&all[start..start + data.len()], &data[..]);
        assert!(all[..start].iter().all(|&b| b == 0xaa));
        assert!(all[start + data.len()..].iter().all(|&b| b == 0xaa));
        assert_eq!(mem.stored_count(), 8);
    }

    #[test]
    fn io_is_truncated_at_end_and_rejected_past_it() {
        let (_mem, part) = setup(2);
        let size = 2 * BS as u64;
        assert_eq!(part.write(size - 10, &[7u8; 100]).unwrap(), 10);
        let mut buf = [0u8; 100];
        assert_eq!(part.read(size - 10, &mut buf).unwrap(), 10);
        assert_eq!(&buf[..10], &[7u8; 10]);
        assert_eq!(part.read(size, &mut buf).unwrap(), 0);
        assert!(matches!(
            part.read(size + 1, &mut buf),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(part.write(size + 1, &buf), Err(Error::Invalid(_))));
    }

    #[test]
    fn zero_data_is_not_stored() {
        let (mem, part) = setup(4);
        part.write(0, &pattern(4 * BS, 1)).unwrap();
        part.write(BS as u64, &vec![0u8; BS]).unwrap();
        assert_eq!(mem.stored(BlockId(1)), None);
        // A partial write that makes the block all zero deletes it too.
        part.write(2 * BS as u64, &vec![0u8; BS / 2]).unwrap();
        part.write(2 * BS as u64 + BS as u64 / 2, &vec![0u8; BS / 2])
            .unwrap();
        assert_eq!(mem.stored(BlockId(2)), None);
        assert_eq!(mem.stored_count(), 2);
    }

    #[test]
    fn zero_range_deletes_whole_blocks_and_zeroes_edges() {
        let (mem, part) = setup(8);
        let data = pattern(8 * BS, 9);
        part.write(0, &data).unwrap();
        // From the middle of block 1 to the middle of block 5.
        let (start, end) = (BS + 100, 5 * BS + 200);
        part.zero_range(start as u64, (end - start) as u64).unwrap();

        for b in 2..5 {
            assert_eq!(mem.stored(BlockId(b)), None, "block {b} deleted");
        }
        let mut all = vec![0u8; 8 * BS];
        part.read(0, &mut all).unwrap();
        assert_eq!(&all[..start], &data[..start]);
        assert!(all[start..end].iter().all(|&b| b == 0));
        assert_eq!(&all[end..], &data[end..]);
        assert!(matches!(
            part.zero_range(7 * BS as u64, 2 * BS as u64),
            Err(Error::Invalid(_))
        ));
    }

    #[test]
    fn failed_block_fails_the_whole_request() {
        let (mem, part) = setup(8);
        mem.fail_block(BlockId(5));
        let err = part.write(0, &pattern(8 * BS, 2)).unwrap_err();
        assert!(err.to_string().contains("00000005"), "{err}");
        let mut buf = vec![0u8; 8 * BS];
        assert!(part.read(0, &mut buf).is_err());
        assert!(part.zero_range(4 * BS as u64, 2 * BS as u64).is_err());
    }

    #[test]
    fn concurrent_partial_writes_to_one_block_keep_every_byte() {
        // Latency widens the read-modify-write window so a missing lock would lose bytes.
        let mem = Arc::new(MemoryBackend::with_latency(
            Geometry::new(4 * BS as u64, BS as u32).unwrap(),
            Duration::from_millis(2),
        ));
        let part = BlockPart::new(mem.clone());
        const WRITERS: usize = 16;
        let chunk = BS / WRITERS;
        std::thread::scope(|s| {
            for w in 0..WRITERS {
                let part = &part;
                s.spawn(move || {
                    let offset = (BS + w * chunk) as u64;
                    part.write(offset, &vec![w as u8 + 1; chunk]).unwrap();
                });
            }
        });
        let stored = mem.stored(BlockId(1)).expect("block 1 stored");
        for w in 0..WRITERS {
            let piece = &stored[w * chunk..(w + 1) * chunk];
            assert!(piece.iter().all(|&b| b == w as u8 + 1), "writer {w} lost");
        }
    }

    #[test]
    fn many_block_request_runs_in_parallel() {
        let mem = Arc::new(MemoryBackend::with_latency(
            Geometry::new(64 * BS as u64, BS as u32).unwrap(),
            Duration::from_millis(20),
        ));
        let probe = Arc::new(testing::ProbeStore::new(mem.clone()));
        let part = BlockPart::new(probe.clone());
        let mut buf = vec![0u8; 64 * BS];
        part.read(0, &mut buf).unwrap();
        assert_eq!(mem.reads.get(), 64);
        let peak = probe.max_in_flight();
        assert!(peak > 8 && peak <= DEFAULT_PARALLELISM, "peak {peak}");
    }
}

/// Test helpers shared with the frontend tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::stats::{Counter, StatsReport};
    use crate::store::{ReadInfo, WriteInfo};

    /// Wraps a store and records how many block operations ran at once, and flushes.
    pub(crate) struct ProbeStore {
        inner: Arc<dyn BlockStore>,
        in_flight: AtomicUsize,
        max_in_flight: AtomicUsize,
        pub(crate) flushes: Counter,
        /// When set, `flush` fails with EIO.
        pub(crate) fail_flush: AtomicBool,
    }

    impl ProbeStore {
        pub(crate) fn new(inner: Arc<dyn BlockStore>) -> Self {
            ProbeStore {
                inner,
                in_flight: AtomicUsize::new(0),
                max_in_flight: AtomicUsize::new(0),
                flushes: Counter::default(),
                fail_flush: AtomicBool::new(false),
            }
        }

        pub(crate) fn max_in_flight(&self) -> usize {
            self.max_in_flight.load(Ordering::SeqCst)
        }

        fn track<T>(&self, op: impl FnOnce() -> T) -> T {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight.fetch_max(now, Ordering::SeqCst);
            let result = op();
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            result
        }
    }

    impl BlockStore for ProbeStore {
        fn geometry(&self) -> Geometry {
            self.inner.geometry()
        }

        fn read_block(&self, block: BlockId, buf: &mut [u8]) -> Result<ReadInfo> {
            self.track(|| self.inner.read_block(block, buf))
        }

        fn write_block(&self, block: BlockId, data: Block<'_>) -> Result<WriteInfo> {
            self.track(|| self.inner.write_block(block, data))
        }

        fn bulk_zero(&self, blocks: &[BlockId]) -> Result<()> {
            self.track(|| self.inner.bulk_zero(blocks))
        }

        fn flush(&self) -> Result<()> {
            self.flushes.inc();
            if self.fail_flush.load(Ordering::SeqCst) {
                return Err(Error::Other("injected flush failure".into()));
            }
            self.inner.flush()
        }

        fn survey_non_zero(&self, threads: usize, found: &(dyn Fn(BlockId) + Sync)) -> Result<()> {
            self.inner.survey_non_zero(threads, found)
        }

        fn stats(&self, report: &mut StatsReport) {
            self.inner.stats(report)
        }

        fn reset_stats(&self) {
            self.inner.reset_stats()
        }
    }
}
