//! Property test: random byte-range reads, writes, zeroes, flushes, cache evictions and
//! restarts through the layer stack a mount uses (block_part over zero cache over a small
//! write-back block cache, as `Stack::layers` builds it) read back exactly what a plain
//! `Vec<u8>` model holds, and after shutdown the backend holds it too.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use proptest::prelude::*;
use s3backer::backend::memory::MemoryBackend;
use s3backer::geometry::{BlockId, Geometry};
use s3backer::layer::block_cache::{BlockCache, BlockCacheOptions};
use s3backer::layer::block_part::BlockPart;
use s3backer::layer::codec::{Cipher, Codec, CodecConfig, Compression, EncodedBlock, Encryption};
use s3backer::layer::zero_cache::ZeroCache;
use s3backer::stats::StatsReport;
use s3backer::store::{Block, BlockStore, ReadInfo, WriteInfo};

const BLOCK_SIZE: u32 = 512;
const NUM_BLOCKS: u32 = 16;
const DISK: u64 = BLOCK_SIZE as u64 * NUM_BLOCKS as u64;

/// Objects kept as the bucket keeps them: compressed, encrypted and signed by the real codec.
/// The codec is not a layer (the S3 backend calls it), so this backend stands in for S3.
struct CodecStore {
    geometry: Geometry,
    codec: &'static Codec,
    objects: Mutex<HashMap<u32, EncodedBlock<'static>>>,
}

fn codec() -> &'static Codec {
    static CODEC: OnceLock<Codec> = OnceLock::new();
    CODEC.get_or_init(|| {
        Codec::new(CodecConfig {
            compression: Some(Compression::Zstd { level: None }),
            encryption: Some(Encryption {
                cipher: Cipher::Aes128Cbc,
                password: "model".into(),
                key_length: 0,
                salt: "bucket/".into(),
            }),
            default_content_encoding: None,
        })
        .expect("codec")
    })
}

impl BlockStore for CodecStore {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn read_block(&self, block: BlockId, buf: &mut [u8]) -> s3backer::Result<ReadInfo> {
        let Some(object) = self.objects.lock().get(&block.0).cloned() else {
            buf.fill(0);
            return Ok(ReadInfo {
                zero: true,
                etag: None,
            });
        };
        let data = self.codec.decode(
            block,
            object.body.into_owned(),
            object.content_encoding.as_deref(),
            object.hmac_header.as_deref(),
            buf.len(),
        )?;
        buf.copy_from_slice(&data);
        Ok(ReadInfo::default())
    }

    fn write_block(&self, block: BlockId, data: Block<'_>) -> s3backer::Result<WriteInfo> {
        let mut objects = self.objects.lock();
        match data {
            Block::Zero => {
                objects.remove(&block.0);
            }
            Block::Data(bytes) => {
                let encoded = self.codec.encode(block, bytes)?;
                let body = std::borrow::Cow::Owned(encoded.body.into_owned());
                objects.insert(block.0, EncodedBlock { body, ..encoded });
            }
        }
        Ok(WriteInfo::default())
    }

    fn flush(&self) -> s3backer::Result<()> {
        Ok(())
    }

    fn survey_non_zero(
        &self,
        _threads: usize,
        found: &(dyn Fn(BlockId) + Sync),
    ) -> s3backer::Result<()> {
        let ids: Vec<u32> = self.objects.lock().keys().copied().collect();
        ids.into_iter().for_each(|id| found(BlockId(id)));
        Ok(())
    }

    fn stats(&self, _report: &mut StatsReport) {}

    fn reset_stats(&self) {}
}

#[derive(Clone, Debug)]
enum Op {
    /// Bytes from `seed` (all zero when `seed == 0`) at any offset and length.
    Write {
        offset: u64,
        len: usize,
        seed: u8,
    },
    Read {
        offset: u64,
        len: usize,
    },
    Zero {
        offset: u64,
        len: u64,
    },
    Flush,
    /// Reads the whole disk: more blocks than the cache holds, so every entry is evicted.
    ReadAll,
    /// Shuts the stack down and builds a new one over the same backend.
    Restart,
}

/// Offsets and lengths either block-aligned or arbitrary, up to three blocks long.
fn range() -> impl Strategy<Value = (u64, usize)> {
    let bs = u64::from(BLOCK_SIZE);
    prop_oneof![
        (0..u64::from(NUM_BLOCKS), 1usize..=3)
            .prop_map(move |(block, n)| (block * bs, n * BLOCK_SIZE as usize)),
        (0..DISK, 1usize..=3 * BLOCK_SIZE as usize),
    ]
    .prop_map(|(offset, len)| (offset, len.min((DISK - offset) as usize)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (range(), prop_oneof![Just(0u8), any::<u8>()])
            .prop_map(|((offset, len), seed)| Op::Write { offset, len, seed }),
        3 => range().prop_map(|(offset, len)| Op::Read { offset, len }),
        2 => range().prop_map(|(offset, len)| Op::Zero { offset, len: len as u64 }),
        1 => Just(Op::Flush),
        1 => Just(Op::ReadAll),
        1 => Just(Op::Restart),
    ]
}

fn pattern(seed: u8, offset: u64, len: usize) -> Vec<u8> {
    if seed == 0 {
        return vec![0; len];
    }
    (0..len as u64)
        .map(|i| ((offset + i) as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[derive(Clone, Copy, Debug)]
struct StackShape {
    encoded: bool,
    write_delay_ms: u64,
    cache_blocks: usize,
    read_ahead: u32,
}

/// The layers `Stack::layers` puts over a backend: zero cache over block cache.
fn build(backend: &Arc<dyn BlockStore>, shape: StackShape) -> BlockPart {
    let cache = BlockCache::open(
        backend.clone(),
        BlockCacheOptions {
            size: shape.cache_blocks,
            threads: 2,
            write_delay: Duration::from_millis(shape.write_delay_ms),
            max_dirty: 0,
            read_ahead: shape.read_ahead,
            read_ahead_trigger: 2,
            retry_pause: Duration::from_millis(10),
            ..BlockCacheOptions::default()
        },
    )
    .expect("block cache");
    BlockPart::new(Arc::new(ZeroCache::new(cache)))
}

fn read_all(part: &BlockPart) -> Vec<u8> {
    let mut buf = vec![0xa5; DISK as usize];
    assert_eq!(part.read(0, &mut buf).expect("read whole disk"), buf.len());
    buf
}

fn run(shape: StackShape, ops: &[Op]) -> Result<(), TestCaseError> {
    let geometry = Geometry::new(DISK, BLOCK_SIZE).unwrap();
    let backend: Arc<dyn BlockStore> = if shape.encoded {
        Arc::new(CodecStore {
            geometry,
            codec: codec(),
            objects: Mutex::default(),
        })
    } else {
        Arc::new(MemoryBackend::new(geometry))
    };
    let mut model = vec![0u8; DISK as usize];
    let mut part = build(&backend, shape);
    for (step, op) in ops.iter().enumerate() {
        match *op {
            Op::Write { offset, len, seed } => {
                let data = pattern(seed, offset, len);
                prop_assert_eq!(part.write(offset, &data).expect("write"), len);
                model[offset as usize..offset as usize + len].copy_from_slice(&data);
            }
            Op::Read { offset, len } => {
                let mut buf = vec![0xa5; len];
                prop_assert_eq!(part.read(offset, &mut buf).expect("read"), len);
                let want = &model[offset as usize..offset as usize + len];
                prop_assert!(
                    buf == want,
                    "step {}: read {}+{} differs",
                    step,
                    offset,
                    len
                );
            }
            Op::Zero { offset, len } => {
                part.zero_range(offset, len).expect("zero range");
                model[offset as usize..(offset + len) as usize].fill(0);
            }
            Op::Flush => part.flush().expect("flush"),
            Op::ReadAll => prop_assert!(read_all(&part) == model, "step {}: disk differs", step),
            Op::Restart => {
                part.store().shutdown().expect("shutdown");
                part = build(&backend, shape);
            }
        }
    }
    prop_assert!(read_all(&part) == model, "disk differs at the end");
    part.store().shutdown().expect("shutdown");
    // Shutdown flushed everything: the backend alone holds the model.
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    for (block, want) in (0..NUM_BLOCKS).zip(model.chunks(BLOCK_SIZE as usize)) {
        backend
            .read_block(BlockId(block), &mut buf)
            .expect("backend read");
        prop_assert!(
            buf == want,
            "backend block {} differs after shutdown",
            block
        );
    }
    Ok(())
}

fn shape() -> impl Strategy<Value = StackShape> {
    (
        any::<bool>(),
        prop_oneof![Just(0u64), Just(2)],
        1usize..=4,
        0u32..=2,
    )
        .prop_map(
            |(encoded, write_delay_ms, cache_blocks, read_ahead)| StackShape {
                encoded,
                write_delay_ms,
                cache_blocks,
                read_ahead,
            },
        )
}

proptest! {
    // Each case starts cache worker threads per restart: keep the count bounded (< 60 s).
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn layer_stack_matches_a_plain_byte_model(
        shape in shape(),
        ops in prop::collection::vec(op(), 1..60),
    ) {
        run(shape, &ops)?;
    }
}
