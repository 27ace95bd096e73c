//! An HTTP/1.1 proxy on loopback in front of an S3 test server, for benchmarks and reliability
//! tests: it adds a fixed latency to every request and injects faults by rule or by seeded chance.
//!
//! SigV4 signs the `host` header (both header and query-string signing), so the proxy forwards the
//! client's `Host` unchanged: the upstream server then checks the signature against the host:port
//! the client signed (the proxy's), and the signature survives the change of port. Rewriting `Host`
//! to the upstream address would break every signature.
//!
//! One thread per client connection (bounded by `max_connections`), each with its own keep-alive
//! upstream connection, so the delay is applied to all connections at once, never serialised.
//! Bodies are buffered whole (S3 blocks are small), which lets faults cut or alter them.
//!
//! ```no_run
//! use s3proxy::{Fault, Proxy, ProxyConfig, Rule};
//! let upstream = "127.0.0.1:9000".parse().unwrap();
//! let mut config = ProxyConfig::new(upstream);
//! config.rules.push(Rule::new(Fault::Status(503)).probability(0.05));
//! let proxy = Proxy::start(config).unwrap();
//! println!("point the client at http://{}/", proxy.addr());
//! println!("{} faults so far", proxy.stats().injected_total());
//! proxy.stop();
//! ```

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;
/// Upstream reads give up after this long (s3s-fs answers in milliseconds).
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(120);

/// What to do instead of (or to) a proxied request.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// Answer with this status and an S3 `InternalError`/`ServiceUnavailable` XML body; not forwarded.
    Status(u16),
    /// Answer 503 with S3's `SlowDown` error code; not forwarded.
    SlowDown,
    /// Reset the client connection (RST) without forwarding.
    Reset,
    /// Hold the request this long, then close the connection without forwarding it.
    Stall(Duration),
    /// GET only: forward, then send the headers and only half of the response body, and close.
    Truncate,
    /// GET only: forward, then flip one byte of the response body (headers, ETag included, unchanged).
    Corrupt,
    /// Forward (the server applies it), then close the connection without any response.
    DropResponse,
    /// For a GET of a key changed (PUT/DELETE) since the proxy last saw a GET of it: replay that
    /// earlier response verbatim (conditional headers ignored), as a lagging replica would.
    Stale,
}

impl Fault {
    fn name(&self) -> &'static str {
        match self {
            Fault::Status(_) => "status",
            Fault::SlowDown => "slowdown",
            Fault::Reset => "reset",
            Fault::Stall(_) => "stall",
            Fault::Truncate => "truncate",
            Fault::Corrupt => "corrupt",
            Fault::DropResponse => "drop_response",
            Fault::Stale => "stale",
        }
    }
}

/// When a fault fires. A request matches when its method and path filters match; among matching
/// requests the rule fires on the `nth` one only (if set), with `probability`, at most `limit`
/// times. The first rule that fires wins.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub fault: Fault,
    /// e.g. "PUT"; None = any.
    pub method: Option<String>,
    /// Substring of the request path (query excluded), e.g. "/bucket/0000001"; None = any.
    pub path_contains: Option<String>,
    /// 1-based index among matching requests; None = every matching request.
    pub nth: Option<u64>,
    pub probability: f64,
    pub limit: Option<u64>,
}

impl Rule {
    pub fn new(fault: Fault) -> Rule {
        Rule {
            fault,
            method: None,
            path_contains: None,
            nth: None,
            probability: 1.0,
            limit: None,
        }
    }
    pub fn method(mut self, method: &str) -> Rule {
        self.method = Some(method.to_ascii_uppercase());
        self
    }
    pub fn path_contains(mut self, s: &str) -> Rule {
        self.path_contains = Some(s.to_string());
        self
    }
    pub fn nth(mut self, n: u64) -> Rule {
        self.nth = Some(n);
        self
    }
    pub fn probability(mut self, p: f64) -> Rule {
        self.probability = p;
        self
    }
    pub fn limit(mut self, n: u64) -> Rule {
        self.limit = Some(n);
        self
    }
}

/// `KIND[=ARG][,method=M][,path=SUBSTR][,nth=N][,p=PROB][,limit=N]`, KIND one of `500`, `503`
/// (any 4xx/5xx code), `slowdown`, `reset`, `stall=SECS`, `truncate`, `corrupt`, `drop-response`,
/// `stale`. Example: `503,p=0.05,method=PUT`.
impl FromStr for Rule {
    type Err = String;
    fn from_str(s: &str) -> Result<Rule, String> {
        let mut parts = s.split(',');
        let kind = parts.next().unwrap_or_default();
        let (name, arg) = kind.split_once('=').unwrap_or((kind, ""));
        let fault = match name {
            "slowdown" => Fault::SlowDown,
            "reset" => Fault::Reset,
            "stall" => Fault::Stall(Duration::from_secs_f64(
                arg.parse()
                    .map_err(|_| format!("stall needs seconds: {kind}"))?,
            )),
            "truncate" => Fault::Truncate,
            "corrupt" => Fault::Corrupt,
            "drop-response" => Fault::DropResponse,
            "stale" => Fault::Stale,
            code => match code.parse::<u16>() {
                Ok(c) if (400..600).contains(&c) => Fault::Status(c),
                _ => return Err(format!("unknown fault \"{name}\"")),
            },
        };
        let mut rule = Rule::new(fault);
        for part in parts {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("expected key=value: {part}"))?;
            let num = || v.parse::<u64>().map_err(|_| format!("bad number: {part}"));
            match k {
                "method" => rule = rule.method(v),
                "path" => rule = rule.path_contains(v),
                "nth" => rule.nth = Some(num()?),
                "limit" => rule.limit = Some(num()?),
                "p" => {
                    rule.probability = v.parse().map_err(|_| format!("bad probability: {part}"))?
                }
                _ => return Err(format!("unknown rule key \"{k}\"")),
            }
        }
        Ok(rule)
    }
}

/// Proxy settings; `ProxyConfig::new(upstream)` gives no delay and no faults.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    pub delay: Duration,
    /// Seeds the fault dice. Requests draw in arrival order, so a run is reproducible when the
    /// client's request order is.
    pub seed: u64,
    pub rules: Vec<Rule>,
    /// Client connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
}

impl ProxyConfig {
    pub fn new(upstream: SocketAddr) -> ProxyConfig {
        ProxyConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            upstream,
            delay: Duration::ZERO,
            seed: 0,
            rules: Vec::new(),
            max_connections: 1024,
        }
    }
}

/// A snapshot of the proxy's counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    pub connections: u64,
    pub requests: u64,
    /// Requests by method (GET, PUT, DELETE, HEAD, POST...), faulted ones included; a GET of
    /// the bucket itself (a listing) counts as LIST, not GET.
    pub by_method: HashMap<String, u64>,
    /// Injected faults by kind (`status`, `slowdown`, `reset`, `stall`, `truncate`, `corrupt`,
    /// `drop_response`, `stale`).
    pub injected: HashMap<&'static str, u64>,
    pub upstream_errors: u64,
    /// Most requests seen inside the proxy at the same moment.
    pub peak_in_flight: u64,
}

/// The `by_method` key of a request: its method, or LIST for a GET of the bucket (no key in
/// the path: `/bucket` path-style, `/` virtual-hosted).
fn stats_kind(method: &str, path: &str) -> String {
    let bucket_level = !path.trim_matches('/').contains('/');
    if method == "GET" && bucket_level {
        "LIST".to_string()
    } else {
        method.to_string()
    }
}

impl Stats {
    pub fn injected_total(&self) -> u64 {
        self.injected.values().sum()
    }
    pub fn method(&self, m: &str) -> u64 {
        self.by_method.get(m).copied().unwrap_or(0)
    }
}

/// `key value` lines, sorted: what the CLI writes to its stats file.
impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "connections {}", self.connections)?;
        writeln!(f, "requests {}", self.requests)?;
        let mut methods: Vec<_> = self.by_method.iter().collect();
        methods.sort();
        for (m, n) in methods {
            writeln!(f, "requests_{m} {n}")?;
        }
        let mut faults: Vec<_> = self.injected.iter().collect();
        faults.sort();
        for (k, n) in faults {
            writeln!(f, "injected_{k} {n}")?;
        }
        writeln!(f, "injected_total {}", self.injected_total())?;
        writeln!(f, "upstream_errors {}", self.upstream_errors)?;
        writeln!(f, "peak_in_flight {}", self.peak_in_flight)
    }
}

struct RuleState {
    rule: Rule,
    matched: u64,
    fired: u64,
}

/// A response as the client would receive it, kept for `Fault::Stale`.
#[derive(Clone)]
struct Recorded {
    head: Vec<u8>,
    body: Vec<u8>,
    generation: u64,
}

#[derive(Default)]
struct History {
    /// Bumped by every successful PUT/DELETE of the path.
    generation: HashMap<String, u64>,
    last_get: HashMap<String, Recorded>,
}

struct Shared {
    config: ProxyConfig,
    delay_ms: AtomicU64,
    rules: Mutex<Vec<RuleState>>,
    rng: Mutex<fastrand::Rng>,
    stats: Mutex<Stats>,
    in_flight: AtomicU64,
    history: Mutex<History>,
    stopping: AtomicBool,
    /// Open sockets by connection id, shut down by `stop` to unblock their threads.
    sockets: Mutex<HashMap<u64, Vec<TcpStream>>>,
    active: Mutex<usize>,
    slot_freed: Condvar,
}

/// A running proxy; stopped (threads joined, sockets closed) by `stop` or on drop.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    pub fn start(config: ProxyConfig) -> io::Result<Proxy> {
        let listener = TcpListener::bind(config.listen)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            delay_ms: AtomicU64::new(config.delay.as_millis() as u64),
            rules: Mutex::new(Vec::new()),
            rng: Mutex::new(fastrand::Rng::with_seed(config.seed)),
            stats: Mutex::new(Stats::default()),
            in_flight: AtomicU64::new(0),
            history: Mutex::new(History::default()),
            stopping: AtomicBool::new(false),
            sockets: Mutex::new(HashMap::new()),
            active: Mutex::new(0),
            slot_freed: Condvar::new(),
            config,
        });
        shared.set_rules(shared.config.rules.clone());
        let acceptor = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("s3proxy-accept".into())
                .spawn(move || accept_loop(listener, shared))?
        };
        Ok(Proxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:PORT/`, a `--baseURL`.
    pub fn base_url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    pub fn stats(&self) -> Stats {
        self.shared.stats.lock().clone()
    }

    /// Replaces the fault rules (their counts start again); takes effect for the next request.
    pub fn set_rules(&self, rules: Vec<Rule>) {
        self.shared.set_rules(rules);
    }

    pub fn set_delay(&self, delay: Duration) {
        self.shared
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// Closes every connection and joins every thread; returns the final counters.
    pub fn stop(mut self) -> Stats {
        self.shutdown();
        self.stats()
    }

    fn shutdown(&mut self) {
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.slot_freed.notify_all();
        // Wakes the blocking accept().
        let _ = TcpStream::connect(self.addr);
        for streams in self.shared.sockets.lock().values() {
            for s in streams {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        if let Ok(workers) = acceptor.join() {
            for w in workers {
                let _ = w.join();
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Shared {
    fn set_rules(&self, rules: Vec<Rule>) {
        *self.rules.lock() = rules
            .into_iter()
            .map(|rule| RuleState {
                rule,
                matched: 0,
                fired: 0,
            })
            .collect();
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// The fault to inject for this request, if any rule fires.
    /// A fault that cannot apply to this request (see `applies`) neither matches nor fires.
    fn choose_fault(&self, method: &str, path: &str) -> Option<Fault> {
        let mut rules = self.rules.lock();
        for st in rules.iter_mut() {
            let r = &st.rule;
            if r.method.as_deref().is_some_and(|m| m != method)
                || r.path_contains
                    .as_deref()
                    .is_some_and(|p| !path.contains(p))
                || !self.applies(&r.fault, method, path)
            {
                continue;
            }
            st.matched += 1;
            if r.nth.is_some_and(|n| n != st.matched) || r.limit.is_some_and(|l| st.fired >= l) {
                continue;
            }
            if r.probability < 1.0 && self.rng.lock().f64() >= r.probability {
                continue;
            }
            st.fired += 1;
            return Some(r.fault.clone());
        }
        None
    }

    /// Body faults need a GET; a stale reply needs an older response of a since-changed key.
    fn applies(&self, fault: &Fault, method: &str, path: &str) -> bool {
        match fault {
            Fault::Truncate | Fault::Corrupt => method == "GET",
            Fault::Stale => method == "GET" && self.stale_response(path).is_some(),
            _ => true,
        }
    }

    fn stale_response(&self, path: &str) -> Option<Recorded> {
        let history = self.history.lock();
        let current = history.generation.get(path).copied().unwrap_or(0);
        history
            .last_get
            .get(path)
            .filter(|r| r.generation < current)
            .cloned()
    }

    fn count_injected(&self, fault: &Fault) {
        *self.stats.lock().injected.entry(fault.name()).or_default() += 1;
    }

    fn register(&self, id: u64, stream: &TcpStream) {
        if let Ok(clone) = stream.try_clone() {
            self.sockets.lock().entry(id).or_default().push(clone);
        }
        if self.stopping() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Sleeps in short slices so `stop` is not held up.
    fn sleep(&self, d: Duration) {
        let end = Instant::now() + d;
        while !self.stopping() {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) -> Vec<JoinHandle<()>> {
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    let mut next_id = 0u64;
    loop {
        {
            let mut active = shared.active.lock();
            while *active >= shared.config.max_connections && !shared.stopping() {
                shared.slot_freed.wait(&mut active);
            }
        }
        let accepted = listener.accept();
        if shared.stopping() {
            break;
        }
        let Ok((client, _)) = accepted else { continue };
        workers.retain(|w| !w.is_finished());
        next_id += 1;
        let id = next_id;
        *shared.active.lock() += 1;
        shared.stats.lock().connections += 1;
        shared.register(id, &client);
        let sh = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("s3proxy-{id}"))
            .spawn(move || {
                let _ = serve_connection(&sh, id, client);
                sh.sockets.lock().remove(&id);
                *sh.active.lock() -= 1;
                sh.slot_freed.notify_one();
            });
        match spawned {
            Ok(h) => workers.push(h),
            Err(_) => {
                shared.sockets.lock().remove(&id);
                *shared.active.lock() -= 1;
            }
        }
    }
    workers
}

/// A parsed request or response head.
struct Head {
    raw: Vec<u8>,
    /// Method or status code, path (requests).
    method: String,
    path: String,
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .map(str::trim)
    }
    fn has_token(&self, name: &str, token: &str) -> bool {
        self.header(name)
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }
    fn content_length(&self) -> io::Result<Option<usize>> {
        self.header("content-length")
            .map(|v| v.parse().map_err(|_| bad("bad Content-Length")))
            .transpose()
    }
    /// Re-serialises the head without the named headers, plus extra lines.
    fn rebuild(&self, first_line: &str, drop: &[&str], extra: &[String]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.raw.len() + 64);
        out.extend_from_slice(first_line.as_bytes());
        out.extend_from_slice(b"\r\n");
        for (n, v) in &self.headers {
            if drop.iter().any(|d| n.eq_ignore_ascii_case(d)) {
                continue;
            }
            out.extend_from_slice(n.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v);
            out.extend_from_slice(b"\r\n");
        }
        for e in extra {
            out.extend_from_slice(e.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Reads one head (request if `request`), or None on a clean EOF before any byte.
fn read_head(r: &mut impl BufRead, request: bool) -> io::Result<Option<Head>> {
    let mut raw = Vec::new();
    loop {
        let n = r.read_until(b'\n', &mut raw)?;
        if n == 0 {
            return if raw.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        if raw.len() > MAX_HEAD {
            return Err(bad("head too long"));
        }
        if !raw.ends_with(b"\r\n\r\n") && !raw.ends_with(b"\n\n") {
            continue;
        }
        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let (method, path, status, headers) = if request {
            let mut req = httparse::Request::new(&mut hs);
            if req
                .parse(&raw)
                .map_err(|e| bad(&e.to_string()))?
                .is_partial()
            {
                continue;
            }
            let headers = collect_headers(req.headers);
            (
                req.method.unwrap_or_default().to_string(),
                req.path.unwrap_or_default().to_string(),
                0,
                headers,
            )
        } else {
            let mut resp = httparse::Response::new(&mut hs);
            if resp
                .parse(&raw)
                .map_err(|e| bad(&e.to_string()))?
                .is_partial()
            {
                continue;
            }
            let headers = collect_headers(resp.headers);
            (
                String::new(),
                String::new(),
                resp.code.unwrap_or(0),
                headers,
            )
        };
        return Ok(Some(Head {
            raw,
            method,
            path,
            status,
            headers,
        }));
    }
}

fn collect_headers(hs: &[httparse::Header<'_>]) -> Vec<(String, Vec<u8>)> {
    hs.iter()
        .map(|h| (h.name.to_string(), h.value.to_vec()))
        .collect()
}

/// Reads a chunked body (chunk sizes parsed by httparse), trailers discarded.
fn read_chunked(r: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let size = match httparse::parse_chunk_size(&line) {
            Ok(httparse::Status::Complete((_, size))) => size as usize,
            _ => return Err(bad("bad chunk size")),
        };
        if size == 0 {
            // Trailers, up to the empty line.
            loop {
                line.clear();
                if r.read_until(b'\n', &mut line)? == 0 || line == b"\r\n" || line == b"\n" {
                    return Ok(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..])?;
        line.clear();
        r.read_until(b'\n', &mut line)?;
    }
}

/// The body that follows `head`; `None` length with no chunking means "until EOF".
fn read_body(r: &mut impl BufRead, head: &Head, no_body: bool) -> io::Result<(Vec<u8>, bool)> {
    if no_body {
        return Ok((Vec::new(), false));
    }
    if head.has_token("transfer-encoding", "chunked") {
        return Ok((read_chunked(r)?, true));
    }
    if let Some(len) = head.content_length()? {
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        return Ok((body, false));
    }
    if head.method.is_empty() {
        let mut body = Vec::new();
        r.read_to_end(&mut body)?;
        return Ok((body, false));
    }
    Ok((Vec::new(), false))
}

struct Upstream {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

struct Response {
    head: Vec<u8>,
    body: Vec<u8>,
    status: u16,
    /// The upstream connection cannot be reused (EOF-delimited body or `Connection: close`).
    close: bool,
}

fn connect_upstream(shared: &Shared, id: u64) -> io::Result<Upstream> {
    let s = TcpStream::connect(shared.config.upstream)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(UPSTREAM_TIMEOUT))?;
    shared.register(id, &s);
    Ok(Upstream {
        reader: BufReader::new(s.try_clone()?),
        writer: s,
    })
}

/// Sends one request upstream and reads its response; a reused connection that fails before
/// the response is retried once on a fresh one (the server may have closed an idle connection).
fn forward(
    shared: &Shared,
    id: u64,
    upstream: &mut Option<Upstream>,
    req_head: &[u8],
    req_body: &[u8],
    is_head: bool,
) -> io::Result<Response> {
    for attempt in 0..2 {
        let reused = upstream.is_some();
        if upstream.is_none() {
            *upstream = Some(connect_upstream(shared, id)?);
        }
        let up = upstream.as_mut().unwrap();
        let sent = up
            .writer
            .write_all(req_head)
            .and_then(|_| up.writer.write_all(req_body))
            .and_then(|_| up.writer.flush());
        let head = match sent.and_then(|_| read_head(&mut up.reader, false)) {
            Ok(Some(h)) => h,
            Ok(None) | Err(_) if reused && attempt == 0 => {
                *upstream = None;
                continue;
            }
            Ok(None) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Err(e) => return Err(e),
        };
        let no_body = is_head || head.status < 200 || head.status == 204 || head.status == 304;
        let (body, dechunked) = read_body(&mut up.reader, &head, no_body)?;
        let eof_body = !no_body
            && head.content_length()?.is_none()
            && !head.has_token("transfer-encoding", "chunked");
        let close = eof_body || head.has_token("connection", "close");
        let first_line = head.raw.split(|&b| b == b'\n').next().unwrap_or_default();
        let first_line = String::from_utf8_lossy(first_line).trim_end().to_string();
        let out_head = if dechunked || eof_body {
            head.rebuild(
                &first_line,
                &["transfer-encoding", "content-length", "connection"],
                &[format!("Content-Length: {}", body.len())],
            )
        } else {
            head.rebuild(&first_line, &["connection"], &[])
        };
        if close {
            *upstream = None;
        }
        return Ok(Response {
            head: out_head,
            body,
            status: head.status,
            close,
        });
    }
    Err(io::ErrorKind::UnexpectedEof.into())
}

fn error_response(status: u16, code: &str, message: &str) -> Vec<u8> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>s3proxy</RequestId></Error>"
    );
    let reason = match status {
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Error",
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn reset(stream: &TcpStream) {
    // SO_LINGER 0 turns the close into a RST.
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

struct InFlight<'a>(&'a Shared);
impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared) -> InFlight<'a> {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        let mut st = shared.stats.lock();
        st.peak_in_flight = st.peak_in_flight.max(now);
        InFlight(shared)
    }
}
impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn serve_connection(shared: &Shared, id: u64, client: TcpStream) -> io::Result<()> {
    client.set_nodelay(true)?;
    let mut reader = BufReader::new(client.try_clone()?);
    let mut writer = client.try_clone()?;
    let mut upstream: Option<Upstream> = None;
    while !shared.stopping() {
        let Some(head) = read_head(&mut reader, true)? else {
            return Ok(());
        };
        let _in_flight = InFlight::enter(shared);
        if head.has_token("expect", "100-continue") {
            // curl waits for this before large PUT bodies; answered here, Expect not forwarded.
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let (body, dechunked) = read_body(&mut reader, &head, false)?;
        let client_close = head.has_token("connection", "close");
        let path = head.path.split('?').next().unwrap_or_default().to_string();
        {
            let mut st = shared.stats.lock();
            st.requests += 1;
            *st.by_method
                .entry(stats_kind(&head.method, &path))
                .or_default() += 1;
        }
        let delay = shared.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            shared.sleep(Duration::from_millis(delay));
        }
        let first_line = format!("{} {} HTTP/1.1", head.method, head.path);
        let req_head = if dechunked {
            head.rebuild(
                &first_line,
                &[
                    "expect",
                    "connection",
                    "transfer-encoding",
                    "content-length",
                ],
                &[format!("Content-Length: {}", body.len())],
            )
        } else {
            head.rebuild(&first_line, &["expect", "connection"], &[])
        };

        let fault = shared.choose_fault(&head.method, &path);
        match &fault {
            Some(f @ Fault::Status(code)) => {
                shared.count_injected(f);
                let name = if *code == 503 {
                    "ServiceUnavailable"
                } else {
                    "InternalError"
                };
                writer.write_all(&error_response(*code, name, "injected by s3proxy"))?;
                continue;
            }
            Some(f @ Fault::SlowDown) => {
                shared.count_injected(f);
                writer.write_all(&error_response(
                    503,
                    "SlowDown",
                    "Please reduce your request rate.",
                ))?;
                continue;
            }
            Some(f @ Fault::Reset) => {
                shared.count_injected(f);
                reset(&client);
                return Ok(());
            }
            Some(f @ Fault::Stall(d)) => {
                shared.count_injected(f);
                shared.sleep(*d);
                return Ok(());
            }
            Some(f @ Fault::Stale) => {
                if let Some(old) = shared.stale_response(&path) {
                    shared.count_injected(f);
                    writer.write_all(&old.head)?;
                    writer.write_all(&old.body)?;
                    continue;
                }
            }
            _ => {}
        }

        let is_head = head.method == "HEAD";
        let resp = match forward(shared, id, &mut upstream, &req_head, &body, is_head) {
            Ok(r) => r,
            Err(_) => {
                shared.stats.lock().upstream_errors += 1;
                upstream = None;
                writer.write_all(&error_response(502, "BadGateway", "upstream failed"))?;
                continue;
            }
        };
        record_history(shared, &head.method, &path, &resp);

        match &fault {
            Some(f @ Fault::DropResponse) => {
                shared.count_injected(f);
                return Ok(());
            }
            Some(f @ Fault::Truncate) if !resp.body.is_empty() => {
                shared.count_injected(f);
                writer.write_all(&resp.head)?;
                writer.write_all(&resp.body[..resp.body.len() / 2])?;
                writer.flush()?;
                return Ok(());
            }
            Some(f @ Fault::Corrupt) if !resp.body.is_empty() => {
                shared.count_injected(f);
                let mut body = resp.body;
                let at = shared.rng.lock().usize(..body.len());
                body[at] ^= 0x5a;
                writer.write_all(&resp.head)?;
                writer.write_all(&body)?;
            }
            _ => {
                writer.write_all(&resp.head)?;
                writer.write_all(&resp.body)?;
            }
        }
        writer.flush()?;
        if client_close {
            return Ok(());
        }
        let _ = resp.close;
    }
    Ok(())
}

/// Keeps what `Fault::Stale` needs, only when a stale rule exists (it holds bodies in memory).
fn record_history(shared: &Shared, method: &str, path: &str, resp: &Response) {
    let wanted = shared.rules.lock().iter().any(|st| {
        st.rule.fault == Fault::Stale
            && st
                .rule
                .path_contains
                .as_deref()
                .is_none_or(|p| path.contains(p))
    });
    if !wanted {
        return;
    }
    let mut h = shared.history.lock();
    match method {
        "PUT" | "DELETE" if (200..300).contains(&resp.status) => {
            *h.generation.entry(path.to_string()).or_default() += 1;
        }
        "GET" if resp.status == 200 || resp.status == 404 => {
            let generation = h.generation.get(path).copied().unwrap_or(0);
            h.last_get.insert(
                path.to_string(),
                Recorded {
                    head: resp.head.clone(),
                    body: resp.body.clone(),
                    generation,
                },
            );
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_spec_parses_every_field() {
        let r: Rule = "503,p=0.05,method=put,path=/b/000,nth=3,limit=2"
            .parse()
            .unwrap();
        assert_eq!(r.fault, Fault::Status(503));
        assert_eq!(r.method.as_deref(), Some("PUT"));
        assert_eq!(r.path_contains.as_deref(), Some("/b/000"));
        assert_eq!((r.nth, r.limit, r.probability), (Some(3), Some(2), 0.05));
        let kinds = [
            ("slowdown", Fault::SlowDown),
            ("reset", Fault::Reset),
            ("stall=2.5", Fault::Stall(Duration::from_millis(2500))),
            ("truncate", Fault::Truncate),
            ("corrupt", Fault::Corrupt),
            ("drop-response", Fault::DropResponse),
            ("stale", Fault::Stale),
        ];
        for (spec, fault) in kinds {
            assert_eq!(spec.parse::<Rule>().unwrap().fault, fault, "{spec}");
        }
        for bad in ["200", "nonsense", "stall", "503,p", "503,x=1", "503,nth=a"] {
            assert!(bad.parse::<Rule>().is_err(), "{bad}");
        }
    }

    #[test]
    fn chunked_bodies_are_decoded() {
        let mut r = &b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-T: 1\r\n\r\nrest"[..];
        assert_eq!(read_chunked(&mut r).unwrap(), b"Wikipedia");
        assert_eq!(r, b"rest");
    }

    #[test]
    fn a_get_of_the_bucket_counts_as_a_listing() {
        assert_eq!(stats_kind("GET", "/bucket"), "LIST");
        assert_eq!(stats_kind("GET", "/bucket/"), "LIST");
        assert_eq!(stats_kind("GET", "/"), "LIST");
        assert_eq!(stats_kind("GET", "/bucket/00000001"), "GET");
        assert_eq!(stats_kind("GET", "/bucket/prefix/00000001"), "GET");
        assert_eq!(stats_kind("PUT", "/bucket"), "PUT");
    }
}
