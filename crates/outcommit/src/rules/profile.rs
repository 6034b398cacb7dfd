//! The shipped rule profiles.

use std::fmt;
use std::str::FromStr;

use super::{RuleError, RuleSet};

/// Shipped starting points for common workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    Conservative,
    SipRtp,
    BulkTcp,
}

impl Profile {
    pub fn all() -> &'static [Profile] {
        &[Profile::Conservative, Profile::SipRtp, Profile::BulkTcp]
    }

    pub fn name(&self) -> &'static str {
        match self {
            Profile::Conservative => "conservative",
            Profile::SipRtp => "sip-rtp",
            Profile::BulkTcp => "bulk-tcp",
        }
    }

    pub fn description(&self) -> &'static str {
        match self {
            Profile::Conservative => {
                "No rules beyond the defaults: everything the VM originates is held except \
                 ARP; forwarded frames pass."
            }
            Profile::SipRtp => {
                "SIP signalling (UDP and TCP, ports 5060-5061, either direction) is held; \
                 RTP media (UDP ports 10000-20000, either direction) passes, since a lost \
                 or repeated voice packet is harmless. Everything else as conservative."
            }
            Profile::BulkTcp => {
                "TCP payload passes at once. The gate still clamps acknowledgements to \
                 committed state and always holds SYN, FIN and RST, so no peer sees a \
                 connection opened, closed or acknowledged beyond what the backup knows. \
                 Everything else as conservative."
            }
        }
    }

    /// The profile's rule table; [`default_class`](super::default_class) still applies after it.
    pub fn rules(&self) -> RuleSet {
        let texts: &[&str] = match self {
            Profile::Conservative => &[],
            // SIP first so a signalling packet to a peer's port inside the
            // RTP range is still held.
            Profile::SipRtp => &[
                "hold udp sport 5060-5061",
                "hold udp dport 5060-5061",
                "hold tcp sport 5060-5061",
                "hold tcp dport 5060-5061",
                "pass udp sport 10000-20000",
                "pass udp dport 10000-20000",
            ],
            Profile::BulkTcp => &["pass tcp"],
        };
        // The texts are fixed and covered by tests, so a failure here is a
        // bug in this file, not bad input.
        RuleSet::from_texts(texts).expect("shipped profile rules parse")
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Profile {
    type Err = RuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Profile::all()
            .iter()
            .copied()
            .find(|p| p.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| RuleError::UnknownProfile {
                name: s.to_string(),
                known: Profile::all()
                    .iter()
                    .map(|p| p.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}
