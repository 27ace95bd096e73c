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

use parking_lot::{Mutex, MutexGuard};

use super::cache_file::{CacheFile, DirEntry};
use crate::error::Result;
use crate::geometry::BlockId;
use crate::store::{Etag, is_zero};

/// Settings of the persistent cache file (`--blockCacheFile` and friends).
#[derive(Clone, Debug)]
pub struct CacheFileOptions {
    pub path: PathBuf,
    /// Trust clean entries found at startup without checking them against the store.
    pub no_verify: bool,
    /// Upload the dirty entries found at startup (else they are discarded, loudly).
    pub recover_dirty: bool,
    /// Tell the kernel not to keep slot data in the page cache.
    pub advise: bool,
    /// Written to the header while mounted; zeroed after a clean shutdown (spec 5.2).
    pub mount_token: u32,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct Slot {
    index: u32,
    dirty: bool,
}

pub(super) struct FileTier {
    inner: Mutex<Tier>,
}

pub(super) struct Tier {
    file: CacheFile,
    slots: HashMap<BlockId, Slot>,
    free: Vec<u32>,
    block_size: usize,
}

impl FileTier {
    /// Opens the file for a cache of `capacity` blocks. Returns the dirty blocks to upload again
    /// (only with `recover_dirty`; their entries stay until they are uploaded).
    pub(super) fn open(
        opts: &CacheFileOptions,
        block_size: u32,
        capacity: u32,
    ) -> Result<(FileTier, Vec<(BlockId, Vec<u8>)>)> {
        let (file, entries) = CacheFile::open(&opts.path, block_size, capacity, opts.advise)?;
        let mut tier = Tier {
            file,
            slots: HashMap::new(),
            free: Vec::new(),
            block_size: block_size as usize,
        };
        let mut recovered = Vec::new();
        let mut discard = Vec::new();
        let (mut discarded_dirty, mut discarded_clean) = (0usize, 0usize);
        for (index, entry) in entries {
            let keep = if entry.dirty {
                opts.recover_dirty
            } else {
                opts.no_verify
            };
            if !keep {
                discard.push(index);
                if entry.dirty {
                    discarded_dirty += 1;
                } else {
                    discarded_clean += 1;
                }
                continue;
            }
            if entry.dirty {
                let mut buf = vec![0u8; tier.block_size];
                tier.file.read_slot(index, &mut buf)?;
                recovered.push((entry.block, buf));
            }
            tier.slots.insert(
                entry.block,
                Slot {
                    index,
                    dirty: entry.dirty,
                },
            );
        }
        let path = opts.path.display();
        if discarded_dirty > 0 {
            tracing::error!(
                "cache file \"{path}\": DISCARDING {discarded_dirty} dirty blocks that were never \
                 uploaded (use --blockCacheRecoverDirtyBlocks to upload them instead)"
            );
        }
        if discarded_clean > 0 {
            // Checking entries by ETag is not implemented: only trust them when told to.
            tracing::warn!(
                "cache file \"{path}\": dropping {discarded_clean} clean entries that cannot be \
                 verified (use --blockCacheNoVerify to keep them)"
            );
        }
        if !discard.is_empty() {
            for &index in &discard {
                tier.file.write_entry(index, None)?;
            }
            tier.file.sync()?;
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
    /// Serves `block` from a clean entry; false when there is none.
    pub(super) fn read_clean(&self, block: BlockId, buf: &mut [u8]) -> Result<bool> {
        match self.slots.get(&block) {
            Some(slot) if !slot.dirty => {
                self.file.read_slot(slot.index, buf)?;
                Ok(true)
            }
            _ => Ok(false),
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
        self.slots.insert(
            block,
            Slot {
                index,
                dirty: false,
            },
        );
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

    /// The newest version of `block` is uploaded: its dirty entry (an older or equal version)
    /// is no longer needed.
    pub(super) fn after_upload(&mut self, block: BlockId) -> Result<()> {
        match self.slots.get(&block) {
            Some(slot) => {
                let index = slot.index;
                self.release(block, index)
            }
            None => Ok(()),
        }
    }

    fn release(&mut self, block: BlockId, index: u32) -> Result<()> {
        self.file.clear(index)?;
        self.slots.remove(&block);
        self.free.push(index);
        Ok(())
    }

    /// Persists the newest data of dirty blocks (`None` = all zero) as dirty entries. Returns
    /// false, having written nothing, when there are not enough slots.
    pub(super) fn persist_dirty(&mut self, blocks: &[(BlockId, Option<&[u8]>)]) -> Result<bool> {
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
        for (&(_, data), &index) in blocks.iter().zip(&targets) {
            self.file.write_slot(index, data.unwrap_or(&zeros))?;
        }
        self.file.sync()?;
        for (&(block, _), &index) in blocks.iter().zip(&targets) {
            let entry = DirEntry {
                block,
                etag: [0; 16],
                dirty: true,
            };
            self.file.write_entry(index, Some(entry))?;
            // Copy-on-write: the older dirty version goes only once the new one is written.
            if let Some(old) = self.slots.insert(block, Slot { index, dirty: true }) {
                self.file.write_entry(old.index, None)?;
                self.free.push(old.index);
            }
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
