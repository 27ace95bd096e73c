//! Administrative commands that run instead of a mount.
pub mod erase;
pub mod reset;
pub mod verify;
