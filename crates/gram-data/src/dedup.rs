//! Deduplication: a compact table of the pairs seen so far, by a 128-bit hash of the normalised
//! prompt and responses, that says where a duplicate was first seen.

use std::collections::HashMap;

/// One shard of [`Seen`]: (hash of prompt and responses) -> (file index, row).
type SeenShard = HashMap<(u64, u64), (u32, u32), BuildKeyHasher>;

/// Pairs seen so far, by a 128-bit hash of the normalised prompt and responses, with where each
/// was first seen. What grows with the input is this table, so it is kept small: 24 bytes per
/// pair (the hash as two u64, a file index and a row) plus one control byte per slot, in 64
/// shards by the hash's top bits. A single table doubles all at once, holding old and new slots
/// together (at 7.3M pairs of 32-byte entries that transient was ~830 MB); shards double one at a
/// time, so the transient is 1/64 of that. File names are stored once.
pub(crate) struct Seen {
    shards: Vec<SeenShard>,
    files: Vec<String>,
    file_ids: HashMap<String, u32>,
}

impl Default for Seen {
    fn default() -> Self {
        Self {
            shards: (0..SEEN_SHARDS).map(|_| HashMap::default()).collect(),
            files: Vec::new(),
            file_ids: HashMap::new(),
        }
    }
}

const SEEN_SHARDS: usize = 64;

/// The dedup keys are already uniform hashes: the table hashes them by xor instead of SipHash.
#[derive(Default, Clone, Copy)]
struct BuildKeyHasher;

impl std::hash::BuildHasher for BuildKeyHasher {
    type Hasher = KeyHasher;
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(0)
    }
}

struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = self.0.rotate_left(29) ^ x;
    }
}

impl Seen {
    /// Records the pair; if it was seen before, says where.
    pub(crate) fn first_seen(&mut self, key: u128, file: &str, row: u64) -> Option<String> {
        let k = ((key >> 64) as u64, key as u64);
        let shard = &mut self.shards[(k.0 >> 58) as usize % SEEN_SHARDS];
        if let Some(&(f, r)) = shard.get(&k) {
            return Some(seen_at(&self.files[f as usize], u64::from(r)));
        }
        let f = match self.file_ids.get(file) {
            Some(&f) => f,
            None => {
                let f = self.files.len() as u32;
                self.files.push(file.to_string());
                self.file_ids.insert(file.to_string(), f);
                f
            }
        };
        shard.insert(k, (f, u32::try_from(row).unwrap_or(u32::MAX)));
        None
    }
}

/// Where a pair was first seen, as a duplicate's reject reason names it (rows past u32 are kept
/// as "beyond", as [`Seen`] stores them).
pub(crate) fn seen_at(file: &str, row: u64) -> String {
    match u32::try_from(row) {
        Ok(r) if r != u32::MAX => format!("at {file} row {r}"),
        _ => format!("at {file} beyond row 4294967294"),
    }
}

#[cfg(test)]
mod tests {
    use super::Seen;

    #[test]
    fn seen_reports_where_a_duplicate_was_first_seen() {
        let mut seen = Seen::default();
        // Uniform keys, as the blake3-derived ones are.
        let key = |i: u64| {
            (u128::from(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)) << 64)
                | u128::from(i.wrapping_mul(0xC2B2_AE3D_27D4_EB4F))
        };
        for i in 0..10_000u64 {
            assert_eq!(seen.first_seen(key(i), "a.jsonl", i), None, "new pair {i}");
        }
        // Keys equal in one half only are different pairs.
        assert_eq!(seen.first_seen(key(7) ^ 1, "b.jsonl", 0), None);
        assert_eq!(seen.first_seen(key(7) ^ (1 << 100), "b.jsonl", 1), None);
        assert_eq!(
            seen.first_seen(key(7), "b.jsonl", 2).as_deref(),
            Some("at a.jsonl row 7")
        );
        assert_eq!(
            seen.first_seen(key(7) ^ 1, "c.jsonl", 5).as_deref(),
            Some("at b.jsonl row 0")
        );
        // A row past u32 is kept as "beyond", never wrapped.
        assert_eq!(seen.first_seen(42 << 66, "big.jsonl", 1 << 33), None);
        assert_eq!(
            seen.first_seen(42 << 66, "x", 0).as_deref(),
            Some("at big.jsonl beyond row 4294967294")
        );
        let n: usize = seen.shards.iter().map(std::collections::HashMap::len).sum();
        assert_eq!(n, 10_003);
        assert!(
            seen.shards.iter().all(|s| !s.is_empty()),
            "keys spread over all shards"
        );
    }
}
