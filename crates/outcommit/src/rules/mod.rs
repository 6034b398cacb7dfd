//! The rule table that decides which of a protected VM's frames wait for
//! their epoch to commit (`hold`) and which leave at once (`pass`).
//!
//! Holding is always safe and passing is only an optimisation, so the table
//! is an ordered list an operator extends with `pass` exceptions (and `hold`
//! rules that shield traffic from a broader exception below them); the first
//! matching rule wins and the built-in defaults decide the rest. Rules are
//! plain text so the API, the CLI and the configuration file share one
//! syntax, and a whole table is parsed before any of it is applied so an
//! operator's typo never leaves a half-updated table behind.
//!
//! Rule text, one rule per string, tokens separated by whitespace and
//! keywords case-insensitive:
//!
//! ```text
//! <hold|pass> [from vm|from forwarded] [any|arp|ipv4|ipv6|ethertype 0xNNNN]
//!             [tcp|udp|proto N] [sport P|P-Q] [dport P|P-Q] [flags +syn -ack ...]
//!             [payload OFF:"text"|OFF:0xHEX]
//! ```

mod error;
mod parse;
mod profile;
mod rule;
#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;

use crate::packet::{Origin, PacketMeta, ETHERTYPE_ARP};

pub use error::{Position, RuleError};
#[cfg(test)]
use parse::MIN_ETHERTYPE;
pub use parse::{MAX_PAYLOAD_LEN, MAX_PAYLOAD_OFFSET};
pub use profile::Profile;
pub use rule::Rule;
#[cfg(test)]
use rule::{FlagMatch, PayloadMatch, PortRange, TCP_FLAGS};

/// What happens to a frame the VM sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    /// Released only once the epoch that produced the frame has committed.
    Hold,
    /// Sent at once.
    Pass,
}

impl Class {
    pub fn as_str(&self) -> &'static str {
        match self {
            Class::Hold => "hold",
            Class::Pass => "pass",
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Class {
    type Err = RuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("hold") {
            Ok(Class::Hold)
        } else if s.eq_ignore_ascii_case("pass") {
            Ok(Class::Pass)
        } else {
            Err(RuleError::UnknownClass {
                at: Position::NONE,
                token: s.to_string(),
            })
        }
    }
}

/// Metadata the host may attach to a frame instead of having it inspected:
/// a host stack that already knows what a frame is (for example from a
/// control message) can say so, which is both cheaper and more reliable than
/// guessing from the bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FrameHint {
    /// The class the host decided on, if it decided.
    pub class: Option<Class>,
    /// The application protocol the host identified, for logging and
    /// counters; it does not influence classification by itself.
    pub protocol: Option<String>,
}

/// The classification interface the gate calls for every frame. Frame
/// inspection ([`RuleSet`]) and host metadata ([`MetadataClassifier`]) both
/// implement it so the gate does not care which is configured.
pub trait Classifier: Send + Sync {
    fn classify(
        &self,
        frame: &[u8],
        meta: &PacketMeta,
        origin: Origin,
        hint: Option<&FrameHint>,
    ) -> Class;
}

impl<T: Classifier + ?Sized> Classifier for std::sync::Arc<T> {
    fn classify(
        &self,
        frame: &[u8],
        meta: &PacketMeta,
        origin: Origin,
        hint: Option<&FrameHint>,
    ) -> Class {
        (**self).classify(frame, meta, origin, hint)
    }
}

impl<T: Classifier + ?Sized> Classifier for Box<T> {
    fn classify(
        &self,
        frame: &[u8],
        meta: &PacketMeta,
        origin: Origin,
        hint: Option<&FrameHint>,
    ) -> Class {
        (**self).classify(frame, meta, origin, hint)
    }
}

/// Trusts the host's hint when it carries a class and falls back to the
/// inner classifier otherwise, so frames the host knows nothing about are
/// still covered by the rule table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetadataClassifier<C> {
    pub inner: C,
}

impl<C> MetadataClassifier<C> {
    pub fn new(inner: C) -> Self {
        MetadataClassifier { inner }
    }
}

impl<C: Classifier> Classifier for MetadataClassifier<C> {
    fn classify(
        &self,
        frame: &[u8],
        meta: &PacketMeta,
        origin: Origin,
        hint: Option<&FrameHint>,
    ) -> Class {
        match hint.and_then(|h| h.class) {
            Some(class) => class,
            None => self.inner.classify(frame, meta, origin, hint),
        }
    }
}

/// What the gate does with a frame no rule matched. Forwarded frames pass
/// because the VM is only relaying them and did not produce the state they
/// describe; ARP passes because it changes no state anyone relies on across
/// a failover (the backup answers it again) and holding it would delay
/// every new connection by an epoch.
pub fn default_class(meta: &PacketMeta, origin: Origin) -> Class {
    if origin == Origin::Forwarded || meta.ethertype == ETHERTYPE_ARP {
        Class::Pass
    } else {
        Class::Hold
    }
}

/// An ordered rule table; the first matching rule wins and
/// [`default_class`] decides frames no rule matches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleSet {
    rules: Vec<Rule>,
}

impl RuleSet {
    pub fn new(rules: Vec<Rule>) -> RuleSet {
        RuleSet { rules }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Parses a whole table. All-or-nothing, so a caller can validate a
    /// replacement table and swap it in only if every rule is good; the
    /// error names the rule by its 1-based position as an operator counts.
    pub fn from_texts<S: AsRef<str>>(texts: &[S]) -> Result<RuleSet, RuleError> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| t.as_ref().parse::<Rule>().map_err(|e| e.at_rule(i + 1)))
            .collect::<Result<Vec<_>, _>>()
            .map(RuleSet::new)
    }

    pub fn to_texts(&self) -> Vec<String> {
        self.rules.iter().map(Rule::to_string).collect()
    }

    /// First matching rule wins; see [`default_class`] for the rest.
    pub fn classify_frame(&self, frame: &[u8], meta: &PacketMeta, origin: Origin) -> Class {
        self.rules
            .iter()
            .find(|r| r.matches(frame, meta, origin))
            .map_or_else(|| default_class(meta, origin), Rule::class)
    }

    /// Inserts before `index` (0-based); an index past the end appends, so
    /// "insert at 999" from a CLI means "at the end" rather than an error.
    pub fn insert(&mut self, index: usize, rule: Rule) {
        let index = index.min(self.rules.len());
        self.rules.insert(index, rule);
    }

    /// Removes the rule at `index` (0-based). Unlike insert this does not
    /// clamp: removing a rule other than the one the operator meant is worse
    /// than an error.
    pub fn remove(&mut self, index: usize) -> Result<Rule, RuleError> {
        if index >= self.rules.len() {
            return Err(RuleError::IndexOutOfRange {
                index,
                len: self.rules.len(),
            });
        }
        Ok(self.rules.remove(index))
    }

    pub fn push(&mut self, rule: Rule) {
        self.rules.push(rule);
    }
}

impl Classifier for RuleSet {
    fn classify(
        &self,
        frame: &[u8],
        meta: &PacketMeta,
        origin: Origin,
        _hint: Option<&FrameHint>,
    ) -> Class {
        self.classify_frame(frame, meta, origin)
    }
}

impl serde::Serialize for RuleSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(&self.rules)
    }
}

impl<'de> serde::Deserialize<'de> for RuleSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let texts = Vec::<String>::deserialize(d)?;
        RuleSet::from_texts(&texts).map_err(serde::de::Error::custom)
    }
}
