//! The S3 GET decode path: Content-Encoding parsing, decompression, decryption and HMAC check
//! must answer Ok or a clean Err for any body and headers, with output bounded by the block size.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use s3backer::geometry::BlockId;
use s3backer::layer::codec::{Cipher, Codec, CodecConfig, Compression, Encryption};

const BLOCK_SIZES: [usize; 3] = [512, 4096, 65536];

#[derive(Arbitrary, Debug)]
enum Body {
    /// Arbitrary bytes as the object body.
    Raw(Vec<u8>),
    /// A block encoded by `codec`, then damaged: reaches decrypt/decompress past the HMAC.
    Encoded {
        fill: Vec<u8>,
        flips: Vec<(u16, u8)>,
        truncate: Option<u16>,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    codec: u8,
    block_size: u8,
    block: u32,
    content_encoding: Option<String>,
    hmac_header: Option<String>,
    body: Body,
}

/// Deriving keys costs two PBKDF2 runs: build every codec once per process.
fn codecs() -> &'static [Codec] {
    static CODECS: OnceLock<Vec<Codec>> = OnceLock::new();
    CODECS.get_or_init(|| {
        let compressions = [
            None,
            Some(Compression::Deflate { level: None }),
            Some(Compression::Zstd { level: Some(1) }),
        ];
        let encryptions = [None, Some(Cipher::Aes128Cbc), Some(Cipher::Aes256Cbc)];
        let mut codecs = Vec::new();
        for compression in &compressions {
            for cipher in encryptions {
                let config = CodecConfig {
                    compression: compression.clone(),
                    encryption: cipher.map(|cipher| Encryption {
                        cipher,
                        password: "fuzz".into(),
                        key_length: 0,
                        salt: "bucket/".into(),
                    }),
                    default_content_encoding: None,
                };
                codecs.push(Codec::new(config).expect("valid codec"));
            }
        }
        codecs.push(
            Codec::new(CodecConfig {
                default_content_encoding: Some("deflate".into()),
                ..CodecConfig::default()
            })
            .expect("valid codec"),
        );
        codecs
    })
}

fuzz_target!(|input: Input| {
    let codecs = codecs();
    let index = usize::from(input.codec) % codecs.len();
    let codec = &codecs[index];
    // The last codec assumes `deflate` for bodies without Content-Encoding, like C's
    // --defaultContentEncoding; its own raw writes do not round-trip by design.
    let round_trips = index != codecs.len() - 1;
    let block_size = BLOCK_SIZES[usize::from(input.block_size) % BLOCK_SIZES.len()];
    let block = BlockId(input.block);
    let (body, content_encoding, hmac_header) = match input.body {
        Body::Raw(body) => (body, input.content_encoding, input.hmac_header),
        Body::Encoded {
            fill,
            flips,
            truncate,
        } => {
            let data: Vec<u8> = if fill.is_empty() {
                vec![0; block_size]
            } else {
                fill.iter().copied().cycle().take(block_size).collect()
            };
            let encoded = codec.encode(block, &data).expect("encode never fails");
            // A clean round trip must give the data back.
            if round_trips && flips.is_empty() && truncate.is_none() {
                let decoded = codec
                    .decode(
                        block,
                        encoded.body.to_vec(),
                        encoded.content_encoding.as_deref(),
                        encoded.hmac_header.as_deref(),
                        block_size,
                    )
                    .expect("round trip");
                assert_eq!(decoded, data);
            }
            let mut body = encoded.body.into_owned();
            for (at, xor) in flips {
                if !body.is_empty() {
                    let at = usize::from(at) % body.len();
                    body[at] ^= xor;
                }
            }
            if let Some(len) = truncate {
                body.truncate(usize::from(len));
            }
            (
                body,
                input.content_encoding.or(encoded.content_encoding),
                input.hmac_header.or(encoded.hmac_header),
            )
        }
    };
    if let Ok(data) = codec.decode(
        block,
        body,
        content_encoding.as_deref(),
        hmac_header.as_deref(),
        block_size,
    ) {
        assert_eq!(data.len(), block_size);
    }
});
