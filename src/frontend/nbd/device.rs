//! `s3backer --nbd BUCKET /dev/nbdX` (spec 8.4): serve on a Unix socket and let `nbd-client`
//! attach the kernel device to it; detach on the way out. Where the device or nbd-client is
//! missing, the error names the socket flags users can serve with instead.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{Error, Result};

/// Where C s3backer puts the sockets it hands to nbd-client.
const SOCKET_DIR: &str = "/run/s3backer-nbd";

/// The block size nbd-client gives the kernel, as C s3backer does.
const KERNEL_BLOCK_SIZE: &str = "4096";

const SERVE_WITHOUT_DEVICE: &str = "to serve without a device, use \"--nbd-socket=PATH\" or \"--nbd-listen=[HOST:]PORT\" \
     and connect any NBD client (nbdfuse, qemu, nbd-client) to it";

/// Checks that `device` can be attached, loading the nbd module when it is missing.
pub fn check_device(device: &Path) -> std::result::Result<(), String> {
    if !device.exists() {
        // Like C: one attempt to load the driver; its failure is reported below.
        let _ = Command::new("modprobe")
            .arg("nbd")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    if !device.exists() {
        return Err(format!(
            "NBD device {} does not exist (is the nbd kernel module loaded?); {SERVE_WITHOUT_DEVICE}",
            device.display()
        ));
    }
    if find_in_path("nbd-client").is_none() {
        return Err(format!(
            "nbd-client not found in PATH (Debian package nbd-client); {SERVE_WITHOUT_DEVICE}"
        ));
    }
    Ok(())
}

/// The socket for `device`: `/run/s3backer-nbd/<st_dev>_<st_ino>` in 16 hex digits each (spec 8.4).
pub fn socket_for(device: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata(device)
        .map_err(|err| Error::io(format!("cannot stat {}", device.display()), err))?;
    std::fs::create_dir_all(SOCKET_DIR)
        .map_err(|err| Error::io(format!("cannot create {SOCKET_DIR}"), err))?;
    Ok(Path::new(SOCKET_DIR).join(format!("{:016x}_{:016x}", meta.dev(), meta.ino())))
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|path| path.is_file())
}

/// An attached `nbd-client -nofork`: ends the server when it exits, and is detached with
/// `nbd-client -d` when the server is asked to stop.
pub struct Attachment {
    watcher: Option<JoinHandle<()>>,
}

impl Attachment {
    /// Starts nbd-client on `socket` for `device`. `stop_requested` (set by signals) makes
    /// it detach; `stop_server` is set once nbd-client is gone.
    pub fn start(
        device: &Path,
        socket: &Path,
        read_only: bool,
        stop_requested: Arc<AtomicBool>,
        stop_server: Arc<AtomicBool>,
    ) -> Result<Attachment> {
        let mut command = Command::new("nbd-client");
        command
            .arg("-unix")
            .arg(socket)
            .args(["-block-size", KERNEL_BLOCK_SIZE, "-nofork"]);
        if read_only {
            command.arg("-readonly");
        }
        command.arg(device).stdin(Stdio::null());
        let child = command
            .spawn()
            .map_err(|err| Error::io("cannot run nbd-client", err))?;
        tracing::info!(
            "attached {} to {} with nbd-client (pid {})",
            device.display(),
            socket.display(),
            child.id()
        );
        let device = device.to_path_buf();
        let watcher = std::thread::Builder::new()
            .name("nbd-client".into())
            .spawn(move || watch(child, &device, &stop_requested, &stop_server))
            .map_err(|err| Error::io("cannot start nbd-client watcher", err))?;
        Ok(Attachment {
            watcher: Some(watcher),
        })
    }

    /// Waits until nbd-client is gone.
    pub fn join(mut self) {
        if let Some(watcher) = self.watcher.take() {
            let _ = watcher.join();
        }
    }
}

fn watch(mut child: Child, device: &Path, stop_requested: &AtomicBool, stop_server: &AtomicBool) {
    let mut detach_sent = false;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                if !status.success() && !detach_sent {
                    tracing::error!("nbd-client for {} exited: {status}", device.display());
                }
                break;
            }
            Ok(None) => {}
            Err(err) => {
                tracing::error!("cannot wait for nbd-client: {err}");
                break;
            }
        }
        if stop_requested.load(Ordering::SeqCst) && !detach_sent {
            // Detaching makes the kernel flush, then nbd-client exits and the server stops.
            tracing::info!("detaching {}", device.display());
            let _ = Command::new("nbd-client")
                .arg("-d")
                .arg(device)
                .stdin(Stdio::null())
                .status();
            detach_sent = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stop_server.store(true, Ordering::SeqCst);
}
