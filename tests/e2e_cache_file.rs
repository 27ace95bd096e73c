//! End-to-end: `--blockCacheFile` keeps what an fsync acknowledged across `kill -9`, and a
//! mount with `--blockCacheRecoverDirtyBlocks` uploads it; the entries of an earlier mount are
//! checked against the bucket by ETag before they are served.

mod common;

use common::S3Server;
use common::moto::Moto;
use common::mount::{FuseMount, ours, pseudo_random, read_prefix, stat, write_and_fsync};

const BUCKET: &str = "cachefile";

fn args(server: &S3Server, cache: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let cache_flag = format!("--blockCacheFile={}", cache.display());
    let mut args = server.args(&["--size=8m", "--blockSize=64k", &cache_flag]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn fsynced_data_survives_kill_9_in_the_cache_file_and_is_recovered() {
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = cache_dir.path().join("cache");
    let data = pseudo_random(11, 1 << 20);

    let mut lost_server = S3Server::start(&[BUCKET]);
    let mount = FuseMount::start(&ours(), &args(&lost_server, &cache, &[]), BUCKET);
    // The store goes away: nothing written from now on can be uploaded.
    lost_server.stop();
    write_and_fsync(&mount.file(), &data)
        .expect("fsync is satisfied by the cache file while the store is down");
    mount.crash();

    // A new, empty bucket: the data can only come from the cache file.
    let server = S3Server::start(&[BUCKET]);
    let recover = args(
        &server,
        &cache,
        &["--blockCacheRecoverDirtyBlocks", "--force"],
    );
    let mount = FuseMount::start(&ours(), &recover, BUCKET);
    let read_back = read_prefix(&mount.file(), data.len());
    assert!(read_back == data, "recovered data differs");
    let finished = mount.unmount();
    assert!(finished.status.success(), "{}", finished.stderr);
    assert!(
        finished.stderr.contains("recovering 16 dirty blocks"),
        "{}",
        finished.stderr
    );
    // 16 blocks of 64 KiB uploaded; the token was removed by the clean unmount.
    let stored = std::fs::read_dir(server.bucket_dir(BUCKET))
        .unwrap()
        .count();
    assert_eq!(stored, 16);
}

#[test]
fn recover_dirty_blocks_resumes_our_own_crashed_mount_without_force() {
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = cache_dir.path().join("cache");
    let data = pseudo_random(12, 1 << 20);
    let server = S3Server::start(&[BUCKET]);
    let mount = FuseMount::start(&ours(), &args(&server, &cache, &[]), BUCKET);
    write_and_fsync(&mount.file(), &data).unwrap();
    mount.crash();

    // The bucket's token is still set: a plain mount is refused.
    let refused = FuseMount::try_start(&ours(), &args(&server, &cache, &[]), BUCKET)
        .err()
        .expect("a plain mount must be refused");
    assert!(
        refused.stderr.contains("appears to be already mounted"),
        "{}",
        refused.stderr
    );
    // The token matches the cache file's: recovery needs no --force.
    let recover = args(&server, &cache, &["--blockCacheRecoverDirtyBlocks"]);
    let mount = FuseMount::start(&ours(), &recover, BUCKET);
    let read_back = read_prefix(&mount.file(), data.len());
    assert!(read_back == data, "data differs after recovery");
    let finished = mount.unmount();
    assert!(finished.status.success(), "{}", finished.stderr);
    assert!(
        finished.stderr.contains("recovering from unclean shutdown"),
        "{}",
        finished.stderr
    );
}

/// Removes every stored object, so only a cache file can still answer reads.
fn empty_bucket(server: &S3Server) {
    for entry in std::fs::read_dir(server.bucket_dir(BUCKET)).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            std::fs::remove_dir_all(path).unwrap();
        } else {
            std::fs::remove_file(path).unwrap();
        }
    }
}

fn write_then_unmount(binary: &std::path::Path, args: &[String], data: &[u8]) {
    let mount = FuseMount::start(binary, args, BUCKET);
    write_and_fsync(&mount.file(), data).unwrap();
    let finished = mount.unmount();
    assert!(finished.status.success(), "{}", finished.stderr);
}

fn read_all(binary: &std::path::Path, args: &[String], len: usize) -> Vec<u8> {
    let mount = FuseMount::start(binary, args, BUCKET);
    let back = read_prefix(&mount.file(), len);
    let finished = mount.unmount();
    assert!(finished.status.success(), "{}", finished.stderr);
    back
}

#[test]
fn a_cache_file_written_by_c_s3backer_serves_our_reads() {
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = cache_dir.path().join("cache");
    let data = pseudo_random(13, 1 << 20);
    let server = S3Server::start(&[BUCKET]);
    let plain = args(&server, &cache, &[]);
    write_then_unmount(&common::mount::c_s3backer(), &plain, &data);
    // C keeps blocks it reads in its cache file: read them once with C.
    assert!(read_all(&common::mount::c_s3backer(), &plain, data.len()) == data);
    empty_bucket(&server);
    let trusted = args(&server, &cache, &["--blockCacheNoVerify"]);
    assert!(
        read_all(&ours(), &trusted, data.len()) == data,
        "not served from C's file"
    );
}

#[test]
fn our_cache_file_serves_c_s3backer_reads() {
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = cache_dir.path().join("cache");
    let data = pseudo_random(14, 1 << 20);
    let server = S3Server::start(&[BUCKET]);
    let trusted = args(&server, &cache, &["--blockCacheNoVerify"]);
    write_then_unmount(&ours(), &trusted, &data);
    // We keep blocks read from the store (when entries are trusted): read them once.
    assert!(read_all(&ours(), &trusted, data.len()) == data);
    empty_bucket(&server);
    let c = common::mount::c_s3backer();
    assert!(
        read_all(&c, &trusted, data.len()) == data,
        "not served from our file"
    );
}

const BLOCK: usize = 64 << 10;

/// Fills a cache file (`with_file`), changes block 3 behind its back with a mount without it
/// (`without_file`), then mounts with the file again: the 15 unchanged blocks are confirmed by
/// ETag and served from the file, block 3 is read anew.
fn cache_file_is_checked_against_the_bucket(with_file: &[String], without_file: &[String]) {
    let data = pseudo_random(15, 16 * BLOCK);
    write_then_unmount(&ours(), with_file, &data);
    // Blocks uploaded before the fsync have no entry yet: a read keeps every block in the file.
    assert!(read_all(&ours(), with_file, data.len()) == data);

    let changed = pseudo_random(16, BLOCK);
    let other = FuseMount::start(&ours(), without_file, BUCKET);
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(other.file())
            .unwrap();
        file.seek(SeekFrom::Start(3 * BLOCK as u64)).unwrap();
        file.write_all(&changed).unwrap();
        file.sync_all().unwrap();
    }
    let finished = other.unmount();
    assert!(finished.status.success(), "{}", finished.stderr);

    let mut want = data;
    want[3 * BLOCK..4 * BLOCK].copy_from_slice(&changed);
    let mount = FuseMount::start(&ours(), with_file, BUCKET);
    let back = read_prefix(&mount.file(), want.len());
    let stats = mount.stats();
    let finished = mount.unmount();
    assert!(finished.status.success(), "{}", finished.stderr);
    assert!(
        back == want,
        "the changed block must be read from the bucket"
    );
    assert_eq!(stat(&stats, "block_cache_verified"), 15, "{stats}");
    assert_eq!(stat(&stats, "block_cache_mismatch"), 1, "{stats}");
    assert_eq!(stat(&stats, "http_verified"), 15, "{stats}");
    // Only the changed block was decoded from the bucket.
    assert_eq!(stat(&stats, "http_normal_blocks_read"), 1, "{stats}");
    println!(
        "cache file checked by ETag: {} blocks confirmed, {} changed and read anew",
        stat(&stats, "block_cache_verified"),
        stat(&stats, "block_cache_mismatch")
    );
}

#[test]
fn cache_file_entries_are_checked_by_etag_on_a_server_that_ignores_if_none_match() {
    // s3s-fs answers a conditional GET with 200 and the object: its ETag decides.
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = cache_dir.path().join("cache");
    let server = S3Server::start(&[BUCKET]);
    let plain = server.args(&["--size=8m", "--blockSize=64k"]);
    cache_file_is_checked_against_the_bucket(&args(&server, &cache, &[]), &plain);
}

#[test]
fn cache_file_entries_are_checked_with_if_none_match_304() {
    let cache_dir = tempfile::tempdir().unwrap();
    let cache_flag = format!(
        "--blockCacheFile={}",
        cache_dir.path().join("cache").display()
    );
    let server = Moto::start(BUCKET);
    let plain = server.args(&["--size=8m", "--blockSize=64k"]);
    let with_file = server.args(&["--size=8m", "--blockSize=64k", &cache_flag]);
    cache_file_is_checked_against_the_bucket(&with_file, &plain);
}

#[test]
fn a_cache_file_written_by_c_s3backer_is_checked_and_served_without_no_verify() {
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = cache_dir.path().join("cache");
    let data = pseudo_random(17, 16 * BLOCK);
    let server = S3Server::start(&[BUCKET]);
    let plain = args(&server, &cache, &[]);
    let c = common::mount::c_s3backer();
    write_then_unmount(&c, &plain, &data);
    assert!(read_all(&c, &plain, data.len()) == data);
    let mount = FuseMount::start(&ours(), &plain, BUCKET);
    let back = read_prefix(&mount.file(), data.len());
    let stats = mount.stats();
    let finished = mount.unmount();
    assert!(finished.status.success(), "{}", finished.stderr);
    assert!(back == data);
    // Every data block came from C's file once the bucket confirmed it. (C also keeps entries
    // for zero blocks it read ahead; the bucket has no object for them: counted as mismatches.)
    assert_eq!(stat(&stats, "block_cache_verified"), 16, "{stats}");
    assert_eq!(stat(&stats, "http_normal_blocks_read"), 0, "{stats}");
}
