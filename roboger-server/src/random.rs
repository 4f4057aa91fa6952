//! Random tokens: addresses (the original's 64 letters and digits) and
//! generated master keys, from the operating system's CSPRNG.

use rand::RngExt;
use rand::distr::Alphanumeric;

/// `len` random ASCII letters and digits.
pub fn alphanumeric(len: usize) -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}
