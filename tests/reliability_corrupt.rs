//! Reliability: a damaged object in the bucket (tampered directly in the test server's files) is
//! an I/O error for that block only, with a log line naming it; the other blocks stay readable.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::S3Server;
use common::mount::{FuseMount, ours, pseudo_random, write_and_fsync};

const BUCKET: &str = "corrupt";
const BLOCK: usize = 64 * 1024;
/// Blocks 0..WRITTEN hold data; the rest of the disk was never written.
const WRITTEN: usize = 4;
const DAMAGED: usize = 2;

fn args(server: &S3Server, extra: &[&str]) -> Vec<String> {
    // Later flags win: these shorten the fixture's retry times.
    let block = format!("--blockSize={BLOCK}");
    let mut args = server.args(&[
        "--timeout=2",
        "--initialRetryPause=50",
        "--maxRetryPause=200",
        "--size=1m",
        &block,
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn content() -> Vec<u8> {
    pseudo_random(77, WRITTEN * BLOCK)
}

/// Writes the disk with `write_flags`, lets `tamper` damage the bucket, remounts with
/// `read_flags` and checks what each block reads as. `damaged` lists the blocks that must fail.
fn scenario(
    name: &str,
    write_flags: &[&str],
    read_flags: &[&str],
    damaged: &[usize],
    tamper: impl FnOnce(&S3Server),
) {
    let server = S3Server::start(&[BUCKET]);
    let mount = FuseMount::start(&ours(), &args(&server, write_flags), BUCKET);
    write_and_fsync(&mount.file(), &content()).unwrap();
    let done = mount.unmount();
    assert!(done.status.success(), "{}", done.stderr);

    tamper(&server);

    let mount = FuseMount::start(&ours(), &args(&server, read_flags), BUCKET);
    let file = std::fs::File::open(mount.file()).unwrap();
    let expected = content();
    let mut buf = vec![0u8; BLOCK];
    let mut readable = 0;
    for block in 0..WRITTEN + 2 {
        let result = file.read_exact_at(&mut buf, (block * BLOCK) as u64);
        if damaged.contains(&block) {
            let err = result.expect_err(&format!("{name}: damaged block {block} was served"));
            assert_eq!(err.raw_os_error(), Some(libc::EIO), "{name}: {err}");
        } else {
            result.unwrap_or_else(|e| panic!("{name}: intact block {block} unreadable: {e}"));
            let want = expected
                .get(block * BLOCK..(block + 1) * BLOCK)
                .map_or_else(|| vec![0u8; BLOCK], <[u8]>::to_vec);
            assert!(buf == want, "{name}: block {block} differs");
            readable += 1;
        }
    }
    drop(file);
    let log = mount.unmount().stderr;
    for block in damaged {
        let id = format!("{block:08x}");
        assert!(
            log.lines().any(|l| l.contains(&id) && l.contains("error")),
            "{name}: no error line names block {id}:\n{log}"
        );
    }
    println!(
        "{name}: {} damaged block(s) gave EIO and were named in the log; {readable} other blocks read correctly",
        damaged.len()
    );
}

fn key(block: usize) -> String {
    format!("{block:08x}")
}

fn edit(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(path).unwrap();
    f(&mut bytes);
    std::fs::write(path, bytes).unwrap();
}

/// Replaces `from` with `to` in a sidecar JSON, insisting it was there.
fn edit_json(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        text.contains(from),
        "{from} not in {}: {text}",
        path.display()
    );
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

const ENCRYPT: &[&str] = &["--encrypt", "--password=correct horse"];

#[test]
fn flipped_byte_is_eio_for_that_block_only() {
    scenario("flipped byte", &[], &[], &[DAMAGED], |s| {
        edit(&s.object_path(BUCKET, &key(DAMAGED)), |b| b[1000] ^= 0x40);
    });
}

#[test]
fn truncated_object_is_eio_for_that_block_only() {
    scenario("truncated object", &[], &[], &[DAMAGED], |s| {
        edit(&s.object_path(BUCKET, &key(DAMAGED)), |b| {
            b.truncate(BLOCK / 2)
        });
    });
}

#[test]
fn truncated_object_with_a_matching_etag_is_eio() {
    // The server vouches for the short body: only the length check can catch it.
    scenario(
        "truncated object, ETag matching",
        &[],
        &[],
        &[DAMAGED],
        |s| {
            edit(&s.object_path(BUCKET, &key(DAMAGED)), |b| {
                b.truncate(BLOCK / 2)
            });
            std::fs::remove_file(s.object_internal_path(BUCKET, &key(DAMAGED))).unwrap();
        },
    );
}

#[test]
fn encrypted_flipped_byte_with_a_matching_etag_fails_the_hmac() {
    scenario(
        "encrypted, flipped byte, ETag matching",
        ENCRYPT,
        ENCRYPT,
        &[DAMAGED],
        |s| {
            edit(&s.object_path(BUCKET, &key(DAMAGED)), |b| b[17] ^= 0x01);
            std::fs::remove_file(s.object_internal_path(BUCKET, &key(DAMAGED))).unwrap();
        },
    );
}

#[test]
fn wrong_hmac_is_eio_for_that_block_only() {
    scenario("wrong HMAC", ENCRYPT, ENCRYPT, &[DAMAGED], |s| {
        let path = s.object_metadata_path(BUCKET, &key(DAMAGED));
        let text = std::fs::read_to_string(&path).unwrap();
        // The HMAC is hex; change its first digit.
        let at = text.find("s3backer-hmac\":\"").expect("hmac in metadata") + 16;
        let digit = &text[at..at + 1];
        let other = if digit == "0" { "1" } else { "0" };
        edit_json(
            &path,
            &format!("hmac\":\"{digit}"),
            &format!("hmac\":\"{other}"),
        );
    });
}

#[test]
fn another_blocks_object_fails_the_hmac() {
    // A valid object replayed under another block number: the HMAC covers the block number.
    scenario(
        "block 1 copied over block 2",
        ENCRYPT,
        ENCRYPT,
        &[DAMAGED],
        |s| {
            for path in [
                |s: &S3Server, k: &str| s.object_path(BUCKET, k),
                |s: &S3Server, k: &str| s.object_metadata_path(BUCKET, k),
                |s: &S3Server, k: &str| s.object_internal_path(BUCKET, k),
            ] {
                std::fs::copy(path(s, &key(1)), path(s, &key(DAMAGED))).unwrap();
            }
        },
    );
}

#[test]
fn wrong_password_is_eio_for_every_stored_block_and_zero_blocks_still_read() {
    let all: Vec<usize> = (0..WRITTEN).collect();
    scenario(
        "wrong password",
        ENCRYPT,
        &["--encrypt", "--password=wrong horse"],
        &all,
        |_| {},
    );
}

#[test]
fn unknown_content_encoding_is_eio_for_that_block_only() {
    scenario("unknown Content-Encoding", &[], &[], &[DAMAGED], |s| {
        let path = s.object_metadata_path(BUCKET, &key(DAMAGED));
        let text = std::fs::read_to_string(&path).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut json = json;
        json["content_encoding"] = serde_json::Value::String("x-bogus".into());
        std::fs::write(&path, json.to_string()).unwrap();
    });
}

#[test]
fn deflate_label_on_raw_data_is_eio() {
    // A wrong but known encoding: the bytes are not a zlib stream.
    scenario(
        "wrong Content-Encoding (deflate on raw data)",
        &[],
        &[],
        &[DAMAGED],
        |s| {
            let path = s.object_metadata_path(BUCKET, &key(DAMAGED));
            let text = std::fs::read_to_string(&path).unwrap();
            let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
            json["content_encoding"] = serde_json::Value::String("deflate".into());
            std::fs::write(&path, json.to_string()).unwrap();
        },
    );
}
