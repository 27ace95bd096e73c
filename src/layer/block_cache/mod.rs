//! Block cache layer (spec 6.2): write-back with flush order, read-ahead and LRU eviction.
//!
//! Invariants (all guarded by `Shared::state`):
//! - Every cached block is in one [`EntryState`]: `Reading` (one thread loads it from below and
//!   others wait), `Clean` (equals the lower store; on exactly one LRU list) or `Dirty` (versions
//!   newer than below, oldest first; never evicted).
//! - Every dirty version belongs to an epoch and `flush` closes the current one. Only versions of
//!   the oldest epoch that still has versions pending are uploaded, so nothing of epoch k+1
//!   reaches the lower store before all of epoch k (flush order). Without flushes all writes
//!   share one epoch and nothing waits.
//! - Only the front (oldest) version of a block is ever queued, waiting for a retry or uploading,
//!   and exactly one of those holds for every dirty entry: one upload per block at a time, in
//!   version order.
//! - A write changes a version in place only when it is the block's newest version, of the
//!   current epoch and not being uploaded; otherwise it appends a version.
//! - `used` (clean and reading entries plus dirty versions) never exceeds `size`; `dirty` (dirty
//!   versions) never exceeds `max_dirty`.
//! - With a cache file (`file_tier.rs`, spec 6.6) a flush ends once the newest data of every
//!   dirty block is in the file; the epochs still upload in order in the background, and the
//!   final flush of `shutdown` waits for them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::geometry::{BlockId, Geometry};
use crate::stats::{Counter, StatsReport};
use crate::store::{Block, BlockStore, ReadInfo, Revalidated, WriteInfo, is_zero};

pub use file_tier::CacheFileOptions;
use file_tier::{CleanRead, FileTier};

pub mod cache_file;
mod file_tier;
#[cfg(test)]
mod tests;

/// Dirty ratio at which the write delay has shrunk to zero, whatever `max_dirty` says (spec 6.2).
const MAX_DIRTY_THRESHOLD: f64 = 0.90;

/// Settings of the block cache (the `--blockCache*` and `--readAhead*` flags, spec 8.2).
#[derive(Clone, Debug)]
pub struct BlockCacheOptions {
    /// Capacity in blocks (at least 1).
    pub size: usize,
    /// Upload and read-ahead worker threads (at least 1).
    pub threads: usize,
    /// How long a written block stays dirty before it is uploaded.
    pub write_delay: Duration,
    /// Most dirty blocks held at once; 0 means `size`.
    pub max_dirty: usize,
    /// Clean entries unused for this long are dropped; zero means never.
    pub timeout: Duration,
    /// Writes return only when uploaded.
    pub sync: bool,
    /// Blocks numbered below this are evicted only after all others.
    pub num_protected: u32,
    /// Blocks prefetched once a sequential run starts; 0 disables read-ahead.
    pub read_ahead: u32,
    /// Largest read-ahead window: it grows from `read_ahead` with the length of the run.
    pub read_ahead_max: u32,
    /// Sequential block reads in a row that start read-ahead.
    pub read_ahead_trigger: u32,
    /// Pause before a failed upload is tried again (no C flag: C retries at once).
    pub retry_pause: Duration,
    /// Persistent cache file (`--blockCacheFile`): flushed dirty blocks are safe in it before
    /// they are uploaded, and clean blocks survive a restart.
    pub file: Option<CacheFileOptions>,
}

impl Default for BlockCacheOptions {
    /// The defaults of C s3backer (spec 8.2).
    fn default() -> Self {
        BlockCacheOptions {
            size: 1000,
            threads: 20,
            write_delay: Duration::from_millis(250),
            max_dirty: 0,
            timeout: Duration::ZERO,
            sync: false,
            num_protected: 0,
            read_ahead: 4,
            read_ahead_max: 4,
            read_ahead_trigger: 2,
            retry_pause: Duration::from_secs(1),
            file: None,
        }
    }
}

/// A block's bytes, shared between the cache, uploads and the cache file. A `Vec` inside, so a
/// buffer read from below is kept as it is (`Arc<[u8]>` would copy it into a new allocation).
type SharedBytes = Arc<Vec<u8>>;

/// Block contents held by the cache. Zero blocks hold no buffer.
#[derive(Clone, Debug)]
enum Data {
    Zero,
    Bytes(SharedBytes),
}

impl Data {
    fn from_block(block: Block<'_>) -> Data {
        match block {
            Block::Zero => Data::Zero,
            Block::Data(bytes) => Data::Bytes(Arc::new(bytes.to_vec())),
        }
    }

    /// Classifies a full buffer (a partial write may leave a block all zero).
    fn from_buf(buf: Vec<u8>) -> Data {
        if is_zero(&buf) {
            Data::Zero
        } else {
            Data::Bytes(Arc::new(buf))
        }
    }

    fn as_block(&self) -> Block<'_> {
        match self {
            Data::Zero => Block::Zero,
            Data::Bytes(bytes) => Block::Data(bytes),
        }
    }

    fn is_zero(&self) -> bool {
        matches!(self, Data::Zero)
    }

    /// Copies `buf.len()` bytes from `offset` into `buf`.
    fn copy_to(&self, offset: usize, buf: &mut [u8]) {
        match self {
            Data::Zero => buf.fill(0),
            Data::Bytes(bytes) => buf.copy_from_slice(&bytes[offset..offset + buf.len()]),
        }
    }

    /// Applies a write, reusing the buffer when nobody else holds it.
    fn apply(&mut self, block_size: usize, change: &Change<'_>) {
        let (offset, bytes) = match change {
            Change::Full(data) => {
                *self = data.clone();
                return;
            }
            Change::Patch { offset, bytes } => (*offset, *bytes),
        };
        if let Data::Bytes(arc) = self
            && let Some(buf) = Arc::get_mut(arc)
        {
            buf[offset..offset + bytes.len()].copy_from_slice(bytes);
            if is_zero(buf) {
                *self = Data::Zero;
            }
            return;
        }
        let mut buf = match self {
            Data::Zero => vec![0u8; block_size],
            Data::Bytes(arc) => arc.to_vec(),
        };
        buf[offset..offset + bytes.len()].copy_from_slice(bytes);
        *self = Data::from_buf(buf);
    }
}

/// A write not yet uploaded.
#[derive(Debug)]
struct Version {
    epoch: u64,
    data: Data,
    /// Time of the first write merged into this version; the write delay counts from here.
    written: Instant,
    /// Sequence number of the first write merged into this version (sync writes wait on it).
    first_seq: u64,
}

/// The one state machine of a cache entry (see the invariants at the top).
#[derive(Debug)]
enum EntryState {
    /// Being loaded from below by one thread; nobody else touches it until it is `Clean`.
    Reading,
    /// Same as the lower store; `tick` is its key in the LRU list.
    Clean { data: Data, tick: u64 },
    /// Newer than the lower store. The last version is what reads see; the front one is the next
    /// (or current, when `uploading`) upload.
    Dirty {
        versions: VecDeque<Version>,
        uploading: bool,
    },
}

/// Dirty versions of one epoch.
#[derive(Debug, Default)]
struct Epoch {
    /// Versions of this epoch not yet uploaded (queued, waiting for their turn, retrying or
    /// uploading).
    pending: usize,
    /// Blocks whose front version belongs to this epoch and waits for a worker, in write order.
    queue: VecDeque<BlockId>,
}

/// The last upload failure, kept for the flushes that are waiting.
#[derive(Debug, Clone)]
struct UploadFailure {
    block: BlockId,
    /// Number of the failed upload (`State::uploads_started` when it began).
    started: u64,
    errno: i32,
    message: String,
}

impl UploadFailure {
    fn to_error(&self) -> Error {
        Error::io(
            format!(
                "block {}: upload failed ({}); the data stays cached and is retried",
                self.block, self.message
            ),
            std::io::Error::from_raw_os_error(self.errno),
        )
    }
}

#[derive(Default)]
struct State {
    entries: HashMap<BlockId, EntryState>,
    /// Clean entries by last use: `[unprotected, protected]`, each keyed by tick.
    lru: [BTreeMap<u64, (BlockId, Instant)>; 2],
    next_tick: u64,
    /// Blocks of memory the entries account for (clean + reading entries + dirty versions).
    used: usize,
    /// Dirty versions.
    dirty: usize,
    /// Epoch new writes join.
    current_epoch: u64,
    /// Epochs with versions pending, oldest first.
    epochs: BTreeMap<u64, Epoch>,
    /// Blocks whose front version failed to upload, with the time to try again (in that order).
    retry: VecDeque<(Instant, BlockId)>,
    /// Reading entries a worker should load.
    prefetch: VecDeque<BlockId>,
    next_seq: u64,
    /// Uploads begun so far; a waiter fails only on uploads begun after it started waiting,
    /// so an attempt made while the store was away does not fail a flush issued after its return.
    uploads_started: u64,
    /// The number of each upload in progress.
    upload_number: HashMap<BlockId, u64>,
    /// The failure of the latest-begun upload that failed.
    last_failure: Option<UploadFailure>,
    /// Last block read and the length of the current run of sequential reads.
    last_read: Option<u32>,
    sequential_run: u32,
    stopping: bool,
}

#[derive(Default)]
struct CacheStats {
    read_hits: Counter,
    read_misses: Counter,
    write_hits: Counter,
    write_misses: Counter,
    /// Cache-file entries from an earlier mount that the store confirmed, or had changed.
    verified: Counter,
    mismatch: Counter,
}

/// What a worker does next.
enum Job {
    Upload(BlockId, Data),
    Prefetch(BlockId),
    /// Nothing is ready; sleep until then (or until notified).
    Wait(Option<Instant>),
}

struct Shared {
    lower: Arc<dyn BlockStore>,
    geometry: Geometry,
    opts: BlockCacheOptions,
    max_dirty: usize,
    state: Mutex<State>,
    /// Wakes workers: new work or an earlier deadline.
    work: Condvar,
    /// Wakes everyone else: an entry loaded, an upload done or failed, room freed.
    changed: Condvar,
    stats: CacheStats,
    file: Option<FileTier>,
}

/// Write-back block cache decorating a lower store (spec 6.2, DESIGN "Data safety rules").
pub struct BlockCache {
    shared: Arc<Shared>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl BlockCache {
    /// Builds a cache without a cache file and starts its worker threads.
    ///
    /// # Panics
    /// When `opts.file` is set and the file cannot be opened: use [`BlockCache::open`] then.
    pub fn new(inner: Arc<dyn BlockStore>, opts: BlockCacheOptions) -> Arc<BlockCache> {
        Self::open(inner, opts).expect("cannot open the block cache file")
    }

    /// Builds the cache, opens its cache file (if any, queueing the dirty blocks it recovers
    /// for upload) and starts its worker threads.
    pub fn open(inner: Arc<dyn BlockStore>, opts: BlockCacheOptions) -> Result<Arc<BlockCache>> {
        let geometry = inner.geometry();
        let mut opts = opts;
        // More slots than blocks would never be used (C caps the size the same way).
        opts.size = opts.size.clamp(1, geometry.num_blocks() as usize);
        opts.threads = opts.threads.max(1);
        let max_dirty = match opts.max_dirty {
            0 => opts.size,
            n => n.min(opts.size),
        };
        let (file, recovered) = match &opts.file {
            Some(file_opts) => {
                let (tier, recovered) =
                    FileTier::open(file_opts, geometry.block_size(), opts.size as u32)?;
                (Some(tier), recovered)
            }
            None => (None, Vec::new()),
        };
        let shared = Arc::new(Shared {
            lower: inner,
            geometry,
            max_dirty,
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            changed: Condvar::new(),
            stats: CacheStats::default(),
            opts,
            file,
        });
        shared.recover(recovered);
        let workers = (0..shared.opts.threads)
            .map(|i| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("block-cache-{i}"))
                    .spawn(move || shared.worker())
                    .expect("cannot start block cache worker thread")
            })
            .collect();
        Ok(Arc::new(BlockCache {
            shared,
            workers: Mutex::new(workers),
        }))
    }

    fn stop_workers(&self) {
        self.shared.state.lock().stopping = true;
        self.shared.work.notify_all();
        self.shared.changed.notify_all();
        for handle in self.workers.lock().drain(..) {
            let _ = handle.join();
        }
    }
}

impl Drop for BlockCache {
    fn drop(&mut self) {
        let dirty = self.shared.state.lock().dirty;
        if dirty > 0 {
            tracing::error!("block cache dropped with {dirty} dirty blocks not uploaded");
        }
        self.stop_workers();
    }
}

impl Shared {
    /// Queues the dirty blocks found in the cache file for upload, as one epoch.
    fn recover(&self, recovered: file_tier::Recovered) {
        let mut st = self.state.lock();
        for (block, buf) in recovered {
            if !self.geometry.contains(block) {
                tracing::error!("cache file holds dirty block {block} beyond end of disk: ignored");
                continue;
            }
            let version = self.new_version(&mut st, Data::from_buf(buf));
            let epoch = version.epoch;
            st.used += 1;
            st.entries.insert(
                block,
                EntryState::Dirty {
                    versions: VecDeque::from([version]),
                    uploading: false,
                },
            );
            self.queue_front(&mut st, block, epoch);
        }
    }

    /// Reads a block the cache does not hold (call without the state lock): from a clean entry
    /// of the cache file, else from below (then kept in the file).
    fn read_below(&self, block: BlockId) -> Result<(ReadInfo, Vec<u8>)> {
        let Some(file) = &self.file else {
            return self.lower.read_block_owned(block);
        };
        let mut buf = vec![0u8; self.block_size()];
        let served = |buf: Vec<u8>| {
            let info = ReadInfo {
                zero: is_zero(&buf),
                etag: None,
            };
            Ok((info, buf))
        };
        // Bound first: a guard in the match would be held through its arms.
        let found = file.lock().read_clean(block, &mut buf)?;
        match found {
            CleanRead::Served => return served(buf),
            CleanRead::Absent => {}
            // Checked without the file lock, like any read from below.
            CleanRead::Unverified(etag) => {
                match self.lower.read_block_if_changed(block, &mut buf, etag)? {
                    Revalidated::Unchanged => {
                        if file.lock().confirm_clean(block, etag, &mut buf)? {
                            self.stats.verified.inc();
                            return served(buf);
                        }
                    }
                    Revalidated::Changed(info) => {
                        self.stats.mismatch.inc();
                        let etag = info.etag.filter(|_| !info.zero);
                        if let Err(e) = file.lock().replace_clean(block, etag, &buf) {
                            tracing::warn!("block {block}: cannot keep it in the cache file: {e}");
                        }
                        return Ok((info, buf));
                    }
                }
            }
        }
        // Not under the file lock: other reads and uploads go on meanwhile. The block is
        // `Reading`, so nothing else puts it in the file.
        let (info, buf) = self.lower.read_block_owned(block)?;
        if let (false, Some(etag)) = (info.zero, info.etag)
            && let Err(e) = file.lock().store_clean(block, etag, &buf)
        {
            // The file is only a cache for clean data: go on without it.
            tracing::warn!("block {block}: cannot keep it in the cache file: {e}");
        }
        Ok((info, buf))
    }

    fn block_size(&self) -> usize {
        self.geometry.block_size_usize()
    }

    fn check(&self, block: BlockId) -> Result<()> {
        if self.geometry.contains(block) {
            Ok(())
        } else {
            Err(Error::Invalid(format!("block {block} beyond end of disk")))
        }
    }

    fn check_range(&self, block: BlockId, offset: u32, len: usize) -> Result<()> {
        self.check(block)?;
        if offset as usize + len > self.block_size() {
            return Err(Error::Invalid(format!(
                "block {block}: range {offset}+{len} beyond block size"
            )));
        }
        Ok(())
    }

    // ----- LRU and room -----

    fn lru_index(&self, block: BlockId) -> usize {
        usize::from(block.0 < self.opts.num_protected)
    }

    /// Makes `block` a clean entry holding `data`, most recently used.
    fn set_clean(&self, st: &mut State, block: BlockId, data: Data) {
        let tick = st.next_tick;
        st.next_tick += 1;
        st.lru[self.lru_index(block)].insert(tick, (block, Instant::now()));
        st.entries.insert(block, EntryState::Clean { data, tick });
        if !self.opts.timeout.is_zero() {
            // A sleeping worker may know of no expiry yet: let it learn this one.
            self.work.notify_one();
        }
    }

    /// Moves a clean entry to the most recently used end.
    fn touch(&self, st: &mut State, block: BlockId) {
        let new_tick = st.next_tick;
        let Some(EntryState::Clean { tick, .. }) = st.entries.get_mut(&block) else {
            return;
        };
        let old_tick = std::mem::replace(tick, new_tick);
        st.next_tick += 1;
        let list = &mut st.lru[self.lru_index(block)];
        list.remove(&old_tick);
        list.insert(new_tick, (block, Instant::now()));
    }

    /// Takes a clean entry off its LRU list (it is about to change state or go).
    fn unlist_clean(&self, st: &mut State, block: BlockId) {
        if let Some(EntryState::Clean { tick, .. }) = st.entries.get(&block) {
            let tick = *tick;
            st.lru[self.lru_index(block)].remove(&tick);
        }
    }

    /// Frees one slot if the cache is full, evicting the least recently used clean entry
    /// (unprotected ones first). False when everything is dirty or being read.
    fn make_room(&self, st: &mut State) -> bool {
        if st.used < self.opts.size {
            return true;
        }
        let victim = st
            .lru
            .iter_mut()
            .find_map(|list| list.pop_first())
            .map(|(_, (block, _))| block);
        match victim {
            Some(block) => {
                st.entries.remove(&block);
                st.used -= 1;
                true
            }
            None => false,
        }
    }

    /// Drops clean entries unused for longer than the timeout; returns the next expiry time.
    fn expire(&self, st: &mut State, now: Instant) -> Option<Instant> {
        if self.opts.timeout.is_zero() {
            return None;
        }
        let mut next = None;
        let mut freed = false;
        for i in 0..st.lru.len() {
            while let Some((&tick, &(block, used_at))) = st.lru[i].first_key_value() {
                let expires = used_at + self.opts.timeout;
                if expires > now {
                    next = earliest(next, Some(expires));
                    break;
                }
                st.lru[i].remove(&tick);
                st.entries.remove(&block);
                st.used -= 1;
                freed = true;
            }
        }
        if freed {
            self.changed.notify_all();
        }
        next
    }

    // ----- loading -----

    /// Loads an absent block from below as a clean entry. Returns with the lock held; on
    /// `Ok(false)` there was no room and the caller waited, so it must look again.
    fn load(&self, st: &mut MutexGuard<'_, State>, block: BlockId) -> Result<bool> {
        if !self.make_room(st) {
            self.changed.wait(st);
            return Ok(false);
        }
        st.used += 1;
        st.entries.insert(block, EntryState::Reading);
        let result = MutexGuard::unlocked(st, || self.read_below(block));
        self.finish_load(st, block, result)?;
        Ok(true)
    }

    fn finish_load(
        &self,
        st: &mut State,
        block: BlockId,
        result: Result<(ReadInfo, Vec<u8>)>,
    ) -> Result<()> {
        debug_assert!(matches!(st.entries.get(&block), Some(EntryState::Reading)));
        self.changed.notify_all();
        match result {
            Ok((info, buf)) => {
                let data = if info.zero {
                    Data::Zero
                } else {
                    Data::from_buf(buf)
                };
                self.set_clean(st, block, data);
                Ok(())
            }
            Err(e) => {
                st.entries.remove(&block);
                st.used -= 1;
                Err(e)
            }
        }
    }

    /// Runs `f` on the current contents of `block`, loading it on a miss.
    fn read_with<R>(&self, block: BlockId, f: impl FnOnce(&Data) -> R) -> Result<R> {
        let mut st = self.state.lock();
        self.note_read(&mut st, block);
        let mut loaded = false;
        loop {
            match st.entries.get(&block) {
                Some(EntryState::Reading) => self.changed.wait(&mut st),
                Some(EntryState::Clean { data, .. }) => {
                    let result = f(data);
                    self.touch(&mut st, block);
                    self.count_read(loaded);
                    return Ok(result);
                }
                Some(EntryState::Dirty { versions, .. }) => {
                    let newest = versions.back().expect("dirty entry without versions");
                    self.count_read(loaded);
                    return Ok(f(&newest.data));
                }
                None => loaded = self.load(&mut st, block)?,
            }
        }
    }

    fn count_read(&self, loaded: bool) {
        if loaded {
            self.stats.read_misses.inc();
        } else {
            self.stats.read_hits.inc();
        }
    }

    /// Tracks sequential reads and schedules read-ahead once a run is long enough.
    fn note_read(&self, st: &mut State, block: BlockId) {
        if self.opts.read_ahead == 0 {
            return;
        }
        match st.last_read {
            Some(last) if last == block.0 => return,
            Some(last) if last.checked_add(1) == Some(block.0) => {
                st.sequential_run = st.sequential_run.saturating_add(1);
            }
            _ => st.sequential_run = 1,
        }
        st.last_read = Some(block.0);
        if st.sequential_run < self.opts.read_ahead_trigger {
            return;
        }
        // Most recently used first, so making room for the prefetch cannot evict it.
        self.touch(st, block);
        let last_block = self.geometry.num_blocks() - 1;
        let window = self.read_ahead_window(st.sequential_run);
        let end = block.0.saturating_add(window).min(last_block);
        let mut scheduled = false;
        for n in block.0.saturating_add(1)..=end {
            let next = BlockId(n);
            if st.entries.contains_key(&next) {
                continue;
            }
            // Read-ahead never waits for room: it only uses free or clean slots.
            if !self.make_room(st) {
                break;
            }
            st.used += 1;
            st.entries.insert(next, EntryState::Reading);
            st.prefetch.push_back(next);
            scheduled = true;
        }
        if scheduled {
            self.work.notify_all();
        }
    }

    /// Blocks to prefetch after `run` sequential reads: as many as the run is long (one GET in
    /// flight per block a stream will likely read next), from `read_ahead` up to
    /// `read_ahead_max`, and never more than a quarter of the cache, so prefetched blocks do
    /// not evict each other before they are read.
    fn read_ahead_window(&self, run: u32) -> u32 {
        let quarter = u32::try_from(self.opts.size / 4).unwrap_or(u32::MAX);
        let max = self
            .opts
            .read_ahead_max
            .min(quarter)
            .max(self.opts.read_ahead);
        run.clamp(self.opts.read_ahead, max)
    }

    // ----- writing -----

    /// Writes `block`: the whole block (`Full`) or a piece of it (`Patch`, loading it first when
    /// not cached). Waits for room when the dirty limit is reached.
    fn write(&self, block: BlockId, change: Change<'_>) -> Result<()> {
        let mut st = self.state.lock();
        let mut hit = true;
        let seq = loop {
            if let Some(seq) = self.try_write(&mut st, block, &change, &mut hit)? {
                break seq;
            }
        };
        if hit {
            self.stats.write_hits.inc();
        } else {
            self.stats.write_misses.inc();
        }
        if self.opts.sync {
            self.wait_uploaded(&mut st, block, seq)?;
        }
        Ok(())
    }

    /// One attempt of `write`: `Some(seq)` when done, `None` after waiting (look again).
    fn try_write(
        &self,
        st: &mut MutexGuard<'_, State>,
        block: BlockId,
        change: &Change<'_>,
        hit: &mut bool,
    ) -> Result<Option<u64>> {
        if st.stopping {
            return Err(Error::Other(format!(
                "block {block}: write after the block cache was shut down"
            )));
        }
        let epoch = st.current_epoch;
        let seq = st.next_seq;
        let step = match st.entries.get(&block) {
            Some(EntryState::Reading) => WriteStep::Wait,
            None => WriteStep::Insert(None),
            Some(EntryState::Clean { data, .. }) => WriteStep::Insert(Some(data.clone())),
            Some(EntryState::Dirty {
                versions,
                uploading,
            }) => {
                let newest = versions.back().expect("dirty entry without versions");
                let in_flight = *uploading && versions.len() == 1;
                if newest.epoch == epoch && !in_flight {
                    WriteStep::Merge
                } else {
                    // The newest version is in flight or belongs to a closed epoch: keep it.
                    WriteStep::Append(newest.data.clone())
                }
            }
        };
        let block_size = self.block_size();
        match step {
            WriteStep::Wait => {
                self.changed.wait(st);
                return Ok(None);
            }
            WriteStep::Insert(None) if matches!(change, Change::Patch { .. }) => {
                *hit = false;
                self.load(st, block)?;
                return Ok(None);
            }
            WriteStep::Insert(old) => {
                let new_slot = old.is_none();
                if new_slot {
                    *hit = false;
                }
                if st.dirty >= self.max_dirty || (new_slot && !self.make_room(st)) {
                    self.changed.wait(st);
                    return Ok(None);
                }
                let mut data = old.unwrap_or(Data::Zero);
                data.apply(block_size, change);
                if new_slot {
                    st.used += 1;
                } else {
                    self.unlist_clean(st, block);
                }
                let version = self.new_version(st, data);
                st.entries.insert(
                    block,
                    EntryState::Dirty {
                        versions: VecDeque::from([version]),
                        uploading: false,
                    },
                );
                self.queue_front(st, block, epoch);
            }
            WriteStep::Merge => {
                let Some(EntryState::Dirty { versions, .. }) = st.entries.get_mut(&block) else {
                    unreachable!("dirty entry changed state under the lock");
                };
                let newest = versions.back_mut().expect("dirty entry without versions");
                newest.data.apply(block_size, change);
                st.next_seq += 1;
            }
            WriteStep::Append(mut data) => {
                if st.dirty >= self.max_dirty || !self.make_room(st) {
                    self.changed.wait(st);
                    return Ok(None);
                }
                data.apply(block_size, change);
                st.used += 1;
                let version = self.new_version(st, data);
                let Some(EntryState::Dirty { versions, .. }) = st.entries.get_mut(&block) else {
                    unreachable!("dirty entry changed state under the lock");
                };
                versions.push_back(version);
            }
        }
        Ok(Some(seq))
    }

    /// A new dirty version in the current epoch (not yet attached to an entry).
    fn new_version(&self, st: &mut State, data: Data) -> Version {
        let epoch = st.current_epoch;
        let first_seq = st.next_seq;
        st.next_seq += 1;
        st.dirty += 1;
        st.epochs.entry(epoch).or_default().pending += 1;
        Version {
            epoch,
            data,
            written: Instant::now(),
            first_seq,
        }
    }

    /// Queues the front version of `block` (of `epoch`) for upload.
    fn queue_front(&self, st: &mut State, block: BlockId, epoch: u64) {
        st.epochs
            .get_mut(&epoch)
            .expect("queued version without its epoch")
            .queue
            .push_back(block);
        self.work.notify_one();
    }

    /// Waits until the write numbered `seq` to `block` is uploaded; fails when an upload of
    /// `block` fails meanwhile.
    fn wait_uploaded(
        &self,
        st: &mut MutexGuard<'_, State>,
        block: BlockId,
        seq: u64,
    ) -> Result<()> {
        let begun = st.uploads_started;
        loop {
            let pending = match st.entries.get(&block) {
                Some(EntryState::Dirty { versions, .. }) => versions
                    .front()
                    .is_some_and(|oldest| oldest.first_seq <= seq),
                _ => false,
            };
            if !pending {
                return Ok(());
            }
            if let Some(failure) = st
                .last_failure
                .as_ref()
                .filter(|f| f.block == block && f.started > begun)
            {
                return Err(failure.to_error());
            }
            self.changed.wait(st);
        }
    }

    // ----- flushing -----

    /// Closes the current epoch and waits until it and all earlier ones are durable: in the
    /// cache file when there is one (and `file_ok`), else uploaded.
    fn flush(&self, file_ok: bool) -> Result<()> {
        if file_ok && let Some(file) = &self.file {
            let mut tier = file.lock();
            let mut st = self.state.lock();
            let target = self.close_epoch(&mut st);
            let blocks: Vec<(BlockId, Option<SharedBytes>)> = st
                .entries
                .iter()
                .filter_map(|(&block, state)| match state {
                    EntryState::Dirty { versions, .. } => match &versions.back()?.data {
                        Data::Zero => Some((block, None)),
                        Data::Bytes(bytes) => Some((block, Some(Arc::clone(bytes)))),
                    },
                    _ => None,
                })
                .collect();
            drop(st);
            match tier.persist_dirty(blocks) {
                Ok(true) => return Ok(()),
                Ok(false) => {
                    tracing::debug!("cache file full of dirty blocks: flush waits for uploads")
                }
                // The file is one way to be durable; the upload is the other.
                Err(e) => tracing::warn!("{e}; the flush waits for the upload instead"),
            }
            drop(tier);
            let st = self.state.lock();
            return self.wait_epochs(st, target);
        }
        let mut st = self.state.lock();
        let target = self.close_epoch(&mut st);
        self.wait_epochs(st, target)
    }

    /// Closes the current epoch (its versions are due at once) and returns its number.
    fn close_epoch(&self, st: &mut State) -> u64 {
        let target = st.current_epoch;
        st.current_epoch += 1;
        self.work.notify_all();
        target
    }

    /// Waits until every epoch up to `target` is uploaded, then flushes below.
    fn wait_epochs(&self, mut st: MutexGuard<'_, State>, target: u64) -> Result<()> {
        let begun = st.uploads_started;
        while st
            .epochs
            .first_key_value()
            .is_some_and(|(&e, _)| e <= target)
        {
            if let Some(failure) = st.last_failure.as_ref().filter(|f| f.started > begun) {
                return Err(failure.to_error());
            }
            if st.stopping {
                return Err(Error::Other("block cache stopped before flush".into()));
            }
            self.changed.wait(&mut st);
        }
        drop(st);
        self.lower.flush()
    }

    // ----- workers -----

    fn worker(&self) {
        let mut st = self.state.lock();
        while !st.stopping {
            match self.next_job(&mut st) {
                Job::Upload(block, data) => match &self.file {
                    None => {
                        let result = MutexGuard::unlocked(&mut st, || {
                            self.lower.write_block(block, data.as_block())
                        });
                        self.finish_upload(&mut st, block, result.map(|_| ()));
                    }
                    Some(file) => self.upload_with_file(&mut st, file, block, &data),
                },
                Job::Prefetch(block) => {
                    let result = MutexGuard::unlocked(&mut st, || self.read_below(block));
                    if let Err(e) = self.finish_load(&mut st, block, result) {
                        tracing::debug!("read-ahead of block {block} failed: {e}");
                    }
                }
                Job::Wait(Some(deadline)) => {
                    self.work.wait_until(&mut st, deadline);
                }
                Job::Wait(None) => self.work.wait(&mut st),
            }
        }
    }

    /// Uploads `block` keeping the cache file's rules: its clean entry goes before the upload,
    /// its dirty entry once the newest version is up.
    fn upload_with_file(
        &self,
        st: &mut MutexGuard<'_, State>,
        file: &FileTier,
        block: BlockId,
        data: &Data,
    ) {
        let (result, mut tier) = MutexGuard::unlocked(st, || {
            let mut tier = file.lock();
            let result = tier.before_upload(block);
            drop(tier);
            let result = result.and_then(|()| self.lower.write_block(block, data.as_block()));
            // Taken before the state lock comes back (lock order: file, then state).
            (result, file.lock())
        });
        let etag = result.as_ref().ok().and_then(|info| info.etag);
        self.finish_upload(st, block, result.map(|_| ()));
        if let Some(EntryState::Clean { data, .. }) = st.entries.get(&block) {
            let bytes = match data {
                Data::Bytes(bytes) => Some(Arc::clone(bytes)),
                Data::Zero => None,
            };
            MutexGuard::unlocked(st, || {
                let uploaded = bytes.as_ref().zip(etag);
                if let Err(e) = tier.after_upload(block, uploaded) {
                    tracing::error!(
                        "block {block}: uploaded, but its old dirty entry in the cache file \
                         cannot be removed (it would be uploaded again after a crash): {e}"
                    );
                }
                drop(tier);
            });
        } else {
            drop(tier);
        }
    }

    fn next_job(&self, st: &mut State) -> Job {
        let now = Instant::now();
        let expiry = self.expire(st, now);
        if let Some(&(at, block)) = st.retry.front()
            && at <= now
        {
            st.retry.pop_front();
            return self.start_upload(st, block);
        }
        if let Some(block) = st.prefetch.pop_front() {
            return Job::Prefetch(block);
        }
        let mut deadline = earliest(expiry, st.retry.front().map(|&(at, _)| at));
        let delay = self.effective_delay(st);
        let current_epoch = st.current_epoch;
        if let Some(mut oldest) = st.epochs.first_entry() {
            let closed = *oldest.key() < current_epoch;
            if let Some(&block) = oldest.get().queue.front() {
                let written = match st.entries.get(&block) {
                    Some(EntryState::Dirty { versions, .. }) => versions[0].written,
                    other => unreachable!("queued block {block} is not dirty: {other:?}"),
                };
                let due = if closed { written } else { written + delay };
                if due <= now {
                    oldest.get_mut().queue.pop_front();
                    return self.start_upload(st, block);
                }
                deadline = earliest(deadline, Some(due));
            }
        }
        Job::Wait(deadline)
    }

    /// The write delay, shortened as the dirty ratio approaches its threshold (spec 6.2).
    fn effective_delay(&self, st: &State) -> Duration {
        let size = self.opts.size as f64;
        let threshold = (self.max_dirty as f64 / size).min(MAX_DIRTY_THRESHOLD);
        let ratio = st.dirty as f64 / size;
        let pressure = (ratio / threshold).min(1.0);
        self.opts.write_delay.mul_f64(1.0 - pressure)
    }

    fn start_upload(&self, st: &mut State, block: BlockId) -> Job {
        let Some(EntryState::Dirty {
            versions,
            uploading,
        }) = st.entries.get_mut(&block)
        else {
            unreachable!("upload of block {block} that is not dirty");
        };
        debug_assert!(!*uploading);
        *uploading = true;
        let job = Job::Upload(block, versions[0].data.clone());
        st.uploads_started += 1;
        st.upload_number.insert(block, st.uploads_started);
        job
    }

    fn finish_upload(&self, st: &mut State, block: BlockId, result: Result<()>) {
        let Some(EntryState::Dirty {
            versions,
            uploading,
        }) = st.entries.get_mut(&block)
        else {
            unreachable!("uploaded block {block} is not dirty");
        };
        *uploading = false;
        let number = st
            .upload_number
            .remove(&block)
            .expect("upload without its number");
        match result {
            Ok(()) => {
                let done = versions.pop_front().expect("uploaded version vanished");
                let next_epoch = versions.front().map(|v| v.epoch);
                st.dirty -= 1;
                if let Some(epoch) = st.epochs.get_mut(&done.epoch) {
                    epoch.pending -= 1;
                    if epoch.pending == 0 {
                        debug_assert!(epoch.queue.is_empty());
                        st.epochs.remove(&done.epoch);
                    }
                }
                match next_epoch {
                    None => self.set_clean(st, block, done.data),
                    Some(epoch) => {
                        st.used -= 1;
                        self.queue_front(st, block, epoch);
                    }
                }
                // The next epoch may have become uploadable.
                self.work.notify_all();
            }
            Err(e) => {
                tracing::warn!(
                    "upload of block {block} failed, retrying in {:?}: {e}",
                    self.opts.retry_pause
                );
                if st.last_failure.as_ref().is_none_or(|f| f.started < number) {
                    st.last_failure = Some(UploadFailure {
                        block,
                        started: number,
                        errno: e.errno(),
                        message: e.to_string(),
                    });
                }
                st.retry
                    .push_back((Instant::now() + self.opts.retry_pause, block));
            }
        }
        self.changed.notify_all();
    }

    // ----- survey -----

    /// Dirty blocks and whether their newest data is non-zero.
    fn dirty_snapshot(&self) -> HashMap<BlockId, bool> {
        let st = self.state.lock();
        st.entries
            .iter()
            .filter_map(|(&block, state)| match state {
                EntryState::Dirty { versions, .. } => {
                    Some((block, !versions.back()?.data.is_zero()))
                }
                _ => None,
            })
            .collect()
    }
}

/// What a write does to a block.
enum Change<'a> {
    /// Replaces the whole block.
    Full(Data),
    /// Overwrites `bytes.len()` bytes at `offset`.
    Patch { offset: usize, bytes: &'a [u8] },
}

/// How `try_write` proceeds, decided from the entry's state.
enum WriteStep {
    /// The block is being loaded: wait for it.
    Wait,
    /// Absent (`None`) or clean (its data): becomes dirty with one version.
    Insert(Option<Data>),
    /// The newest version can take the write in place.
    Merge,
    /// A new version on top of the newest one's data.
    Append(Data),
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl BlockStore for BlockCache {
    fn geometry(&self) -> Geometry {
        self.shared.geometry
    }

    fn read_block(&self, block: BlockId, buf: &mut [u8]) -> Result<ReadInfo> {
        let shared = &self.shared;
        shared.check_range(block, 0, buf.len())?;
        shared.read_with(block, |data| {
            data.copy_to(0, buf);
            ReadInfo {
                zero: data.is_zero(),
                etag: None,
            }
        })
    }

    fn write_block(&self, block: BlockId, data: Block<'_>) -> Result<WriteInfo> {
        let shared = &self.shared;
        shared.check(block)?;
        if let Block::Data(bytes) = data
            && bytes.len() != shared.block_size()
        {
            return Err(Error::Invalid(format!(
                "block {block}: write of {} bytes, block size is {}",
                bytes.len(),
                shared.block_size()
            )));
        }
        shared.write(block, Change::Full(Data::from_block(data)))?;
        Ok(WriteInfo::default())
    }

    fn read_partial(&self, block: BlockId, offset: u32, buf: &mut [u8]) -> Result<()> {
        let shared = &self.shared;
        shared.check_range(block, offset, buf.len())?;
        shared.read_with(block, |data| data.copy_to(offset as usize, buf))
    }

    fn write_partial(&self, block: BlockId, offset: u32, data: &[u8]) -> Result<()> {
        let shared = &self.shared;
        shared.check_range(block, offset, data.len())?;
        shared.write(
            block,
            Change::Patch {
                offset: offset as usize,
                bytes: data,
            },
        )
    }

    fn flush(&self) -> Result<()> {
        self.shared.flush(true)
    }

    fn survey_non_zero(&self, threads: usize, found: &(dyn Fn(BlockId) + Sync)) -> Result<()> {
        let dirty = self.shared.dirty_snapshot();
        // Dirty blocks are reported from the cache: the lower store has older contents.
        self.shared.lower.survey_non_zero(threads, &|block| {
            if !dirty.contains_key(&block) {
                found(block);
            }
        })?;
        for (&block, &non_zero) in &dirty {
            if non_zero {
                found(block);
            }
        }
        Ok(())
    }

    fn stats(&self, report: &mut StatsReport) {
        let shared = &self.shared;
        let (entries, dirty) = {
            let st = shared.state.lock();
            (st.entries.len(), st.dirty)
        };
        let stats = &shared.stats;
        let ratio = |hits: u64, misses: u64| {
            let total = hits + misses;
            if total == 0 {
                0.0
            } else {
                hits as f64 / total as f64
            }
        };
        let (read_hits, read_misses) = (stats.read_hits.get(), stats.read_misses.get());
        let (write_hits, write_misses) = (stats.write_hits.get(), stats.write_misses.get());
        report.add("block_cache_current_size", format!("{entries} blocks"));
        report.add("block_cache_initial_size", "0 blocks");
        report.add(
            "block_cache_dirty_ratio",
            format!("{:.8}", dirty as f64 / shared.opts.size as f64),
        );
        report.add("block_cache_read_hits", read_hits);
        report.add("block_cache_read_misses", read_misses);
        report.add(
            "block_cache_read_hit_ratio",
            format!("{:.8}", ratio(read_hits, read_misses)),
        );
        report.add("block_cache_write_hits", write_hits);
        report.add("block_cache_write_misses", write_misses);
        report.add(
            "block_cache_write_hit_ratio",
            format!("{:.8}", ratio(write_hits, write_misses)),
        );
        report.add("block_cache_verified", stats.verified.get());
        report.add("block_cache_mismatch", stats.mismatch.get());
        shared.lower.stats(report);
    }

    fn reset_stats(&self) {
        let stats = &self.shared.stats;
        stats.read_hits.reset();
        stats.read_misses.reset();
        stats.write_hits.reset();
        stats.write_misses.reset();
        stats.verified.reset();
        stats.mismatch.reset();
        self.shared.lower.reset_stats();
    }

    fn shutdown(&self) -> Result<()> {
        self.shared.flush(false)?;
        if let Some(file) = &self.shared.file {
            file.lock().clear_mount_token()?;
        }
        self.stop_workers();
        self.shared.lower.shutdown()
    }
}
