//! Administrative commands that run instead of a mount.
pub mod erase;
pub mod reset;
pub mod verify;

/// The per-block progress bar of the long admin commands; hidden with `--quiet` or when
/// stderr is not a terminal.
fn block_progress_bar(blocks: usize, quiet: bool) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    use std::io::IsTerminal;
    let bar = ProgressBar::new(blocks as u64);
    if quiet || !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} blocks, {per_sec}, eta {eta}")
            .expect("valid template"),
    );
    bar
}
