//! In-memory backend for unit tests of layers: optional latency and injected failures.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::geometry::{BlockId, Geometry};
use crate::stats::{Counter, StatsReport};
use crate::store::{Block, BlockStore, Etag, ReadInfo, Revalidated, SizeMeta, Volume, WriteInfo};

#[derive(Default)]
struct State {
    blocks: HashMap<u32, Vec<u8>>,
    mount_token: Option<u32>,
    failing: Vec<BlockId>,
}

/// Blocks held in a hash map. Counts reads and writes so tests can see what reached the bottom.
pub struct MemoryBackend {
    geometry: Geometry,
    latency: Duration,
    state: Mutex<State>,
    pub reads: Counter,
    /// Conditional reads that found the caller's copy current (S3's 304: no data moved).
    pub unchanged_reads: Counter,
    pub writes: Counter,
    pub deletes: Counter,
}

impl MemoryBackend {
    pub fn new(geometry: Geometry) -> Self {
        Self::with_latency(geometry, Duration::ZERO)
    }

    /// Every read and write sleeps `latency` first, like a remote store.
    pub fn with_latency(geometry: Geometry, latency: Duration) -> Self {
        MemoryBackend {
            geometry,
            latency,
            state: Mutex::new(State::default()),
            reads: Counter::default(),
            unchanged_reads: Counter::default(),
            writes: Counter::default(),
            deletes: Counter::default(),
        }
    }

    /// Makes every later read or write of `block` fail with EIO.
    pub fn fail_block(&self, block: BlockId) {
        self.state.lock().failing.push(block);
    }

    /// The stored bytes of a block, `None` if absent (zero).
    pub fn stored(&self, block: BlockId) -> Option<Vec<u8>> {
        self.state.lock().blocks.get(&block.0).cloned()
    }

    pub fn stored_count(&self) -> usize {
        self.state.lock().blocks.len()
    }

    fn enter(&self, block: BlockId) -> Result<()> {
        if !self.latency.is_zero() {
            std::thread::sleep(self.latency);
        }
        if !self.geometry.contains(block) {
            return Err(Error::Invalid(format!("block {block} beyond end of disk")));
        }
        if self.state.lock().failing.contains(&block) {
            return Err(Error::Other(format!("injected failure for block {block}")));
        }
        Ok(())
    }
}

fn md5_of(data: &[u8]) -> [u8; 16] {
    use md5::Digest;
    md5::Md5::digest(data).into()
}

impl BlockStore for MemoryBackend {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn read_block(&self, block: BlockId, buf: &mut [u8]) -> Result<ReadInfo> {
        self.enter(block)?;
        self.reads.inc();
        match self.state.lock().blocks.get(&block.0) {
            Some(data) => {
                buf.copy_from_slice(data);
                Ok(ReadInfo {
                    zero: false,
                    etag: Some(md5_of(data)),
                })
            }
            None => {
                buf.fill(0);
                Ok(ReadInfo {
                    zero: true,
                    etag: None,
                })
            }
        }
    }

    fn read_block_if_changed(
        &self,
        block: BlockId,
        buf: &mut [u8],
        cached: Etag,
    ) -> Result<Revalidated> {
        self.enter(block)?;
        let current = self.state.lock().blocks.get(&block.0).map(|d| md5_of(d));
        if current == Some(cached) {
            self.unchanged_reads.inc();
            return Ok(Revalidated::Unchanged);
        }
        self.read_block(block, buf).map(Revalidated::Changed)
    }

    fn write_block(&self, block: BlockId, data: Block<'_>) -> Result<WriteInfo> {
        self.enter(block)?;
        let mut state = self.state.lock();
        match data {
            Block::Zero => {
                self.deletes.inc();
                state.blocks.remove(&block.0);
                Ok(WriteInfo { etag: None })
            }
            Block::Data(bytes) => {
                assert_eq!(bytes.len(), self.geometry.block_size_usize());
                self.writes.inc();
                state.blocks.insert(block.0, bytes.to_vec());
                Ok(WriteInfo {
                    etag: Some(md5_of(bytes)),
                })
            }
        }
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn survey_non_zero(&self, _threads: usize, found: &(dyn Fn(BlockId) + Sync)) -> Result<()> {
        let ids: Vec<u32> = self.state.lock().blocks.keys().copied().collect();
        ids.into_iter().for_each(|id| found(BlockId(id)));
        Ok(())
    }

    fn stats(&self, report: &mut StatsReport) {
        report.add("memory_reads", self.reads.get());
        report.add("memory_writes", self.writes.get());
        report.add("memory_deletes", self.deletes.get());
    }

    fn reset_stats(&self) {
        self.reads.reset();
        self.writes.reset();
        self.deletes.reset();
    }
}

impl Volume for MemoryBackend {
    fn description(&self) -> String {
        "memory://".to_string()
    }

    fn detect_size(&self) -> Result<Option<SizeMeta>> {
        Ok(None)
    }

    fn read_mount_token(&self) -> Result<Option<u32>> {
        Ok(self.state.lock().mount_token)
    }

    fn write_mount_token(&self, token: Option<u32>) -> Result<()> {
        self.state.lock().mount_token = token;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_write_deletes_and_reads_back_zero() {
        let m = MemoryBackend::new(Geometry::new(4 * 512, 512).unwrap());
        let data = vec![7u8; 512];
        m.write_block(BlockId(1), Block::Data(&data)).unwrap();
        let mut buf = vec![0u8; 512];
        let info = m.read_block(BlockId(1), &mut buf).unwrap();
        assert!(!info.zero);
        assert_eq!(buf, data);
        m.write_block(BlockId(1), Block::Zero).unwrap();
        assert!(m.read_block(BlockId(1), &mut buf).unwrap().zero);
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(m.stored_count(), 0);
    }
}
