//! The NBD view of the disk (spec 8.4): a native NBD server in place of C s3backer's nbdkit
//! plugin, serving the same block stack.
pub mod device;
pub mod protocol;
pub mod server;

#[cfg(test)]
mod client_tests;

pub use server::{NbdOptions, serve, stop_on_signals};
