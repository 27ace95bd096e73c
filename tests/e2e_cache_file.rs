//! End-to-end: `--blockCacheFile` keeps what an fsync acknowledged across `kill -9`, and a
//! mount with `--blockCacheRecoverDirtyBlocks` uploads it.

mod common;

use common::S3Server;
use common::mount::{FuseMount, ours, pseudo_random, read_prefix, write_and_fsync};

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
