//! The bucket's byte format of a block: compression, encryption and HMAC (spec sections 3 and 4).
//! Used by the S3 backend only: test mode (`--test`) stores raw blocks.
//!
//! API FROZEN for parallel work; bodies to be written.

use crate::error::Result;
use crate::geometry::BlockId;

/// Compression algorithm and level (`--compress`, `--compress-level`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compression {
    /// zlib stream (RFC 1950), Content-Encoding `deflate`; level `None` = zlib default (6).
    Deflate { level: Option<i32> },
    /// One zstd frame, Content-Encoding `zstd`; level `None` = 3.
    Zstd { level: Option<i32> },
}

/// Supported block ciphers (`--encrypt[=NAME]`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Cipher {
    Aes128Cbc,
    Aes192Cbc,
    Aes256Cbc,
}

/// Encryption settings (`--encrypt`, `--password`, `--keyLength`).
#[derive(Clone)]
pub struct Encryption {
    pub cipher: Cipher,
    pub password: String,
    /// `--keyLength`; 0 = the cipher's native key length.
    pub key_length: usize,
    /// PBKDF2 salt: bucket name + "/" + effective prefix (spec 4.3).
    pub salt: String,
}

#[derive(Clone, Default)]
pub struct CodecConfig {
    pub compression: Option<Compression>,
    pub encryption: Option<Encryption>,
    /// `--defaultContentEncoding`: assumed when a GET response carries no Content-Encoding.
    pub default_content_encoding: Option<String>,
}

/// An encoded block, ready for PUT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedBlock {
    pub body: Vec<u8>,
    /// Value of the Content-Encoding header, e.g. `deflate, encrypt-AES-128-CBC`; `None` if raw.
    pub content_encoding: Option<String>,
    /// Value of `x-amz-meta-s3backer-hmac` including the double quotes; `None` unless encrypting.
    pub hmac_header: Option<String>,
}

pub struct Codec {}

impl Codec {
    pub fn new(_config: CodecConfig) -> Result<Self> {
        todo!("codec")
    }

    /// Value of the `Accept-Encoding` header for GETs (spec 2.5).
    pub fn accept_encoding(&self) -> String {
        todo!("codec")
    }

    /// Encodes a non-zero block (`data.len() == block_size`).
    pub fn encode(&self, _block: BlockId, _data: &[u8]) -> Result<EncodedBlock> {
        todo!("codec")
    }

    /// Decodes a GET body into exactly `block_size` bytes, checking the HMAC; any problem is
    /// `Error::Corrupt` naming the block. `content_encoding` and `hmac_header` are the raw
    /// response header values.
    pub fn decode(
        &self,
        _block: BlockId,
        _body: Vec<u8>,
        _content_encoding: Option<&str>,
        _hmac_header: Option<&str>,
        _block_size: usize,
    ) -> Result<Vec<u8>> {
        todo!("codec")
    }
}
