//! The one place that turns a command line (flags, `-o` mount options, config files) into a
//! validated [`Config`], with s3backer's flag names, defaults and messages (spec sections 8 and 9).

mod flags;
mod prepass;

use crate::geometry::GeometryError;
use crate::layer::codec::{Cipher, Compression};
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};
use flags::Flags;
use prepass::{PrePass, ValueKind};
use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

/// A configuration problem. `Display` is the message main prints after `s3backer: ` (exit 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    pub fn new(message: impl Into<String>) -> Self {
        ConfigError(message.into())
    }
}

impl From<GeometryError> for ConfigError {
    fn from(e: GeometryError) -> Self {
        ConfigError(e.to_string())
    }
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    Run(Box<Config>),
    /// `--help`, `-h`, `-?`: the usage text to print (exit 0).
    Help(String),
    /// `--version`, `-v`: the version text to print (exit 0).
    Version(String),
}

/// What to do with the disk.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Serve the disk (FUSE).
    Mount,
    /// `--erase`: delete every block and the mounted flag, then exit.
    Erase,
    /// `--reset-mounted-flag`: delete the mounted flag, then exit.
    ResetMountedFlag,
    /// `--nbd`: serve the disk over NBD.
    Nbd,
    /// `--verify`: check every stored block, then exit.
    Verify,
}

pub use crate::backend::s3::AuthVersion;

/// A password or secret key: never shown by `Debug`, so it cannot leak into logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Everything the program needs from the command line, validated, with derived values computed.
#[derive(Clone, Debug)]
pub struct Config {
    // ---- What to do ----
    /// `--erase`, `--reset-mounted-flag`, or mount.
    pub mode: Mode,
    /// `--test`: `bucket` is a local directory.
    pub test_mode: bool,
    /// Bucket name (positional `BUCKET[/SUBDIR]`, part before the first `/`); the directory with `--test`.
    pub bucket: String,
    /// Effective key prefix: `SUBDIR/` from the bucket argument, else `--prefix` (spec 1.1).
    pub prefix: String,
    /// Positional `MOUNTPOINT`; `None` with `--erase` / `--reset-mounted-flag`.
    pub mount_point: Option<PathBuf>,
    /// `-f` (or `-d`): stay in the foreground.
    pub foreground: bool,
    /// `--debug` (or `-d`).
    pub debug: bool,
    /// `--debug-http`.
    pub debug_http: bool,
    /// `--quiet`.
    pub quiet: bool,
    /// `-s`: single-threaded FUSE loop.
    pub single_threaded: bool,
    /// `--force`.
    pub force: bool,
    /// `-o` items that are not s3backer flags, in order (`allow_other`, `uid=0`, `_netdev`, ...).
    pub fuse_options: Vec<String>,

    // ---- Credentials (resolved by the S3 backend) ----
    /// `--accessId`; `Some("")` = anonymous; `None` = first entry of the access file.
    pub access_id: Option<String>,
    /// `--accessKey`.
    pub access_key: Option<Secret>,
    /// `--accessFile`; `None` = `$HOME/.s3backer_passwd`.
    pub access_file: Option<PathBuf>,
    /// `--accessKeyEnv`: environment variable holding the secret key.
    pub access_key_env: Option<String>,
    /// `--accessEC2IAM`: IAM role whose credentials come from the instance metadata service.
    pub access_ec2_iam: Option<String>,
    /// `--accessEC2IAM-IMDSv2`.
    pub imds_v2: bool,
    /// `--accessType`: value of `x-amz-acl`.
    pub access_type: String,
    /// `--authVersion`.
    pub auth_version: AuthVersion,

    // ---- S3 connection ----
    /// Effective base URL, ending in `/` (`--baseURL`, or derived from `--ssl`/`--region`, spec 2.1).
    pub base_url: String,
    /// Virtual-hosted style URLs (`--vhost`, or `--region` without `--no-vhost`).
    pub vhost: bool,
    /// `--region`, default `us-east-1`.
    pub region: String,
    /// `--ssl`.
    pub ssl: bool,
    /// `--cacert`.
    pub cacert: Option<PathBuf>,
    /// `--insecure`.
    pub insecure: bool,
    /// `--http11`.
    pub http11: bool,
    /// `--noCurlCache`: no connection reuse.
    pub no_connection_reuse: bool,
    /// `--ipTOS` (not supported yet: always `None`).
    pub ip_tos: Option<String>,
    /// `--timeout`: per HTTP attempt.
    pub timeout: Duration,
    /// `--initialRetryPause`.
    pub initial_retry_pause: Duration,
    /// `--maxRetryPause`: total retry budget, >= `initial_retry_pause`.
    pub max_retry_pause: Duration,
    /// `--maxUploadSpeed` in bits/s (not supported yet: always `None`).
    pub max_upload_speed: Option<u64>,
    /// `--maxDownloadSpeed` in bits/s (not supported yet: always `None`).
    pub max_download_speed: Option<u64>,

    // ---- Objects ----
    /// `--blockHashPrefix`.
    pub block_hash_prefix: bool,
    /// `--storageClass` (or `--rrs`), canonical upper case.
    pub storage_class: Option<String>,
    /// `--sse`: `AES256` or `aws:kms`.
    pub sse: Option<String>,
    /// `--sse-key-id` (only with `--sse=aws:kms`, where it is required).
    pub sse_key_id: Option<String>,
    /// `--defaultContentEncoding`.
    pub default_content_encoding: Option<String>,

    // ---- Disk ----
    /// `--blockSize`, a power of two; `None` = auto-detect, else 4096.
    pub block_size: Option<u32>,
    /// `--size` in bytes; `None` = auto-detect.
    pub size: Option<u64>,
    /// `--noAutoDetect`.
    pub no_auto_detect: bool,
    /// `--readOnly`.
    pub read_only: bool,
    /// `--filename`: name of the data file.
    pub filename: String,
    /// `--statsFilename`; `None` when given empty.
    pub stats_filename: Option<String>,
    /// `--statsFileMirror`.
    pub stats_file_mirror: Option<PathBuf>,
    /// `--prometheusListen` (ours): loopback address of the metrics listener.
    pub prometheus_listen: Option<std::net::SocketAddr>,
    /// `--statsFileMirrorInterval`.
    pub stats_file_mirror_interval: Duration,
    /// `--fileMode`: permission bits of the data file (default 0600, 0400 with `--readOnly`).
    pub file_mode: u32,
    /// `--directIO` (forced on by `--sharedDiskMode`).
    pub direct_io: bool,

    // ---- Compression and encryption ----
    /// `--compress[=ALG|LEVEL]` and `--compress-level`; deflate when only `--encrypt` is given.
    pub compression: Option<Compression>,
    /// `--encrypt[=CIPHER]`.
    pub cipher: Option<Cipher>,
    /// `--password`; see [`Config::encryption_password`].
    pub password: Option<Secret>,
    /// `--passwordFile`.
    pub password_file: Option<PathBuf>,
    /// `--keyLength` in bytes; 0 = the cipher's native key length.
    pub key_length: usize,

    // ---- Block cache (parsed; the cache itself is not built yet) ----
    /// `--blockCacheSize` in blocks; 0 = no cache. Forced to 0 by `--sharedDiskMode`.
    pub block_cache_size: u32,
    /// `--blockCacheThreads`.
    pub block_cache_threads: u32,
    /// `--blockCacheWriteDelay`.
    pub block_cache_write_delay: Duration,
    /// `--blockCacheTimeout`; zero = never.
    pub block_cache_timeout: Duration,
    /// `--blockCacheMaxDirty`; 0 = the cache size.
    pub block_cache_max_dirty: u32,
    /// `--blockCacheSync`.
    pub block_cache_sync: bool,
    /// `--blockCacheFile`.
    pub block_cache_file: Option<PathBuf>,
    /// `--blockCacheNoVerify`.
    pub block_cache_no_verify: bool,
    /// `--blockCacheRecoverDirtyBlocks`.
    pub block_cache_recover_dirty_blocks: bool,
    /// `--blockCacheNumProtected`.
    pub block_cache_num_protected: u32,
    /// `--blockCacheFileAdvise`.
    pub block_cache_file_advise: bool,
    /// `--readAhead` in blocks.
    pub read_ahead: u32,
    /// `--readAheadTrigger`.
    pub read_ahead_trigger: u32,
    /// `--readAheadMax` (ours): the read-ahead window grows up to this.
    pub read_ahead_max: u32,

    // ---- Eventual consistency protection ----
    /// `--md5CacheSize`; 0 = disabled (always with `--readOnly`).
    pub md5_cache_size: u32,
    /// `--md5CacheTime`; zero = forever.
    pub md5_cache_time: Duration,
    /// `--minWriteDelay`.
    pub min_write_delay: Duration,

    // ---- Modes ----
    /// `--listBlocks`.
    pub list_blocks: bool,
    /// `--listBlocksThreads`.
    pub list_blocks_threads: u32,
    /// `--sharedDiskMode` (spec 5.3).
    pub shared_disk_mode: bool,
    /// NBD mode: `/dev/nbdX` to attach with nbd-client (positional after the bucket).
    pub nbd_device: Option<PathBuf>,
    /// `--nbd-socket`.
    pub nbd_socket: Option<PathBuf>,
    /// `--nbd-listen`, resolved.
    pub nbd_listen: Option<SocketAddr>,
    /// `--nbd-name`.
    pub nbd_name: String,
    /// `--nbd-flag` and `--nbd-param`: nbdkit arguments, which have no meaning here.
    pub nbd_ignored: Vec<String>,
    /// `--test-errors`, `--test-delays`, `--test-discard` (not supported yet: always false).
    pub test_errors: bool,
    pub test_delays: bool,
    pub test_discard: bool,
}

/// Whether a flag's value switches its feature on.
type TurnsOn = fn(&Flags) -> bool;

/// Flags that parse but whose feature is not built yet, each with the test "does this value turn
/// the feature on?". Checked only for flags actually given. Delete an entry when its feature lands.
const NOT_YET_SUPPORTED: &[(&str, TurnsOn)] = &[
    ("maxUploadSpeed", |f| f.max_upload_speed.is_some()),
    ("maxDownloadSpeed", |f| f.max_download_speed.is_some()),
    ("ipTOS", |f| f.ip_tos.is_some()),
    ("test-errors", |f| f.test_errors),
    ("test-delays", |f| f.test_delays),
    ("test-discard", |f| f.test_discard),
];

/// Flags that must not be given with `--sharedDiskMode` (spec 5.3).
const SHARED_DISK_CONFLICTS: &[&str] = &[
    "listBlocks",
    "listBlocksThreads",
    "blockCacheSize",
    "blockCacheSync",
    "blockCacheThreads",
    "blockCacheTimeout",
    "blockCacheWriteDelay",
    "blockCacheMaxDirty",
    "blockCacheRecoverDirtyBlocks",
    "readAhead",
    "readAheadTrigger",
    "readAheadMax",
    "blockCacheNumProtected",
    "blockCacheFile",
    "blockCacheNoVerify",
    "blockCacheFileAdvise",
    "minWriteDelay",
    "md5CacheSize",
    "md5CacheTime",
];

const ACCESS_TYPES: &[&str] = &[
    "private",
    "public-read",
    "public-read-write",
    "authenticated-read",
];

const STORAGE_CLASSES: &[&str] = &[
    "STANDARD",
    "STANDARD_IA",
    "ONEZONE_IA",
    "REDUCED_REDUNDANCY",
    "INTELLIGENT_TIERING",
    "GLACIER",
    "DEEP_ARCHIVE",
    "OUTPOSTS",
];

const SSE_KMS: &str = "aws:kms";
const SSE_TYPES: &[&str] = &["AES256", SSE_KMS];
const DEFAULT_REGION: &str = "us-east-1";
/// Device prefix of the legacy fstab form `s3backer#bucket` (type `fuse`).
const LEGACY_DEVICE_PREFIX: &str = "s3backer#";
/// `EVP_MAX_KEY_LENGTH` of OpenSSL, the upper bound of `--keyLength` (spec 4.3).
const MAX_KEY_LENGTH: usize = 64;
/// Block length of every supported cipher (AES); the disk block size must be a multiple of it.
const CIPHER_BLOCK_SIZE: u32 = 16;

/// Parses the command line (without argv[0]).
pub fn parse_args(args: Vec<OsString>) -> Result<Command, ConfigError> {
    let args = args
        .into_iter()
        .map(|arg| {
            arg.into_string()
                .map_err(|arg| ConfigError::new(format!("argument {arg:?} is not valid UTF-8")))
        })
        .collect::<Result<Vec<String>, _>>()?;

    let mut command = Flags::command();
    command.build();
    let value_kinds = long_flag_value_kinds(&command);
    let rewritten = PrePass::new(&value_kinds).run(args)?;

    let matches = command
        .try_get_matches_from_mut(std::iter::once("s3backer".to_string()).chain(rewritten.args))
        .map_err(clap_error)?;
    let flags = Flags::from_arg_matches(&matches).map_err(clap_error)?;
    if flags.help {
        return Ok(Command::Help(help_text()));
    }
    if flags.version {
        return Ok(Command::Version(version_text()));
    }
    let given = Given {
        matches: &matches,
        command: &command,
    };
    let config = build_config(flags, &given, rewritten.fuse_options)?;
    Ok(Command::Run(Box::new(config)))
}

/// The clap definition of every flag, for generated docs (man page, shell completions).
pub fn command() -> clap::Command {
    Flags::command().version(env!("CARGO_PKG_VERSION"))
}

/// The full usage text, every flag with its default.
pub fn help_text() -> String {
    Flags::command().render_long_help().to_string()
}

/// `s3backer version X (gitrev)` plus the copyright line.
pub fn version_text() -> String {
    let git_rev = option_env!("S3BACKER_GIT_REV").unwrap_or("unknown");
    format!(
        "s3backer version {} ({git_rev})\nCopyright the s3backer-rs authors; license {}.\n",
        env!("CARGO_PKG_VERSION"),
        env!("CARGO_PKG_LICENSE"),
    )
}

/// Which flags were given explicitly (on the command line, via `-o` or a config file).
struct Given<'a> {
    matches: &'a ArgMatches,
    command: &'a clap::Command,
}

impl Given<'_> {
    fn has(&self, long: &str) -> bool {
        let arg = self
            .command
            .get_arguments()
            .find(|arg| arg.get_long() == Some(long))
            .unwrap_or_else(|| panic!("no flag --{long} is defined"));
        self.matches.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine)
    }
}

fn long_flag_value_kinds(command: &clap::Command) -> HashMap<String, ValueKind> {
    command
        .get_arguments()
        .filter_map(|arg| {
            let long = arg.get_long()?;
            let kind = if !arg.get_action().takes_values() {
                ValueKind::None
            } else if arg.get_num_args().is_some_and(|n| n.min_values() == 0) {
                ValueKind::Optional
            } else {
                ValueKind::Required
            };
            Some((long.to_string(), kind))
        })
        .collect()
}

/// clap's rendered error (with its "did you mean" tip and the usage), minus its `error: ` lead.
fn clap_error(e: clap::Error) -> ConfigError {
    let text = e.render().to_string();
    let text = text.strip_prefix("error: ").unwrap_or(&text);
    ConfigError::new(text.trim_end())
}

fn build_config(
    flags: Flags,
    given: &Given,
    fuse_options: Vec<String>,
) -> Result<Config, ConfigError> {
    if flags.shared_disk_mode
        && let Some(flag) = SHARED_DISK_CONFLICTS.iter().find(|flag| given.has(flag))
    {
        return Err(ConfigError::new(format!(
            "in \"sharedDiskMode\" the flag \"{flag}\" must not be used"
        )));
    }
    for (flag, turns_on) in NOT_YET_SUPPORTED {
        if given.has(flag) && turns_on(&flags) {
            return Err(ConfigError::new(format!(
                "\"--{flag}\" is not supported yet"
            )));
        }
    }

    let nbd = flags.nbd || flags.nbd_socket.is_some() || flags.nbd_listen.is_some();
    let mode = if flags.erase {
        Mode::Erase
    } else if flags.reset_mounted_flag {
        Mode::ResetMountedFlag
    } else if flags.verify {
        Mode::Verify
    } else if nbd {
        Mode::Nbd
    } else {
        Mode::Mount
    };
    if nbd && mode != Mode::Nbd {
        return Err(ConfigError::new(
            r#""--nbd" cannot be combined with "--erase", "--reset-mounted-flag" or "--verify""#,
        ));
    }
    let bucket_arg = flags
        .bucket
        .as_deref()
        .map(|arg| arg.strip_prefix(LEGACY_DEVICE_PREFIX).unwrap_or(arg))
        .ok_or_else(|| ConfigError::new("no S3 bucket specified"))?;
    let (bucket, prefix) = bucket_and_prefix(bucket_arg, flags.prefix.as_deref(), flags.test)?;
    let serves_socket = flags.nbd_socket.is_some() || flags.nbd_listen.is_some();
    let nbd_listen = flags
        .nbd_listen
        .as_deref()
        .map(nbd_listen_address)
        .transpose()?;
    let mut nbd_device = None;
    let mount_point = match (mode, flags.mount_point) {
        (Mode::Mount, None) => return Err(ConfigError::new("no mount point specified")),
        (Mode::Mount, Some(mount_point)) => Some(mount_point),
        (Mode::Nbd, None) if !serves_socket => {
            return Err(ConfigError::new(
                "no NBD device specified: give /dev/nbdX, or serve without a device with \
                 \"--nbd-socket=PATH\" or \"--nbd-listen=[HOST:]PORT\"",
            ));
        }
        (Mode::Nbd, device) => {
            nbd_device = device;
            None
        }
        (_, Some(_)) => {
            return Err(ConfigError::new(
                r#"no mount point should be specified with "--erase", "--reset-mounted-flag" or "--verify""#,
            ));
        }
        (_, None) => None,
    };

    if flags.access_key.is_some() && flags.access_key_env.is_some() {
        return Err(ConfigError::new(
            r#"specify only one of "--accessKey" or "--accessKeyEnv""#,
        ));
    }
    if flags.access_ec2_iam.is_some() && flags.access_id.is_some() {
        return Err(ConfigError::new(
            r#""--accessEC2IAM" is incompatible with "--accessId""#,
        ));
    }
    if !ACCESS_TYPES.contains(&flags.access_type.as_str()) {
        return Err(ConfigError::new(format!(
            "illegal access type \"{}\"",
            flags.access_type
        )));
    }
    let auth_version = match flags.auth_version.as_str() {
        "aws2" => AuthVersion::Aws2,
        "aws4" => AuthVersion::Aws4,
        other => {
            return Err(ConfigError::new(format!(
                "illegal authentication version \"{other}\""
            )));
        }
    };
    let storage_class = storage_class(flags.storage_class.as_deref(), flags.rrs)?;
    check_sse(flags.sse.as_deref(), flags.sse_key_id.as_deref())?;

    let region = flags
        .region
        .clone()
        .unwrap_or_else(|| DEFAULT_REGION.to_string());
    let base_url = base_url(
        flags.base_url.as_deref(),
        flags.region.as_deref(),
        flags.ssl,
    )?;
    let vhost = flags.vhost || (flags.region.is_some() && !flags.no_vhost);

    let block_size = flags
        .block_size
        .as_deref()
        .map(parse_block_size)
        .transpose()?;
    let size = flags
        .size
        .as_deref()
        .map(|s| parse_size(s, "size"))
        .transpose()?;
    if let (Some(size), Some(block_size)) = (size, block_size) {
        crate::geometry::Geometry::new(size, block_size)?;
    }

    let cipher = flags.encrypt.as_deref().map(parse_cipher).transpose()?;
    let compression = compression(flags.compress.as_deref(), flags.compress_level, cipher)?;
    let key_length = flags.key_length as usize;
    if let (Some(_), Some(block_size)) = (cipher, block_size)
        && block_size % CIPHER_BLOCK_SIZE != 0
    {
        return Err(ConfigError::new(format!(
            "block size must be a multiple of {CIPHER_BLOCK_SIZE} when encrypting"
        )));
    }
    if let Some(cipher) = cipher {
        let native = native_key_length(cipher);
        if key_length != 0 && key_length < native {
            return Err(ConfigError::new(format!(
                "invalid key length {key_length} for {}: must be between {native} and {MAX_KEY_LENGTH}",
                cipher_name(cipher)
            )));
        }
    }
    if flags.password.is_some() && flags.password_file.is_some() {
        return Err(ConfigError::new(
            r#"specify only one of "--password" or "--passwordFile""#,
        ));
    }

    check_file_name("--filename", &flags.filename)?;
    let stats_filename = Some(flags.stats_filename).filter(|name| !name.is_empty());
    if let Some(name) = &stats_filename {
        check_file_name("--statsFilename", name)?;
        if *name == flags.filename {
            return Err(ConfigError::new(format!(
                r#""--filename" and "--statsFilename" are both "{name}""#
            )));
        }
    }
    let file_mode = match flags.file_mode.as_deref() {
        Some(text) => parse_file_mode(text)?,
        None if flags.read_only => 0o400,
        None => 0o600,
    };

    if flags.max_retry_pause < flags.initial_retry_pause {
        return Err(ConfigError::new(
            r#""--maxRetryPause" must not be smaller than "--initialRetryPause""#,
        ));
    }
    for (flag, value) in [
        ("md5CacheTime", flags.md5_cache_time),
        ("minWriteDelay", flags.min_write_delay),
    ] {
        if value != 0 && flags.md5_cache_size == 0 {
            return Err(ConfigError::new(format!(
                r#""--{flag}" requires "--md5CacheSize" > 0"#
            )));
        }
    }
    let prometheus_listen = flags
        .prometheus_listen
        .as_deref()
        .map(parse_prometheus_listen)
        .transpose()?;
    if flags.md5_cache_time != 0 && flags.md5_cache_time < flags.min_write_delay {
        return Err(ConfigError::new(
            r#""--md5CacheTime" must not be smaller than "--minWriteDelay""#,
        ));
    }
    if flags.block_cache_sync && flags.block_cache_write_delay != 0 {
        return Err(ConfigError::new(
            r#""--blockCacheSync" requires "--blockCacheWriteDelay=0""#,
        ));
    }

    let shared = flags.shared_disk_mode;
    let ms = |ms: u32| Duration::from_millis(u64::from(ms));
    Ok(Config {
        mode,
        test_mode: flags.test,
        bucket,
        prefix,
        mount_point,
        foreground: flags.foreground || flags.fuse_debug,
        debug: flags.debug || flags.fuse_debug,
        debug_http: flags.debug_http,
        quiet: flags.quiet,
        single_threaded: flags.single_threaded,
        force: flags.force,
        fuse_options,
        access_id: flags.access_id,
        access_key: flags.access_key.map(Secret),
        access_file: flags.access_file,
        access_key_env: flags.access_key_env,
        access_ec2_iam: flags.access_ec2_iam,
        imds_v2: flags.access_ec2_iam_imds_v2,
        access_type: flags.access_type,
        auth_version,
        base_url,
        vhost,
        region,
        ssl: flags.ssl,
        cacert: flags.cacert,
        insecure: flags.insecure,
        http11: flags.http11,
        no_connection_reuse: flags.no_curl_cache,
        ip_tos: flags.ip_tos,
        timeout: Duration::from_secs(u64::from(flags.timeout)),
        initial_retry_pause: ms(flags.initial_retry_pause),
        max_retry_pause: ms(flags.max_retry_pause),
        max_upload_speed: None,
        max_download_speed: None,
        block_hash_prefix: flags.block_hash_prefix,
        storage_class,
        sse: flags.sse,
        sse_key_id: flags.sse_key_id,
        default_content_encoding: flags.default_content_encoding,
        block_size,
        size,
        no_auto_detect: flags.no_auto_detect,
        // `--verify` must never write, whatever else is given.
        read_only: flags.read_only || mode == Mode::Verify,
        filename: flags.filename,
        stats_filename,
        stats_file_mirror: flags.stats_file_mirror,
        stats_file_mirror_interval: ms(flags.stats_file_mirror_interval),
        prometheus_listen,
        file_mode,
        direct_io: flags.direct_io || shared,
        compression,
        cipher,
        password: flags.password.map(Secret),
        password_file: flags.password_file,
        key_length,
        block_cache_size: if shared { 0 } else { flags.block_cache_size },
        block_cache_threads: flags.block_cache_threads,
        block_cache_write_delay: ms(flags.block_cache_write_delay),
        block_cache_timeout: ms(flags.block_cache_timeout),
        block_cache_max_dirty: flags.block_cache_max_dirty,
        block_cache_sync: flags.block_cache_sync,
        block_cache_file: flags.block_cache_file,
        block_cache_no_verify: flags.block_cache_no_verify,
        block_cache_recover_dirty_blocks: flags.block_cache_recover_dirty_blocks,
        block_cache_num_protected: flags.block_cache_num_protected,
        block_cache_file_advise: flags.block_cache_file_advise,
        // Spec 8.4: NBD clients do their own read-ahead.
        read_ahead: nbd_default(mode, given, "readAhead", flags.read_ahead),
        read_ahead_trigger: nbd_default(mode, given, "readAheadTrigger", flags.read_ahead_trigger),
        read_ahead_max: flags.read_ahead_max,
        // Spec 6.5: nothing is written, so there is nothing to protect.
        md5_cache_size: if flags.read_only {
            0
        } else {
            flags.md5_cache_size
        },
        md5_cache_time: ms(flags.md5_cache_time),
        min_write_delay: ms(flags.min_write_delay),
        list_blocks: flags.list_blocks,
        list_blocks_threads: flags.list_blocks_threads,
        shared_disk_mode: shared,
        nbd_device,
        nbd_socket: flags.nbd_socket,
        nbd_listen,
        nbd_name: flags.nbd_name,
        nbd_ignored: flags.nbd_flag.into_iter().chain(flags.nbd_param).collect(),
        test_errors: flags.test_errors,
        test_delays: flags.test_delays,
        test_discard: flags.test_discard,
    })
}

/// The counters carry no authentication, so they are only served on a loopback address.
fn parse_prometheus_listen(text: &str) -> Result<std::net::SocketAddr, ConfigError> {
    let addr: std::net::SocketAddr = text.parse().map_err(|_| {
        ConfigError::new(format!(
            r#"invalid "--prometheusListen" value "{text}": expected ADDR:PORT, e.g. 127.0.0.1:9464"#
        ))
    })?;
    if !addr.ip().is_loopback() {
        return Err(ConfigError::new(format!(
            r#""--prometheusListen" must be a loopback address (127.0.0.1, [::1]), not "{text}""#
        )));
    }
    Ok(addr)
}

impl Config {
    /// URL that object keys are appended to: `baseURL + BUCKET + "/"` (path style) or
    /// `baseURL` with `BUCKET.` put in front of the host (vhost style), spec 2.1.
    pub fn objects_url(&self) -> String {
        if self.vhost {
            self.vhost_url()
        } else {
            format!("{}{}/", self.base_url, self.bucket)
        }
    }

    /// `baseURL` with `BUCKET.` inserted after `scheme://` (also used for bulk delete).
    pub fn vhost_url(&self) -> String {
        match self.base_url.split_once("://") {
            Some((scheme, rest)) => format!("{scheme}://{}.{rest}", self.bucket),
            None => unreachable!("base URL was validated to contain a scheme"),
        }
    }

    /// The disk's description for logs and FUSE `fsname` (spec 5.2 `<desc>`).
    pub fn description(&self) -> String {
        if self.test_mode {
            format!("file://{}/{}", self.bucket, self.prefix)
        } else {
            format!("{}{}", self.objects_url(), self.prefix)
        }
    }

    /// The encryption password: `--password`, else the first line of `--passwordFile`, else
    /// asked on the terminal without echo.
    pub fn encryption_password(&self) -> Result<String, ConfigError> {
        if let Some(password) = &self.password {
            return Ok(password.expose().to_string());
        }
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(format!(
                    "can't read password file \"{}\": {e}",
                    path.display()
                ))
            })?;
            let first_line = text.lines().next().unwrap_or("");
            if first_line.is_empty() {
                return Err(ConfigError::new(format!(
                    "password file \"{}\" has no password on its first line",
                    path.display()
                )));
            }
            return Ok(first_line.to_string());
        }
        if !std::io::stdin().is_terminal() {
            return Err(ConfigError::new(
                r#"an encryption password is needed: give "--password" or "--passwordFile", or run on a terminal"#,
            ));
        }
        let password = rpassword::prompt_password("Password: ")
            .map_err(|e| ConfigError::new(format!("can't read password: {e}")))?;
        if password.is_empty() {
            return Err(ConfigError::new("empty password"));
        }
        Ok(password)
    }
}

/// Splits `BUCKET[/SUBDIR]` and combines it with `--prefix` (spec 1.1). In test mode the argument
/// is a directory path and is taken whole.
fn bucket_and_prefix(
    arg: &str,
    prefix_flag: Option<&str>,
    test_mode: bool,
) -> Result<(String, String), ConfigError> {
    let prefix_flag = prefix_flag.unwrap_or("");
    if test_mode {
        if arg.is_empty() {
            return Err(ConfigError::new("no test directory specified"));
        }
        return Ok((arg.to_string(), prefix_flag.to_string()));
    }
    if arg.is_empty() || arg.starts_with('/') {
        return Err(ConfigError::new(format!("invalid S3 bucket \"{arg}\"")));
    }
    let Some((bucket, subdir)) = arg.split_once('/') else {
        return Ok((arg.to_string(), prefix_flag.to_string()));
    };
    if subdir.is_empty()
        || subdir.starts_with('/')
        || subdir.ends_with('/')
        || subdir.contains("//")
    {
        return Err(ConfigError::new(format!(
            "invalid S3 bucket subdirectory \"{subdir}\" in \"{arg}\""
        )));
    }
    if !prefix_flag.is_empty() {
        return Err(ConfigError::new(format!(
            "bucket subdirectory \"{subdir}\" conflicts with --prefix"
        )));
    }
    Ok((bucket.to_string(), format!("{subdir}/")))
}

/// Effective base URL (spec 2.1).
/// NBD mode turns some features off unless the flag is given.
fn nbd_default(mode: Mode, given: &Given, flag: &str, value: u32) -> u32 {
    if mode == Mode::Nbd && !given.has(flag) {
        0
    } else {
        value
    }
}

/// `--nbd-listen`: `PORT` (on 127.0.0.1), `HOST:PORT` or `[IPV6]:PORT`.
fn nbd_listen_address(arg: &str) -> Result<SocketAddr, ConfigError> {
    let invalid = || ConfigError::new(format!("invalid \"--nbd-listen\" address \"{arg}\""));
    if let Ok(port) = arg.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    arg.to_socket_addrs()
        .map_err(|_| invalid())?
        .next()
        .ok_or_else(invalid)
}

fn base_url(given: Option<&str>, region: Option<&str>, ssl: bool) -> Result<String, ConfigError> {
    let Some(url) = given else {
        let scheme = if ssl { "https" } else { "http" };
        return Ok(match region {
            Some(region) if region != DEFAULT_REGION => {
                format!("{scheme}://s3.{region}.amazonaws.com/")
            }
            _ => format!("{scheme}://s3.amazonaws.com/"),
        });
    };
    let invalid = |why: &str| ConfigError::new(format!("invalid base URL \"{url}\": {why}"));
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| invalid("must start with \"http://\" or \"https://\""))?;
    if !url.ends_with('/') {
        return Err(invalid("must end with \"/\""));
    }
    let has_host = url::Url::parse(url)
        .ok()
        .and_then(|parsed| parsed.host_str().map(|host| !host.is_empty()))
        .unwrap_or(false);
    if rest.starts_with('/') || !has_host {
        return Err(invalid("no host name"));
    }
    if ssl && !url.starts_with("https://") {
        return Err(ConfigError::new(format!(
            "\"--ssl\" conflicts with the non-https base URL \"{url}\""
        )));
    }
    Ok(url.to_string())
}

fn storage_class(flag: Option<&str>, rrs: bool) -> Result<Option<String>, ConfigError> {
    let class = match flag {
        None => None,
        Some(name) => Some(
            STORAGE_CLASSES
                .iter()
                .find(|class| class.eq_ignore_ascii_case(name))
                .ok_or_else(|| ConfigError::new(format!("invalid storage class \"{name}\"")))?
                .to_string(),
        ),
    };
    if !rrs {
        return Ok(class);
    }
    match class.as_deref() {
        None | Some("REDUCED_REDUNDANCY") => Ok(Some("REDUCED_REDUNDANCY".to_string())),
        Some(other) => Err(ConfigError::new(format!(
            "\"--rrs\" conflicts with \"--storageClass={other}\""
        ))),
    }
}

fn check_sse(sse: Option<&str>, key_id: Option<&str>) -> Result<(), ConfigError> {
    match (sse, key_id) {
        (Some(sse), _) if !SSE_TYPES.contains(&sse) => {
            Err(ConfigError::new(format!("unknown sse type \"{sse}\"")))
        }
        (Some(SSE_KMS), None) => Err(ConfigError::new(
            r#""--sse-key-id" flag is required when "--sse" flag is used"#,
        )),
        (Some(SSE_KMS), Some(_)) | (_, None) => Ok(()),
        (_, Some(_)) => Err(ConfigError::new(
            r#""--sse-key-id" is only used with "--sse=aws:kms""#,
        )),
    }
}

/// Size syntax of spec 1.6: a decimal number with an optional binary suffix (`k`, `m`, `g`, `t`,
/// `p`, `e`, case-insensitive, optionally followed by `b`); plain numbers accepted; zero rejected.
pub fn parse_size(text: &str, what: &str) -> Result<u64, ConfigError> {
    let invalid = |why: &str| ConfigError::new(format!("invalid {what} \"{text}\": {why}"));
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(digits_end);
    if digits.is_empty() {
        return Err(invalid(
            "expected a number with an optional suffix k, m, g, t, p, e",
        ));
    }
    let lower = suffix.to_ascii_lowercase();
    let unit = lower
        .strip_suffix('b')
        .filter(|u| !u.is_empty())
        .unwrap_or(&lower);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        "e" => 60,
        "z" | "y" => return Err(invalid("too big for this build")),
        _ => return Err(invalid("unknown suffix")),
    };
    let number: u64 = digits.parse().map_err(|_| invalid("too big"))?;
    if number == 0 {
        return Err(invalid("must be greater than zero"));
    }
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| invalid("too big"))
}

fn parse_block_size(text: &str) -> Result<u32, ConfigError> {
    let bytes = parse_size(text, "block size")?;
    let bytes = u32::try_from(bytes)
        .map_err(|_| ConfigError::new(format!("invalid block size \"{text}\": too big")))?;
    if !bytes.is_power_of_two() {
        return Err(GeometryError::BlockSizeNotPowerOfTwo.into());
    }
    Ok(bytes)
}

/// `--compress[=ALG|LEVEL]`, `--compress-level`, and `--encrypt` implying deflate (spec 3).
fn compression(
    flag: Option<&str>,
    level_flag: Option<i32>,
    cipher: Option<Cipher>,
) -> Result<Option<Compression>, ConfigError> {
    let Some(value) = flag else {
        if level_flag.is_some() {
            return Err(ConfigError::new(
                r#"the "--compress-level" flag requires the "--compress" flag"#,
            ));
        }
        return Ok(cipher.map(|_| Compression::Deflate { level: None }));
    };
    // `--compress=N` is the 1.x form: deflate at level N.
    let (deflate, legacy_level) = match value.parse::<i32>() {
        Ok(level) => (true, Some(level)),
        Err(_) if value.eq_ignore_ascii_case("deflate") => (true, None),
        Err(_) if value.eq_ignore_ascii_case("zstd") => (false, None),
        Err(_) => {
            return Err(ConfigError::new(format!(
                "unknown compression algorithm \"{value}\""
            )));
        }
    };
    let level = level_flag.or(legacy_level);
    let (name, range) = if deflate {
        ("deflate", -1..=9)
    } else {
        ("zstd", zstd::compression_level_range())
    };
    if let Some(level) = level.filter(|level| !range.contains(level)) {
        return Err(ConfigError::new(format!(
            "invalid {name} compression level {level}: must be between {} and {}",
            range.start(),
            range.end()
        )));
    }
    Ok(Some(if deflate {
        Compression::Deflate { level }
    } else {
        Compression::Zstd { level }
    }))
}

// The cipher names and key lengths below belong with `Cipher` in layer/codec.rs; they live here
// only until that module offers them.
const CIPHERS: [Cipher; 3] = [Cipher::Aes128Cbc, Cipher::Aes192Cbc, Cipher::Aes256Cbc];

fn cipher_name(cipher: Cipher) -> &'static str {
    match cipher {
        Cipher::Aes128Cbc => "AES-128-CBC",
        Cipher::Aes192Cbc => "AES-192-CBC",
        Cipher::Aes256Cbc => "AES-256-CBC",
    }
}

fn native_key_length(cipher: Cipher) -> usize {
    match cipher {
        Cipher::Aes128Cbc => 16,
        Cipher::Aes192Cbc => 24,
        Cipher::Aes256Cbc => 32,
    }
}

fn parse_cipher(name: &str) -> Result<Cipher, ConfigError> {
    CIPHERS
        .into_iter()
        .find(|cipher| cipher_name(*cipher).eq_ignore_ascii_case(name))
        .ok_or_else(|| {
            ConfigError::new(format!(
                "unsupported cipher \"{name}\" (supported: AES-128-CBC, AES-192-CBC, AES-256-CBC)"
            ))
        })
}

fn check_file_name(flag: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(ConfigError::new(format!(
            "invalid \"{flag}\" value \"{name}\": must be a file name without '/'"
        )));
    }
    Ok(())
}

fn parse_file_mode(text: &str) -> Result<u32, ConfigError> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|mode| *mode <= 0o7777)
        .ok_or_else(|| {
            ConfigError::new(format!(
                "invalid \"--fileMode\" value \"{text}\": expected octal permissions like 0644"
            ))
        })
}

#[cfg(test)]
mod tests;
