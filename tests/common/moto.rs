//! moto's S3 server (installed by scripts/install-deps.sh) on a random loopback port, killed
//! on drop. Unlike s3s-fs it applies conditional PUTs atomically and answers conditional GETs
//! (304, 412). It does not check signatures: use s3s-fs for everything else.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::mount::run;

pub struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    /// Starts the server with one empty bucket.
    pub fn start(bucket: &str) -> Moto {
        let root = std::path::Path::new(&std::env::var_os("HOME").unwrap())
            .join(".cache/s3backer-rs/moto/bin");
        assert!(
            root.join("moto_server").exists(),
            "moto is missing: run scripts/install-deps.sh"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let child = Command::new(root.join("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let moto = Moto { child, port };
        let create = format!(
            "import boto3; boto3.client('s3', endpoint_url='http://127.0.0.1:{port}', \
             aws_access_key_id='testkey', aws_secret_access_key='testsecret', \
             region_name='us-east-1').create_bucket(Bucket='{bucket}')"
        );
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                run(Command::new(root.join("python3")).args(["-c", &create]));
                return moto;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("moto_server did not start on port {port}");
    }

    /// s3backer flags for this server, then `extra`.
    pub fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut args = vec![
            format!("--baseURL=http://127.0.0.1:{}/", self.port),
            "--accessId=testkey".to_string(),
            "--accessKey=testsecret".to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
