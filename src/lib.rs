//! s3backer-rs: a virtual disk whose blocks are objects in an S3 bucket.
//!
//! A stack of [`store::BlockStore`] layers sits between a frontend (FUSE) and a backend
//! (S3, a local directory, or memory); see DESIGN.md and README.md.

pub mod admin;
pub mod backend;
pub mod config;
pub mod daemon;
pub mod error;
pub mod frontend;
pub mod geometry;
pub mod layer;
pub mod logging;
pub mod metrics;
pub mod naming;
pub mod notify;
pub mod stack;

pub mod stats;
pub mod store;
pub mod volume;

pub use error::{Error, Result};
