//! `--verify` (ours, beyond C): read every stored block of the disk in parallel and check it the
//! way a mount would (body MD5 against the ETag, HMAC, decoding, length). Read-only: it never
//! writes a block or touches the mount token, so it is safe on a mounted bucket.

use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use tracing::{error, info};

use crate::error::Error;
use crate::geometry::BlockId;
use crate::store::BlockStore;

#[derive(Copy, Clone, Debug)]
pub struct VerifyOptions {
    pub quiet: bool,
    /// Parallel listing ranges (`--listBlocksThreads`).
    pub list_threads: usize,
    /// Parallel GET requests.
    pub read_threads: usize,
}

/// What a verification found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub checked: usize,
    /// Damaged or undecodable blocks with the reason, in block order.
    pub damaged: Vec<(BlockId, String)>,
}

/// Checks every stored block of `store`; `Err` only when the check itself could not be done
/// (listing failed, or a block could not be fetched for another reason than damage).
pub fn run(
    store: &dyn BlockStore,
    desc: &str,
    opts: VerifyOptions,
) -> Result<VerifyReport, String> {
    if !opts.quiet {
        info!("verifying every stored block of {desc}...");
    }
    let found = Mutex::new(Vec::new());
    store
        .survey_non_zero(opts.list_threads.max(1), &|block| found.lock().push(block))
        .map_err(|e| format!("can't list the blocks of {desc}: {e}"))?;
    let mut blocks = found.into_inner();
    blocks.sort_unstable();

    let bar = super::block_progress_bar(blocks.len(), opts.quiet);
    let next = AtomicUsize::new(0);
    let damaged = Mutex::new(Vec::new());
    let failure = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..opts.read_threads.clamp(1, blocks.len().max(1)) {
            scope.spawn(|| {
                let mut buf = vec![0u8; store.geometry().block_size_usize()];
                while failure.lock().is_none() {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&block) = blocks.get(i) else { break };
                    match store.read_block(block, &mut buf) {
                        Ok(_) => {}
                        Err(Error::Corrupt { msg, .. }) => {
                            bar.suspend(|| error!("block {block} is damaged: {msg}"));
                            damaged.lock().push((block, msg));
                        }
                        Err(e) => {
                            failure
                                .lock()
                                .get_or_insert(format!("can't read block {block}: {e}"));
                        }
                    }
                    bar.inc(1);
                }
            });
        }
    });
    bar.finish_and_clear();
    if let Some(e) = failure.into_inner() {
        return Err(e);
    }
    let mut damaged = damaged.into_inner();
    damaged.sort_unstable_by_key(|(block, _)| *block);
    Ok(VerifyReport {
        checked: blocks.len(),
        damaged,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryBackend;
    use crate::geometry::Geometry;
    use crate::store::Block;

    fn opts() -> VerifyOptions {
        VerifyOptions {
            quiet: true,
            list_threads: 2,
            read_threads: 4,
        }
    }

    #[test]
    fn a_clean_store_reports_every_block_checked_and_none_damaged() {
        let mem = MemoryBackend::new(Geometry::new(64 * 512, 512).unwrap());
        for b in [0u32, 5, 9, 63] {
            mem.write_block(BlockId(b), Block::Data(&[7u8; 512]))
                .unwrap();
        }
        let report = run(&mem, "mem", opts()).unwrap();
        assert_eq!(report.checked, 4);
        assert!(report.damaged.is_empty());
    }

    #[test]
    fn an_unreadable_block_that_is_not_damage_aborts_the_check() {
        let mem = MemoryBackend::new(Geometry::new(64 * 512, 512).unwrap());
        mem.write_block(BlockId(3), Block::Data(&[7u8; 512]))
            .unwrap();
        mem.fail_block(BlockId(3));
        let err = run(&mem, "mem", opts()).unwrap_err();
        assert!(err.contains("00000003"), "{err}");
    }
}
