//! Shared fixtures of the integration tests: a local S3 server (s3s-fs) on a random loopback
//! port with its own temp data dir, stopped by PID and removed on drop.

#![allow(dead_code)]

pub mod moto;
pub mod mount;
pub mod nbd;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "testkey";
pub const SECRET_KEY: &str = "testsecret";

/// Where scripts/install-deps.sh installs the s3s-fs binary.
pub fn s3s_fs_binary() -> PathBuf {
    let home = std::env::var_os("HOME").expect("HOME is set");
    let path = Path::new(&home).join(".cache/s3backer-rs/s3s-fs/bin/s3s-fs");
    assert!(
        path.exists(),
        "the S3 test server is missing at {}: run scripts/install-deps.sh",
        path.display()
    );
    path
}

/// A running s3s-fs; buckets are directories under `data_dir()`.
pub struct S3Server {
    child: Option<Child>,
    port: u16,
    temp: tempfile::TempDir,
}

impl S3Server {
    /// Starts a server with the given buckets (created as directories before the start).
    pub fn start(buckets: &[&str]) -> S3Server {
        let temp = tempfile::tempdir().expect("temp dir");
        let data = temp.path().join("data");
        std::fs::create_dir(&data).unwrap();
        for bucket in buckets {
            std::fs::create_dir(data.join(bucket)).unwrap();
        }
        let mut server = S3Server {
            child: None,
            port: 0,
            temp,
        };
        // A free port can be taken by someone else before the server binds it: try a few.
        for _ in 0..5 {
            if server.try_start() {
                return server;
            }
        }
        panic!("s3s-fs did not start; see {}", server.log_path().display());
    }

    fn try_start(&mut self) -> bool {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let log = std::fs::File::create(self.log_path()).unwrap();
        let child = Command::new(s3s_fs_binary())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(self.data_dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn s3s-fs");
        self.child = Some(child);
        self.port = port;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return true;
            }
            if let Ok(Some(_)) = self.child.as_mut().unwrap().try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        false
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT/`, the `--baseURL` of the server.
    pub fn base_url(&self) -> String {
        format!("http://{}/", self.endpoint())
    }

    /// The flags that point s3backer at this server (short timeouts), then `extra`.
    pub fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut args = vec![
            format!("--baseURL={}", self.base_url()),
            format!("--accessId={ACCESS_KEY}"),
            format!("--accessKey={SECRET_KEY}"),
            "--timeout=10".to_string(),
            "--maxRetryPause=5000".to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    pub fn data_dir(&self) -> PathBuf {
        self.temp.path().join("data")
    }

    pub fn bucket_dir(&self, bucket: &str) -> PathBuf {
        self.data_dir().join(bucket)
    }

    /// s3s-fs keeps an object's bytes as a plain file...
    pub fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.bucket_dir(bucket).join(key)
    }

    /// ...its headers (Content-Encoding, user metadata) in a JSON sidecar...
    pub fn object_metadata_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.sidecar(bucket, key, "metadata")
    }

    /// ...and its ETag (MD5) in another; without it the server computes the MD5 of the bytes.
    pub fn object_internal_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.sidecar(bucket, key, "internal")
    }

    fn sidecar(&self, bucket: &str, key: &str, kind: &str) -> PathBuf {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        self.data_dir().join(format!(
            ".bucket-{}.object-{}.{kind}.json",
            b64(bucket),
            b64(key)
        ))
    }

    /// s3s-fs renames a PUT's (complete) body into place before it writes the ETag sidecar,
    /// and drops the request when the client dies in between: the object then holds new bytes
    /// under the old ETag, which s3backer rightly refuses. S3 applies a PUT atomically, so after
    /// a test kills a client this finishes such PUTs the way S3 would (the server then computes
    /// the ETag from the bytes). Returns how many objects of `bucket` were torn.
    pub fn complete_torn_puts(&self, bucket: &str) -> usize {
        use md5::Digest;
        let mut torn = 0;
        for entry in std::fs::read_dir(self.bucket_dir(bucket)).unwrap() {
            let entry = entry.unwrap();
            let key = entry.file_name().to_string_lossy().into_owned();
            let Ok(body) = std::fs::read(entry.path()) else {
                continue;
            };
            let internal = self.object_internal_path(bucket, &key);
            let Ok(info) = std::fs::read_to_string(&internal) else {
                continue;
            };
            let md5 = hex::encode(md5::Md5::digest(&body));
            if !info.contains(&format!("\"e_tag\":\"{md5}\"")) {
                std::fs::remove_file(&internal).unwrap();
                torn += 1;
            }
        }
        torn
    }

    pub fn log_path(&self) -> PathBuf {
        self.temp.path().join("s3s-fs.log")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server (by its PID); the data dir stays until drop.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
