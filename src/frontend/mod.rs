//! Frontends: how the disk is exposed.
pub mod fuse;
pub mod nbd;
