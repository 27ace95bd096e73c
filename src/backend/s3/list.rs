//! ListObjects (v1) survey of stored blocks over parallel name ranges (spec 2.7).

use ureq::http::Method;

use super::client::{Request, S3Client};
use crate::error::{Error, Result};
use crate::geometry::BlockId;

/// One page of a listing.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ListPage {
    pub keys: Vec<String>,
    pub truncated: bool,
}

/// Parses `/ListBucketResult/Contents/Key` and `/ListBucketResult/IsTruncated`.
pub(crate) fn parse_list_page(xml: &[u8]) -> Result<ListPage> {
    use quick_xml::events::Event;
    let malformed =
        |e: &dyn std::fmt::Display| Error::Other(format!("malformed list response: {e}"));
    let mut reader = quick_xml::Reader::from_reader(xml);
    let mut path: Vec<String> = Vec::new();
    // Text of the innermost element; entity references arrive as separate events.
    let mut text = String::new();
    let mut page = ListPage::default();
    let mut buf = Vec::new();
    loop {
        match reader
            .read_event_into(&mut buf)
            .map_err(|e| malformed(&e))?
        {
            Event::Start(tag) => {
                path.push(tag.local_name().as_ref().to_string());
                text.clear();
            }
            Event::Text(t) => text.push_str(&t.xml10_content()),
            Event::GeneralRef(r) => match r.resolve_char_ref().map_err(|e| malformed(&e))? {
                Some(c) => text.push(c),
                None => {
                    let name = r.xml10_content();
                    let resolved = quick_xml::escape::resolve_xml_entity(&name)
                        .ok_or_else(|| malformed(&format!("unknown entity &{name};")))?;
                    text.push_str(resolved);
                }
            },
            Event::End(_) => {
                let names: Vec<&str> = path.iter().map(String::as_str).collect();
                match names.as_slice() {
                    ["ListBucketResult", "Contents", "Key"] => {
                        page.keys.push(std::mem::take(&mut text))
                    }
                    ["ListBucketResult", "IsTruncated"] => page.truncated = text.trim() == "true",
                    _ => {}
                }
                text.clear();
                path.pop();
            }
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    if path.is_empty() {
        Ok(page)
    } else {
        Err(Error::Other("truncated list response".into()))
    }
}

/// Splits `0..=last` into at most `threads` contiguous inclusive ranges.
pub(crate) fn split_ranges(last: u32, threads: usize) -> Vec<(u32, u32)> {
    let total = u64::from(last) + 1;
    let parts = (threads.max(1) as u64).min(total);
    let size = total.div_ceil(parts);
    (0..parts)
        .map(|i| i * size)
        .take_while(|&start| start < total)
        .map(|start| (start as u32, (start + size - 1).min(u64::from(last)) as u32))
        .collect()
}

impl S3Client {
    /// Calls `found` for each block of `num_blocks` stored in the bucket, listing with up to
    /// `threads` parallel ranges of names (block numbers, or hashes with hash prefixes).
    pub fn survey(
        &self,
        num_blocks: u32,
        threads: usize,
        found: &(dyn Fn(BlockId) + Sync),
    ) -> Result<()> {
        if num_blocks == 0 {
            return Ok(());
        }
        let last = if self.opts.naming.hash_prefix {
            u32::MAX
        } else {
            num_blocks - 1
        };
        let ranges = split_ranges(last, threads);
        std::thread::scope(|scope| {
            let workers: Vec<_> = ranges
                .iter()
                .map(|&(min, max)| {
                    scope.spawn(move || self.survey_range(num_blocks, min, max, found))
                })
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join()
                        .unwrap_or_else(|_| Err(Error::Other("list thread panicked".into())))
                })
                .collect::<Result<Vec<()>>>()
                .map(|_| ())
        })
    }

    fn survey_range(
        &self,
        num_blocks: u32,
        min: u32,
        max: u32,
        found: &(dyn Fn(BlockId) + Sync),
    ) -> Result<()> {
        let naming = &self.opts.naming;
        let prefix = &naming.prefix;
        let mut marker = if min == 0 {
            format!("{prefix}0000000/")
        } else {
            format!("{prefix}{:08x}", min - 1)
        };
        // '.' sorts after '-', so every `HEX8(max)` and `HEX8(max)-...` key is below this.
        let end = format!("{prefix}{max:08x}.");
        // Each page advances the marker; the bound only guards against a server that loops.
        for _ in 0..(1u64 << 32) / 1000 + 2 {
            let mut request = Request::new(Method::GET, None);
            request.query = vec![
                ("marker", marker.clone()),
                ("max-keys", "1000".into()),
                ("prefix", prefix.clone()),
            ];
            request.max_body = 16 << 20;
            let reply = self.execute(&request, &|_| Ok(()))?;
            if reply.status != 200 {
                return Err(Error::Other(format!(
                    "listing the bucket: HTTP {}",
                    reply.status
                )));
            }
            let page = parse_list_page(&reply.body)?;
            for key in &page.keys {
                if let Some(block) = naming.parse_key(key, num_blocks) {
                    let name = naming.sort_name(block);
                    if (min..=max).contains(&name) {
                        found(block);
                    }
                }
            }
            match page.keys.last() {
                Some(last) if page.truncated && *last < end && *last > marker => {
                    marker = last.clone();
                }
                _ => return Ok(()),
            }
        }
        Err(Error::Other("listing the bucket never ended".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_page_parsing_reads_keys_and_truncation() {
        let xml = br#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name>
<IsTruncated>true</IsTruncated><Contents><Key>00000001</Key><Size>4</Size></Contents>
<Contents><Key>a&amp;b</Key></Contents><CommonPrefixes><Prefix>x/</Prefix></CommonPrefixes>
</ListBucketResult>"#;
        let page = parse_list_page(xml).unwrap();
        assert_eq!(page.keys, vec!["00000001".to_string(), "a&b".to_string()]);
        assert!(page.truncated);
        let empty = parse_list_page(
            b"<ListBucketResult><IsTruncated>false</IsTruncated></ListBucketResult>",
        )
        .unwrap();
        assert_eq!(empty, ListPage::default());
        assert!(parse_list_page(b"<ListBucketResult><Contents>").is_err());
    }

    #[test]
    fn ranges_cover_the_name_space_exactly() {
        assert_eq!(split_ranges(9, 3), vec![(0, 3), (4, 7), (8, 9)]);
        assert_eq!(split_ranges(1, 16), vec![(0, 0), (1, 1)]);
        assert_eq!(split_ranges(5, 0), vec![(0, 5)]);
        let full = split_ranges(u32::MAX, 16);
        assert_eq!(full.len(), 16);
        assert_eq!(full[0].0, 0);
        assert_eq!(full[15].1, u32::MAX);
        for pair in full.windows(2) {
            assert_eq!(pair[0].1 + 1, pair[1].0);
        }
    }
}
