//! The TCP transport under ureq: like ureq's own, but it acknowledges received data at once
//! (`TCP_QUICKACK`) instead of delaying the ACK.
//!
//! Why: a server that sends with Nagle's algorithm on holds the last, partial segment of a GET
//! body until the data before it is acknowledged, and Linux delays that ACK by up to 40 ms.
//! Against s3s-fs on loopback this made most 1 MiB GETs take 50 ms instead of 10, and every
//! cache miss waited for it. Written by hand because ureq's transport does not expose its
//! socket; only the connect and the two I/O calls are ours, TLS and proxies stay ureq's.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use ureq::Timeout;
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, Either, LazyBuffers, NextTimeout, ShutdownHandle,
    Transport,
};

/// Opens a plain TCP connection unless an earlier connector (a CONNECT proxy) already did.
#[derive(Debug, Default)]
pub struct QuickAckConnector;

impl<In: Transport> Connector<In> for QuickAckConnector {
    type Out = Either<In, QuickAckTransport>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        if let Some(proxied) = chained {
            return Ok(Some(Either::A(proxied)));
        }
        let stream = Arc::new(connect_first(details)?);
        if details.config.no_delay() {
            stream.set_nodelay(true)?;
        }
        // Lets the agent interrupt a blocked read or write from another thread.
        let handle: Weak<dyn ShutdownHandle> = Arc::downgrade(&stream) as Weak<dyn ShutdownHandle>;
        (details.register_shutdown)(handle)?;
        Ok(Some(Either::B(QuickAckTransport {
            stream,
            buffers: LazyBuffers::new(
                details.config.input_buffer_size(),
                details.config.output_buffer_size(),
            ),
            read_timeout: None,
            write_timeout: None,
        })))
    }
}

/// Tries the resolved addresses in order; each may use what is left of the connect timeout.
fn connect_first(details: &ConnectionDetails) -> Result<TcpStream, ureq::Error> {
    let started = Instant::now();
    let mut last = None;
    for addr in details.addrs.iter() {
        let left = details
            .timeout
            .not_zero()
            .map(|t| t.saturating_sub(started.elapsed()));
        let attempt = match left {
            Some(left) if left.is_zero() => return Err(ureq::Error::Timeout(Timeout::Connect)),
            Some(left) => TcpStream::connect_timeout(addr, left),
            None => TcpStream::connect(addr),
        };
        match attempt {
            Ok(stream) => return Ok(stream),
            Err(e) if is_timeout(&e) => last = Some(ureq::Error::Timeout(Timeout::Connect)),
            Err(e) => last = Some(ureq::Error::Io(e)),
        }
    }
    Err(last.unwrap_or_else(|| {
        ureq::Error::Io(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            "no address to connect to",
        ))
    }))
}

#[derive(Debug)]
pub struct QuickAckTransport {
    stream: Arc<TcpStream>,
    buffers: LazyBuffers,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
}

impl Transport for QuickAckTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        let timeout = timeout.for_write();
        let limit = io_limit(&timeout)?;
        if limit != self.write_timeout {
            self.stream.set_write_timeout(limit)?;
            self.write_timeout = limit;
        }
        let output = &self.buffers.output()[..amount];
        (&*self.stream)
            .write_all(output)
            .map_err(|e| io_error(e, timeout.reason))
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        let timeout = timeout.for_read();
        let limit = io_limit(&timeout)?;
        if limit != self.read_timeout {
            self.stream.set_read_timeout(limit)?;
            self.read_timeout = limit;
        }
        // The kernel leaves quick-ACK mode again after a while: set it before every read.
        // Only a speed matter, so a failure is ignored.
        let _ = socket2::SockRef::from(&*self.stream).set_tcp_quickack(true);
        let input = self.buffers.input_append_buf();
        let read = loop {
            match (&*self.stream).read(input) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                result => break result,
            }
        };
        let amount = read.map_err(|e| io_error(e, timeout.reason))?;
        self.buffers.input_appended(amount);
        Ok(amount > 0)
    }

    /// A pooled connection is reusable when the server has neither closed it nor sent
    /// anything unasked.
    fn is_open(&mut self) -> bool {
        if self.stream.set_nonblocking(true).is_err() {
            return false;
        }
        let idle = matches!(
            self.stream.peek(&mut [0u8]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        );
        self.stream.set_nonblocking(false).is_ok() && idle
    }
}

/// The socket timeout for the next read or write; an exhausted budget is the timeout itself.
fn io_limit(timeout: &NextTimeout) -> Result<Option<Duration>, ureq::Error> {
    if timeout.after.is_zero() {
        return Err(ureq::Error::Timeout(timeout.reason));
    }
    Ok(timeout.not_zero().map(|t| *t))
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

fn io_error(e: io::Error, reason: Timeout) -> ureq::Error {
    if is_timeout(&e) {
        ureq::Error::Timeout(reason)
    } else {
        ureq::Error::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::net::TcpListener;
    use std::sync::mpsc;
    use ureq::unversioned::resolver::DefaultResolver;

    fn agent(timeout: Duration) -> ureq::Agent {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .build();
        ureq::Agent::with_parts(config, QuickAckConnector, DefaultResolver::default())
    }

    /// Serves `replies` requests per connection with a fixed body, then closes the connection;
    /// reports each accepted connection.
    fn server(replies: usize) -> (String, mpsc::Receiver<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let (accepted, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let _ = accepted.send(());
                let mut reader = io::BufReader::new(conn.try_clone().unwrap());
                let mut conn = conn;
                for _ in 0..replies {
                    let mut line = String::new();
                    while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                        line.clear();
                    }
                    let body = vec![b'x'; 100_000];
                    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                    if conn.write_all(head.as_bytes()).is_err() || conn.write_all(&body).is_err() {
                        break;
                    }
                }
            }
        });
        (url, rx)
    }

    fn get(agent: &ureq::Agent, url: &str) -> usize {
        let mut reply = agent.get(url).call().expect("GET");
        reply.body_mut().read_to_vec().expect("body").len()
    }

    #[test]
    fn keep_alive_reuses_one_connection() {
        let (url, accepted) = server(3);
        let agent = agent(Duration::from_secs(10));
        for _ in 0..3 {
            assert_eq!(get(&agent, &url), 100_000);
        }
        assert_eq!(accepted.try_iter().count(), 1);
    }

    #[test]
    fn a_connection_the_server_closed_is_not_reused() {
        let (url, accepted) = server(1);
        let agent = agent(Duration::from_secs(10));
        assert_eq!(get(&agent, &url), 100_000);
        // Let the server's close arrive before the next request looks at the pool.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(get(&agent, &url), 100_000);
        assert_eq!(accepted.try_iter().count(), 2);
    }

    #[test]
    fn a_silent_server_is_a_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let err = agent(Duration::from_millis(300))
            .get(&url)
            .call()
            .unwrap_err();
        assert!(matches!(err, ureq::Error::Timeout(_)), "{err}");
        drop(listener);
    }

    #[test]
    fn nothing_listening_is_an_io_error() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = agent(Duration::from_secs(5))
            .get(&format!("http://127.0.0.1:{port}/"))
            .call()
            .unwrap_err();
        assert!(
            matches!(&err, ureq::Error::Io(e) if e.kind() == io::ErrorKind::ConnectionRefused),
            "{err}"
        );
    }
}
