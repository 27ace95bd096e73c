//! End-to-end: the real binary mounted with FUSE over the real S3 test server (and over a
//! directory store), ext4 on a loop device on top, data verified after a full remount.

mod common;

use std::process::Command;

use common::S3Server;
use common::mount::{
    FuseMount, LoopMount, assert_fsck_clean, mkfs_ext4, ours, verify_ext4_disk, write_ext4_disk,
};

const BUCKET: &str = "e2e";

fn s3_args(server: &S3Server, extra: &[&str]) -> Vec<String> {
    server.args(extra)
}

/// mkfs + tree on first mount; remount; verify checksums and fsck. Returns the tree size.
fn ext4_round_trip(first: &[String], second: &[String], bucket: &str) -> usize {
    let tree = write_ext4_disk(&ours(), first, bucket, 7, 40);
    verify_ext4_disk(&ours(), second, bucket, &tree);
    tree.len()
}

#[test]
fn ext4_on_s3_survives_remount() {
    let server = S3Server::start(&[BUCKET]);
    let first = s3_args(&server, &["--size=256m", "--listBlocks"]);
    // The second mount auto-detects the size from block 0.
    let second = s3_args(&server, &["--listBlocks"]);
    let files = ext4_round_trip(&first, &second, BUCKET);
    let objects = std::fs::read_dir(server.bucket_dir(BUCKET))
        .unwrap()
        .count();
    println!("verified {files} files; {objects} objects in the bucket");
    assert!(objects > 10);
}

/// A cache of 8 blocks (512 KiB) with a 5 ms write delay under a tree of tens of MiB: eviction,
/// backpressure and write-back run all the time, and nothing is lost.
#[test]
fn ext4_over_a_tiny_cache_survives_writing_far_more_than_the_cache() {
    let server = S3Server::start(&[BUCKET]);
    let cache = [
        "--blockSize=64k",
        "--blockCacheSize=8",
        "--blockCacheWriteDelay=5",
        "--blockCacheThreads=4",
        "--blockCacheMaxDirty=4",
    ];
    let mut first = cache.to_vec();
    first.push("--size=128m");
    let files = ext4_round_trip(&s3_args(&server, &first), &s3_args(&server, &cache), BUCKET);
    let objects = std::fs::read_dir(server.bucket_dir(BUCKET))
        .unwrap()
        .count();
    println!("tiny cache: {files} files verified; {objects} objects (x 64 KiB) in the bucket");
    assert!(objects > 10 * 8, "wrote far more than the cache holds");
}

#[test]
fn ext4_on_s3_with_compression_and_encryption() {
    let server = S3Server::start(&[BUCKET]);
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "correct horse\n").unwrap();
    let pw_flag = format!("--passwordFile={}", pw.display());
    let first = s3_args(
        &server,
        &["--size=128m", "--blockSize=16k", "--encrypt", &pw_flag],
    );
    let second = s3_args(&server, &["--encrypt", &pw_flag, "--compress=zstd"]);
    ext4_round_trip(&first, &second, BUCKET);
}

#[test]
fn ext4_on_directory_store_survives_remount() {
    let store = tempfile::tempdir().unwrap();
    let args = vec!["--test".to_string(), "--size=128m".to_string()];
    let dir = store.path().to_str().unwrap().to_string();
    ext4_round_trip(&args, &args, &dir);
    // Test mode stores raw blocks as files named by block number.
    let names: Vec<String> = std::fs::read_dir(store.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.is_empty());
    assert!(
        names
            .iter()
            .all(|n| n.len() == 8 && u32::from_str_radix(n, 16).is_ok()),
        "{names:?}"
    );
}

#[test]
fn second_mount_is_refused_until_forced_or_reset() {
    let server = S3Server::start(&[BUCKET]);
    let args = s3_args(&server, &["--size=16m"]);
    let token = server.bucket_dir(BUCKET).join("s3backer-mounted");
    let assert_refused = || {
        let refused = FuseMount::try_start(&ours(), &args, BUCKET)
            .err()
            .expect("a second mount must be refused");
        assert_eq!(refused.status.code(), Some(1));
        assert!(
            refused.stderr.contains("appears to be already mounted"),
            "{}",
            refused.stderr
        );
        assert!(
            refused.stderr.contains("--reset-mounted-flag"),
            "{}",
            refused.stderr
        );
    };

    let first = FuseMount::start(&ours(), &args, BUCKET);
    assert!(token.exists());
    assert_refused();

    // A crashed process leaves its token behind; the next mount is refused until reset.
    first.crash();
    assert!(token.exists());
    assert_refused();
    let out = Command::new(ours())
        .args(s3_args(&server, &["--reset-mounted-flag"]))
        .arg(BUCKET)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("resetting mount token"), "{stderr}");
    assert!(!token.exists());

    // Or the stale token is overridden with --force; the forced mount then owns it.
    FuseMount::start(&ours(), &args, BUCKET).crash();
    assert_refused();
    let mut forced_args = args.clone();
    forced_args.push("--force".to_string());
    let forced = FuseMount::start(&ours(), &forced_args, BUCKET);
    assert!(forced.stderr().contains("--force"), "{}", forced.stderr());
    assert!(forced.unmount().status.success());
    assert!(!token.exists(), "a clean unmount deletes the token");
}

#[test]
fn wrong_credentials_fail_with_a_clear_error() {
    let server = S3Server::start(&[BUCKET]);
    let args = vec![
        format!("--baseURL={}", server.base_url()),
        "--accessId=testkey".to_string(),
        "--accessKey=wrongsecret".to_string(),
        "--maxRetryPause=1000".to_string(),
        "--size=16m".to_string(),
    ];
    let failed = FuseMount::try_start(&ours(), &args, BUCKET)
        .err()
        .expect("mount must fail");
    assert_eq!(failed.status.code(), Some(1));
    let err = failed.stderr.to_lowercase();
    assert!(
        err.contains("denied") || err.contains("forbidden"),
        "{}",
        failed.stderr
    );
}

#[test]
fn fstrim_deletes_objects_of_freed_blocks() {
    let server = S3Server::start(&[BUCKET]);
    let args = s3_args(&server, &["--size=64m", "--blockSize=64k"]);
    let mount = FuseMount::start(&ours(), &args, BUCKET);
    mkfs_ext4(&mount.file());
    let count = || {
        std::fs::read_dir(server.bucket_dir(BUCKET))
            .unwrap()
            .count()
    };
    {
        let ext4 = LoopMount::new(&mount.file(), "discard");
        // fsync of the FUSE file is the barrier: everything written before is in the bucket.
        let barrier = || {
            std::fs::File::open(mount.file())
                .unwrap()
                .sync_all()
                .unwrap()
        };
        std::fs::write(
            ext4.dir.join("big"),
            common::mount::pseudo_random(1, 8 << 20),
        )
        .unwrap();
        common::mount::run(&mut Command::new("sync"));
        barrier();
        let with_file = count();
        std::fs::remove_file(ext4.dir.join("big")).unwrap();
        // ext4 frees the file's blocks at its next journal commit; only then can they be trimmed.
        common::mount::run(&mut Command::new("sync"));
        common::mount::run(Command::new("fstrim").arg(&ext4.dir));
        barrier();
        let after = count();
        println!("objects with an 8 MiB file: {with_file}, after rm + fstrim: {after}");
        assert!(with_file >= after + 100, "{with_file} -> {after}");
    }
    assert_fsck_clean(&mount.file());
    assert!(mount.unmount().status.success());
}

#[test]
fn erase_asks_first_then_deletes_every_block_and_the_token() {
    let server = S3Server::start(&[BUCKET]);
    let mount = FuseMount::start(
        &ours(),
        &s3_args(&server, &["--size=8m", "--blockSize=64k"]),
        BUCKET,
    );
    common::mount::write_and_fsync(&mount.file(), &common::mount::pseudo_random(5, 1 << 20))
        .unwrap();
    // fsync was a barrier: after SIGKILL the 16 blocks and the token are in the bucket.
    mount.crash();
    let bucket = server.bucket_dir(BUCKET);
    let stored = std::fs::read_dir(&bucket).unwrap().count();
    assert_eq!(stored, 17, "16 blocks of 64 KiB and the mount token");

    let erase = |extra: &[&str], answer: &str| {
        let mut child = Command::new(ours())
            .args(s3_args(&server, &[&["--erase"], extra].concat()))
            .arg(BUCKET)
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(answer.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (status, stderr) = erase(&[], "n\n");
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is this correct? [y/N]") && stderr.contains("not confirmed"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_dir(&bucket).unwrap().count(),
        stored,
        "nothing erased"
    );

    let (status, stderr) = erase(&[], "yes\n");
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("non-zero blocks"), "{stderr}");
    assert_eq!(
        std::fs::read_dir(&bucket).unwrap().count(),
        0,
        "blocks and token gone"
    );
}
