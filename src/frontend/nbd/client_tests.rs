//! The NBD server against real clients (libnbd's nbdinfo/nbdcopy, qemu-img, qemu-io) and a
//! raw-socket client for the protocol corners real clients never exercise.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::RngExt;

use super::protocol as p;
use super::server::{NbdOptions, serve};
use crate::backend::memory::MemoryBackend;
use crate::error::{Error, Result};
use crate::geometry::{BlockId, Geometry};
use crate::stats::StatsReport;
use crate::store::{Block, BlockStore, ReadInfo, WriteInfo};

const BS: u32 = 64 << 10;
const SIZE: u64 = 64 << 20;
/// Bound on every external client run.
const CLIENT_TIMEOUT_SECS: &str = "120";

/// A server on a unix socket in a temp dir, serving a memory disk from a thread of this
/// process; stopped and joined on drop.
struct TestServer {
    dir: tempfile::TempDir,
    mem: Arc<MemoryBackend>,
    flushes: Arc<Probe>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl TestServer {
    fn start() -> Self {
        Self::start_with(Duration::ZERO, |_| {})
    }

    fn start_with(latency: Duration, tweak: impl FnOnce(&mut NbdOptions)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let geometry = Geometry::new(SIZE, BS).unwrap();
        let mem = Arc::new(MemoryBackend::with_latency(geometry, latency));
        let mut opts = NbdOptions {
            unix_socket: Some(dir.path().join("nbd.sock")),
            export_name: "disk".into(),
            description: "memory test disk".into(),
            ..NbdOptions::default()
        };
        tweak(&mut opts);
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let flushes = Arc::new(Probe {
            inner: mem.clone(),
            count: AtomicUsize::new(0),
            fail: AtomicBool::new(false),
            reads: AtomicUsize::new(0),
            known_zero_from: AtomicU32::new(u32::MAX),
        });
        let store: Arc<dyn BlockStore> = flushes.clone();
        let thread_stop = stop.clone();
        let thread = std::thread::spawn(move || {
            serve(
                store,
                &opts,
                move || ready_tx.send(()).unwrap(),
                thread_stop,
            )
        });
        let mut server = TestServer {
            dir,
            mem,
            flushes,
            stop,
            thread: Some(thread),
        };
        if ready_rx.recv_timeout(Duration::from_secs(20)).is_err() {
            let result = server.thread.take().unwrap().join().unwrap();
            panic!("NBD server did not become ready: {result:?}");
        }
        server
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("nbd.sock")
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///disk?socket={}", self.socket().display())
    }

    /// Stops the server; returns what `serve` returned.
    fn stop(mut self) -> Result<()> {
        self.stop_and_join().expect("serve thread")
    }

    fn stop_and_join(&mut self) -> Option<Result<()>> {
        let thread = self.thread.take()?;
        self.stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !thread.is_finished() {
            eprintln!("NBD serve thread did not finish");
            return None;
        }
        Some(thread.join().unwrap())
    }

    fn write_block(&self, block: u32, byte: u8) {
        let data = vec![byte; BS as usize];
        self.mem
            .write_block(BlockId(block), Block::Data(&data))
            .unwrap();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Counts store flushes (and can make them fail) and block reads, and claims to know that
/// blocks from `known_zero_from` on are zero; everything else goes to the memory disk.
struct Probe {
    inner: Arc<MemoryBackend>,
    count: AtomicUsize,
    fail: AtomicBool,
    reads: AtomicUsize,
    known_zero_from: AtomicU32,
}

impl Probe {
    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl BlockStore for Probe {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }
    fn read_block(&self, block: BlockId, buf: &mut [u8]) -> Result<ReadInfo> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read_block(block, buf)
    }
    fn write_block(&self, block: BlockId, data: Block<'_>) -> Result<WriteInfo> {
        self.inner.write_block(block, data)
    }
    fn known_zero(&self, block: BlockId) -> bool {
        block.0 >= self.known_zero_from.load(Ordering::SeqCst)
    }
    fn flush(&self) -> Result<()> {
        self.count.fetch_add(1, Ordering::SeqCst);
        if self.fail.load(Ordering::SeqCst) {
            return Err(Error::Other("injected flush failure".into()));
        }
        Ok(())
    }
    fn survey_non_zero(&self, threads: usize, found: &(dyn Fn(BlockId) + Sync)) -> Result<()> {
        self.inner.survey_non_zero(threads, found)
    }
    fn stats(&self, report: &mut StatsReport) {
        self.inner.stats(report)
    }
    fn reset_stats(&self) {
        self.inner.reset_stats()
    }
}

/// Runs an external client under a time limit.
fn run(program: &str, args: &[&str]) -> Output {
    let output = Process::new("timeout")
        .arg(CLIENT_TIMEOUT_SECS)
        .arg(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {program}: {err}"));
    if output.status.code() == Some(127) {
        panic!("{program} is missing: run scripts/install-deps.sh (libnbd-bin, qemu-utils)");
    }
    output
}

/// Runs a client that must succeed; returns its stdout.
fn run_ok(program: &str, args: &[&str]) -> String {
    let output = run(program, args);
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::rng().fill(&mut data[..]);
    data
}

#[test]
fn nbdinfo_reports_size_block_sizes_and_capabilities() {
    let server = TestServer::start();
    let json = run_ok("nbdinfo", &["--json", &server.uri()]);
    let info: serde_json::Value = serde_json::from_str(&json).unwrap();
    let export = &info["exports"][0];
    println!("{export:#}");
    assert_eq!(export["export-size"], SIZE);
    assert_eq!(export["block_size_minimum"], 1);
    assert_eq!(export["block_size_preferred"], BS);
    assert_eq!(export["block_size_maximum"], p::MAX_PAYLOAD);
    assert_eq!(export["description"], "memory test disk");
    for yes in [
        "can_trim",
        "can_zero",
        "can_flush",
        "can_multi_conn",
        "can_fua",
        "can_cache",
    ] {
        assert_eq!(export[yes], true, "{yes}");
    }
    assert_eq!(export["is_read_only"], false);
}

/// Runs qemu-io commands against the export; fails on any error it reports.
fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for command in commands {
        args.extend(["-c", command]);
    }
    args.push(uri);
    let output = run("qemu-io", &args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && !text.contains("failed") && !text.contains("error"),
        "qemu-io {commands:?}: {text}"
    );
    text
}

#[test]
fn nbdinfo_shows_read_only_export() {
    let server = TestServer::start_with(Duration::ZERO, |o| o.read_only = true);
    let json = run_ok("nbdinfo", &["--json", &server.uri()]);
    let info: serde_json::Value = serde_json::from_str(&json).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["is_read_only"], true);
    assert_eq!(export["can_trim"], false);
    assert_eq!(export["can_zero"], false);
}

#[test]
fn nbdinfo_map_reports_holes_for_unwritten_blocks() {
    let server = TestServer::start();
    server.write_block(2, 7);
    server.write_block(3, 9);
    let map = run_ok("nbdinfo", &["--map", &server.uri()]);
    let extents: Vec<(u64, u64, u32)> = map
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    let bs = u64::from(BS);
    assert_eq!(
        extents,
        vec![
            (0, 2 * bs, 3),
            (2 * bs, 2 * bs, 0),
            (4 * bs, SIZE - 4 * bs, 3)
        ],
        "{map}"
    );
}

#[test]
fn block_status_reads_only_blocks_not_known_to_be_zero() {
    let server = TestServer::start();
    server.write_block(0, 5);
    server.flushes.known_zero_from.store(2, Ordering::SeqCst);
    let map = run_ok("nbdinfo", &["--map", &server.uri()]);
    let bs = u64::from(BS);
    assert_eq!(
        map.lines()
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>(),
        [format!("0 {bs} 0"), format!("{bs} {} 3", SIZE - bs),],
        "{map}"
    );
    // Blocks 0 and 1 were read to find out; the known-zero rest cost nothing.
    assert_eq!(server.flushes.reads.load(Ordering::SeqCst), 2);
}

#[test]
fn nbdcopy_round_trip_is_byte_identical_and_qemu_img_agrees() {
    // Latency makes requests overlap in the store, as over S3.
    let server = TestServer::start_with(Duration::from_millis(2), |_| {});
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("in.img");
    let out = dir.path().join("out.img");
    let mut data = random_bytes(SIZE as usize);
    // Some zero blocks, to travel as holes.
    data[(5 * BS) as usize..(9 * BS) as usize].fill(0);
    std::fs::write(&image, &data).unwrap();
    let image_arg = image.to_str().unwrap();
    run_ok("nbdcopy", &[image_arg, &server.uri()]);
    run_ok("nbdcopy", &[&server.uri(), out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == data, "copy differs");
    assert_eq!(server.mem.stored(BlockId(6)), None, "zero block stored");
    let compare = run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            image_arg,
            &server.uri(),
        ],
    );
    assert!(compare.contains("Images are identical"), "{compare}");
}

#[test]
fn qemu_io_unaligned_writes_zeroes_discard_and_flush() {
    let server = TestServer::start_with(Duration::from_millis(1), |_| {});
    let bs = u64::from(BS);
    let edge = bs - 1000; // crosses the block 0/1 boundary
    qemu_io(
        &server.uri(),
        &[
            &format!("write -P 0xab {edge} 5000"),
            &format!("read -P 0xab {edge} 5000"),
            &format!("read -P 0 0 {edge}"),
            &format!("write -P 0xcd {} 3000", 4 * bs),
            &format!("write -z {} 1000", 4 * bs + 1000),
            &format!("read -P 0xcd {} 1000", 4 * bs),
            &format!("read -P 0 {} 1000", 4 * bs + 1000),
            &format!("read -P 0xcd {} 1000", 4 * bs + 2000),
            "flush",
        ],
    );
    let block1 = server.mem.stored(BlockId(1)).expect("block 1 stored");
    assert!(block1[..4000].iter().all(|&b| b == 0xab) && block1[4000..].iter().all(|&b| b == 0));
    // Discarding blocks 0..2 entirely deletes them; a discard inside a block changes nothing.
    qemu_io(
        &server.uri(),
        &[
            &format!("discard {} 100", 4 * bs),
            &format!("discard 0 {}", 2 * bs),
        ],
    );
    assert_eq!(server.mem.stored(BlockId(0)), None);
    assert_eq!(server.mem.stored(BlockId(1)), None);
    assert!(server.mem.stored(BlockId(4)).is_some());
    qemu_io(&server.uri(), &[&format!("read -P 0 0 {}", 2 * bs)]);
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let server = TestServer::start_with(Duration::ZERO, |o| o.read_only = true);
    server.write_block(0, 5);
    let output = run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 0 512", &server.uri()],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // qemu refuses to open a read-only export for writing at all.
    assert!(
        !output.status.success() && text.contains("Permission denied"),
        "{text}"
    );
    assert_eq!(server.mem.stored(BlockId(0)), Some(vec![5; BS as usize]));
    // Raw protocol: the server itself refuses, whatever the client believes.
    let mut client = RawClient::connect(&server.socket());
    client.go(false, false);
    client.request(p::CMD_WRITE, 0, 1, 0, &[1; 512]);
    assert_eq!(client.simple_reply(), (p::EPERM, 1));
    client.request(p::CMD_TRIM, 0, 2, 0, &[]);
    assert_eq!(client.simple_reply().0, p::EPERM);
    assert_eq!(server.mem.stored(BlockId(0)), Some(vec![5; BS as usize]));
}

#[test]
fn stop_finishes_flushes_and_removes_the_socket() {
    let server = TestServer::start();
    let socket = server.socket();
    let mut idle = RawClient::connect(&socket);
    idle.go(false, false);
    let started = Instant::now();
    server.stop().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!socket.exists(), "socket file left behind");
    // The connected client sees the connection end.
    let mut byte = [0u8; 1];
    assert!(matches!(idle.stream.read(&mut byte), Ok(0) | Err(_)));
}

// ---------------------------------------------------------------------------------------
// Raw protocol client

/// A hand-driven client for requests no real client sends.
struct RawClient {
    stream: UnixStream,
}

impl RawClient {
    fn connect(socket: &Path) -> Self {
        let stream = UnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut client = RawClient { stream };
        let mut greeting = [0u8; 18];
        client.stream.read_exact(&mut greeting).unwrap();
        assert_eq!(greeting, p::encode_greeting());
        client
            .stream
            .write_all(&(p::FLAG_C_FIXED_NEWSTYLE | p::FLAG_C_NO_ZEROES).to_be_bytes())
            .unwrap();
        client
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut msg = p::IHAVEOPT.to_be_bytes().to_vec();
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(data);
        self.stream.write_all(&msg).unwrap();
    }

    /// (option, reply type, data)
    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.stream.read_exact(&mut h).unwrap();
        assert_eq!(&h[0..8], &p::OPTION_REPLY_MAGIC.to_be_bytes());
        let be = |r: std::ops::Range<usize>| u32::from_be_bytes(h[r].try_into().unwrap());
        let mut data = vec![0u8; be(16..20) as usize];
        self.stream.read_exact(&mut data).unwrap();
        (be(8..12), be(12..16), data)
    }

    fn expect_ack(&mut self, option: u32) {
        let (opt, reply, data) = self.option_reply();
        assert_eq!((opt, reply), (option, p::REP_ACK), "{data:?}");
    }

    /// Negotiates and enters transmission with NBD_OPT_GO; returns the transmission flags.
    fn go(&mut self, structured: bool, base_allocation: bool) -> u16 {
        if structured {
            self.option(p::OPT_STRUCTURED_REPLY, &[]);
            self.expect_ack(p::OPT_STRUCTURED_REPLY);
        }
        if base_allocation {
            let mut data = 0u32.to_be_bytes().to_vec();
            data.extend_from_slice(&1u32.to_be_bytes());
            data.extend_from_slice(&(p::BASE_ALLOCATION.len() as u32).to_be_bytes());
            data.extend_from_slice(p::BASE_ALLOCATION.as_bytes());
            self.option(p::OPT_SET_META_CONTEXT, &data);
            let (_, reply, data) = self.option_reply();
            assert_eq!(reply, p::REP_META_CONTEXT);
            assert_eq!(&data[0..4], &p::BASE_ALLOCATION_ID.to_be_bytes());
            self.expect_ack(p::OPT_SET_META_CONTEXT);
        }
        let mut data = 0u32.to_be_bytes().to_vec();
        data.extend_from_slice(&0u16.to_be_bytes());
        self.option(p::OPT_GO, &data);
        let mut flags = None;
        loop {
            let (_, reply, data) = self.option_reply();
            match reply {
                p::REP_ACK => break,
                p::REP_INFO if data[0..2] == p::INFO_EXPORT.to_be_bytes() => {
                    assert_eq!(&data[2..10], &SIZE.to_be_bytes());
                    flags = Some(u16::from_be_bytes([data[10], data[11]]));
                }
                p::REP_INFO => {}
                other => panic!("unexpected reply {other:#x} to GO"),
            }
        }
        flags.expect("NBD_INFO_EXPORT")
    }

    fn request(&mut self, command: u16, flags: u16, cookie: u64, offset: u64, payload: &[u8]) {
        self.request_len(command, flags, cookie, offset, payload.len() as u32);
        self.stream.write_all(payload).unwrap();
    }

    fn request_len(&mut self, command: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        let mut msg = p::REQUEST_MAGIC.to_be_bytes().to_vec();
        msg.extend_from_slice(&flags.to_be_bytes());
        msg.extend_from_slice(&command.to_be_bytes());
        msg.extend_from_slice(&cookie.to_be_bytes());
        msg.extend_from_slice(&offset.to_be_bytes());
        msg.extend_from_slice(&len.to_be_bytes());
        self.stream.write_all(&msg).unwrap();
    }

    /// (error, cookie) of a simple reply.
    fn simple_reply(&mut self) -> (u32, u64) {
        let mut r = [0u8; 16];
        self.stream.read_exact(&mut r).unwrap();
        assert_eq!(&r[0..4], &p::SIMPLE_REPLY_MAGIC.to_be_bytes());
        (
            u32::from_be_bytes(r[4..8].try_into().unwrap()),
            u64::from_be_bytes(r[8..16].try_into().unwrap()),
        )
    }

    fn read_data(&mut self, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        self.stream.read_exact(&mut data).unwrap();
        data
    }

    /// (flags, type, cookie, payload) of a structured reply chunk.
    fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let mut h = [0u8; 20];
        self.stream.read_exact(&mut h).unwrap();
        assert_eq!(&h[0..4], &p::STRUCTURED_REPLY_MAGIC.to_be_bytes());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        (
            u16::from_be_bytes([h[4], h[5]]),
            u16::from_be_bytes([h[6], h[7]]),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
            self.read_data(len as usize),
        )
    }

    /// True when the server closed the connection (EOF or reset, not a timeout).
    fn is_closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        match self.stream.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(err) => !matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }
}

#[test]
fn options_unknown_list_info_and_abort() {
    let server = TestServer::start();
    let mut client = RawClient::connect(&server.socket());
    client.option(99, &[1, 2, 3]);
    assert_eq!(client.option_reply().1, p::REP_ERR_UNSUP);
    client.option(p::OPT_LIST, &[]);
    let (_, reply, data) = client.option_reply();
    assert_eq!(reply, p::REP_SERVER);
    assert_eq!(&data[4..8], b"disk");
    client.expect_ack(p::OPT_LIST);
    // Meta contexts need structured replies first.
    client.option(p::OPT_LIST_META_CONTEXT, &[0; 8]);
    assert_eq!(client.option_reply().1, p::REP_ERR_INVALID);
    // An unknown export name is refused, a malformed option is invalid.
    let mut info = 5u32.to_be_bytes().to_vec();
    info.extend_from_slice(b"other");
    info.extend_from_slice(&0u16.to_be_bytes());
    client.option(p::OPT_INFO, &info);
    assert_eq!(client.option_reply().1, p::REP_ERR_UNKNOWN);
    client.option(p::OPT_INFO, &[0, 0, 0, 9]);
    assert_eq!(client.option_reply().1, p::REP_ERR_INVALID);
    client.option(p::OPT_ABORT, &[]);
    client.expect_ack(p::OPT_ABORT);
    assert!(client.is_closed());
}

#[test]
fn oversize_option_is_skipped_and_refused() {
    let server = TestServer::start();
    let mut client = RawClient::connect(&server.socket());
    client.option(99, &vec![0u8; p::MAX_OPTION_LEN as usize + 1]);
    assert_eq!(client.option_reply().1, p::REP_ERR_TOO_BIG);
    assert_ne!(client.go(false, false) & p::FLAG_HAS_FLAGS, 0);
}

#[test]
fn export_name_option_enters_transmission_without_zeroes() {
    let server = TestServer::start();
    let mut client = RawClient::connect(&server.socket());
    client.option(p::OPT_EXPORT_NAME, b"disk");
    let reply = client.read_data(10);
    assert_eq!(&reply[0..8], &SIZE.to_be_bytes());
    client.request(p::CMD_WRITE, 0, 1, 100, &[3; 10]);
    assert_eq!(client.simple_reply(), (0, 1));
    client.request_len(p::CMD_READ, 0, 2, 100, 10);
    assert_eq!(client.simple_reply(), (0, 2));
    assert_eq!(client.read_data(10), vec![3; 10]);
    // An unknown export cannot be refused politely: the connection is closed.
    let mut other = RawClient::connect(&server.socket());
    other.option(p::OPT_EXPORT_NAME, b"nope");
    assert!(other.is_closed());
}

#[test]
fn bad_requests_get_protocol_errors_and_the_connection_survives() {
    let server = TestServer::start();
    let mut client = RawClient::connect(&server.socket());
    client.go(false, false);
    client.request_len(42, 0, 1, 0, 0);
    assert_eq!(client.simple_reply(), (p::EINVAL, 1));
    client.request_len(p::CMD_READ, 0, 2, SIZE - 10, 11);
    assert_eq!(client.simple_reply(), (p::EINVAL, 2));
    client.request(p::CMD_WRITE, 0, 3, SIZE - 1, &[1, 2]);
    assert_eq!(client.simple_reply(), (p::ENOSPC, 3));
    client.request_len(p::CMD_READ, 0, 4, 0, p::MAX_PAYLOAD + 1);
    assert_eq!(client.simple_reply(), (p::EOVERFLOW, 4));
    // An oversize write's payload is skipped, keeping the framing.
    client.request(
        p::CMD_WRITE,
        0,
        5,
        0,
        &vec![9u8; p::MAX_PAYLOAD as usize + 1],
    );
    assert_eq!(client.simple_reply(), (p::EOVERFLOW, 5));
    client.request_len(p::CMD_READ, p::CMD_FLAG_DF, 6, 0, 1);
    assert_eq!(
        client.simple_reply(),
        (p::EINVAL, 6),
        "DF without structured replies"
    );
    client.request_len(p::CMD_BLOCK_STATUS, 0, 7, 0, 512);
    assert_eq!(
        client.simple_reply(),
        (p::EINVAL, 7),
        "no meta context negotiated"
    );
    assert_eq!(server.mem.stored_count(), 0);
    client.request_len(p::CMD_READ, 0, 8, 0, 4);
    assert_eq!(client.simple_reply(), (0, 8));
    assert_eq!(client.read_data(4), vec![0; 4]);
    client.request_len(p::CMD_DISC, 0, 9, 0, 0);
    assert!(client.is_closed());
}

#[test]
fn bad_magic_and_abrupt_disconnects_only_cost_their_own_connection() {
    let server = TestServer::start();
    let mut bystander = RawClient::connect(&server.socket());
    bystander.go(false, false);

    let mut garbage = RawClient::connect(&server.socket());
    garbage.go(false, false);
    garbage.stream.write_all(&[0xee; 28]).unwrap();
    assert!(garbage.is_closed());

    // A write cut off halfway through its payload.
    let mut quitter = RawClient::connect(&server.socket());
    quitter.go(true, false);
    quitter.request_len(p::CMD_WRITE, 0, 1, 0, 4096);
    quitter.stream.write_all(&[1; 100]).unwrap();
    drop(quitter);
    // Garbage during the handshake.
    let mut rude = UnixStream::connect(server.socket()).unwrap();
    rude.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    drop(rude);

    bystander.request(p::CMD_WRITE, 0, 1, 0, &[7; 100]);
    assert_eq!(bystander.simple_reply(), (0, 1));
    let mut fresh = RawClient::connect(&server.socket());
    fresh.go(false, false);
    fresh.request_len(p::CMD_READ, 0, 2, 0, 100);
    assert_eq!(fresh.simple_reply(), (0, 2));
    assert_eq!(fresh.read_data(100), vec![7; 100]);
}

#[test]
fn structured_read_sends_holes_for_zero_blocks() {
    let server = TestServer::start();
    server.write_block(1, 4);
    let mut client = RawClient::connect(&server.socket());
    let flags = client.go(true, false);
    assert_ne!(flags & p::FLAG_SEND_DF, 0);
    let bs = u64::from(BS);
    client.request_len(p::CMD_READ, 0, 1, 100, 3 * BS - 200);
    let mut chunks = Vec::new();
    for _ in 0..3 {
        chunks.push(client.chunk());
    }
    let hole = |offset: u64, len: u64| {
        let mut d = offset.to_be_bytes().to_vec();
        d.extend_from_slice(&(len as u32).to_be_bytes());
        d
    };
    assert_eq!(
        chunks[0],
        (0, p::REPLY_TYPE_OFFSET_HOLE, 1, hole(100, bs - 100))
    );
    assert_eq!((chunks[1].0, chunks[1].1), (0, p::REPLY_TYPE_OFFSET_DATA));
    assert_eq!(&chunks[1].3[0..8], &bs.to_be_bytes());
    assert_eq!(&chunks[1].3[8..], &vec![4u8; BS as usize][..]);
    let last = (p::REPLY_FLAG_DONE, p::REPLY_TYPE_OFFSET_HOLE, 1);
    assert_eq!(chunks[2], (last.0, last.1, last.2, hole(2 * bs, bs - 100)));
    // With DF the same read is one data chunk.
    client.request_len(p::CMD_READ, p::CMD_FLAG_DF, 2, 0, 2 * BS);
    let (flags, kind, cookie, payload) = client.chunk();
    assert_eq!(
        (flags, kind, cookie),
        (p::REPLY_FLAG_DONE, p::REPLY_TYPE_OFFSET_DATA, 2)
    );
    assert_eq!(payload.len(), 8 + 2 * BS as usize);
    // Errors of a structured read come as an error chunk.
    client.request_len(p::CMD_READ, 0, 3, SIZE, 1);
    let (flags, kind, cookie, payload) = client.chunk();
    assert_eq!(
        (flags, kind, cookie),
        (p::REPLY_FLAG_DONE, p::REPLY_TYPE_ERROR, 3)
    );
    assert_eq!(&payload[0..4], &p::EINVAL.to_be_bytes());
}

#[test]
fn block_status_reports_holes_and_honours_req_one() {
    let server = TestServer::start();
    server.write_block(2, 1);
    let mut client = RawClient::connect(&server.socket());
    client.go(true, true);
    let bs = BS;
    client.request_len(p::CMD_BLOCK_STATUS, 0, 1, 10, 4 * bs);
    let (flags, kind, cookie, payload) = client.chunk();
    assert_eq!(
        (flags, kind, cookie),
        (p::REPLY_FLAG_DONE, p::REPLY_TYPE_BLOCK_STATUS, 1)
    );
    let words: Vec<u32> = payload
        .chunks(4)
        .map(|w| u32::from_be_bytes(w.try_into().unwrap()))
        .collect();
    assert_eq!(
        words,
        vec![p::BASE_ALLOCATION_ID, 2 * bs - 10, 3, bs, 0, bs + 10, 3]
    );
    client.request_len(p::CMD_BLOCK_STATUS, p::CMD_FLAG_REQ_ONE, 2, 0, 4 * bs);
    let payload = client.chunk().3;
    assert_eq!(payload.len(), 12);
}

#[test]
fn many_requests_of_one_connection_run_at_once() {
    let latency = Duration::from_millis(40);
    let server = TestServer::start_with(latency, |_| {});
    let mut client = RawClient::connect(&server.socket());
    client.go(false, false);
    const REQUESTS: u64 = 32;
    let started = Instant::now();
    for cookie in 0..REQUESTS {
        client.request_len(p::CMD_READ, 0, cookie, cookie * u64::from(BS), BS);
    }
    let mut seen = Vec::new();
    for _ in 0..REQUESTS {
        let (error, cookie) = client.simple_reply();
        assert_eq!(error, 0);
        client.read_data(BS as usize);
        seen.push(cookie);
    }
    let elapsed = started.elapsed();
    seen.sort_unstable();
    assert_eq!(seen, (0..REQUESTS).collect::<Vec<_>>());
    // Serially this takes REQUESTS * latency (1.28 s).
    assert!(
        elapsed < latency * (REQUESTS as u32) / 3,
        "took {elapsed:?}"
    );
}

#[test]
fn flush_and_fua_flush_the_store_and_zeroes_delete_blocks() {
    let server = TestServer::start();
    let mut client = RawClient::connect(&server.socket());
    client.go(true, false);
    client.request(p::CMD_WRITE, 0, 1, 0, &vec![5; BS as usize]);
    assert_eq!(client.simple_reply(), (0, 1));
    assert_eq!(server.flushes.count(), 0);
    client.request(p::CMD_WRITE, p::CMD_FLAG_FUA, 2, 0, &vec![6; BS as usize]);
    assert_eq!(client.simple_reply(), (0, 2));
    assert_eq!(server.flushes.count(), 1);
    assert_eq!(server.mem.stored(BlockId(0)), Some(vec![6; BS as usize]));
    client.request_len(p::CMD_WRITE_ZEROES, p::CMD_FLAG_NO_HOLE, 3, 0, BS);
    assert_eq!(client.simple_reply(), (0, 3));
    assert_eq!(server.mem.stored(BlockId(0)), None);
    client.request_len(p::CMD_FLUSH, 0, 4, 0, 0);
    assert_eq!(client.simple_reply(), (0, 4));
    assert_eq!(server.flushes.count(), 2);
    client.request_len(p::CMD_CACHE, 0, 5, 0, BS);
    assert_eq!(client.simple_reply(), (0, 5));
}

#[test]
fn failed_flushes_are_reported_to_the_client_and_by_serve() {
    let server = TestServer::start();
    server.flushes.fail.store(true, Ordering::SeqCst);
    let mut client = RawClient::connect(&server.socket());
    client.go(true, false);
    client.request_len(p::CMD_FLUSH, 0, 1, 0, 0);
    let (flags, kind, cookie, payload) = client.chunk();
    assert_eq!(
        (flags, kind, cookie),
        (p::REPLY_FLAG_DONE, p::REPLY_TYPE_ERROR, 1)
    );
    assert_eq!(&payload[0..4], &p::EIO.to_be_bytes());
    assert!(String::from_utf8_lossy(&payload[6..]).contains("injected flush failure"));
    let err = server.stop().unwrap_err();
    assert!(err.to_string().contains("injected flush failure"), "{err}");
}

#[test]
fn stop_waits_for_in_flight_requests() {
    let server = TestServer::start_with(Duration::from_millis(300), |_| {});
    let mut client = RawClient::connect(&server.socket());
    client.go(false, false);
    client.request(p::CMD_WRITE, 0, 1, 0, &[8; 512]);
    // Let the server read the request and start the slow store write.
    std::thread::sleep(Duration::from_millis(100));
    let mem = server.mem.clone();
    server.stop().unwrap();
    assert_eq!(client.simple_reply(), (0, 1));
    assert_eq!(
        &mem.stored(BlockId(0)).expect("write completed")[..512],
        &[8; 512]
    );
    assert!(client.is_closed());
}

#[test]
fn tcp_export_serves_loopback_clients() {
    // A free port: bind, read it, release (a race with other processes is unlikely here).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = TestServer::start_with(Duration::ZERO, |o| {
        o.unix_socket = None;
        o.tcp = Some(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    });
    assert!(!server.socket().exists());
    let uri = format!("nbd://127.0.0.1:{port}/disk");
    qemu_io(&uri, &["write -P 0x5a 123 4567", "read -P 0x5a 123 4567"]);
    let json = run_ok("nbdinfo", &["--json", &uri]);
    assert!(json.contains(&format!("\"export-size\": {SIZE}")), "{json}");
}
