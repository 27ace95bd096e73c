//! Reliability of the cache file and of FUSE itself: a full or unwritable cache file and an
//! unavailable FUSE give clear errors and lose nothing an fsync acknowledged.

mod common;

use std::process::{Command, Stdio};

use common::S3Server;
use common::mount::{
    FuseMount, UnmountOnDrop, ours, pseudo_random, read_prefix, run, write_and_fsync,
};

const BUCKET: &str = "cachefs";

fn args(server: &S3Server, extra: &[&str]) -> Vec<String> {
    // Later flags win: these shorten the fixture's retry times.
    let mut args = server.args(&[
        "--timeout=2",
        "--maxRetryPause=500",
        "--size=8m",
        "--blockSize=64k",
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// A tmpfs of `size` mounted on a fresh temp dir, unmounted on drop.
fn small_tmpfs(size: &str, options: &str) -> (tempfile::TempDir, UnmountOnDrop) {
    let dir = tempfile::tempdir().unwrap();
    run(Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size}{options}"),
            "tmpfs",
        ])
        .arg(dir.path()));
    let guard = UnmountOnDrop(dir.path().to_path_buf());
    (dir, guard)
}

/// Names of the objects in the bucket.
fn stored(server: &S3Server) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(server.bucket_dir(BUCKET))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_full_cache_file_disk_makes_fsync_wait_for_the_upload_instead() {
    let server = S3Server::start(&[BUCKET]);
    // Room for the header and a few blocks, not for the 2 MiB written below.
    let (dir, _tmpfs) = small_tmpfs("256k", "");
    let cache = dir.path().join("cache");
    let cache_flag = format!("--blockCacheFile={}", cache.display());
    let data = pseudo_random(31, 2 << 20);
    let mount = FuseMount::start(&ours(), &args(&server, &[&cache_flag]), BUCKET);
    write_and_fsync(&mount.file(), &data)
        .expect("with the cache file full, fsync is satisfied by uploading");
    let log = mount.stderr();
    let cache_name = format!("cache file \"{}\"", cache.display());
    assert!(
        log.lines()
            .any(|l| l.contains(&cache_name) && l.contains("No space left")),
        "{log}"
    );
    // Acknowledged means in the bucket: 32 blocks of 64 KiB, before any unmount.
    let blocks = stored(&server)
        .into_iter()
        .filter(|name| name != "s3backer-mounted")
        .count();
    assert_eq!(blocks, 32, "{log}");
    mount.crash();
    let mount = FuseMount::start(&ours(), &args(&server, &["--force"]), BUCKET);
    assert!(
        read_prefix(&mount.file(), data.len()) == data,
        "data differs after a crash"
    );
    let done = mount.unmount();
    assert!(done.status.success(), "{}", done.stderr);
    println!("full cache file disk: fsync fell back to uploading; 32 blocks survived kill -9");
}

#[test]
fn an_unwritable_cache_file_fails_the_mount_clearly_and_writes_nothing() {
    let server = S3Server::start(&[BUCKET]);
    let (dir, _tmpfs) = small_tmpfs("1m", ",ro");
    let cache = dir.path().join("cache");
    let cache_flag = format!("--blockCacheFile={}", cache.display());
    let failed = FuseMount::try_start(&ours(), &args(&server, &[&cache_flag]), BUCKET)
        .err()
        .expect("the mount must fail");
    assert!(!failed.status.success());
    assert!(
        failed.stderr.contains(&cache.display().to_string())
            && failed.stderr.contains("Read-only file system"),
        "{}",
        failed.stderr
    );
    assert_eq!(stored(&server), Vec::<String>::new(), "{}", failed.stderr);
}

#[test]
fn without_fuse_the_mount_fails_clearly_and_writes_nothing() {
    let server = S3Server::start(&[BUCKET]);
    let mount_point = tempfile::tempdir().unwrap();
    // A private mount namespace whose /dev has no fuse device: what a container without
    // /dev/fuse (or a host without the module) looks like to s3backer.
    let script = r#"mount --make-rprivate / && mount -t tmpfs none /dev && exec "$0" "$@""#;
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", script])
        .arg(ours())
        .args(args(&server, &["-f"]))
        .arg(BUCKET)
        .arg(mount_point.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot mount") && stderr.contains("/dev/fuse missing"),
        "{stderr}"
    );
    assert!(!stderr.contains("NOT ALL DATA WAS WRITTEN"), "{stderr}");
    assert_eq!(stored(&server), Vec::<String>::new(), "{stderr}");
}
