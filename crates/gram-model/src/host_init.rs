//! New parameters drawn on the host from a seed and the parameter's name, so a run starts from
//! the same values on every backend (the device generators of burn's CPU and wgpu backends
//! draw different streams from the same seed).

/// A generator for `name` under `seed` (xorshift64*; the name is hashed in with FNV-1a).
struct Stream(u64);

impl Stream {
    fn new(seed: u64, name: &str) -> Self {
        Self(
            name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
            }) | 1,
        )
    }

    /// Uniform in [0, 1).
    fn next(&mut self) -> f64 {
        let s = &mut self.0;
        *s ^= *s >> 12;
        *s ^= *s << 25;
        *s ^= *s >> 27;
        (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `n` values uniform in `±bound`.
pub fn uniform(n: usize, bound: f64, seed: u64, name: &str) -> Vec<f32> {
    let mut s = Stream::new(seed, name);
    (0..n)
        .map(|_| ((2.0 * s.next() - 1.0) * bound) as f32)
        .collect()
}

/// `n` values from N(0, std²) (Box-Muller).
pub fn normal(n: usize, std: f64, seed: u64, name: &str) -> Vec<f32> {
    let mut s = Stream::new(seed, name);
    (0..n)
        .map(|_| {
            let u = 1.0 - s.next(); // (0, 1]: ln is finite
            let v = s.next();
            (std * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_reproducible_named_and_have_their_moments() {
        let n = 20_000;
        assert_eq!(uniform(8, 1.0, 3, "a"), uniform(8, 1.0, 3, "a"));
        assert_ne!(uniform(8, 1.0, 3, "a"), uniform(8, 1.0, 3, "b"));
        assert_ne!(uniform(8, 1.0, 3, "a"), uniform(8, 1.0, 4, "a"));
        let u = uniform(n, 0.5, 1, "u");
        assert!(u.iter().all(|x| x.abs() <= 0.5));
        let m = u.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
        assert!(m.abs() < 0.01, "uniform mean {m}");
        let g = normal(n, 0.02, 1, "g");
        let m = g.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
        let sd = (g.iter().map(|&x| (f64::from(x) - m).powi(2)).sum::<f64>() / n as f64).sqrt();
        assert!(
            m.abs() < 0.001 && (sd - 0.02).abs() < 0.001,
            "normal mean {m} sd {sd}"
        );
    }
}
