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
    server.args(extra)
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

    // The mirror may still hold a snapshot taken while the fsync was uploading.
    let text = wait_for(
        "mirror with all four uploads",
        || read_file(&mirror),
        |t| value(t, "md5_cache_current_size") == Some("4 blocks"),
    );
    assert_eq!(
        names(&text),
        names(&mount.stats()),
        "same lines as the stats file"
    );
    assert_ne!(value(&text, "http_puts"), Some("0"));
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

/// One HTTP/1.0 GET to the metrics listener; the body.
fn scrape(addr: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(stream, "GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200").then(|| body.to_string())
}

fn metric(body: &str, name: &str) -> Option<u64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn prometheus_listener_serves_the_counters_of_a_live_mount() {
    let server = S3Server::start(&[BUCKET]);
    let args = s3_args(
        &server,
        &[
            "--size=16m",
            "--blockSize=64k",
            "--prometheusListen=127.0.0.1:0",
        ],
    );
    let mount = FuseMount::start(&ours(), &args, BUCKET);
    // Port 0 lets the system choose; the log line tells which.
    let log = wait_for(
        "metrics log line",
        || Some(mount.stderr()),
        |t| t.contains("/metrics"),
    );
    let addr = log
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("address in the log line")
        .to_string();
    let before = scrape(&addr).expect("scrape");
    let puts_before = metric(&before, "s3backer_http_puts_total").expect(&before);
    assert!(
        before.contains("# TYPE s3backer_block_cache_current_size gauge"),
        "{before}"
    );

    let data = vec![0x5Au8; 300_000];
    write_and_fsync(&mount.file(), &data).unwrap();
    let after = scrape(&addr).expect("scrape");
    let puts_after = metric(&after, "s3backer_http_puts_total").expect(&after);
    assert!(
        puts_after >= puts_before + 5,
        "{puts_before} -> {puts_after}"
    );
    // The same figure as the stats file (nothing is written between the two reads).
    let stats = mount.stats();
    assert_eq!(
        value(&stats, "http_puts"),
        Some(puts_after.to_string().as_str())
    );

    let done = mount.unmount();
    assert!(done.status.success(), "{}", done.stderr);
    assert!(scrape(&addr).is_none(), "listener closed at unmount");
}

#[test]
fn ext4_over_the_md5_cache_with_a_min_write_delay_survives_remount() {
    use common::mount::{verify_ext4_disk, write_ext4_disk};
    let server = S3Server::start(&[BUCKET]);
    let flags = [
        "--blockSize=64k",
        "--md5CacheSize=4096",
        "--minWriteDelay=20",
        "--blockCacheWriteDelay=0",
    ];
    let first = s3_args(&server, &[&["--size=256m"][..], &flags].concat());
    let tree = write_ext4_disk(&ours(), &first, BUCKET, 11, 30);
    verify_ext4_disk(&ours(), &s3_args(&server, &flags), BUCKET, &tree);
}

#[test]
fn a_taken_metrics_port_refuses_the_mount_and_gives_the_bucket_back() {
    let server = S3Server::start(&[BUCKET]);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = format!("--prometheusListen={}", taken.local_addr().unwrap());
    let args = s3_args(&server, &["--size=16m", &listen]);
    let finished = FuseMount::try_start(&ours(), &args, BUCKET)
        .map(|_| ())
        .unwrap_err();
    assert!(!finished.status.success());
    assert!(
        finished.stderr.contains("can't listen"),
        "{}",
        finished.stderr
    );
    let mount = FuseMount::start(&ours(), &s3_args(&server, &["--size=16m"]), BUCKET);
    assert!(mount.unmount().status.success());
}
