//! Cross-compatibility with C s3backer 1.5.4 (Debian package) over the same S3 server: a disk
//! written by one program is read by the other, for the four bucket kinds users have.

mod common;

use std::path::Path;

use common::S3Server;
use common::mount::{c_s3backer, ours, verify_ext4_disk, write_ext4_disk};

const BUCKET: &str = "compat";

fn args(server: &S3Server, kind: &[&str], first_mount: bool) -> Vec<String> {
    let mut args = vec![
        format!("--baseURL={}", server.base_url()),
        "--accessId=testkey".to_string(),
        "--accessKey=testsecret".to_string(),
    ];
    if first_mount {
        // Later mounts auto-detect the size from block 0, which tests that header both ways.
        args.push("--size=128m".to_string());
    }
    args.extend(kind.iter().map(|s| s.to_string()));
    args
}

fn write_with(writer: &Path, reader: &Path, kind: &[&str]) {
    let server = S3Server::start(&[BUCKET]);
    let tree = write_ext4_disk(writer, &args(&server, kind, true), BUCKET, 11, 24);
    verify_ext4_disk(reader, &args(&server, kind, false), BUCKET, &tree);
    let objects = std::fs::read_dir(server.bucket_dir(BUCKET))
        .unwrap()
        .count();
    println!(
        "{} -> {} {kind:?}: {} files verified, {objects} objects",
        writer.display(),
        reader.display(),
        tree.len()
    );
}

macro_rules! both_ways {
    ($c_to_ours:ident, $ours_to_c:ident, $kind:expr) => {
        #[test]
        fn $c_to_ours() {
            write_with(&c_s3backer(), &ours(), $kind);
        }

        #[test]
        fn $ours_to_c() {
            write_with(&ours(), &c_s3backer(), $kind);
        }
    };
}

both_ways!(plain_c_to_ours, plain_ours_to_c, &[]);
both_ways!(
    hash_prefix_c_to_ours,
    hash_prefix_ours_to_c,
    &["--blockHashPrefix"]
);
both_ways!(deflate_c_to_ours, deflate_ours_to_c, &["--compress"]);
both_ways!(
    encrypted_c_to_ours,
    encrypted_ours_to_c,
    &["--encrypt", "--password=s3cret pass"]
);
