//! `s3backer --verify`: checks every stored block, names the damaged ones, exits non-zero when
//! there are any, and writes nothing (so it is safe while the disk is mounted).

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};

use common::S3Server;
use common::mount::{FuseMount, ours, pseudo_random, write_and_fsync};

const BUCKET: &str = "verify";
const BLOCK: usize = 64 * 1024;
const WRITTEN: usize = 12;

fn args(server: &S3Server, extra: &[&str]) -> Vec<String> {
    // Later flags win: these shorten the fixture's retry times.
    let mut args = server.args(&[
        "--timeout=2",
        "--initialRetryPause=50",
        "--maxRetryPause=200",
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn verify(server: &S3Server, extra: &[&str]) -> Output {
    Command::new(ours())
        .args(args(server, extra))
        .arg("--verify")
        .arg(BUCKET)
        .output()
        .unwrap()
}

/// Every file of the server's data dir with its bytes: proves a run changed nothing.
fn snapshot(server: &S3Server) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut dirs = vec![server.data_dir()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

fn key(block: usize) -> String {
    format!("{block:08x}")
}

fn write_disk(server: &S3Server, extra: &[&str]) -> FuseMount {
    let mut flags = vec!["--size=4m", "--blockSize=64k"];
    flags.extend_from_slice(extra);
    let mount = FuseMount::start(&ours(), &args(server, &flags), BUCKET);
    write_and_fsync(&mount.file(), &pseudo_random(5, WRITTEN * BLOCK)).unwrap();
    mount
}

#[test]
fn verify_names_damaged_blocks_and_fails_while_the_disk_stays_mounted() {
    let server = S3Server::start(&[BUCKET]);
    let mount = write_disk(&server, &[]);

    let clean = verify(&server, &[]);
    let stderr = String::from_utf8_lossy(&clean.stderr);
    assert!(clean.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("verified {WRITTEN} stored blocks")),
        "{stderr}"
    );

    // Damage two blocks: a flipped byte, and an encoding no reader knows.
    let body = server.object_path(BUCKET, &key(3));
    let mut bytes = std::fs::read(&body).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&body, bytes).unwrap();
    let meta = server.object_metadata_path(BUCKET, &key(7));
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta).unwrap()).unwrap();
    json["content_encoding"] = "x-bogus".into();
    std::fs::write(&meta, json.to_string()).unwrap();

    let before = snapshot(&server);
    let damaged = verify(&server, &[]);
    let stderr = String::from_utf8_lossy(&damaged.stderr);
    assert_eq!(damaged.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "verified {WRITTEN} stored blocks of http://{}/{BUCKET}/: 2 damaged: 00000003 00000007",
            server.endpoint()
        )),
        "{stderr}"
    );
    for block in (0..WRITTEN).filter(|b| ![3, 7].contains(b)) {
        assert!(
            !stderr.contains(&format!("block {} is damaged", key(block))),
            "{stderr}"
        );
    }
    assert!(
        before == snapshot(&server),
        "--verify changed the bucket (or the mount token)"
    );
    let done = mount.unmount();
    assert!(done.status.success(), "{}", done.stderr);
    println!(
        "--verify: {WRITTEN} blocks checked on a mounted disk, the 2 damaged ones named, bucket untouched"
    );
}

#[test]
fn verify_checks_the_hmac_of_encrypted_blocks() {
    let server = S3Server::start(&[BUCKET]);
    let encrypt = ["--encrypt", "--password=correct horse"];
    drop(write_disk(&server, &encrypt).unmount());

    let ok = verify(&server, &encrypt);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let wrong = verify(&server, &["--encrypt", "--password=wrong horse"]);
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert_eq!(wrong.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{WRITTEN} damaged")),
        "a wrong password must fail every block:\n{stderr}"
    );
}

#[test]
fn verify_takes_no_mount_point() {
    let out = Command::new(ours())
        .args(["--verify", BUCKET, "/mnt"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no mount point should be specified"));
}
