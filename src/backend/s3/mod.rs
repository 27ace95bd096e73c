//! The S3 backend: one object per non-zero block (spec sections 1, 2 and 5).
//!
//! [`S3Client`] speaks HTTP (signing, retries, listing) and owns the per-bucket metadata
//! ([`Volume`]); [`S3Backend`] is the [`BlockStore`] on top of it, with the codec applied.

mod client;
mod credentials;
mod list;
mod retry;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use md5::{Digest as _, Md5};
use ureq::http::Method;

pub use client::{S3Client, is_plain_md5_etag, parse_quoted_hex};
pub use credentials::{CredentialFlags, DEFAULT_IMDS_BASE_URL, Keys, parse_access_file};
pub use retry::Backoff;

use crate::error::{Error, Result};
use crate::geometry::{BlockId, Geometry};
use crate::layer::codec::Codec;
use crate::naming::Naming;
use crate::stats::{Counter, StatsReport};
use crate::store::{Block, BlockStore, Etag, ReadInfo, Revalidated, SizeMeta, Volume, WriteInfo};
use client::{Reply, Request};

pub const BLOCK_CONTENT_TYPE: &str = "application/x-s3backer-block";
pub const BLOCK_SIZE_HEADER: &str = "x-amz-meta-s3backer-blocksize";
pub const FILE_SIZE_HEADER: &str = "x-amz-meta-s3backer-filesize";
pub const HMAC_HEADER: &str = "x-amz-meta-s3backer-hmac";
pub const MOUNT_TOKEN_HEADER: &str = "x-amz-meta-s3backer-mount-token";

/// Request signing (`--authVersion`).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum AuthVersion {
    Aws2,
    #[default]
    Aws4,
}

/// Everything the S3 backend needs from the command line.
#[derive(Clone)]
pub struct S3Options {
    /// Ends in `/`.
    pub base_url: String,
    pub bucket: String,
    pub naming: Naming,
    pub vhost: bool,
    pub region: String,
    pub auth_version: AuthVersion,
    /// Where the keys come from, as the user gave it.
    pub credentials: CredentialFlags,
    /// Per-attempt timeout (`--timeout`).
    pub timeout: Duration,
    pub initial_retry_pause: Duration,
    /// Total backoff budget (`--maxRetryPause`).
    pub max_retry_pause: Duration,
    /// `x-amz-acl` of PUTs (`--accessType`).
    pub access_type: String,
    pub storage_class: Option<String>,
    pub sse: Option<String>,
    pub sse_key_id: Option<String>,
    pub cacert: Option<PathBuf>,
    pub insecure: bool,
    pub no_connection_reuse: bool,
    /// Idle keep-alive connections kept in the pool.
    pub max_connections: usize,
    pub debug_http: bool,
    pub read_only: bool,
    pub user_agent: String,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            base_url: "http://s3.amazonaws.com/".into(),
            bucket: String::new(),
            naming: Naming::new("", false),
            vhost: false,
            region: "us-east-1".into(),
            auth_version: AuthVersion::Aws4,
            credentials: CredentialFlags::default(),
            timeout: Duration::from_secs(30),
            initial_retry_pause: Duration::from_millis(200),
            max_retry_pause: Duration::from_millis(30_000),
            access_type: "private".into(),
            storage_class: None,
            sse: None,
            sse_key_id: None,
            cacert: None,
            insecure: false,
            no_connection_reuse: false,
            max_connections: 64,
            debug_http: false,
            read_only: false,
            user_agent: format!("s3backer/{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("base_url", &self.base_url)
            .field("bucket", &self.bucket)
            .field("naming", &self.naming)
            .field("vhost", &self.vhost)
            .field("region", &self.region)
            .field("credentials", &self.credentials)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// A GET that found an object.
pub struct Fetched {
    pub body: Vec<u8>,
    pub etag: Option<Etag>,
    pub content_encoding: Option<String>,
    pub hmac_header: Option<String>,
}

/// Headers a HEAD found.
pub struct Head {
    reply_headers: ureq::http::HeaderMap,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.reply_headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Upper bound of a stored block body: zlib's compressBound plus cipher padding (spec 2.5).
fn max_body(block_size: usize) -> u64 {
    let b = block_size as u64;
    b + b / 4096 + b / 16384 + b / 33_554_432 + 13 + 16
}

/// A block GET's outcome, decoded.
enum Fetch {
    Unchanged,
    /// The block's bytes; `None` when it is absent (zeros).
    Read(ReadInfo, Option<Vec<u8>>),
}

fn copy_or_zero(buf: &mut [u8], data: Option<Vec<u8>>) {
    match data {
        Some(data) => buf.copy_from_slice(&data),
        None => buf.fill(0),
    }
}

/// What a GET asks of the stored version.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Condition {
    None,
    /// Only this version (ec_protect): any other is `Error::Stale`.
    IfMatch(Etag),
    /// Not this version (a cached copy's): finding it is `Got::Unchanged`.
    IfNoneMatch(Etag),
}

/// What a GET found.
pub enum Got {
    Absent,
    /// Only for `Condition::IfNoneMatch`: the object still has the caller's ETag.
    Unchanged,
    Object(Fetched),
}

impl S3Client {
    /// GET of an object. With `check_md5`, a plain-MD5 ETag that does not match the body is
    /// retried, then reported as `Corrupt`. With `IfMatch`, any other version (412, a server
    /// that ignores `If-Match` and answers another ETag, or no object) is `Stale`. With
    /// `IfNoneMatch`, a 304, or a server that ignores the header and answers the same ETag, is
    /// `Unchanged`.
    pub fn get_object(
        &self,
        key: &str,
        block: BlockId,
        accept_encoding: &str,
        max_body: u64,
        condition: Condition,
        check_md5: bool,
    ) -> Result<Got> {
        let mut request = Request::new(Method::GET, Some(key));
        request.headers = vec![("accept-encoding", accept_encoding.to_string())];
        match condition {
            Condition::None => {}
            Condition::IfMatch(etag) => {
                request
                    .headers
                    .push(("if-match", format!("\"{}\"", hex::encode(etag))));
                // The caller (ec_protect) decides how long to wait for the new version.
                request.final_statuses = &[412];
            }
            Condition::IfNoneMatch(etag) => request
                .headers
                .push(("if-none-match", format!("\"{}\"", hex::encode(etag)))),
        }
        request.max_body = max_body;
        let check_md5 = |reply: &Reply| match reply.header("etag") {
            Some(etag) if check_md5 && reply.status != 304 && is_plain_md5_etag(etag) => {
                let actual = hex::encode(Md5::digest(&reply.body));
                if etag.trim().trim_matches('"').eq_ignore_ascii_case(&actual) {
                    Ok(())
                } else {
                    self.stats.mismatch.inc();
                    Err(Error::corrupt(
                        block,
                        format!("body MD5 {actual} does not match ETag {etag} of {key}"),
                    ))
                }
            }
            _ => Ok(()),
        };
        let reply = self.execute(&request, &check_md5)?;
        let etag = reply.header("etag").and_then(parse_quoted_hex::<16>);
        if let Condition::IfMatch(expected) = condition {
            let found = match (reply.status, etag) {
                (412, _) => Some("another version".to_string()),
                (404, _) => Some("no object".to_string()),
                (_, Some(etag)) if etag != expected => Some(format!("ETag {}", hex::encode(etag))),
                _ => None,
            };
            if let Some(found) = found {
                self.stats.stale.inc();
                return Err(Error::Stale(format!(
                    "GET {key}: found {found} instead of ETag {}",
                    hex::encode(expected)
                )));
            }
        }
        if let Condition::IfNoneMatch(cached) = condition
            && (reply.status == 304 || (reply.status == 200 && etag == Some(cached)))
        {
            self.stats.verified.inc();
            return Ok(Got::Unchanged);
        }
        match reply.status {
            404 => return Ok(Got::Absent),
            304 => {
                return Err(Error::Other(format!(
                    "GET {key}: HTTP 304 (not modified) to a request that was not conditional"
                )));
            }
            _ => {}
        }
        let content_encoding = reply.header("content-encoding").map(|v| {
            v.split(|c: char| c == ',' || c.is_whitespace())
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(",")
        });
        Ok(Got::Object(Fetched {
            etag,
            hmac_header: reply.header(HMAC_HEADER).map(str::to_string),
            content_encoding: content_encoding.filter(|s| !s.is_empty()),
            body: reply.body,
        }))
    }

    /// PUT of an object with the headers of spec 2.3; returns its ETag.
    pub fn put_object(
        &self,
        key: &str,
        body: &[u8],
        content_type: &str,
        extra_headers: Vec<(&'static str, String)>,
    ) -> Result<Etag> {
        let mut request = Request::new(Method::PUT, Some(key));
        request.headers = self.put_headers(body, content_type);
        request.headers.extend(extra_headers);
        request.body = body;
        let reply = self.execute(&request, &|_| Ok(()))?;
        self.expect_success(&request, &reply)?;
        // The server's ETag is what later GETs (and `If-Match`) see; it is not the body's MD5
        // on every store (e.g. SSE-KMS), so our own MD5 is only the fallback.
        Ok(reply
            .header("etag")
            .and_then(parse_quoted_hex::<16>)
            .unwrap_or_else(|| Md5::digest(body).into()))
    }

    /// DELETE of an object; absent objects count as deleted.
    pub fn delete_object(&self, key: &str) -> Result<()> {
        let mut request = Request::new(Method::DELETE, Some(key));
        if let Some(class) = &self.opts.storage_class {
            request.headers.push(("x-amz-storage-class", class.clone()));
        }
        self.execute(&request, &|_| Ok(()))?;
        Ok(())
    }

    /// HEAD of an object; `None` when absent.
    pub fn head_object(&self, key: &str) -> Result<Option<Head>> {
        let request = Request::new(Method::HEAD, Some(key));
        let reply = self.execute(&request, &|_| Ok(()))?;
        self.expect_success_or_absent(&request, reply).map(|r| {
            r.map(|reply| Head {
                reply_headers: reply.headers,
            })
        })
    }

    /// Creates the mount token only if no token object exists (`If-None-Match: *`): `false`
    /// when someone else holds it. Atomic only on servers with atomic conditional PUTs.
    pub fn put_mount_token_if_absent(&self, token: u32) -> Result<bool> {
        let body = mount_token_body();
        let key = self.mount_token_key();
        let mut request = Request::new(Method::PUT, Some(&key));
        request.headers = self.put_headers(body.as_bytes(), "text/plain");
        request
            .headers
            .push((MOUNT_TOKEN_HEADER, format!("{token:08x}")));
        request.headers.push(("if-none-match", "*".into()));
        request.body = body.as_bytes();
        request.final_statuses = &[412];
        let reply = self.execute(&request, &|_| Ok(()))?;
        if reply.status == 412 {
            return Ok(false);
        }
        self.expect_success(&request, &reply)?;
        Ok(true)
    }

    fn mount_token_key(&self) -> String {
        self.opts.naming.mount_token_key()
    }

    fn expect_success(&self, request: &Request<'_>, reply: &Reply) -> Result<()> {
        if (200..300).contains(&reply.status) {
            Ok(())
        } else {
            Err(Error::Other(format!(
                "{} {}: unexpected HTTP {}",
                request.method,
                request.key.unwrap_or_default(),
                reply.status
            )))
        }
    }

    fn expect_success_or_absent(
        &self,
        request: &Request<'_>,
        reply: Reply,
    ) -> Result<Option<Reply>> {
        if reply.status == 404 {
            return Ok(None);
        }
        self.expect_success(request, &reply)?;
        Ok(Some(reply))
    }
}

/// `<hostname>\n<YYYYMMDDTHHMMSSZ>\n` (spec 5.1; informational only).
fn mount_token_body() -> String {
    let mut name = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or truncates.
    let rc = unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len() - 1) };
    let host = if rc == 0 {
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        String::from_utf8_lossy(&name[..end]).into_owned()
    } else {
        "localhost".into()
    };
    let now = jiff::Timestamp::now().strftime("%Y%m%dT%H%M%SZ");
    format!("{host}\n{now}\n")
}

impl Volume for S3Client {
    fn description(&self) -> String {
        self.describe()
    }

    fn detect_size(&self) -> Result<Option<SizeMeta>> {
        let key = self.opts.naming.block_key(BlockId(0));
        let Some(head) = self.head_object(&key)? else {
            return Ok(None);
        };
        let block_size = head
            .header(BLOCK_SIZE_HEADER)
            .and_then(|v| v.trim().parse::<u32>().ok());
        let file_size = head
            .header(FILE_SIZE_HEADER)
            .and_then(|v| v.trim().parse::<u64>().ok());
        Ok(match (block_size, file_size) {
            (Some(block_size), Some(file_size)) if block_size > 0 && file_size > 0 => {
                Some(SizeMeta {
                    block_size,
                    file_size,
                })
            }
            _ => None,
        })
    }

    fn read_mount_token(&self) -> Result<Option<u32>> {
        let Some(head) = self.head_object(&self.mount_token_key())? else {
            return Ok(None);
        };
        let value = head
            .header(MOUNT_TOKEN_HEADER)
            .and_then(|v| u32::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0);
        // Present without a value: a pre-1.5.0 "mounted" flag.
        Ok(Some(if value == 0 { 1 } else { value }))
    }

    fn write_mount_token(&self, token: Option<u32>) -> Result<()> {
        let key = self.mount_token_key();
        match token {
            None => self.delete_object(&key),
            Some(token) => {
                let body = mount_token_body();
                let header = vec![(MOUNT_TOKEN_HEADER, format!("{token:08x}"))];
                self.put_object(&key, body.as_bytes(), "text/plain", header)
                    .map(|_| ())
            }
        }
    }

    fn create_mount_token(&self, token: u32) -> Result<bool> {
        self.put_mount_token_if_absent(token)
    }
}

/// Counters of the block-level stats lines.
#[derive(Debug, Default)]
struct BlockStats {
    normal_read: Counter,
    normal_written: Counter,
    zero_read: Counter,
    zero_written: Counter,
}

/// The S3 bucket as a [`BlockStore`]. Every write is synchronous, so `flush` has nothing to do.
pub struct S3Backend {
    client: Arc<S3Client>,
    geometry: Geometry,
    codec: Arc<Codec>,
    stats: BlockStats,
}

impl S3Backend {
    pub fn new(client: Arc<S3Client>, geometry: Geometry, codec: Arc<Codec>) -> Self {
        S3Backend {
            client,
            geometry,
            codec,
            stats: BlockStats::default(),
        }
    }

    pub fn client(&self) -> &Arc<S3Client> {
        &self.client
    }

    fn check_block(&self, block: BlockId) -> Result<()> {
        if self.geometry.contains(block) {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "block {block} is beyond the end of the disk"
            )))
        }
    }

    /// GETs and decodes a block: its bytes (`None` when it is absent: zeros), or `Unchanged`
    /// (only for `Condition::IfNoneMatch`).
    fn fetch(&self, block: BlockId, condition: Condition) -> Result<Fetch> {
        self.check_block(block)?;
        let block_size = self.geometry.block_size_usize();
        let key = self.client.opts.naming.block_key(block);
        let accept = self.codec.accept_encoding();
        // An encrypted block's HMAC covers the whole body, so its MD5 would add nothing but
        // about 1.7 CPU seconds per GiB.
        let check_md5 = !self.codec.authenticates();
        let got = self.client.get_object(
            &key,
            block,
            &accept,
            max_body(block_size),
            condition,
            check_md5,
        )?;
        let fetched = match got {
            Got::Unchanged => return Ok(Fetch::Unchanged),
            Got::Absent => {
                self.stats.zero_read.inc();
                let info = ReadInfo {
                    zero: true,
                    etag: None,
                };
                return Ok(Fetch::Read(info, None));
            }
            Got::Object(fetched) => fetched,
        };
        let data = self.codec.decode(
            block,
            fetched.body,
            fetched.content_encoding.as_deref(),
            fetched.hmac_header.as_deref(),
            block_size,
        )?;
        if data.len() != block_size {
            return Err(Error::corrupt(
                block,
                format!(
                    "read of block {block} returned {} != {block_size} bytes",
                    data.len()
                ),
            ));
        }
        self.stats.normal_read.inc();
        let info = ReadInfo {
            zero: false,
            etag: fetched.etag,
        };
        Ok(Fetch::Read(info, Some(data)))
    }

    /// `fetch` for a condition that cannot answer `Unchanged`.
    fn fetch_current(
        &self,
        block: BlockId,
        condition: Condition,
    ) -> Result<(ReadInfo, Option<Vec<u8>>)> {
        match self.fetch(block, condition)? {
            Fetch::Read(info, data) => Ok((info, data)),
            Fetch::Unchanged => Err(Error::Other(format!(
                "block {block}: GET answered \"unchanged\" to a request that was not conditional"
            ))),
        }
    }

    fn read(&self, block: BlockId, buf: &mut [u8], condition: Condition) -> Result<ReadInfo> {
        let (info, data) = self.fetch_current(block, condition)?;
        copy_or_zero(buf, data);
        Ok(info)
    }

    fn check_writable(&self) -> Result<()> {
        if self.client.opts.read_only {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }
}

impl BlockStore for S3Backend {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn read_block(&self, block: BlockId, buf: &mut [u8]) -> Result<ReadInfo> {
        self.read(block, buf, Condition::None)
    }

    fn read_block_owned(&self, block: BlockId) -> Result<(ReadInfo, Vec<u8>)> {
        let (info, data) = self.fetch_current(block, Condition::None)?;
        let data = data.unwrap_or_else(|| vec![0u8; self.geometry.block_size_usize()]);
        Ok((info, data))
    }

    fn read_block_expect(&self, block: BlockId, buf: &mut [u8], expect: Etag) -> Result<ReadInfo> {
        self.read(block, buf, Condition::IfMatch(expect))
    }

    fn read_block_if_changed(
        &self,
        block: BlockId,
        buf: &mut [u8],
        cached: Etag,
    ) -> Result<Revalidated> {
        Ok(match self.fetch(block, Condition::IfNoneMatch(cached))? {
            Fetch::Unchanged => Revalidated::Unchanged,
            Fetch::Read(info, data) => {
                copy_or_zero(buf, data);
                Revalidated::Changed(info)
            }
        })
    }

    fn write_block(&self, block: BlockId, data: Block<'_>) -> Result<WriteInfo> {
        self.check_block(block)?;
        self.check_writable()?;
        let key = self.client.opts.naming.block_key(block);
        let data = match data {
            Block::Zero => {
                self.client.delete_object(&key)?;
                self.stats.zero_written.inc();
                return Ok(WriteInfo { etag: None });
            }
            Block::Data(data) => data,
        };
        let encoded = self.codec.encode(block, data)?;
        let (body, content_encoding, hmac) = (
            &*encoded.body,
            encoded.content_encoding,
            encoded.hmac_header,
        );
        let mut headers = Vec::new();
        if let Some(encoding) = content_encoding {
            headers.push(("content-encoding", encoding));
        }
        if block.0 == 0 {
            headers.push((BLOCK_SIZE_HEADER, self.geometry.block_size().to_string()));
            headers.push((FILE_SIZE_HEADER, self.geometry.file_size().to_string()));
        }
        if let Some(hmac) = hmac {
            headers.push((HMAC_HEADER, hmac));
        }
        let etag = self
            .client
            .put_object(&key, body, BLOCK_CONTENT_TYPE, headers)?;
        self.stats.normal_written.inc();
        Ok(WriteInfo { etag: Some(etag) })
    }

    fn bulk_zero(&self, blocks: &[BlockId]) -> Result<()> {
        // Individual DELETEs in parallel (spec 2.8 allows this; the bucket format is the same).
        crate::store::zero_in_parallel(self, blocks, 16)
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn survey_non_zero(&self, threads: usize, found: &(dyn Fn(BlockId) + Sync)) -> Result<()> {
        self.client
            .survey(self.geometry.num_blocks(), threads, found)
    }

    fn stats(&self, report: &mut StatsReport) {
        report.add("http_normal_blocks_read", self.stats.normal_read.get());
        report.add(
            "http_normal_blocks_written",
            self.stats.normal_written.get(),
        );
        report.add("http_zero_blocks_read", self.stats.zero_read.get());
        report.add("http_zero_blocks_written", self.stats.zero_written.get());
        self.client.stats.report(report);
    }

    fn reset_stats(&self) {
        for c in [
            &self.stats.normal_read,
            &self.stats.normal_written,
            &self.stats.zero_read,
            &self.stats.zero_written,
        ] {
            c.reset();
        }
        self.client.stats.reset();
    }
}
