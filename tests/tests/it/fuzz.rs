//! A fuzz harness for the checkpoint readers: a small valid GGUF (llama metadata, F32 and Q8_0
//! tensors) and a small safetensors file, mutated thousands of times from a fixed seed (bytes
//! overwritten, often inside the headers, or the file cut short). Every reader call must return
//! Ok or an error; a panic (an overflow, an out-of-bounds slice) fails the test and names the
//! mutation that caused it. Rerun with `GRAM_FUZZ_ITERS=100000` for a longer search.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use anyhow::{Result, ensure};
use gram_core::Weights;
use gram_core::gguf::GgufFile;

use crate::common::scratch;

/// xorshift64*: the mutations are the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn iterations() -> usize {
    std::env::var("GRAM_FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000)
}

/// A GGUF v3 writer for the seed file.
#[derive(Default)]
struct Gguf {
    kv: Vec<u8>,
    n_kv: u64,
    infos: Vec<u8>,
    data: Vec<u8>,
    n_tensors: u64,
}

impl Gguf {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    fn u32(&mut self, key: &str, v: u32) {
        Self::string(&mut self.kv, key);
        self.kv.extend(4u32.to_le_bytes());
        self.kv.extend(v.to_le_bytes());
        self.n_kv += 1;
    }
    fn str(&mut self, key: &str, v: &str) {
        Self::string(&mut self.kv, key);
        self.kv.extend(8u32.to_le_bytes());
        Self::string(&mut self.kv, v);
        self.n_kv += 1;
    }
    fn strings(&mut self, key: &str, v: &[&str]) {
        Self::string(&mut self.kv, key);
        self.kv.extend(9u32.to_le_bytes());
        self.kv.extend(8u32.to_le_bytes());
        self.kv.extend((v.len() as u64).to_le_bytes());
        for s in v {
            Self::string(&mut self.kv, s);
        }
        self.n_kv += 1;
    }
    /// A tensor of ggml type `ty` with dims innermost first and `bytes` of data.
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, bytes: &[u8]) {
        Self::string(&mut self.infos, name);
        self.infos.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.infos.extend(d.to_le_bytes());
        }
        self.infos.extend(ty.to_le_bytes());
        self.infos.extend((self.data.len() as u64).to_le_bytes());
        self.data.extend(bytes);
        self.data.resize(self.data.len().div_ceil(32) * 32, 0);
        self.n_tensors += 1;
    }
    fn finish(self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(self.n_tensors.to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(self.kv);
        out.extend(self.infos);
        out.resize(out.len().div_ceil(32) * 32, 0);
        out.extend(self.data);
        out
    }
}

/// A one-layer llama GGUF (hidden 8, 2 heads, vocab 16) with F32 tensors and a Q8_0 one.
fn seed_gguf() -> Vec<u8> {
    let f32s = |n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|i| (i as f32 * 0.01).to_le_bytes())
            .collect()
    };
    let mut g = Gguf::default();
    g.str("general.architecture", "llama");
    g.u32("general.alignment", 32);
    for (k, v) in [
        ("llama.embedding_length", 8),
        ("llama.attention.head_count", 2),
        ("llama.attention.head_count_kv", 2),
        ("llama.feed_forward_length", 32),
        ("llama.block_count", 1),
        ("llama.context_length", 64),
    ] {
        g.u32(k, v);
    }
    g.strings("tokenizer.ggml.tokens", &["a", "b", "c"]);
    g.tensor("token_embd.weight", &[8, 16], 0, &f32s(128));
    g.tensor("output_norm.weight", &[8], 0, &f32s(8));
    g.tensor("blk.0.attn_q.weight", &[8, 8], 0, &f32s(64));
    g.tensor("blk.0.attn_k.weight", &[8, 8], 0, &f32s(64));
    // Q8_0: per 32 values an f16 scale and 32 signed bytes; 8 rows of 32.
    let q8: Vec<u8> = (0..8)
        .flat_map(|_| [0x00, 0x3C].into_iter().chain((0..32).map(|i| i as u8)))
        .collect();
    g.tensor("blk.0.ffn_up.weight", &[32, 8], 8, &q8);
    g.finish()
}

/// Every read of a GGUF a user's command makes: parse, configuration, weights, each tensor.
fn read_gguf(bytes: Vec<u8>) -> bool {
    let path = Path::new("fuzz.gguf");
    let Ok(f) = GgufFile::parse(bytes, path) else {
        return false;
    };
    for t in &f.tensors {
        let _ = f.dequantize(t);
        let _ = t.shape();
    }
    let _ = f.strings("tokenizer.ggml.tokens");
    match f.model_config() {
        Ok(cfg) => {
            let _ = cfg.num_parameters();
            f.weights(&cfg).is_ok()
        }
        Err(_) => false,
    }
}

/// Overwrites 1-4 bytes (mostly inside the first `hot` bytes, the headers) or cuts the file.
fn mutate(seed: &[u8], hot: usize, rng: &mut Rng) -> (Vec<u8>, String) {
    let mut b = seed.to_vec();
    if rng.below(8) == 0 {
        let n = rng.below(b.len());
        b.truncate(n);
        return (b, format!("cut at {n}"));
    }
    let mut what = Vec::new();
    for _ in 0..1 + rng.below(4) {
        let at = if rng.below(4) == 0 {
            rng.below(b.len())
        } else {
            rng.below(hot)
        };
        let v = match rng.below(4) {
            0 => 0xFF,
            1 => 0x00,
            2 => 0x80,
            _ => rng.next() as u8,
        };
        b[at] = v;
        what.push(format!("[{at}]={v:#04x}"));
    }
    (b, what.join(" "))
}

#[test]
fn gguf_reader_survives_mutated_files() -> Result<()> {
    let seed = seed_gguf();
    ensure!(
        read_gguf(seed.clone()),
        "the seed GGUF itself does not load"
    );
    let hot = seed.len() - 5 * 32 * 8; // roughly: everything before the tensor data
    let mut rng = Rng(0x5EED_6675_F00D);
    let (mut ok, mut refused, mut panics) = (0, 0, Vec::new());
    for i in 0..iterations() {
        let (bytes, what) = mutate(&seed, hot, &mut rng);
        match catch_unwind(AssertUnwindSafe(|| read_gguf(bytes))) {
            Ok(true) => ok += 1,
            Ok(false) => refused += 1,
            Err(_) => panics.push(format!("#{i}: {what}")),
        }
    }
    println!(
        "GGUF: {ok} loaded, {refused} refused, {} panics",
        panics.len()
    );
    ensure!(panics.is_empty(), "panics on mutated GGUFs: {panics:?}");
    Ok(())
}

#[test]
fn safetensors_reader_survives_mutated_files() -> Result<()> {
    let dir = scratch("fuzz-safetensors")?;
    let tiny = crate::common::fixtures().join("hf-tiny/llama/model.safetensors");
    let seed = std::fs::read(tiny)?;
    ensure!(
        Weights::from_safetensors_file(
            &crate::common::fixtures().join("hf-tiny/llama/model.safetensors")
        )
        .is_ok()
    );
    let header = 8 + u64::from_le_bytes(seed[..8].try_into()?) as usize;
    let path = dir.join("model.safetensors");
    let mut rng = Rng(0xFACE_5AFE_7E45);
    let (mut ok, mut refused, mut panics) = (0, 0, Vec::new());
    for i in 0..iterations() / 3 {
        let (bytes, what) = mutate(&seed, header, &mut rng);
        std::fs::write(&path, &bytes)?;
        match catch_unwind(|| Weights::from_safetensors_file(&path)) {
            Ok(Ok(_)) => ok += 1,
            Ok(Err(_)) => refused += 1,
            Err(_) => panics.push(format!("#{i}: {what}")),
        }
    }
    println!(
        "safetensors: {ok} loaded, {refused} refused, {} panics",
        panics.len()
    );
    ensure!(
        panics.is_empty(),
        "panics on mutated safetensors: {panics:?}"
    );
    Ok(())
}
