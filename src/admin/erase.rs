//! `--erase`: delete every block of the disk, then the mount token (spec 5.2 item 5).

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;
use tracing::info;

use crate::geometry::BlockId;
use crate::store::{Block, BlockStore, Volume};

#[derive(Copy, Clone, Debug)]
pub struct EraseOptions {
    /// Skip the confirmation question.
    pub force: bool,
    pub quiet: bool,
    /// Parallel listing ranges (`--listBlocksThreads`).
    pub list_threads: usize,
    /// Parallel DELETE requests.
    pub delete_threads: usize,
}

/// Asks on stderr, reads the answer from stdin.
pub fn run(store: &dyn BlockStore, volume: &dyn Volume, opts: EraseOptions) -> Result<u64, String> {
    run_with_answers(store, volume, opts, &mut std::io::stdin().lock())
}

/// Like [`run`], with the confirmation answer read from `answers`.
pub fn run_with_answers(
    store: &dyn BlockStore,
    volume: &dyn Volume,
    opts: EraseOptions,
    answers: &mut dyn BufRead,
) -> Result<u64, String> {
    let desc = volume.description();
    info!("\"--erase\" flag given: erasing all blocks in {desc}");
    if !opts.force {
        eprint!("s3backer: is this correct? [y/N] ");
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        answers
            .read_line(&mut answer)
            .map_err(|e| format!("can't read the answer: {e}"))?;
        if !matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
            return Err("not confirmed".to_string());
        }
    }
    if !opts.quiet {
        info!("erasing non-zero blocks...");
    }
    let found = Mutex::new(Vec::new());
    store
        .survey_non_zero(opts.list_threads.max(1), &|block| found.lock().push(block))
        .map_err(|e| format!("can't list the blocks of {desc}: {e}"))?;
    let blocks = found.into_inner();
    let erased = delete_all(store, &blocks, opts)?;
    volume
        .write_mount_token(None)
        .map_err(|e| format!("can't clear the mount token of {desc}: {e}"))?;
    info!("erased {erased} non-zero blocks");
    Ok(erased)
}

fn delete_all(
    store: &dyn BlockStore,
    blocks: &[BlockId],
    opts: EraseOptions,
) -> Result<u64, String> {
    let bar = super::block_progress_bar(blocks.len(), opts.quiet);
    let next = AtomicUsize::new(0);
    let erased = AtomicU64::new(0);
    let first_error = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..opts.delete_threads.clamp(1, blocks.len().max(1)) {
            scope.spawn(|| {
                while first_error.lock().is_none() {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&block) = blocks.get(i) else { break };
                    match store.write_block(block, Block::Zero) {
                        Ok(_) => {
                            erased.fetch_add(1, Ordering::Relaxed);
                            bar.inc(1);
                        }
                        Err(e) => {
                            first_error
                                .lock()
                                .get_or_insert(format!("can't erase block {block}: {e}"));
                        }
                    }
                }
            });
        }
    });
    bar.finish_and_clear();
    match first_error.into_inner() {
        Some(e) => Err(e),
        None => Ok(erased.into_inner()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryBackend;
    use crate::geometry::Geometry;

    fn filled() -> MemoryBackend {
        let mem = MemoryBackend::new(Geometry::new(64 * 512, 512).unwrap());
        for b in 0..40u32 {
            mem.write_block(BlockId(b), Block::Data(&[1u8; 512]))
                .unwrap();
        }
        mem.write_mount_token(Some(7)).unwrap();
        mem
    }

    fn opts(force: bool) -> EraseOptions {
        EraseOptions {
            force,
            quiet: true,
            list_threads: 4,
            delete_threads: 8,
        }
    }

    #[test]
    fn confirmed_erase_deletes_every_block_and_the_token() {
        for answer in ["y\n", "yes\n", "YES\n"] {
            let mem = filled();
            let n = run_with_answers(&mem, &mem, opts(false), &mut answer.as_bytes()).unwrap();
            assert_eq!(n, 40);
            assert_eq!(mem.stored_count(), 0);
            assert_eq!(mem.read_mount_token().unwrap(), None);
        }
    }

    #[test]
    fn anything_but_yes_erases_nothing() {
        for answer in ["n\n", "\n", "", "maybe\n"] {
            let mem = filled();
            let err =
                run_with_answers(&mem, &mem, opts(false), &mut answer.as_bytes()).unwrap_err();
            assert_eq!(err, "not confirmed");
            assert_eq!(mem.stored_count(), 40);
            assert_eq!(mem.read_mount_token().unwrap(), Some(7));
        }
    }

    #[test]
    fn force_skips_the_question() {
        let mem = filled();
        assert_eq!(
            run_with_answers(&mem, &mem, opts(true), &mut "".as_bytes()).unwrap(),
            40
        );
        assert_eq!(mem.stored_count(), 0);
    }

    #[test]
    fn a_failing_delete_is_reported_and_the_token_kept() {
        let mem = filled();
        mem.fail_block(BlockId(3));
        let err = run_with_answers(&mem, &mem, opts(true), &mut "".as_bytes()).unwrap_err();
        assert!(err.contains("00000003"), "{err}");
        assert_eq!(mem.read_mount_token().unwrap(), Some(7));
    }
}
