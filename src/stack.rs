//! Builds the block stack from a `Config` and runs the chosen mode on it. Every frontend goes
//! through here, so start-up checks, the mount token and the final flush exist once.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::admin;
use crate::backend::dir::DirBackend;
use crate::backend::s3::{CredentialFlags, S3Backend, S3Client, S3Options};
use crate::config::Config;
use crate::daemon::Readiness;
use crate::frontend::fuse::{self, FuseOptions};
use crate::frontend::nbd::{self, NbdOptions, device as nbd_device};
use crate::geometry::Geometry;
use crate::layer::block_cache::cache_file;
use crate::layer::block_cache::{BlockCache, BlockCacheOptions, CacheFileOptions};
use crate::layer::codec::{Codec, CodecConfig, Encryption};
use crate::layer::ec_protect::{EcProtect, EcProtectOptions};
use crate::layer::zero_cache::{KnownZero, ZeroCache, ZeroReads};
use crate::metrics::MetricsServer;
use crate::naming::Naming;
use crate::stats::StatsMirror;
use crate::store::{BlockStore, Volume};
use crate::volume::{self, MountGuard, MountTokenOptions, SizeRequest};

/// The backend with its geometry settled, ready for layers.
pub struct Stack {
    volume: Arc<dyn Volume>,
    backend: Arc<dyn BlockStore>,
    geometry: Geometry,
}

/// The bucket's metadata side (size headers, mount token), usable before the geometry is known.
enum Place {
    S3(Arc<S3Client>),
    Dir(PathBuf),
}

impl Place {
    fn open(config: &Config) -> Result<Place, String> {
        if config.test_mode {
            return Ok(Place::Dir(PathBuf::from(&config.bucket)));
        }
        let client =
            S3Client::new(s3_options(config, naming(config))).map_err(|e| e.to_string())?;
        Ok(Place::S3(Arc::new(client)))
    }

    fn volume(&self, config: &Config) -> Arc<dyn Volume> {
        match self {
            Place::S3(client) => client.clone(),
            Place::Dir(dir) => Arc::new(NoMetadata {
                description: format!("file://{}/{}", dir.display(), config.prefix),
            }),
        }
    }
}

fn naming(config: &Config) -> Naming {
    Naming::new(config.prefix.clone(), config.block_hash_prefix)
}

/// `--reset-mounted-flag`: needs neither the disk size nor a password.
pub fn reset_mounted_flag(config: &Config) -> Result<(), String> {
    let volume = Place::open(config)?.volume(config);
    admin::reset::run(volume.as_ref(), config.quiet)?;
    if let Some(path) = &config.block_cache_file {
        cache_file::clear_mount_token(path).map_err(|e| e.to_string())?;
    }
    Ok(())
}

impl Stack {
    /// Connects to the bucket (or directory), detects or checks the disk size, and builds the backend.
    pub fn open(config: &Config, password: Option<String>) -> Result<Stack, String> {
        let request = SizeRequest {
            block_size: config.block_size,
            size: config.size,
            force: config.force,
            no_auto_detect: config.no_auto_detect,
            test_mode: config.test_mode,
            quiet: config.quiet,
        };
        let place = Place::open(config)?;
        let volume = place.volume(config);
        let geometry = volume::resolve_geometry(volume.as_ref(), request)?;
        let backend: Arc<dyn BlockStore> = match place {
            Place::Dir(dir) => {
                Arc::new(DirBackend::new(dir, naming(config), geometry).map_err(|e| e.to_string())?)
            }
            Place::S3(client) => {
                let codec = codec_for(config, password)?;
                Arc::new(S3Backend::new(client, geometry, codec))
            }
        };
        Ok(Stack {
            volume,
            backend,
            geometry,
        })
    }

    pub fn erase(&self, config: &Config) -> Result<(), String> {
        let options = admin::erase::EraseOptions {
            force: config.force,
            quiet: config.quiet,
            list_threads: config.list_blocks_threads as usize,
            delete_threads: 25,
        };
        admin::erase::run(self.backend.as_ref(), self.volume.as_ref(), options)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// `--verify`: reads the backend directly (no cache, no mount token).
    pub fn verify(&self, config: &Config) -> Result<(), String> {
        let desc = self.volume.description();
        let options = admin::verify::VerifyOptions {
            quiet: config.quiet,
            list_threads: config.list_blocks_threads as usize,
            read_threads: VERIFY_THREADS,
        };
        let report = admin::verify::run(self.backend.as_ref(), &desc, options)?;
        let damaged = report.damaged.len();
        if damaged == 0 {
            tracing::info!(
                "verified {} stored blocks of {desc}: all intact",
                report.checked
            );
            return Ok(());
        }
        let list: Vec<String> = report.damaged.iter().map(|(b, _)| b.to_string()).collect();
        Err(format!(
            "verified {} stored blocks of {desc}: {damaged} damaged: {}",
            report.checked,
            list.join(" ")
        ))
    }

    /// Mounts the FUSE file and serves until unmounted.
    pub fn mount(self, config: &Config, readiness: &mut Readiness) -> Result<(), String> {
        let mount_point = config
            .mount_point
            .clone()
            .expect("validated: mount point present");
        // Before the token is claimed: a mount that cannot work must not write to the bucket.
        fuse::check_mount_point(&mount_point).map_err(|e| e.to_string())?;
        let options = FuseOptions {
            mount_point: mount_point.clone(),
            filename: config.filename.clone(),
            stats_filename: config.stats_filename.clone(),
            file_mode: config.file_mode,
            read_only: config.read_only,
            direct_io: config.direct_io,
            fsname: self.volume.description(),
            mount_options: config.fuse_options.clone(),
            threads: if config.single_threaded {
                1
            } else {
                FUSE_THREADS
            },
            debug: config.debug,
        };
        let what = format!("unmount {}", mount_point.display());
        let target = mount_point.display().to_string();
        self.serve(config, readiness, &target, &what, |store, ready| {
            tracing::info!("mounting {}", mount_point.display());
            fuse::serve(store, &options, ready)
        })
    }

    /// Serves the disk over NBD until SIGINT/SIGTERM (or, with a device, until it is detached).
    pub fn serve_nbd(self, config: &Config, readiness: &mut Readiness) -> Result<(), String> {
        for arg in &config.nbd_ignored {
            tracing::warn!("ignoring nbdkit argument \"{arg}\": the NBD server is built in");
        }
        if let Some(addr) = config.nbd_listen.filter(|a| !a.ip().is_loopback()) {
            tracing::warn!(
                "NBD has no authentication: anyone who can reach {addr} can read and write this disk"
            );
        }
        let device = config.nbd_device.clone();
        if let Some(device) = &device {
            nbd_device::check_device(device)?;
        }
        let unix_socket = match (&config.nbd_socket, &device) {
            (Some(path), _) => Some(path.clone()),
            (None, Some(device)) => {
                Some(nbd_device::socket_for(device).map_err(|e| e.to_string())?)
            }
            (None, None) => None,
        };
        let options = NbdOptions {
            unix_socket,
            tcp: config.nbd_listen,
            export_name: config.nbd_name.clone(),
            read_only: config.read_only,
            description: self.volume.description(),
            ..NbdOptions::default()
        };
        let listening = [
            options
                .unix_socket
                .as_ref()
                .map(|p| p.display().to_string()),
            options.tcp.map(|a| format!("nbd://{a}")),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" and ");
        self.serve(
            config,
            readiness,
            &listening,
            "NBD server stop",
            |store, ready| {
                let stop_requested = Arc::new(AtomicBool::new(false));
                nbd::stop_on_signals(&stop_requested)?;
                tracing::info!("serving NBD on {listening}");
                let Some(device) = device else {
                    return nbd::serve(store, &options, ready, stop_requested);
                };
                let socket = options.unix_socket.clone().expect("set for a device");
                let stop_server = Arc::new(AtomicBool::new(false));
                let mut attached = Ok(None);
                let served = nbd::serve(
                    store,
                    &options,
                    || {
                        attached = nbd_device::Attachment::start(
                            &device,
                            &socket,
                            config.read_only,
                            stop_requested.clone(),
                            stop_server.clone(),
                        )
                        .map(Some);
                        match &attached {
                            Ok(_) => ready(),
                            Err(_) => stop_server.store(true, Ordering::SeqCst),
                        }
                    },
                    stop_server.clone(),
                );
                if let Some(attachment) = attached? {
                    attachment.join();
                }
                served
            },
        )
    }

    /// Claims the bucket, builds the layers, runs `frontend` over them until it returns, then
    /// flushes everything and gives the mount token back. `frontend` calls its `ready` argument
    /// once it serves; `what` names the end in messages.
    fn serve(
        self,
        config: &Config,
        readiness: &mut Readiness,
        target: &str,
        what: &str,
        frontend: impl FnOnce(Arc<dyn BlockStore>, &mut dyn FnMut()) -> crate::error::Result<()>,
    ) -> Result<(), String> {
        // Test mode has no token object (like C); everything else claims the bucket first.
        let guard = if config.test_mode {
            None
        } else {
            Some(MountGuard::acquire(
                self.volume.clone(),
                MountTokenOptions {
                    force: config.force || self.resumes_own_crash(config)?,
                    shared_disk: config.shared_disk_mode,
                    read_only: config.read_only,
                },
            )?)
        };
        let token = guard.as_ref().and_then(|g| g.token()).unwrap_or(0);
        let layers = self.layers(config, token).and_then(|store| {
            let metrics = match config.prometheus_listen {
                Some(addr) => Some(MetricsServer::start(store.clone(), addr).map_err(|e| {
                    // Stops the layers' threads; nothing was written yet.
                    let _ = store.shutdown();
                    format!("can't listen on {addr} for metrics: {e}")
                })?),
                None => None,
            };
            Ok((store, metrics))
        });
        let (store, metrics) = match layers {
            Ok(started) => started,
            Err(e) => {
                // Nothing was written: give the bucket back.
                if let Some(guard) = guard {
                    guard.release()?;
                }
                return Err(e);
            }
        };
        tracing::info!(
            "s3backer process {} for {target} started",
            std::process::id()
        );
        let mirror = config
            .stats_file_mirror
            .clone()
            .map(|path| StatsMirror::start(store.clone(), path, config.stats_file_mirror_interval));
        let mut started = false;
        let served = frontend(store.clone(), &mut || {
            started = true;
            readiness.ready();
        });
        drop((mirror, metrics)); // spec 7: stopped first at unmount
        if !started {
            // The frontend never came up (FUSE refused the mount, the NBD socket or device
            // failed): nothing was written through it, so give the bucket back.
            let error = served.err().map(|e| e.to_string()).unwrap_or_default();
            let _ = store.shutdown();
            if let Some(guard) = guard {
                guard.release()?;
            }
            return Err(error);
        }
        let flushed = served.and_then(|()| store.shutdown());
        match flushed {
            Ok(()) => {
                if let Some(guard) = guard {
                    guard.release()?;
                }
                tracing::info!("{what}: completed");
                Ok(())
            }
            Err(e) => Err(format!(
                "{what}: NOT ALL DATA WAS WRITTEN: {e}; the mount token is left in place"
            )),
        }
    }

    /// The layers above the backend for a mount (spec 6.1): zero cache over block cache.
    /// Shared-disk mode caches nothing: other hosts write the same blocks.
    /// Spec 5.2 1(b): the bucket's token is the one in our cache file, so it is left over by
    /// a crashed mount of ours; with `--blockCacheRecoverDirtyBlocks` that is no conflict.
    fn resumes_own_crash(&self, config: &Config) -> Result<bool, String> {
        let Some(path) = &config.block_cache_file else {
            return Ok(false);
        };
        let disk = cache_file::read_mount_token(path).map_err(|e| e.to_string())?;
        let Some(disk) = disk.filter(|&t| t != 0) else {
            return Ok(false);
        };
        let Some(s3) = self.volume.read_mount_token().map_err(|e| e.to_string())? else {
            return Ok(false);
        };
        if disk != s3 {
            tracing::warn!(
                "cache file \"{}\" mount token mismatch (disk:0x{disk:08x} != s3:0x{s3:08x})",
                path.display()
            );
            return Ok(false);
        }
        if !config.block_cache_recover_dirty_blocks {
            return Ok(false);
        }
        tracing::info!(
            "recovering from unclean shutdown: dirty blocks in cache file will be written back to S3"
        );
        Ok(true)
    }

    /// `mount_token` goes into the cache file header while mounted.
    fn layers(&self, config: &Config, mount_token: u32) -> Result<Arc<dyn BlockStore>, String> {
        if config.shared_disk_mode {
            return Ok(self.backend.clone());
        }
        let mut store = self.backend.clone();
        if config.md5_cache_size > 0 {
            store = Arc::new(EcProtect::new(
                store,
                ec_protect_options(config, self.geometry)?,
            ));
        }
        let known_zero = KnownZero::new(self.geometry);
        if config.block_cache_size > 0 {
            // Spec 6.1's lower zero cache: the block cache's read-ahead skips known zeros too.
            store = Arc::new(ZeroReads::new(store, known_zero.clone()));
            let file = config
                .block_cache_file
                .clone()
                .map(|path| CacheFileOptions {
                    path,
                    no_verify: config.block_cache_no_verify,
                    recover_dirty: config.block_cache_recover_dirty_blocks,
                    advise: config.block_cache_file_advise,
                    mount_token,
                });
            store = BlockCache::open(
                store,
                BlockCacheOptions {
                    size: config.block_cache_size as usize,
                    threads: config.block_cache_threads as usize,
                    write_delay: config.block_cache_write_delay,
                    max_dirty: config.block_cache_max_dirty as usize,
                    timeout: config.block_cache_timeout,
                    sync: config.block_cache_sync,
                    num_protected: config.block_cache_num_protected,
                    read_ahead: config.read_ahead,
                    read_ahead_trigger: config.read_ahead_trigger,
                    read_ahead_max: config.read_ahead_max,
                    file,
                    ..BlockCacheOptions::default()
                },
            )
            .map_err(|e| e.to_string())?;
        }
        let zero_cache = Arc::new(ZeroCache::sharing(store, known_zero));
        if config.list_blocks {
            zero_cache.start_survey(config.list_blocks_threads as usize);
        }
        Ok(zero_cache)
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }
}

/// Spec 6.5 settings; the deadlock check needs the disk size, known only here.
fn ec_protect_options(config: &Config, geometry: Geometry) -> Result<EcProtectOptions, String> {
    let options = EcProtectOptions {
        cache_size: config.md5_cache_size as usize,
        cache_time: Some(config.md5_cache_time).filter(|t| !t.is_zero()),
        min_write_delay: config.min_write_delay,
        stale_retry_initial: config.initial_retry_pause,
        stale_retry_max: config.max_retry_pause,
    };
    options.validate(geometry)?;
    Ok(options)
}

/// Parallel GETs of `--verify`: enough to hide the latency of a remote store.
const VERIFY_THREADS: usize = 32;

/// FUSE dispatch threads: each blocks on one request while the stack below works in parallel.
const FUSE_THREADS: usize = 16;

fn s3_options(config: &Config, naming: Naming) -> S3Options {
    S3Options {
        base_url: config.base_url.clone(),
        bucket: config.bucket.clone(),
        naming,
        vhost: config.vhost,
        region: config.region.clone(),
        auth_version: config.auth_version,
        credentials: CredentialFlags {
            access_id: config.access_id.clone(),
            access_key: config.access_key.as_ref().map(|k| k.expose().to_string()),
            access_key_env: config.access_key_env.clone(),
            access_file: config.access_file.clone(),
            ec2_iam_role: config.access_ec2_iam.clone(),
            imds_v2: config.imds_v2,
            ..CredentialFlags::default()
        },
        timeout: config.timeout,
        initial_retry_pause: config.initial_retry_pause,
        max_retry_pause: config.max_retry_pause,
        access_type: config.access_type.clone(),
        storage_class: config.storage_class.clone(),
        sse: config.sse.clone(),
        sse_key_id: config.sse_key_id.clone(),
        cacert: config.cacert.clone(),
        insecure: config.insecure,
        no_connection_reuse: config.no_connection_reuse,
        debug_http: config.debug_http,
        read_only: config.read_only,
        ..S3Options::default()
    }
}

/// Every S3 disk gets a codec: even without `--compress`, readers must decode blocks that
/// another writer compressed (spec 3), as C does.
fn codec_for(config: &Config, password: Option<String>) -> Result<Arc<Codec>, String> {
    let encryption = match (config.cipher, password) {
        (None, _) => None,
        (Some(cipher), Some(password)) => Some(Encryption {
            cipher,
            password,
            key_length: config.key_length,
            salt: format!("{}/{}", config.bucket, config.prefix),
        }),
        (Some(_), None) => return Err("encryption needs a password".to_string()),
    };
    let codec = Codec::new(CodecConfig {
        compression: config.compression.clone(),
        encryption,
        default_content_encoding: config.default_content_encoding.clone(),
    })
    .map_err(|e| e.to_string())?;
    Ok(Arc::new(codec))
}

/// Test mode has no metadata object: sizing always falls back to the flags.
struct NoMetadata {
    description: String,
}

impl Volume for NoMetadata {
    fn description(&self) -> String {
        self.description.clone()
    }
    fn detect_size(&self) -> crate::Result<Option<crate::store::SizeMeta>> {
        Ok(None)
    }
    fn read_mount_token(&self) -> crate::Result<Option<u32>> {
        Ok(None)
    }
    fn write_mount_token(&self, _token: Option<u32>) -> crate::Result<()> {
        Ok(())
    }
}
