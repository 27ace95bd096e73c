//! Reliability against a misbehaving network: the s3proxy fault injector sits between s3backer
//! and the S3 test server. Transient faults are retried without a trace in the data; a store that
//! stays away fails the fsync (EIO) but keeps the dirty data, which is written once it is back.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::S3Server;
use common::mount::{
    FuseMount, LoopMount, assert_fsck_clean, is_mounted, mkfs_ext4, ours, pseudo_random,
    read_prefix, stat, verify_tree, write_and_fsync, write_tree,
};
use common::nbd::{NbdFuse, NbdServer};
use s3proxy::{Fault, Proxy, ProxyConfig, Rule, Stats};

const BUCKET: &str = "faults";
/// errno of an I/O error (Linux).
const EIO: i32 = 5;

fn proxy_for(server: &S3Server, seed: u64) -> Proxy {
    let mut config = ProxyConfig::new(server.endpoint().parse().unwrap());
    config.seed = seed;
    Proxy::start(config).expect("start the fault proxy")
}

/// s3backer flags pointing at the proxy; `timeout` is per attempt, `max_retry_pause_ms` the
/// total pause budget of one request's retries.
fn args(proxy: &Proxy, timeout: u32, max_retry_pause_ms: u32, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        format!("--baseURL={}", proxy.base_url()),
        format!("--accessId={}", common::ACCESS_KEY),
        format!("--accessKey={}", common::SECRET_KEY),
        format!("--timeout={timeout}"),
        "--initialRetryPause=50".to_string(),
        format!("--maxRetryPause={max_retry_pause_ms}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// About 6.5% of requests fail transiently, 14% of GETs; one fault each (the first rule that
/// fires).
fn transient_faults() -> Vec<Rule> {
    vec![
        Rule::new(Fault::Status(500)).probability(0.02),
        Rule::new(Fault::SlowDown).probability(0.02),
        Rule::new(Fault::Reset).probability(0.02),
        // Past the 1 s --timeout: the attempt times out and is retried.
        Rule::new(Fault::Stall(Duration::from_millis(1500))).probability(0.005),
        Rule::new(Fault::Truncate).method("GET").probability(0.04),
        Rule::new(Fault::Corrupt).method("GET").probability(0.04),
    ]
}

fn injected(stats: &Stats) -> String {
    let mut kinds: Vec<_> = stats.injected.iter().collect();
    kinds.sort();
    kinds
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// fio writing (or, with `verify_only`, re-reading) a crc32c-verified random-write job in `dir`.
fn fio(dir: &Path, verify_only: bool) {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=faults",
        "--rw=randwrite",
        "--bs=4k",
        "--size=8m",
        "--ioengine=psync",
        "--randseed=4242",
        "--verify=crc32c",
        "--do_verify=1",
        "--end_fsync=1",
        "--verify_state_save=0",
    ])
    .arg(format!("--directory={}", dir.display()));
    if verify_only {
        cmd.arg("--verify_only");
    }
    let out = cmd.output().expect("run fio");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("verify:"),
        "fio (verify_only={verify_only}) failed ({}):\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Puts ext4 on `image` and writes the fio job and a checksummed tree on it.
fn write_workload(image: &Path) -> BTreeMap<PathBuf, String> {
    mkfs_ext4(image);
    let ext4 = LoopMount::new(image, "discard");
    fio(&ext4.dir, false);
    write_tree(&ext4.dir, 6, 20)
}

/// Checks the fio job's crc32c and the tree's checksums on `image`.
fn verify_workload(image: &Path, tree: &BTreeMap<PathBuf, String>) {
    // rw: fio opens its files for writing even when it only verifies.
    let ext4 = LoopMount::new(image, "rw");
    fio(&ext4.dir, true);
    verify_tree(&ext4.dir, tree);
}

/// Prints the figures of a transient-fault run and checks the faults were many and varied and
/// that s3backer retried while writing and while reading.
fn report(frontend: &str, during: &Stats, retries: [u64; 2], files: usize) {
    let requests = during.requests;
    let faults = during.injected_total();
    println!(
        "transient faults over {frontend}: {requests} requests ({} GET, {} PUT, {} DELETE), \
         {faults} faults injected ({:.1}%: {}), s3backer retries {} writing + {} reading; \
         fio crc32c verify and {files} file checksums clean, e2fsck -fn clean",
        during.method("GET"),
        during.method("PUT"),
        during.method("DELETE"),
        100.0 * faults as f64 / requests as f64,
        injected(during),
        retries[0],
        retries[1],
    );
    assert!(
        faults * 100 >= requests * 5,
        "too few faults to prove anything"
    );
    for kind in ["status", "slowdown", "reset", "truncate", "corrupt"] {
        assert!(
            during.injected.get(kind).copied().unwrap_or(0) > 0,
            "no {kind} fault: {}",
            injected(during)
        );
    }
    assert!(retries[0] > 0 && retries[1] > 0, "{retries:?}");
}

/// Up to 30 s of pauses per request: a run of faults on one request is retried through.
fn transient_args(proxy: &Proxy, extra: &[&str]) -> Vec<String> {
    let mut more = vec!["--size=64m", "--blockSize=64k"];
    more.extend_from_slice(extra);
    args(proxy, 1, 30_000, &more)
}

#[test]
fn ext4_over_fuse_survives_transient_faults_with_no_verify_error() {
    let server = S3Server::start(&[BUCKET]);
    let proxy = proxy_for(&server, 6);
    proxy.set_rules(transient_faults());
    let args = transient_args(&proxy, &[]);

    let mount = FuseMount::start(&ours(), &args, BUCKET);
    let tree = write_workload(&mount.file());
    let write_retries = stat(&mount.stats(), "http_num_retries");
    let done = mount.unmount();
    assert!(
        done.status.success(),
        "writer exited badly:\n{}",
        done.stderr
    );

    // A fresh process has nothing cached: every block read below is a GET through the faults.
    let mount = FuseMount::start(&ours(), &args, BUCKET);
    verify_workload(&mount.file(), &tree);
    let read_retries = stat(&mount.stats(), "http_num_retries");
    let during = proxy.stats();
    proxy.set_rules(Vec::new());
    assert_fsck_clean(&mount.file());
    let done = mount.unmount();
    assert!(
        done.status.success(),
        "reader exited badly:\n{}",
        done.stderr
    );
    report("FUSE", &during, [write_retries, read_retries], tree.len());
}

/// `http_num_retries` of a `--statsFileMirror` file (not deleted: that resets the counters).
fn mirrored_retries(path: &Path) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // The mirror rewrites the file every 50 ms: this read is at most that stale.
        std::thread::sleep(Duration::from_millis(200));
        if let Ok(text) = std::fs::read_to_string(path) {
            return stat(&text, "http_num_retries");
        }
        assert!(
            Instant::now() < deadline,
            "no stats mirror at {}",
            path.display()
        );
    }
}

#[test]
fn ext4_over_nbd_survives_transient_faults_with_no_verify_error() {
    let server = S3Server::start(&[BUCKET]);
    let proxy = proxy_for(&server, 16);
    proxy.set_rules(transient_faults());
    let dir = tempfile::tempdir().unwrap();
    let mirror = dir.path().join("stats");
    let mirror_flag = format!("--statsFileMirror={}", mirror.display());
    let args = transient_args(&proxy, &[&mirror_flag, "--statsFileMirrorInterval=50"]);

    let nbd = NbdServer::start(&ours(), &args, BUCKET);
    let fuse = NbdFuse::start(&nbd.uri());
    let tree = write_workload(&fuse.file());
    fuse.unmount();
    let write_retries = mirrored_retries(&mirror);
    nbd.stop_ok();

    let nbd = NbdServer::start(&ours(), &args, BUCKET);
    let fuse = NbdFuse::start(&nbd.uri());
    verify_workload(&fuse.file(), &tree);
    let read_retries = mirrored_retries(&mirror);
    let during = proxy.stats();
    proxy.set_rules(Vec::new());
    assert_fsck_clean(&fuse.file());
    fuse.unmount();
    nbd.stop_ok();
    report("NBD", &during, [write_retries, read_retries], tree.len());
}

#[test]
fn an_unreachable_store_fails_fsync_keeps_the_data_and_writes_it_later() {
    let server = S3Server::start(&[BUCKET]);
    let proxy = proxy_for(&server, 7);
    // Each request gives up after 1 s of retry pauses: well before the outage ends.
    let args = args(&proxy, 1, 1000, &["--size=8m", "--blockSize=64k"]);
    let mount = FuseMount::start(&ours(), &args, BUCKET);
    let first = pseudo_random(1, 1 << 20);
    write_and_fsync(&mount.file(), &first).expect("fsync with the store up");

    // The endpoint goes away: every request fails, refused or answered 503.
    proxy.set_rules(vec![
        Rule::new(Fault::Reset).probability(0.5),
        Rule::new(Fault::Status(503)),
    ]);
    let second = pseudo_random(2, 1 << 20);
    let started = Instant::now();
    let err = write_and_fsync(&mount.file(), &second).expect_err("fsync must fail");
    assert_eq!(err.raw_os_error(), Some(EIO), "{err}");
    let failed_after = started.elapsed();
    assert!(is_mounted(&mount.mount_point), "the mount died");
    assert!(
        read_prefix(&mount.file(), second.len()) == second,
        "the unwritten data is not kept"
    );
    let outage = proxy.stats();

    // The endpoint returns: a later fsync (no new write) succeeds once the data is up.
    proxy.set_rules(Vec::new());
    std::fs::File::open(mount.file())
        .and_then(|f| f.sync_all())
        .unwrap_or_else(|e| panic!("fsync after the store is back: {e}\n{}", mount.stderr()));
    let stats = mount.stats();
    // Acknowledged means in the bucket: a new process, straight at the server, reads it back.
    mount.crash();
    let direct = server.args(&["--force", "--size=8m", "--blockSize=64k"]);
    let check = FuseMount::start(&ours(), &direct, BUCKET);
    assert!(
        read_prefix(&check.file(), second.len()) == second,
        "the data kept through the outage is not in the bucket"
    );
    let done = check.unmount();
    assert!(done.status.success(), "{}", done.stderr);
    println!(
        "outage: {} requests refused ({}), fsync failed with EIO after {:.1} s, mount alive, 1 MiB kept; \
         after the store returned fsync succeeded and the data is in the bucket \
         (http_num_retries {})",
        outage.injected_total(),
        injected(&outage),
        failed_after.as_secs_f64(),
        stat(&stats, "http_num_retries")
    );
}

#[test]
fn unmount_with_unwritten_data_fails_loudly() {
    let server = S3Server::start(&[BUCKET]);
    let proxy = proxy_for(&server, 8);
    let args = args(&proxy, 1, 1000, &["--size=8m", "--blockSize=64k"]);
    let mount = FuseMount::start(&ours(), &args, BUCKET);
    proxy.set_rules(vec![Rule::new(Fault::Status(503))]);
    let data = pseudo_random(3, 256 << 10);
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(mount.file())
            .unwrap();
        file.write_all(&data).expect("writes are cached");
    }
    let done = mount.unmount();
    assert!(
        !done.status.success(),
        "unmount pretended success:\n{}",
        done.stderr
    );
    assert!(
        done.stderr.contains("NOT ALL DATA WAS WRITTEN"),
        "{}",
        done.stderr
    );
    // The token stays: the next mount is told the bucket was not cleanly released.
    assert!(
        server.object_path(BUCKET, "s3backer-mounted").exists(),
        "mount token removed although data was lost"
    );
    println!(
        "unmount during an outage: {}, \"NOT ALL DATA WAS WRITTEN\", mount token kept",
        done.status
    );
}

#[test]
fn an_unreachable_store_fails_nbd_flush_and_a_later_flush_writes_the_data() {
    let server = S3Server::start(&[BUCKET]);
    let proxy = proxy_for(&server, 9);
    let args = args(&proxy, 1, 1000, &["--size=8m", "--blockSize=64k"]);
    let nbd = NbdServer::start(&ours(), &args, BUCKET);
    let fuse = NbdFuse::start(&nbd.uri());
    proxy.set_rules(vec![Rule::new(Fault::Status(503))]);
    let data = pseudo_random(4, 1 << 20);
    let err = write_and_fsync(&fuse.file(), &data).expect_err("NBD FLUSH must fail");
    assert_eq!(err.raw_os_error(), Some(EIO), "{err}\n{}", nbd.stderr());
    proxy.set_rules(Vec::new());
    std::fs::File::open(fuse.file())
        .and_then(|f| f.sync_all())
        .unwrap_or_else(|e| panic!("flush after the store is back: {e}\n{}", nbd.stderr()));
    fuse.unmount();
    nbd.stop_ok();
    let direct = server.args(&["--size=8m", "--blockSize=64k"]);
    let check = FuseMount::start(&ours(), &direct, BUCKET);
    assert!(
        read_prefix(&check.file(), data.len()) == data,
        "the data kept through the outage is not in the bucket"
    );
    let done = check.unmount();
    assert!(done.status.success(), "{}", done.stderr);
    println!("outage over NBD: FLUSH failed with EIO, the next FLUSH wrote the 1 MiB kept");
}
