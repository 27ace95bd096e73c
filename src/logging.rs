//! Log lines go to stderr (`s3backer: ...`, like C) in the foreground and to syslog once the
//! process has daemonized. tracing-subscriber has no syslog writer, so the small writer below
//! hands each formatted line to libc's syslog(3).

use std::ffi::CString;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

static USE_SYSLOG: AtomicBool = AtomicBool::new(false);

/// Verbosity chosen by the C flags; `RUST_LOG` overrides it when set.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Verbosity {
    Quiet,
    Normal,
    Debug,
}

/// Installs the global subscriber. Call once, before any thread starts.
pub fn init(verbosity: Verbosity) {
    let default = match verbosity {
        Verbosity::Quiet => "warn",
        Verbosity::Normal => "info",
        Verbosity::Debug => "debug",
    };
    // Our own crate at the chosen level; dependencies stay at warn unless RUST_LOG says otherwise.
    // fuser warns about every unimplemented request (getxattr...): noise, not news.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("warn,fuser=error,s3backer={default}")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .event_format(LineFormat)
        .with_writer(LogSink)
        .init();
}

/// From now on, log lines go to syslog (facility daemon) instead of stderr.
pub fn switch_to_syslog() {
    static IDENT: &[u8] = b"s3backer\0";
    // SAFETY: IDENT is a static NUL-terminated string, as openlog requires it to outlive the log.
    unsafe { libc::openlog(IDENT.as_ptr().cast(), libc::LOG_PID, libc::LOG_DAEMON) };
    USE_SYSLOG.store(true, Ordering::SeqCst);
}

/// `s3backer: message`, with `warning:`/`error:` markers like the C program's messages.
struct LineFormat;

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let syslog = USE_SYSLOG.load(Ordering::Relaxed);
        if !syslog {
            write!(writer, "s3backer: ")?;
        }
        match *event.metadata().level() {
            Level::ERROR => write!(writer, "error: ")?,
            Level::WARN => write!(writer, "warning: ")?,
            Level::DEBUG | Level::TRACE => write!(writer, "debug: ")?,
            Level::INFO => {}
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

struct LogSink;

impl<'a> MakeWriter<'a> for LogSink {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter::new(libc::LOG_INFO)
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        let priority = match *meta.level() {
            Level::ERROR => libc::LOG_ERR,
            Level::WARN => libc::LOG_WARNING,
            Level::INFO => libc::LOG_INFO,
            Level::DEBUG | Level::TRACE => libc::LOG_DEBUG,
        };
        LineWriter::new(priority)
    }
}

/// Collects one formatted event and emits it on drop, so a line is never split.
struct LineWriter {
    priority: libc::c_int,
    line: Vec<u8>,
}

impl LineWriter {
    fn new(priority: libc::c_int) -> Self {
        LineWriter {
            priority,
            line: Vec::with_capacity(128),
        }
    }
}

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if self.line.is_empty() {
            return;
        }
        // One event, one line: a multi-line message (a dependency's pretty Debug output)
        // is joined, so line-based log readers never see half an event.
        let text = String::from_utf8_lossy(&self.line);
        let text = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
            .replace('\0', " ");
        if USE_SYSLOG.load(Ordering::Relaxed) {
            if let Ok(msg) = CString::new(text) {
                // SAFETY: both strings are valid NUL-terminated C strings for the call's duration.
                unsafe { libc::syslog(self.priority, c"%s".as_ptr(), msg.as_ptr()) };
            }
        } else {
            let _ = writeln!(io::stderr().lock(), "{text}");
        }
    }
}
