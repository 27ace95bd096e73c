//! Backends: where blocks are finally stored.
pub mod dir;
pub mod memory;
pub mod s3;
