//! The `--blockCacheFile` loader: any file content opens as a cache or fails with a clean error;
//! a file that opens lists only slots inside the requested capacity.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use std::time::Duration;

use s3backer::backend::memory::MemoryBackend;
use s3backer::geometry::{BlockId, Geometry};
use s3backer::layer::block_cache::cache_file::{self, CacheFile};
use s3backer::layer::block_cache::{BlockCache, BlockCacheOptions, CacheFileOptions};
use s3backer::store::BlockStore;

const BLOCK_SIZES: [u32; 2] = [512, 4096];

#[derive(Arbitrary, Debug)]
struct Input {
    block_size: bool,
    /// Capacity asked for; unequal to the file's makes `open` rewrite the file.
    max_blocks: u8,
    /// Replace the first 32 header bytes with a valid header (keeping the file's max_blocks
    /// and mount token), so the fuzzer spends its time on the directory and the resize.
    valid_header: Option<bool>,
    /// Sparse zeroes appended, in pages: slots past the end of a small input exist then.
    extend_pages: u8,
    /// Open the file through the block cache instead (recover dirty, no verify): what a mount does.
    through_cache: Option<(bool, bool)>,
    bytes: Vec<u8>,
}

/// Disk of the block-cache path: small, so entries past its end occur.
const DISK_BLOCKS: u32 = 8;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("s3backer-fuzz-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        dir
    })
}

fn header(block_size: u32, old_format: bool) -> Vec<u8> {
    let (header_size, flags) = if old_format { (32u32, 0u32) } else { (64, 1) };
    [0xe496_f17bu32, header_size, 4, 4, block_size, 4096, flags]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect()
}

fuzz_target!(|input: Input| {
    let block_size = BLOCK_SIZES[usize::from(input.block_size)];
    let mut bytes = input.bytes;
    if let Some(old_format) = input.valid_header {
        let header = header(block_size, old_format);
        if bytes.len() < header.len() {
            bytes.resize(header.len(), 0);
        }
        bytes[..header.len()].copy_from_slice(&header);
    }
    let path = dir().join("cache");
    let _ = std::fs::remove_file(&path);
    std::fs::write(&path, &bytes).expect("write cache file");
    if input.extend_pages > 0 {
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(bytes.len() as u64 + u64::from(input.extend_pages) * 4096)
            .unwrap();
    }

    let _ = cache_file::read_mount_token(&path);
    if let Some((recover_dirty, no_verify)) = input.through_cache {
        open_through_cache(
            &path,
            block_size,
            input.max_blocks,
            recover_dirty,
            no_verify,
        );
        return;
    }
    let max_blocks = u32::from(input.max_blocks);
    if let Ok((cache, entries)) = CacheFile::open(&path, block_size, max_blocks, false) {
        assert_eq!(cache.max_blocks(), max_blocks);
        let mut buf = vec![0u8; block_size as usize];
        for (slot, _) in &entries {
            assert!(*slot < max_blocks);
            cache
                .read_slot(*slot, &mut buf)
                .expect("listed slot is readable");
        }
        // A file that opened opens again, with the same entries.
        drop(cache);
        let (_, again) = CacheFile::open(&path, block_size, max_blocks, false).expect("reopen");
        assert_eq!(again, entries);
    }
});

fn open_through_cache(
    path: &std::path::Path,
    block_size: u32,
    size: u8,
    recover_dirty: bool,
    no_verify: bool,
) {
    let geometry = Geometry::new(u64::from(block_size * DISK_BLOCKS), block_size).unwrap();
    let backend = Arc::new(MemoryBackend::new(geometry));
    let options = BlockCacheOptions {
        size: usize::from(size),
        threads: 1,
        write_delay: Duration::ZERO,
        read_ahead: 0,
        file: Some(CacheFileOptions {
            path: path.to_path_buf(),
            no_verify,
            recover_dirty,
            advise: false,
            mount_token: 1,
        }),
        ..BlockCacheOptions::default()
    };
    let Ok(cache) = BlockCache::open(backend.clone(), options) else {
        return;
    };
    let mut seen = vec![0u8; (block_size * DISK_BLOCKS) as usize];
    for (block, buf) in (0..).zip(seen.chunks_mut(block_size as usize)) {
        cache.read_block(BlockId(block), buf).expect("read");
    }
    cache.shutdown().expect("shutdown uploads recovered blocks");
    // Unless clean entries are trusted unchecked, what the cache served reached the backend.
    let mut stored = vec![0u8; block_size as usize];
    for (block, buf) in (0..).zip(seen.chunks(block_size as usize)) {
        backend.read_block(BlockId(block), &mut stored).unwrap();
        assert!(
            no_verify || buf == stored,
            "block {block} differs from the backend"
        );
    }
}
