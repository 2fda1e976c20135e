//! Splitting a payload into chunks, gzip per chunk, chunk ranges and reassembly. Pure.
//!
//! MESH takes at most 100 MB in one request. Larger messages are split **before** compression and each chunk is
//! gzipped on its own (never compress-then-split), as the MESH API describes; the receiver joins the decoded
//! chunks in order.

use crate::error::{Error, Result};
use flate2::Compression;
use flate2::bufread::MultiGzDecoder;
use flate2::read::GzEncoder;
use sha2::{Digest, Sha256};
use std::io::Read;

/// Default chunk size: 75 MiB of uncompressed data, the official Python client's default. Even incompressible
/// data plus gzip's few bytes of framing stays under MESH's 100 MB request limit, and few messages get chunked
/// (some workflows and older clients cannot receive chunked messages).
pub const DEFAULT_CHUNK_SIZE: usize = 75 * 1024 * 1024;

/// Largest chunk size accepted in configuration: one request must stay under MESH's 100 MB limit.
pub const MAX_CHUNK_SIZE: usize = 95 * 1024 * 1024;

/// Split `payload` into chunks of at most `chunk_size` bytes (at least one chunk, even for an empty payload).
/// A `chunk_size` of 0 is treated as 1.
pub fn split(payload: &[u8], chunk_size: usize) -> Vec<&[u8]> {
    if payload.is_empty() {
        return vec![payload];
    }
    payload.chunks(chunk_size.max(1)).collect()
}

/// gzip one chunk.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() / 2 + 64);
    // Reading from an in-memory slice cannot fail; keep whatever was produced if it somehow did.
    let _ = GzEncoder::new(data, Compression::default()).read_to_end(&mut out);
    out
}

/// Decode one gzip body (concatenated gzip members are joined, as RFC 1952 allows), refusing corrupt or
/// truncated data and trailing bytes that are not gzip.
pub fn gunzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len().saturating_mul(3));
    let mut decoder = MultiGzDecoder::new(data);
    decoder
        .read_to_end(&mut out)
        .map_err(|e| Error::Malformed(format!("body is not valid gzip: {e}")))?;
    if !decoder.into_inner().is_empty() {
        return Err(Error::Malformed(
            "unexpected bytes after the gzip stream".into(),
        ));
    }
    Ok(out)
}

/// A `Mex-Chunk-Range` value: chunk `number` of `total`, 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRange {
    /// This chunk's number, 1-based.
    pub number: u32,
    /// How many chunks the message has.
    pub total: u32,
}

impl ChunkRange {
    /// Parse `n:total`, requiring 1 <= n <= total.
    pub fn parse(s: &str) -> Result<ChunkRange> {
        let bad = || {
            Error::Malformed(format!(
                "mex-chunk-range '{s}' is not 'n:total' with 1 <= n <= total"
            ))
        };
        let (a, b) = s.trim().split_once(':').ok_or_else(bad)?;
        let number: u32 = a.trim().parse().map_err(|_| bad())?;
        let total: u32 = b.trim().parse().map_err(|_| bad())?;
        if number == 0 || number > total {
            return Err(bad());
        }
        Ok(ChunkRange { number, total })
    }

    /// The header value, `n:total`.
    pub fn header(&self) -> String {
        format!("{}:{}", self.number, self.total)
    }
}

/// Join decoded chunks in order.
pub fn reassemble(chunks: Vec<Vec<u8>>) -> Vec<u8> {
    let total: usize = chunks.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(total);
    for c in chunks {
        out.extend_from_slice(&c);
    }
    out
}

/// The `Mex-Content-Checksum` this client sends: `sha256:` and the hex SHA-256 of the whole uncompressed payload.
/// MESH passes it through untouched; a receiver that sees this prefix can verify the reassembled body.
pub fn checksum(payload: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(payload)))
}

/// Check a received body against a `Mex-Content-Checksum` in this client's `sha256:` form; other forms (MD5
/// from other senders, free text) are not ours to judge and pass.
pub fn verify_checksum(header: &str, body: &[u8]) -> Result<()> {
    let Some(hex_digest) = header.trim().strip_prefix("sha256:") else {
        return Ok(());
    };
    let actual = hex::encode(Sha256::digest(body));
    if actual.eq_ignore_ascii_case(hex_digest) {
        Ok(())
    } else {
        Err(Error::Malformed(format!(
            "body does not match mex-content-checksum (expected sha256 {hex_digest}, got {actual})"
        )))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn split_sizes() {
        let data: Vec<u8> = (0..2500u32).map(|i| (i % 251) as u8).collect();
        let parts = split(&data, 1000);
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [1000, 1000, 500]
        );
        assert_eq!(split(&data, 2500).len(), 1);
        assert_eq!(split(&data, 2499).len(), 2);
        assert_eq!(split(b"", 10), vec![&b""[..]]);
        assert_eq!(split(b"abc", 0).len(), 3);
    }

    #[test]
    fn gzip_round_trip_per_chunk() {
        let data: Vec<u8> = (0..10_000u32)
            .map(|i| (i * 7 % 256) as u8)
            .chain(b"MSH|^~\\&|HUB\r".iter().copied())
            .collect();
        let encoded: Vec<Vec<u8>> = split(&data, 3000).into_iter().map(gzip).collect();
        assert_eq!(encoded.len(), 4);
        for e in &encoded {
            assert_eq!(&e[..2], &[0x1f, 0x8b], "each chunk is its own gzip member");
        }
        let decoded = encoded
            .iter()
            .map(|e| gunzip(e))
            .collect::<Result<Vec<_>>>()
            .unwrap();
        assert_eq!(reassemble(decoded), data);
    }

    #[test]
    fn gunzip_refuses_corrupt_and_truncated() {
        let g = gzip(b"hello hello hello hello");
        assert!(matches!(gunzip(b"plain text"), Err(Error::Malformed(_))));
        assert!(matches!(
            gunzip(&g[..g.len() - 5]),
            Err(Error::Malformed(_))
        ));
        let mut trailing = g.clone();
        trailing.extend_from_slice(b"junk");
        assert!(matches!(gunzip(&trailing), Err(Error::Malformed(_))));
        let mut two_members = g.clone();
        two_members.extend_from_slice(&gzip(b"!"));
        assert_eq!(gunzip(&two_members).unwrap(), b"hello hello hello hello!");
        assert_eq!(gunzip(&g).unwrap(), b"hello hello hello hello");
    }

    #[test]
    fn chunk_ranges() {
        assert_eq!(
            ChunkRange::parse("2:3").unwrap(),
            ChunkRange {
                number: 2,
                total: 3
            }
        );
        assert_eq!(ChunkRange::parse(" 1 : 1 ").unwrap().header(), "1:1");
        for bad in ["", "1", "0:1", "3:2", "a:b", "1:-1", "1:2:3", "1:0"] {
            assert!(ChunkRange::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn checksums() {
        let c = checksum(b"abc");
        assert_eq!(
            c,
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        verify_checksum(&c, b"abc").unwrap();
        assert!(verify_checksum(&c, b"abd").is_err());
        verify_checksum("b10a8db164e0754105b7a99be72e3fe5", b"anything").unwrap();
    }
}
