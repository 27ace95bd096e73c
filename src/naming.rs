//! Object names of blocks and of the mount token (spec 1.2-1.4).

use crate::geometry::BlockId;

/// Name of the mount token object, after the prefix.
pub const MOUNT_TOKEN_NAME: &str = "s3backer-mounted";

/// s3backer's 32-bit mixing function for `--blockHashPrefix` (spec 1.3).
pub fn block_hash(block: BlockId) -> u32 {
    let mut h = block.0;
    for round in (1..=12u32).rev() {
        h = ((h >> 8) ^ h).wrapping_mul(0x6b).wrapping_add(round);
    }
    h
}

/// How block numbers map to object keys in one bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Naming {
    /// Effective prefix, used verbatim (e.g. `vm1/`).
    pub prefix: String,
    pub hash_prefix: bool,
}

impl Naming {
    pub fn new(prefix: impl Into<String>, hash_prefix: bool) -> Self {
        Naming {
            prefix: prefix.into(),
            hash_prefix,
        }
    }

    /// Object key of a block.
    pub fn block_key(&self, block: BlockId) -> String {
        if self.hash_prefix {
            format!("{}{:08x}-{:08x}", self.prefix, block_hash(block), block.0)
        } else {
            format!("{}{:08x}", self.prefix, block.0)
        }
    }

    pub fn mount_token_key(&self) -> String {
        format!("{}{}", self.prefix, MOUNT_TOKEN_NAME)
    }

    /// Parses a listed key back into a block number; `None` for anything that is not exactly a
    /// block of this naming below `num_blocks` (wrong prefix, case, hash, or length).
    pub fn parse_key(&self, key: &str, num_blocks: u32) -> Option<BlockId> {
        let rest = key.strip_prefix(self.prefix.as_str())?;
        let block = if self.hash_prefix {
            let (hash, num) = rest.split_once('-')?;
            let hash = parse_hex8(hash)?;
            let block = BlockId(parse_hex8(num)?);
            if block_hash(block) != hash {
                return None;
            }
            block
        } else {
            BlockId(parse_hex8(rest)?)
        };
        (block.0 < num_blocks).then_some(block)
    }

    /// The "name" a listing range is keyed by: the hash with hash prefixes, else the block number.
    pub fn sort_name(&self, block: BlockId) -> u32 {
        if self.hash_prefix {
            block_hash(block)
        } else {
            block.0
        }
    }
}

/// Exactly 8 lowercase hex digits (uppercase is not a block name, spec 1.2).
fn parse_hex8(s: &str) -> Option<u32> {
    if s.len() != 8
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_vectors_for_block_keys() {
        let plain = Naming::new("", false);
        let prefixed = Naming::new("vm1/", false);
        let hashed = Naming::new("", true);
        let cases: [(u32, &str, &str); 6] = [
            (0, "00000000", "c448b72c-00000000"),
            (1, "00000001", "d211cad9-00000001"),
            (2, "00000002", "7183baa1-00000002"),
            (0x1234, "00001234", "b74e46df-00001234"),
            (0x7fffffff, "7fffffff", "8f92efdc-7fffffff"),
            (0xfffffffe, "fffffffe", "b5822738-fffffffe"),
        ];
        for (n, key, hashed_key) in cases {
            assert_eq!(plain.block_key(BlockId(n)), key);
            assert_eq!(prefixed.block_key(BlockId(n)), format!("vm1/{key}"));
            assert_eq!(hashed.block_key(BlockId(n)), hashed_key);
        }
        assert_eq!(prefixed.mount_token_key(), "vm1/s3backer-mounted");
    }

    #[test]
    fn parse_accepts_only_exact_block_names() {
        let plain = Naming::new("p/", false);
        assert_eq!(plain.parse_key("p/00001234", 0x2000), Some(BlockId(0x1234)));
        assert_eq!(
            plain.parse_key("p/00001234", 0x1234),
            None,
            "beyond num_blocks"
        );
        assert_eq!(plain.parse_key("p/0000123A", u32::MAX), None, "uppercase");
        assert_eq!(plain.parse_key("p/0000123", u32::MAX), None, "short");
        assert_eq!(plain.parse_key("p/000012345", u32::MAX), None, "long");
        assert_eq!(plain.parse_key("q/00001234", u32::MAX), None, "prefix");
        assert_eq!(plain.parse_key("p/s3backer-mounted", u32::MAX), None);
        let hashed = Naming::new("", true);
        assert_eq!(
            hashed.parse_key("b74e46df-00001234", u32::MAX),
            Some(BlockId(0x1234))
        );
        assert_eq!(
            hashed.parse_key("b74e46de-00001234", u32::MAX),
            None,
            "bad hash"
        );
        assert_eq!(hashed.parse_key("00001234", u32::MAX), None);
    }
}
