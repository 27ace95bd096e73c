//! The NBD server: accepts clients on a unix socket and/or TCP, negotiates, then serves
//! requests over [`BlockPart`]. Each connection reads requests on one thread and runs them on
//! a bounded set of workers, so many requests are in flight and replies leave in completion
//! order (one writer lock keeps each reply whole).

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use tracing::{debug, error, info, warn};

use super::protocol::{self as p, ClientOption, Command, Extent, Request, SessionLimits};
use crate::error::{Error, Result};
use crate::geometry::BlockId;
use crate::geometry::Geometry;
use crate::layer::block_part::BlockPart;
use crate::store::{BlockStore, is_zero};

/// Where nbd-server and qemu-nbd listen by default.
pub const DEFAULT_TCP: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    10809,
));

/// Requests of one connection executing at once.
pub const DEFAULT_WORKERS: usize = 16;

/// Payload bytes (read buffers and write data) one connection may hold at once; bounds memory
/// whatever the client sends. At least [`p::MAX_PAYLOAD`], so every valid request fits.
const IN_FLIGHT_BYTES: u64 = 128 << 20;

/// How often the accept loop looks at the stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(100);

/// How the disk is exported.
#[derive(Clone, Debug)]
pub struct NbdOptions {
    pub unix_socket: Option<PathBuf>,
    /// TCP address; [`DEFAULT_TCP`] when neither this nor `unix_socket` is given.
    pub tcp: Option<SocketAddr>,
    /// The export's name; clients asking for "" (the default export) get it too.
    pub export_name: String,
    pub read_only: bool,
    /// Shown to clients (`NBD_INFO_DESCRIPTION`, `NBD_OPT_LIST`).
    pub description: String,
    /// Requests of one connection executing at once (at least 1).
    pub workers: usize,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            unix_socket: None,
            tcp: None,
            export_name: String::new(),
            read_only: false,
            description: String::new(),
            workers: DEFAULT_WORKERS,
        }
    }
}

/// Sets `stop` on SIGINT or SIGTERM, for callers that want [`serve`] to end on them.
pub fn stop_on_signals(stop: &Arc<AtomicBool>) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    for signal in [SIGINT, SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())
            .map_err(|err| Error::io("cannot watch signals", err))?;
    }
    Ok(())
}

/// Serves the disk until `stop` is set: then stops accepting, lets every connection finish
/// its in-flight requests, flushes the store and returns the flush result (`Ok` means every
/// acknowledged write reached the backend). `on_ready` runs once the sockets listen.
pub fn serve(
    store: Arc<dyn BlockStore>,
    opts: &NbdOptions,
    on_ready: impl FnOnce(),
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let listeners = bind(opts)?;
    let export = Arc::new(Export {
        part: BlockPart::new(store),
        name: opts.export_name.clone(),
        description: opts.description.clone(),
        read_only: opts.read_only,
        workers: opts.workers.max(1),
    });
    on_ready();

    let connections = Arc::new(Connections::default());
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let accept_result = accept_until_stopped(&listeners, &stop, |stream| {
        threads.retain(|t| !t.is_finished());
        let id = connections.add(&stream)?;
        let (export, connections) = (export.clone(), connections.clone());
        let thread = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                serve_connection(&stream, &export, id);
                connections.remove(id);
            })
            .map_err(|err| Error::io("cannot start connection thread", err))?;
        threads.push(thread);
        Ok(())
    });

    info!("NBD server stopping: finishing in-flight requests");
    drop(listeners);
    connections.stop_reading();
    for thread in threads {
        let _ = thread.join();
    }
    let flush_result = export.part.flush();
    match &flush_result {
        Ok(()) => info!("NBD server stopped; all writes flushed"),
        Err(err) => error!("NBD server stopped: final flush failed, data may be lost: {err}"),
    }
    accept_result?;
    flush_result
}

// ---------------------------------------------------------------------------------------
// Sockets

/// A connected client, over either transport.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        };
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => (&*s).read(buf),
            Stream::Tcp(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => (&*s).write(buf),
            Stream::Tcp(s) => (&*s).write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Listener {
    /// The socket file goes away with the listener.
    Unix(UnixListener, #[allow(dead_code)] SocketFile),
    Tcp(TcpListener),
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    fn accept(&self) -> io::Result<Stream> {
        let stream = match self {
            Listener::Unix(l, _) => Stream::Unix(l.accept()?.0),
            Listener::Tcp(l) => {
                let stream = l.accept()?.0;
                // Replies are small and latency-bound.
                stream.set_nodelay(true)?;
                Stream::Tcp(stream)
            }
        };
        match &stream {
            Stream::Unix(s) => s.set_nonblocking(false)?,
            Stream::Tcp(s) => s.set_nonblocking(false)?,
        }
        Ok(stream)
    }
}

/// Removes the unix socket file when the server ends, however it ends.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn bind(opts: &NbdOptions) -> Result<Vec<Listener>> {
    let mut listeners = Vec::new();
    if let Some(path) = &opts.unix_socket {
        remove_stale_socket(path)?;
        let listener = UnixListener::bind(path)
            .map_err(|err| Error::io(format!("cannot listen on {}", path.display()), err))?;
        listeners.push(Listener::Unix(listener, SocketFile(path.clone())));
        info!("NBD server listening on unix socket {}", path.display());
    }
    let tcp = match (opts.tcp, &opts.unix_socket) {
        (Some(addr), _) => Some(addr),
        (None, None) => Some(DEFAULT_TCP),
        (None, Some(_)) => None,
    };
    if let Some(addr) = tcp {
        let listener = TcpListener::bind(addr)
            .map_err(|err| Error::io(format!("cannot listen on {addr}"), err))?;
        listeners.push(Listener::Tcp(listener));
        info!("NBD server listening on {addr}");
    }
    for listener in &listeners {
        let result = match listener {
            Listener::Unix(l, _) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        };
        result.map_err(|err| Error::io("cannot configure listener", err))?;
    }
    Ok(listeners)
}

/// A socket file left by a dead server is replaced; a live one or another file is an error.
fn remove_stale_socket(path: &Path) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(Error::Invalid(format!(
            "{} exists and is not a socket",
            path.display()
        )));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(Error::Busy(format!(
            "{} is in use by another server",
            path.display()
        )));
    }
    std::fs::remove_file(path)
        .map_err(|err| Error::io(format!("cannot remove stale {}", path.display()), err))
}

/// Accepts clients until `stop` is set, handing each to `on_client`.
fn accept_until_stopped(
    listeners: &[Listener],
    stop: &AtomicBool,
    mut on_client: impl FnMut(Stream) -> Result<()>,
) -> Result<()> {
    let mut fds: Vec<libc::pollfd> = listeners
        .iter()
        .map(|l| libc::pollfd {
            fd: l.fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs.
        let ready = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                ACCEPT_POLL.as_millis() as i32,
            )
        };
        if ready < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::io("poll on NBD listeners failed", err));
        }
        for (listener, fd) in listeners.iter().zip(&fds) {
            if fd.revents == 0 {
                continue;
            }
            match listener.accept() {
                Ok(stream) => on_client(stream)?,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                // Per-client failures (e.g. ECONNABORTED) must not stop the server.
                Err(err) => warn!("NBD accept failed: {err}"),
            }
        }
    }
    Ok(())
}

/// Open connections, so a stop can end their reads.
#[derive(Default)]
struct Connections {
    next_id: AtomicU64,
    open: Mutex<Vec<(u64, Stream)>>,
    stopping: AtomicBool,
}

impl Connections {
    fn add(&self, stream: &Stream) -> Result<u64> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let clone = stream
            .try_clone()
            .map_err(|err| Error::io("cannot clone client socket", err))?;
        if self.stopping.load(Ordering::Relaxed) {
            clone.shutdown(Shutdown::Read);
        }
        self.open.lock().push((id, clone));
        Ok(id)
    }

    fn remove(&self, id: u64) {
        self.open.lock().retain(|(open, _)| *open != id);
    }

    /// Ends every connection's reads: each finishes what is in flight, then closes.
    fn stop_reading(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        for (_, stream) in self.open.lock().iter() {
            stream.shutdown(Shutdown::Read);
        }
    }
}

// ---------------------------------------------------------------------------------------
// One connection

/// What every connection serves.
struct Export {
    part: BlockPart,
    name: String,
    description: String,
    read_only: bool,
    workers: usize,
}

impl Export {
    fn geometry(&self) -> Geometry {
        self.part.geometry()
    }

    /// The default export "" is ours too.
    fn answers_to(&self, name: &str) -> bool {
        name.is_empty() || name == self.name
    }

    fn transmission_flags(&self, structured: bool) -> u16 {
        let mut flags = p::FLAG_HAS_FLAGS | p::FLAG_SEND_FLUSH | p::FLAG_SEND_CACHE;
        // Every connection shares one store whose flush covers all writes.
        flags |= p::FLAG_CAN_MULTI_CONN;
        if self.read_only {
            flags |= p::FLAG_READ_ONLY;
        } else {
            flags |= p::FLAG_SEND_FUA | p::FLAG_SEND_TRIM | p::FLAG_SEND_WRITE_ZEROES;
        }
        if structured {
            flags |= p::FLAG_SEND_DF;
        }
        flags
    }

    fn block_size_info(&self) -> Vec<u8> {
        let preferred = self.geometry().block_size().clamp(512, p::MAX_PAYLOAD);
        p::encode_info_block_size(1, preferred, p::MAX_PAYLOAD)
    }
}

/// What the handshake settled.
#[derive(Copy, Clone, Debug, Default)]
struct Session {
    structured: bool,
    base_allocation: bool,
}

fn serve_connection(stream: &Stream, export: &Export, id: u64) {
    debug!(conn = id, "NBD client connected");
    let mut reader = BufReader::new(stream);
    let mut writer = stream;
    let result = negotiate(&mut reader, &mut writer, export).and_then(|session| match session {
        Some(session) => transmit(&mut reader, stream, export, session, id),
        None => Ok(()),
    });
    match result {
        Ok(()) => debug!(conn = id, "NBD client disconnected"),
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => {
            debug!(conn = id, "NBD client went away")
        }
        Err(err) => warn!(conn = id, "NBD connection closed: {err}"),
    }
    stream.shutdown(Shutdown::Both);
}

fn invalid_data(err: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, err.to_string())
}

/// Runs the option haggling; `None` when the client aborted or asked for an unknown export
/// by `NBD_OPT_EXPORT_NAME` (which can only be refused by closing).
fn negotiate(
    r: &mut impl Read,
    w: &mut impl Write,
    export: &Export,
) -> io::Result<Option<Session>> {
    w.write_all(&p::encode_greeting())?;
    let mut flags = [0u8; 4];
    r.read_exact(&mut flags)?;
    let client = p::parse_client_flags(flags).map_err(invalid_data)?;
    let mut session = Session::default();
    let size = export.geometry().file_size();
    loop {
        let mut header = [0u8; p::OPTION_HEADER_LEN];
        r.read_exact(&mut header)?;
        let header = p::parse_option_header(&header).map_err(invalid_data)?;
        let option = header.option;
        let reply = |w: &mut dyn Write, kind: u32, data: &[u8]| {
            w.write_all(&p::encode_option_reply(option, kind, data))
        };
        if header.len > p::MAX_OPTION_LEN {
            if option == p::OPT_EXPORT_NAME {
                return Err(invalid_data("oversize export name"));
            }
            io::copy(&mut r.take(u64::from(header.len)), &mut io::sink())?;
            reply(w, p::REP_ERR_TOO_BIG, b"option data too large")?;
            continue;
        }
        let mut data = vec![0u8; header.len as usize];
        r.read_exact(&mut data)?;
        let parsed = match p::parse_option(option, &data) {
            Ok(parsed) => parsed,
            Err(err) if option == p::OPT_EXPORT_NAME => return Err(invalid_data(err)),
            Err(err) => {
                reply(w, p::REP_ERR_INVALID, err.0.as_bytes())?;
                continue;
            }
        };
        match parsed {
            ClientOption::ExportName(name) => {
                if !export.answers_to(&name) {
                    info!("NBD client asked for unknown export {name:?}");
                    return Ok(None);
                }
                let flags = export.transmission_flags(session.structured);
                w.write_all(&p::encode_export_name_reply(size, flags, client.no_zeroes))?;
                return Ok(Some(session));
            }
            ClientOption::Abort => {
                // The client may already be gone; that is fine.
                let _ = reply(w, p::REP_ACK, &[]);
                return Ok(None);
            }
            ClientOption::List => {
                let server = p::encode_rep_server(&export.name, &export.description);
                reply(w, p::REP_SERVER, &server)?;
                reply(w, p::REP_ACK, &[])?;
            }
            ClientOption::StartTls => reply(w, p::REP_ERR_UNSUP, b"TLS is not supported")?,
            ClientOption::StructuredReply => {
                session.structured = true;
                reply(w, p::REP_ACK, &[])?;
            }
            ClientOption::Info { go, name, requests } => {
                if !export.answers_to(&name) {
                    reply(
                        w,
                        p::REP_ERR_UNKNOWN,
                        format!("no export {name:?}").as_bytes(),
                    )?;
                    continue;
                }
                let flags = export.transmission_flags(session.structured);
                reply(w, p::REP_INFO, &p::encode_info_export(size, flags))?;
                reply(w, p::REP_INFO, &export.block_size_info())?;
                if requests.contains(&p::INFO_NAME) {
                    let info = p::encode_info_string(p::INFO_NAME, &export.name);
                    reply(w, p::REP_INFO, &info)?;
                }
                if requests.contains(&p::INFO_DESCRIPTION) && !export.description.is_empty() {
                    let info = p::encode_info_string(p::INFO_DESCRIPTION, &export.description);
                    reply(w, p::REP_INFO, &info)?;
                }
                reply(w, p::REP_ACK, &[])?;
                if go {
                    return Ok(Some(session));
                }
            }
            ClientOption::MetaContext {
                set,
                export: name,
                queries,
            } => {
                if !session.structured {
                    reply(w, p::REP_ERR_INVALID, b"negotiate structured replies first")?;
                    continue;
                }
                if !export.answers_to(&name) {
                    reply(
                        w,
                        p::REP_ERR_UNKNOWN,
                        format!("no export {name:?}").as_bytes(),
                    )?;
                    continue;
                }
                let selected = meta_context_selected(set, &queries);
                if selected {
                    let id = if set { p::BASE_ALLOCATION_ID } else { 0 };
                    let context = p::encode_rep_meta_context(id, p::BASE_ALLOCATION);
                    reply(w, p::REP_META_CONTEXT, &context)?;
                }
                if set {
                    session.base_allocation = selected;
                }
                reply(w, p::REP_ACK, &[])?;
            }
            ClientOption::Unknown(code) => {
                debug!("NBD client sent unsupported option {code}");
                reply(w, p::REP_ERR_UNSUP, b"unsupported option")?;
            }
        }
    }
}

/// Whether the queries pick `base:allocation`: listing with no query lists everything, and
/// `base:` names the whole namespace when listing.
fn meta_context_selected(set: bool, queries: &[String]) -> bool {
    (!set && queries.is_empty())
        || queries
            .iter()
            .any(|q| q == p::BASE_ALLOCATION || (!set && q == "base:"))
}

/// A validated request on its way to a worker.
struct Job<'a> {
    request: Request,
    payload: Vec<u8>,
    _budget: BudgetGuard<'a>,
}

/// Reply side of a connection: the writer lock, and whether the client is still there.
struct Replies<'a> {
    stream: Mutex<&'a Stream>,
    broken: AtomicBool,
    structured: bool,
}

impl Replies<'_> {
    /// Writes one whole reply (`parts` back to back) under the lock.
    fn send(&self, parts: &[&[u8]]) {
        if self.broken.load(Ordering::Relaxed) {
            return;
        }
        let mut stream = self.stream.lock();
        let result = parts.iter().try_for_each(|part| stream.write_all(part));
        if let Err(err) = result {
            debug!("NBD reply failed, closing the connection: {err}");
            self.broken.store(true, Ordering::Relaxed);
            // Wakes the request reader, which is blocked on the same socket.
            stream.shutdown(Shutdown::Both);
        }
    }

    fn error(&self, request: &Request, errno: u32, message: &str) {
        if self.structured {
            self.send(&[&p::encode_error_chunk(request.cookie, errno, message)]);
        } else {
            self.send(&[&p::encode_simple_reply(request.cookie, errno)]);
        }
    }

    fn ok(&self, request: &Request) {
        self.send(&[&p::encode_simple_reply(request.cookie, 0)]);
    }
}

fn transmit(
    reader: &mut impl Read,
    stream: &Stream,
    export: &Export,
    session: Session,
    id: u64,
) -> io::Result<()> {
    let limits = SessionLimits {
        export_size: export.geometry().file_size(),
        read_only: export.read_only,
        structured: session.structured,
        base_allocation: session.base_allocation,
    };
    let replies = Replies {
        stream: Mutex::new(stream),
        broken: AtomicBool::new(false),
        structured: session.structured,
    };
    let budget = Budget::new(IN_FLIGHT_BYTES);
    let (jobs, queue) = crossbeam_channel::bounded::<Job>(export.workers);
    std::thread::scope(|scope| {
        for _ in 0..export.workers {
            let queue = queue.clone();
            let replies = &replies;
            scope.spawn(move || {
                for job in queue {
                    execute(export, replies, &job.request, &job.payload);
                }
            });
        }
        let result = read_requests(reader, &limits, &replies, &budget, &jobs, id);
        // Closing the queue lets the workers finish what is in flight, then exit.
        drop(jobs);
        result
    })
}

/// The request reader of one connection; returns at DISC, EOF or lost framing.
fn read_requests<'b>(
    reader: &mut impl Read,
    limits: &SessionLimits,
    replies: &Replies,
    budget: &'b Budget,
    jobs: &crossbeam_channel::Sender<Job<'b>>,
    id: u64,
) -> io::Result<()> {
    loop {
        let mut header = [0u8; p::REQUEST_HEADER_LEN];
        match reader.read_exact(&mut header) {
            Ok(()) => {}
            Err(_) if replies.broken.load(Ordering::Relaxed) => return Ok(()),
            Err(err) => return Err(err),
        }
        let request = p::parse_request(&header).map_err(invalid_data)?;
        if let Err(errno) = p::check_request(&request, limits) {
            debug!(conn = id, ?request, errno, "NBD request refused");
            // Skipping the payload keeps the framing; it is never buffered.
            let skip = u64::from(request.payload_len());
            io::copy(&mut reader.take(skip), &mut io::sink())?;
            replies.error(&request, errno, &refusal_message(&request, errno));
            continue;
        }
        if request.command == Command::Disc {
            debug!(conn = id, "NBD client sent DISC");
            return Ok(());
        }
        let guard = budget.acquire(in_flight_bytes(&request));
        let mut payload = vec![0u8; request.payload_len() as usize];
        reader.read_exact(&mut payload)?;
        let job = Job {
            request,
            payload,
            _budget: guard,
        };
        if jobs.send(job).is_err() {
            return Ok(());
        }
    }
}

fn refusal_message(request: &Request, errno: u32) -> String {
    let what = match errno {
        p::EPERM => "read-only export",
        p::EOVERFLOW => "request too large",
        p::ENOSPC | p::EINVAL if matches!(request.command, Command::Unknown(_)) => {
            "unknown command"
        }
        p::ENOSPC => "request beyond end of export",
        _ => "invalid request",
    };
    format!(
        "{what}: {:?} offset {} length {} flags {:#x}",
        request.command, request.offset, request.len, request.flags
    )
}

/// Bytes a request holds in memory while it runs.
fn in_flight_bytes(request: &Request) -> u64 {
    match request.command {
        Command::Read | Command::Write => u64::from(request.len),
        Command::BlockStatus => u64::from(request.len.min(p::MAX_PAYLOAD)),
        _ => 0,
    }
}

fn execute(export: &Export, replies: &Replies, request: &Request, payload: &[u8]) {
    let part = &export.part;
    let result = match request.command {
        Command::Read => return execute_read(export, replies, request),
        Command::BlockStatus => return execute_block_status(export, replies, request),
        Command::Write => part.write(request.offset, payload).map(|_| ()),
        Command::WriteZeroes => part.zero_range(request.offset, u64::from(request.len)),
        Command::Trim => trim(part, request.offset, u64::from(request.len)),
        Command::Flush => part.flush(),
        // Nothing to warm: caching layers fetch on demand.
        Command::Cache => Ok(()),
        Command::Disc | Command::Unknown(_) => unreachable!("filtered by the reader"),
    };
    let result = result.and_then(|()| {
        if request.fua() && request.command != Command::Flush {
            part.flush()
        } else {
            Ok(())
        }
    });
    match result {
        Ok(()) => replies.ok(request),
        Err(err) => fail(replies, request, &err),
    }
}

fn fail(replies: &Replies, request: &Request, err: &Error) {
    warn!(
        "NBD {:?} at offset {} length {} failed: {err}",
        request.command, request.offset, request.len
    );
    replies.error(request, p::errno_to_nbd(err.errno()), &err.to_string());
}

/// Trim is a hint: only whole blocks inside the range are deleted.
fn trim(part: &BlockPart, offset: u64, len: u64) -> Result<()> {
    let bs = u64::from(part.geometry().block_size());
    let start = offset.div_ceil(bs) * bs;
    let end = (offset + len) / bs * bs;
    if start < end {
        part.zero_range(start, end - start)
    } else {
        Ok(())
    }
}

fn execute_read(export: &Export, replies: &Replies, request: &Request) {
    let mut buf = vec![0u8; request.len as usize];
    if let Err(err) = export.part.read(request.offset, &mut buf) {
        return fail(replies, request, &err);
    }
    let cookie = request.cookie;
    if !replies.structured {
        return replies.send(&[&p::encode_simple_reply(cookie, 0), &buf]);
    }
    if buf.is_empty() {
        return replies.send(&[&p::encode_none_chunk(cookie)]);
    }
    let runs = if request.flags & p::CMD_FLAG_DF != 0 {
        vec![Run {
            start: 0,
            len: buf.len(),
            zero: false,
        }]
    } else {
        zero_runs(request.offset, &buf, export.geometry().block_size())
    };
    // Chunks of one reply may interleave with other replies; each goes out whole.
    for (i, run) in runs.iter().enumerate() {
        let done = i + 1 == runs.len();
        let offset = request.offset + run.start as u64;
        if run.zero {
            replies.send(&[&p::encode_hole_chunk(cookie, offset, run.len as u32, done)]);
        } else {
            let header = p::encode_data_chunk_header(cookie, offset, run.len as u32, done);
            replies.send(&[&header, &buf[run.start..run.start + run.len]]);
        }
    }
}

/// A stretch of a read buffer that is all zeros or holds data.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct Run {
    start: usize,
    len: usize,
    zero: bool,
}

/// Splits `buf` (read at disk `offset`) at block boundaries into zero and data runs, merging
/// neighbours of the same kind. Zero blocks are never stored, so zero means a hole.
fn zero_runs(offset: u64, buf: &[u8], block_size: u32) -> Vec<Run> {
    let bs = u64::from(block_size);
    let mut runs: Vec<Run> = Vec::new();
    let mut start = 0usize;
    while start < buf.len() {
        let pos = offset + start as u64;
        let piece = ((bs - pos % bs) as usize).min(buf.len() - start);
        let zero = is_zero(&buf[start..start + piece]);
        match runs.last_mut() {
            Some(last) if last.zero == zero => last.len += piece,
            _ => runs.push(Run {
                start,
                len: piece,
                zero,
            }),
        }
        start += piece;
    }
    runs
}

/// base:allocation: a block is a hole exactly when no object is stored for it. Blocks the
/// stack knows are zero cost nothing; the others are read (in parallel runs) to find out.
/// Covers at most [`p::MAX_PAYLOAD`] bytes per request (the client asks again for the rest).
fn execute_block_status(export: &Export, replies: &Replies, request: &Request) {
    let geometry = export.geometry();
    let bs = u64::from(geometry.block_size());
    let start = request.offset;
    let end = start + u64::from(request.len.min(p::MAX_PAYLOAD));
    let first = start / bs;
    let last = end.div_ceil(bs);
    let store = export.part.store();
    let mut zero: Vec<bool> = (first..last)
        .map(|b| store.known_zero(BlockId(b as u32)))
        .collect();
    // Read each run of unknown blocks at once, so block_part fetches them in parallel.
    let mut i = 0;
    while i < zero.len() {
        if zero[i] {
            i += 1;
            continue;
        }
        let run_end = (i..zero.len()).find(|&j| zero[j]).unwrap_or(zero.len());
        let mut buf = vec![0u8; (run_end - i) * bs as usize];
        if let Err(err) = export.part.read((first + i as u64) * bs, &mut buf) {
            return fail(replies, request, &err);
        }
        for (k, block) in buf.chunks(bs as usize).enumerate() {
            zero[i + k] = is_zero(block);
        }
        i = run_end;
    }
    let mut extents: Vec<Extent> = Vec::new();
    for (k, &is_hole) in zero.iter().enumerate() {
        let block_start = (first + k as u64) * bs;
        let len = ((block_start + bs).min(end) - block_start.max(start)) as u32;
        let flags = if is_hole {
            p::STATE_HOLE | p::STATE_ZERO
        } else {
            0
        };
        match extents.last_mut() {
            Some(last) if last.flags == flags => last.len += len,
            _ => extents.push(Extent { len, flags }),
        }
    }
    if request.flags & p::CMD_FLAG_REQ_ONE != 0 {
        extents.truncate(1);
    }
    let chunk = p::encode_block_status_chunk(request.cookie, p::BASE_ALLOCATION_ID, &extents);
    replies.send(&[&chunk]);
}

/// Bounds the payload bytes a connection holds; the reader waits when it is used up.
struct Budget {
    free: Mutex<u64>,
    freed: Condvar,
}

struct BudgetGuard<'a> {
    budget: &'a Budget,
    bytes: u64,
}

impl Budget {
    fn new(bytes: u64) -> Self {
        Budget {
            free: Mutex::new(bytes),
            freed: Condvar::new(),
        }
    }

    /// `bytes` must not exceed the total (guaranteed by the payload limit).
    fn acquire(&self, bytes: u64) -> BudgetGuard<'_> {
        let mut free = self.free.lock();
        while *free < bytes {
            self.freed.wait(&mut free);
        }
        *free -= bytes;
        BudgetGuard {
            budget: self,
            bytes,
        }
    }
}

impl Drop for BudgetGuard<'_> {
    fn drop(&mut self) {
        *self.budget.free.lock() += self.bytes;
        self.budget.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_runs_split_at_block_edges_and_merge_neighbours() {
        // Blocks of 4 bytes; buffer read at offset 2 covers: [2..4) [4..8) [8..12) [12..13).
        let buf = [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            zero_runs(2, &buf, 4),
            vec![
                Run {
                    start: 0,
                    len: 2,
                    zero: true
                },
                Run {
                    start: 2,
                    len: 4,
                    zero: false
                },
                Run {
                    start: 6,
                    len: 5,
                    zero: true
                },
            ]
        );
        assert_eq!(zero_runs(0, &[], 4), vec![]);
        assert_eq!(
            zero_runs(0, &[1; 9], 4),
            vec![Run {
                start: 0,
                len: 9,
                zero: false
            }]
        );
    }

    #[test]
    fn meta_context_queries_select_base_allocation() {
        let q = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(meta_context_selected(false, &[]));
        assert!(!meta_context_selected(true, &[]));
        assert!(meta_context_selected(true, &q(&["base:allocation"])));
        assert!(meta_context_selected(false, &q(&["base:"])));
        assert!(!meta_context_selected(true, &q(&["base:"])));
        assert!(!meta_context_selected(true, &q(&["qemu:dirty-bitmap:x"])));
    }

    #[test]
    fn budget_blocks_until_bytes_are_returned() {
        let budget = Budget::new(10);
        let first = budget.acquire(8);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let _second = budget.acquire(5);
            });
            std::thread::sleep(Duration::from_millis(50));
            assert!(!waiter.is_finished(), "acquired beyond the budget");
            drop(first);
            waiter.join().unwrap();
        });
        assert_eq!(*budget.free.lock(), 10);
    }
}
