//! CPython's `random` module, as far as ECG-Bench's scorer uses it: `random.seed(int)`
//! (MT19937 `init_by_array` over the seed's 32-bit words) and `random.choice` (via
//! `_randbelow_with_getrandbits`). Reproduced so the scorer's random fallback letters match
//! the published Python script draw for draw. No crate offers CPython's exact seeding.

const N: usize = 624;
const M: usize = 397;

/// The Mersenne Twister MT19937 with CPython's seeding.
#[derive(Debug, Clone)]
pub struct PyRandom {
    mt: [u32; N],
    index: usize,
}

impl PyRandom {
    fn init_genrand(s: u32) -> [u32; N] {
        let mut mt = [0u32; N];
        mt[0] = s;
        for i in 1..N {
            mt[i] = 1_812_433_253u32
                .wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30))
                .wrapping_add(i as u32);
        }
        mt
    }

    /// `random.seed(seed)` for a non-negative integer seed.
    pub fn seed(seed: u64) -> PyRandom {
        // CPython splits abs(seed) into 32-bit words, least significant first.
        let mut key: Vec<u32> = Vec::new();
        let mut s = seed;
        loop {
            key.push(s as u32);
            s >>= 32;
            if s == 0 {
                break;
            }
        }
        let mut mt = Self::init_genrand(19_650_218);
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..N.max(key.len()) {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..N - 1 {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_566_083_941))
                .wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
        }
        mt[0] = 0x8000_0000;
        PyRandom { mt, index: N }
    }

    /// Next 32-bit output (`genrand_uint32`).
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            for k in 0..N {
                let y = (self.mt[k] & 0x8000_0000) | (self.mt[(k + 1) % N] & 0x7fff_ffff);
                let mut v = self.mt[(k + M) % N] ^ (y >> 1);
                if y & 1 != 0 {
                    v ^= 0x9908_b0df;
                }
                self.mt[k] = v;
            }
            self.index = 0;
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// `random.getrandbits(k)` for `1 <= k <= 32`.
    pub fn getrandbits(&mut self, k: u32) -> u32 {
        assert!((1..=32).contains(&k), "k in 1..=32");
        self.next_u32() >> (32 - k)
    }

    /// `random._randbelow(n)`: rejection sampling on `n.bit_length()` bits.
    pub fn randbelow(&mut self, n: u32) -> u32 {
        assert!(n > 0, "n > 0");
        let k = 32 - n.leading_zeros();
        loop {
            let r = self.getrandbits(k);
            if r < n {
                return r;
            }
        }
    }

    /// `random.choice(seq)`.
    pub fn choice<'a, T>(&mut self, seq: &'a [T]) -> &'a T {
        &seq[self.randbelow(seq.len() as u32) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values printed by CPython 3.11: `random.seed(42); [random.getrandbits(32) for _ in
    /// range(3)]` and `random.seed(42); [random.choice('ABCDEFGH') for _ in range(10)]`.
    #[test]
    fn matches_cpython() {
        let mut r = PyRandom::seed(42);
        let v: Vec<u32> = (0..3).map(|_| r.getrandbits(32)).collect();
        assert_eq!(v, [2746317213, 478163327, 107420369]);
        let letters = ['A', 'B', 'C', 'D', 'E', 'F', 'G', 'H'];
        let mut r = PyRandom::seed(42);
        let s: String = (0..10).map(|_| *r.choice(&letters)).collect();
        assert_eq!(s, "BAEDDCBBGA");
        let mut r = PyRandom::seed(42);
        let s: String = (0..10).map(|_| *r.choice(&letters[..4])).collect();
        assert_eq!(s, "AACBBBAADA");
    }
}
