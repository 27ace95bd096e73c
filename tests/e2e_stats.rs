//! End-to-end: the counters outside the FUSE stats file (`--statsFileMirror`, the Prometheus
//! listener) and the MD5 cache of a real mount over the real S3 test server.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use common::S3Server;
use common::mount::{FuseMount, ours, read_prefix, write_and_fsync};

const BUCKET: &str = "stats";

fn s3_args(server: &S3Server, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        format!("--baseURL={}", server.base_url()),
        "--accessId=testkey".to_string(),
        "--accessKey=testsecret".to_string(),
        "--timeout=10".to_string(),
        "--maxRetryPause=5000".to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The value of one `name value` line.
fn value<'a>(stats: &'a str, name: &str) -> Option<&'a str> {
    stats
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ').map(str::trim))
}

fn names(stats: &str) -> Vec<&str> {
    stats
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect()
}

/// Polls `read` (bounded: 30 s) until `ok` holds for what it returns.
fn wait_for(what: &str, read: impl Fn() -> Option<String>, ok: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < Duration::from_secs(30) {
        last = read();
        if let Some(text) = &last
            && ok(text)
        {
            return text.clone();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "{what} never came; last seen:\n{}",
        last.unwrap_or_default()
    );
}

fn read_file(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

#[test]
fn stats_file_mirror_follows_the_stats_file_and_its_deletion_resets_counters() {
    let server = S3Server::start(&[BUCKET]);
    let dir = tempfile::tempdir().unwrap();
    let mirror = dir.path().join("mirror");
    let mirror_flag = format!("--statsFileMirror={}", mirror.display());
    let args = s3_args(
        &server,
        &[
            "--size=16m",
            "--blockSize=64k",
            "--md5CacheSize=256",
            &mirror_flag,
            "--statsFileMirrorInterval=50",
        ],
    );
    let mount = FuseMount::start(&ours(), &args, BUCKET);
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8 | 1).collect();
    write_and_fsync(&mount.file(), &data).unwrap();
    assert_eq!(read_prefix(&mount.file(), data.len()), data);

    let text = wait_for(
        "mirror with the uploads",
        || read_file(&mirror),
        |t| value(t, "http_puts").is_some_and(|v| v != "0"),
    );
    assert_eq!(
        names(&text),
        names(&mount.stats()),
        "same lines as the stats file"
    );
    assert_eq!(value(&text, "md5_cache_current_size"), Some("4 blocks"));
    let mode = std::fs::metadata(&mirror).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    std::fs::remove_file(&mirror).unwrap();
    let text = wait_for(
        "mirror rewritten after deletion",
        || read_file(&mirror),
        |_| true,
    );
    assert_eq!(
        value(&text, "http_puts"),
        Some("0"),
        "counters reset:\n{text}"
    );
    assert_eq!(value(mount.stats().as_str(), "http_puts"), Some("0"));

    let done = mount.unmount();
    assert!(done.status.success(), "{}", done.stderr);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["mirror"], "no temp files left behind");
}

#[test]
fn md5_cache_smaller_than_the_disk_with_infinite_time_is_refused() {
    let server = S3Server::start(&[BUCKET]);
    let args = s3_args(
        &server,
        &["--size=16m", "--blockSize=64k", "--md5CacheSize=255"],
    );
    let finished = FuseMount::try_start(&ours(), &args, BUCKET)
        .map(|_| ())
        .unwrap_err();
    assert!(!finished.status.success());
    assert!(
        finished.stderr.contains("eventual deadlock"),
        "{}",
        finished.stderr
    );
    // The refused mount gave the bucket back: a correct one mounts without --force.
    let args = s3_args(
        &server,
        &[
            "--size=16m",
            "--blockSize=64k",
            "--md5CacheSize=16",
            "--md5CacheTime=1000",
        ],
    );
    let mount = FuseMount::start(&ours(), &args, BUCKET);
    assert!(mount.unmount().status.success());
}
