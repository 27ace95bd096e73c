//! Layers: decorators around any `BlockStore`, each adding one concern.
pub mod block_cache;
pub mod block_part;
pub mod codec;
pub mod ec_protect;
pub mod zero_cache;
