//! End-to-end: the real binary serving NBD on a Unix socket (there is no /dev/nbd* here),
//! used by real clients (nbdfuse, nbdcopy, nbdinfo, qemu-img), over the real S3 test server
//! and the directory store. The bucket format is the FUSE mode's: each mode reads the other's.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::S3Server;
use common::mount::{
    LoopMount, assert_fsck_clean, mkfs_ext4, ours, pseudo_random, run, verify_ext4_disk,
    verify_tree, wait_until, write_ext4_disk, write_tree,
};
use common::nbd::{NbdFuse, NbdServer};

const BUCKET: &str = "nbd";

/// Puts ext4 with a tree of files on the export through nbdfuse + loop; stops the server.
fn write_ext4_over_nbd(args: &[String], bucket: &str, seed: u64) -> BTreeMap<PathBuf, String> {
    let server = NbdServer::start(&ours(), args, bucket);
    let fuse = NbdFuse::start(&server.uri());
    mkfs_ext4(&fuse.file());
    let tree = {
        let ext4 = LoopMount::new(&fuse.file(), "discard");
        write_tree(&ext4.dir, seed, 40)
    };
    fuse.unmount();
    server.stop_ok();
    tree
}

/// Checks the tree and `e2fsck -fn` through nbdfuse; stops the server.
fn verify_ext4_over_nbd(args: &[String], bucket: &str, tree: &BTreeMap<PathBuf, String>) {
    let server = NbdServer::start(&ours(), args, bucket);
    let fuse = NbdFuse::start(&server.uri());
    {
        let ext4 = LoopMount::new(&fuse.file(), "ro");
        verify_tree(&ext4.dir, tree);
    }
    assert_fsck_clean(&fuse.file());
    fuse.unmount();
    server.stop_ok();
}

#[test]
fn ext4_written_over_nbd_survives_restart_and_reads_over_fuse() {
    let server = S3Server::start(&[BUCKET]);
    let args = server.args(&["--size=256m", "--blockSize=64k"]);
    let tree = write_ext4_over_nbd(&args, BUCKET, 21);
    verify_ext4_over_nbd(&args, BUCKET, &tree);
    verify_ext4_disk(&ours(), &args, BUCKET, &tree);
}

#[test]
fn ext4_written_over_fuse_reads_over_nbd() {
    let server = S3Server::start(&[BUCKET]);
    let args = server.args(&["--size=256m", "--blockSize=64k", "--encrypt=aes-256-cbc"]);
    let pw = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(pw.path(), "nbd secret\n").unwrap();
    let mut args = args;
    args.push(format!("--passwordFile={}", pw.path().display()));
    let tree = write_ext4_disk(&ours(), &args, BUCKET, 22, 40);
    verify_ext4_over_nbd(&args, BUCKET, &tree);
}

fn nbdcopy(from: &str, to: &str) {
    run(Command::new("nbdcopy").args([from, to]));
}

#[test]
fn nbdcopy_round_trip_of_256_mib_is_byte_identical_and_unwritten_ranges_are_holes() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let args: Vec<String> = ["--test", "--size=512m", "--blockSize=256k"]
        .map(String::from)
        .to_vec();
    let image = dir.path().join("in.img");
    std::fs::write(&image, pseudo_random(23, 256 << 20)).unwrap();

    let server = NbdServer::start(&ours(), &args, store.to_str().unwrap());
    nbdcopy(image.to_str().unwrap(), &server.uri());
    // Every byte of the first half is data; the never-written second half is one hole.
    let map = run(Command::new("nbdinfo").args(["--map", &server.uri()]));
    let lines: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines.len(), 2, "nbdinfo --map:\n{map}");
    assert_eq!(&lines[0][..3], ["0", "268435456", "0"], "{map}");
    assert_eq!(&lines[1][..3], ["268435456", "268435456", "3"], "{map}");
    server.stop_ok();

    // The blocks really are in the store: a fresh server returns the same bytes.
    assert_eq!(std::fs::read_dir(&store).unwrap().count(), 1024);
    let server = NbdServer::start(&ours(), &args, store.to_str().unwrap());
    let out = dir.path().join("out.img");
    std::fs::File::create(&out)
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    nbdcopy(&server.uri(), out.to_str().unwrap());
    let compare = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&out)
        .arg(server.uri())
        .output()
        .unwrap();
    assert!(
        compare.status.success(),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&compare.stdout)
    );
    server.stop_ok();
    let back = std::fs::read(&out).unwrap();
    assert!(
        back[..256 << 20] == std::fs::read(&image).unwrap()[..],
        "data differs"
    );
    assert!(back[256 << 20..].iter().all(|&b| b == 0), "hole not zero");
}

#[test]
fn second_server_on_the_same_bucket_is_refused() {
    let server = S3Server::start(&[BUCKET]);
    let args = server.args(&["--size=16m"]);
    let first = NbdServer::start(&ours(), &args, BUCKET);
    let second = Command::new(ours())
        .arg("--nbd-listen=0")
        .arg("-f")
        .args(&args)
        .arg(BUCKET)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("already mounted"), "{stderr}");
    first.stop_ok();
}

#[test]
fn missing_device_names_the_socket_flags_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(ours())
        .args(["--test", "--size=1m", "-f", "--nbd"])
        .arg(dir.path())
        .arg("/dev/nbd-s3backer-test-missing")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/dev/nbd-s3backer-test-missing does not exist")
            && stderr.contains("--nbd-socket=PATH"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// A stand-in for nbd-client (no kernel NBD here): the attach call writes a pattern through
/// the socket it was given, like the kernel would, then waits; `-d` makes it exit.
const FAKE_NBD_CLIENT: &str = r#"#!/bin/sh
log="$FAKE_NBD_LOG"
if [ "$1" = "-d" ]; then
    echo "detach $2" >> "$log"
    kill "$(cat "$log.pid")"
    exit 0
fi
echo "attach $*" >> "$log"
echo $$ > "$log.pid"
nbdcopy "$FAKE_NBD_PATTERN" "nbd+unix:///?socket=$2" || exit 1
echo "wrote" >> "$log"
trap 'exit 0' TERM
while :; do sleep 0.1; done
"#;

#[test]
fn nbd_device_mode_runs_nbd_client_and_detaches_on_sigterm() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let client = bin.join("nbd-client");
    std::fs::write(&client, FAKE_NBD_CLIENT).unwrap();
    std::fs::set_permissions(&client, std::fs::Permissions::from_mode(0o755)).unwrap();
    let device = dir.path().join("nbd7");
    std::fs::write(&device, b"").unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let pattern = dir.path().join("pattern");
    let data = pseudo_random(24, 1 << 20);
    std::fs::write(&pattern, &data).unwrap();
    let log = dir.path().join("client.log");
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());

    let mut child = Command::new(ours())
        .args(["--test", "--size=4m", "--blockSize=64k", "-f", "--nbd"])
        .arg(&store)
        .arg(&device)
        .env("PATH", path)
        .env("FAKE_NBD_LOG", &log)
        .env("FAKE_NBD_PATTERN", &pattern)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _kill = KillOnDrop(child.id());
    let wrote = wait_until(Duration::from_secs(30), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("wrote"))
    });
    assert!(wrote, "fake nbd-client never wrote through the socket");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let exited = wait_until(Duration::from_secs(60), || {
        child.try_wait().ok().flatten().is_some()
    });
    assert!(exited, "s3backer did not exit after SIGTERM");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");

    let log = std::fs::read_to_string(&log).unwrap();
    let attach = log.lines().next().unwrap();
    assert!(
        attach.starts_with("attach -unix /run/s3backer-nbd/")
            && attach.ends_with(&format!("-block-size 4096 -nofork {}", device.display())),
        "{log}"
    );
    assert!(
        log.contains(&format!("detach {}", device.display())),
        "{log}"
    );
    // The pattern went through the server into the store: 16 blocks of 64 KiB.
    assert_eq!(std::fs::read_dir(&store).unwrap().count(), 16, "{stderr}");
    let first = std::fs::read(store.join("00000000")).unwrap();
    assert_eq!(first, data[..64 << 10]);
}

struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill(2) on a pid we spawned; harmless if it already exited and was reaped
        // only within this test's lifetime.
        unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
    }
}
