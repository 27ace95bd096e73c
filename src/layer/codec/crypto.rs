//! Block encryption and authentication (spec section 4): PBKDF2 keys, per-block IV,
//! AES-CBC with PKCS#7 padding, HMAC-SHA1 over block number, cipher name and ciphertext.

use aes::cipher::block_padding::Pkcs7;
use aes::cipher::{
    BlockCipherDecrypt, BlockCipherEncrypt, BlockModeDecrypt, BlockModeEncrypt, BlockSizeUser,
    InnerIvInit, KeyInit, consts::U16,
};
use hmac::{Hmac, Mac};
use sha1::Sha1;

use super::{Cipher, Encryption};
use crate::error::{Error, Result};
use crate::geometry::BlockId;

const PBKDF2_ROUNDS: u32 = 5000;
/// OpenSSL's EVP_MAX_KEY_LENGTH, the upper bound C s3backer accepts for `--keyLength`.
const MAX_KEY_LEN: usize = 64;
/// AES block size: every ciphertext grows by 1..=16 bytes of PKCS#7 padding.
pub(super) const CIPHER_BLOCK_LEN: usize = 16;
/// An HMAC-SHA1 tag.
pub(super) type Tag = [u8; 20];

impl Cipher {
    /// OpenSSL's short name: written in Content-Encoding and hashed into the HMAC.
    pub fn canonical_name(self) -> &'static str {
        match self {
            Cipher::Aes128Cbc => "AES-128-CBC",
            Cipher::Aes192Cbc => "AES-192-CBC",
            Cipher::Aes256Cbc => "AES-256-CBC",
        }
    }

    /// Parses a `--encrypt=NAME` value, case-insensitively; `None` for unsupported ciphers.
    pub fn from_name(name: &str) -> Option<Cipher> {
        [Cipher::Aes128Cbc, Cipher::Aes192Cbc, Cipher::Aes256Cbc]
            .into_iter()
            .find(|cipher| cipher.canonical_name().eq_ignore_ascii_case(name))
    }

    /// Key length in bytes the cipher itself uses (the default `--keyLength`).
    pub fn native_key_len(self) -> usize {
        match self {
            Cipher::Aes128Cbc => 16,
            Cipher::Aes192Cbc => 24,
            Cipher::Aes256Cbc => 32,
        }
    }
}

/// An expanded AES key; built once, cloned (a plain copy) for each block's CBC run.
#[derive(Clone)]
enum AesKey {
    Aes128(aes::Aes128),
    Aes192(aes::Aes192),
    Aes256(aes::Aes256),
}

impl AesKey {
    /// `key` must be exactly the cipher's native key length.
    fn new(cipher: Cipher, key: &[u8]) -> Self {
        fn expand<C: KeyInit>(key: &[u8]) -> C {
            C::new_from_slice(key).expect("key sliced to the cipher's native length")
        }
        match cipher {
            Cipher::Aes128Cbc => AesKey::Aes128(expand(key)),
            Cipher::Aes192Cbc => AesKey::Aes192(expand(key)),
            Cipher::Aes256Cbc => AesKey::Aes256(expand(key)),
        }
    }

    fn encrypt_block(&self, block: &mut [u8; CIPHER_BLOCK_LEN]) {
        let block = block.into();
        match self {
            AesKey::Aes128(aes) => aes.encrypt_block(block),
            AesKey::Aes192(aes) => aes.encrypt_block(block),
            AesKey::Aes256(aes) => aes.encrypt_block(block),
        }
    }

    /// Pads `buf` (PKCS#7) and CBC-encrypts it in place.
    fn cbc_encrypt(&self, iv: &[u8; CIPHER_BLOCK_LEN], buf: &mut Vec<u8>) {
        match self {
            AesKey::Aes128(aes) => cbc_encrypt(aes, iv, buf),
            AesKey::Aes192(aes) => cbc_encrypt(aes, iv, buf),
            AesKey::Aes256(aes) => cbc_encrypt(aes, iv, buf),
        }
    }

    /// CBC-decrypts `buf` in place and strips the padding; `false` if the padding is invalid.
    fn cbc_decrypt(&self, iv: &[u8; CIPHER_BLOCK_LEN], buf: &mut Vec<u8>) -> bool {
        match self {
            AesKey::Aes128(aes) => cbc_decrypt(aes, iv, buf),
            AesKey::Aes192(aes) => cbc_decrypt(aes, iv, buf),
            AesKey::Aes256(aes) => cbc_decrypt(aes, iv, buf),
        }
    }
}

fn cbc_encrypt<C>(cipher: &C, iv: &[u8; CIPHER_BLOCK_LEN], buf: &mut Vec<u8>)
where
    C: BlockCipherEncrypt + BlockSizeUser<BlockSize = U16> + Clone,
{
    let msg_len = buf.len();
    buf.resize((msg_len / CIPHER_BLOCK_LEN + 1) * CIPHER_BLOCK_LEN, 0);
    let ciphertext_len = cbc::Encryptor::<C>::inner_iv_init(cipher.clone(), iv.into())
        .encrypt_padded::<Pkcs7>(buf, msg_len)
        .expect("buffer was sized for the padding")
        .len();
    debug_assert_eq!(ciphertext_len, buf.len());
}

fn cbc_decrypt<C>(cipher: &C, iv: &[u8; CIPHER_BLOCK_LEN], buf: &mut Vec<u8>) -> bool
where
    C: BlockCipherDecrypt + BlockSizeUser<BlockSize = U16> + Clone,
{
    let decryptor = cbc::Decryptor::<C>::inner_iv_init(cipher.clone(), iv.into());
    match decryptor.decrypt_padded::<Pkcs7>(buf) {
        Ok(plain) => {
            let plain_len = plain.len();
            buf.truncate(plain_len);
            true
        }
        Err(_) => false,
    }
}

/// Keys derived once from the password; encrypts, decrypts and signs block bodies.
pub(super) struct BlockCrypto {
    cipher: Cipher,
    data_key: AesKey,
    iv_key: AesKey,
    /// IVKEY[0..16]: the CBC IV of the one-block IV encryption, applied as an XOR mask.
    iv_mask: [u8; CIPHER_BLOCK_LEN],
    /// HMAC keyed with all KL bytes of KEY; cloned per block so the key pads are hashed once.
    mac: Hmac<Sha1>,
}

impl BlockCrypto {
    pub(super) fn new(config: &Encryption) -> Result<Self> {
        let cipher = config.cipher;
        let native = cipher.native_key_len();
        let key_len = match config.key_length {
            0 => native,
            n => n,
        };
        if !(native..=MAX_KEY_LEN).contains(&key_len) {
            return Err(Error::Invalid(format!(
                "key length {key_len} is invalid for {}: it must be between {native} and {MAX_KEY_LEN}",
                cipher.canonical_name()
            )));
        }
        let mut key = vec![0u8; key_len];
        pbkdf2::pbkdf2_hmac::<Sha1>(
            config.password.as_bytes(),
            config.salt.as_bytes(),
            PBKDF2_ROUNDS,
            &mut key,
        );
        let mut iv_key = vec![0u8; key_len];
        pbkdf2::pbkdf2_hmac::<Sha1>(&key, &key, PBKDF2_ROUNDS, &mut iv_key);

        let mut iv_mask = [0u8; CIPHER_BLOCK_LEN];
        iv_mask.copy_from_slice(&iv_key[..CIPHER_BLOCK_LEN]);
        Ok(BlockCrypto {
            cipher,
            data_key: AesKey::new(cipher, &key[..native]),
            iv_key: AesKey::new(cipher, &iv_key[..native]),
            iv_mask,
            mac: <Hmac<Sha1>>::new_from_slice(&key).expect("HMAC accepts any key length"),
        })
    }

    pub(super) fn cipher(&self) -> Cipher {
        self.cipher
    }

    /// IV = CBC-encrypt(IVKEY, iv = IVKEY[0..16], HEX8(n) + 8 zero bytes), one block, no padding.
    fn iv(&self, block: BlockId) -> [u8; CIPHER_BLOCK_LEN] {
        let mut iv = self.iv_mask;
        let hex = block.hex8();
        for (byte, digit) in iv.iter_mut().zip(hex.as_bytes()) {
            *byte ^= digit;
        }
        self.iv_key.encrypt_block(&mut iv);
        iv
    }

    fn tag(&self, block: BlockId, ciphertext: &[u8]) -> Hmac<Sha1> {
        let mut mac = self.mac.clone();
        mac.update(block.hex8().as_bytes());
        mac.update(self.cipher.canonical_name().as_bytes());
        mac.update(ciphertext);
        mac
    }

    /// Encrypts `buf` in place (reserve `CIPHER_BLOCK_LEN` spare capacity to avoid a
    /// reallocation) and returns its HMAC.
    pub(super) fn encrypt(&self, block: BlockId, buf: &mut Vec<u8>) -> Tag {
        self.data_key.cbc_encrypt(&self.iv(block), buf);
        self.tag(block, buf).finalize().into_bytes().into()
    }

    /// Checks the HMAC (constant time), then decrypts `body` in place.
    pub(super) fn decrypt(&self, block: BlockId, body: &mut Vec<u8>, tag: &Tag) -> Result<()> {
        self.tag(block, body).verify_slice(tag).map_err(|_| {
            Error::corrupt(
                block,
                "incorrect signature (did you provide the right password?)",
            )
        })?;
        if body.is_empty() || !body.len().is_multiple_of(CIPHER_BLOCK_LEN) {
            return Err(Error::corrupt(
                block,
                format!(
                    "encrypted body of {} bytes is not a whole number of cipher blocks",
                    body.len()
                ),
            ));
        }
        if !self.data_key.cbc_decrypt(&self.iv(block), body) {
            return Err(Error::corrupt(
                block,
                "invalid padding after decryption (the signature was correct)",
            ));
        }
        Ok(())
    }
}

/// The `x-amz-meta-s3backer-hmac` value for a tag: 40 lowercase hex digits in double quotes.
pub(super) fn format_tag_header(tag: &Tag) -> String {
    format!("\"{}\"", hex::encode(tag))
}

/// Parses `x-amz-meta-s3backer-hmac` like C s3backer: optional whitespace, `"`, then exactly
/// 40 hex digits of either case; anything after them is not checked. `None` if malformed.
pub(super) fn parse_tag_header(value: &str) -> Option<Tag> {
    let digits = value.trim_start().strip_prefix('"')?.get(..2 * 20)?;
    let mut tag = [0u8; 20];
    hex::decode_to_slice(digits, &mut tag).ok()?;
    Some(tag)
}
