use super::*;
use std::io::Write;
use std::path::Path;

fn parse(args: &[&str]) -> Result<Command, ConfigError> {
    parse_args(args.iter().map(OsString::from).collect())
}

fn config(args: &[&str]) -> Config {
    match parse(args) {
        Ok(Command::Run(config)) => *config,
        other => panic!("expected a config from {args:?}, got {other:?}"),
    }
}

/// A mount of `bucket` on `/mnt` with extra flags.
fn mount(flags: &[&str]) -> Config {
    let mut args = flags.to_vec();
    args.extend(["bucket", "/mnt"]);
    config(&args)
}

fn error(args: &[&str]) -> String {
    match parse(args) {
        Err(e) => e.to_string(),
        Ok(other) => panic!("expected an error from {args:?}, got {other:?}"),
    }
}

fn mount_error(flags: &[&str]) -> String {
    let mut args = flags.to_vec();
    args.extend(["bucket", "/mnt"]);
    error(&args)
}

/// Writes config files into a temp dir that is removed on drop.
struct ConfigDir(tempfile::TempDir);

impl ConfigDir {
    fn new() -> Self {
        ConfigDir(tempfile::tempdir().unwrap())
    }

    fn file(&self, name: &str, text: &str) -> String {
        let path = self.0.path().join(name);
        std::fs::File::create(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        path.to_str().unwrap().to_string()
    }
}

#[test]
fn defaults_match_the_spec() {
    let c = mount(&[]);
    assert_eq!(c.mode, Mode::Mount);
    assert_eq!(c.bucket, "bucket");
    assert_eq!(c.prefix, "");
    assert_eq!(c.mount_point, Some(PathBuf::from("/mnt")));
    assert_eq!(c.base_url, "http://s3.amazonaws.com/");
    assert!(!c.vhost);
    assert_eq!(c.region, "us-east-1");
    assert_eq!(c.access_type, "private");
    assert_eq!(c.auth_version, AuthVersion::Aws4);
    assert_eq!(c.timeout, Duration::from_secs(30));
    assert_eq!(c.initial_retry_pause, Duration::from_millis(200));
    assert_eq!(c.max_retry_pause, Duration::from_millis(30_000));
    assert_eq!(c.block_size, None);
    assert_eq!(c.size, None);
    assert_eq!(c.filename, "file");
    assert_eq!(c.stats_filename.as_deref(), Some("stats"));
    assert_eq!(c.file_mode, 0o600);
    assert_eq!(c.compression, None);
    assert_eq!(c.cipher, None);
    assert_eq!(c.block_cache_size, 1000);
    assert_eq!(c.block_cache_threads, 20);
    assert_eq!(c.block_cache_write_delay, Duration::from_millis(250));
    assert_eq!(c.read_ahead, 4);
    assert_eq!(c.read_ahead_trigger, 2);
    assert_eq!(c.read_ahead_max, 32);
    assert_eq!(c.md5_cache_size, 0);
    assert_eq!(c.list_blocks_threads, 16);
    assert_eq!(c.stats_file_mirror_interval, Duration::from_millis(1000));
    assert!(!c.foreground && !c.debug && !c.single_threaded && !c.force && !c.test_mode);
    assert!(c.fuse_options.is_empty());
}

#[test]
fn sizes_take_binary_suffixes_and_plain_numbers() {
    let c = mount(&["--size=1g", "--blockSize=64k"]);
    assert_eq!(c.size, Some(1 << 30));
    assert_eq!(c.block_size, Some(64 << 10));
    assert_eq!(mount(&["--size", "2T"]).size, Some(2 << 40));
    assert_eq!(mount(&["--size=3MB"]).size, Some(3 << 20));
    assert_eq!(mount(&["--size=1e"]).size, Some(1 << 60));
    assert_eq!(mount(&["--blockSize=4096"]).block_size, Some(4096));
    assert_eq!(mount(&["--size=1048576"]).size, Some(1 << 20));
}

#[test]
fn bad_sizes_are_rejected_with_the_value() {
    assert_eq!(
        mount_error(&["--size=0"]),
        r#"invalid size "0": must be greater than zero"#
    );
    assert_eq!(
        mount_error(&["--size=16e"]),
        r#"invalid size "16e": too big"#
    );
    assert_eq!(
        mount_error(&["--size=1z"]),
        r#"invalid size "1z": too big for this build"#
    );
    assert_eq!(
        mount_error(&["--size=99999999999999999999"]),
        r#"invalid size "99999999999999999999": too big"#
    );
    assert_eq!(
        mount_error(&["--size=12q"]),
        r#"invalid size "12q": unknown suffix"#
    );
    assert_eq!(
        mount_error(&["--size=g"]),
        r#"invalid size "g": expected a number with an optional suffix k, m, g, t, p, e"#
    );
    assert_eq!(
        mount_error(&["--blockSize=8g"]),
        r#"invalid block size "8g": too big"#
    );
    assert_eq!(
        mount_error(&["--blockSize=3000"]),
        "block size must be a power of 2"
    );
    assert_eq!(
        mount_error(&["--blockSize=4k", "--size=6k"]),
        "file size must be a multiple of block size"
    );
}

#[test]
fn boolean_flags_and_fuse_short_flags() {
    let c = mount(&[
        "--ssl",
        "--readOnly",
        "--force",
        "--listBlocks",
        "--blockHashPrefix",
        "--quiet",
        "--debug-http",
        "--noAutoDetect",
        "--directIO",
        "--insecure",
        "--http11",
        "--noCurlCache",
        "-f",
        "-s",
    ]);
    assert!(c.ssl && c.read_only && c.force && c.list_blocks && c.block_hash_prefix);
    assert!(c.quiet && c.debug_http && c.no_auto_detect && c.direct_io);
    assert!(c.insecure && c.http11 && c.no_connection_reuse);
    assert!(c.foreground && c.single_threaded && !c.debug);
    assert_eq!(c.file_mode, 0o400, "read-only default mode");

    let d = mount(&["-d"]);
    assert!(d.debug && d.foreground);
    let debug = mount(&["--debug"]);
    assert!(debug.debug && !debug.foreground);
}

#[test]
fn values_with_equals_or_separate() {
    let c = mount(&[
        "--accessId",
        "AKID",
        "--accessKey=secret",
        "--region",
        "eu-west-1",
    ]);
    assert_eq!(c.access_id.as_deref(), Some("AKID"));
    assert_eq!(c.access_key.as_ref().map(Secret::expose), Some("secret"));
    assert_eq!(c.region, "eu-west-1");
    let c = mount(&[
        "--timeout",
        "5",
        "--initialRetryPause=100",
        "--maxRetryPause",
        "1000",
    ]);
    assert_eq!(c.timeout, Duration::from_secs(5));
    assert_eq!(c.initial_retry_pause, Duration::from_millis(100));
    assert_eq!(c.max_retry_pause, Duration::from_millis(1000));
}

#[test]
fn secrets_are_hidden_from_debug_output() {
    let c = mount(&["--accessKey=topsecret", "--password=hunter2"]);
    let shown = format!("{c:?}");
    assert!(
        !shown.contains("topsecret") && !shown.contains("hunter2"),
        "{shown}"
    );
}

#[test]
fn last_value_wins() {
    let c = mount(&[
        "--size=1g",
        "--size=2g",
        "--prefix=a/",
        "--prefix",
        "b/",
        "--ssl",
        "--ssl",
    ]);
    assert_eq!(c.size, Some(2 << 30));
    assert_eq!(c.prefix, "b/");
    let c = mount(&["-o", "size=1g", "--size=4g"]);
    assert_eq!(c.size, Some(4 << 30));
    assert!(!mount(&["--vhost", "--no-vhost"]).vhost);
    assert!(mount(&["--no-vhost", "--vhost"]).vhost);
}

#[test]
fn mount_options_mix_flags_and_fuse_options_in_order() {
    let c = config(&[
        "bucket",
        "/mnt",
        "-o",
        "size=1g,blockSize=64k,allow_other,rw,noauto,_netdev",
        "-ouid=1000,listBlocks",
        "-o",
        "x-systemd.automount,compress=zstd",
    ]);
    assert_eq!(c.size, Some(1 << 30));
    assert_eq!(c.block_size, Some(64 << 10));
    assert!(c.list_blocks);
    assert_eq!(c.compression, Some(Compression::Zstd { level: None }));
    assert_eq!(
        c.fuse_options,
        [
            "allow_other",
            "rw",
            "noauto",
            "_netdev",
            "uid=1000",
            "x-systemd.automount"
        ]
    );
}

#[test]
fn mount_options_cannot_smuggle_unknown_long_flags() {
    // An unknown `-o` name is a FUSE option, never an error; an unknown `--flag` is an error.
    assert_eq!(
        mount(&["-o", "blocksize=4k"]).fuse_options,
        ["blocksize=4k"]
    );
    let message = mount_error(&["--blocksize=4k"]);
    assert!(message.contains("'--blocksize'"), "{message}");
    assert!(
        message.contains("--blockSize"),
        "suggests the right name: {message}"
    );
}

#[test]
fn flag_names_are_case_sensitive() {
    assert!(mount_error(&["--readonly"]).contains("'--readonly'"));
    assert!(mount_error(&["--BlockSize=4k"]).contains("'--BlockSize'"));
}

#[test]
fn dash_o_flag_without_its_value_is_an_error() {
    assert_eq!(
        error(&["-o", "prefix", "bucket", "/mnt"]),
        r#"option "-o prefix" requires a value ("-o prefix=VALUE")"#
    );
}

#[test]
fn dash_o_without_argument_is_an_error() {
    assert_eq!(
        error(&["bucket", "/mnt", "-o"]),
        r#"option "-o" requires an argument"#
    );
}

#[test]
fn config_file_is_spliced_in_place() {
    let dir = ConfigDir::new();
    let file = dir.file(
        "s3b.conf",
        "# comment\n\n   --size=1g   \n--prefix\n  has space  \n\t-o allow_other,listBlocks\n",
    );
    // The later `--size` wins because the file is spliced where it appears.
    let c = mount(&[&format!("--configFile={file}"), "--size=2g"]);
    assert_eq!(c.size, Some(2 << 30));
    assert_eq!(c.prefix, "has space");
    assert!(c.list_blocks);
    assert_eq!(c.fuse_options, ["allow_other"]);
    let c = mount(&["--size=2g", "-F", &file]);
    assert_eq!(c.size, Some(1 << 30));
    let c = mount(&["--size=2g", &format!("-F{file}")]);
    assert_eq!(c.size, Some(1 << 30));
    let c = mount(&["--size=2g", "--configFile", &file]);
    assert_eq!(c.size, Some(1 << 30));
    let c = mount(&["-o", &format!("ssl,configFile={file},readOnly")]);
    assert!(c.ssl && c.read_only);
    assert_eq!(c.size, Some(1 << 30));
}

#[test]
fn config_file_may_hold_bucket_and_mount_point() {
    let dir = ConfigDir::new();
    let file = dir.file("all.conf", "--size=1g\nmybucket/vm1\n/mnt/disk\n");
    let c = config(&["-F", &file]);
    assert_eq!(c.bucket, "mybucket");
    assert_eq!(c.prefix, "vm1/");
    assert_eq!(c.mount_point, Some(PathBuf::from("/mnt/disk")));
}

#[test]
fn config_files_nest() {
    let dir = ConfigDir::new();
    let inner = dir.file("inner.conf", "--size=1g\n");
    let outer = dir.file(
        "outer.conf",
        &format!("--ssl\n--configFile={inner}\n--quiet\n"),
    );
    let c = mount(&["-F", &outer]);
    assert!(c.ssl && c.quiet);
    assert_eq!(c.size, Some(1 << 30));
}

#[test]
fn config_file_nesting_is_limited() {
    let dir = ConfigDir::new();
    let path = dir.0.path().join("loop.conf");
    let file = dir.file("loop.conf", &format!("--configFile={}\n", path.display()));
    assert_eq!(
        mount_error(&["-F", &file]),
        r#"too many levels of "--configFile" nesting"#
    );
}

#[test]
fn config_file_errors() {
    let dir = ConfigDir::new();
    let nbd = dir.file("nbd.conf", "--nbd\n");
    assert_eq!(
        mount_error(&["-F", &nbd]),
        r#"the "--nbd" flag is not allowed in a config file"#
    );
    let missing = dir.0.path().join("missing.conf");
    let message = mount_error(&["-F", missing.to_str().unwrap()]);
    assert!(
        message.starts_with(&format!("can't read config file \"{}\"", missing.display())),
        "{message}"
    );
}

#[test]
fn bucket_subdirectory_becomes_the_prefix() {
    let c = mount(&[]);
    assert_eq!((c.bucket.as_str(), c.prefix.as_str()), ("bucket", ""));
    let c = config(&["mybucket/disks/vm1", "/mnt"]);
    assert_eq!(
        (c.bucket.as_str(), c.prefix.as_str()),
        ("mybucket", "disks/vm1/")
    );
    let c = config(&["--prefix=vm1", "mybucket", "/mnt"]);
    assert_eq!(c.prefix, "vm1", "no slash is added to --prefix");
}

#[test]
fn bad_bucket_arguments() {
    assert_eq!(error(&[]), "no S3 bucket specified");
    assert_eq!(
        error(&["/bucket", "/mnt"]),
        r#"invalid S3 bucket "/bucket""#
    );
    assert_eq!(error(&["", "/mnt"]), r#"invalid S3 bucket """#);
    for arg in ["b/", "b/a/", "b/a//c", "b//a"] {
        let subdir = arg.split_once('/').unwrap().1;
        assert_eq!(
            error(&[arg, "/mnt"]),
            format!(r#"invalid S3 bucket subdirectory "{subdir}" in "{arg}""#)
        );
    }
    assert_eq!(
        error(&["--prefix=x/", "b/vm1", "/mnt"]),
        r#"bucket subdirectory "vm1" conflicts with --prefix"#
    );
    // An empty --prefix does not conflict.
    assert_eq!(config(&["--prefix=", "b/vm1", "/mnt"]).prefix, "vm1/");
}

#[test]
fn legacy_device_form_is_accepted() {
    let c = config(&["s3backer#mybucket/vm1", "/mnt", "-o", "size=1g"]);
    assert_eq!((c.bucket.as_str(), c.prefix.as_str()), ("mybucket", "vm1/"));
}

#[test]
fn mount_point_rules() {
    assert_eq!(error(&["bucket"]), "no mount point specified");
    let message = r#"no mount point should be specified with "--erase", "--reset-mounted-flag" or "--verify""#;
    assert_eq!(error(&["--erase", "bucket", "/mnt"]), message);
    assert_eq!(error(&["--reset-mounted-flag", "bucket", "/mnt"]), message);
    let c = config(&["--erase", "bucket"]);
    assert_eq!((c.mode, c.mount_point), (Mode::Erase, None));
    let c = config(&["--reset-mounted-flag", "bucket"]);
    assert_eq!(c.mode, Mode::ResetMountedFlag);
    assert!(error(&["--erase", "--reset-mounted-flag", "bucket"]).contains("cannot be used with"));
    assert!(error(&["bucket", "/mnt", "extra"]).contains("'extra'"));
}

#[test]
fn test_mode_takes_the_directory_whole() {
    let c = config(&["--test", "--prefix=p/", "/tmp/blocks/dir", "/mnt"]);
    assert!(c.test_mode);
    assert_eq!(
        (c.bucket.as_str(), c.prefix.as_str()),
        ("/tmp/blocks/dir", "p/")
    );
    assert_eq!(c.description(), "file:///tmp/blocks/dir/p/");
}

#[test]
fn base_url_region_and_vhost() {
    let c = mount(&["--ssl"]);
    assert_eq!(
        (c.base_url.as_str(), c.vhost),
        ("https://s3.amazonaws.com/", false)
    );
    assert_eq!(c.description(), "https://s3.amazonaws.com/bucket/");

    let c = mount(&["--region=eu-west-1"]);
    assert_eq!(
        (c.base_url.as_str(), c.vhost),
        ("http://s3.eu-west-1.amazonaws.com/", true)
    );
    assert_eq!(c.objects_url(), "http://bucket.s3.eu-west-1.amazonaws.com/");

    let c = mount(&["--region=us-east-1", "--ssl"]);
    assert_eq!(
        (c.base_url.as_str(), c.vhost),
        ("https://s3.amazonaws.com/", true)
    );

    let c = mount(&["--region=eu-west-1", "--no-vhost"]);
    assert!(!c.vhost);
    assert_eq!(c.objects_url(), "http://s3.eu-west-1.amazonaws.com/bucket/");

    let c = config(&[
        "--baseURL=http://127.0.0.1:9000/",
        "--vhost",
        "b/vm1",
        "/mnt",
    ]);
    assert_eq!(c.base_url, "http://127.0.0.1:9000/");
    assert_eq!(c.vhost_url(), "http://b.127.0.0.1:9000/");
    assert_eq!(c.description(), "http://b.127.0.0.1:9000/vm1/");

    let c = mount(&[
        "--baseURL=https://minio.local/s3/",
        "--ssl",
        "--region=eu-west-1",
    ]);
    assert_eq!(
        c.base_url, "https://minio.local/s3/",
        "an explicit base URL is kept"
    );
}

#[test]
fn bad_base_urls() {
    assert_eq!(
        mount_error(&["--baseURL=ftp://host/"]),
        r#"invalid base URL "ftp://host/": must start with "http://" or "https://""#
    );
    assert_eq!(
        mount_error(&["--baseURL=http://host"]),
        r#"invalid base URL "http://host": must end with "/""#
    );
    assert_eq!(
        mount_error(&["--baseURL=http:///"]),
        r#"invalid base URL "http:///": no host name"#
    );
    assert_eq!(
        mount_error(&["--baseURL=http://host/", "--ssl"]),
        r#""--ssl" conflicts with the non-https base URL "http://host/""#
    );
}

#[test]
fn compression_flags() {
    let deflate = |level| Some(Compression::Deflate { level });
    assert_eq!(mount(&["--compress"]).compression, deflate(None));
    assert_eq!(mount(&["--compress=deflate"]).compression, deflate(None));
    assert_eq!(mount(&["--compress=DEFLATE"]).compression, deflate(None));
    assert_eq!(
        mount(&["--compress=zstd", "--compress-level=19"]).compression,
        Some(Compression::Zstd { level: Some(19) })
    );
    assert_eq!(
        mount(&["--compress=zstd", "--compress-level", "-5"]).compression,
        Some(Compression::Zstd { level: Some(-5) })
    );
    assert_eq!(
        mount(&["--compress", "--compress-level=9"]).compression,
        deflate(Some(9))
    );
    assert_eq!(mount(&["-o", "compress"]).compression, deflate(None));
}

#[test]
fn legacy_numeric_compress_is_a_deflate_level() {
    assert_eq!(
        mount(&["--compress=7"]).compression,
        Some(Compression::Deflate { level: Some(7) })
    );
    assert_eq!(
        mount(&["-o", "compress=1"]).compression,
        Some(Compression::Deflate { level: Some(1) })
    );
}

#[test]
fn compression_errors() {
    assert_eq!(
        mount_error(&["--compress=lz4"]),
        r#"unknown compression algorithm "lz4""#
    );
    assert_eq!(
        mount_error(&["--compress-level=3"]),
        r#"the "--compress-level" flag requires the "--compress" flag"#
    );
    assert_eq!(
        mount_error(&["--compress=12"]),
        "invalid deflate compression level 12: must be between -1 and 9"
    );
    assert!(
        mount_error(&["--compress=zstd", "--compress-level=99"])
            .starts_with("invalid zstd compression level 99: must be between")
    );
}

#[test]
fn encryption_implies_deflate_and_names_ciphers() {
    let c = mount(&["--encrypt", "--password=pw"]);
    assert_eq!(c.cipher, Some(Cipher::Aes128Cbc));
    assert_eq!(c.compression, Some(Compression::Deflate { level: None }));
    assert_eq!(
        mount(&["--encrypt=aes-192-cbc"]).cipher,
        Some(Cipher::Aes192Cbc)
    );
    assert_eq!(
        mount(&["--encrypt=AES-256-CBC"]).cipher,
        Some(Cipher::Aes256Cbc)
    );
    assert_eq!(
        mount(&["--encrypt", "--compress=zstd"]).compression,
        Some(Compression::Zstd { level: None })
    );
    assert_eq!(
        mount_error(&["--encrypt=aes256"]),
        r#"unsupported cipher "aes256" (supported: AES-128-CBC, AES-192-CBC, AES-256-CBC)"#
    );
    assert!(mount_error(&["--encrypt=AES-128-CTR"]).starts_with("unsupported cipher"));
}

#[test]
fn encryption_needs_blocks_of_at_least_16_bytes() {
    assert_eq!(
        mount_error(&["--encrypt", "--blockSize=8"]),
        "block size must be a multiple of 16 when encrypting"
    );
    assert_eq!(mount(&["--encrypt", "--blockSize=16"]).block_size, Some(16));
    assert_eq!(mount(&["--blockSize=8"]).block_size, Some(8));
}

#[test]
fn key_length_is_checked_against_the_cipher() {
    assert_eq!(
        mount(&["--encrypt=AES-256-CBC", "--keyLength=64"]).key_length,
        64
    );
    assert_eq!(mount(&["--encrypt"]).key_length, 0);
    assert_eq!(
        mount_error(&["--encrypt=AES-256-CBC", "--keyLength=16"]),
        "invalid key length 16 for AES-256-CBC: must be between 32 and 64"
    );
    assert!(mount_error(&["--keyLength=65"]).contains("65"));
}

#[test]
fn password_flags() {
    assert_eq!(
        mount_error(&["--password=a", "--passwordFile=/f"]),
        r#"specify only one of "--password" or "--passwordFile""#
    );
    let c = mount(&["--password=pw"]);
    assert_eq!(c.encryption_password().unwrap(), "pw");
}

#[test]
fn password_file_gives_its_first_line() {
    let dir = ConfigDir::new();
    let file = dir.file("pw", "s3cret pass\nsecond line\n");
    let c = mount(&["--passwordFile", &file]);
    assert_eq!(c.encryption_password().unwrap(), "s3cret pass");
    let file = dir.file("pw-no-newline", "justthis");
    assert_eq!(
        mount(&["--passwordFile", &file])
            .encryption_password()
            .unwrap(),
        "justthis"
    );
    let empty = dir.file("empty", "");
    assert_eq!(
        mount(&["--passwordFile", &empty])
            .encryption_password()
            .unwrap_err()
            .to_string(),
        format!(r#"password file "{empty}" has no password on its first line"#)
    );
    let missing = format!("{}/missing", dir.0.path().display());
    assert!(
        mount(&["--passwordFile", &missing])
            .encryption_password()
            .unwrap_err()
            .to_string()
            .starts_with(&format!(r#"can't read password file "{missing}""#))
    );
}

#[test]
fn password_prompt_needs_a_terminal() {
    if std::io::stdin().is_terminal() {
        return; // Would prompt; only the non-terminal case is testable unattended.
    }
    assert_eq!(
        mount(&[]).encryption_password().unwrap_err().to_string(),
        r#"an encryption password is needed: give "--password" or "--passwordFile", or run on a terminal"#
    );
}

#[test]
fn credentials_are_kept_raw() {
    let c = mount(&[
        "--accessId=",
        "--accessKeyEnv=MY_SECRET",
        "--accessFile=/etc/s3b.passwd",
    ]);
    assert_eq!(c.access_id.as_deref(), Some(""));
    assert_eq!(c.access_key_env.as_deref(), Some("MY_SECRET"));
    assert_eq!(c.access_file, Some(PathBuf::from("/etc/s3b.passwd")));
    let c = mount(&["--accessEC2IAM=role", "--accessEC2IAM-IMDSv2"]);
    assert_eq!(c.access_ec2_iam.as_deref(), Some("role"));
    assert!(c.imds_v2);
    assert_eq!(
        mount_error(&["--accessKey=k", "--accessKeyEnv=V"]),
        r#"specify only one of "--accessKey" or "--accessKeyEnv""#
    );
    assert_eq!(
        mount_error(&["--accessEC2IAM=role", "--accessId=id"]),
        r#""--accessEC2IAM" is incompatible with "--accessId""#
    );
}

#[test]
fn access_type_and_auth_version() {
    assert_eq!(
        mount(&["--accessType=public-read"]).access_type,
        "public-read"
    );
    assert_eq!(
        mount_error(&["--accessType=open"]),
        r#"illegal access type "open""#
    );
    assert_eq!(
        mount(&["--authVersion=aws2"]).auth_version,
        AuthVersion::Aws2
    );
    assert_eq!(
        mount_error(&["--authVersion=aws3"]),
        r#"illegal authentication version "aws3""#
    );
}

#[test]
fn storage_class_and_rrs() {
    assert_eq!(mount(&[]).storage_class, None);
    assert_eq!(
        mount(&["--storageClass=standard_ia"])
            .storage_class
            .as_deref(),
        Some("STANDARD_IA")
    );
    assert_eq!(
        mount(&["--rrs"]).storage_class.as_deref(),
        Some("REDUCED_REDUNDANCY")
    );
    assert_eq!(
        mount_error(&["--storageClass=COLD"]),
        r#"invalid storage class "COLD""#
    );
    assert_eq!(
        mount_error(&["--rrs", "--storageClass=GLACIER"]),
        r#""--rrs" conflicts with "--storageClass=GLACIER""#
    );
}

#[test]
fn server_side_encryption() {
    assert_eq!(mount(&["--sse=AES256"]).sse.as_deref(), Some("AES256"));
    let c = mount(&["--sse=aws:kms", "--sse-key-id=key1"]);
    assert_eq!(
        (c.sse.as_deref(), c.sse_key_id.as_deref()),
        (Some("aws:kms"), Some("key1"))
    );
    assert_eq!(mount_error(&["--sse=DES"]), r#"unknown sse type "DES""#);
    assert_eq!(
        mount_error(&["--sse=aws:kms"]),
        r#""--sse-key-id" flag is required when "--sse" flag is used"#
    );
    assert_eq!(
        mount_error(&["--sse-key-id=key1"]),
        r#""--sse-key-id" is only used with "--sse=aws:kms""#
    );
}

#[test]
fn file_names_and_mode() {
    let c = mount(&["--filename=disk.img", "--statsFilename=", "--fileMode=0644"]);
    assert_eq!(c.filename, "disk.img");
    assert_eq!(c.stats_filename, None);
    assert_eq!(c.file_mode, 0o644);
    assert_eq!(mount(&["--readOnly", "--fileMode=640"]).file_mode, 0o640);
    assert_eq!(
        mount_error(&["--filename=a/b"]),
        r#"invalid "--filename" value "a/b": must be a file name without '/'"#
    );
    assert_eq!(
        mount_error(&["--filename="]),
        r#"invalid "--filename" value "": must be a file name without '/'"#
    );
    assert_eq!(
        mount_error(&["--statsFilename=.."]),
        r#"invalid "--statsFilename" value "..": must be a file name without '/'"#
    );
    assert_eq!(
        mount_error(&["--filename=x", "--statsFilename=x"]),
        r#""--filename" and "--statsFilename" are both "x""#
    );
    assert_eq!(
        mount_error(&["--fileMode=0689"]),
        r#"invalid "--fileMode" value "0689": expected octal permissions like 0644"#
    );
    assert!(mount_error(&["--fileMode=17777"]).contains("17777"));
}

#[test]
fn numeric_ranges_and_timing_rules() {
    assert!(mount_error(&["--timeout=0"]).contains("--timeout"));
    assert!(mount_error(&["--listBlocksThreads=0"]).contains("--listBlocksThreads"));
    assert!(mount_error(&["--blockCacheThreads=abc"]).contains("abc"));
    assert_eq!(
        mount_error(&["--initialRetryPause=500", "--maxRetryPause=100"]),
        r#""--maxRetryPause" must not be smaller than "--initialRetryPause""#
    );
    assert_eq!(
        mount_error(&["--blockCacheSync"]),
        r#""--blockCacheSync" requires "--blockCacheWriteDelay=0""#
    );
    assert!(mount(&["--blockCacheSync", "--blockCacheWriteDelay=0"]).block_cache_sync);
    let c = mount(&[
        "--blockCacheTimeout=5000",
        "--blockCacheMaxDirty=10",
        "--readAheadTrigger=3",
    ]);
    assert_eq!(c.block_cache_timeout, Duration::from_millis(5000));
    assert_eq!((c.block_cache_max_dirty, c.read_ahead_trigger), (10, 3));
}

#[test]
fn shared_disk_mode_forbids_cache_flags() {
    let c = mount(&["--sharedDiskMode"]);
    assert!(c.shared_disk_mode && c.direct_io);
    assert_eq!(c.block_cache_size, 0);
    for flag in SHARED_DISK_CONFLICTS {
        let value = if [
            "listBlocks",
            "blockCacheSync",
            "blockCacheRecoverDirtyBlocks",
            "blockCacheNoVerify",
            "blockCacheFileAdvise",
        ]
        .contains(flag)
        {
            format!("--{flag}")
        } else if flag.ends_with("Threads") {
            format!("--{flag}=1")
        } else if *flag == "blockCacheFile" {
            format!("--{flag}=/tmp/cache")
        } else {
            format!("--{flag}=0")
        };
        assert_eq!(
            mount_error(&["--sharedDiskMode", &value]),
            format!(r#"in "sharedDiskMode" the flag "{flag}" must not be used"#),
        );
    }
}

#[test]
fn not_yet_supported_features_fail_when_turned_on() {
    for (flag, args) in [
        ("maxUploadSpeed", &["--maxUploadSpeed=10m"][..]),
        ("maxDownloadSpeed", &["--maxDownloadSpeed=10m"]),
        ("ipTOS", &["--ipTOS=lowdelay"]),
        ("test-errors", &["--test-errors"]),
        ("test-delays", &["--test-delays"]),
        ("test-discard", &["--test-discard"]),
    ] {
        assert_eq!(
            mount_error(args),
            format!(r#""--{flag}" is not supported yet"#)
        );
    }
}

#[test]
fn not_yet_supported_features_accept_off_values() {
    let c = mount(&[
        "--blockCacheSize=0",
        "--readAhead=0",
        "--md5CacheSize=0",
        "--md5CacheTime=0",
        "--minWriteDelay=0",
        "--blockCacheThreads=4",
    ]);
    assert_eq!(
        (c.block_cache_size, c.read_ahead, c.md5_cache_size),
        (0, 0, 0)
    );
    assert_eq!(c.block_cache_threads, 4);
}

#[test]
fn nbd_mode_takes_a_device_or_a_socket() {
    let c = config(&["--nbd", "bucket", "/dev/nbd0"]);
    assert_eq!(c.mode, Mode::Nbd);
    assert_eq!(c.nbd_device.as_deref(), Some(Path::new("/dev/nbd0")));
    assert_eq!(c.mount_point, None);
    assert_eq!(c.nbd_name, "s3backer");

    let c = config(&["--nbd-socket=/run/s.sock", "--nbd-listen=10809", "bucket"]);
    assert_eq!(c.mode, Mode::Nbd, "socket flags imply --nbd");
    assert_eq!(c.nbd_device, None);
    assert_eq!(c.nbd_socket.as_deref(), Some(Path::new("/run/s.sock")));
    assert_eq!(c.nbd_listen, Some("127.0.0.1:10809".parse().unwrap()));
    assert_eq!(
        config(&["--nbd-listen=[::1]:99", "bucket"]).nbd_listen,
        Some("[::1]:99".parse().unwrap())
    );

    let message = error(&["--nbd", "bucket"]);
    assert!(message.starts_with("no NBD device specified"), "{message}");
    assert!(message.contains("--nbd-socket=PATH"), "{message}");
    assert_eq!(
        error(&["--nbd-listen=nowhere:port", "bucket"]),
        r#"invalid "--nbd-listen" address "nowhere:port""#
    );
    assert_eq!(
        error(&["--nbd", "--erase", "bucket"]),
        r#""--nbd" cannot be combined with "--erase", "--reset-mounted-flag" or "--verify""#
    );
}

#[test]
fn nbd_mode_turns_read_ahead_off_unless_asked_and_ignores_nbdkit_arguments() {
    let c = config(&[
        "--nbd",
        "--nbd-flag=--verbose",
        "--nbd-param=x=1",
        "bucket",
        "/dev/nbd0",
    ]);
    assert_eq!((c.read_ahead, c.read_ahead_trigger), (0, 0));
    assert_eq!(c.nbd_ignored, ["--verbose", "x=1"]);
    let c = config(&["--nbd", "--readAhead=8", "bucket", "/dev/nbd0"]);
    assert_eq!((c.read_ahead, c.read_ahead_trigger), (8, 0));
    let c = mount(&[]);
    assert_eq!((c.read_ahead, c.read_ahead_trigger), (4, 2));
}

/// Every flag of spec table 8.2.
const SPEC_FLAGS: &[&str] = &[
    "accessFile",
    "accessId",
    "accessKey",
    "accessKeyEnv",
    "accessType",
    "accessEC2IAM",
    "accessEC2IAM-IMDSv2",
    "authVersion",
    "baseURL",
    "region",
    "vhost",
    "no-vhost",
    "ssl",
    "cacert",
    "insecure",
    "http11",
    "noCurlCache",
    "ipTOS",
    "timeout",
    "initialRetryPause",
    "maxRetryPause",
    "maxUploadSpeed",
    "maxDownloadSpeed",
    "storageClass",
    "sse",
    "sse-key-id",
    "prefix",
    "blockHashPrefix",
    "blockSize",
    "size",
    "noAutoDetect",
    "force",
    "compress",
    "compress-level",
    "encrypt",
    "password",
    "passwordFile",
    "keyLength",
    "defaultContentEncoding",
    "readOnly",
    "filename",
    "statsFilename",
    "statsFileMirror",
    "statsFileMirrorInterval",
    "fileMode",
    "directIO",
    "blockCacheSize",
    "blockCacheThreads",
    "blockCacheWriteDelay",
    "blockCacheTimeout",
    "blockCacheMaxDirty",
    "blockCacheSync",
    "blockCacheFile",
    "blockCacheNoVerify",
    "blockCacheRecoverDirtyBlocks",
    "blockCacheNumProtected",
    "blockCacheFileAdvise",
    "readAhead",
    "readAheadTrigger",
    "md5CacheSize",
    "md5CacheTime",
    "minWriteDelay",
    "listBlocks",
    "listBlocksThreads",
    "sharedDiskMode",
    "erase",
    "reset-mounted-flag",
    "debug",
    "debug-http",
    "quiet",
    "test",
    "test-errors",
    "test-delays",
    "test-discard",
    "nbd",
    "nbd-flag",
    "nbd-param",
    "rrs",
    "configFile",
];

#[test]
fn help_mentions_every_flag_and_the_usage_forms() {
    for args in [&["--help"][..], &["-h"], &["-?"], &["bucket", "-o", "help"]] {
        let Ok(Command::Help(text)) = parse(args) else {
            panic!("{args:?} should ask for help");
        };
        for flag in SPEC_FLAGS {
            let shown = format!("--{flag}");
            let found = text.match_indices(&shown).any(|(at, _)| {
                !text[at + shown.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '-')
            });
            assert!(found, "help lacks {shown}");
        }
        for form in [
            "BUCKET[/SUBDIR] MOUNTPOINT",
            "--test",
            "--erase",
            "--reset-mounted-flag",
        ] {
            assert!(text.contains(form), "help lacks usage form {form}");
        }
        assert!(text.contains("[default: 1000]"), "defaults are shown");
    }
}

#[test]
fn every_spec_flag_is_a_known_flag() {
    let mut command = Flags::command();
    command.build();
    let kinds = long_flag_value_kinds(&command);
    for flag in SPEC_FLAGS {
        assert!(kinds.contains_key(*flag), "--{flag} is not defined");
    }
}

#[test]
fn version_line() {
    for flag in ["--version", "-v"] {
        let Ok(Command::Version(text)) = parse(&[flag]) else {
            panic!("{flag} should print the version");
        };
        let first = text.lines().next().unwrap();
        assert!(
            first.starts_with(&format!("s3backer version {} (", env!("CARGO_PKG_VERSION"))),
            "{first}"
        );
    }
}

#[test]
fn non_utf8_arguments_are_rejected() {
    use std::os::unix::ffi::OsStringExt;
    let bad = OsString::from_vec(vec![b'b', 0xff]);
    let err = parse_args(vec![bad, OsString::from("/mnt")]).unwrap_err();
    assert!(err.to_string().contains("not valid UTF-8"), "{err}");
}

#[test]
fn parse_size_is_exact() {
    assert_eq!(parse_size("1", "size").unwrap(), 1);
    assert_eq!(parse_size("4k", "size").unwrap(), 4096);
    assert_eq!(parse_size("4KB", "size").unwrap(), 4096);
    assert_eq!(parse_size("15e", "size").unwrap(), 15 << 60);
    assert!(parse_size("1 k", "size").is_err());
    assert!(parse_size("-1", "size").is_err());
    assert!(parse_size("1kk", "size").is_err());
}

#[test]
fn block_cache_and_read_ahead_flags_are_taken() {
    let c = mount(&[
        "--blockCacheSize=500",
        "--readAhead=8",
        "--readAheadMax=64",
        "--blockCacheWriteDelay=0",
    ]);
    assert_eq!(c.block_cache_size, 500);
    assert_eq!(c.read_ahead, 8);
    assert_eq!(c.read_ahead_max, 64);
    assert_eq!(c.block_cache_write_delay, std::time::Duration::ZERO);
}

#[test]
fn md5_cache_flags_parse_and_are_checked_per_spec_6_5() {
    let c = mount(&[
        "--md5CacheSize=100",
        "--md5CacheTime=2000",
        "-o",
        "minWriteDelay=500",
        "--statsFileMirror=/tmp/s",
    ]);
    assert_eq!(c.md5_cache_size, 100);
    assert_eq!(c.md5_cache_time, Duration::from_millis(2000));
    assert_eq!(c.min_write_delay, Duration::from_millis(500));
    assert_eq!(
        c.stats_file_mirror.as_deref(),
        Some(std::path::Path::new("/tmp/s"))
    );
    assert_eq!(
        mount_error(&["--minWriteDelay=10"]),
        r#""--minWriteDelay" requires "--md5CacheSize" > 0"#
    );
    assert_eq!(
        mount_error(&["--md5CacheTime=10"]),
        r#""--md5CacheTime" requires "--md5CacheSize" > 0"#
    );
    assert_eq!(
        mount_error(&[
            "--md5CacheSize=5",
            "--md5CacheTime=10",
            "--minWriteDelay=20"
        ]),
        r#""--md5CacheTime" must not be smaller than "--minWriteDelay""#
    );
    assert_eq!(mount(&["--md5CacheSize=5", "--readOnly"]).md5_cache_size, 0);
}

#[test]
fn prometheus_listener_is_off_by_default_and_loopback_only() {
    assert_eq!(mount(&[]).prometheus_listen, None);
    let c = mount(&["--prometheusListen=127.0.0.1:9464"]);
    assert_eq!(c.prometheus_listen, Some("127.0.0.1:9464".parse().unwrap()));
    let c = mount(&["-o", "prometheusListen=[::1]:0"]);
    assert_eq!(c.prometheus_listen, Some("[::1]:0".parse().unwrap()));
    assert!(mount_error(&["--prometheusListen=0.0.0.0:9464"]).contains("loopback"));
    assert!(mount_error(&["--prometheusListen=localhost"]).contains("ADDR:PORT"));
}
