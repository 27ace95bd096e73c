//! The `BlockStore` trait that every layer and backend speaks, and the `Volume` trait for the
//! per-bucket metadata (size detection, mount token) that only backends own.

use crate::error::{Error, Result};
use crate::geometry::{BlockId, Geometry};
use crate::stats::StatsReport;

/// MD5 of a stored object's body (the S3 ETag of a non-multipart object).
pub type Etag = [u8; 16];

/// Data handed to `write_block`. Zero is explicit so layers never scan a buffer twice.
#[derive(Copy, Clone, Debug)]
pub enum Block<'a> {
    /// The block is all zeros: the object is deleted, never stored.
    Zero,
    /// Exactly `block_size` bytes, not all zero.
    Data(&'a [u8]),
}

impl<'a> Block<'a> {
    /// Classifies a full block buffer.
    pub fn from_buf(buf: &'a [u8]) -> Self {
        if is_zero(buf) {
            Block::Zero
        } else {
            Block::Data(buf)
        }
    }

    pub fn is_zero(&self) -> bool {
        matches!(self, Block::Zero)
    }
}

/// What a read found.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadInfo {
    /// The block was absent (all zeros); the buffer was zero-filled.
    pub zero: bool,
    /// ETag of the stored object, when the backend knows it.
    pub etag: Option<Etag>,
}

/// What a read that revalidates a cached copy found (spec 6.6, CLEAN2 entries).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Revalidated {
    /// The stored object still has the ETag of the cached copy: that copy is current (the
    /// buffer may hold nothing).
    Unchanged,
    /// The block changed (or vanished): the buffer holds what is stored now.
    Changed(ReadInfo),
}

/// What a write did.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteInfo {
    /// ETag of the stored object; `None` for zero blocks or when unknown.
    pub etag: Option<Etag>,
}

/// Writes `Block::Zero` to every block, `threads` at a time: for stores whose deletes are one
/// round trip each, so a large discard does not wait for them one by one.
pub fn zero_in_parallel(store: &dyn BlockStore, blocks: &[BlockId], threads: usize) -> Result<()> {
    let chunk = blocks.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = blocks
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .try_for_each(|&b| store.write_block(b, Block::Zero).map(|_| ()))
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .unwrap_or_else(|_| Err(Error::Other("delete thread panicked".into())))
        })
    })
}

/// A store of fixed-size blocks: a backend, or a layer decorating another store.
///
/// All methods are blocking and may be called from many threads at once.
pub trait BlockStore: Send + Sync {
    fn geometry(&self) -> Geometry;

    /// Reads a whole block into `buf` (`block_size` bytes). Absent blocks read as zeros.
    fn read_block(&self, block: BlockId, buf: &mut [u8]) -> Result<ReadInfo>;

    /// Reads a block whose last write stored the object with ETag `expect` (spec 6.5). Finding
    /// anything else (an older version, or no object) is `Error::Stale`, never the old data.
    /// S3 has the server check it (`If-Match`); the default compares the ETag it read.
    fn read_block_expect(&self, block: BlockId, buf: &mut [u8], expect: Etag) -> Result<ReadInfo> {
        let info = self.read_block(block, buf)?;
        match info.etag {
            Some(etag) if etag != expect => Err(Error::Stale(format!(
                "block {block}: read ETag {} instead of {}",
                hex::encode(etag),
                hex::encode(expect)
            ))),
            None if info.zero => Err(Error::Stale(format!(
                "block {block}: absent instead of ETag {}",
                hex::encode(expect)
            ))),
            _ => Ok(info),
        }
    }

    /// Reads `block` unless the stored object still has ETag `cached` (the ETag of a copy the
    /// caller keeps). S3 asks the server (`If-None-Match`, 304 = unchanged); the default reads
    /// the block and compares the ETag it found.
    fn read_block_if_changed(
        &self,
        block: BlockId,
        buf: &mut [u8],
        cached: Etag,
    ) -> Result<Revalidated> {
        let info = self.read_block(block, buf)?;
        Ok(if info.etag == Some(cached) {
            Revalidated::Unchanged
        } else {
            Revalidated::Changed(info)
        })
    }

    /// Reads a whole block into a buffer of its own, for callers that keep it (the block
    /// cache): a backend that receives the bytes in a fresh buffer anyway hands that over
    /// instead of copying it.
    fn read_block_owned(&self, block: BlockId) -> Result<(ReadInfo, Vec<u8>)> {
        let mut buf = vec![0u8; self.geometry().block_size_usize()];
        let info = self.read_block(block, &mut buf)?;
        Ok((info, buf))
    }

    /// Writes a whole block. Writing `Block::Zero` deletes the stored object.
    fn write_block(&self, block: BlockId, data: Block<'_>) -> Result<WriteInfo>;

    /// Reads `buf.len()` bytes at `offset` inside `block`. Layers that cache blocks override this.
    fn read_partial(&self, block: BlockId, offset: u32, buf: &mut [u8]) -> Result<()> {
        let mut whole = vec![0u8; self.geometry().block_size_usize()];
        self.read_block(block, &mut whole)?;
        let start = offset as usize;
        buf.copy_from_slice(&whole[start..start + buf.len()]);
        Ok(())
    }

    /// Writes `data` at `offset` inside `block`. Layers that cache blocks override this; the
    /// default reads the whole block, patches it and writes it back.
    fn write_partial(&self, block: BlockId, offset: u32, data: &[u8]) -> Result<()> {
        let mut whole = vec![0u8; self.geometry().block_size_usize()];
        self.read_block(block, &mut whole)?;
        let start = offset as usize;
        whole[start..start + data.len()].copy_from_slice(data);
        self.write_block(block, Block::from_buf(&whole))?;
        Ok(())
    }

    /// Zeroes many whole blocks; backends may batch the deletes.
    fn bulk_zero(&self, blocks: &[BlockId]) -> Result<()> {
        for &block in blocks {
            self.write_block(block, Block::Zero)?;
        }
        Ok(())
    }

    /// Returns when every earlier write is durable in the backend.
    fn flush(&self) -> Result<()>;

    /// True when this store knows, without any I/O, that `block` reads as zeros. A hint:
    /// `false` means "unknown" (reading tells).
    fn known_zero(&self, _block: BlockId) -> bool {
        false
    }

    /// Calls `found` for every block that is stored (non-zero), in no particular order,
    /// scanning with up to `threads` parallel listings.
    fn survey_non_zero(&self, threads: usize, found: &(dyn Fn(BlockId) + Sync)) -> Result<()>;

    /// Appends this layer's counters (and those of the layers below) to `report`.
    fn stats(&self, report: &mut StatsReport);

    /// Resets this layer's counters and those below.
    fn reset_stats(&self);

    /// Flushes and stops background work. Called once, before the process exits.
    fn shutdown(&self) -> Result<()> {
        self.flush()
    }
}

/// Size metadata found on block 0 (spec 1.5).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SizeMeta {
    pub block_size: u32,
    pub file_size: u64,
}

/// Mount token value that marks a bucket used in shared-disk mode (spec 5.1).
pub const SHARED_DISK_TOKEN: u32 = 0x7fff_ffff;

/// Per-volume metadata operations that only backends implement.
pub trait Volume: Send + Sync {
    /// `<desc>` of the spec: the URL (or `file://` path) of the bucket and prefix.
    fn description(&self) -> String;

    /// Reads the size headers of block 0; `None` when absent (spec 1.5).
    fn detect_size(&self) -> Result<Option<SizeMeta>>;

    /// Reads the mount token: `None` when the token object is absent, `Some(1)` when it exists
    /// without a value (pre-1.5.0 flag), else its value.
    fn read_mount_token(&self) -> Result<Option<u32>>;

    /// Writes (`Some`) or deletes (`None`) the mount token object.
    fn write_mount_token(&self, token: Option<u32>) -> Result<()>;

    /// Creates the token only if no token exists; `false` when another process got there first.
    /// Backends with conditional writes make this race-free; the default is a plain write.
    fn create_mount_token(&self, token: u32) -> Result<bool> {
        self.write_mount_token(Some(token)).map(|()| true)
    }
}

/// True when every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    // Compare in u64 words: this runs on every written block.
    let (head, words, tail) = unsafe { buf.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_checks_every_byte() {
        let mut buf = vec![0u8; 4099];
        assert!(is_zero(&buf));
        for i in [0, 1, 7, 8, 2048, 4098] {
            buf[i] = 1;
            assert!(!is_zero(&buf), "byte {i}");
            buf[i] = 0;
        }
        assert!(Block::from_buf(&buf).is_zero());
    }

    #[test]
    fn default_partial_write_patches_the_stored_block() {
        let store = crate::backend::memory::MemoryBackend::new(Geometry::new(2048, 512).unwrap());
        store.write_partial(BlockId(1), 510, &[1, 2]).unwrap();
        let mut buf = vec![9u8; 512];
        store.read_block(BlockId(1), &mut buf).unwrap();
        assert_eq!(&buf[508..], &[0, 0, 1, 2]);
        assert!(buf[..508].iter().all(|&b| b == 0));
        store.write_partial(BlockId(1), 510, &[0, 0]).unwrap();
        assert_eq!(
            store.stored_count(),
            0,
            "an all-zero result must delete the block"
        );
    }
}
