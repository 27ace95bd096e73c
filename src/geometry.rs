//! Disk geometry: total size, block size and the arithmetic between byte offsets and block numbers.

use std::fmt;

/// A block number. s3backer block numbers are always 32-bit (spec section 1).
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockId(pub u32);

impl BlockId {
    /// The 8 lowercase hex digits used in object names and log lines.
    pub fn hex8(self) -> String {
        format!("{:08x}", self.0)
    }
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

/// Why a size/block-size pair cannot form a disk. Messages follow the C program.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    #[error("block size must be a power of 2")]
    BlockSizeNotPowerOfTwo,
    #[error("file size must be a multiple of block size")]
    SizeNotMultiple,
    #[error("file size must be greater than zero")]
    ZeroSize,
    #[error("more than 2^32 blocks: decrease file size or increase block size")]
    TooManyBlocks,
}

/// Size of the disk and of its blocks; the only place that does offset/block arithmetic.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Geometry {
    block_size: u32,
    num_blocks: u32,
}

/// One piece of a byte range that lies inside a single block.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct BlockSpan {
    pub block: BlockId,
    /// Offset of the piece inside the block.
    pub offset: u32,
    /// Length of the piece (1..=block_size).
    pub len: u32,
    /// Offset of the piece inside the caller's buffer.
    pub buf_offset: usize,
}

impl BlockSpan {
    pub fn is_whole(&self, geometry: &Geometry) -> bool {
        self.offset == 0 && self.len == geometry.block_size()
    }
}

impl Geometry {
    pub fn new(file_size: u64, block_size: u32) -> Result<Self, GeometryError> {
        if block_size == 0 || !block_size.is_power_of_two() {
            return Err(GeometryError::BlockSizeNotPowerOfTwo);
        }
        if file_size == 0 {
            return Err(GeometryError::ZeroSize);
        }
        if !file_size.is_multiple_of(u64::from(block_size)) {
            return Err(GeometryError::SizeNotMultiple);
        }
        let blocks = file_size / u64::from(block_size);
        let num_blocks = u32::try_from(blocks).map_err(|_| GeometryError::TooManyBlocks)?;
        Ok(Geometry {
            block_size,
            num_blocks,
        })
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn block_size_usize(&self) -> usize {
        self.block_size as usize
    }

    pub fn num_blocks(&self) -> u32 {
        self.num_blocks
    }

    pub fn file_size(&self) -> u64 {
        u64::from(self.block_size) * u64::from(self.num_blocks)
    }

    pub fn contains(&self, block: BlockId) -> bool {
        block.0 < self.num_blocks
    }

    /// Byte offset of the first byte of `block`.
    pub fn block_offset(&self, block: BlockId) -> u64 {
        u64::from(block.0) * u64::from(self.block_size)
    }

    /// Clamps `[offset, offset+len)` to the disk; `None` if `offset` is past the end.
    pub fn clamp(&self, offset: u64, len: u64) -> Option<u64> {
        let size = self.file_size();
        if offset > size {
            return None;
        }
        Some(len.min(size - offset))
    }

    /// Splits an in-range byte range into per-block pieces, in order.
    /// The caller must have clamped the range with [`Geometry::clamp`].
    pub fn spans(&self, offset: u64, len: u64) -> impl Iterator<Item = BlockSpan> + use<> {
        let bs = u64::from(self.block_size);
        let end = offset + len;
        debug_assert!(end <= self.file_size());
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let block = pos / bs;
            let in_block = pos % bs;
            let piece = (bs - in_block).min(end - pos);
            let span = BlockSpan {
                block: BlockId(block as u32),
                offset: in_block as u32,
                len: piece as u32,
                buf_offset: (pos - offset) as usize,
            };
            pos += piece;
            Some(span)
        })
    }
}

/// Formats a byte count like C s3backer: the largest binary unit dividing it exactly (`4k`, `1g`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [char; 6] = ['k', 'm', 'g', 't', 'p', 'e'];
    if bytes == 0 {
        return "0".to_string();
    }
    let mut value = bytes;
    let mut unit = None;
    for u in UNITS {
        if value.is_multiple_of(1024) {
            value /= 1024;
            unit = Some(u);
        } else {
            break;
        }
    }
    match unit {
        Some(u) => format!("{value}{u}"),
        None => value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_geometry() {
        assert_eq!(
            Geometry::new(4096, 3000),
            Err(GeometryError::BlockSizeNotPowerOfTwo)
        );
        assert_eq!(
            Geometry::new(5000, 4096),
            Err(GeometryError::SizeNotMultiple)
        );
        assert_eq!(Geometry::new(0, 4096), Err(GeometryError::ZeroSize));
        assert_eq!(
            Geometry::new(1 << 44, 4096),
            Err(GeometryError::TooManyBlocks)
        );
        let g = Geometry::new((1u64 << 32) * 4096 - 4096, 4096).unwrap();
        assert_eq!(g.num_blocks(), u32::MAX);
    }

    #[test]
    fn spans_split_unaligned_range() {
        let g = Geometry::new(16 * 4096, 4096).unwrap();
        let spans: Vec<_> = g.spans(4000, 4096 * 2).collect();
        assert_eq!(
            spans,
            vec![
                BlockSpan {
                    block: BlockId(0),
                    offset: 4000,
                    len: 96,
                    buf_offset: 0
                },
                BlockSpan {
                    block: BlockId(1),
                    offset: 0,
                    len: 4096,
                    buf_offset: 96
                },
                BlockSpan {
                    block: BlockId(2),
                    offset: 0,
                    len: 4000,
                    buf_offset: 4192
                },
            ]
        );
        assert!(spans[1].is_whole(&g));
        assert!(!spans[0].is_whole(&g));
    }

    #[test]
    fn clamp_handles_end_of_disk() {
        let g = Geometry::new(8192, 4096).unwrap();
        assert_eq!(g.clamp(8000, 1000), Some(192));
        assert_eq!(g.clamp(8192, 10), Some(0));
        assert_eq!(g.clamp(8193, 10), None);
    }

    #[test]
    fn sizes_format_with_largest_exact_unit() {
        assert_eq!(format_size(4096), "4k");
        assert_eq!(format_size(1 << 30), "1g");
        assert_eq!(format_size(3 << 20), "3m");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(format_size(1536), "1536");
    }
}
