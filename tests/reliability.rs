//! Reliability: `kill -9` of s3backer at seeded random points of a write workload never loses a
//! write that `fsync` acknowledged, with and without `--blockCacheFile`.
//!
//! `S3B_CRASH_ITERATIONS=N` runs N iterations instead of 20 (a longer soak).

mod common;

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::S3Server;
use common::mount::{FuseMount, LoopMount, mkfs_ext4, ours, pseudo_random};
use parking_lot::Mutex;

const BUCKET: &str = "crash";
const BLOCK: usize = 64 * 1024;
const BLOCKS: usize = 64;

/// Small deterministic generator: tests need reproducible "random" points from a seed.
struct Seeded(u64);

impl Seeded {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn iterations() -> usize {
    std::env::var("S3B_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

fn mount_args(server: &S3Server, cache: Option<&Path>) -> Vec<String> {
    let mut args = vec![
        format!("--baseURL={}", server.base_url()),
        "--accessId=testkey".to_string(),
        "--accessKey=testsecret".to_string(),
        "--timeout=5".to_string(),
        "--maxRetryPause=2000".to_string(),
        format!("--size={}", BLOCK * BLOCKS),
        format!("--blockSize={BLOCK}"),
        // The previous iteration was killed: its token is still there.
        "--force".to_string(),
    ];
    if let Some(cache) = cache {
        args.push(format!("--blockCacheFile={}", cache.display()));
        args.push("--blockCacheRecoverDirtyBlocks".to_string());
    }
    args
}

/// The content id of a block: what generated its bytes (0 = never written, all zeros).
fn block_data(id: u64) -> Vec<u8> {
    if id == 0 {
        vec![0; BLOCK]
    } else {
        pseudo_random(id, BLOCK)
    }
}

/// What the disk must hold: per block, the content acknowledged by the last fsync, and the
/// contents written since (any of which may or may not have reached the store).
#[derive(Default)]
struct Model {
    acked: HashMap<usize, u64>,
    since_ack: HashMap<usize, Vec<u64>>,
    acks: usize,
}

impl Model {
    fn write(&mut self, block: usize, id: u64) {
        self.since_ack.entry(block).or_default().push(id);
    }

    fn ack(&mut self) {
        for (block, ids) in self.since_ack.drain() {
            self.acked.insert(block, *ids.last().unwrap());
        }
        self.acks += 1;
    }

    /// Checks every block of the file against the model; afterwards the found contents are the
    /// acknowledged state. Returns how many blocks had to hold one exact acknowledged content.
    fn verify(&mut self, file: &Path) -> usize {
        let f = std::fs::File::open(file).unwrap();
        let mut exact = 0;
        let mut buf = vec![0u8; BLOCK];
        for block in 0..BLOCKS {
            let acked = self.acked.get(&block).copied().unwrap_or(0);
            let later = self.since_ack.get(&block).cloned().unwrap_or_default();
            let candidates: Vec<u64> = std::iter::once(acked)
                .chain(later.iter().copied())
                .collect();
            f.read_exact_at(&mut buf, (block * BLOCK) as u64)
                .unwrap_or_else(|e| panic!("read block {block}: {e}"));
            if later.is_empty() {
                exact += 1;
            }
            match candidates.iter().find(|&&id| block_data(id) == buf) {
                Some(&id) => {
                    self.acked.insert(block, id);
                }
                None => panic!(
                    "block {block} lost its fsync-acknowledged content {acked} (later writes: {later:?})"
                ),
            }
        }
        self.since_ack.clear();
        exact
    }
}

/// Writes seeded whole-block runs at seeded offsets, fsyncing every few writes and recording
/// each acknowledgement, until the process dies under it or `stop` is set.
fn workload(file: &Path, seed: u64, model: &Mutex<Model>, stop: &AtomicBool) {
    let Ok(f) = OpenOptions::new().write(true).open(file) else {
        return;
    };
    let mut rng = Seeded(seed | 1);
    for write in 0..2000u64 {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let first = rng.below(BLOCKS as u64) as usize;
        let count = (1 + rng.below(4) as usize).min(BLOCKS - first);
        let ids: Vec<u64> = (0..count)
            .map(|i| (seed << 24) | (write << 4) | i as u64)
            .collect();
        for (i, &id) in ids.iter().enumerate() {
            model.lock().write(first + i, id);
        }
        let data: Vec<u8> = ids.iter().flat_map(|&id| block_data(id)).collect();
        if f.write_all_at(&data, (first * BLOCK) as u64).is_err() {
            return;
        }
        if rng.below(3) == 0 {
            // The model lock is held across the fsync: a write recorded after it started is
            // not covered by this acknowledgement.
            let mut m = model.lock();
            if f.sync_all().is_err() {
                return;
            }
            m.ack();
        }
    }
}

/// Runs `Model::verify`; on failure shows what the mount and the server said.
fn verify_or_explain(
    model: &Mutex<Model>,
    mount: &FuseMount,
    server: &S3Server,
    iteration: usize,
) -> usize {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        model.lock().verify(&mount.file())
    }));
    result.unwrap_or_else(|_| {
        panic!(
            "iteration {iteration}: verification failed; s3backer said:\n{}\nserver log:\n{}",
            mount.stderr(),
            std::fs::read_to_string(server.log_path()).unwrap_or_default()
        )
    })
}

fn crash_iterations(with_cache_file: bool, seed: u64) {
    let server = S3Server::start(&[BUCKET]);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = cache_dir.path().join("cache");
    let args = mount_args(&server, with_cache_file.then_some(cache.as_path()));
    let model = Arc::new(Mutex::new(Model::default()));
    let mut rng = Seeded(seed);
    let (mut checked, mut exact_total, mut torn_total) = (0, 0, 0);
    let n = iterations();
    for iteration in 0..n {
        let mount = FuseMount::start(&ours(), &args, BUCKET);
        exact_total += verify_or_explain(&model, &mount, &server, iteration);
        checked += BLOCKS;
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (file, model, stop) = (mount.file(), model.clone(), stop.clone());
            let seed = seed * 1000 + iteration as u64 + 1;
            std::thread::spawn(move || workload(&file, seed, &model, &stop))
        };
        std::thread::sleep(Duration::from_millis(100 + rng.below(1500)));
        mount.crash();
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        torn_total += server.complete_torn_puts(BUCKET);
    }
    let mount = FuseMount::start(&ours(), &args, BUCKET);
    exact_total += verify_or_explain(&model, &mount, &server, n);
    checked += BLOCKS;
    let acks = model.lock().acks;
    let done = mount.unmount();
    assert!(done.status.success(), "{}", done.stderr);
    println!(
        "kill -9 ({}): {n} iterations, {acks} fsync acknowledgements, {checked} blocks checked \
         ({exact_total} held exactly their acknowledged content), none lost; \
         {torn_total} PUTs torn by s3s-fs on kill completed",
        if with_cache_file {
            "with --blockCacheFile"
        } else {
            "no cache file"
        }
    );
    assert!(
        acks > n,
        "the workload acknowledged too little to prove anything"
    );
}

#[test]
fn kill_9_never_loses_fsynced_writes() {
    crash_iterations(false, 0x5eed_0001);
}

#[test]
fn kill_9_never_loses_fsynced_writes_with_cache_file() {
    crash_iterations(true, 0x5eed_0002);
}

/// ext4 on the FUSE file: files written and fsynced before `kill -9` are intact after remount
/// (once the journal is replayed by a read-write mount).
#[test]
fn kill_9_under_ext4_keeps_fsynced_files() {
    ext4_crash_rounds(None);
}

/// The same with `--blockCacheFile`: an fsync is satisfied by the cache file, and the next
/// mount (`--blockCacheRecoverDirtyBlocks`) uploads what the killed one had acknowledged.
#[test]
fn kill_9_under_ext4_keeps_fsynced_files_with_cache_file() {
    let dir = tempfile::tempdir().unwrap();
    ext4_crash_rounds(Some(&dir.path().join("cache")));
}

fn ext4_crash_rounds(cache: Option<&Path>) {
    let server = S3Server::start(&[BUCKET]);
    let mut args: Vec<String> = [
        format!("--baseURL={}", server.base_url()),
        "--accessId=testkey".into(),
        "--accessKey=testsecret".into(),
        "--timeout=5".into(),
        "--maxRetryPause=2000".into(),
        "--size=64m".into(),
        "--blockSize=64k".into(),
        "--force".into(),
    ]
    .into();
    if let Some(cache) = cache {
        args.push(format!("--blockCacheFile={}", cache.display()));
        args.push("--blockCacheRecoverDirtyBlocks".into());
    }
    let mut expected: HashMap<String, Vec<u8>> = HashMap::new();
    let mut rng = Seeded(0x5eed_0003);
    let rounds = iterations().div_ceil(4);
    let mount = FuseMount::start(&ours(), &args, BUCKET);
    mkfs_ext4(&mount.file());
    let mut mount = Some(mount);
    let (mut files_checked, mut torn) = (0, 0);
    for round in 0..rounds {
        let fuse = mount.take().unwrap();
        let ext4 = LoopMount::new(&fuse.file(), "rw");
        for (name, data) in &expected {
            assert!(
                std::fs::read(ext4.dir.join(name)).ok().as_ref() == Some(data),
                "round {round}: fsynced file {name} lost or changed"
            );
            files_checked += 1;
        }
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (dir, acked, stop) = (ext4.dir.clone(), acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let start = Instant::now();
                for i in 0..200u64 {
                    if stop.load(Ordering::Relaxed) || start.elapsed() > Duration::from_secs(30) {
                        return;
                    }
                    let name = format!("r{round}-f{i}");
                    let data = pseudo_random(((round as u64) << 16) | i, 20_000 + i as usize * 997);
                    let ok = std::fs::File::create(dir.join(&name))
                        .and_then(|mut f| {
                            std::io::Write::write_all(&mut f, &data)?;
                            f.sync_all()
                        })
                        .is_ok();
                    if !ok {
                        return;
                    }
                    acked.lock().push((name, data));
                }
            })
        };
        std::thread::sleep(Duration::from_millis(300 + rng.below(1500)));
        fuse.crash();
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        // The dead disk under ext4: unmount it lazily (LoopMount's drop) before remounting.
        drop(ext4);
        torn += server.complete_torn_puts(BUCKET);
        expected.extend(acked.lock().drain(..));
        mount = Some(FuseMount::start(&ours(), &args, BUCKET));
    }
    let fuse = mount.take().unwrap();
    {
        let ext4 = LoopMount::new(&fuse.file(), "rw");
        for (name, data) in &expected {
            assert!(
                std::fs::read(ext4.dir.join(name)).ok().as_ref() == Some(data),
                "fsynced file {name} lost or changed"
            );
            files_checked += 1;
        }
    }
    common::mount::assert_fsck_clean(&fuse.file());
    let done = fuse.unmount();
    assert!(done.status.success(), "{}", done.stderr);
    println!(
        "kill -9 under ext4{}: {rounds} rounds, {} fsynced files, {files_checked} file checks, none lost, e2fsck clean; \
         {torn} PUTs torn by s3s-fs on kill completed",
        if cache.is_some() {
            " with --blockCacheFile"
        } else {
            ""
        },
        expected.len()
    );
}
