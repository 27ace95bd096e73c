//! The block cache's use of its cache file (spec 6.6): which block sits in which slot, and the
//! write orders that keep the file safe across `kill -9`.
//!
//! Rules (all under the one [`FileTier`] lock, which is always taken before the cache state
//! lock, never after):
//! - A clean entry equals the lower store: it is emptied before any upload of its block starts.
//! - A dirty entry holds a flushed version not yet known to be uploaded; it names a block that
//!   is dirty in memory. It is rewritten only copy-on-write (new slot first), so a crash leaves
//!   either the old or the new version, never a torn one.
//! - Data is synced before the entry naming it; an entry is emptied and synced before its slot
//!   is reused.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

use super::SharedBytes;
use super::cache_file::{CacheFile, DirEntry};
use crate::error::Result;
use crate::geometry::BlockId;
use crate::store::{Etag, is_zero};

/// Settings of the persistent cache file (`--blockCacheFile` and friends).
#[derive(Clone, Debug)]
pub struct CacheFileOptions {
    pub path: PathBuf,
    /// Trust clean entries found at startup; otherwise each is checked against the store
    /// (by ETag, `If-None-Match`) the first time it is read.
    pub no_verify: bool,
    /// Upload the dirty entries found at startup (else they are discarded, loudly).
    pub recover_dirty: bool,
    /// Tell the kernel not to keep slot data in the page cache.
    pub advise: bool,
    /// Written to the header while mounted; zeroed after a clean shutdown (spec 5.2).
    pub mount_token: u32,
}

/// Dirty blocks read back from the file at startup, to upload again.
pub(super) type Recovered = Vec<(BlockId, Vec<u8>)>;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct Slot {
    index: u32,
    dirty: bool,
    /// A clean entry found at startup, not yet checked against the store: the ETag the store
    /// must still have for it to be served (C's CLEAN2 state).
    unverified: Option<Etag>,
}

impl Slot {
    fn dirty(index: u32) -> Slot {
        Slot {
            index,
            dirty: true,
            unverified: None,
        }
    }

    fn clean(index: u32) -> Slot {
        Slot {
            index,
            dirty: false,
            unverified: None,
        }
    }
}

/// What the file has for a block that the cache must read.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum CleanRead {
    /// No clean entry.
    Absent,
    /// A trusted clean entry, read into the buffer.
    Served,
    /// A clean entry to check first: the store must still have this ETag.
    Unverified(Etag),
}

pub(super) struct FileTier {
    inner: Mutex<Tier>,
}

pub(super) struct Tier {
    file: CacheFile,
    slots: HashMap<BlockId, Slot>,
    free: Vec<u32>,
    block_size: usize,
    /// What each dirty entry written by this process holds (`None` = zeros), so a flush skips
    /// blocks unchanged since the last one. Holding the buffer also keeps writers from
    /// changing it in place.
    persisted: HashMap<BlockId, Option<SharedBytes>>,
}

impl FileTier {
    /// Opens the file for a cache of `capacity` blocks. Returns the dirty blocks to upload again
    /// (only with `recover_dirty`; their entries stay until they are uploaded).
    pub(super) fn open(
        opts: &CacheFileOptions,
        block_size: u32,
        capacity: u32,
    ) -> Result<(FileTier, Recovered)> {
        let (file, entries) = CacheFile::open(&opts.path, block_size, capacity, opts.advise)?;
        let mut tier = Tier {
            file,
            slots: HashMap::new(),
            free: Vec::new(),
            block_size: block_size as usize,
            persisted: HashMap::new(),
        };
        let mut recovered = Vec::new();
        let mut discard = Vec::new();
        let mut unverified = 0usize;
        for (index, entry) in entries {
            if entry.dirty && !opts.recover_dirty {
                discard.push(index);
                continue;
            }
            let slot = if entry.dirty {
                let mut buf = vec![0u8; tier.block_size];
                tier.file.read_slot(index, &mut buf)?;
                recovered.push((entry.block, buf));
                Slot::dirty(index)
            } else if opts.no_verify {
                Slot::clean(index)
            } else {
                unverified += 1;
                Slot {
                    unverified: Some(entry.etag),
                    ..Slot::clean(index)
                }
            };
            tier.slots.insert(entry.block, slot);
        }
        let path = opts.path.display();
        if !discard.is_empty() {
            tracing::error!(
                "cache file \"{path}\": DISCARDING {} dirty blocks that were never uploaded (use \
                 --blockCacheRecoverDirtyBlocks to upload them instead)",
                discard.len()
            );
            for &index in &discard {
                tier.file.write_entry(index, None)?;
            }
            tier.file.sync()?;
        }
        if unverified > 0 {
            tracing::info!(
                "cache file \"{path}\": {unverified} cached blocks, each checked against the \
                 bucket when first read"
            );
        }
        if !recovered.is_empty() {
            tracing::warn!(
                "cache file \"{path}\": recovering {} dirty blocks; they will be written back",
                recovered.len()
            );
        }
        let used: std::collections::HashSet<u32> = tier.slots.values().map(|s| s.index).collect();
        tier.free = (0..capacity).rev().filter(|i| !used.contains(i)).collect();
        tier.file.set_mount_token(opts.mount_token)?;
        Ok((
            FileTier {
                inner: Mutex::new(tier),
            },
            recovered,
        ))
    }

    /// Takes the file lock. Callers holding the cache state lock must not call this.
    pub(super) fn lock(&self) -> MutexGuard<'_, Tier> {
        self.inner.lock()
    }
}

impl Tier {
    /// Serves `block` from a trusted clean entry, or names the ETag to check first.
    pub(super) fn read_clean(&self, block: BlockId, buf: &mut [u8]) -> Result<CleanRead> {
        match self.slots.get(&block) {
            Some(slot) if slot.dirty => Ok(CleanRead::Absent),
            Some(Slot {
                unverified: Some(etag),
                ..
            }) => Ok(CleanRead::Unverified(*etag)),
            Some(slot) => {
                self.file.read_slot(slot.index, buf)?;
                Ok(CleanRead::Served)
            }
            None => Ok(CleanRead::Absent),
        }
    }

    /// The store still has `etag` for `block`: its unverified entry is trusted from now on and
    /// read into `buf`. False when that entry is gone (its slot was reused meanwhile).
    pub(super) fn confirm_clean(
        &mut self,
        block: BlockId,
        etag: Etag,
        buf: &mut [u8],
    ) -> Result<bool> {
        match self.slots.get_mut(&block) {
            Some(slot) if !slot.dirty && slot.unverified == Some(etag) => {
                slot.unverified = None;
                let index = slot.index;
                self.file.read_slot(index, buf)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The store no longer has what the clean entry of `block` holds: keep `data` (stored as
    /// `etag`; `None` when unknown) instead.
    pub(super) fn replace_clean(
        &mut self,
        block: BlockId,
        etag: Option<Etag>,
        data: &[u8],
    ) -> Result<()> {
        if let Some(&slot) = self.slots.get(&block)
            && !slot.dirty
        {
            self.release(block, slot.index)?;
        }
        match etag {
            Some(etag) => self.store_clean(block, etag, data),
            None => Ok(()),
        }
    }

    /// Keeps a block just read from the store (which has it as `etag`) as a clean entry.
    pub(super) fn store_clean(&mut self, block: BlockId, etag: Etag, data: &[u8]) -> Result<()> {
        if self.slots.contains_key(&block) || is_zero(data) {
            return Ok(());
        }
        let Some(index) = self.take_slots(1, &[], false)?.pop() else {
            return Ok(()); // every slot holds dirty data: skip, the file is only a cache
        };
        let entry = DirEntry {
            block,
            etag,
            dirty: false,
        };
        self.file.store(index, entry, data)?;
        self.slots.insert(block, Slot::clean(index));
        Ok(())
    }

    /// Empties a clean entry of `block` before an upload changes the block in the store.
    pub(super) fn before_upload(&mut self, block: BlockId) -> Result<()> {
        match self.slots.get(&block) {
            Some(slot) if !slot.dirty => {
                let index = slot.index;
                self.release(block, index)
            }
            _ => Ok(()),
        }
    }

    /// The newest version of `block` (`uploaded`: its bytes and the store's ETag; `None` when
    /// zero or the ETag is unknown) is uploaded: its dirty entry, an older or equal version, is
    /// no longer needed. When the slot holds exactly this version it becomes a clean entry
    /// instead (no sync: its data is synced already, and a crash before the entry reaches the
    /// disk only uploads the same data again).
    pub(super) fn after_upload(
        &mut self,
        block: BlockId,
        uploaded: Option<(&SharedBytes, Etag)>,
    ) -> Result<()> {
        let Some(&slot) = self.slots.get(&block) else {
            return Ok(());
        };
        let persisted = self.persisted.get(&block).and_then(Option::as_ref);
        if let (Some((bytes, etag)), Some(persisted)) = (uploaded, persisted)
            && Arc::ptr_eq(bytes, persisted)
        {
            let entry = DirEntry {
                block,
                etag,
                dirty: false,
            };
            self.file.write_entry(slot.index, Some(entry))?;
            self.slots.insert(block, Slot::clean(slot.index));
            self.persisted.remove(&block);
            return Ok(());
        }
        self.release(block, slot.index)
    }

    fn release(&mut self, block: BlockId, index: u32) -> Result<()> {
        self.file.clear(index)?;
        self.slots.remove(&block);
        self.persisted.remove(&block);
        self.free.push(index);
        Ok(())
    }

    /// Persists the newest data of dirty blocks (`None` = all zero) as dirty entries. Returns
    /// false, having written nothing, when there are not enough slots.
    pub(super) fn persist_dirty(
        &mut self,
        mut blocks: Vec<(BlockId, Option<SharedBytes>)>,
    ) -> Result<bool> {
        blocks.retain(|(block, data)| match (self.persisted.get(block), data) {
            (Some(None), None) => false,
            (Some(Some(old)), Some(new)) => !Arc::ptr_eq(old, new),
            _ => true,
        });
        if blocks.is_empty() {
            return Ok(true);
        }
        let writing: Vec<BlockId> = blocks.iter().map(|&(b, _)| b).collect();
        // Clean entries of these blocks are stale: empty them with the victims below.
        let mut stale = Vec::new();
        for block in &writing {
            if let Some(slot) = self.slots.get(block)
                && !slot.dirty
            {
                stale.push((*block, slot.index));
            }
        }
        let spare = self.free.len() + self.slots.values().filter(|s| !s.dirty).count();
        if spare < blocks.len() {
            return Ok(false);
        }
        for &(block, index) in &stale {
            self.file.write_entry(index, None)?;
            self.slots.remove(&block);
            self.free.push(index);
        }
        let targets = self.take_slots(blocks.len(), &writing, !stale.is_empty())?;
        debug_assert_eq!(targets.len(), blocks.len());
        let zeros = vec![0u8; self.block_size];
        for ((_, data), &index) in blocks.iter().zip(&targets) {
            self.file
                .write_slot(index, data.as_deref().unwrap_or(&zeros))?;
        }
        self.file.sync()?;
        for ((block, data), index) in blocks.into_iter().zip(targets) {
            let entry = DirEntry {
                block,
                etag: [0; 16],
                dirty: true,
            };
            self.file.write_entry(index, Some(entry))?;
            // Copy-on-write: the older dirty version goes only once the new one is written.
            if let Some(old) = self.slots.insert(block, Slot::dirty(index)) {
                self.file.write_entry(old.index, None)?;
                self.free.push(old.index);
            }
            self.persisted.insert(block, data);
        }
        self.file.sync()?;
        Ok(true)
    }

    /// Takes up to `count` slots: free ones first, then slots of clean entries (not of `keep`),
    /// which are emptied durably before they are handed out. `emptied` says the caller has
    /// emptied entries too, which must reach the disk before the slots are reused.
    fn take_slots(&mut self, count: usize, keep: &[BlockId], emptied: bool) -> Result<Vec<u32>> {
        let mut emptied = emptied;
        let mut taken = Vec::with_capacity(count);
        while taken.len() < count
            && let Some(index) = self.free.pop()
        {
            taken.push(index);
        }
        if taken.len() < count {
            let victims: Vec<(BlockId, u32)> = self
                .slots
                .iter()
                .filter(|(block, slot)| !slot.dirty && !keep.contains(block))
                .map(|(&block, slot)| (block, slot.index))
                .take(count - taken.len())
                .collect();
            for (block, index) in victims {
                self.file.write_entry(index, None)?;
                self.slots.remove(&block);
                taken.push(index);
                emptied = true;
            }
        }
        if emptied {
            self.file.sync()?;
        }
        Ok(taken)
    }

    /// After a clean shutdown: no mount holds the file any more.
    pub(super) fn clear_mount_token(&self) -> Result<()> {
        self.file.set_mount_token(0)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::super::{BlockCache, BlockCacheOptions};
    use super::*;
    use crate::backend::memory::MemoryBackend;
    use crate::geometry::Geometry;
    use crate::store::{Block, BlockStore};

    const BS: usize = 512;
    const BLOCKS: u32 = 64;

    fn geometry(block_size: usize) -> Geometry {
        Geometry::new(u64::from(BLOCKS) * block_size as u64, block_size as u32).unwrap()
    }

    fn file_opts(path: &std::path::Path) -> CacheFileOptions {
        CacheFileOptions {
            path: path.to_path_buf(),
            no_verify: false,
            recover_dirty: false,
            advise: false,
            mount_token: 0x1234,
        }
    }

    fn open_cache(lower: &Arc<MemoryBackend>, file: CacheFileOptions) -> Result<Arc<BlockCache>> {
        BlockCache::open(
            Arc::clone(lower) as Arc<dyn BlockStore>,
            BlockCacheOptions {
                size: 16,
                threads: 2,
                write_delay: Duration::ZERO,
                read_ahead: 0,
                retry_pause: Duration::from_millis(10),
                file: Some(file),
                ..BlockCacheOptions::default()
            },
        )
    }

    fn block_of(byte: u8) -> Vec<u8> {
        vec![byte; BS]
    }

    /// Writes blocks 0..n (block i filled with i + 1) to a store that refuses every upload,
    /// flushes, and drops the cache without shutdown, as `kill -9` would.
    fn write_flush_and_crash(path: &std::path::Path, n: u32) {
        let dead = Arc::new(MemoryBackend::new(geometry(BS)));
        for i in 0..n {
            dead.fail_block(BlockId(i));
        }
        let cache = open_cache(&dead, file_opts(path)).unwrap();
        for i in 0..n {
            cache
                .write_block(BlockId(i), Block::Data(&block_of(i as u8 + 1)))
                .unwrap();
        }
        cache.flush().expect("flush is satisfied by the cache file");
        assert_eq!(dead.stored_count(), 0, "nothing could be uploaded");
        drop(cache);
    }

    #[test]
    fn flushed_blocks_survive_a_crash_and_are_uploaded_on_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        write_flush_and_crash(&path, 10);
        let store = Arc::new(MemoryBackend::new(geometry(BS)));
        let opts = CacheFileOptions {
            recover_dirty: true,
            ..file_opts(&path)
        };
        let cache = open_cache(&store, opts).unwrap();
        cache.shutdown().unwrap();
        for i in 0..10u32 {
            assert_eq!(
                store.stored(BlockId(i)),
                Some(block_of(i as u8 + 1)),
                "block {i}"
            );
        }
        drop(cache);
        // Everything is uploaded: a later start recovers nothing.
        let again = Arc::new(MemoryBackend::new(geometry(BS)));
        let opts = CacheFileOptions {
            recover_dirty: true,
            ..file_opts(&path)
        };
        open_cache(&again, opts).unwrap().shutdown().unwrap();
        assert_eq!(again.writes.get(), 0);
    }

    #[test]
    fn dirty_blocks_are_discarded_without_recover_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        write_flush_and_crash(&path, 3);
        let store = Arc::new(MemoryBackend::new(geometry(BS)));
        let cache = open_cache(&store, file_opts(&path)).unwrap();
        cache.shutdown().unwrap();
        assert_eq!(store.stored_count(), 0);
        drop(cache);
        let (_, entries) = CacheFile::open(&path, BS as u32, 16, false).unwrap();
        assert!(
            entries.is_empty(),
            "discarded entries are erased: {entries:?}"
        );
    }

    #[test]
    fn rewritten_blocks_recover_their_last_flushed_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        let dead = Arc::new(MemoryBackend::new(geometry(BS)));
        dead.fail_block(BlockId(5));
        let first = open_cache(&dead, file_opts(&path)).unwrap();
        for byte in 1..=3u8 {
            first
                .write_block(BlockId(5), Block::Data(&block_of(byte)))
                .unwrap();
            first.flush().unwrap();
        }
        // Written after the last flush: may be lost.
        first
            .write_block(BlockId(5), Block::Data(&block_of(9)))
            .unwrap();
        drop(first);
        let store = Arc::new(MemoryBackend::new(geometry(BS)));
        let opts = CacheFileOptions {
            recover_dirty: true,
            ..file_opts(&path)
        };
        open_cache(&store, opts).unwrap().shutdown().unwrap();
        assert_eq!(store.stored(BlockId(5)), Some(block_of(3)));
    }

    /// A store of blocks 0..4 (`0x40 + i`) and a cache file at `path` that a first mount
    /// (`opts`) filled with them as clean entries.
    fn store_with_filled_cache_file(opts: &CacheFileOptions) -> Arc<MemoryBackend> {
        let store = Arc::new(MemoryBackend::new(geometry(BS)));
        for i in 0..4u32 {
            store
                .write_block(BlockId(i), Block::Data(&block_of(0x40 + i as u8)))
                .unwrap();
        }
        let first = open_cache(&store, opts.clone()).unwrap();
        let mut buf = vec![0u8; BS];
        for i in 0..4u32 {
            first.read_block(BlockId(i), &mut buf).unwrap();
        }
        first.shutdown().unwrap();
        store
    }

    #[test]
    fn clean_entries_are_served_without_lower_reads_when_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        let trusted = CacheFileOptions {
            no_verify: true,
            ..file_opts(&path)
        };
        let store = store_with_filled_cache_file(&trusted);
        let mut buf = vec![0u8; BS];
        let reads = store.reads.get();
        let second = open_cache(&store, trusted).unwrap();
        for i in 0..4u32 {
            second.read_block(BlockId(i), &mut buf).unwrap();
            assert_eq!(buf, block_of(0x40 + i as u8), "block {i}");
        }
        assert_eq!(store.reads.get(), reads, "served from the cache file");
        second.shutdown().unwrap();
        drop(second);
    }

    #[test]
    fn clean_entries_are_checked_by_etag_once_then_served_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        let store = store_with_filled_cache_file(&file_opts(&path));
        let mut buf = vec![0u8; BS];
        // Between mounts, another writer changes block 2 and deletes block 3.
        store
            .write_block(BlockId(2), Block::Data(&block_of(0x77)))
            .unwrap();
        store.write_block(BlockId(3), Block::Zero).unwrap();

        let reads = store.reads.get();
        let second = open_cache(&store, file_opts(&path)).unwrap();
        let expected = [block_of(0x40), block_of(0x41), block_of(0x77), vec![0; BS]];
        for (i, want) in expected.iter().enumerate() {
            second.read_block(BlockId(i as u32), &mut buf).unwrap();
            assert_eq!(&buf, want, "block {i}");
        }
        assert_eq!(store.unchanged_reads.get(), 2, "blocks 0 and 1 confirmed");
        assert_eq!(
            store.reads.get(),
            reads + 2,
            "only the changed blocks moved data"
        );
        let report = crate::stats::report_of(second.as_ref());
        assert_eq!(report.get("block_cache_verified"), Some("2"));
        assert_eq!(report.get("block_cache_mismatch"), Some("2"));
        second.shutdown().unwrap();
        drop(second);

        // A third mount checks again (the check is not remembered across mounts), and the
        // changed block 2 now has an entry of its new contents.
        let third = open_cache(&store, file_opts(&path)).unwrap();
        third.read_block(BlockId(2), &mut buf).unwrap();
        assert_eq!(buf, block_of(0x77));
        assert_eq!(store.unchanged_reads.get(), 3);
        assert_eq!(store.reads.get(), reads + 2);
        third.shutdown().unwrap();
    }

    #[test]
    fn an_uploaded_rewrite_replaces_the_clean_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        let store = Arc::new(MemoryBackend::new(geometry(BS)));
        store
            .write_block(BlockId(1), Block::Data(&block_of(1)))
            .unwrap();
        let trusted = CacheFileOptions {
            no_verify: true,
            ..file_opts(&path)
        };
        let first = open_cache(&store, trusted.clone()).unwrap();
        let mut buf = vec![0u8; BS];
        first.read_block(BlockId(1), &mut buf).unwrap();
        first
            .write_block(BlockId(1), Block::Data(&block_of(2)))
            .unwrap();
        first.shutdown().unwrap();
        drop(first);
        let second = open_cache(&store, trusted).unwrap();
        second.read_block(BlockId(1), &mut buf).unwrap();
        assert_eq!(buf, block_of(2), "the stale clean entry must be gone");
        second.shutdown().unwrap();
    }

    #[test]
    fn a_flushed_zero_write_is_recovered_as_a_delete() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        let store = Arc::new(MemoryBackend::new(geometry(BS)));
        store
            .write_block(BlockId(2), Block::Data(&block_of(7)))
            .unwrap();
        store.fail_block(BlockId(2));
        let first = open_cache(&store, file_opts(&path)).unwrap();
        first.write_block(BlockId(2), Block::Zero).unwrap();
        first.flush().unwrap();
        drop(first);
        let healthy = Arc::new(MemoryBackend::new(geometry(BS)));
        healthy
            .write_block(BlockId(2), Block::Data(&block_of(7)))
            .unwrap();
        let opts = CacheFileOptions {
            recover_dirty: true,
            ..file_opts(&path)
        };
        open_cache(&healthy, opts).unwrap().shutdown().unwrap();
        assert_eq!(
            healthy.stored(BlockId(2)),
            None,
            "the zero write deletes the block"
        );
    }

    /// A store whose writes land, then hang until `release` (bounded), like an upload whose
    /// reply has not come back yet.
    struct SlowAck {
        mem: Arc<MemoryBackend>,
        released: parking_lot::Mutex<bool>,
        wake: parking_lot::Condvar,
    }

    impl SlowAck {
        fn release(&self) {
            *self.released.lock() = true;
            self.wake.notify_all();
        }
    }

    impl BlockStore for SlowAck {
        fn geometry(&self) -> Geometry {
            self.mem.geometry()
        }
        fn read_block(&self, block: BlockId, buf: &mut [u8]) -> Result<crate::store::ReadInfo> {
            self.mem.read_block(block, buf)
        }
        fn write_block(&self, block: BlockId, data: Block<'_>) -> Result<crate::store::WriteInfo> {
            let info = self.mem.write_block(block, data)?;
            let mut released = self.released.lock();
            let deadline = Instant::now() + Duration::from_secs(10);
            while !*released && Instant::now() < deadline {
                self.wake.wait_until(&mut released, deadline);
            }
            Ok(info)
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn survey_non_zero(&self, t: usize, f: &(dyn Fn(BlockId) + Sync)) -> Result<()> {
            self.mem.survey_non_zero(t, f)
        }
        fn stats(&self, report: &mut crate::stats::StatsReport) {
            self.mem.stats(report)
        }
        fn reset_stats(&self) {}
    }

    /// Releases the store on every exit, so the cache's workers can stop.
    struct ReleaseOnDrop(Arc<SlowAck>);

    impl Drop for ReleaseOnDrop {
        fn drop(&mut self) {
            self.0.release();
        }
    }

    #[test]
    fn the_clean_entry_is_gone_before_an_upload_changes_the_block() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        let mem = Arc::new(MemoryBackend::new(geometry(BS)));
        mem.write_block(BlockId(3), Block::Data(&block_of(1)))
            .unwrap();
        let slow = Arc::new(SlowAck {
            mem: Arc::clone(&mem),
            released: parking_lot::Mutex::new(false),
            wake: parking_lot::Condvar::new(),
        });
        let cache = BlockCache::open(
            Arc::clone(&slow) as Arc<dyn BlockStore>,
            BlockCacheOptions {
                size: 16,
                threads: 2,
                write_delay: Duration::ZERO,
                read_ahead: 0,
                file: Some(CacheFileOptions {
                    no_verify: true,
                    ..file_opts(&path)
                }),
                ..BlockCacheOptions::default()
            },
        )
        .unwrap();
        // Dropped before the cache, so its workers are not left waiting.
        let _release = ReleaseOnDrop(Arc::clone(&slow));
        let mut buf = vec![0u8; BS];
        cache.read_block(BlockId(3), &mut buf).unwrap();
        let (_, entries) = CacheFile::open(&path, BS as u32, 16, false).unwrap();
        assert_eq!(entries.len(), 1, "the read block is kept clean in the file");
        cache
            .write_block(BlockId(3), Block::Data(&block_of(2)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while mem.stored(BlockId(3)) != Some(block_of(2)) {
            assert!(Instant::now() < deadline, "upload did not start");
            std::thread::sleep(Duration::from_millis(2));
        }
        // A crash now would find the store changed: the old clean entry must be gone.
        let (_, entries) = CacheFile::open(&path, BS as u32, 16, false).unwrap();
        assert!(entries.is_empty(), "stale clean entry: {entries:?}");
        slow.release();
        cache.shutdown().unwrap();
    }

    #[test]
    fn flushed_blocks_stay_in_the_file_as_clean_entries_once_uploaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        let store = Arc::new(MemoryBackend::new(geometry(BS)));
        let trusted = CacheFileOptions {
            no_verify: true,
            ..file_opts(&path)
        };
        // Uploads wait for the flush, so the flush finds the blocks dirty.
        let first = BlockCache::open(
            Arc::clone(&store) as Arc<dyn BlockStore>,
            BlockCacheOptions {
                size: 16,
                threads: 2,
                write_delay: Duration::from_secs(60),
                read_ahead: 0,
                file: Some(trusted.clone()),
                ..BlockCacheOptions::default()
            },
        )
        .unwrap();
        for i in 0..4u32 {
            first
                .write_block(BlockId(i), Block::Data(&block_of(0x20 + i as u8)))
                .unwrap();
        }
        first.flush().unwrap();
        first.shutdown().unwrap();
        drop(first);
        let (_, entries) = CacheFile::open(&path, BS as u32, 16, false).unwrap();
        assert_eq!(entries.len(), 4);
        for (_, entry) in &entries {
            assert!(!entry.dirty);
            let expected = store.stored(entry.block).unwrap();
            assert_eq!(entry.etag, md5_of(&expected), "block {}", entry.block);
        }
        let reads = store.reads.get();
        let second = open_cache(&store, trusted).unwrap();
        let mut buf = vec![0u8; BS];
        for i in 0..4u32 {
            second.read_block(BlockId(i), &mut buf).unwrap();
            assert_eq!(buf, block_of(0x20 + i as u8));
        }
        assert_eq!(store.reads.get(), reads, "served from the cache file");
        second.shutdown().unwrap();
    }

    fn md5_of(data: &[u8]) -> Etag {
        use md5::Digest;
        md5::Md5::digest(data).into()
    }

    #[test]
    fn a_file_of_another_block_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        let store = Arc::new(MemoryBackend::new(geometry(BS)));
        open_cache(&store, file_opts(&path))
            .unwrap()
            .shutdown()
            .unwrap();
        let other = Arc::new(MemoryBackend::new(geometry(BS * 2)));
        let err = open_cache(&other, file_opts(&path))
            .err()
            .expect("must refuse");
        let msg = err.to_string();
        assert!(msg.starts_with("invalid cache file"), "{msg}");
        assert!(msg.contains("block size is 512"), "{msg}");
    }

    #[test]
    fn mount_token_is_set_while_open_and_cleared_by_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        let store = Arc::new(MemoryBackend::new(geometry(BS)));
        let cache = open_cache(&store, file_opts(&path)).unwrap();
        let token = super::super::cache_file::read_mount_token(&path).unwrap();
        assert_eq!(token, Some(0x1234));
        cache.shutdown().unwrap();
        let token = super::super::cache_file::read_mount_token(&path).unwrap();
        assert_eq!(token, Some(0));
    }

    #[test]
    fn many_flushes_with_few_slots_stay_correct() {
        // More dirty blocks than slots: flush falls back to waiting for uploads.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        let store = Arc::new(MemoryBackend::with_latency(
            geometry(BS),
            Duration::from_millis(1),
        ));
        let cache = open_cache(&store, file_opts(&path)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        for round in 0..5u8 {
            for i in 0..BLOCKS {
                cache
                    .write_block(BlockId(i), Block::Data(&block_of(round + 1)))
                    .unwrap();
            }
            cache.flush().unwrap();
            assert!(Instant::now() < deadline, "too slow");
        }
        cache.shutdown().unwrap();
        for i in 0..BLOCKS {
            assert_eq!(store.stored(BlockId(i)), Some(block_of(5)), "block {i}");
        }
    }
}
