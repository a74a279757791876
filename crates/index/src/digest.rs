//! `sha256:<hex>` digests: what every lazy format verifies chunks and indexes with.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};


/// A sha256 content digest, printed and parsed as `sha256:<64 lower-case hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest(Sha256::digest(data).into())
    }

    /// Lower-case hex of the 32 digest bytes, without the algorithm prefix.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A string that is not `sha256:` followed by 64 lower-case hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid digest {0:?} (want sha256:<64 lower-case hex digits>)")]
pub struct InvalidDigest(pub String);

/// Value of each lower-case hex digit, 0xff for every other byte. Digests are parsed twice per
/// file of every TOC opened on a container's start path: a table beats a general decoder there.
const HEX_VALUE: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

impl FromStr for Digest {
    type Err = InvalidDigest;
    fn from_str(s: &str) -> Result<Self, InvalidDigest> {
        let bad = || InvalidDigest(s.to_string());
        let hex_part = s.strip_prefix("sha256:").ok_or_else(bad)?.as_bytes();
        if hex_part.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(hex_part.chunks_exact(2)) {
            let (hi, lo) = (HEX_VALUE[pair[0] as usize], HEX_VALUE[pair[1] as usize]);
            if (hi | lo) == 0xff {
                return Err(bad());
            }
            *o = hi << 4 | lo;
        }
        Ok(Digest(out))
    }
}

/// Incremental sha256 that yields a [`Digest`].
#[derive(Clone, Default)]
pub struct Hasher(Sha256);

impl Hasher {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    pub fn finish(self) -> Digest {
        Digest(self.0.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        let d = Digest::of(b"");
        assert_eq!(
            d.to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        assert!("sha512:00".parse::<Digest>().is_err());
        assert!("sha256:zz".parse::<Digest>().is_err());
        // Every position is checked, each nibble on its own.
        let good = d.to_string();
        for (i, c) in [(7, 'g'), (8, 'G'), (70, ':'), (70, 'A'), (39, '/')] {
            let mut s = good.clone().into_bytes();
            s[i] = c as u8;
            let s = String::from_utf8(s).unwrap();
            assert!(s.parse::<Digest>().is_err(), "{s} accepted");
        }
        assert!(format!("{good}0").parse::<Digest>().is_err() && good[..70].parse::<Digest>().is_err());
        assert!(d.to_string().to_uppercase().replace("SHA256", "sha256").parse::<Digest>().is_err());
    }
}
