//! The HTTP side: URLs (spec 2.1), SigV4 signing, one pooled keep-alive agent shared by all
//! threads, and the retry loop of spec 2.9 with its counters.

use std::fmt;
use std::io::Read as _;
use std::time::{Duration, Instant};

use base64::Engine as _;
use md5::{Digest as _, Md5};
use ureq::http::{HeaderMap, Method};
use ureq::unversioned::resolver::DefaultResolver;
use ureq::unversioned::transport::{ConnectProxyConnector, Connector as _, RustlsConnector};
use ureq_quickack::QuickAckConnector;

use super::credentials::{self, CredentialStore};
use super::retry::Backoff;
use super::{AuthVersion, S3Options};
use crate::error::{Error, Result};
use crate::stats::{Counter, StatsReport, TimeCounter};

/// Presigned URLs are used at once; this only has to outlast one attempt.
const SIGNATURE_LIFETIME_SECS: u64 = 15 * 60;

/// One request, rebuilt and re-signed on every attempt.
pub(crate) struct Request<'a> {
    pub method: Method,
    /// Object key, or `None` for bucket-level requests (list).
    pub key: Option<&'a str>,
    pub query: Vec<(&'static str, String)>,
    /// Header names in lowercase; all of them are signed.
    pub headers: Vec<(&'static str, String)>,
    pub body: &'a [u8],
    /// Statuses handed back to the caller as they are, without retry (404 and 304 always are).
    pub final_statuses: &'static [u16],
    /// Largest body accepted.
    pub max_body: u64,
}

impl<'a> Request<'a> {
    pub fn new(method: Method, key: Option<&'a str>) -> Self {
        Request {
            method,
            key,
            query: Vec::new(),
            headers: Vec::new(),
            body: &[],
            final_statuses: &[],
            max_body: 1 << 20,
        }
    }

    fn what(&self) -> String {
        format!("{} {}", self.method, self.key.unwrap_or("(bucket)"))
    }
}

/// A response with a status the caller handles.
#[derive(Debug)]
pub(crate) struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Counters of the `http_*`/`curl_*` stats lines (spec 7).
#[derive(Debug, Default)]
pub(crate) struct HttpStats {
    pub gets: Counter,
    pub puts: Counter,
    pub deletes: Counter,
    pub get_time: TimeCounter,
    pub put_time: TimeCounter,
    pub delete_time: TimeCounter,
    pub unauthorized: Counter,
    pub forbidden: Counter,
    pub stale: Counter,
    pub redirect: Counter,
    pub mismatch: Counter,
    /// GETs that found the cached copy current (304, or the same ETag).
    pub verified: Counter,
    pub status_5xx: Counter,
    pub status_4xx: Counter,
    pub status_3xx: Counter,
    pub other_error: Counter,
    pub retries: Counter,
    pub retry_delay: TimeCounter,
    pub timeouts: Counter,
    pub connect_failed: Counter,
    pub host_unknown: Counter,
    pub transport_other: Counter,
}

impl HttpStats {
    pub fn report(&self, r: &mut StatsReport) {
        r.add("http_gets", self.gets.get());
        r.add("http_puts", self.puts.get());
        r.add("http_deletes", self.deletes.get());
        r.add_secs(
            "http_avg_get_time",
            self.get_time.average_secs(self.gets.get()),
        );
        r.add_secs(
            "http_avg_put_time",
            self.put_time.average_secs(self.puts.get()),
        );
        r.add_secs(
            "http_avg_delete_time",
            self.delete_time.average_secs(self.deletes.get()),
        );
        r.add("http_unauthorized", self.unauthorized.get());
        r.add("http_forbidden", self.forbidden.get());
        r.add("http_stale", self.stale.get());
        r.add("http_redirect", self.redirect.get());
        r.add("http_verified", self.verified.get());
        r.add("http_mismatch", self.mismatch.get());
        r.add("http_5xx_error", self.status_5xx.get());
        r.add("http_4xx_error", self.status_4xx.get());
        r.add("http_3xx_error", self.status_3xx.get());
        r.add("http_other_error", self.other_error.get());
        r.add("http_canceled_writes", 0);
        r.add("http_num_retries", self.retries.get());
        r.add_secs(
            "http_total_retry_delay",
            self.retry_delay.total().as_secs_f64(),
        );
        r.add("curl_timeouts", self.timeouts.get());
        r.add("curl_connect_failed", self.connect_failed.get());
        r.add("curl_host_unknown", self.host_unknown.get());
        r.add("curl_out_of_memory", 0);
        r.add("curl_other_error", self.transport_other.get());
    }

    pub fn reset(&self) {
        for c in [
            &self.gets,
            &self.puts,
            &self.deletes,
            &self.unauthorized,
            &self.forbidden,
            &self.stale,
            &self.redirect,
            &self.mismatch,
            &self.verified,
            &self.status_5xx,
            &self.status_4xx,
            &self.status_3xx,
            &self.other_error,
            &self.retries,
            &self.timeouts,
            &self.connect_failed,
            &self.host_unknown,
            &self.transport_other,
        ] {
            c.reset();
        }
        for t in [
            &self.get_time,
            &self.put_time,
            &self.delete_time,
            &self.retry_delay,
        ] {
            t.reset();
        }
    }
}

/// Blocking S3 client shared by every thread of the stack.
pub struct S3Client {
    pub(crate) opts: S3Options,
    agent: ureq::Agent,
    credentials: CredentialStore,
    /// `scheme://[bucket.]host/[bucket/]`: what object keys are appended to.
    object_base: String,
    pub(crate) stats: HttpStats,
}

impl fmt::Debug for S3Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Client")
            .field("object_base", &self.object_base)
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

impl S3Client {
    pub fn new(opts: S3Options) -> Result<Self> {
        validate_base_url(&opts.base_url)?;
        if opts.bucket.is_empty() || opts.bucket.starts_with('/') {
            return Err(Error::Invalid(format!(
                "invalid bucket name \"{}\"",
                opts.bucket
            )));
        }
        if opts.auth_version == AuthVersion::Aws2 {
            return Err(Error::Invalid(
                "\"--authVersion=aws2\" is not supported yet; use aws4".into(),
            ));
        }
        let credentials = credentials::resolve(&opts.credentials)?;
        if credentials.is_anonymous() && !opts.read_only {
            tracing::warn!("no \"accessId\" specified; only read operations will succeed");
        }
        let agent = build_agent(&opts)?;
        let object_base = object_base(&opts);
        Ok(S3Client {
            opts,
            agent,
            credentials,
            object_base,
            stats: HttpStats::default(),
        })
    }

    pub fn options(&self) -> &S3Options {
        &self.opts
    }

    /// Full URL of an object (keys are percent-encoded, spec 2.1).
    pub fn object_url(&self, key: &str) -> String {
        format!("{}{}", self.object_base, encode_key(key))
    }

    /// URL of bucket-level requests; path style has no slash after the bucket (spec 2.1).
    fn bucket_url(&self) -> String {
        if self.opts.vhost {
            self.object_base.clone()
        } else {
            self.object_base.trim_end_matches('/').to_string()
        }
    }

    /// `<desc>` of spec 5.2.
    pub fn describe(&self) -> String {
        format!("{}{}", self.object_base, self.opts.naming.prefix)
    }

    /// Runs a request with retries. 2xx, 404, 304 and `final_statuses` come back as replies;
    /// `check` may reject a 2xx reply with an error that is retried like a failed attempt.
    pub(crate) fn execute(
        &self,
        request: &Request<'_>,
        check: &dyn Fn(&Reply) -> Result<()>,
    ) -> Result<Reply> {
        let mut backoff = Backoff::new(self.opts.initial_retry_pause, self.opts.max_retry_pause);
        loop {
            let started = Instant::now();
            let mut permanent = false;
            let outcome = self.attempt(request).and_then(|reply| {
                permanent = is_permanent_failure(reply.status, &reply.body);
                self.classify(request, &reply)?;
                if (200..300).contains(&reply.status) {
                    check(&reply)?;
                }
                Ok(reply)
            });
            self.count_operation(&request.method, started.elapsed());
            let error = match outcome {
                Ok(reply) => return Ok(reply),
                Err(e) => e,
            };
            if permanent {
                tracing::error!("{}: {error} (a client error: not retried)", request.what());
                return Err(error);
            }
            match backoff.next_pause(rand::random::<f64>()) {
                Some(pause) => {
                    tracing::debug!(
                        "{} failed: {error}; retrying in {}ms",
                        request.what(),
                        pause.as_millis()
                    );
                    self.stats.retries.inc();
                    self.stats.retry_delay.add(pause);
                    std::thread::sleep(pause);
                }
                None => {
                    tracing::error!("giving up on: {}: {error}", request.what());
                    return Err(error);
                }
            }
        }
    }

    fn count_operation(&self, method: &Method, elapsed: Duration) {
        let (count, time) = match *method {
            Method::GET => (&self.stats.gets, &self.stats.get_time),
            Method::PUT => (&self.stats.puts, &self.stats.put_time),
            Method::DELETE => (&self.stats.deletes, &self.stats.delete_time),
            _ => return,
        };
        count.inc();
        time.add(elapsed);
    }

    /// Maps a status to success or the error of the spec 2.9 table (counted).
    fn classify(&self, request: &Request<'_>, reply: &Reply) -> Result<()> {
        let status = reply.status;
        if (200..300).contains(&status)
            || status == 404
            || status == 304
            || request.final_statuses.contains(&status)
        {
            return Ok(());
        }
        let what = format!(
            "{}: HTTP {status}{}",
            request.what(),
            error_code(&reply.body)
        );
        if self.opts.debug_http && !reply.body.is_empty() {
            tracing::debug!("error body: {}", String::from_utf8_lossy(&reply.body));
        }
        match status {
            300..=399 => self.stats.status_3xx.inc(),
            400..=499 => self.stats.status_4xx.inc(),
            500..=599 => self.stats.status_5xx.inc(),
            _ => self.stats.other_error.inc(),
        }
        Err(match status {
            401 => {
                self.stats.unauthorized.inc();
                Error::Unauthorized(what)
            }
            403 => {
                self.stats.forbidden.inc();
                Error::Forbidden(what)
            }
            412 => {
                self.stats.stale.inc();
                Error::Stale(what)
            }
            301 | 302 | 307 | 308 => {
                self.stats.redirect.inc();
                Error::Redirect(what)
            }
            _ => Error::Other(what),
        })
    }

    /// One signed attempt; transport failures become errors, every status a reply.
    fn attempt(&self, request: &Request<'_>) -> Result<Reply> {
        let url = self.signed_url(request)?;
        let mut builder = ureq::http::Request::builder()
            .method(request.method.clone())
            .uri(url.as_str());
        for (name, value) in &request.headers {
            builder = builder.header(*name, value.as_str());
        }
        let http_request = builder
            .body(request.body.to_vec())
            .map_err(|e| Error::Other(format!("{}: bad request: {e}", request.what())))?;
        if self.opts.debug_http {
            tracing::debug!(
                "HTTP request: {} {}",
                request.method,
                strip_query(url.as_str())
            );
        }
        let mut response = self
            .agent
            .run(http_request)
            .map_err(|e| self.transport_error(request, e))?;
        let status = response.status().as_u16();
        if self.opts.debug_http {
            let headers: Vec<String> = response
                .headers()
                .iter()
                .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
                .collect();
            tracing::debug!("HTTP response: {status} [{}]", headers.join(", "));
        }
        let body = if request.method == Method::HEAD {
            Vec::new()
        } else {
            // Sized from Content-Length up front: growing a 1 MiB body step by step copies it.
            let expected = response.body().content_length().unwrap_or(0);
            let mut body = Vec::with_capacity(expected.min(request.max_body) as usize);
            response
                .body_mut()
                .with_config()
                .limit(request.max_body)
                .reader()
                .read_to_end(&mut body)
                .map_err(|e| self.transport_error(request, e.into()))?;
            body
        };
        Ok(Reply {
            status,
            headers: response.headers().clone(),
            body,
        })
    }

    fn transport_error(&self, request: &Request<'_>, e: ureq::Error) -> Error {
        let what = format!("{}: {e}", request.what());
        match &e {
            ureq::Error::Timeout(_) => {
                self.stats.timeouts.inc();
                Error::Timeout(what)
            }
            ureq::Error::HostNotFound => {
                self.stats.host_unknown.inc();
                Error::Connect(what)
            }
            ureq::Error::ConnectionFailed => {
                self.stats.connect_failed.inc();
                Error::Connect(what)
            }
            ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
                self.stats.timeouts.inc();
                Error::Timeout(what)
            }
            ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
                self.stats.connect_failed.inc();
                Error::Connect(what)
            }
            _ => {
                self.stats.transport_other.inc();
                Error::Other(what)
            }
        }
    }

    /// The URL with query and, when we have keys, the SigV4 presigned query parameters.
    fn signed_url(&self, request: &Request<'_>) -> Result<url::Url> {
        let raw = match request.key {
            Some(key) => self.object_url(key),
            None => self.bucket_url(),
        };
        let mut url =
            url::Url::parse(&raw).map_err(|e| Error::Invalid(format!("bad URL \"{raw}\": {e}")))?;
        let mut query = request.query.clone();
        query.sort();
        let Some(keys) = self.credentials.current() else {
            if !query.is_empty() {
                url.query_pairs_mut()
                    .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
            }
            return Ok(url);
        };
        url.set_query(None);
        let mut headers = request.headers.clone();
        headers.sort();
        let method = match request.method {
            Method::GET => rusty_s3::Method::Get,
            Method::PUT => rusty_s3::Method::Put,
            Method::DELETE => rusty_s3::Method::Delete,
            Method::HEAD => rusty_s3::Method::Head,
            Method::POST => rusty_s3::Method::Post,
            _ => return Err(Error::Invalid(format!("method {}", request.method))),
        };
        Ok(rusty_s3::signing::sign(
            &jiff::Timestamp::now(),
            method,
            url,
            &keys.access_id,
            &keys.secret,
            keys.token.as_deref(),
            &self.opts.region,
            SIGNATURE_LIFETIME_SECS,
            query.iter().map(|(k, v)| (*k, v.as_str())),
            headers.iter().map(|(k, v)| (*k, v.as_str())),
        ))
    }

    /// `x-amz-acl`, SSE and storage-class headers shared by block and mount-token PUTs.
    pub(crate) fn put_headers(
        &self,
        body: &[u8],
        content_type: &str,
    ) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            ("content-type", content_type.to_string()),
            ("content-md5", content_md5(body)),
            ("x-amz-acl", self.opts.access_type.clone()),
        ];
        if let Some(sse) = &self.opts.sse {
            headers.push(("x-amz-server-side-encryption", sse.clone()));
            if let Some(id) = &self.opts.sse_key_id {
                headers.push(("x-amz-server-side-encryption-aws-kms-key-id", id.clone()));
            }
        }
        if let Some(class) = &self.opts.storage_class {
            headers.push(("x-amz-storage-class", class.clone()));
        }
        headers
    }
}

fn build_agent(opts: &S3Options) -> Result<ureq::Agent> {
    let mut tls =
        ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::PlatformVerifier);
    if let Some(path) = &opts.cacert {
        let pem = std::fs::read(path)
            .map_err(|e| Error::io(format!("can't read CA bundle {}", path.display()), e))?;
        let certs = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(cert)) => Some(Ok(cert)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::Invalid(format!("bad CA bundle {}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(Error::Invalid(format!(
                "no certificates in CA bundle {}",
                path.display()
            )));
        }
        tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
    }
    if opts.insecure {
        tracing::warn!("TLS certificate verification is disabled (\"--insecure\")");
        tls = tls.disable_verification(true);
    }
    let idle = if opts.no_connection_reuse {
        0
    } else {
        opts.max_connections.max(1)
    };
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        // Redirects are errors (spec 2.9): hand every 3xx back as a response.
        .max_redirects(0)
        .timeout_global(Some(opts.timeout))
        .user_agent(opts.user_agent.as_str())
        .max_idle_connections(idle)
        .max_idle_connections_per_host(idle)
        .tls_config(tls.build())
        .build();
    let connector =
        ().chain(ConnectProxyConnector::default())
            .chain(QuickAckConnector)
            .chain(RustlsConnector::default());
    Ok(ureq::Agent::with_parts(
        config,
        connector,
        DefaultResolver::default(),
    ))
}

fn validate_base_url(base_url: &str) -> Result<()> {
    let parsed = url::Url::parse(base_url)
        .map_err(|e| Error::Invalid(format!("invalid base URL \"{base_url}\": {e}")))?;
    let scheme_ok = matches!(parsed.scheme(), "http" | "https");
    if !scheme_ok || parsed.host_str().is_none_or(str::is_empty) || !base_url.ends_with('/') {
        return Err(Error::Invalid(format!(
            "invalid base URL \"{base_url}\": must be http:// or https://, have a host and end with /"
        )));
    }
    Ok(())
}

/// `baseURL + BUCKET/` (path style) or the vhost URL (`BUCKET.` after `scheme://`).
pub(crate) fn object_base(opts: &S3Options) -> String {
    if opts.vhost {
        match opts.base_url.split_once("://") {
            Some((scheme, rest)) => format!("{scheme}://{}.{rest}", opts.bucket),
            None => opts.base_url.clone(),
        }
    } else {
        format!("{}{}/", opts.base_url, opts.bucket)
    }
}

/// Percent-encodes a key for a URL path: RFC 3986 unreserved characters and `/` stay.
pub(crate) fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub(crate) fn content_md5(body: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Md5::digest(body))
}

/// Drops the query (it carries the signature) before logging a URL.
fn strip_query(url: &str) -> &str {
    url.split_once('?').map_or(url, |(base, _)| base)
}

/// ` (Code)` from an S3 XML error body, for error messages.
/// A 4xx that asking again cannot fix (bad bucket name, access denied, ...): failing fast
/// beats 30 s of retries (DESIGN: 4xx other than 404/412 fail fast). C retries them all; we
/// keep retrying the 4xx that are transient: 408, 412 (stale: ec_protect decides), 429, and
/// S3's timeout, throttling and expired-token codes (IAM credentials are refreshed meanwhile).
fn is_permanent_failure(status: u16, body: &[u8]) -> bool {
    const TRANSIENT_CODES: &[&str] = &[
        "<Code>RequestTimeout</Code>",
        "<Code>SlowDown</Code>",
        "<Code>ExpiredToken</Code>",
        "<Code>RequestTimeTooSkewed</Code>",
        "<Code>OperationAborted</Code>",
    ];
    // Status first: a 2xx body is a whole block, not worth scanning.
    if !(400..500).contains(&status) || matches!(status, 404 | 408 | 412 | 429) {
        return false;
    }
    let body = String::from_utf8_lossy(body);
    !TRANSIENT_CODES.iter().any(|code| body.contains(code))
}

fn error_code(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    match text
        .split_once("<Code>")
        .and_then(|(_, rest)| rest.split_once("</Code>"))
    {
        Some((code, _)) if code.len() < 100 => format!(" ({code})"),
        _ => String::new(),
    }
}

/// Parses an ETag or HMAC header (spec 2.5): optional whitespace, `"`, then exactly `N` bytes
/// worth of hex digits; anything after them is ignored. Malformed = `None` (logged).
pub fn parse_quoted_hex<const N: usize>(value: &str) -> Option<[u8; N]> {
    let parsed = value
        .trim_start()
        .strip_prefix('"')
        .and_then(|rest| rest.get(..2 * N))
        .and_then(|digits| {
            let mut out = [0u8; N];
            hex::decode_to_slice(digits, &mut out).ok().map(|()| out)
        });
    if parsed.is_none() {
        tracing::warn!("rec'd malformed response header: {value:?}");
    }
    parsed
}

/// True when an ETag is a plain MD5 (`"<32 hex>"`, not multipart `"<32 hex>-N"`).
pub fn is_plain_md5_etag(value: &str) -> bool {
    let v = value.trim();
    v.len() == 34
        && v.starts_with('"')
        && v.ends_with('"')
        && v[1..33].bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::naming::Naming;

    fn opts(base: &str, vhost: bool, prefix: &str) -> S3Options {
        S3Options {
            base_url: base.into(),
            bucket: "mybucket".into(),
            naming: Naming::new(prefix, false),
            vhost,
            credentials: crate::backend::s3::CredentialFlags {
                access_id: Some(String::new()),
                ..Default::default()
            },
            ..S3Options::default()
        }
    }

    #[test]
    fn path_and_vhost_urls() {
        let path = S3Client::new(opts("http://s3.amazonaws.com/", false, "vm1/")).unwrap();
        assert_eq!(
            path.object_url("vm1/00001234"),
            "http://s3.amazonaws.com/mybucket/vm1/00001234"
        );
        assert_eq!(path.bucket_url(), "http://s3.amazonaws.com/mybucket");
        assert_eq!(path.describe(), "http://s3.amazonaws.com/mybucket/vm1/");
        let vhost = S3Client::new(opts("https://s3.eu-west-1.amazonaws.com/", true, "")).unwrap();
        assert_eq!(
            vhost.object_url("00000000"),
            "https://mybucket.s3.eu-west-1.amazonaws.com/00000000"
        );
        assert_eq!(
            vhost.bucket_url(),
            "https://mybucket.s3.eu-west-1.amazonaws.com/"
        );
        assert_eq!(
            vhost.describe(),
            "https://mybucket.s3.eu-west-1.amazonaws.com/"
        );
    }

    #[test]
    fn keys_are_percent_encoded_except_unreserved_and_slash() {
        assert_eq!(encode_key("a b/c+d~e_f.g-h"), "a%20b/c%2Bd~e_f.g-h");
    }

    #[test]
    fn bad_base_urls_and_aws2_are_rejected() {
        for base in ["ftp://x/", "http://host", "nonsense"] {
            let err = S3Client::new(opts(base, false, "")).unwrap_err();
            assert!(matches!(err, Error::Invalid(_)), "{base}: {err}");
        }
        let mut o = opts("http://h/", false, "");
        o.auth_version = AuthVersion::Aws2;
        assert!(S3Client::new(o).unwrap_err().to_string().contains("aws2"));
    }

    #[test]
    fn signed_url_carries_region_and_signed_headers() {
        let mut o = opts("http://127.0.0.1:9000/", false, "");
        o.credentials.access_id = Some("AKID".into());
        o.credentials.access_key = Some("SECRET".into());
        o.region = "eu-west-1".into();
        let client = S3Client::new(o).unwrap();
        let mut req = Request::new(Method::PUT, Some("00000001"));
        req.headers = vec![("x-amz-acl", "private".into()), ("content-md5", "x".into())];
        let url = client.signed_url(&req).unwrap().to_string();
        assert!(
            url.starts_with("http://127.0.0.1:9000/mybucket/00000001?"),
            "{url}"
        );
        assert!(url.contains("%2Feu-west-1%2Fs3%2Faws4_request"), "{url}");
        assert!(
            url.contains("X-Amz-SignedHeaders=content-md5%3Bhost%3Bx-amz-acl"),
            "{url}"
        );
        assert!(!url.contains("SECRET"), "{url}");
    }

    #[test]
    fn etag_and_hmac_parsing_follows_spec_rules() {
        let md5 = "0123456789abcdef0123456789ABCDEF";
        assert_eq!(
            parse_quoted_hex::<16>(&format!("  \"{md5}\"")).map(hex::encode),
            Some(md5.to_lowercase())
        );
        // Multipart ETags yield their first 32 digits.
        assert!(parse_quoted_hex::<16>(&format!("\"{md5}-3\"")).is_some());
        assert!(parse_quoted_hex::<16>(md5).is_none(), "unquoted");
        assert!(parse_quoted_hex::<16>("\"0123\"").is_none(), "short");
        assert!(parse_quoted_hex::<16>(&format!("\"{}\"", "g".repeat(32))).is_none());
        let mac = "a".repeat(40);
        assert!(parse_quoted_hex::<20>(&format!("\"{mac}\"")).is_some());
        assert!(parse_quoted_hex::<20>(&format!("\"{}\"", "a".repeat(39))).is_none());
        assert!(is_plain_md5_etag(&format!("\"{md5}\"")));
        assert!(!is_plain_md5_etag(&format!("\"{md5}-3\"")));
    }

    #[test]
    fn s3_error_code_is_extracted() {
        assert_eq!(
            error_code(b"<Error><Code>SignatureDoesNotMatch</Code></Error>"),
            " (SignatureDoesNotMatch)"
        );
        assert_eq!(error_code(b"junk"), "");
    }

    const SERVER_ETAG: &str = "00112233445566778899aabbccddeeff";

    /// A loopback server answering every request with `status` (and `SERVER_ETAG`); returns
    /// its URL and hit count.
    fn fixed_status_server(
        status: u16,
    ) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = hits.clone();
        // Detached: it ends with the test process; each connection is served and closed.
        std::thread::spawn(move || {
            for stream in listener.incoming().take(100) {
                let Ok(stream) = stream else { return };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                for _ in 0..100 {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                }
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut out = stream;
                let _ = write!(
                    out,
                    "HTTP/1.1 {status} X\r\nLocation: http://elsewhere/\r\nETag: \"{SERVER_ETAG}\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        (url, hits)
    }

    fn fast_retry_client(base: &str) -> S3Client {
        let mut o = opts(base, false, "");
        o.initial_retry_pause = Duration::from_millis(10);
        o.max_retry_pause = Duration::from_millis(50);
        S3Client::new(o).unwrap()
    }

    #[test]
    fn statuses_map_to_errors_and_retries_per_spec() {
        let hits_of = |status: u16| {
            let (url, hits) = fixed_status_server(status);
            let client = fast_retry_client(&url);
            let result = client.execute(&Request::new(Method::GET, Some("k")), &|_| Ok(()));
            (result, hits.load(std::sync::atomic::Ordering::SeqCst))
        };
        let (result, hits) = hits_of(500);
        assert!(
            matches!(result, Err(Error::Other(ref m)) if m.contains("500")),
            "{result:?}"
        );
        assert!(hits > 1, "5xx is retried");
        let (result, hits) = hits_of(301);
        assert!(matches!(result, Err(Error::Redirect(_))), "{result:?}");
        assert!(hits > 1, "3xx is retried");
        let (result, hits) = hits_of(404);
        assert_eq!(result.map(|r| r.status).ok(), Some(404));
        assert_eq!(hits, 1, "404 is final");
        let (result, _) = hits_of(412);
        assert!(matches!(result, Err(Error::Stale(_))), "{result:?}");
        let (result, hits) = hits_of(403);
        assert!(matches!(result, Err(Error::Forbidden(_))), "{result:?}");
        assert_eq!(hits, 1, "a client error fails fast");
        let (_, hits) = hits_of(429);
        assert!(hits > 1, "429 (too many requests) is retried");
    }

    #[test]
    fn transient_client_errors_are_retried_and_the_rest_fail_fast() {
        let body = |code: &str| format!("<Error><Code>{code}</Code></Error>").into_bytes();
        assert!(is_permanent_failure(400, &body("InvalidBucketName")));
        assert!(is_permanent_failure(403, &body("AccessDenied")));
        assert!(!is_permanent_failure(400, &body("RequestTimeout")));
        assert!(!is_permanent_failure(400, &body("ExpiredToken")));
        assert!(!is_permanent_failure(503, &body("SlowDown")));
        assert!(!is_permanent_failure(500, b""));
        assert!(!is_permanent_failure(408, b""));
    }

    #[test]
    fn if_match_get_answered_412_is_stale_at_once_for_the_caller_to_retry() {
        let (url, hits) = fixed_status_server(412);
        let client = fast_retry_client(&url);
        let result = client.get_object(
            "k",
            crate::geometry::BlockId(0),
            "deflate",
            4096,
            super::super::Condition::IfMatch([7; 16]),
            true,
        );
        assert!(
            matches!(result, Err(Error::Stale(_))),
            "{:?}",
            result.map(|_| ())
        );
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(client.stats.stale.get(), 1);
    }

    #[test]
    fn if_none_match_get_is_unchanged_on_304_or_on_the_same_etag() {
        use super::super::{Condition, Got};
        let get = |url: &str, cached: [u8; 16]| {
            let client = fast_retry_client(url);
            let got = client
                .get_object(
                    "k",
                    crate::geometry::BlockId(0),
                    "deflate",
                    4096,
                    Condition::IfNoneMatch(cached),
                    false,
                )
                .unwrap();
            (got, client.stats.verified.get())
        };
        let (not_modified, hits) = fixed_status_server(304);
        let (got, verified) = get(&not_modified, [7; 16]);
        assert!(matches!(got, Got::Unchanged));
        assert_eq!(
            (verified, hits.load(std::sync::atomic::Ordering::SeqCst)),
            (1, 1)
        );
        // A server that ignores If-None-Match (s3s-fs) answers 200: its ETag decides.
        let (ok, _) = fixed_status_server(200);
        let same: [u8; 16] = hex::decode(SERVER_ETAG).unwrap().try_into().unwrap();
        let (got, verified) = get(&ok, same);
        assert!(matches!(got, Got::Unchanged));
        assert_eq!(verified, 1);
        let (got, verified) = get(&ok, [7; 16]);
        assert!(matches!(got, Got::Object(_)));
        assert_eq!(verified, 0);
        // 304 to a GET that asked for no condition is an error, not an empty block.
        let client = fast_retry_client(&not_modified);
        let result = client.get_object(
            "k",
            crate::geometry::BlockId(0),
            "deflate",
            4096,
            Condition::None,
            false,
        );
        assert!(
            matches!(result, Err(Error::Other(_))),
            "{:?}",
            result.map(|_| ())
        );
    }

    #[test]
    fn put_returns_the_servers_etag_even_when_it_is_not_the_body_md5() {
        let (url, _) = fixed_status_server(200);
        let client = fast_retry_client(&url);
        let etag = client
            .put_object("k", b"abc", "text/plain", Vec::new())
            .unwrap();
        assert_eq!(hex::encode(etag), SERVER_ETAG);
    }

    /// `openssl s_server -www` on loopback with a certificate for 127.0.0.1 from a fresh CA
    /// (`ca.pem` in `dir`); killed on drop.
    struct TlsServer {
        child: std::process::Child,
        dir: tempfile::TempDir,
        url: String,
    }

    impl TlsServer {
        fn start() -> TlsServer {
            use std::process::{Command, Stdio};
            let dir = tempfile::tempdir().unwrap();
            let openssl = |args: &str| {
                let ok = Command::new("openssl")
                    .args(args.split(' '))
                    .current_dir(dir.path())
                    .stderr(Stdio::null())
                    .status()
                    .expect("openssl (Debian package openssl)");
                assert!(ok.success(), "openssl {args}");
            };
            // webpki refuses a CA certificate as the server's own: a CA signs a leaf.
            std::fs::write(dir.path().join("san"), "subjectAltName=IP:127.0.0.1\n").unwrap();
            openssl(
                "req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=test-ca -keyout ca.key -out ca.pem",
            );
            openssl(
                "req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout key.pem -out leaf.csr",
            );
            openssl(
                "x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile san -out cert.pem",
            );
            let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = Command::new("openssl")
                .args(["s_server", "-www", "-quiet", "-accept"])
                .arg(format!("127.0.0.1:{port}"))
                .arg("-cert")
                .arg(&cert)
                .arg("-key")
                .arg(&key)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(Instant::now() < deadline, "s_server did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
            TlsServer {
                child,
                dir,
                url: format!("https://127.0.0.1:{port}/"),
            }
        }
    }

    impl Drop for TlsServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[test]
    fn https_works_with_the_given_ca_and_fails_without_it() {
        let server = TlsServer::start();
        let mut trusted = opts(&server.url, false, "");
        trusted.cacert = Some(server.dir.path().join("ca.pem"));
        let mut reply = build_agent(&trusted)
            .unwrap()
            .get(&server.url)
            .call()
            .unwrap();
        assert_eq!(reply.status(), 200);
        // s_server -www answers with a page describing the TLS session.
        let page = reply.body_mut().read_to_string().unwrap();
        assert!(page.contains("Cipher"), "{page}");

        let untrusted = opts(&server.url, false, "");
        let err = build_agent(&untrusted)
            .unwrap()
            .get(&server.url)
            .call()
            .unwrap_err();
        assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    }
}
