//! Join tokens: single use, short-lived, stored hashed.
//!
//! The token an operator hands to a new host is
//!
//! ```text
//! tdm1.<id: 16 hex>.<secret: 32 hex>.<CA certificate SHA-256: 64 hex>
//! ```
//!
//! - `id` names the token's record (`tokens/<id>`), so the manager finds it
//!   without scanning and an operator can list and delete tokens by id;
//! - `secret` (128 random bits) is what authorises the join; the manager
//!   keeps only its SHA-256, so a copy of the database does not let anyone
//!   join;
//! - the CA hash lets the joining host **pin the cluster CA before it has
//!   a certificate** (as kubeadm's `--discovery-token-ca-cert-hash` does):
//!   it accepts the manager's TLS certificate only if it chains to a CA
//!   certificate with exactly that SHA-256 (of its DER), the same value
//!   `openssl x509 -in ca.pem -noout -fingerprint -sha256` prints.

use std::fmt;
use std::str::FromStr;

use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};

use crate::store::typed::Record;

const PREFIX: &str = "tdm1";
const ID_LEN: usize = 8;
const SECRET_LEN: usize = 16;

/// A parsed join token. Its `Display` is the token string; its `Debug`
/// hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    id: [u8; ID_LEN],
    secret: [u8; SECRET_LEN],
    ca_sha256: [u8; 32],
}

impl JoinToken {
    /// A new random token for the CA whose certificate has this SHA-256.
    pub fn generate(ca_sha256: [u8; 32]) -> Result<JoinToken, TokenError> {
        let rng = ring::rand::SystemRandom::new();
        let mut id = [0u8; ID_LEN];
        let mut secret = [0u8; SECRET_LEN];
        rng.fill(&mut id).map_err(|_| TokenError::Random)?;
        rng.fill(&mut secret).map_err(|_| TokenError::Random)?;
        Ok(JoinToken {
            id,
            secret,
            ca_sha256,
        })
    }

    /// The token's id: 16 lowercase hex characters.
    pub fn id(&self) -> String {
        hex(&self.id)
    }

    /// SHA-256 of the secret, hex: what the manager stores.
    pub fn secret_hash(&self) -> String {
        hex(ring::digest::digest(&ring::digest::SHA256, &self.secret).as_ref())
    }

    /// Whether `stored` (a [`secret_hash`](Self::secret_hash)) is this
    /// token's secret's hash. Compares in constant time.
    pub fn matches(&self, stored: &str) -> bool {
        let mine = self.secret_hash();
        if mine.len() != stored.len() {
            return false;
        }
        mine.bytes()
            .zip(stored.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    /// The pinned CA certificate's SHA-256.
    pub fn ca_sha256(&self) -> [u8; 32] {
        self.ca_sha256
    }

    pub fn ca_sha256_hex(&self) -> String {
        hex(&self.ca_sha256)
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}.{}.{}.{}",
            hex(&self.id),
            hex(&self.secret),
            hex(&self.ca_sha256)
        )
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id())
            .field("secret", &"<redacted>")
            .field("ca_sha256", &self.ca_sha256_hex())
            .finish()
    }
}

impl FromStr for JoinToken {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let mut parts = s.split('.');
        let (Some(PREFIX), Some(id), Some(secret), Some(ca), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenError::Malformed);
        };
        Ok(JoinToken {
            id: unhex(id)?,
            secret: unhex(secret)?,
            ca_sha256: unhex(ca)?,
        })
    }
}

/// SHA-256 of a certificate's DER.
pub fn cert_sha256(der: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(
        "not a join token: expected tdm1.<16 hex>.<32 hex>.<64 hex> (from `tandem token create`)"
    )]
    Malformed,
    #[error("the system's random number generator failed")]
    Random,
}

pub fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn unhex<const N: usize>(s: &str) -> Result<[u8; N], TokenError> {
    if s.len() != 2 * N || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TokenError::Malformed);
    }
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(s.as_bytes().chunks(2)) {
        let pair = std::str::from_utf8(pair).map_err(|_| TokenError::Malformed)?;
        *o = u8::from_str_radix(pair, 16).map_err(|_| TokenError::Malformed)?;
    }
    Ok(out)
}

/// A join token as the manager keeps it: `tokens/<id>`. The secret is only
/// in the operator's hands; this holds its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds; the token is refused from then on and swept away.
    pub expires_at: u64,
    /// If set, only a host of this name may join with it.
    #[serde(default)]
    pub host: Option<String>,
    /// The certificate name of the operator who made it.
    #[serde(default)]
    pub created_by: String,
    #[serde(default)]
    pub description: String,
}

impl Record for TokenRecord {
    const KIND: &'static str = "join-token";
    const SCHEMA: u32 = 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_hashing() {
        let t = JoinToken::generate([7u8; 32]).unwrap();
        let s = t.to_string();
        assert!(s.starts_with("tdm1."));
        assert_eq!(s.len(), 4 + 1 + 16 + 1 + 32 + 1 + 64);
        let back: JoinToken = s.parse().unwrap();
        assert_eq!(back, t);
        assert!(back.matches(&t.secret_hash()));
        let other = JoinToken::generate([7u8; 32]).unwrap();
        assert!(!other.matches(&t.secret_hash()));
        assert_ne!(other.id(), t.id());
        assert!(!format!("{t:?}").contains(&hex(&t.secret)));
        assert_eq!(t.ca_sha256_hex(), "07".repeat(32));
    }

    #[test]
    fn malformed_tokens() {
        let good = JoinToken::generate([1; 32]).unwrap().to_string();
        for bad in [
            String::new(),
            "tdm1".into(),
            good.replacen("tdm1", "tdm2", 1),
            format!("{good}.x"),
            good[..good.len() - 1].to_string(),
            good.replace('a', "g"),
        ] {
            if bad == good {
                continue;
            }
            assert_eq!(
                bad.parse::<JoinToken>(),
                Err(TokenError::Malformed),
                "{bad}"
            );
        }
        // Surrounding whitespace (a token pasted from a file) is fine.
        assert!(format!(" {good}\n").parse::<JoinToken>().is_ok());
    }
}
