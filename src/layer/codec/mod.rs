//! The bucket's byte format of a block: compression, encryption and HMAC (spec sections 3 and 4).
//! Used by the S3 backend only: test mode (`--test`) stores raw blocks.

mod compress;
mod crypto;

use compress::{Algorithm, Compressor};
use crypto::{BlockCrypto, CIPHER_BLOCK_LEN, format_tag_header, parse_tag_header};

use crate::error::{Error, Result};
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

/// Turns block data into bucket bodies and back. Keys are derived once, here; one `Codec`
/// serves every thread.
pub struct Codec {
    compressor: Option<Compressor>,
    crypto: Option<BlockCrypto>,
    /// What `encode` writes in Content-Encoding.
    content_encoding: Option<String>,
    default_content_encoding: Option<String>,
}

/// One Content-Encoding layer of a GET body.
enum Layer {
    Compressed(Algorithm),
    Encrypted,
}

const ENCRYPT_TOKEN_PREFIX: &str = "encrypt-";

impl Codec {
    pub fn new(config: CodecConfig) -> Result<Self> {
        let compressor = config
            .compression
            .as_ref()
            .map(Compressor::new)
            .transpose()?;
        let crypto = config
            .encryption
            .as_ref()
            .map(BlockCrypto::new)
            .transpose()?;
        let compress_token = compressor.map(|c| c.algorithm().token().to_owned());
        let encrypt_token = crypto.as_ref().map(encrypt_token);
        let content_encoding = match (compress_token, encrypt_token) {
            (Some(compress), Some(encrypt)) => Some(format!("{compress}, {encrypt}")),
            (compress, encrypt) => compress.or(encrypt),
        };
        Ok(Codec {
            compressor,
            crypto,
            content_encoding,
            default_content_encoding: config.default_content_encoding,
        })
    }

    /// Value of the `Accept-Encoding` header for GETs (spec 2.5).
    pub fn accept_encoding(&self) -> String {
        let mut tokens: Vec<String> = Algorithm::ALL
            .iter()
            .map(|algorithm| algorithm.token().to_owned())
            .collect();
        tokens.extend(self.crypto.as_ref().map(encrypt_token));
        tokens.join(", ")
    }

    /// Encodes a non-zero block (`data.len() == block_size`).
    pub fn encode(&self, block: BlockId, data: &[u8]) -> Result<EncodedBlock> {
        let spare = if self.crypto.is_some() {
            CIPHER_BLOCK_LEN
        } else {
            0
        };
        let mut body = match self.compressor {
            Some(compressor) => compressor.compress(data, spare)?,
            None => {
                let mut body = Vec::with_capacity(data.len() + spare);
                body.extend_from_slice(data);
                body
            }
        };
        let hmac_header = self
            .crypto
            .as_ref()
            .map(|crypto| format_tag_header(&crypto.encrypt(block, &mut body)));
        Ok(EncodedBlock {
            body,
            content_encoding: self.content_encoding.clone(),
            hmac_header,
        })
    }

    /// Decodes a GET body into exactly `block_size` bytes, checking the HMAC; any problem is
    /// `Error::Corrupt` naming the block. `content_encoding` and `hmac_header` are the raw
    /// response header values.
    pub fn decode(
        &self,
        block: BlockId,
        body: Vec<u8>,
        content_encoding: Option<&str>,
        hmac_header: Option<&str>,
        block_size: usize,
    ) -> Result<Vec<u8>> {
        let max_len = max_body_len(block_size);
        if body.len() > max_len {
            return Err(Error::corrupt(
                block,
                format!(
                    "returned an oversize body ({} > {max_len} bytes)",
                    body.len()
                ),
            ));
        }
        let encoding = content_encoding
            .filter(|value| !value.trim().is_empty())
            .or(self.default_content_encoding.as_deref())
            .unwrap_or("");
        // Every layer is checked before any is undone, so data that was supposed to be
        // authenticated is never decompressed first.
        let layers = encoding
            .split(|c: char| c == ',' || c.is_ascii_whitespace())
            .filter(|token| !token.is_empty())
            .map(|token| self.parse_layer(block, token))
            .collect::<Result<Vec<_>>>()?;
        if self.crypto.is_some() && !layers.iter().any(|l| matches!(l, Layer::Encrypted)) {
            return Err(Error::corrupt(
                block,
                "was supposed to be encrypted but wasn't",
            ));
        }

        let mut data = body;
        for layer in layers.iter().rev() {
            match layer {
                Layer::Encrypted => {
                    let crypto = self.crypto.as_ref().expect("checked by parse_layer");
                    let tag = hmac_header.and_then(|value| {
                        let tag = parse_tag_header(value);
                        if tag.is_none() {
                            tracing::warn!(
                                "rec'd malformed response header x-amz-meta-s3backer-hmac: {value:?}"
                            );
                        }
                        tag
                    });
                    let Some(tag) = tag else {
                        return Err(Error::corrupt(
                            block,
                            "is encrypted, but no signature was found",
                        ));
                    };
                    crypto.decrypt(block, &mut data, &tag)?;
                }
                Layer::Compressed(algorithm) => {
                    data = compress::decompress(*algorithm, block, &data, block_size)?;
                }
            }
        }
        if data.len() != block_size {
            return Err(Error::corrupt(
                block,
                format!("returned {} != {block_size} bytes", data.len()),
            ));
        }
        Ok(data)
    }

    fn parse_layer(&self, block: BlockId, token: &str) -> Result<Layer> {
        if let Some(algorithm) = Algorithm::from_token(token) {
            return Ok(Layer::Compressed(algorithm));
        }
        let Some(name) = strip_prefix_ignore_case(token, ENCRYPT_TOKEN_PREFIX) else {
            return Err(Error::corrupt(
                block,
                format!("returned unexpected encoding \"{token}\""),
            ));
        };
        let Some(crypto) = &self.crypto else {
            return Err(Error::corrupt(
                block,
                format!("is encrypted with \"{name}\" but \"--encrypt\" was not specified"),
            ));
        };
        let configured = crypto.cipher().canonical_name();
        if !name.eq_ignore_ascii_case(configured) {
            return Err(Error::corrupt(
                block,
                format!("is encrypted with \"{name}\" but \"{configured}\" is configured"),
            ));
        }
        Ok(Layer::Encrypted)
    }
}

/// `encrypt-` + canonical cipher name (C writes the configured name uppercased, which is the
/// canonical one for every cipher we accept).
fn encrypt_token(crypto: &BlockCrypto) -> String {
    format!("{ENCRYPT_TOKEN_PREFIX}{}", crypto.cipher().canonical_name())
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

/// Largest GET body accepted (spec 2.5): zlib's compressBound plus one cipher block.
pub fn max_body_len(block_size: usize) -> usize {
    compress::zlib_compress_bound(block_size) + CIPHER_BLOCK_LEN
}
