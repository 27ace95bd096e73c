//! Start-up logic shared by every frontend: settling the disk geometry (spec 1.5) and holding
//! the mount token (spec 5.2). Errors are the user-facing messages of the C program.

use std::sync::Arc;

use tracing::{info, warn};

use crate::geometry::{Geometry, format_size};
use crate::store::{SHARED_DISK_TOKEN, Volume};

/// Block size when neither the flags nor block 0 say otherwise.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;

/// What the user asked for on the command line.
#[derive(Copy, Clone, Debug, Default)]
pub struct SizeRequest {
    pub block_size: Option<u32>,
    pub size: Option<u64>,
    pub force: bool,
    pub no_auto_detect: bool,
    /// Test mode stores no metadata: detection is skipped.
    pub test_mode: bool,
    pub quiet: bool,
}

/// Combines the flags with the size metadata of block 0.
pub fn resolve_geometry(volume: &dyn Volume, req: SizeRequest) -> Result<Geometry, String> {
    let skip = req.no_auto_detect || req.test_mode;
    let detected = if skip {
        None
    } else {
        if !req.quiet {
            info!("auto-detecting block size and total file size...");
        }
        volume
            .detect_size()
            .map_err(|e| format!("can't read data store meta-data: {e}"))?
    };
    let (block_size, size) = match detected {
        Some(meta) => {
            if !req.quiet {
                info!(
                    "auto-detected block size={} and total size={}",
                    format_size(meta.block_size.into()),
                    format_size(meta.file_size)
                );
            }
            let block_size = settle(
                "block size",
                req.block_size.map(u64::from),
                meta.block_size.into(),
                req.force,
            )?;
            let size = settle("file size", req.size, meta.file_size, req.force)?;
            (block_size as u32, size)
        }
        None => {
            let word = if skip { "disabled" } else { "failed" };
            let size = req.size.ok_or_else(|| {
                format!("auto-detection of filesystem size {word}; please specify \"--size\"")
            })?;
            let block_size = req.block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
            if !skip && !req.quiet {
                info!(
                    "auto-detection failed; using {} block size {} and file size {}",
                    if req.block_size.is_some() {
                        "configured"
                    } else {
                        "default"
                    },
                    format_size(block_size.into()),
                    format_size(size)
                );
            }
            (block_size, size)
        }
    };
    Geometry::new(size, block_size).map_err(|e| e.to_string())
}

/// The configured value wins over the detected one only with `--force`.
fn settle(what: &str, configured: Option<u64>, detected: u64, force: bool) -> Result<u64, String> {
    let Some(configured) = configured.filter(|&c| c != detected) else {
        return Ok(detected);
    };
    // C s3backer <= 1.6.0 wrote the file size header with a 32-bit multiply (spec 10).
    let hint = if what == "file size" && configured % (1 << 32) == detected {
        " (the stored size looks truncated to 32 bits by an old s3backer: use --force)"
    } else {
        ""
    };
    let msg = format!(
        "configured {what} {} != filesystem {what} {}{hint}",
        format_size(configured),
        format_size(detected)
    );
    if force {
        warn!("{msg}; using the configured value because of \"--force\"");
        Ok(configured)
    } else {
        Err(msg)
    }
}

#[derive(Copy, Clone, Debug, Default)]
pub struct MountTokenOptions {
    pub force: bool,
    pub shared_disk: bool,
    pub read_only: bool,
}

/// Proof that this process holds the bucket's mount token; release it after the final flush.
pub struct MountGuard {
    volume: Arc<dyn Volume>,
    /// The token we wrote; `None` when read-only (nothing written).
    token: Option<u32>,
    shared_disk: bool,
}

impl MountGuard {
    pub fn acquire(volume: Arc<dyn Volume>, opts: MountTokenOptions) -> Result<MountGuard, String> {
        let desc = volume.description();
        let existing = volume
            .read_mount_token()
            .map_err(|e| format!("can't read the mount token of {desc}: {e}"))?;
        if let Some(theirs) = existing {
            let shared_ok = opts.shared_disk && theirs == SHARED_DISK_TOKEN;
            if !shared_ok {
                let what = if theirs == SHARED_DISK_TOKEN {
                    format!("{desc} appears to be configured for shared disk mode")
                } else {
                    format!(
                        "{desc} appears to be already mounted (using mount token 0x{theirs:08x})"
                    )
                };
                if !opts.force {
                    tracing::error!("{what}");
                    return Err(
                        "reset mount token with \"--reset-mounted-flag\", or use \"--force\" to override"
                            .to_string(),
                    );
                }
                warn!("{what}; continuing because of \"--force\"");
            }
        }
        if opts.read_only {
            return Ok(MountGuard {
                volume,
                token: None,
                shared_disk: opts.shared_disk,
            });
        }
        let token = if opts.shared_disk {
            SHARED_DISK_TOKEN
        } else {
            rand::random_range(1..SHARED_DISK_TOKEN)
        };
        let write_error = |e| format!("can't write the mount token of {desc}: {e}");
        if existing.is_none() {
            if !volume.create_mount_token(token).map_err(write_error)? {
                return Err(format!(
                    "{desc} appears to be mounted by another s3backer process (it created a mount token just now)"
                ));
            }
        } else {
            volume.write_mount_token(Some(token)).map_err(write_error)?;
        }
        if opts.shared_disk {
            info!("established new mount token for shared disk mode");
        } else {
            info!("established new mount token 0x{token:08x}");
        }
        Ok(MountGuard {
            volume,
            token: Some(token),
            shared_disk: opts.shared_disk,
        })
    }

    /// Deletes our token (not in read-only or shared-disk mode, and never someone else's).
    pub fn release(self) -> Result<(), String> {
        let Some(ours) = self.token else {
            return Ok(());
        };
        if self.shared_disk {
            return Ok(());
        }
        let desc = self.volume.description();
        match self.volume.read_mount_token() {
            Ok(Some(current)) if current != ours => {
                warn!(
                    "mount token of {desc} changed to 0x{current:08x} (ours was 0x{ours:08x}); leaving it in place"
                );
                Ok(())
            }
            Ok(None) => Ok(()),
            _ => self
                .volume
                .write_mount_token(None)
                .map_err(|e| format!("can't clear the mount token of {desc}: {e}")),
        }
    }

    pub fn token(&self) -> Option<u32> {
        self.token
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryBackend;
    use crate::error::Result;
    use crate::store::SizeMeta;

    /// A volume with size metadata, as S3 block 0 would carry.
    struct Sized(Option<SizeMeta>, MemoryBackend);
    impl Volume for Sized {
        fn description(&self) -> String {
            "memory://sized/".into()
        }
        fn detect_size(&self) -> Result<Option<SizeMeta>> {
            Ok(self.0)
        }
        fn read_mount_token(&self) -> Result<Option<u32>> {
            self.1.read_mount_token()
        }
        fn write_mount_token(&self, token: Option<u32>) -> Result<()> {
            self.1.write_mount_token(token)
        }
    }

    fn sized(block_size: u32, file_size: u64) -> Sized {
        Sized(
            Some(SizeMeta {
                block_size,
                file_size,
            }),
            MemoryBackend::new(Geometry::new(4096, 4096).unwrap()),
        )
    }

    fn unsized_volume() -> Sized {
        Sized(None, MemoryBackend::new(Geometry::new(4096, 4096).unwrap()))
    }

    #[test]
    fn detected_size_fills_missing_flags() {
        let g = resolve_geometry(&sized(65536, 1 << 30), SizeRequest::default()).unwrap();
        assert_eq!((g.block_size(), g.file_size()), (65536, 1 << 30));
    }

    #[test]
    fn mismatch_is_fatal_without_force_and_configured_wins_with_it() {
        let vol = sized(65536, 1 << 30);
        let req = SizeRequest {
            block_size: Some(4096),
            ..Default::default()
        };
        assert_eq!(
            resolve_geometry(&vol, req).unwrap_err(),
            "configured block size 4k != filesystem block size 64k"
        );
        let req = SizeRequest {
            size: Some(2 << 30),
            ..Default::default()
        };
        assert_eq!(
            resolve_geometry(&vol, req).unwrap_err(),
            "configured file size 2g != filesystem file size 1g"
        );
        let forced = SizeRequest {
            size: Some(2 << 30),
            force: true,
            ..Default::default()
        };
        assert_eq!(resolve_geometry(&vol, forced).unwrap().file_size(), 2 << 30);
    }

    #[test]
    fn truncated_32_bit_size_header_is_explained() {
        let vol = sized(4096, 4096);
        let req = SizeRequest {
            size: Some((4 << 30) + 4096),
            ..Default::default()
        };
        assert!(
            resolve_geometry(&vol, req)
                .unwrap_err()
                .contains("truncated to 32 bits")
        );
    }

    #[test]
    fn missing_metadata_needs_size_and_defaults_block_size() {
        assert_eq!(
            resolve_geometry(&unsized_volume(), SizeRequest::default()).unwrap_err(),
            "auto-detection of filesystem size failed; please specify \"--size\""
        );
        let disabled = SizeRequest {
            no_auto_detect: true,
            ..Default::default()
        };
        assert_eq!(
            resolve_geometry(&sized(4096, 1 << 20), disabled).unwrap_err(),
            "auto-detection of filesystem size disabled; please specify \"--size\""
        );
        let req = SizeRequest {
            size: Some(1 << 20),
            ..Default::default()
        };
        assert_eq!(
            resolve_geometry(&unsized_volume(), req)
                .unwrap()
                .block_size(),
            4096
        );
        let bad = SizeRequest {
            size: Some(1 << 20),
            block_size: Some(3000),
            ..Default::default()
        };
        assert_eq!(
            resolve_geometry(&unsized_volume(), bad).unwrap_err(),
            "block size must be a power of 2"
        );
    }

    #[test]
    fn second_mount_is_refused_then_forced_and_tokens_released() {
        let vol: Arc<dyn Volume> = Arc::new(unsized_volume());
        let first = MountGuard::acquire(vol.clone(), MountTokenOptions::default()).unwrap();
        let ours = first.token().unwrap();
        assert!(ours != 0 && ours < SHARED_DISK_TOKEN);
        assert_eq!(vol.read_mount_token().unwrap(), Some(ours));
        let err = MountGuard::acquire(vol.clone(), MountTokenOptions::default())
            .err()
            .unwrap();
        assert!(err.contains("--reset-mounted-flag"), "{err}");
        let forced = MountGuard::acquire(
            vol.clone(),
            MountTokenOptions {
                force: true,
                ..Default::default()
            },
        )
        .unwrap();
        // The first holder no longer owns the token: it must not delete the second's.
        first.release().unwrap();
        assert_eq!(vol.read_mount_token().unwrap(), forced.token());
        forced.release().unwrap();
        assert_eq!(vol.read_mount_token().unwrap(), None);
    }

    #[test]
    fn read_only_never_writes_and_shared_disk_shares() {
        let vol: Arc<dyn Volume> = Arc::new(unsized_volume());
        let ro = MountGuard::acquire(
            vol.clone(),
            MountTokenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(vol.read_mount_token().unwrap(), None);
        ro.release().unwrap();

        let shared = MountTokenOptions {
            shared_disk: true,
            ..Default::default()
        };
        let a = MountGuard::acquire(vol.clone(), shared).unwrap();
        let b = MountGuard::acquire(vol.clone(), shared).unwrap();
        assert_eq!(vol.read_mount_token().unwrap(), Some(SHARED_DISK_TOKEN));
        let err = MountGuard::acquire(vol.clone(), MountTokenOptions::default())
            .err()
            .unwrap();
        assert!(err.contains("--force"));
        a.release().unwrap();
        b.release().unwrap();
        assert_eq!(
            vol.read_mount_token().unwrap(),
            Some(SHARED_DISK_TOKEN),
            "left in place"
        );
    }

    #[test]
    fn lost_create_race_is_refused() {
        struct Racy(MemoryBackend);
        impl Volume for Racy {
            fn description(&self) -> String {
                "racy".into()
            }
            fn detect_size(&self) -> Result<Option<SizeMeta>> {
                Ok(None)
            }
            fn read_mount_token(&self) -> Result<Option<u32>> {
                Ok(None)
            }
            fn write_mount_token(&self, t: Option<u32>) -> Result<()> {
                self.0.write_mount_token(t)
            }
            fn create_mount_token(&self, _token: u32) -> Result<bool> {
                Ok(false)
            }
        }
        let vol: Arc<dyn Volume> =
            Arc::new(Racy(MemoryBackend::new(Geometry::new(4096, 4096).unwrap())));
        let err = MountGuard::acquire(vol, MountTokenOptions::default())
            .err()
            .unwrap();
        assert!(err.contains("mounted by another s3backer process"), "{err}");
    }
}
