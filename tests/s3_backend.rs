//! The S3 backend against a real local S3 server (s3s-fs): objects on disk, metadata headers,
//! mount token, listing, errors and retries, credentials, concurrency.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{ACCESS_KEY, S3Server, SECRET_KEY};
use s3backer::Error;
use s3backer::backend::s3::{CredentialFlags, S3Backend, S3Client, S3Options};
use s3backer::geometry::{BlockId, Geometry};
use s3backer::layer::codec::{Codec, CodecConfig};
use s3backer::naming::Naming;
use s3backer::store::{Block, BlockStore, SizeMeta, Volume};

const BUCKET: &str = "bucket";
const BS: u32 = 4096;

fn options(server: &S3Server, naming: Naming) -> S3Options {
    S3Options {
        base_url: server.base_url(),
        bucket: BUCKET.into(),
        naming,
        credentials: CredentialFlags {
            access_id: Some(ACCESS_KEY.into()),
            access_key: Some(SECRET_KEY.into()),
            ..Default::default()
        },
        timeout: Duration::from_secs(5),
        initial_retry_pause: Duration::from_millis(20),
        max_retry_pause: Duration::from_millis(300),
        ..S3Options::default()
    }
}

fn backend_with(opts: S3Options, num_blocks: u32) -> (Arc<S3Client>, S3Backend) {
    let client = Arc::new(S3Client::new(opts).expect("client"));
    let geometry = Geometry::new(u64::from(num_blocks) * u64::from(BS), BS).unwrap();
    let backend = S3Backend::new(
        client.clone(),
        geometry,
        Arc::new(Codec::new(CodecConfig::default()).unwrap()),
    );
    (client, backend)
}

fn backend(server: &S3Server, naming: Naming, num_blocks: u32) -> (Arc<S3Client>, S3Backend) {
    backend_with(options(server, naming), num_blocks)
}

/// A recognisable non-zero block.
fn pattern(seed: u32) -> Vec<u8> {
    (0..BS)
        .map(|i| (i.wrapping_mul(31) ^ seed.wrapping_mul(7919)) as u8 | 1)
        .collect()
}

fn read(store: &dyn BlockStore, block: u32) -> (Vec<u8>, bool) {
    let mut buf = vec![0xAAu8; BS as usize];
    let info = store.read_block(BlockId(block), &mut buf).unwrap();
    (buf, info.zero)
}

fn survey(store: &dyn BlockStore, threads: usize) -> BTreeSet<u32> {
    let found = Mutex::new(BTreeSet::new());
    store
        .survey_non_zero(threads, &|b| {
            assert!(
                found.lock().unwrap().insert(b.0),
                "block {b} reported twice"
            );
        })
        .unwrap();
    found.into_inner().unwrap()
}

fn object_exists(server: &S3Server, key: &str) -> bool {
    server.bucket_dir(BUCKET).join(key).exists()
}

#[test]
fn blocks_round_trip_and_zero_writes_delete() {
    let server = S3Server::start(&[BUCKET]);
    let (_, store) = backend(&server, Naming::new("", false), 64);
    assert_eq!(
        read(&store, 5),
        (vec![0; BS as usize], true),
        "absent reads as zeros"
    );

    let data = pattern(5);
    let written = store.write_block(BlockId(5), Block::Data(&data)).unwrap();
    let on_disk = std::fs::read(server.bucket_dir(BUCKET).join("00000005")).unwrap();
    assert_eq!(on_disk, data, "the object holds the raw block");
    let mut buf = vec![0u8; BS as usize];
    let info = store.read_block(BlockId(5), &mut buf).unwrap();
    assert_eq!(buf, data);
    assert!(!info.zero);
    assert_eq!(
        info.etag, written.etag,
        "ETag of the read = MD5 of the write"
    );

    store.write_block(BlockId(5), Block::Zero).unwrap();
    assert!(!object_exists(&server, "00000005"), "zero block is deleted");
    assert!(read(&store, 5).1);
    // Deleting an absent object is fine.
    store.write_block(BlockId(5), Block::Zero).unwrap();

    let mut report = s3backer::stats::StatsReport::default();
    store.stats(&mut report);
    assert_eq!(report.get("http_normal_blocks_written"), Some("1"));
    assert_eq!(report.get("http_zero_blocks_written"), Some("2"));
    assert_eq!(report.get("http_puts"), Some("1"));
    store.reset_stats();
    let mut report = s3backer::stats::StatsReport::default();
    store.stats(&mut report);
    assert_eq!(report.get("http_puts"), Some("0"));
}

#[test]
fn block_zero_carries_size_metadata() {
    let server = S3Server::start(&[BUCKET]);
    let (client, store) = backend(&server, Naming::new("", false), 64);
    assert_eq!(client.detect_size().unwrap(), None, "empty bucket");
    store
        .write_block(BlockId(1), Block::Data(&pattern(1)))
        .unwrap();
    assert_eq!(
        client.detect_size().unwrap(),
        None,
        "only block 0 carries sizes"
    );
    store
        .write_block(BlockId(0), Block::Data(&pattern(0)))
        .unwrap();
    assert_eq!(
        client.detect_size().unwrap(),
        Some(SizeMeta {
            block_size: BS,
            file_size: 64 * u64::from(BS)
        })
    );
    store.write_block(BlockId(0), Block::Zero).unwrap();
    assert_eq!(
        client.detect_size().unwrap(),
        None,
        "zero block 0 loses the sizes"
    );
}

#[test]
fn prefix_and_hash_prefix_name_objects_on_disk() {
    let server = S3Server::start(&[BUCKET]);
    let (client, store) = backend(&server, Naming::new("vm1/", true), 0x2000);
    store
        .write_block(BlockId(0), Block::Data(&pattern(0)))
        .unwrap();
    store
        .write_block(BlockId(0x1234), Block::Data(&pattern(9)))
        .unwrap();
    assert!(object_exists(&server, "vm1/c448b72c-00000000"));
    assert!(object_exists(&server, "vm1/b74e46df-00001234"));
    assert_eq!(read(&store, 0x1234).0, pattern(9));
    assert!(
        client.detect_size().unwrap().is_some(),
        "HEAD honours the hash prefix"
    );
    assert!(
        client.description().ends_with("/bucket/vm1/"),
        "{}",
        client.description()
    );

    // The same bucket seen without the hash prefix looks empty.
    let (plain, _) = backend(&server, Naming::new("vm1/", false), 0x2000);
    assert_eq!(plain.detect_size().unwrap(), None);
}

#[test]
fn mount_token_lifecycle() {
    let server = S3Server::start(&[BUCKET]);
    let (client, _) = backend(&server, Naming::new("p/", false), 8);
    assert_eq!(client.read_mount_token().unwrap(), None);
    client.write_mount_token(Some(0x1234abcd)).unwrap();
    assert_eq!(client.read_mount_token().unwrap(), Some(0x1234abcd));
    let body =
        std::fs::read_to_string(server.bucket_dir(BUCKET).join("p/s3backer-mounted")).unwrap();
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.len(), 2, "{body:?}");
    assert_eq!(lines[1].len(), 16, "YYYYMMDDTHHMMSSZ: {body:?}");
    assert!(lines[1].ends_with('Z'));

    assert!(
        !client.put_mount_token_if_absent(7).unwrap(),
        "already held"
    );
    assert_eq!(
        client.read_mount_token().unwrap(),
        Some(0x1234abcd),
        "not overwritten"
    );
    client.write_mount_token(None).unwrap();
    assert_eq!(client.read_mount_token().unwrap(), None);
    assert!(client.put_mount_token_if_absent(7).unwrap());
    assert_eq!(client.read_mount_token().unwrap(), Some(7));
}

#[test]
fn token_object_without_value_reads_as_one() {
    let server = S3Server::start(&[BUCKET]);
    let (client, _) = backend(&server, Naming::new("", false), 8);
    // A pre-1.5.0 flag: the object exists, with no token header.
    client
        .put_object("s3backer-mounted", b"x", "text/plain", Vec::new())
        .unwrap();
    assert_eq!(client.read_mount_token().unwrap(), Some(1));
}

fn survey_finds_exactly_the_stored_blocks(hash_prefix: bool) {
    let server = S3Server::start(&[BUCKET]);
    let naming = Naming::new("d/", hash_prefix);
    let (client, store) = backend(&server, naming.clone(), 3000);
    let stored: BTreeSet<u32> = [0, 1, 2, 255, 256, 999, 1000, 1001, 2047, 2999].into();
    std::thread::scope(|s| {
        for &b in &stored {
            let store = &store;
            s.spawn(move || {
                store
                    .write_block(BlockId(b), Block::Data(&pattern(b)))
                    .unwrap()
            });
        }
    });
    // Foreign objects and blocks beyond the disk are ignored.
    for key in [
        "d/foo",
        "d/0000000A",
        "other/00000003",
        "d/s3backer-mounted",
        "00000004",
    ] {
        client
            .put_object(key, b"x", "text/plain", Vec::new())
            .unwrap();
    }
    let (_, bigger) = backend(&server, naming, 5000);
    bigger
        .write_block(BlockId(4000), Block::Data(&pattern(4000)))
        .unwrap();
    assert_eq!(survey(&store, 1), stored);
    assert_eq!(survey(&store, 16), stored);
    assert_eq!(survey(&store, 7), stored);
}

#[test]
fn survey_lists_stored_blocks_plain() {
    survey_finds_exactly_the_stored_blocks(false);
}

#[test]
fn survey_lists_stored_blocks_with_hash_prefix() {
    survey_finds_exactly_the_stored_blocks(true);
}

#[test]
fn survey_pages_through_more_than_one_listing_page() {
    let server = S3Server::start(&[BUCKET]);
    let (_, store) = backend(&server, Naming::new("", false), 4096);
    let blocks: Vec<BlockId> = (0..1200).map(|i| BlockId(i * 3)).collect();
    std::thread::scope(|s| {
        for part in blocks.chunks(150) {
            let store = &store;
            s.spawn(move || {
                for &b in part {
                    store.write_block(b, Block::Data(&pattern(b.0))).unwrap();
                }
            });
        }
    });
    let want: BTreeSet<u32> = blocks.iter().map(|b| b.0).collect();
    assert_eq!(survey(&store, 1), want);
    assert_eq!(survey(&store, 3), want);
    store.bulk_zero(&blocks[..600]).unwrap();
    assert_eq!(
        survey(&store, 4),
        blocks[600..].iter().map(|b| b.0).collect()
    );
}

#[test]
fn wrong_secret_fails_fast_with_forbidden() {
    let server = S3Server::start(&[BUCKET]);
    let mut opts = options(&server, Naming::new("", false));
    opts.credentials.access_key = Some("wrongsecret".into());
    let (_, store) = backend_with(opts, 8);
    let started = Instant::now();
    let mut buf = vec![0u8; BS as usize];
    let err = store.read_block(BlockId(1), &mut buf).unwrap_err();
    assert!(
        matches!(err, Error::Forbidden(_) | Error::Unauthorized(_)),
        "{err}"
    );
    assert!(err.to_string().contains("403"), "{err}");
    assert!(!err.to_string().contains("wrongsecret"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let err = store
        .write_block(BlockId(1), Block::Data(&pattern(1)))
        .unwrap_err();
    assert!(matches!(err, Error::Forbidden(_)), "{err}");
}

#[test]
fn corrupted_object_is_an_error_naming_the_block() {
    let server = S3Server::start(&[BUCKET]);
    let (_, store) = backend(&server, Naming::new("", false), 8);
    store
        .write_block(BlockId(3), Block::Data(&pattern(3)))
        .unwrap();
    let path = server.bucket_dir(BUCKET).join("00000003");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let mut buf = vec![0u8; BS as usize];
    let err = store.read_block(BlockId(3), &mut buf).unwrap_err();
    match &err {
        Error::Corrupt { block, .. } => assert_eq!(*block, BlockId(3)),
        other => panic!("expected Corrupt, got {other}"),
    }
    assert_eq!(err.errno(), libc::EIO);
    assert!(err.to_string().contains("00000003"), "{err}");

    // A truncated object is also rejected, never returned short.
    std::fs::write(&path, &bytes[..100]).unwrap();
    assert!(store.read_block(BlockId(3), &mut buf).is_err());
}

#[test]
fn stopped_server_gives_connect_error_after_retry_budget() {
    let mut server = S3Server::start(&[BUCKET]);
    let (_, store) = backend(&server, Naming::new("", false), 8);
    store
        .write_block(BlockId(1), Block::Data(&pattern(1)))
        .unwrap();
    server.stop();
    let started = Instant::now();
    let mut buf = vec![0u8; BS as usize];
    let err = store.read_block(BlockId(1), &mut buf).unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        matches!(err, Error::Connect(_) | Error::Timeout(_)),
        "{err}"
    );
    assert!(
        elapsed >= Duration::from_millis(300),
        "retried for the budget: {elapsed:?}"
    );
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    let mut report = s3backer::stats::StatsReport::default();
    store.stats(&mut report);
    assert_ne!(report.get("http_num_retries"), Some("0"));
}

#[test]
fn many_threads_round_trip_distinct_blocks() {
    const THREADS: u32 = 16;
    const PER_THREAD: u32 = 32;
    let server = S3Server::start(&[BUCKET]);
    let (_, store) = backend(&server, Naming::new("", false), THREADS * PER_THREAD);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let store = &store;
            s.spawn(move || {
                for i in 0..PER_THREAD {
                    let b = t * PER_THREAD + i;
                    store
                        .write_block(BlockId(b), Block::Data(&pattern(b)))
                        .unwrap();
                }
                for i in 0..PER_THREAD {
                    let b = t * PER_THREAD + i;
                    assert_eq!(read(store, b).0, pattern(b), "block {b}");
                }
            });
        }
    });
    assert_eq!(survey(&store, 16).len(), (THREADS * PER_THREAD) as usize);
}

#[test]
fn credentials_from_access_file() {
    let server = S3Server::start(&[BUCKET]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    std::fs::write(
        &file,
        format!("# keys\nother:nope\n{ACCESS_KEY}:{SECRET_KEY}\n"),
    )
    .unwrap();
    let mut opts = options(&server, Naming::new("", false));
    opts.credentials.access_key = None;
    opts.credentials.access_file = Some(file);
    let (_, store) = backend_with(opts, 8);
    store
        .write_block(BlockId(2), Block::Data(&pattern(2)))
        .unwrap();
    assert_eq!(read(&store, 2).0, pattern(2));
}

#[test]
fn credentials_from_environment() {
    let server = S3Server::start(&[BUCKET]);
    // SAFETY: the other tests of this binary pass explicit keys and never read these variables.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", ACCESS_KEY);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
    }
    // An accessFile without a usable line keeps a real ~/.s3backer_passwd out of the way.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    std::fs::write(&file, "# nothing here\n").unwrap();
    let mut opts = options(&server, Naming::new("", false));
    opts.credentials.access_id = None;
    opts.credentials.access_key = None;
    opts.credentials.access_file = Some(file);
    let (_, store) = backend_with(opts, 8);
    store
        .write_block(BlockId(2), Block::Data(&pattern(2)))
        .unwrap();
    assert_eq!(read(&store, 2).0, pattern(2));
    assert!(Path::new(&server.bucket_dir(BUCKET).join("00000002")).exists());
}

#[test]
fn anonymous_access_is_refused_by_the_server() {
    let server = S3Server::start(&[BUCKET]);
    let mut opts = options(&server, Naming::new("", false));
    opts.credentials.access_id = Some(String::new());
    let (_, store) = backend_with(opts, 8);
    let err = store
        .write_block(BlockId(1), Block::Data(&pattern(1)))
        .unwrap_err();
    assert!(matches!(err, Error::Forbidden(_)), "{err}");
}

#[test]
fn compressed_blocks_are_read_without_compress_configured() {
    let server = S3Server::start(&[BUCKET]);
    let client = Arc::new(S3Client::new(options(&server, Naming::new("", false))).unwrap());
    let geometry = Geometry::new(16 * u64::from(BS), BS).unwrap();
    let codec = |compression| {
        Arc::new(
            Codec::new(CodecConfig {
                compression,
                ..Default::default()
            })
            .unwrap(),
        )
    };
    let writer = S3Backend::new(
        client.clone(),
        geometry,
        codec(Some(s3backer::layer::codec::Compression::Zstd {
            level: None,
        })),
    );
    let data = vec![7u8; BS as usize];
    writer.write_block(BlockId(3), Block::Data(&data)).unwrap();
    let stored = std::fs::read(server.bucket_dir(BUCKET).join("00000003")).unwrap();
    assert!(
        stored.len() < 100,
        "stored compressed: {} bytes",
        stored.len()
    );
    let reader = S3Backend::new(client, geometry, codec(None));
    assert_eq!(read(&reader, 3), (data, false));
}

#[test]
fn if_match_reads_return_the_expected_version_or_stale() {
    let server = S3Server::start(&[BUCKET]);
    let (_, store) = backend(&server, Naming::new("", false), 8);
    let v1 = store
        .write_block(BlockId(3), Block::Data(&pattern(1)))
        .unwrap()
        .etag
        .unwrap();
    let mut buf = vec![0u8; BS as usize];
    let info = store.read_block_expect(BlockId(3), &mut buf, v1).unwrap();
    assert_eq!((buf.clone(), info.etag), (pattern(1), Some(v1)));

    let v2 = store
        .write_block(BlockId(3), Block::Data(&pattern(2)))
        .unwrap()
        .etag
        .unwrap();
    let err = store
        .read_block_expect(BlockId(3), &mut buf, v1)
        .unwrap_err();
    assert_eq!(err.errno(), libc::ESTALE, "{err}");
    store.write_block(BlockId(3), Block::Zero).unwrap();
    let err = store
        .read_block_expect(BlockId(3), &mut buf, v2)
        .unwrap_err();
    assert!(matches!(err, Error::Stale(_)), "absent object: {err}");

    let mut report = s3backer::stats::StatsReport::default();
    store.stats(&mut report);
    assert_eq!(report.get("http_stale"), Some("2"));
}

#[test]
fn ec_protect_over_s3_reads_back_writes_and_answers_zero_writes_locally() {
    use s3backer::layer::ec_protect::{EcProtect, EcProtectOptions};
    let server = S3Server::start(&[BUCKET]);
    let (_, store) = backend(&server, Naming::new("", false), 8);
    let ec = EcProtect::new(
        Arc::new(store),
        EcProtectOptions {
            cache_size: 8,
            cache_time: None,
            min_write_delay: Duration::from_millis(5),
            stale_retry_initial: Duration::from_millis(10),
            stale_retry_max: Duration::from_millis(200),
        },
    );
    for seed in 1..=3 {
        ec.write_block(BlockId(1), Block::Data(&pattern(seed)))
            .unwrap();
        assert_eq!(read(&ec, 1), (pattern(seed), false));
    }
    ec.write_block(BlockId(1), Block::Zero).unwrap();
    let mut report = s3backer::stats::StatsReport::default();
    ec.stats(&mut report);
    let gets = report.get("http_gets").unwrap().to_string();
    assert_eq!(read(&ec, 1), (vec![0u8; BS as usize], true));
    let mut report = s3backer::stats::StatsReport::default();
    ec.stats(&mut report);
    assert_eq!(report.get("http_gets"), Some(gets.as_str()), "no GET");
    assert_eq!(report.get("md5_cache_data_hits"), Some("1"));
    assert_eq!(report.get("http_stale"), Some("0"));
    assert!(!object_exists(&server, "00000001"));
}
