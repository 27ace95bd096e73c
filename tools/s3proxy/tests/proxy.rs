//! The proxy against the real S3 test server (s3s-fs, which checks SigV4 signatures and
//! Content-MD5), with a presigning client like s3backer's.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use s3proxy::{Fault, Proxy, ProxyConfig, Rule};

const BUCKET: &str = "bucket";

/// s3s-fs on a free loopback port (the main crate's tests/common fixture, reduced).
struct Server {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let home = std::env::var_os("HOME").expect("HOME");
        let bin = PathBuf::from(home).join(".cache/s3backer-rs/s3s-fs/bin/s3s-fs");
        assert!(bin.exists(), "run scripts/install-deps.sh");
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("data").join(BUCKET)).unwrap();
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = Command::new(&bin)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", "testkey", "--secret-key", "testsecret"])
                .arg(dir.path().join("data"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if TcpStream::connect(addr).is_ok() {
                    return Server {
                        child,
                        addr,
                        _dir: dir,
                    };
                }
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("s3s-fs did not start");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A presigning client (query-string SigV4 over the address it talks to, like s3backer).
struct Client {
    bucket: Bucket,
    creds: Credentials,
    agent: ureq::Agent,
}

type Reply = Result<(u16, Vec<u8>), ureq::Error>;

impl Client {
    fn new(addr: SocketAddr, timeout: Duration) -> Client {
        let url = format!("http://{addr}/").parse().unwrap();
        Client {
            bucket: Bucket::new(url, UrlStyle::Path, BUCKET, "us-east-1").unwrap(),
            creds: Credentials::new("testkey", "testsecret"),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(timeout))
                .build()
                .into(),
        }
    }

    fn put(&self, key: &str, body: &[u8]) -> Reply {
        let url = self
            .bucket
            .put_object(Some(&self.creds), key)
            .sign(Duration::from_secs(60));
        let mut r = self.agent.put(url.as_str()).send(body)?;
        Ok((r.status().as_u16(), r.body_mut().read_to_vec()?))
    }

    fn get(&self, key: &str) -> Reply {
        let url = self
            .bucket
            .get_object(Some(&self.creds), key)
            .sign(Duration::from_secs(60));
        let mut r = self.agent.get(url.as_str()).call()?;
        let status = r.status().as_u16();
        Ok((
            status,
            r.body_mut().with_config().limit(1 << 24).read_to_vec()?,
        ))
    }
}

fn body(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0; n];
    fastrand::Rng::with_seed(seed).fill(&mut v);
    v
}

fn setup(rules: Vec<Rule>) -> (Server, Proxy, Client, Client) {
    let server = Server::start();
    let mut config = ProxyConfig::new(server.addr);
    config.rules = rules;
    let proxy = Proxy::start(config).unwrap();
    let via = Client::new(proxy.addr(), Duration::from_secs(30));
    let direct = Client::new(server.addr, Duration::from_secs(30));
    (server, proxy, via, direct)
}

#[test]
fn signatures_survive_the_proxy_and_connections_are_kept_alive() {
    let (_server, proxy, via, direct) = setup(vec![]);
    for i in 0..20u64 {
        let data = body(100_000 + i as usize, i);
        assert_eq!(via.put(&format!("k{i}"), &data).unwrap().0, 200);
        assert_eq!(via.get(&format!("k{i}")).unwrap(), (200, data.clone()));
        assert_eq!(direct.get(&format!("k{i}")).unwrap(), (200, data));
    }
    assert_eq!(via.get("missing").unwrap().0, 404);
    let stats = proxy.stop();
    assert_eq!((stats.method("PUT"), stats.method("GET")), (20, 21));
    assert_eq!(stats.injected_total(), 0);
    assert!(stats.connections <= 2, "keep-alive: {stats:?}");
}

#[test]
fn delay_is_applied_to_concurrent_requests_at_once() {
    let (_server, proxy, via, _direct) = setup(vec![]);
    proxy.set_delay(Duration::from_millis(300));
    std::thread::scope(|s| {
        for i in 0..8 {
            let via = &via;
            s.spawn(move || assert_eq!(via.get(&format!("none{i}")).unwrap().0, 404));
        }
    });
    let stats = proxy.stop();
    // All eight were inside the proxy together: the delay does not serialise them.
    assert!(stats.peak_in_flight >= 4, "{stats:?}");
}

#[test]
fn status_and_slowdown_faults_are_not_forwarded() {
    let (_server, proxy, via, direct) = setup(vec![
        Rule::new(Fault::SlowDown).path_contains("/slow"),
        Rule::new(Fault::Status(500)).method("PUT").nth(2),
    ]);
    let (status, text) = via.put("slow", b"x").unwrap();
    assert_eq!(status, 503);
    assert!(String::from_utf8_lossy(&text).contains("<Code>SlowDown</Code>"));
    assert_eq!(direct.get("slow").unwrap().0, 404);
    assert_eq!(via.put("a", b"1").unwrap().0, 200);
    assert_eq!(via.put("b", b"2").unwrap().0, 500, "the 2nd PUT");
    assert_eq!(via.put("c", b"3").unwrap().0, 200);
    assert_eq!(direct.get("b").unwrap().0, 404);
    let stats = proxy.stop();
    assert_eq!(stats.injected.get("slowdown"), Some(&1));
    assert_eq!(stats.injected.get("status"), Some(&1));
}

#[test]
fn reset_and_stall_close_without_forwarding() {
    let (server, proxy, _via, direct) = setup(vec![
        Rule::new(Fault::Reset).path_contains("/r"),
        Rule::new(Fault::Stall(Duration::from_secs(3))).path_contains("/s"),
    ]);
    let impatient = Client::new(proxy.addr(), Duration::from_secs(1));
    assert!(impatient.put("r", b"x").is_err());
    assert!(impatient.put("s", b"x").is_err());
    assert_eq!(direct.get("r").unwrap().0, 404);
    assert_eq!(direct.get("s").unwrap().0, 404);
    let stats = proxy.stop();
    assert_eq!(stats.injected.get("reset"), Some(&1));
    assert_eq!(stats.injected.get("stall"), Some(&1));
    drop(server);
}

#[test]
fn truncate_and_corrupt_alter_only_the_response_body() {
    let (_server, proxy, via, direct) = setup(vec![
        Rule::new(Fault::Truncate).method("GET").path_contains("/t"),
        Rule::new(Fault::Corrupt).method("GET").path_contains("/c"),
    ]);
    let data = body(65536, 7);
    assert_eq!(via.put("t", &data).unwrap().0, 200);
    assert_eq!(via.put("c", &data).unwrap().0, 200);
    // Truncated: the client sees an error or a short body, never the full one.
    if let Ok((_, got)) = via.get("t") {
        assert!(got.len() < data.len());
    }
    let (status, got) = via.get("c").unwrap();
    assert_eq!(status, 200);
    let diff = got.iter().zip(&data).filter(|(a, b)| a != b).count();
    assert_eq!((got.len(), diff), (data.len(), 1));
    assert_eq!(direct.get("c").unwrap(), (200, data));
    let stats = proxy.stop();
    assert_eq!(stats.injected.get("truncate"), Some(&1));
    assert_eq!(stats.injected.get("corrupt"), Some(&1));
}

#[test]
fn dropped_put_response_still_applies_the_put() {
    let (_server, proxy, via, direct) = setup(vec![Rule::new(Fault::DropResponse).method("PUT")]);
    assert!(via.put("k", b"applied").is_err());
    assert_eq!(direct.get("k").unwrap(), (200, b"applied".to_vec()));
    assert_eq!(proxy.stop().injected.get("drop_response"), Some(&1));
}

#[test]
fn stale_get_returns_the_previous_version() {
    let (_server, proxy, via, direct) = setup(vec![]);
    assert_eq!(via.get("k").unwrap().0, 404);
    proxy.set_rules(vec![Rule::new(Fault::Stale).limit(1)]);
    assert_eq!(via.put("k", b"v1").unwrap().0, 200);
    assert_eq!(
        via.get("k").unwrap(),
        (200, b"v1".to_vec()),
        "nothing stale yet"
    );
    assert_eq!(via.put("k", b"v2").unwrap().0, 200);
    assert_eq!(via.get("k").unwrap(), (200, b"v1".to_vec()), "stale");
    assert_eq!(via.get("k").unwrap(), (200, b"v2".to_vec()), "limit 1");
    assert_eq!(direct.get("k").unwrap(), (200, b"v2".to_vec()));
    assert_eq!(proxy.stop().injected.get("stale"), Some(&1));
}

#[test]
fn seeded_probability_is_reproducible() {
    let run = || {
        let (_server, proxy, via, _direct) =
            setup(vec![Rule::new(Fault::Status(503)).probability(0.3)]);
        let failed: Vec<bool> = (0..40)
            .map(|i| via.get(&format!("k{i}")).unwrap().0 == 503)
            .collect();
        assert_eq!(
            proxy.stop().injected_total() as usize,
            failed.iter().filter(|f| **f).count()
        );
        failed
    };
    let first = run();
    let hits = first.iter().filter(|f| **f).count();
    assert!((1..40).contains(&hits), "p=0.3 of 40: {hits}");
    assert_eq!(run(), first);
}

#[test]
fn cli_prints_its_address_and_writes_counters_on_sigterm() {
    use std::io::BufRead;
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let stats_file = dir.path().join("stats");
    let mut child = Command::new(env!("CARGO_BIN_EXE_s3proxy"))
        .args([
            "--upstream",
            &server.addr.to_string(),
            "--fault",
            "503,nth=1",
        ])
        .arg("--stats-file")
        .arg(&stats_file)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: SocketAddr = line.trim().parse().unwrap();
    let via = Client::new(addr, Duration::from_secs(30));
    assert_eq!(via.get("a").unwrap().0, 503);
    assert_eq!(via.get("a").unwrap().0, 404);
    // SAFETY: signals our own child by its PID.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&stats_file).unwrap();
    assert!(text.contains("requests_GET 2\n"), "{text}");
    assert!(text.contains("injected_status 1\n"), "{text}");
}
