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

/// KEY and IVKEY of spec 4.3, both `key_len` bytes.
fn derive_keys(password: &str, salt: &str, key_len: usize) -> (Vec<u8>, Vec<u8>) {
    let mut key = vec![0u8; key_len];
    pbkdf2::pbkdf2_hmac::<Sha1>(
        password.as_bytes(),
        salt.as_bytes(),
        PBKDF2_ROUNDS,
        &mut key,
    );
    let mut iv_key = vec![0u8; key_len];
    pbkdf2::pbkdf2_hmac::<Sha1>(&key, &key, PBKDF2_ROUNDS, &mut iv_key);
    (key, iv_key)
}

/// Keys derived once from the password (cloning copies them; it does not derive again); encrypts, decrypts and signs block bodies.
#[derive(Clone)]
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
        let (key, iv_key) = derive_keys(&config.password, &config.salt, key_len);
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
        for (byte, digit) in iv.iter_mut().zip(hex8(block)) {
            *byte ^= digit;
        }
        self.iv_key.encrypt_block(&mut iv);
        iv
    }

    fn tag(&self, block: BlockId, ciphertext: &[u8]) -> Hmac<Sha1> {
        let mut mac = self.mac.clone();
        mac.update(&hex8(block));
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

/// `BlockId::hex8` without its heap allocation, which would run twice per block here.
fn hex8(block: BlockId) -> [u8; 8] {
    let mut digits = [0u8; 8];
    for (index, digit) in digits.iter_mut().enumerate() {
        let nibble = (block.0 >> (28 - 4 * index)) & 0xf;
        *digit = b"0123456789abcdef"[nibble as usize];
    }
    digits
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

#[cfg(test)]
mod tests {
    use super::*;
    use base64::prelude::{BASE64_STANDARD, Engine as _};
    use md5::{Digest as _, Md5};

    const PASSWORD: &str = "password";

    fn crypto(cipher: Cipher, salt: &str) -> BlockCrypto {
        BlockCrypto::new(&Encryption {
            cipher,
            password: PASSWORD.into(),
            key_length: 0,
            salt: salt.into(),
        })
        .unwrap()
    }

    fn unhex(text: &str) -> Vec<u8> {
        hex::decode(text).unwrap()
    }

    fn content_md5(body: &[u8]) -> String {
        BASE64_STANDARD.encode(Md5::digest(body))
    }

    #[test]
    fn hex8_matches_block_id_formatting() {
        for block in [0, 1, 0x1234, 0xdead_beef, u32::MAX] {
            assert_eq!(hex8(BlockId(block)), BlockId(block).hex8().as_bytes());
        }
    }

    #[test]
    fn cipher_names_parse_case_insensitively() {
        assert_eq!(Cipher::from_name("aes-128-cbc"), Some(Cipher::Aes128Cbc));
        assert_eq!(Cipher::from_name("AES-192-CBC"), Some(Cipher::Aes192Cbc));
        assert_eq!(Cipher::from_name("Aes-256-Cbc"), Some(Cipher::Aes256Cbc));
        assert_eq!(Cipher::from_name("aes256"), None);
        assert_eq!(Cipher::from_name("AES-128-ECB"), None);
        assert_eq!(Cipher::Aes192Cbc.native_key_len(), 24);
    }

    #[test]
    fn spec_11_2_key_derivation_aes128() {
        let (key, iv_key) = derive_keys(PASSWORD, "mybucket/", 16);
        assert_eq!(hex::encode(key), "7cdd755be4fd90db79fd27d99f1f3cbd");
        assert_eq!(hex::encode(iv_key), "82849858ec20fd02815fea709b84c1e8");

        let (key, iv_key) = derive_keys(PASSWORD, "mybucket/vm1/", 16);
        assert_eq!(hex::encode(key), "2a31f297533a065b92ad75ec3a7c66e8");
        assert_eq!(hex::encode(iv_key), "cb3ef977c32fbe9ed9b8893a44ed50f7");
    }

    #[test]
    fn spec_11_2_key_derivation_and_iv_aes256() {
        let (key, iv_key) = derive_keys(PASSWORD, "mybucket/", 32);
        assert_eq!(
            hex::encode(key),
            "7cdd755be4fd90db79fd27d99f1f3cbd1ad44a6a5e80c6163f8882d55f4c6dc7"
        );
        assert_eq!(
            hex::encode(iv_key),
            "dd002b5f58ec4607d51be7fae151e3a51d77840ec23905b679576b67f3d8de11"
        );
        let crypto = crypto(Cipher::Aes256Cbc, "mybucket/");
        assert_eq!(
            hex::encode(crypto.iv(BlockId(0))),
            "bd9ca1fb5abc94742cc22d50b6e8c20a"
        );
    }

    #[test]
    fn spec_11_3_per_block_iv() {
        let plain = crypto(Cipher::Aes128Cbc, "mybucket/");
        assert_eq!(
            hex::encode(plain.iv(BlockId(0))),
            "2c374e2e2b9547ff445a86e72dc1f330"
        );
        assert_eq!(
            hex::encode(plain.iv(BlockId(0x1234))),
            "2ee2e117c0780a5989f8f883e26548ce"
        );
        let prefixed = crypto(Cipher::Aes128Cbc, "mybucket/vm1/");
        assert_eq!(
            hex::encode(prefixed.iv(BlockId(0))),
            "c61a033517fdefcd155b1f990a679a16"
        );
        assert_eq!(
            hex::encode(prefixed.iv(BlockId(0x1234))),
            "4f16f9665736ccecac5c86988159dd68"
        );
    }

    /// The fixed zlib stream of 4096 bytes of 0x01 from spec 11.4.
    const SPEC_COMPRESSED: &str = "789cedc1010d000000c2a0bd7f697b38a00000008077031f801001";

    #[test]
    fn spec_11_4_ciphertext_hmac_and_content_md5() {
        let crypto = crypto(Cipher::Aes128Cbc, "mybucket/");
        let cases = [
            (
                0,
                "545e3bf5f58224a76ab62d95c0b228faed93fcc25163f01af389d6adcedbfd04",
                "\"1d44732232dadb299a8b835e875da0fb6fe4a405\"",
                "HKYkgNksTZwH6uGPU1SRFg==",
            ),
            (
                0x1234,
                "7ed17a044bf445f73a912b789a2f911688e0127e5dadb218fade66e721a740c8",
                "\"b5500d52aa61d796f23c0775562024c08090abec\"",
                "m+ip0kKNc9m6Mibo6ywcrg==",
            ),
        ];
        for (block, ciphertext, hmac_header, md5) in cases {
            let mut body = unhex(SPEC_COMPRESSED);
            let tag = crypto.encrypt(BlockId(block), &mut body);
            assert_eq!(hex::encode(&body), ciphertext, "block {block:#x}");
            assert_eq!(format_tag_header(&tag), hmac_header, "block {block:#x}");
            assert_eq!(content_md5(&body), md5, "block {block:#x}");

            crypto
                .decrypt(
                    BlockId(block),
                    &mut body,
                    &parse_tag_header(hmac_header).unwrap(),
                )
                .unwrap();
            assert_eq!(body, unhex(SPEC_COMPRESSED));
        }
    }

    #[test]
    fn spec_11_5_encryption_without_compression() {
        let crypto = crypto(Cipher::Aes128Cbc, "mybucket/");
        let plain: Vec<u8> = (1..=32).collect();
        let mut body = plain.clone();
        let tag = crypto.encrypt(BlockId(0x1234), &mut body);
        assert_eq!(
            hex::encode(&body),
            "8578a7cb4fa77f40972f5e8d0c8405fa2cbf20db501f357ba515156940226e32\
             fc1bd0206b0848bfd84f659bb292da26"
        );
        assert_eq!(hex::encode(tag), "7dde8fc7f4bfa3b5c6271b356551c3a78c2d7985");
        crypto.decrypt(BlockId(0x1234), &mut body, &tag).unwrap();
        assert_eq!(body, plain);
    }

    #[test]
    fn key_length_longer_than_native_keys_the_hmac_with_all_bytes() {
        let long = BlockCrypto::new(&Encryption {
            cipher: Cipher::Aes128Cbc,
            password: PASSWORD.into(),
            key_length: 32,
            salt: "mybucket/".into(),
        })
        .unwrap();
        let native = crypto(Cipher::Aes128Cbc, "mybucket/");
        let mut long_body = unhex(SPEC_COMPRESSED);
        let mut native_body = long_body.clone();
        let long_tag = long.encrypt(BlockId(0), &mut long_body);
        let native_tag = native.encrypt(BlockId(0), &mut native_body);
        // KEY[0..16] is the same (PBKDF2 prefix property) but IVKEY and the HMAC key differ.
        assert_ne!(long_body, native_body);
        assert_ne!(long_tag, native_tag);
        long.decrypt(BlockId(0), &mut long_body, &long_tag).unwrap();
        assert_eq!(long_body, unhex(SPEC_COMPRESSED));
    }

    #[test]
    fn key_length_out_of_range_is_rejected() {
        for key_length in [8, 15, 65] {
            let result = BlockCrypto::new(&Encryption {
                cipher: Cipher::Aes128Cbc,
                password: PASSWORD.into(),
                key_length,
                salt: "mybucket/".into(),
            });
            assert!(
                matches!(&result, Err(Error::Invalid(msg)) if msg.contains("key length")),
                "key length {key_length}"
            );
        }
    }

    #[test]
    fn bad_padding_after_good_signature_is_corrupt_not_a_panic() {
        let crypto = crypto(Cipher::Aes128Cbc, "mybucket/");
        // 16 zero bytes encrypt to two blocks; the first alone decrypts to a block ending in 0x00,
        // which is not valid PKCS#7.
        let mut body = vec![0u8; 16];
        crypto.encrypt(BlockId(7), &mut body);
        body.truncate(16);
        let tag: Tag = crypto.tag(BlockId(7), &body).finalize().into_bytes().into();
        let err = crypto.decrypt(BlockId(7), &mut body, &tag).unwrap_err();
        assert!(
            matches!(&err, Error::Corrupt { block: BlockId(7), msg } if msg.contains("padding")),
            "{err}"
        );
    }

    #[test]
    fn partial_cipher_block_after_good_signature_is_corrupt() {
        let crypto = crypto(Cipher::Aes128Cbc, "mybucket/");
        for len in [0, 5, 31] {
            let mut body = vec![0x5a; len];
            let tag: Tag = crypto.tag(BlockId(3), &body).finalize().into_bytes().into();
            let err = crypto.decrypt(BlockId(3), &mut body, &tag).unwrap_err();
            assert!(
                matches!(&err, Error::Corrupt { msg, .. } if msg.contains("whole number")),
                "len {len}: {err}"
            );
        }
    }

    #[test]
    fn hmac_header_parsing_follows_c_rules() {
        let digits = "1d44732232dadb299a8b835e875da0fb6fe4a405";
        let expected: Tag = unhex(digits).try_into().unwrap();
        for good in [
            format!("\"{digits}\""),
            format!("  \t\"{digits}\""),
            format!("\"{}\"", digits.to_uppercase()),
            format!("\"{digits}-trailing"),
        ] {
            assert_eq!(parse_tag_header(&good), Some(expected), "{good:?}");
        }
        for bad in [
            digits.to_string(),
            format!("\"{}\"", &digits[..39]),
            format!("\"{}g\"", &digits[..39]),
            String::new(),
            "\"".to_string(),
            format!("x\"{digits}\""),
        ] {
            assert_eq!(parse_tag_header(&bad), None, "{bad:?}");
        }
    }
}
