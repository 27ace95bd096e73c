//! The bucket's byte format of a block: compression, encryption and HMAC (spec sections 3 and 4).
//! Used by the S3 backend only: test mode (`--test`) stores raw blocks.

mod compress;
mod crypto;

use std::borrow::Cow;

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

/// An encoded block, ready for PUT. Without compression or encryption the body is the block
/// data itself, borrowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedBlock<'a> {
    pub body: Cow<'a, [u8]>,
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
        Ok(Self::assemble(
            compressor,
            crypto,
            config.default_content_encoding,
        ))
    }

    fn assemble(
        compressor: Option<Compressor>,
        crypto: Option<BlockCrypto>,
        default_content_encoding: Option<String>,
    ) -> Self {
        let compress_token = compressor.map(|c| c.algorithm().token().to_owned());
        let encrypt_token = crypto.as_ref().map(encrypt_token);
        let content_encoding = match (compress_token, encrypt_token) {
            (Some(compress), Some(encrypt)) => Some(format!("{compress}, {encrypt}")),
            (compress, encrypt) => compress.or(encrypt),
        };
        Codec {
            compressor,
            crypto,
            content_encoding,
            default_content_encoding,
        }
    }

    /// True when every block must carry a valid HMAC over its whole body (`--encrypt`).
    pub fn authenticates(&self) -> bool {
        self.crypto.is_some()
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
    pub fn encode<'a>(&self, block: BlockId, data: &'a [u8]) -> Result<EncodedBlock<'a>> {
        let spare = if self.crypto.is_some() {
            CIPHER_BLOCK_LEN
        } else {
            0
        };
        let mut body = match self.compressor {
            Some(compressor) => Cow::Owned(compressor.compress(data, spare)?),
            None if self.crypto.is_none() => Cow::Borrowed(data),
            None => {
                let mut body = Vec::with_capacity(data.len() + spare);
                body.extend_from_slice(data);
                Cow::Owned(body)
            }
        };
        let hmac_header = self
            .crypto
            .as_ref()
            .map(|crypto| format_tag_header(&crypto.encrypt(block, body.to_mut())));
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    #[test]
    fn incompressible_blocks_fit_the_readers_limit_at_every_deflate_level() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let data: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        for level in -1..=9 {
            let codec = Codec::new(CodecConfig {
                compression: Some(Compression::Deflate { level: Some(level) }),
                ..Default::default()
            })
            .unwrap();
            let encoded = codec.encode(BlockId(1), &data).unwrap();
            assert!(
                encoded.body.len() <= max_body_len(4096),
                "level {level}: {} bytes",
                encoded.body.len()
            );
            let decoded = codec
                .decode(
                    BlockId(1),
                    encoded.body.into_owned(),
                    encoded.content_encoding.as_deref(),
                    None,
                    4096,
                )
                .unwrap();
            assert_eq!(decoded, data, "level {level}");
        }
    }

    const BLOCK_SIZE: usize = 4096;
    const BUCKET_SALT: &str = "mybucket/";

    fn encryption(cipher: Cipher, password: &str) -> Encryption {
        Encryption {
            cipher,
            password: password.into(),
            key_length: 0,
            salt: BUCKET_SALT.into(),
        }
    }

    fn codec(compression: Option<Compression>, encryption: Option<Encryption>) -> Codec {
        Codec::new(CodecConfig {
            compression,
            encryption,
            default_content_encoding: None,
        })
        .unwrap()
    }

    fn deflate() -> Option<Compression> {
        Some(Compression::Deflate { level: None })
    }

    fn zstd() -> Option<Compression> {
        Some(Compression::Zstd { level: None })
    }

    /// deflate + AES-128-CBC, password `password`: the C default for `--encrypt`.
    fn encrypted() -> &'static Codec {
        static CODEC: OnceLock<Codec> = OnceLock::new();
        CODEC.get_or_init(|| codec(deflate(), Some(encryption(Cipher::Aes128Cbc, "password"))))
    }

    fn plain() -> &'static Codec {
        static CODEC: OnceLock<Codec> = OnceLock::new();
        CODEC.get_or_init(|| codec(None, None))
    }

    /// Compressible but not trivial: a counter pattern with a few random-looking runs.
    fn sample_block(size: usize, seed: u8) -> Vec<u8> {
        (0..size)
            .map(|i| {
                if i % 512 < 64 {
                    (i as u8).wrapping_mul(31).wrapping_add(seed)
                } else {
                    seed ^ (i / 512) as u8
                }
            })
            .collect()
    }

    fn decode(codec: &Codec, block: u32, encoded: &EncodedBlock) -> Result<Vec<u8>> {
        codec.decode(
            BlockId(block),
            encoded.body.to_vec(),
            encoded.content_encoding.as_deref(),
            encoded.hmac_header.as_deref(),
            BLOCK_SIZE,
        )
    }

    /// Asserts `result` is `Corrupt` for `block` with a message containing `needle`.
    #[track_caller]
    fn assert_corrupt(result: Result<Vec<u8>>, block: u32, needle: &str) {
        match result {
            Err(Error::Corrupt { block: got, msg }) => {
                assert_eq!(got, BlockId(block), "message: {msg}");
                assert!(msg.contains(needle), "{msg:?} does not contain {needle:?}");
            }
            other => panic!("expected Corrupt containing {needle:?}, got {other:?}"),
        }
    }

    #[test]
    fn accept_encoding_lists_compressions_and_configured_cipher() {
        assert_eq!(plain().accept_encoding(), "deflate, zstd");
        assert_eq!(
            encrypted().accept_encoding(),
            "deflate, zstd, encrypt-AES-128-CBC"
        );
    }

    #[test]
    fn content_encoding_names_each_layer_in_write_order() {
        let data = sample_block(BLOCK_SIZE, 1);
        let encoding = |codec: &Codec| codec.encode(BlockId(1), &data).unwrap().content_encoding;
        assert_eq!(encoding(plain()), None);
        assert_eq!(
            encoding(&codec(deflate(), None)).as_deref(),
            Some("deflate")
        );
        assert_eq!(encoding(&codec(zstd(), None)).as_deref(), Some("zstd"));
        assert_eq!(
            encoding(encrypted()).as_deref(),
            Some("deflate, encrypt-AES-128-CBC")
        );
        let aes256_only = codec(None, Some(encryption(Cipher::Aes256Cbc, "pw")));
        assert_eq!(
            encoding(&aes256_only).as_deref(),
            Some("encrypt-AES-256-CBC")
        );
    }

    #[test]
    fn raw_block_is_stored_verbatim_without_headers() {
        let data = sample_block(BLOCK_SIZE, 2);
        let encoded = plain().encode(BlockId(2), &data).unwrap();
        assert_eq!(encoded.body, data);
        assert_eq!(encoded.hmac_header, None);
        assert_eq!(decode(plain(), 2, &encoded).unwrap(), data);
    }

    #[test]
    fn every_compression_and_cipher_combination_round_trips() {
        let compressions = [
            None,
            Some(Compression::Deflate { level: None }),
            Some(Compression::Deflate { level: Some(-1) }),
            Some(Compression::Deflate { level: Some(0) }),
            Some(Compression::Deflate { level: Some(1) }),
            Some(Compression::Deflate { level: Some(9) }),
            Some(Compression::Zstd { level: None }),
            Some(Compression::Zstd { level: Some(1) }),
            Some(Compression::Zstd { level: Some(19) }),
            Some(Compression::Zstd { level: Some(-5) }),
        ];
        let ciphers = [
            None,
            Some(Cipher::Aes128Cbc),
            Some(Cipher::Aes192Cbc),
            Some(Cipher::Aes256Cbc),
        ];
        let data = sample_block(BLOCK_SIZE, 3);
        for cipher in ciphers {
            // Keys are derived once per cipher: PBKDF2 dominates the test's time otherwise.
            let crypto = cipher.map(|c| BlockCrypto::new(&encryption(c, "secret")).unwrap());
            for compression in &compressions {
                let compressor = compression.as_ref().map(|c| Compressor::new(c).unwrap());
                let codec = Codec::assemble(compressor, crypto.clone(), None);
                let encoded = codec.encode(BlockId(0x1234), &data).unwrap();
                assert_eq!(
                    encoded.hmac_header.is_some(),
                    cipher.is_some(),
                    "{compression:?} {cipher:?}"
                );
                let decoded = decode(&codec, 0x1234, &encoded)
                    .unwrap_or_else(|err| panic!("{compression:?} {cipher:?}: {err}"));
                assert_eq!(decoded, data, "{compression:?} {cipher:?}");
            }
        }
    }

    #[test]
    fn compression_actually_shrinks_compressible_blocks() {
        let data = sample_block(BLOCK_SIZE, 4);
        for compression in [deflate(), zstd()] {
            let encoded = codec(compression.clone(), None)
                .encode(BlockId(4), &data)
                .unwrap();
            assert!(
                encoded.body.len() < BLOCK_SIZE / 4,
                "{compression:?}: {} bytes",
                encoded.body.len()
            );
        }
    }

    #[test]
    fn incompressible_block_is_still_stored_compressed() {
        // xorshift noise: deflate falls back to stored blocks, still a zlib stream.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let data: Vec<u8> = (0..BLOCK_SIZE)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let encoded = encrypted().encode(BlockId(5), &data).unwrap();
        assert!(encoded.body.len() <= max_body_len(BLOCK_SIZE));
        assert_eq!(decode(encrypted(), 5, &encoded).unwrap(), data);
    }

    #[test]
    fn out_of_range_levels_are_rejected() {
        for compression in [
            Compression::Deflate { level: Some(10) },
            Compression::Deflate { level: Some(-2) },
            Compression::Zstd { level: Some(1000) },
        ] {
            let result = Codec::new(CodecConfig {
                compression: Some(compression.clone()),
                ..CodecConfig::default()
            });
            assert!(
                matches!(result, Err(Error::Invalid(_))),
                "{compression:?} accepted"
            );
        }
    }

    /// The spec 11.4 PUT of 4096 bytes of 0x01, as C s3backer would have stored it.
    fn spec_11_4_object(block: u32) -> (Vec<u8>, &'static str) {
        match block {
            0 => (
                hex::decode("545e3bf5f58224a76ab62d95c0b228faed93fcc25163f01af389d6adcedbfd04")
                    .unwrap(),
                "\"1d44732232dadb299a8b835e875da0fb6fe4a405\"",
            ),
            0x1234 => (
                hex::decode("7ed17a044bf445f73a912b789a2f911688e0127e5dadb218fade66e721a740c8")
                    .unwrap(),
                "\"b5500d52aa61d796f23c0775562024c08090abec\"",
            ),
            _ => unreachable!(),
        }
    }

    #[test]
    fn spec_11_4_objects_decode_to_the_original_block() {
        for block in [0, 0x1234] {
            let (body, hmac) = spec_11_4_object(block);
            let data = encrypted()
                .decode(
                    BlockId(block),
                    body,
                    Some("deflate, encrypt-AES-128-CBC"),
                    Some(hmac),
                    BLOCK_SIZE,
                )
                .unwrap();
            assert_eq!(data, vec![1u8; BLOCK_SIZE]);
        }
    }

    #[test]
    fn spec_11_5_encrypt_only_object_decodes() {
        let body = hex::decode(
            "8578a7cb4fa77f40972f5e8d0c8405fa2cbf20db501f357ba515156940226e32\
             fc1bd0206b0848bfd84f659bb292da26",
        )
        .unwrap();
        let data = encrypted()
            .decode(
                BlockId(0x1234),
                body,
                Some("encrypt-AES-128-CBC"),
                Some("\"7dde8fc7f4bfa3b5c6271b356551c3a78c2d7985\""),
                32,
            )
            .unwrap();
        assert_eq!(data, (1..=32).collect::<Vec<u8>>());
    }

    #[test]
    fn encodings_with_odd_spacing_and_case_are_understood() {
        let (body, hmac) = spec_11_4_object(0x1234);
        for encoding in [
            "Deflate ,  encrypt-aes-128-cbc",
            "DEFLATE,ENCRYPT-AES-128-CBC",
            " deflate encrypt-AES-128-cbc ",
        ] {
            let data = encrypted()
                .decode(
                    BlockId(0x1234),
                    body.clone(),
                    Some(encoding),
                    Some(&format!("  {}", hmac.to_uppercase())),
                    BLOCK_SIZE,
                )
                .unwrap_or_else(|err| panic!("{encoding:?}: {err}"));
            assert_eq!(data, vec![1u8; BLOCK_SIZE]);
        }
    }

    #[test]
    fn unencrypted_reader_decodes_any_compression() {
        let data = sample_block(BLOCK_SIZE, 6);
        for writer in [codec(deflate(), None), codec(zstd(), None)] {
            let encoded = writer.encode(BlockId(6), &data).unwrap();
            assert_eq!(decode(plain(), 6, &encoded).unwrap(), data);
            let zstd_reader = codec(zstd(), None);
            assert_eq!(decode(&zstd_reader, 6, &encoded).unwrap(), data);
        }
    }

    #[test]
    fn default_content_encoding_applies_only_when_header_is_absent() {
        let data = sample_block(BLOCK_SIZE, 7);
        let body = codec(deflate(), None)
            .encode(BlockId(7), &data)
            .unwrap()
            .body
            .into_owned();
        let reader = Codec::new(CodecConfig {
            default_content_encoding: Some("deflate".into()),
            ..CodecConfig::default()
        })
        .unwrap();
        let read = |encoding: Option<&str>, body: Vec<u8>| {
            reader.decode(BlockId(7), body, encoding, None, BLOCK_SIZE)
        };
        assert_eq!(read(None, body.clone()).unwrap(), data);
        assert_eq!(read(Some(""), body.clone()).unwrap(), data);
        // An explicit header wins over the default.
        assert_eq!(read(Some("identity"), data.clone()).map(|_| ()).ok(), None);
        // Without the default the compressed body is taken as raw data of the wrong size.
        let without_default = plain().decode(BlockId(7), body.clone(), None, None, BLOCK_SIZE);
        assert_corrupt(
            without_default,
            7,
            &format!("returned {} != 4096 bytes", body.len()),
        );
    }

    #[test]
    fn flipped_ciphertext_byte_fails_the_signature() {
        let data = sample_block(BLOCK_SIZE, 8);
        let mut encoded = encrypted().encode(BlockId(8), &data).unwrap();
        encoded.body.to_mut()[3] ^= 0x40;
        assert_corrupt(
            decode(encrypted(), 8, &encoded),
            8,
            "incorrect signature (did you provide the right password?)",
        );
    }

    #[test]
    fn flipped_hmac_fails_the_signature() {
        let data = sample_block(BLOCK_SIZE, 9);
        let mut encoded = encrypted().encode(BlockId(9), &data).unwrap();
        let header = encoded.hmac_header.take().unwrap();
        let flipped = if header.as_bytes()[1] == b'0' {
            "1"
        } else {
            "0"
        };
        encoded.hmac_header = Some(format!("\"{flipped}{}", &header[2..]));
        assert_corrupt(decode(encrypted(), 9, &encoded), 9, "incorrect signature");
    }

    #[test]
    fn missing_or_malformed_hmac_means_no_signature() {
        let data = sample_block(BLOCK_SIZE, 10);
        let mut encoded = encrypted().encode(BlockId(10), &data).unwrap();
        let header = encoded.hmac_header.take().unwrap();
        assert_corrupt(
            decode(encrypted(), 10, &encoded),
            10,
            "is encrypted, but no signature was found",
        );
        // Unquoted: malformed, therefore treated as absent.
        encoded.hmac_header = Some(header.trim_matches('"').to_string());
        assert_corrupt(
            decode(encrypted(), 10, &encoded),
            10,
            "no signature was found",
        );
    }

    #[test]
    fn wrong_password_fails_the_signature() {
        let data = sample_block(BLOCK_SIZE, 11);
        let encoded = encrypted().encode(BlockId(11), &data).unwrap();
        let wrong = codec(deflate(), Some(encryption(Cipher::Aes128Cbc, "passw0rd")));
        assert_corrupt(decode(&wrong, 11, &encoded), 11, "incorrect signature");
    }

    #[test]
    fn block_moved_to_another_number_fails_the_signature() {
        let data = sample_block(BLOCK_SIZE, 12);
        let encoded = encrypted().encode(BlockId(12), &data).unwrap();
        assert_corrupt(decode(encrypted(), 13, &encoded), 13, "incorrect signature");
    }

    #[test]
    fn truncated_encrypted_body_fails_the_signature() {
        let data = sample_block(BLOCK_SIZE, 14);
        let mut encoded = encrypted().encode(BlockId(14), &data).unwrap();
        let len = encoded.body.len();
        encoded.body.to_mut().truncate(len - 16);
        assert_corrupt(decode(encrypted(), 14, &encoded), 14, "incorrect signature");
    }

    #[test]
    fn truncated_compressed_body_is_corrupt() {
        let data = sample_block(BLOCK_SIZE, 15);
        for writer in [codec(deflate(), None), codec(zstd(), None)] {
            let mut encoded = writer.encode(BlockId(15), &data).unwrap();
            let len = encoded.body.len();
            encoded.body.to_mut().truncate(len - 5);
            let result = decode(plain(), 15, &encoded);
            assert!(
                matches!(
                    &result,
                    Err(Error::Corrupt {
                        block: BlockId(15),
                        ..
                    })
                ),
                "{:?}: {result:?}",
                encoded.content_encoding
            );
        }
    }

    #[test]
    fn damaged_deflate_stream_is_corrupt() {
        let data = sample_block(BLOCK_SIZE, 16);
        let mut encoded = codec(deflate(), None).encode(BlockId(16), &data).unwrap();
        let last = encoded.body.len() - 1;
        encoded.body.to_mut()[last] ^= 0xff; // Adler-32 checksum
        assert_corrupt(decode(plain(), 16, &encoded), 16, "invalid deflate data");
        encoded.body.to_mut()[last] ^= 0xff;
        encoded.body.to_mut().extend_from_slice(b"junk");
        assert_corrupt(
            decode(plain(), 16, &encoded),
            16,
            "garbage after the deflate data",
        );
    }

    #[test]
    fn unencrypted_block_is_rejected_when_encryption_is_configured() {
        let data = sample_block(BLOCK_SIZE, 17);
        for writer in [plain(), &codec(deflate(), None), &codec(zstd(), None)] {
            let encoded = writer.encode(BlockId(17), &data).unwrap();
            assert_corrupt(
                decode(encrypted(), 17, &encoded),
                17,
                "was supposed to be encrypted but wasn't",
            );
        }
    }

    #[test]
    fn encrypted_block_is_rejected_without_encrypt_flag() {
        let data = sample_block(BLOCK_SIZE, 18);
        let encoded = encrypted().encode(BlockId(18), &data).unwrap();
        assert_corrupt(
            decode(plain(), 18, &encoded),
            18,
            "is encrypted with \"AES-128-CBC\" but \"--encrypt\" was not specified",
        );
    }

    #[test]
    fn unknown_encoding_token_is_rejected() {
        let data = sample_block(BLOCK_SIZE, 19);
        for encoding in ["gzip", "deflate, br", "identity"] {
            let result =
                plain().decode(BlockId(19), data.clone(), Some(encoding), None, BLOCK_SIZE);
            let token = encoding.rsplit(", ").next().unwrap();
            assert_corrupt(
                result,
                19,
                &format!("returned unexpected encoding \"{token}\""),
            );
        }
    }

    #[test]
    fn block_encrypted_with_another_cipher_is_rejected() {
        let aes256 = codec(deflate(), Some(encryption(Cipher::Aes256Cbc, "password")));
        let data = sample_block(BLOCK_SIZE, 20);
        let encoded = aes256.encode(BlockId(20), &data).unwrap();
        assert_corrupt(
            decode(encrypted(), 20, &encoded),
            20,
            "is encrypted with \"AES-256-CBC\" but \"AES-128-CBC\" is configured",
        );
    }

    #[test]
    fn decompressed_length_must_equal_block_size() {
        for writer in [
            codec(deflate(), None),
            codec(zstd(), None),
            codec(None, None),
        ] {
            for written_size in [BLOCK_SIZE / 2, BLOCK_SIZE * 2] {
                let data = sample_block(written_size, 21);
                let encoded = writer.encode(BlockId(21), &data).unwrap();
                let result = decode(plain(), 21, &encoded);
                let expected = if written_size > BLOCK_SIZE
                    && encoded.content_encoding.as_deref() == Some("deflate")
                {
                    // Decompression stops at the limit; the true length is never materialised.
                    "returned more than 4096 bytes".to_string()
                } else if encoded.content_encoding.is_none() && written_size > BLOCK_SIZE {
                    // 8192 raw bytes exceed the maximum body size before any decoding.
                    "oversize body".to_string()
                } else {
                    format!("returned {written_size} != 4096 bytes")
                };
                assert_corrupt(result, 21, &expected);
            }
        }
    }

    #[test]
    fn zstd_frame_without_size_is_bounded_too() {
        /// A frame like a streaming writer makes: no content size in its header.
        fn unsized_frame(data: &[u8]) -> Vec<u8> {
            use std::io::Write as _;
            let mut encoder = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
            encoder.write_all(data).unwrap();
            let frame = encoder.finish().unwrap();
            assert_eq!(
                zstd::zstd_safe::get_frame_content_size(&frame).unwrap(),
                None
            );
            frame
        }
        let long = unsized_frame(&sample_block(BLOCK_SIZE * 4, 22));
        let result = plain().decode(BlockId(22), long, Some("zstd"), None, BLOCK_SIZE);
        assert_corrupt(result, 22, "returned more than 4096 bytes");

        let exact = sample_block(BLOCK_SIZE, 22);
        let body = unsized_frame(&exact);
        let decoded = plain().decode(BlockId(22), body, Some("zstd"), None, BLOCK_SIZE);
        assert_eq!(decoded.unwrap(), exact);

        let short = unsized_frame(&sample_block(BLOCK_SIZE / 2, 22));
        let result = plain().decode(BlockId(22), short, Some("zstd"), None, BLOCK_SIZE);
        assert_corrupt(result, 22, "returned 2048 != 4096 bytes");
    }

    #[test]
    fn oversize_body_is_rejected_before_decoding() {
        assert_eq!(max_body_len(4096), 4096 + 1 + 13 + 16);
        assert_eq!(max_body_len(1 << 20), (1 << 20) + 256 + 64 + 13 + 16);
        let body = vec![0xaa; max_body_len(BLOCK_SIZE) + 1];
        // Even with a valid-looking encoding and a signature, nothing is decrypted or inflated.
        let result = encrypted().decode(
            BlockId(23),
            body,
            Some("deflate, encrypt-AES-128-CBC"),
            Some("\"0000000000000000000000000000000000000000\""),
            BLOCK_SIZE,
        );
        assert_corrupt(result, 23, "oversize body");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn modes() -> &'static [Codec] {
            static MODES: OnceLock<Vec<Codec>> = OnceLock::new();
            MODES.get_or_init(|| {
                vec![
                    codec(None, None),
                    codec(deflate(), None),
                    codec(zstd(), None),
                    codec(deflate(), Some(encryption(Cipher::Aes128Cbc, "pw"))),
                    codec(zstd(), Some(encryption(Cipher::Aes256Cbc, "pw"))),
                    codec(None, Some(encryption(Cipher::Aes192Cbc, "pw"))),
                ]
            })
        }

        /// Blocks of 512 B..64 KiB (multiples of 16, as encryption requires), mixing random
        /// bytes with runs so both compressible and incompressible data occur.
        fn block_contents() -> impl Strategy<Value = Vec<u8>> {
            (32usize..=4096, any::<u64>(), 0u8..=3).prop_map(|(units, seed, runs)| {
                let mut state = seed | 1;
                (0..units * 16)
                    .map(|i| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        if (i / 1024) % 4 < usize::from(runs) {
                            (i / 1024) as u8
                        } else {
                            state as u8
                        }
                    })
                    .collect()
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

            #[test]
            fn every_mode_round_trips(data in block_contents(), block in any::<u32>()) {
                for (index, codec) in modes().iter().enumerate() {
                    let encoded = codec.encode(BlockId(block), &data).unwrap();
                    prop_assert!(encoded.body.len() <= max_body_len(data.len()), "mode {}", index);
                    let decoded = codec.decode(
                        BlockId(block),
                        encoded.body.into_owned(),
                        encoded.content_encoding.as_deref(),
                        encoded.hmac_header.as_deref(),
                        data.len(),
                    );
                    prop_assert_eq!(decoded.unwrap(), data.clone(), "mode {}", index);
                }
            }
        }
    }
}
