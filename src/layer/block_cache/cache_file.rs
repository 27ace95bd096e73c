//! The persistent block cache file of `--blockCacheFile` (spec 6.6), byte-compatible with C
//! s3backer: a 64-byte header, a directory of one entry per slot, then page-aligned data slots.
//!
//! This module only reads and writes the file; the write ordering that makes it crash-safe
//! (data synced before its entry; an entry zeroed and synced before its slot is reused) is the
//! caller's, helped by [`CacheFile::store`] and [`CacheFile::clear`].
//!
//! The layout is a handful of fixed integers, so it is encoded by hand rather than with a
//! serialization crate.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::geometry::BlockId;
use crate::store::Etag;

const SIGNATURE: u32 = 0xe496_f17b;
const NEW_HEADER_SIZE: u32 = 64;
const OLD_HEADER_SIZE: u32 = 32;
const NEW_ENTRY_SIZE: u32 = 24;
const OLD_ENTRY_SIZE: u32 = 20;
const HDRFLG_NEW_FORMAT: u32 = 1;
const ENTRY_FLAG_DIRTY: u32 = 1;
/// Header field offsets (spec 6.6).
const OFF_HEADER_SIZE: usize = 4;
const OFF_U_INT_SIZE: usize = 8;
const OFF_BLOCK_T_SIZE: usize = 12;
const OFF_BLOCK_SIZE: usize = 16;
const OFF_DATA_ALIGN: usize = 20;
const OFF_FLAGS: usize = 24;
const OFF_MAX_BLOCKS: usize = 28;
const OFF_MOUNT_TOKEN: u64 = 32;

/// One directory entry: which block a slot holds.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub block: BlockId,
    /// ETag of the stored object; zero for dirty entries.
    pub etag: Etag,
    /// The slot holds data newer than the bucket (flushed, not yet uploaded).
    pub dirty: bool,
}

impl DirEntry {
    fn encode(&self) -> [u8; NEW_ENTRY_SIZE as usize] {
        let mut buf = [0u8; NEW_ENTRY_SIZE as usize];
        buf[0..4].copy_from_slice(&self.block.0.to_ne_bytes());
        buf[4..20].copy_from_slice(&self.etag);
        let flags = if self.dirty { ENTRY_FLAG_DIRTY } else { 0 };
        buf[20..24].copy_from_slice(&flags.to_ne_bytes());
        buf
    }

    /// `None` for an empty (all-zero) entry.
    fn decode(buf: &[u8]) -> std::result::Result<Option<DirEntry>, String> {
        if buf.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        let flags = if buf.len() >= NEW_ENTRY_SIZE as usize {
            u32_at(buf, 20)
        } else {
            0
        };
        if flags & !ENTRY_FLAG_DIRTY != 0 {
            return Err(format!("unknown entry flags {flags:#x}"));
        }
        Ok(Some(DirEntry {
            block: BlockId(u32_at(buf, 0)),
            etag: buf[4..20].try_into().expect("16-byte etag"),
            dirty: flags & ENTRY_FLAG_DIRTY != 0,
        }))
    }
}

fn u32_at(buf: &[u8], offset: usize) -> u32 {
    u32::from_ne_bytes(buf[offset..offset + 4].try_into().expect("4 bytes"))
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

/// The directory's end rounded up to the data alignment: where slot 0 starts.
fn data_start(header_size: u32, entry_size: u32, max_blocks: u32, align: u32) -> u64 {
    let end = u64::from(header_size) + u64::from(entry_size) * u64::from(max_blocks);
    end.div_ceil(u64::from(align)) * u64::from(align)
}

fn new_header(block_size: u32, max_blocks: u32, align: u32) -> [u8; NEW_HEADER_SIZE as usize] {
    let mut h = [0u8; NEW_HEADER_SIZE as usize];
    let fields = [
        (0, SIGNATURE),
        (OFF_HEADER_SIZE, NEW_HEADER_SIZE),
        (OFF_U_INT_SIZE, 4),
        (OFF_BLOCK_T_SIZE, 4),
        (OFF_BLOCK_SIZE, block_size),
        (OFF_DATA_ALIGN, align),
        (OFF_FLAGS, HDRFLG_NEW_FORMAT),
        (OFF_MAX_BLOCKS, max_blocks),
    ];
    for (offset, value) in fields {
        h[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
    }
    h
}

/// An open cache file in the new (64-byte header) format.
pub struct CacheFile {
    path: PathBuf,
    file: File,
    block_size: u32,
    max_blocks: u32,
    data_start: u64,
    advise: bool,
}

/// What a header says, before it is checked against what we want.
struct Header {
    header_size: u32,
    entry_size: u32,
    data_align: u32,
    max_blocks: u32,
}

impl CacheFile {
    /// Opens `path`, creating it (mode 0600) when absent. Returns the file and its non-empty
    /// entries by slot. A file of another capacity is rewritten to `max_blocks` slots through
    /// `PATH.new` (entries that do not fit are dropped, clean ones first); an old-format file is
    /// converted the same way, its entries clean. Any other mismatch is an error.
    pub fn open(
        path: &Path,
        block_size: u32,
        max_blocks: u32,
        advise: bool,
    ) -> Result<(CacheFile, Vec<(u32, DirEntry)>)> {
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let cache = Self::create(path, block_size, max_blocks, advise)?;
                return Ok((cache, Vec::new()));
            }
            Err(e) => return Err(io_err(path, "cannot open", e)),
        };
        let header = read_header(path, &file, block_size)?;
        let cache = CacheFile {
            path: path.to_path_buf(),
            file,
            block_size,
            max_blocks: header.max_blocks,
            data_start: data_start(
                header.header_size,
                header.entry_size,
                header.max_blocks,
                header.data_align,
            ),
            advise,
        };
        let entries = cache.read_directory(&header)?;
        if header.max_blocks == max_blocks && header.header_size == NEW_HEADER_SIZE {
            return Ok((cache, entries));
        }
        cache.rewrite(max_blocks, entries)
    }

    fn create(path: &Path, block_size: u32, max_blocks: u32, advise: bool) -> Result<CacheFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| io_err(path, "cannot create", e))?;
        let align = page_size();
        let header = new_header(block_size, max_blocks, align);
        let dir_end =
            u64::from(NEW_HEADER_SIZE) + u64::from(NEW_ENTRY_SIZE) * u64::from(max_blocks);
        let io = |e| io_err(path, "cannot initialize", e);
        file.set_len(dir_end).map_err(io)?;
        file.write_all_at(&header, 0).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(CacheFile {
            path: path.to_path_buf(),
            file,
            block_size,
            max_blocks,
            data_start: data_start(NEW_HEADER_SIZE, NEW_ENTRY_SIZE, max_blocks, align),
            advise,
        })
    }

    /// Writes the entries (and their data) into a fresh `PATH.new` of `max_blocks` slots and
    /// renames it over `PATH`.
    fn rewrite(
        self,
        max_blocks: u32,
        mut entries: Vec<(u32, DirEntry)>,
    ) -> Result<(CacheFile, Vec<(u32, DirEntry)>)> {
        let mut new_path = self.path.clone().into_os_string();
        new_path.push(".new");
        let new_path = PathBuf::from(new_path);
        let _ = std::fs::remove_file(&new_path);
        // Dirty entries are the ones that must not be lost: keep them first.
        entries.sort_by_key(|(slot, e)| (!e.dirty, *slot));
        let dropped = entries.len().saturating_sub(max_blocks as usize);
        let lost_dirty = entries
            .iter()
            .skip(max_blocks as usize)
            .filter(|(_, e)| e.dirty)
            .count();
        if lost_dirty > 0 {
            tracing::error!(
                "cache file \"{}\": {lost_dirty} dirty blocks do not fit the new size and are lost",
                self.path.display()
            );
        }
        if dropped > 0 {
            tracing::warn!(
                "cache file \"{}\": {dropped} entries dropped on resize",
                self.path.display()
            );
        }
        entries.truncate(max_blocks as usize);
        let new = Self::create(&new_path, self.block_size, max_blocks, self.advise)?;
        let mut buf = vec![0u8; self.block_size as usize];
        let mut moved = Vec::with_capacity(entries.len());
        for (new_slot, (old_slot, entry)) in (0u32..).zip(entries) {
            self.read_slot(old_slot, &mut buf)?;
            new.write_slot(new_slot, &buf)?;
            moved.push((new_slot, entry));
        }
        new.sync()?;
        for &(slot, entry) in &moved {
            new.write_entry(slot, Some(entry))?;
        }
        new.sync()?;
        std::fs::rename(&new_path, &self.path)
            .map_err(|e| io_err(&self.path, "cannot replace with resized file", e))?;
        tracing::info!(
            "cache file \"{}\" resized from {} to {max_blocks} blocks",
            self.path.display(),
            self.max_blocks
        );
        let new = CacheFile {
            path: self.path.clone(),
            ..new
        };
        Ok((new, moved))
    }

    fn read_directory(&self, header: &Header) -> Result<Vec<(u32, DirEntry)>> {
        let len = u64::from(header.entry_size) * u64::from(header.max_blocks);
        let mut dir = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut dir, u64::from(header.header_size))
            .map_err(|e| self.read_error(e, "directory"))?;
        let file_len = self.file_len()?;
        let mut by_block = std::collections::HashMap::new();
        let mut entries: Vec<(u32, DirEntry)> = Vec::new();
        let mut losers = Vec::new();
        for (slot, raw) in (0u32..).zip(dir.chunks_exact(header.entry_size as usize)) {
            let Some(entry) =
                DirEntry::decode(raw).map_err(|m| self.invalid(&format!("slot {slot}: {m}")))?
            else {
                continue;
            };
            if self.slot_offset(slot) + u64::from(self.block_size) > file_len {
                return Err(self.invalid(&format!("truncated: slot {slot} lies past the end")));
            }
            let Some(&i) = by_block.get(&entry.block) else {
                by_block.insert(entry.block, entries.len());
                entries.push((slot, entry));
                continue;
            };
            // A kill between writing a rewritten block's new entry and emptying its old one
            // leaves two. Neither is newer than the last finished flush, so either is a state
            // a disk could have had; prefer dirty (newer than the bucket), else the first.
            let kept = entries[i];
            let loser = if entry.dirty && !kept.1.dirty {
                entries[i] = (slot, entry);
                kept.0
            } else {
                slot
            };
            tracing::warn!(
                "cache file \"{}\": block {} appears twice; keeping one copy",
                self.path.display(),
                entry.block
            );
            losers.push(loser);
        }
        // Emptied at once: a later rewrite must never find the stale copy beside a new one.
        // (An old-format directory is rewritten by `open` without them.)
        if header.header_size == NEW_HEADER_SIZE && !losers.is_empty() {
            for &slot in &losers {
                self.write_entry(slot, None)?;
            }
            self.sync()?;
        }
        Ok(entries)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn max_blocks(&self) -> u32 {
        self.max_blocks
    }

    fn slot_offset(&self, slot: u32) -> u64 {
        self.data_start + u64::from(slot) * u64::from(self.block_size)
    }

    fn entry_offset(slot: u32) -> u64 {
        u64::from(NEW_HEADER_SIZE) + u64::from(slot) * u64::from(NEW_ENTRY_SIZE)
    }

    fn check_slot(&self, slot: u32) {
        assert!(
            slot < self.max_blocks,
            "cache file slot {slot} out of range"
        );
    }

    /// Reads slot `slot` into `buf` (`block_size` bytes).
    pub fn read_slot(&self, slot: u32, buf: &mut [u8]) -> Result<()> {
        self.check_slot(slot);
        let offset = self.slot_offset(slot);
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| self.read_error(e, &format!("slot {slot}")))?;
        self.advise_done(offset, buf.len());
        Ok(())
    }

    /// Writes slot `slot` (not synced).
    pub fn write_slot(&self, slot: u32, data: &[u8]) -> Result<()> {
        self.check_slot(slot);
        debug_assert_eq!(data.len(), self.block_size as usize);
        let offset = self.slot_offset(slot);
        self.file
            .write_all_at(data, offset)
            .map_err(|e| io_err(&self.path, &format!("cannot write slot {slot}"), e))?;
        self.advise_done(offset, data.len());
        Ok(())
    }

    /// Writes (or, with `None`, empties) the directory entry of `slot` (not synced).
    pub fn write_entry(&self, slot: u32, entry: Option<DirEntry>) -> Result<()> {
        self.check_slot(slot);
        let bytes = entry.map_or([0u8; NEW_ENTRY_SIZE as usize], |e| e.encode());
        self.file
            .write_all_at(&bytes, Self::entry_offset(slot))
            .map_err(|e| io_err(&self.path, &format!("cannot write entry {slot}"), e))
    }

    /// fdatasync: everything written so far is on disk.
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| io_err(&self.path, "cannot sync", e))
    }

    /// Stores `data` in `slot` under `entry` in crash-safe order: data, sync, entry, sync.
    /// The slot's old entry must have been cleared (and synced) if it named another block.
    pub fn store(&self, slot: u32, entry: DirEntry, data: &[u8]) -> Result<()> {
        self.write_slot(slot, data)?;
        self.sync()?;
        self.write_entry(slot, Some(entry))?;
        self.sync()
    }

    /// Empties the entry of `slot` durably, so the slot may be reused.
    pub fn clear(&self, slot: u32) -> Result<()> {
        self.write_entry(slot, None)?;
        self.sync()
    }

    /// The mount token in the header (0 = clean shutdown).
    pub fn mount_token(&self) -> Result<u32> {
        let mut buf = [0u8; 4];
        self.file
            .read_exact_at(&mut buf, OFF_MOUNT_TOKEN)
            .map_err(|e| self.read_error(e, "mount token"))?;
        Ok(u32::from_ne_bytes(buf))
    }

    /// Writes the mount token durably.
    pub fn set_mount_token(&self, token: u32) -> Result<()> {
        self.file
            .write_all_at(&token.to_ne_bytes(), OFF_MOUNT_TOKEN)
            .map_err(|e| io_err(&self.path, "cannot write mount token", e))?;
        self.sync()
    }

    fn file_len(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| io_err(&self.path, "cannot stat", e))
    }

    fn advise_done(&self, offset: u64, len: usize) {
        if self.advise {
            // SAFETY: plain syscall on our own open descriptor; failure only loses a hint.
            unsafe {
                libc::posix_fadvise(
                    self.file.as_raw_fd(),
                    offset as libc::off_t,
                    len as libc::off_t,
                    libc::POSIX_FADV_DONTNEED,
                );
            }
        }
    }

    fn invalid(&self, msg: &str) -> Error {
        invalid(&self.path, msg)
    }

    fn read_error(&self, e: std::io::Error, what: &str) -> Error {
        if e.kind() == ErrorKind::UnexpectedEof {
            self.invalid(&format!("truncated file (cannot read {what})"))
        } else {
            io_err(&self.path, &format!("cannot read {what}"), e)
        }
    }
}

/// Reads the mount token of an existing new-format cache file without opening it for use;
/// `None` when the file does not exist or is in the old format (which has no token).
pub fn read_mount_token(path: &Path) -> Result<Option<u32>> {
    with_existing(path, |cache| cache.mount_token())
}

/// Zeroes the mount token of an existing cache file (`--reset-mounted-flag`); no-op when absent.
pub fn clear_mount_token(path: &Path) -> Result<()> {
    with_existing(path, |cache| cache.set_mount_token(0)).map(|_| ())
}

fn with_existing<T>(path: &Path, f: impl FnOnce(&CacheFile) -> Result<T>) -> Result<Option<T>> {
    let file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path, "cannot open", e)),
    };
    let mut raw = [0u8; OLD_HEADER_SIZE as usize];
    file.read_exact_at(&mut raw, 0)
        .map_err(|_| invalid(path, "truncated file (cannot read header)"))?;
    if u32_at(&raw, 0) != SIGNATURE {
        return Err(invalid(path, "wrong signature"));
    }
    if u32_at(&raw, OFF_HEADER_SIZE) != NEW_HEADER_SIZE {
        return Ok(None);
    }
    let cache = CacheFile {
        path: path.to_path_buf(),
        file,
        block_size: u32_at(&raw, OFF_BLOCK_SIZE),
        max_blocks: u32_at(&raw, OFF_MAX_BLOCKS),
        data_start: 0,
        advise: false,
    };
    f(&cache).map(Some)
}

fn read_header(path: &Path, file: &File, block_size: u32) -> Result<Header> {
    let mut raw = [0u8; NEW_HEADER_SIZE as usize];
    let len = file
        .metadata()
        .map_err(|e| io_err(path, "cannot stat", e))?
        .len();
    let prefix = &mut raw[..len.min(u64::from(NEW_HEADER_SIZE)) as usize];
    file.read_exact_at(prefix, 0)
        .map_err(|e| io_err(path, "cannot read header", e))?;
    if len < u64::from(OLD_HEADER_SIZE) {
        return Err(invalid(path, "truncated file (no header)"));
    }
    let field = |offset| u32_at(&raw, offset);
    if field(0) != SIGNATURE {
        return Err(invalid(
            path,
            &format!("wrong signature {:#010x}", field(0)),
        ));
    }
    let header_size = field(OFF_HEADER_SIZE);
    let flags = field(OFF_FLAGS);
    let entry_size = match (header_size, flags) {
        (NEW_HEADER_SIZE, HDRFLG_NEW_FORMAT) => NEW_ENTRY_SIZE,
        (OLD_HEADER_SIZE, 0) => OLD_ENTRY_SIZE,
        _ => {
            return Err(invalid(
                path,
                &format!("header size {header_size} does not match flags {flags:#x}"),
            ));
        }
    };
    if header_size == NEW_HEADER_SIZE && len < u64::from(NEW_HEADER_SIZE) {
        return Err(invalid(path, "truncated file (short header)"));
    }
    if field(OFF_U_INT_SIZE) != 4 || field(OFF_BLOCK_T_SIZE) != 4 {
        return Err(invalid(
            path,
            "integer sizes are not 4 bytes (made on another platform?)",
        ));
    }
    if field(OFF_BLOCK_SIZE) != block_size {
        return Err(invalid(
            path,
            &format!(
                "block size is {}, but the disk's block size is {block_size}",
                field(OFF_BLOCK_SIZE)
            ),
        ));
    }
    let data_align = field(OFF_DATA_ALIGN);
    if data_align != page_size() {
        return Err(invalid(
            path,
            &format!(
                "data alignment {data_align} is not the page size {}",
                page_size()
            ),
        ));
    }
    let max_blocks = field(OFF_MAX_BLOCKS);
    let dir_end = u64::from(header_size) + u64::from(entry_size) * u64::from(max_blocks);
    if len < dir_end {
        return Err(invalid(path, "truncated file (directory incomplete)"));
    }
    Ok(Header {
        header_size,
        entry_size,
        data_align,
        max_blocks,
    })
}

fn invalid(path: &Path, msg: &str) -> Error {
    Error::Other(format!("invalid cache file \"{}\": {msg}", path.display()))
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::io(format!("cache file \"{}\": {what}", path.display()), e)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: u32 = 512;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn entry(block: u32, dirty: bool) -> DirEntry {
        DirEntry {
            block: BlockId(block),
            etag: if dirty {
                [0; 16]
            } else {
                [block as u8 + 1; 16]
            },
            dirty,
        }
    }

    #[test]
    fn new_file_has_the_c_header_layout_and_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tmp();
        let path = dir.path().join("cache");
        let (cache, entries) = CacheFile::open(&path, BS, 10, false).unwrap();
        assert!(entries.is_empty());
        cache.set_mount_token(0x1234_5678).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            bytes.len(),
            64 + 10 * 24,
            "sized to the end of the directory"
        );
        let at = |o: usize| u32::from_ne_bytes(bytes[o..o + 4].try_into().unwrap());
        assert_eq!(at(0), 0xe496_f17b);
        assert_eq!(at(4), 64);
        assert_eq!((at(8), at(12)), (4, 4));
        assert_eq!(at(16), BS);
        assert_eq!(at(20), page_size());
        assert_eq!(at(24), 1);
        assert_eq!(at(28), 10);
        assert_eq!(at(32), 0x1234_5678);
        assert!(bytes[36..64].iter().all(|&b| b == 0));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn entries_and_slots_round_trip_at_their_offsets() {
        let dir = tmp();
        let path = dir.path().join("cache");
        let (cache, _) = CacheFile::open(&path, BS, 3, false).unwrap();
        cache
            .store(2, entry(7, true), &[0xab; BS as usize])
            .unwrap();
        cache
            .store(0, entry(9, false), &[0xcd; BS as usize])
            .unwrap();
        drop(cache);
        let bytes = std::fs::read(&path).unwrap();
        let data = page_size() as usize; // roundup(64 + 3 * 24, page)
        assert_eq!(bytes.len(), data + 3 * BS as usize);
        assert_eq!(&bytes[64 + 2 * 24..64 + 2 * 24 + 4], &7u32.to_ne_bytes());
        assert_eq!(&bytes[64 + 2 * 24 + 20..64 + 3 * 24], &1u32.to_ne_bytes());
        assert!(bytes[data + 2 * BS as usize..].iter().all(|&b| b == 0xab));
        let (cache, mut entries) = CacheFile::open(&path, BS, 3, false).unwrap();
        entries.sort_by_key(|(slot, _)| *slot);
        assert_eq!(entries, vec![(0, entry(9, false)), (2, entry(7, true))]);
        let mut buf = vec![0u8; BS as usize];
        cache.read_slot(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0xcd));
        cache.clear(2).unwrap();
        let (_, entries) = CacheFile::open(&path, BS, 3, false).unwrap();
        assert_eq!(entries, vec![(0, entry(9, false))]);
    }

    #[test]
    fn resize_keeps_data_and_dirty_entries_first() {
        let dir = tmp();
        let path = dir.path().join("cache");
        let (cache, _) = CacheFile::open(&path, BS, 4, false).unwrap();
        cache.store(0, entry(1, false), &[1; BS as usize]).unwrap();
        cache.store(1, entry(2, false), &[2; BS as usize]).unwrap();
        cache.store(3, entry(3, true), &[3; BS as usize]).unwrap();
        drop(cache);
        let (cache, entries) = CacheFile::open(&path, BS, 2, false).unwrap();
        assert_eq!(cache.max_blocks(), 2);
        assert_eq!(entries, vec![(0, entry(3, true)), (1, entry(1, false))]);
        let mut buf = vec![0u8; BS as usize];
        cache.read_slot(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 3));
        drop(cache);
        assert!(!dir.path().join("cache.new").exists());
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(u32::from_ne_bytes(bytes[28..32].try_into().unwrap()), 2);
        // Growing keeps everything.
        let (_, entries) = CacheFile::open(&path, BS, 8, false).unwrap();
        assert_eq!(entries.len(), 2);
    }

    #[test]
    fn old_format_file_is_converted_with_clean_entries() {
        let dir = tmp();
        let path = dir.path().join("cache");
        let mut header = new_header(BS, 2, page_size());
        header[4..8].copy_from_slice(&32u32.to_ne_bytes());
        header[24..28].copy_from_slice(&0u32.to_ne_bytes());
        let mut bytes = header[..32].to_vec();
        let mut e = [0u8; 20];
        e[..4].copy_from_slice(&5u32.to_ne_bytes());
        e[4..].copy_from_slice(&[0x11; 16]);
        bytes.extend_from_slice(&[0u8; 20]);
        bytes.extend_from_slice(&e);
        let start = data_start(32, 20, 2, page_size()) as usize;
        bytes.resize(start + BS as usize, 0);
        bytes.extend_from_slice(&[0x55; BS as usize]);
        std::fs::write(&path, &bytes).unwrap();
        let (cache, entries) = CacheFile::open(&path, BS, 2, false).unwrap();
        let expected = DirEntry {
            block: BlockId(5),
            etag: [0x11; 16],
            dirty: false,
        };
        assert_eq!(entries, vec![(0, expected)]);
        let mut buf = vec![0u8; BS as usize];
        cache.read_slot(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0x55));
        assert_eq!(read_mount_token(&path).unwrap(), Some(0), "now new format");
    }

    fn open_err(path: &Path, block_size: u32) -> String {
        match CacheFile::open(path, block_size, 4, false) {
            Ok(_) => panic!("opened a bad cache file"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_block_found_twice_keeps_the_dirty_copy_and_empties_the_other_on_disk() {
        let dir = tmp();
        let path = dir.path().join("cache");
        let (cache, _) = CacheFile::open(&path, BS, 4, false).unwrap();
        cache.store(1, entry(7, false), &[1; BS as usize]).unwrap();
        cache.store(3, entry(7, true), &[2; BS as usize]).unwrap();
        drop(cache);
        let (cache, entries) = CacheFile::open(&path, BS, 4, false).unwrap();
        assert_eq!(entries, vec![(3, entry(7, true))]);
        drop(cache);
        let (_, entries) = CacheFile::open(&path, BS, 4, false).unwrap();
        assert_eq!(
            entries,
            vec![(3, entry(7, true))],
            "the clean copy is gone from disk"
        );
    }

    #[test]
    fn mismatched_or_damaged_files_are_refused() {
        let dir = tmp();
        let path = dir.path().join("cache");
        let (cache, _) = CacheFile::open(&path, BS, 4, false).unwrap();
        cache.store(3, entry(1, false), &[1; BS as usize]).unwrap();
        cache.write_entry(1, Some(entry(1, false))).unwrap();
        drop(cache);
        let good = std::fs::read(&path).unwrap();

        let msg = open_err(&path, 1024);
        assert!(
            msg.starts_with(&format!("invalid cache file \"{}\"", path.display())),
            "{msg}"
        );
        assert!(msg.contains("block size is 512"), "{msg}");

        let mut bad = good.clone();
        bad[0] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(open_err(&path, BS).contains("signature"));

        let mut bad = good.clone();
        bad[24] = 0;
        std::fs::write(&path, &bad).unwrap();
        assert!(open_err(&path, BS).contains("does not match flags"));

        // A slot that lies past the end of the file.
        let mut bad = good.clone();
        bad[64 + 24..64 + 48].fill(0);
        bad.truncate(bad.len() - 1);
        std::fs::write(&path, &bad).unwrap();
        assert!(open_err(&path, BS).contains("truncated"));

        std::fs::write(&path, &good[..100]).unwrap();
        assert!(open_err(&path, BS).contains("truncated"));
        std::fs::write(&path, &good[..10]).unwrap();
        assert!(open_err(&path, BS).contains("truncated"));
    }

    #[test]
    fn mount_token_helpers_handle_missing_files() {
        let dir = tmp();
        let path = dir.path().join("cache");
        assert_eq!(read_mount_token(&path).unwrap(), None);
        clear_mount_token(&path).unwrap();
        assert!(!path.exists());
        let (cache, _) = CacheFile::open(&path, BS, 1, false).unwrap();
        cache.set_mount_token(42).unwrap();
        assert_eq!(read_mount_token(&path).unwrap(), Some(42));
        clear_mount_token(&path).unwrap();
        assert_eq!(cache.mount_token().unwrap(), 0);
    }
}
