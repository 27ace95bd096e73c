//! Reliability of mounting: two mounts of one bucket started at the same moment (one at a time
//! is in e2e_fuse.rs) and the token a crash leaves behind; mounts that cannot work fail clearly and write
//! nothing to the bucket.

mod common;

use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::S3Server;
use common::moto::Moto;
use common::mount::{FuseMount, ours};

const BUCKET: &str = "mounts";
const MOTO_ARGS: &[&str] = &[
    "--timeout=5",
    "--maxRetryPause=500",
    "--size=1m",
    "--blockSize=64k",
];

fn args(server: &S3Server, extra: &[&str]) -> Vec<String> {
    // Later flags win: these shorten the fixture's retry times.
    let mut args = server.args(&[
        "--timeout=2",
        "--maxRetryPause=500",
        "--size=1m",
        "--blockSize=64k",
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
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
fn of_two_mounts_started_at_the_same_moment_exactly_one_wins() {
    const ROUNDS: usize = 5;
    let mut by_condition = 0;
    for round in 0..ROUNDS {
        let server = Moto::start(BUCKET);
        let barrier = Arc::new(Barrier::new(2));
        let racers: Vec<_> = (0..2)
            .map(|_| {
                let (barrier, args) = (barrier.clone(), server.args(MOTO_ARGS));
                std::thread::spawn(move || {
                    barrier.wait();
                    FuseMount::try_start(&ours(), &args, BUCKET)
                })
            })
            .collect();
        let results: Vec<_> = racers.into_iter().map(|r| r.join().unwrap()).collect();
        let (won, lost): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
        let lost: Vec<_> = lost.into_iter().map(|r| r.err().unwrap()).collect();
        assert_eq!(
            won.len(),
            1,
            "round {round}: {} mounts won; losers said: {lost:?}",
            won.len()
        );
        assert!(
            lost[0].stderr.contains("mounted"),
            "round {round}: {}",
            lost[0].stderr
        );
        // Lost at the conditional PUT (both saw no token) rather than at the first look.
        by_condition += usize::from(lost[0].stderr.contains("created a mount token just now"));
        for mount in won {
            let done = mount.unwrap().unmount();
            assert!(done.status.success(), "{}", done.stderr);
        }
    }
    println!(
        "simultaneous mounts: {ROUNDS} races, exactly one winner each \
         ({by_condition} decided by the If-None-Match PUT)"
    );
}

#[test]
fn a_token_left_by_a_crash_is_reported_with_the_reset_hint() {
    let server = S3Server::start(&[BUCKET]);
    FuseMount::start(&ours(), &args(&server, &[]), BUCKET).crash();
    let refused = FuseMount::try_start(&ours(), &args(&server, &[]), BUCKET)
        .err()
        .expect("a mount over a stale token must be refused");
    assert!(
        refused.stderr.contains("appears to be already mounted")
            && refused.stderr.contains("--reset-mounted-flag"),
        "{}",
        refused.stderr
    );
    let reset = Command::new(ours())
        .args(args(&server, &[]))
        .args(["--reset-mounted-flag", BUCKET])
        .output()
        .unwrap();
    assert!(
        reset.status.success(),
        "{}",
        String::from_utf8_lossy(&reset.stderr)
    );
    let mount = FuseMount::start(&ours(), &args(&server, &[]), BUCKET);
    assert!(mount.unmount().status.success());
}

/// Runs our binary to mount `mount_point`, expecting it to fail; returns its stderr.
fn failed_mount(args: &[String], mount_point: &std::path::Path) -> String {
    let mut child = Command::new(ours())
        .args(args)
        .arg("-f")
        .arg(BUCKET)
        .arg(mount_point)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: a mount that wrongly comes up is found by the caller's assertions.
    for _ in 0..300 {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if child.try_wait().unwrap().is_none() {
        let _ = Command::new("umount").arg("-l").arg(mount_point).status();
        child.kill().unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "the mount should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_missing_mount_point_fails_clearly_and_writes_nothing() {
    let server = S3Server::start(&[BUCKET]);
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let stderr = failed_mount(&args(&server, &[]), &missing);
    assert!(
        stderr.contains(&missing.display().to_string()),
        "the error must name the mount point:\n{stderr}"
    );
    assert_eq!(stored(&server), Vec::<String>::new(), "{stderr}");
}
