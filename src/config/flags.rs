//! Every s3backer flag, defined once (spec 8.2). The help text, the `-o` pre-pass and (later) the man
//! page and shell completions are all generated from this struct.

use clap::{ArgAction, Parser};
use std::path::PathBuf;

const USAGE: &str = "\
s3backer [options] BUCKET[/SUBDIR] MOUNTPOINT
       s3backer --test [options] DIR MOUNTPOINT
       s3backer --erase [options] BUCKET[/SUBDIR]
       s3backer --reset-mounted-flag [options] BUCKET[/SUBDIR]
       s3backer --nbd [options] BUCKET[/SUBDIR] /dev/nbdX
       s3backer --nbd --nbd-socket=PATH|--nbd-listen=[HOST:]PORT [options] BUCKET[/SUBDIR]";

const ABOUT: &str = "\
s3backer exposes an S3 bucket as one fixed-size file through FUSE. Each block of the file is one \
object in the bucket; blocks that are all zeros are not stored. Put a filesystem on the file \
(for example through a loop device) to get a disk backed by S3.";

const AFTER_HELP: &str = "\
Every flag \"--name[=value]\" can also be given as a mount option \"-o name[=value]\" (comma \
lists allowed), which is how fstab passes them, e.g.:
  mybucket/vm1  /mnt/s3b  fuse.s3backer  noauto,ssl,size=100g,blockSize=1m  0 0
Other \"-o\" options (allow_other, uid=N, ...) are handed to FUSE.
SIZE values take an optional suffix k, m, g, t, p, e (powers of 1024).";

const CREDENTIALS: &str = "Credentials";
const CONNECTION: &str = "S3 connection";
const OBJECTS: &str = "Objects in the bucket";
const DISK: &str = "Disk";
const CODEC: &str = "Compression and encryption";
const CACHE: &str = "Block cache";
const CONSISTENCY: &str = "Eventual consistency protection (MD5 cache)";
const MODES: &str = "Modes";
const LOGGING: &str = "Logging and testing";
const FUSE: &str = "FUSE and config files";

/// Raw command-line values; `super::build_config` validates them into a `Config`.
#[derive(Parser, Debug)]
#[command(
    name = "s3backer",
    about = ABOUT,
    override_usage = USAGE,
    after_help = AFTER_HELP,
    rename_all = "camelCase",
    args_override_self = true,
    disable_help_flag = true,
    disable_version_flag = true,
    max_term_width = 100
)]
pub(crate) struct Flags {
    /// S3 bucket, optionally with a subdirectory used as key prefix (a directory with --test)
    #[arg(value_name = "BUCKET[/SUBDIR]")]
    pub bucket: Option<String>,
    /// Where to mount the file system (not with --erase or --reset-mounted-flag)
    #[arg(value_name = "MOUNTPOINT")]
    pub mount_point: Option<PathBuf>,

    // ---- Credentials ----
    /// Credentials file with lines ACCESSID:SECRETKEY [default: $HOME/.s3backer_passwd]
    #[arg(long = "accessFile", value_name = "FILE", help_heading = CREDENTIALS)]
    pub access_file: Option<PathBuf>,
    /// S3 access key ID; empty means anonymous access [default: first entry of accessFile]
    #[arg(long = "accessId", value_name = "ID", help_heading = CREDENTIALS)]
    pub access_id: Option<String>,
    /// S3 secret access key [default: from accessFile]
    #[arg(long = "accessKey", value_name = "KEY", help_heading = CREDENTIALS)]
    pub access_key: Option<String>,
    /// Read the secret access key from this environment variable
    #[arg(long = "accessKeyEnv", value_name = "VAR", help_heading = CREDENTIALS)]
    pub access_key_env: Option<String>,
    /// Fetch credentials for this IAM role from the EC2 instance metadata service
    #[arg(long = "accessEC2IAM", value_name = "ROLE", help_heading = CREDENTIALS)]
    pub access_ec2_iam: Option<String>,
    /// Use IMDSv2 (session token) when fetching EC2 IAM credentials
    #[arg(long = "accessEC2IAM-IMDSv2", help_heading = CREDENTIALS)]
    pub access_ec2_iam_imds_v2: bool,
    /// Canned ACL for written objects: private, public-read, public-read-write, authenticated-read
    #[arg(long = "accessType", value_name = "ACL", default_value = "private", help_heading = CREDENTIALS)]
    pub access_type: String,
    /// Request signing: aws2 or aws4
    #[arg(long = "authVersion", value_name = "VERSION", default_value = "aws4", help_heading = CREDENTIALS)]
    pub auth_version: String,

    // ---- S3 connection ----
    /// Base URL of the S3 service, ending in '/' [default: http[s]://s3.amazonaws.com/, with --region
    /// http[s]://s3.REGION.amazonaws.com/]
    #[arg(long = "baseURL", value_name = "URL", help_heading = CONNECTION)]
    pub base_url: Option<String>,
    /// S3 region; also selects the regional endpoint and virtual-hosted style [default: us-east-1]
    #[arg(long = "region", value_name = "REGION", help_heading = CONNECTION)]
    pub region: Option<String>,
    /// Use virtual-hosted style URLs (https://BUCKET.host/) [default: path style unless --region]
    #[arg(long = "vhost", overrides_with = "no_vhost", help_heading = CONNECTION)]
    pub vhost: bool,
    /// Use path style URLs even when --region is given
    #[arg(long = "no-vhost", overrides_with = "vhost", help_heading = CONNECTION)]
    pub no_vhost: bool,
    /// Use https for the default base URL
    #[arg(long = "ssl", help_heading = CONNECTION)]
    pub ssl: bool,
    /// CA certificate bundle used to verify the server
    #[arg(long = "cacert", value_name = "FILE", help_heading = CONNECTION)]
    pub cacert: Option<PathBuf>,
    /// Do not verify the server's TLS certificate
    #[arg(long = "insecure", help_heading = CONNECTION)]
    pub insecure: bool,
    /// Force HTTP/1.1
    #[arg(long = "http11", help_heading = CONNECTION)]
    pub http11: bool,
    /// Do not reuse HTTP connections
    #[arg(long = "noCurlCache", help_heading = CONNECTION)]
    pub no_curl_cache: bool,
    /// IP type-of-service: a number or lowdelay, throughput, reliability, lowcost, mincost [default: none]
    #[arg(long = "ipTOS", value_name = "TOS", help_heading = CONNECTION)]
    pub ip_tos: Option<String>,
    /// Timeout of one HTTP attempt, in seconds
    #[arg(long = "timeout", value_name = "SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(1..=86_400), help_heading = CONNECTION)]
    pub timeout: u32,
    /// First pause before retrying a failed request, in milliseconds (doubles each retry)
    #[arg(long = "initialRetryPause", value_name = "MS", default_value_t = 200, help_heading = CONNECTION)]
    pub initial_retry_pause: u32,
    /// Total pause budget for retrying one request, in milliseconds
    #[arg(long = "maxRetryPause", value_name = "MS", default_value_t = 30_000, help_heading = CONNECTION)]
    pub max_retry_pause: u32,
    /// Upload speed limit in bits per second (SIZE syntax) [default: unlimited]
    #[arg(long = "maxUploadSpeed", value_name = "BITSPERSEC", help_heading = CONNECTION)]
    pub max_upload_speed: Option<String>,
    /// Download speed limit in bits per second (SIZE syntax) [default: unlimited]
    #[arg(long = "maxDownloadSpeed", value_name = "BITSPERSEC", help_heading = CONNECTION)]
    pub max_download_speed: Option<String>,

    // ---- Objects ----
    /// Object key prefix, used verbatim (no '/' is added) [default: none]
    #[arg(long = "prefix", value_name = "STRING", help_heading = OBJECTS)]
    pub prefix: Option<String>,
    /// Prepend a hash to block object names (must be used consistently for a bucket)
    #[arg(long = "blockHashPrefix", help_heading = OBJECTS)]
    pub block_hash_prefix: bool,
    /// Storage class of written objects: STANDARD, STANDARD_IA, ONEZONE_IA, REDUCED_REDUNDANCY,
    /// INTELLIGENT_TIERING, GLACIER, DEEP_ARCHIVE, OUTPOSTS [default: none]
    #[arg(long = "storageClass", value_name = "CLASS", help_heading = OBJECTS)]
    pub storage_class: Option<String>,
    /// Same as --storageClass=REDUCED_REDUNDANCY (s3backer 1.5.4 compatibility)
    #[arg(long = "rrs", help_heading = OBJECTS)]
    pub rrs: bool,
    /// Server-side encryption: AES256 or aws:kms [default: none]
    #[arg(long = "sse", value_name = "TYPE", help_heading = OBJECTS)]
    pub sse: Option<String>,
    /// KMS key ID for --sse=aws:kms
    #[arg(long = "sse-key-id", value_name = "ID", help_heading = OBJECTS)]
    pub sse_key_id: Option<String>,
    /// Content-Encoding assumed when a downloaded object has none [default: none]
    #[arg(long = "defaultContentEncoding", value_name = "VALUE", help_heading = OBJECTS)]
    pub default_content_encoding: Option<String>,

    // ---- Disk ----
    /// Block size, a power of two [default: auto-detected, else 4k]
    #[arg(long = "blockSize", value_name = "SIZE", help_heading = DISK)]
    pub block_size: Option<String>,
    /// Total size of the file [default: auto-detected]
    #[arg(long = "size", value_name = "SIZE", help_heading = DISK)]
    pub size: Option<String>,
    /// Do not read the block and file size from the bucket (then --size is required)
    #[arg(long = "noAutoDetect", help_heading = DISK)]
    pub no_auto_detect: bool,
    /// Override size mismatches and the mounted flag; erase without asking
    #[arg(long = "force", help_heading = DISK)]
    pub force: bool,
    /// Read-only disk (file mode 0400, the mounted flag is not written)
    #[arg(long = "readOnly", help_heading = DISK)]
    pub read_only: bool,
    /// Name of the data file in the mount point
    #[arg(long = "filename", value_name = "NAME", default_value = "file", help_heading = DISK)]
    pub filename: String,
    /// Name of the statistics file; empty for none
    #[arg(long = "statsFilename", value_name = "NAME", default_value = "stats", help_heading = DISK)]
    pub stats_filename: String,
    /// Also write the statistics to this file periodically [default: none]
    #[arg(long = "statsFileMirror", value_name = "PATH", help_heading = DISK)]
    pub stats_file_mirror: Option<PathBuf>,
    /// Serve the statistics as Prometheus metrics on http://ADDR:PORT/metrics (loopback only) [default: off]
    #[arg(long = "prometheusListen", value_name = "ADDR:PORT", help_heading = DISK)]
    pub prometheus_listen: Option<String>,
    /// Period of --statsFileMirror, in milliseconds
    #[arg(long = "statsFileMirrorInterval", value_name = "MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..), help_heading = DISK)]
    pub stats_file_mirror_interval: u32,
    /// Permissions of the data file, in octal [default: 0600, 0400 with --readOnly]
    #[arg(long = "fileMode", value_name = "OCTAL", help_heading = DISK)]
    pub file_mode: Option<String>,
    /// Bypass the kernel page cache for the data file
    #[arg(long = "directIO", help_heading = DISK)]
    pub direct_io: bool,

    // ---- Compression and encryption ----
    /// Compress blocks: deflate, zstd, or a deflate level 0-9 [default: off; bare flag: deflate]
    #[arg(long = "compress", value_name = "ALG|LEVEL", num_args = 0..=1, require_equals = true,
          default_missing_value = "deflate", help_heading = CODEC)]
    pub compress: Option<String>,
    /// Compression level (requires --compress) [default: the algorithm's default]
    #[arg(long = "compress-level", value_name = "N", allow_negative_numbers = true, help_heading = CODEC)]
    pub compress_level: Option<i32>,
    /// Encrypt blocks: AES-128-CBC, AES-192-CBC or AES-256-CBC; implies --compress [default: off; bare flag: AES-128-CBC]
    #[arg(long = "encrypt", value_name = "CIPHER", num_args = 0..=1, require_equals = true,
          default_missing_value = "AES-128-CBC", help_heading = CODEC)]
    pub encrypt: Option<String>,
    /// Encryption password [default: asked on the terminal]
    #[arg(long = "password", value_name = "PASSWORD", help_heading = CODEC)]
    pub password: Option<String>,
    /// Read the encryption password from the first line of this file
    #[arg(long = "passwordFile", value_name = "FILE", help_heading = CODEC)]
    pub password_file: Option<PathBuf>,
    /// Length of the derived key in bytes, 0 = the cipher's key length (legacy)
    #[arg(long = "keyLength", value_name = "N", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=64), help_heading = CODEC)]
    pub key_length: u32,

    // ---- Block cache ----
    /// Number of blocks in the block cache; 0 disables it
    #[arg(long = "blockCacheSize", value_name = "N", default_value_t = 1000, help_heading = CACHE)]
    pub block_cache_size: u32,
    /// Number of upload and read-ahead threads
    #[arg(long = "blockCacheThreads", value_name = "N", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..=1000), help_heading = CACHE)]
    pub block_cache_threads: u32,
    /// Delay before a dirty block is written, in milliseconds
    #[arg(long = "blockCacheWriteDelay", value_name = "MS", default_value_t = 250, help_heading = CACHE)]
    pub block_cache_write_delay: u32,
    /// Time after which clean cached blocks expire, in milliseconds; 0 = never
    #[arg(long = "blockCacheTimeout", value_name = "MS", default_value_t = 0, help_heading = CACHE)]
    pub block_cache_timeout: u32,
    /// Maximum number of dirty blocks; 0 = the cache size
    #[arg(long = "blockCacheMaxDirty", value_name = "N", default_value_t = 0, help_heading = CACHE)]
    pub block_cache_max_dirty: u32,
    /// Writes wait until the block is uploaded (requires --blockCacheWriteDelay=0)
    #[arg(long = "blockCacheSync", help_heading = CACHE)]
    pub block_cache_sync: bool,
    /// Persistent cache file [default: none]
    #[arg(long = "blockCacheFile", value_name = "FILE", help_heading = CACHE)]
    pub block_cache_file: Option<PathBuf>,
    /// Trust blocks in the cache file without checking them against S3 (by default each is
    /// checked by ETag, If-None-Match, the first time it is read after a mount)
    #[arg(long = "blockCacheNoVerify", help_heading = CACHE)]
    pub block_cache_no_verify: bool,
    /// Upload dirty blocks found in the cache file after an unclean shutdown
    #[arg(long = "blockCacheRecoverDirtyBlocks", help_heading = CACHE)]
    pub block_cache_recover_dirty_blocks: bool,
    /// Blocks numbered below N are evicted last
    #[arg(long = "blockCacheNumProtected", value_name = "N", default_value_t = 0, help_heading = CACHE)]
    pub block_cache_num_protected: u32,
    /// Tell the kernel not to cache the cache file (posix_fadvise DONTNEED)
    #[arg(long = "blockCacheFileAdvise", help_heading = CACHE)]
    pub block_cache_file_advise: bool,
    /// Number of blocks to read ahead (default 0 in NBD mode)
    #[arg(long = "readAhead", value_name = "N", default_value_t = 4, help_heading = CACHE)]
    pub read_ahead: u32,
    /// Largest read-ahead window in blocks (ours): while reads stay sequential the window grows
    /// from --readAhead to this, so one stream keeps this many GETs in flight; set it to
    /// --readAhead for C's fixed window
    #[arg(long = "readAheadMax", value_name = "N", default_value_t = 32, help_heading = CACHE)]
    pub read_ahead_max: u32,
    /// Number of sequential block reads that trigger read-ahead (default 0 in NBD mode)
    #[arg(long = "readAheadTrigger", value_name = "N", default_value_t = 2, help_heading = CACHE)]
    pub read_ahead_trigger: u32,

    // ---- Eventual consistency ----
    /// Number of remembered block checksums; 0 disables the MD5 cache
    #[arg(long = "md5CacheSize", value_name = "N", default_value_t = 0, help_heading = CONSISTENCY)]
    pub md5_cache_size: u32,
    /// How long a written block's checksum is remembered, in milliseconds; 0 = forever
    #[arg(long = "md5CacheTime", value_name = "MS", default_value_t = 0, help_heading = CONSISTENCY)]
    pub md5_cache_time: u32,
    /// Minimum time between two writes of the same block, in milliseconds
    #[arg(long = "minWriteDelay", value_name = "MS", default_value_t = 0, help_heading = CONSISTENCY)]
    pub min_write_delay: u32,

    // ---- Modes ----
    /// List the existing blocks in the background at startup (speeds up reads of empty blocks)
    #[arg(long = "listBlocks", help_heading = MODES)]
    pub list_blocks: bool,
    /// Number of parallel listing requests for --listBlocks and --erase
    #[arg(long = "listBlocksThreads", value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=1000), help_heading = MODES)]
    pub list_blocks_threads: u32,
    /// Several hosts mount the same bucket (for cluster file systems); disables all caching
    #[arg(long = "sharedDiskMode", help_heading = MODES)]
    pub shared_disk_mode: bool,
    /// Delete all blocks and the mounted flag, then exit (asks first unless --force)
    #[arg(long = "erase", conflicts_with = "reset_mounted_flag", help_heading = MODES)]
    pub erase: bool,
    /// Clear the mounted flag, then exit
    #[arg(long = "reset-mounted-flag", help_heading = MODES)]
    pub reset_mounted_flag: bool,
    /// Read and check every stored block (MD5, HMAC, decoding), report damaged ones, then exit
    /// (read-only; safe while mounted); exit status 1 when damage is found
    #[arg(long = "verify", conflicts_with_all = ["erase", "reset_mounted_flag"], help_heading = MODES)]
    pub verify: bool,
    /// Use the local directory BUCKET instead of S3 (blocks stored as raw files)
    #[arg(long = "test", help_heading = MODES)]
    pub test: bool,
    /// Serve the disk over NBD (built-in server) and attach it to /dev/nbdX with nbd-client
    #[arg(long = "nbd", help_heading = MODES)]
    pub nbd: bool,
    /// NBD: listen on this Unix socket (serves without a /dev/nbdX device; implies --nbd)
    #[arg(long = "nbd-socket", value_name = "PATH", help_heading = MODES)]
    pub nbd_socket: Option<PathBuf>,
    /// NBD: listen on this TCP address, [HOST:]PORT, 127.0.0.1 unless a host is given (implies --nbd)
    #[arg(long = "nbd-listen", value_name = "ADDR", help_heading = MODES)]
    pub nbd_listen: Option<String>,
    /// NBD: export name announced to clients (clients asking for the default export "" get it too)
    #[arg(long = "nbd-name", value_name = "NAME", default_value = "s3backer", help_heading = MODES)]
    pub nbd_name: String,
    /// Accepted for C compatibility and ignored: the NBD server is built in, there is no nbdkit
    #[arg(long = "nbd-flag", value_name = "ARG", action = ArgAction::Append, help_heading = MODES)]
    pub nbd_flag: Vec<String>,
    /// Accepted for C compatibility and ignored (see --nbd-flag)
    #[arg(long = "nbd-param", value_name = "ARG", action = ArgAction::Append, help_heading = MODES)]
    pub nbd_param: Vec<String>,

    // ---- Logging and testing ----
    /// Debug logging
    #[arg(long = "debug", help_heading = LOGGING)]
    pub debug: bool,
    /// Log HTTP details and error bodies
    #[arg(long = "debug-http", help_heading = LOGGING)]
    pub debug_http: bool,
    /// Do not print startup progress
    #[arg(long = "quiet", help_heading = LOGGING)]
    pub quiet: bool,
    /// Test mode: inject random errors
    #[arg(long = "test-errors", help_heading = LOGGING)]
    pub test_errors: bool,
    /// Test mode: inject random delays
    #[arg(long = "test-delays", help_heading = LOGGING)]
    pub test_delays: bool,
    /// Test mode: discard writes
    #[arg(long = "test-discard", help_heading = LOGGING)]
    pub test_discard: bool,

    // ---- FUSE and config files ----
    /// Read more arguments from FILE, one per line ('#' starts a comment line)
    #[arg(long = "configFile", short = 'F', value_name = "FILE", help_heading = FUSE)]
    pub config_file: Vec<PathBuf>,
    /// Mount options: any flag as name[=value], or a FUSE option (comma-separated list)
    #[arg(short = 'o', value_name = "OPTIONS", help_heading = FUSE)]
    pub mount_options: Vec<String>,
    /// Stay in the foreground
    #[arg(short = 'f', help_heading = FUSE)]
    pub foreground: bool,
    /// Debug logging and stay in the foreground
    #[arg(short = 'd', help_heading = FUSE)]
    pub fuse_debug: bool,
    /// Serve FUSE requests on a single thread
    #[arg(short = 's', help_heading = FUSE)]
    pub single_threaded: bool,
    /// Print this help (also -?)
    #[arg(short = 'h', long = "help", help_heading = FUSE)]
    pub help: bool,
    /// Print the version
    #[arg(short = 'v', long = "version", help_heading = FUSE)]
    pub version: bool,
}
