//! Block compression (spec section 3): a zlib stream (`deflate`) or one zstd frame (`zstd`).
//!
//! Compressor and decompressor states are kept per thread and reset between blocks: setting
//! one up allocates and clears hundreds of KiB, more work than a 4 KiB block itself.

use std::cell::RefCell;

use flate2::{Compress, Decompress, FlushCompress, FlushDecompress, Status};
use zstd::zstd_safe::zstd_sys::ZSTD_ErrorCode;

use super::Compression;
use crate::error::{Error, Result};
use crate::geometry::BlockId;

/// zlib's default level (its `-1`).
const DEFLATE_DEFAULT_LEVEL: i32 = 6;
const DEFLATE_MAX_LEVEL: i32 = 9;

/// A compression algorithm as named in Content-Encoding.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum Algorithm {
    Deflate,
    Zstd,
}

impl Algorithm {
    pub(super) const ALL: [Algorithm; 2] = [Algorithm::Deflate, Algorithm::Zstd];

    pub(super) fn token(self) -> &'static str {
        match self {
            Algorithm::Deflate => "deflate",
            Algorithm::Zstd => "zstd",
        }
    }

    /// Case-insensitive match of a Content-Encoding token.
    pub(super) fn from_token(token: &str) -> Option<Algorithm> {
        Self::ALL
            .into_iter()
            .find(|algorithm| algorithm.token().eq_ignore_ascii_case(token))
    }
}

/// A validated compression setting with its level resolved.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum Compressor {
    Deflate { level: u32 },
    Zstd { level: i32 },
}

impl Compressor {
    pub(super) fn new(config: &Compression) -> Result<Self> {
        match *config {
            Compression::Deflate { level } => match level.unwrap_or(DEFLATE_DEFAULT_LEVEL) {
                -1 => Ok(Compressor::Deflate {
                    level: DEFLATE_DEFAULT_LEVEL as u32,
                }),
                level @ 0..=DEFLATE_MAX_LEVEL => Ok(Compressor::Deflate {
                    level: level as u32,
                }),
                level => Err(Error::Invalid(format!(
                    "deflate compression level {level} is out of range -1..{DEFLATE_MAX_LEVEL}"
                ))),
            },
            Compression::Zstd { level } => {
                let level = level.unwrap_or(zstd::DEFAULT_COMPRESSION_LEVEL);
                let range = zstd::compression_level_range();
                if !range.contains(&level) {
                    return Err(Error::Invalid(format!(
                        "zstd compression level {level} is out of range {}..{}",
                        range.start(),
                        range.end()
                    )));
                }
                Ok(Compressor::Zstd { level })
            }
        }
    }

    pub(super) fn algorithm(self) -> Algorithm {
        match self {
            Compressor::Deflate { .. } => Algorithm::Deflate,
            Compressor::Zstd { .. } => Algorithm::Zstd,
        }
    }

    /// Compresses `data` into a new Vec with `spare` bytes of capacity left for what
    /// follows (the cipher's padding), so the body is never reallocated.
    pub(super) fn compress(self, data: &[u8], spare: usize) -> Result<Vec<u8>> {
        match self {
            Compressor::Deflate { level } => {
                let mut out = Vec::with_capacity(zlib_compress_bound(data.len()) + spare);
                DEFLATE_ENCODER.with_borrow_mut(|cached| {
                    let encoder = match cached {
                        Some((cached_level, encoder)) if *cached_level == level => {
                            encoder.reset();
                            encoder
                        }
                        _ => {
                            let encoder = Compress::new(flate2::Compression::new(level), true);
                            &mut cached.insert((level, encoder)).1
                        }
                    };
                    match encoder.compress_vec(data, &mut out, FlushCompress::Finish) {
                        Ok(Status::StreamEnd) => Ok(out),
                        // zlib-rs at low levels can outgrow zlib's compressBound on incompressible
                        // data, and readers (C too) reject larger bodies: store the block instead,
                        // which is still a zlib stream and always fits.
                        Ok(_) => store_uncompressed(data, spare),
                        Err(err) => Err(Error::Other(format!("deflate compression failed: {err}"))),
                    }
                })
            }
            Compressor::Zstd { level } => {
                let mut out =
                    Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()) + spare);
                ZSTD_ENCODER.with_borrow_mut(|cached| {
                    let encoder = match cached {
                        Some((cached_level, encoder)) if *cached_level == level => encoder,
                        _ => {
                            let encoder = zstd::bulk::Compressor::new(level)
                                .map_err(|err| Error::io("zstd compressor setup", err))?;
                            &mut cached.insert((level, encoder)).1
                        }
                    };
                    encoder
                        .compress_to_buffer(data, &mut out)
                        .map_err(|err| Error::io("zstd compression", err))?;
                    Ok(out)
                })
            }
        }
    }
}

thread_local! {
    static DEFLATE_ENCODER: RefCell<Option<(u32, Compress)>> = const { RefCell::new(None) };
    static ZSTD_ENCODER: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    static DEFLATE_DECODER: RefCell<Option<Decompress>> = const { RefCell::new(None) };
    static ZSTD_DECODER: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// zlib's `compressBound`: the largest zlib stream `compress2` makes of `len` bytes.
pub(super) fn zlib_compress_bound(len: usize) -> usize {
    len + (len >> 12) + (len >> 14) + (len >> 25) + 13
}

/// Decompresses one layer of a GET body. The output never grows beyond `block_size + 1`
/// bytes (one more than allowed, to tell "too long" from "exact"), whatever the input claims.
pub(super) fn decompress(
    algorithm: Algorithm,
    block: BlockId,
    input: &[u8],
    block_size: usize,
) -> Result<Vec<u8>> {
    let limit = block_size + 1;
    let too_long = || Error::corrupt(block, format!("returned more than {block_size} bytes"));
    match algorithm {
        Algorithm::Deflate => {
            let mut out = Vec::with_capacity(limit);
            DEFLATE_DECODER.with_borrow_mut(|cached| {
                let decoder = match cached {
                    Some(decoder) => {
                        decoder.reset(true);
                        decoder
                    }
                    None => cached.insert(Decompress::new(true)),
                };
                let status = decoder
                    .decompress_vec(input, &mut out, FlushDecompress::Finish)
                    .map_err(|err| Error::corrupt(block, format!("invalid deflate data: {err}")))?;
                match status {
                    Status::StreamEnd if decoder.total_in() == input.len() as u64 => Ok(out),
                    Status::StreamEnd => Err(Error::corrupt(
                        block,
                        format!(
                            "{} bytes of garbage after the deflate data",
                            input.len() as u64 - decoder.total_in()
                        ),
                    )),
                    _ if out.len() > block_size => Err(too_long()),
                    _ => Err(Error::corrupt(block, "deflate data is truncated")),
                }
            })
        }
        Algorithm::Zstd => {
            // Frames made by ZSTD_compress carry their size: reject a wrong one before work.
            if let Ok(Some(size)) = zstd::zstd_safe::get_frame_content_size(input)
                && size != block_size as u64
            {
                return Err(Error::corrupt(
                    block,
                    format!("returned {size} != {block_size} bytes"),
                ));
            }
            let mut out = Vec::with_capacity(limit);
            ZSTD_DECODER.with_borrow_mut(|cached| {
                let decoder = match cached {
                    Some(decoder) => decoder,
                    None => cached.insert(
                        zstd::bulk::Decompressor::new()
                            .map_err(|err| Error::io("zstd decompressor setup", err))?,
                    ),
                };
                match decoder.decompress_to_buffer(input, &mut out) {
                    Ok(_) if out.len() > block_size => Err(too_long()),
                    Ok(_) => Ok(out),
                    Err(err) if is_zstd_output_full(&err) => Err(too_long()),
                    Err(err) => Err(Error::corrupt(block, format!("invalid zstd data: {err}"))),
                }
            })
        }
    }
}

fn is_zstd_output_full(err: &std::io::Error) -> bool {
    err.get_ref()
        .and_then(|inner| inner.downcast_ref::<zstd::Error>())
        .is_some_and(|err| err.is(ZSTD_ErrorCode::ZSTD_error_dstSize_tooSmall))
}

/// A zlib stream of stored (level 0) deflate blocks: never larger than `zlib_compress_bound`.
fn store_uncompressed(data: &[u8], spare: usize) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(zlib_compress_bound(data.len()) + spare);
    let mut encoder = Compress::new(flate2::Compression::new(0), true);
    match encoder.compress_vec(data, &mut out, FlushCompress::Finish) {
        Ok(Status::StreamEnd) => Ok(out),
        Ok(status) => Err(Error::Other(format!(
            "deflate compression stopped early ({status:?})"
        ))),
        Err(err) => Err(Error::Other(format!("deflate compression failed: {err}"))),
    }
}
