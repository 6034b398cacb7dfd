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

use std::fmt;
use std::str::FromStr;

use crate::packet::{
    L4Meta, Origin, PacketMeta, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_VLAN,
    IPPROTO_TCP, IPPROTO_UDP,
};

/// Longest byte prefix a `payload` clause may compare: rules run on every
/// frame, so the cost of one must stay small and predictable.
pub const MAX_PAYLOAD_LEN: usize = 64;
/// Largest `payload` offset: beyond one standard MTU no frame can match, so
/// a larger value is certainly a mistake.
pub const MAX_PAYLOAD_OFFSET: usize = 1500;
/// Values below this are IEEE 802.3 length fields, not ethertypes.
const MIN_ETHERTYPE: u16 = 0x0600;

/// TCP flag names in header bit order, which is also their canonical
/// printing order.
const TCP_FLAGS: [(&str, u8); 8] = [
    ("fin", 0x01),
    ("syn", 0x02),
    ("rst", 0x04),
    ("psh", 0x08),
    ("ack", 0x10),
    ("urg", 0x20),
    ("ece", 0x40),
    ("cwr", 0x80),
];

/// Every word the parser treats as a keyword. A value-taking clause that is
/// followed by one of these reports a missing value rather than a confusing
/// "bad value `dport`".
const KEYWORDS: [&str; 15] = [
    "hold",
    "pass",
    "from",
    "any",
    "arp",
    "ipv4",
    "ipv6",
    "ethertype",
    "tcp",
    "udp",
    "proto",
    "sport",
    "dport",
    "flags",
    "payload",
];

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

/// An inclusive port range; a single port is a range of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PortRange {
    lo: u16,
    hi: u16,
}

impl PortRange {
    fn contains(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// TCP flag constraints: bits in `set` must be set, bits in `clear` must be
/// clear. Never both empty and never overlapping (the parser rejects both),
/// which keeps the printed form unique.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlagMatch {
    set: u8,
    clear: u8,
}

impl fmt::Display for FlagMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (name, bit) in TCP_FLAGS {
            let sign = if self.set & bit != 0 {
                '+'
            } else if self.clear & bit != 0 {
                '-'
            } else {
                continue;
            };
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            write!(f, "{sign}{name}")?;
        }
        Ok(())
    }
}

/// A byte string expected at `offset` into the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PayloadMatch {
    offset: usize,
    bytes: Vec<u8>,
}

impl fmt::Display for PayloadMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.offset)?;
        // Text is friendlier to read, but only printable ASCII survives a
        // round trip through terminals and JSON unchanged; anything else is
        // printed as hex.
        if self.bytes.iter().all(|b| (0x20..=0x7e).contains(b)) {
            f.write_str("\"")?;
            for &b in &self.bytes {
                if b == b'"' || b == b'\\' {
                    f.write_str("\\")?;
                }
                write!(f, "{}", b as char)?;
            }
            f.write_str("\"")
        } else {
            f.write_str("0x")?;
            for b in &self.bytes {
                write!(f, "{b:02x}")?;
            }
            Ok(())
        }
    }
}

/// One line of the rule table. Constructed by parsing its text form, which
/// is where every invariant (valid ranges, no contradictions) is enforced;
/// [`fmt::Display`] prints the canonical text, which parses back to an
/// equal rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    class: Class,
    origin: Option<Origin>,
    /// Stored as a number even for `arp`/`ipv4`/`ipv6` so that
    /// `ethertype 0x0800` and `ipv4` are the same rule.
    ethertype: Option<u16>,
    /// Likewise `proto 6` is `tcp` and `proto 17` is `udp`.
    proto: Option<u8>,
    sport: Option<PortRange>,
    dport: Option<PortRange>,
    flags: Option<FlagMatch>,
    payload: Option<PayloadMatch>,
}

impl Rule {
    /// A rule without constraints: it matches every frame.
    pub fn all(class: Class) -> Rule {
        Rule {
            class,
            origin: None,
            ethertype: None,
            proto: None,
            sport: None,
            dport: None,
            flags: None,
            payload: None,
        }
    }

    pub fn class(&self) -> Class {
        self.class
    }

    /// Whether every clause of the rule holds for this frame. `meta` comes
    /// from guest-controlled bytes and may disagree with `frame`, so every
    /// access is checked and a constraint on a layer the frame lacks simply
    /// fails.
    pub fn matches(&self, frame: &[u8], meta: &PacketMeta, origin: Origin) -> bool {
        if self.origin.is_some_and(|o| o != origin) {
            return false;
        }
        if self.ethertype.is_some_and(|e| e != meta.ethertype) {
            return false;
        }
        if let Some(proto) = self.proto {
            let is_ip = meta.ethertype == ETHERTYPE_IPV4 || meta.ethertype == ETHERTYPE_IPV6;
            if !is_ip || meta.ip.map(|ip| ip.proto) != Some(proto) {
                return false;
            }
        }
        let l4 = l4_layer(meta);
        if let Some(range) = self.sport {
            if !l4.is_some_and(|l| range.contains(l.src_port)) {
                return false;
            }
        }
        if let Some(range) = self.dport {
            if !l4.is_some_and(|l| range.contains(l.dst_port)) {
                return false;
            }
        }
        if let Some(flags) = self.flags {
            let Some(tcp) = l4.and_then(|l| l.tcp) else {
                return false;
            };
            if tcp.flags & flags.set != flags.set || tcp.flags & flags.clear != 0 {
                return false;
            }
        }
        if let Some(payload) = &self.payload {
            // For a TCP/UDP rule the payload means the segment's payload; a
            // later fragment carries only the middle of one, and matching
            // there would compare the wrong bytes.
            if self.has_l4_proto() && l4.is_none() {
                return false;
            }
            if !payload_has(frame, meta, payload) {
                return false;
            }
        }
        true
    }

    fn has_l4_proto(&self) -> bool {
        matches!(self.proto, Some(IPPROTO_TCP | IPPROTO_UDP))
    }
}

/// The frame's L4 header, if it really has one: a later fragment never
/// does, whatever the metadata claims.
fn l4_layer(meta: &PacketMeta) -> Option<&L4Meta> {
    match meta.ip {
        Some(ip) if !ip.later_fragment => meta.l4.as_ref(),
        _ => None,
    }
}

/// Whether the payload region meta describes holds `m.bytes` at `m.offset`.
/// The region is clipped to the frame: bytes past its end do not exist and
/// cannot match.
fn payload_has(frame: &[u8], meta: &PacketMeta, m: &PayloadMatch) -> bool {
    let Some(rest) = frame.get(meta.payload_offset..) else {
        return false;
    };
    let region = &rest[..meta.payload_len.min(rest.len())];
    let end = m.offset + m.bytes.len(); // both are small by construction
    region.get(m.offset..end) == Some(m.bytes.as_slice())
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.class.as_str())?;
        match self.origin {
            None => {}
            Some(Origin::Vm) => f.write_str(" from vm")?,
            Some(Origin::Forwarded) => f.write_str(" from forwarded")?,
        }
        match self.ethertype {
            None => {}
            Some(e) => write!(f, " {}", EthertypeName(e))?,
        }
        match self.proto {
            None => {}
            Some(p) => write!(f, " {}", ProtoName(p))?,
        }
        if let Some(r) = self.sport {
            write!(f, " sport {r}")?;
        }
        if let Some(r) = self.dport {
            write!(f, " dport {r}")?;
        }
        if let Some(flags) = self.flags {
            write!(f, " flags {flags}")?;
        }
        if let Some(p) = &self.payload {
            write!(f, " payload {p}")?;
        }
        Ok(())
    }
}

/// Prints an ethertype the way a rule would spell it.
struct EthertypeName(u16);

impl fmt::Display for EthertypeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            ETHERTYPE_IPV4 => f.write_str("ipv4"),
            ETHERTYPE_IPV6 => f.write_str("ipv6"),
            ETHERTYPE_ARP => f.write_str("arp"),
            e => write!(f, "ethertype 0x{e:04x}"),
        }
    }
}

/// Prints an IP protocol the way a rule would spell it.
struct ProtoName(u8);

impl fmt::Display for ProtoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IPPROTO_TCP => f.write_str("tcp"),
            IPPROTO_UDP => f.write_str("udp"),
            p => write!(f, "proto {p}"),
        }
    }
}

impl FromStr for Rule {
    type Err = RuleError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Parser::new(tokenize(text)?).parse()
    }
}

impl serde::Serialize for Rule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Rule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Splits rule text at whitespace outside double quotes. Tokens keep their
/// quotes and escapes verbatim; only the `payload` clause interprets them,
/// so a stray quote anywhere else surfaces as an unknown keyword or a bad
/// value naming the whole token.
fn tokenize(text: &str) -> Result<Vec<String>, RuleError> {
    let mut tokens = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if quoted {
            current.push(c);
            match c {
                '"' => quoted = false,
                '\\' => match chars.next() {
                    Some(next) => current.push(next),
                    None => break,
                },
                _ => {}
            }
        } else if c.is_whitespace() {
            if !current.is_empty() {
                tokens.push(std::mem::take(&mut current));
            }
        } else {
            quoted = c == '"';
            current.push(c);
        }
    }
    if quoted {
        return Err(RuleError::UnterminatedQuote {
            at: Position::NONE,
            token: current,
        });
    }
    if !current.is_empty() {
        tokens.push(current);
    }
    Ok(tokens)
}

fn is_keyword(token: &str) -> bool {
    KEYWORDS.iter().any(|k| token.eq_ignore_ascii_case(k))
}

/// Clause groups: each may appear at most once per rule.
const CLAUSE_CLASS: &str = "class (hold|pass)";
const CLAUSE_FROM: &str = "origin (from)";
const CLAUSE_NETWORK: &str = "network (any|arp|ipv4|ipv6|ethertype)";
const CLAUSE_TRANSPORT: &str = "transport (tcp|udp|proto)";
const CLAUSE_SPORT: &str = "sport";
const CLAUSE_DPORT: &str = "dport";
const CLAUSE_FLAGS: &str = "flags";
const CLAUSE_PAYLOAD: &str = "payload";

struct Parser {
    tokens: Vec<String>,
    next: usize,
    seen: Vec<&'static str>,
}

/// Why a run of digits did not give a number.
enum NumberError {
    NotANumber,
    TooLarge,
}

/// Strict decimal: digits only (no sign, no spaces), so `+5` or `٣` are
/// rejected rather than silently accepted.
fn parse_decimal(s: &str) -> Result<u64, NumberError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NumberError::NotANumber);
    }
    s.parse::<u64>().map_err(|_| NumberError::TooLarge)
}

impl Parser {
    fn new(tokens: Vec<String>) -> Self {
        Parser {
            tokens,
            next: 0,
            seen: Vec::new(),
        }
    }

    fn parse(mut self) -> Result<Rule, RuleError> {
        let Some(first) = self.tokens.first() else {
            return Err(RuleError::Empty { at: Position::NONE });
        };
        let mut rule = Rule::all(first.parse::<Class>()?);
        self.next = 1;
        self.seen.push(CLAUSE_CLASS);
        while let Some(token) = self.tokens.get(self.next).cloned() {
            self.next += 1;
            self.clause(&mut rule, &token)?;
        }
        Self::check(&rule)?;
        Ok(rule)
    }

    /// Parses one clause starting at `token` (already consumed).
    fn clause(&mut self, rule: &mut Rule, token: &str) -> Result<(), RuleError> {
        let keyword = token.to_ascii_lowercase();
        match keyword.as_str() {
            "hold" | "pass" => self.claim(CLAUSE_CLASS, token),
            "from" => {
                self.claim(CLAUSE_FROM, token)?;
                let value = self.value("from", "`vm` or `forwarded`")?;
                rule.origin = Some(if value.eq_ignore_ascii_case("vm") {
                    Origin::Vm
                } else if value.eq_ignore_ascii_case("forwarded") {
                    Origin::Forwarded
                } else {
                    return Err(bad_value("from", &value, "`vm` or `forwarded`"));
                });
                Ok(())
            }
            "any" => self.claim(CLAUSE_NETWORK, token),
            "arp" | "ipv4" | "ipv6" => {
                self.claim(CLAUSE_NETWORK, token)?;
                rule.ethertype = Some(match keyword.as_str() {
                    "arp" => ETHERTYPE_ARP,
                    "ipv4" => ETHERTYPE_IPV4,
                    _ => ETHERTYPE_IPV6,
                });
                Ok(())
            }
            "ethertype" => {
                self.claim(CLAUSE_NETWORK, token)?;
                let value = self.value("ethertype", "a hex ethertype such as 0x88b5")?;
                rule.ethertype = Some(parse_ethertype(&value)?);
                Ok(())
            }
            "tcp" | "udp" => {
                self.claim(CLAUSE_TRANSPORT, token)?;
                rule.proto = Some(if keyword == "tcp" {
                    IPPROTO_TCP
                } else {
                    IPPROTO_UDP
                });
                Ok(())
            }
            "proto" => {
                self.claim(CLAUSE_TRANSPORT, token)?;
                let value = self.value("proto", "an IP protocol number 0-255")?;
                rule.proto = Some(match parse_decimal(&value) {
                    Ok(n) if n <= 255 => n as u8,
                    Ok(_) | Err(NumberError::TooLarge) => {
                        return Err(RuleError::ProtoOutOfRange {
                            at: Position::NONE,
                            value,
                        })
                    }
                    Err(NumberError::NotANumber) => {
                        return Err(bad_value("proto", &value, "an IP protocol number 0-255"))
                    }
                });
                Ok(())
            }
            "sport" | "dport" => {
                let (clause, name) = if keyword == "sport" {
                    (CLAUSE_SPORT, "sport")
                } else {
                    (CLAUSE_DPORT, "dport")
                };
                self.claim(clause, token)?;
                let value = self.value(name, "a port P or a range P-Q")?;
                let range = parse_ports(name, &value)?;
                if name == "sport" {
                    rule.sport = Some(range);
                } else {
                    rule.dport = Some(range);
                }
                Ok(())
            }
            "flags" => {
                self.claim(CLAUSE_FLAGS, token)?;
                rule.flags = Some(self.flags()?);
                Ok(())
            }
            "payload" => {
                self.claim(CLAUSE_PAYLOAD, token)?;
                let value = self.value("payload", "OFF:\"text\" or OFF:0xHEX")?;
                rule.payload = Some(parse_payload(&value)?);
                Ok(())
            }
            _ => Err(RuleError::UnknownKeyword {
                at: Position::NONE,
                token: token.to_string(),
            }),
        }
    }

    fn claim(&mut self, clause: &'static str, token: &str) -> Result<(), RuleError> {
        if self.seen.contains(&clause) {
            return Err(RuleError::DuplicateClause {
                at: Position::NONE,
                clause,
                token: token.to_string(),
            });
        }
        self.seen.push(clause);
        Ok(())
    }

    /// Consumes the value of a clause; a following keyword means the value
    /// was forgotten, not that the keyword is the value.
    fn value(
        &mut self,
        keyword: &'static str,
        expected: &'static str,
    ) -> Result<String, RuleError> {
        match self.tokens.get(self.next) {
            Some(v) if !is_keyword(v) => {
                self.next += 1;
                Ok(v.clone())
            }
            _ => Err(RuleError::MissingValue {
                at: Position::NONE,
                keyword,
                expected,
            }),
        }
    }

    /// `flags` takes every following `+name`/`-name` token.
    fn flags(&mut self) -> Result<FlagMatch, RuleError> {
        let mut m = FlagMatch { set: 0, clear: 0 };
        while let Some(token) = self.tokens.get(self.next) {
            let (set, name) = match token.as_bytes().first() {
                Some(b'+') => (true, &token[1..]),
                Some(b'-') => (false, &token[1..]),
                _ => break,
            };
            self.next += 1;
            let Some((_, bit)) = TCP_FLAGS.iter().find(|(n, _)| name.eq_ignore_ascii_case(n))
            else {
                return Err(RuleError::UnknownFlag {
                    at: Position::NONE,
                    token: token.clone(),
                });
            };
            if (m.set | m.clear) & bit != 0 {
                return Err(RuleError::RepeatedFlag {
                    at: Position::NONE,
                    flag: name.to_ascii_lowercase(),
                });
            }
            if set {
                m.set |= bit;
            } else {
                m.clear |= bit;
            }
        }
        if m.set | m.clear == 0 {
            return Err(RuleError::MissingValue {
                at: Position::NONE,
                keyword: "flags",
                expected: "one or more of +name/-name (fin syn rst psh ack urg ece cwr)",
            });
        }
        Ok(m)
    }

    /// Cross-clause checks, done after all clauses so their order is free.
    fn check(rule: &Rule) -> Result<(), RuleError> {
        if let (Some(e), Some(p)) = (rule.ethertype, rule.proto) {
            if e != ETHERTYPE_IPV4 && e != ETHERTYPE_IPV6 {
                return Err(RuleError::Contradiction {
                    at: Position::NONE,
                    detail: format!(
                        "`{}` frames do not carry `{}`, which needs ipv4 or ipv6",
                        EthertypeName(e),
                        ProtoName(p)
                    ),
                });
            }
        }
        for (present, keyword) in [
            (rule.sport.is_some(), "sport"),
            (rule.dport.is_some(), "dport"),
        ] {
            if present && !rule.has_l4_proto() {
                return Err(RuleError::NeedsTransport {
                    at: Position::NONE,
                    keyword,
                    needs: "`tcp` or `udp`",
                });
            }
        }
        if rule.flags.is_some() && rule.proto != Some(IPPROTO_TCP) {
            return Err(RuleError::NeedsTransport {
                at: Position::NONE,
                keyword: "flags",
                needs: "`tcp`",
            });
        }
        Ok(())
    }
}

fn bad_value(keyword: &'static str, value: &str, expected: &'static str) -> RuleError {
    RuleError::BadValue {
        at: Position::NONE,
        keyword,
        value: value.to_string(),
        expected,
    }
}

fn parse_ethertype(value: &str) -> Result<u16, RuleError> {
    const EXPECTED: &str = "a 16-bit hex ethertype such as 0x88b5";
    let lower = value.to_ascii_lowercase();
    let Some(digits) = lower.strip_prefix("0x") else {
        return Err(bad_value("ethertype", value, EXPECTED));
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad_value("ethertype", value, EXPECTED));
    }
    let significant = digits.trim_start_matches('0');
    if significant.len() > 4 {
        return Err(bad_value("ethertype", value, EXPECTED));
    }
    let e = if significant.is_empty() {
        0
    } else {
        u16::from_str_radix(significant, 16).map_err(|_| bad_value("ethertype", value, EXPECTED))?
    };
    if e < MIN_ETHERTYPE {
        return Err(RuleError::EthertypeTooSmall {
            at: Position::NONE,
            value: value.to_string(),
        });
    }
    if e == ETHERTYPE_VLAN {
        // Parsing looks through the 802.1Q tag, so a rule on the tag's
        // own ethertype could never match.
        return Err(bad_value(
            "ethertype",
            value,
            "the ethertype inside the 802.1Q tag (the tag itself, 0x8100, is looked through)",
        ));
    }
    Ok(e)
}

fn parse_ports(keyword: &'static str, value: &str) -> Result<PortRange, RuleError> {
    let (lo, hi) = value.split_once('-').unwrap_or((value, value));
    let port = |part: &str| match parse_decimal(part) {
        Ok(n) if n <= u64::from(u16::MAX) => Ok(n as u16),
        Ok(_) | Err(NumberError::TooLarge) => Err(RuleError::PortOutOfRange {
            at: Position::NONE,
            keyword,
            value: part.to_string(),
        }),
        Err(NumberError::NotANumber) => Err(bad_value(keyword, value, "a port P or a range P-Q")),
    };
    let range = PortRange {
        lo: port(lo)?,
        hi: port(hi)?,
    };
    if range.hi < range.lo {
        return Err(RuleError::ReversedPortRange {
            at: Position::NONE,
            keyword,
            value: value.to_string(),
        });
    }
    Ok(range)
}

fn parse_payload(value: &str) -> Result<PayloadMatch, RuleError> {
    const EXPECTED: &str = "OFF:\"text\" or OFF:0xHEX";
    let Some((offset, data)) = value.split_once(':') else {
        return Err(bad_value("payload", value, EXPECTED));
    };
    let offset = match parse_decimal(offset) {
        Ok(n) if n <= MAX_PAYLOAD_OFFSET as u64 => n as usize,
        Ok(_) | Err(NumberError::TooLarge) => {
            return Err(RuleError::PayloadOffsetTooLarge {
                at: Position::NONE,
                value: offset.to_string(),
            })
        }
        Err(NumberError::NotANumber) => return Err(bad_value("payload", value, EXPECTED)),
    };
    let bytes = if let Some(quoted) = data.strip_prefix('"') {
        unquote(value, quoted)?
    } else if let Some(hex) = data.strip_prefix("0x").or_else(|| data.strip_prefix("0X")) {
        parse_hex(value, hex)?
    } else {
        return Err(bad_value("payload", value, EXPECTED));
    };
    if bytes.is_empty() {
        return Err(RuleError::EmptyPayload {
            at: Position::NONE,
            value: value.to_string(),
        });
    }
    if bytes.len() > MAX_PAYLOAD_LEN {
        return Err(RuleError::PayloadTooLong {
            at: Position::NONE,
            len: bytes.len(),
        });
    }
    Ok(PayloadMatch { offset, bytes })
}

/// Decodes the text after an opening quote, which must end at the closing
/// quote. Only `\"` and `\\` are escapes; anything else is rejected so a
/// Windows path or a regex-minded `\d` is not silently misread.
fn unquote(value: &str, quoted: &str) -> Result<Vec<u8>, RuleError> {
    let mut out = String::new();
    let mut chars = quoted.chars();
    loop {
        match chars.next() {
            None => {
                return Err(RuleError::UnterminatedQuote {
                    at: Position::NONE,
                    token: value.to_string(),
                })
            }
            Some('"') => break,
            Some('\\') => match chars.next() {
                Some(c @ ('"' | '\\')) => out.push(c),
                Some(c) => {
                    return Err(RuleError::BadEscape {
                        at: Position::NONE,
                        sequence: format!("\\{c}"),
                    })
                }
                None => {
                    return Err(RuleError::UnterminatedQuote {
                        at: Position::NONE,
                        token: value.to_string(),
                    })
                }
            },
            Some(c) => out.push(c),
        }
    }
    if !chars.as_str().is_empty() {
        return Err(bad_value(
            "payload",
            value,
            "nothing after the closing quote of OFF:\"text\"",
        ));
    }
    Ok(out.into_bytes())
}

fn parse_hex(value: &str, hex: &str) -> Result<Vec<u8>, RuleError> {
    let digit = |b: u8| {
        char::from(b)
            .to_digit(16)
            .ok_or_else(|| bad_value("payload", value, "hex digits after 0x"))
    };
    let pairs = hex.as_bytes().chunks_exact(2);
    if !pairs.remainder().is_empty() {
        // Still report a non-hex character first, as it is the likelier typo.
        digit(pairs.remainder()[0])?;
        return Err(bad_value(
            "payload",
            value,
            "an even number of hex digits (whole bytes) after 0x",
        ));
    }
    pairs
        .map(|pair| Ok((digit(pair[0])? * 16 + digit(pair[1])?) as u8))
        .collect()
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

    /// The profile's rule table; [`default_class`] still applies after it.
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

/// Where in a table a rule error occurred, printed as a `rule N: ` prefix
/// when known. A single rule parsed on its own has no position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position(pub Option<usize>);

impl Position {
    pub const NONE: Position = Position(None);
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(n) => write!(f, "rule {n}: "),
            None => Ok(()),
        }
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RuleError {
    #[error("{at}empty rule: expected `hold` or `pass` followed by clauses")]
    Empty { at: Position },
    #[error("{at}unknown class `{token}`: a rule starts with `hold` or `pass`")]
    UnknownClass { at: Position, token: String },
    #[error(
        "{at}unknown keyword `{token}` (expected from, any, arp, ipv4, ipv6, ethertype, tcp, \
         udp, proto, sport, dport, flags or payload)"
    )]
    UnknownKeyword { at: Position, token: String },
    #[error("{at}`{token}` repeats the {clause} clause; each clause may appear once")]
    DuplicateClause {
        at: Position,
        clause: &'static str,
        token: String,
    },
    #[error("{at}`{keyword}` needs a value: {expected}")]
    MissingValue {
        at: Position,
        keyword: &'static str,
        expected: &'static str,
    },
    #[error("{at}`{keyword} {value}`: expected {expected}")]
    BadValue {
        at: Position,
        keyword: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{at}`{keyword}` port `{value}` is out of range (0-65535)")]
    PortOutOfRange {
        at: Position,
        keyword: &'static str,
        value: String,
    },
    #[error("{at}`{keyword} {value}`: the range ends before it starts")]
    ReversedPortRange {
        at: Position,
        keyword: &'static str,
        value: String,
    },
    #[error("{at}ethertype `{value}` is below 0x0600, which makes it an 802.3 length field")]
    EthertypeTooSmall { at: Position, value: String },
    #[error("{at}`proto {value}` is out of range (0-255)")]
    ProtoOutOfRange { at: Position, value: String },
    #[error(
        "{at}unknown TCP flag `{token}` (expected +name or -name with fin, syn, rst, psh, ack, \
         urg, ece or cwr)"
    )]
    UnknownFlag { at: Position, token: String },
    #[error("{at}TCP flag `{flag}` is given more than once in `flags`")]
    RepeatedFlag { at: Position, flag: String },
    #[error("{at}`{keyword}` requires {needs} in the same rule")]
    NeedsTransport {
        at: Position,
        keyword: &'static str,
        needs: &'static str,
    },
    #[error("{at}contradictory rule: {detail}")]
    Contradiction { at: Position, detail: String },
    #[error("{at}`payload {value}` matches nothing: the byte string is empty")]
    EmptyPayload { at: Position, value: String },
    #[error("{at}payload byte string is {len} bytes; at most 64 are allowed")]
    PayloadTooLong { at: Position, len: usize },
    #[error("{at}payload offset `{value}` is too large (at most 1500)")]
    PayloadOffsetTooLarge { at: Position, value: String },
    #[error("{at}unterminated double quote in `{token}`")]
    UnterminatedQuote { at: Position, token: String },
    #[error("{at}unsupported escape `{sequence}` in quoted payload (only \\\" and \\\\)")]
    BadEscape { at: Position, sequence: String },
    #[error("no rule at index {index}: the table has {len} rules")]
    IndexOutOfRange { index: usize, len: usize },
    #[error("unknown profile `{name}` (known profiles: {known})")]
    UnknownProfile { name: String, known: String },
}

impl RuleError {
    /// The 1-based rule position the error refers to, when known.
    pub fn position(&self) -> Option<usize> {
        self.clone().at_mut().and_then(|at| at.0)
    }

    /// Tags the error with the 1-based position of the rule that caused it.
    pub fn at_rule(mut self, position: usize) -> RuleError {
        if let Some(at) = self.at_mut() {
            at.0 = Some(position);
        }
        self
    }

    fn at_mut(&mut self) -> Option<&mut Position> {
        match self {
            RuleError::Empty { at }
            | RuleError::UnknownClass { at, .. }
            | RuleError::UnknownKeyword { at, .. }
            | RuleError::DuplicateClause { at, .. }
            | RuleError::MissingValue { at, .. }
            | RuleError::BadValue { at, .. }
            | RuleError::PortOutOfRange { at, .. }
            | RuleError::ReversedPortRange { at, .. }
            | RuleError::EthertypeTooSmall { at, .. }
            | RuleError::ProtoOutOfRange { at, .. }
            | RuleError::UnknownFlag { at, .. }
            | RuleError::RepeatedFlag { at, .. }
            | RuleError::NeedsTransport { at, .. }
            | RuleError::Contradiction { at, .. }
            | RuleError::EmptyPayload { at, .. }
            | RuleError::PayloadTooLong { at, .. }
            | RuleError::PayloadOffsetTooLarge { at, .. }
            | RuleError::UnterminatedQuote { at, .. }
            | RuleError::BadEscape { at, .. } => Some(at),
            RuleError::IndexOutOfRange { .. } | RuleError::UnknownProfile { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{IpAddrs, IpMeta, L4Meta, TcpMeta, TCP_ACK, TCP_SYN};
    use proptest::prelude::*;

    fn rule(text: &str) -> Rule {
        text.parse()
            .unwrap_or_else(|e| panic!("`{text}` should parse: {e}"))
    }

    fn err(text: &str) -> RuleError {
        match text.parse::<Rule>() {
            Ok(r) => panic!("`{text}` should not parse, got `{r}`"),
            Err(e) => e,
        }
    }

    /// An IPv4 TCP/UDP frame's metadata with the payload at byte 54.
    fn ip_meta(proto: u8, sport: u16, dport: u16, tcp_flags: Option<u8>) -> PacketMeta {
        PacketMeta {
            ethertype: ETHERTYPE_IPV4,
            l3_offset: 14,
            ip: Some(IpMeta {
                proto,
                addrs: IpAddrs::V4 {
                    src: [10, 0, 0, 1],
                    dst: [10, 0, 0, 2],
                },
                later_fragment: false,
            }),
            l4: Some(L4Meta {
                src_port: sport,
                dst_port: dport,
                offset: 34,
                tcp: tcp_flags.map(|flags| TcpMeta {
                    seq: 1,
                    ack: 2,
                    flags,
                    window: 1000,
                    header_len: 20,
                }),
            }),
            payload_offset: 54,
            payload_len: 0,
            ..PacketMeta::default()
        }
    }

    fn frame_with_payload(payload: &[u8]) -> (Vec<u8>, usize) {
        let mut frame = vec![0u8; 54];
        frame.extend_from_slice(payload);
        (frame, payload.len())
    }

    fn arp_meta() -> PacketMeta {
        PacketMeta {
            ethertype: ETHERTYPE_ARP,
            l3_offset: 14,
            payload_offset: 14,
            payload_len: 28,
            ..PacketMeta::default()
        }
    }

    // ---- parsing: accepted forms -------------------------------------

    #[test]
    fn parses_every_clause() {
        let r = rule(
            r#"pass from vm ipv4 tcp sport 1000-2000 dport 80 flags +syn -ack payload 0:"GET ""#,
        );
        assert_eq!(r.class(), Class::Pass);
        assert_eq!(r.origin, Some(Origin::Vm));
        assert_eq!(r.ethertype, Some(ETHERTYPE_IPV4));
        assert_eq!(r.proto, Some(IPPROTO_TCP));
        assert_eq!(r.sport, Some(PortRange { lo: 1000, hi: 2000 }));
        assert_eq!(r.dport, Some(PortRange { lo: 80, hi: 80 }));
        assert_eq!(
            r.flags,
            Some(FlagMatch {
                set: TCP_SYN,
                clear: TCP_ACK
            })
        );
        assert_eq!(
            r.payload,
            Some(PayloadMatch {
                offset: 0,
                bytes: b"GET ".to_vec()
            })
        );
    }

    #[test]
    fn bare_class_matches_everything() {
        let r = rule("hold");
        assert_eq!(r, Rule::all(Class::Hold));
        assert!(r.matches(&[], &PacketMeta::default(), Origin::Forwarded));
        assert_eq!(rule("  PASS  any "), Rule::all(Class::Pass));
    }

    #[test]
    fn keywords_are_case_insensitive_and_order_is_free() {
        assert_eq!(
            rule("HOLD DPORT 53 UDP FROM Forwarded IPV6"),
            rule("hold from forwarded ipv6 udp dport 53")
        );
        assert_eq!(rule("pass Flags +SYN Tcp"), rule("pass tcp flags +syn"));
        assert_eq!(rule("pass payload 2:0XaB"), rule("pass payload 2:0xab"));
    }

    #[test]
    fn numeric_spellings_normalise() {
        assert_eq!(rule("hold ethertype 0x0800"), rule("hold ipv4"));
        assert_eq!(rule("hold ethertype 0x86DD"), rule("hold ipv6"));
        assert_eq!(rule("hold ethertype 0x806"), rule("hold arp"));
        assert_eq!(rule("hold proto 6 sport 1"), rule("hold tcp sport 1"));
        assert_eq!(rule("hold proto 17"), rule("hold udp"));
        assert_eq!(rule("hold ethertype 0x000088b5").ethertype, Some(0x88b5));
        assert_eq!(rule("hold sport 5-5 udp"), rule("hold udp sport 5"));
    }

    #[test]
    fn quoted_payload_keeps_spaces_and_escapes() {
        let r = rule(r#"hold payload 3:"a \"b\" \\ c""#);
        assert_eq!(r.payload.unwrap().bytes, br#"a "b" \ c"#.to_vec());
        let r = rule("hold payload 0:\"  \"");
        assert_eq!(r.payload.unwrap().bytes, b"  ".to_vec());
        let r = rule("hold payload 0:\"é\"");
        assert_eq!(r.payload.unwrap().bytes, "é".as_bytes().to_vec());
    }

    #[test]
    fn limits_are_inclusive() {
        rule(&format!("hold payload 1500:0x{}", "ab".repeat(64)));
        rule("hold udp sport 0-65535");
        rule("hold ethertype 0x0600");
        rule("hold proto 255");
    }

    // ---- parsing: each error ----------------------------------------

    #[test]
    fn error_empty() {
        assert!(matches!(err(""), RuleError::Empty { .. }));
        assert!(matches!(err(" \t\n"), RuleError::Empty { .. }));
    }

    #[test]
    fn error_unknown_class() {
        assert_eq!(
            err("drop tcp"),
            RuleError::UnknownClass {
                at: Position::NONE,
                token: "drop".into()
            }
        );
        assert!(matches!(err("tcp hold"), RuleError::UnknownClass { .. }));
        assert!("Hold".parse::<Class>().is_ok());
        assert!("held".parse::<Class>().is_err());
    }

    #[test]
    fn error_unknown_keyword() {
        assert_eq!(
            err("hold tcp port 80"),
            RuleError::UnknownKeyword {
                at: Position::NONE,
                token: "port".into()
            }
        );
        assert!(matches!(
            err("hold \"tcp\""),
            RuleError::UnknownKeyword { .. }
        ));
    }

    #[test]
    fn error_duplicate_clause() {
        for (text, token) in [
            ("hold tcp udp", "udp"),
            ("hold ipv4 ethertype 0x0800", "ethertype"),
            ("hold any arp", "arp"),
            ("hold from vm from vm", "from"),
            ("hold tcp sport 1 sport 2", "sport"),
            ("hold tcp dport 1 dport 2", "dport"),
            ("hold tcp flags +syn flags -ack", "flags"),
            ("hold payload 0:0x00 payload 1:0x01", "payload"),
            ("hold pass", "pass"),
            ("hold proto 6 tcp", "tcp"),
        ] {
            match err(text) {
                RuleError::DuplicateClause { token: t, .. } => assert_eq!(t, token, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn error_missing_value() {
        for (text, keyword) in [
            ("hold from", "from"),
            ("hold ethertype", "ethertype"),
            ("hold proto", "proto"),
            ("hold udp sport", "sport"),
            ("hold udp dport sport 5", "dport"),
            ("hold tcp flags", "flags"),
            ("hold tcp flags dport 5", "flags"),
            ("hold payload", "payload"),
        ] {
            match err(text) {
                RuleError::MissingValue { keyword: k, .. } => assert_eq!(k, keyword, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn error_bad_value() {
        for (text, keyword, value) in [
            ("hold from host", "from", "host"),
            ("hold ethertype 0800", "ethertype", "0800"),
            ("hold ethertype 0xzz", "ethertype", "0xzz"),
            ("hold ethertype 0x10000", "ethertype", "0x10000"),
            ("hold ethertype 0x8100", "ethertype", "0x8100"),
            ("hold proto tcp6", "proto", "tcp6"),
            ("hold proto -1", "proto", "-1"),
            ("hold udp sport http", "sport", "http"),
            ("hold udp dport 1-", "dport", "1-"),
            ("hold udp dport +5", "dport", "+5"),
            ("hold payload 0", "payload", "0"),
            ("hold payload x:0x00", "payload", "x:0x00"),
            ("hold payload 0:abc", "payload", "0:abc"),
            ("hold payload 0:0xabc", "payload", "0:0xabc"),
            ("hold payload 0:0xgg", "payload", "0:0xgg"),
            ("hold payload 0:\"a\"b", "payload", "0:\"a\"b"),
        ] {
            match err(text) {
                RuleError::BadValue {
                    keyword: k,
                    value: v,
                    ..
                } => {
                    assert_eq!((k, v.as_str()), (keyword, value), "{text}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn error_ports() {
        assert_eq!(
            err("hold udp sport 65536"),
            RuleError::PortOutOfRange {
                at: Position::NONE,
                keyword: "sport",
                value: "65536".into()
            }
        );
        assert!(matches!(
            err("hold udp dport 1-99999999999999999999999"),
            RuleError::PortOutOfRange { .. }
        ));
        assert_eq!(
            err("hold tcp dport 20-10"),
            RuleError::ReversedPortRange {
                at: Position::NONE,
                keyword: "dport",
                value: "20-10".into()
            }
        );
    }

    #[test]
    fn error_ethertype_and_proto_ranges() {
        assert_eq!(
            err("hold ethertype 0x05ff"),
            RuleError::EthertypeTooSmall {
                at: Position::NONE,
                value: "0x05ff".into()
            }
        );
        assert_eq!(
            err("hold proto 256"),
            RuleError::ProtoOutOfRange {
                at: Position::NONE,
                value: "256".into()
            }
        );
    }

    #[test]
    fn error_flags() {
        assert_eq!(
            err("hold tcp flags +syn -foo"),
            RuleError::UnknownFlag {
                at: Position::NONE,
                token: "-foo".into()
            }
        );
        assert!(matches!(
            err("hold tcp flags +"),
            RuleError::UnknownFlag { .. }
        ));
        assert_eq!(
            err("hold tcp flags +syn -SYN"),
            RuleError::RepeatedFlag {
                at: Position::NONE,
                flag: "syn".into()
            }
        );
        assert!(matches!(
            err("hold tcp flags +ack +ack"),
            RuleError::RepeatedFlag { .. }
        ));
        // A flag without a sign ends the flag list, so it is a stray word.
        assert!(matches!(
            err("hold tcp flags syn"),
            RuleError::MissingValue { .. }
        ));
    }

    #[test]
    fn error_needs_transport() {
        for (text, keyword) in [
            ("hold sport 80", "sport"),
            ("hold ipv4 dport 80", "dport"),
            ("hold proto 1 dport 80", "dport"),
            ("hold udp flags +syn", "flags"),
            ("hold flags +syn", "flags"),
        ] {
            match err(text) {
                RuleError::NeedsTransport { keyword: k, .. } => assert_eq!(k, keyword, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn error_contradiction() {
        assert!(matches!(
            err("hold arp tcp"),
            RuleError::Contradiction { .. }
        ));
        assert!(matches!(
            err("hold udp ethertype 0x88b5"),
            RuleError::Contradiction { .. }
        ));
        let msg = err("hold ethertype 0x0806 proto 1").to_string();
        assert!(msg.contains("arp") && msg.contains("proto 1"), "{msg}");
    }

    #[test]
    fn error_payload() {
        assert!(matches!(
            err("hold payload 0:\"\""),
            RuleError::EmptyPayload { .. }
        ));
        assert!(matches!(
            err("hold payload 0:0x"),
            RuleError::EmptyPayload { .. }
        ));
        assert_eq!(
            err(&format!("hold payload 0:\"{}\"", "a".repeat(65))),
            RuleError::PayloadTooLong {
                at: Position::NONE,
                len: 65
            }
        );
        assert_eq!(
            err("hold payload 1501:0x00"),
            RuleError::PayloadOffsetTooLarge {
                at: Position::NONE,
                value: "1501".into()
            }
        );
        assert!(matches!(
            err("hold payload 184467440737095516160:0x00"),
            RuleError::PayloadOffsetTooLarge { .. }
        ));
        assert_eq!(
            err(r#"hold payload 0:"a\nb""#),
            RuleError::BadEscape {
                at: Position::NONE,
                sequence: "\\n".into()
            }
        );
        assert!(matches!(
            err("hold payload 0:\"abc"),
            RuleError::UnterminatedQuote { .. }
        ));
        assert!(matches!(
            err(r#"hold payload 0:"abc\""#),
            RuleError::UnterminatedQuote { .. }
        ));
        assert!(matches!(
            err("hold payload 0:\"abc\\"),
            RuleError::UnterminatedQuote { .. }
        ));
    }

    #[test]
    fn from_texts_names_position_and_token() {
        let e = RuleSet::from_texts(&["pass arp", "hold tcp", "hold udp dport 70000"]).unwrap_err();
        assert_eq!(e.position(), Some(3));
        let msg = e.to_string();
        assert!(msg.starts_with("rule 3: "), "{msg}");
        assert!(msg.contains("70000"), "{msg}");
        let e = RuleSet::from_texts(&["hold bogus"]).unwrap_err();
        assert_eq!(e.to_string().split(':').next(), Some("rule 1"));
        assert!(e.to_string().contains("`bogus`"));
        // Without a table there is no position to name.
        assert_eq!(err("hold bogus").position(), None);
        assert!(!err("hold bogus").to_string().starts_with("rule"));
    }

    #[test]
    fn from_texts_is_all_or_nothing() {
        let texts = vec!["pass arp".to_string(), "hold tcp sport 9-1".to_string()];
        assert!(RuleSet::from_texts(&texts).is_err());
        let set = RuleSet::from_texts(&texts[..1]).unwrap();
        assert_eq!(set.to_texts(), vec!["pass arp"]);
        assert_eq!(
            RuleSet::from_texts::<&str>(&[]).unwrap(),
            RuleSet::default()
        );
    }

    // ---- display ---------------------------------------------------

    #[test]
    fn display_is_canonical() {
        for (input, canonical) in [
            ("HOLD", "hold"),
            ("pass any", "pass"),
            ("pass dport 53 udp from VM", "pass from vm udp dport 53"),
            ("hold ethertype 0x88B5", "hold ethertype 0x88b5"),
            ("hold proto 6", "hold tcp"),
            ("hold proto 47", "hold proto 47"),
            (
                "hold tcp flags -ack +fin +syn",
                "hold tcp flags +fin +syn -ack",
            ),
            (
                "hold tcp flags +cwr -ece +urg",
                "hold tcp flags +urg -ece +cwr",
            ),
            ("hold udp sport 7-7 dport 1-2", "hold udp sport 7 dport 1-2"),
            ("hold payload 4:0x474554", "hold payload 4:\"GET\""),
            (r#"hold payload 0:"a\"\\""#, r#"hold payload 0:"a\"\\""#),
            ("hold payload 0:\"é\"", "hold payload 0:0xc3a9"),
            ("hold payload 0:0x0d0a", "hold payload 0:0x0d0a"),
        ] {
            let r = rule(input);
            assert_eq!(r.to_string(), canonical, "{input}");
            assert_eq!(rule(canonical), r, "{canonical}");
        }
    }

    #[test]
    fn serde_uses_rule_text() {
        let set = RuleSet::from_texts(&["pass from vm udp dport 53", "hold"]).unwrap();
        let json = serde_json::to_string(&set).unwrap();
        assert_eq!(json, r#"["pass from vm udp dport 53","hold"]"#);
        assert_eq!(serde_json::from_str::<RuleSet>(&json).unwrap(), set);
        let e = serde_json::from_str::<RuleSet>(r#"["hold", "hold tcp tcp"]"#).unwrap_err();
        assert!(e.to_string().contains("rule 2"), "{e}");
        assert_eq!(serde_json::to_string(&Class::Pass).unwrap(), r#""pass""#);
        assert_eq!(
            serde_json::to_string(&Profile::SipRtp).unwrap(),
            r#""sip-rtp""#
        );
    }

    // ---- matching and defaults ---------------------------------------

    #[test]
    fn defaults() {
        let set = RuleSet::default();
        let tcp = ip_meta(IPPROTO_TCP, 1, 2, Some(TCP_ACK));
        assert_eq!(set.classify_frame(&[], &tcp, Origin::Vm), Class::Hold);
        assert_eq!(
            set.classify_frame(&[], &tcp, Origin::Forwarded),
            Class::Pass
        );
        assert_eq!(
            set.classify_frame(&[], &arp_meta(), Origin::Vm),
            Class::Pass
        );
        assert_eq!(
            set.classify_frame(&[], &PacketMeta::default(), Origin::Vm),
            Class::Hold
        );
    }

    #[test]
    fn first_match_wins_over_defaults() {
        let set =
            RuleSet::from_texts(&["hold arp", "pass arp", "pass from forwarded udp"]).unwrap();
        assert_eq!(
            set.classify_frame(&[], &arp_meta(), Origin::Forwarded),
            Class::Hold
        );
        let udp = ip_meta(IPPROTO_UDP, 1, 2, None);
        assert_eq!(
            set.classify_frame(&[], &udp, Origin::Forwarded),
            Class::Pass
        );
        assert_eq!(set.classify_frame(&[], &udp, Origin::Vm), Class::Hold);
    }

    #[test]
    fn protocol_requires_ip_ethertype() {
        let r = rule("pass udp");
        let mut m = ip_meta(IPPROTO_UDP, 1, 2, None);
        assert!(r.matches(&[], &m, Origin::Vm));
        m.ethertype = ETHERTYPE_IPV6;
        assert!(r.matches(&[], &m, Origin::Vm));
        assert!(!rule("pass ipv4 udp").matches(&[], &m, Origin::Vm));
        m.ethertype = ETHERTYPE_ARP;
        assert!(!r.matches(&[], &m, Origin::Vm));
    }

    #[test]
    fn ports_and_flags_need_their_layer() {
        let sport = rule("pass udp sport 5000-5010");
        let dport = rule("pass udp dport 53");
        let m = ip_meta(IPPROTO_UDP, 5005, 53, None);
        assert!(sport.matches(&[], &m, Origin::Vm));
        assert!(dport.matches(&[], &m, Origin::Vm));
        assert!(!sport.matches(&[], &ip_meta(IPPROTO_UDP, 5011, 53, None), Origin::Vm));
        // A later fragment has no ports, whatever the metadata says.
        let mut frag = m.clone();
        frag.ip.as_mut().unwrap().later_fragment = true;
        assert!(!sport.matches(&[], &frag, Origin::Vm));
        assert!(rule("pass udp").matches(&[], &frag, Origin::Vm));
        let mut no_l4 = m.clone();
        no_l4.l4 = None;
        assert!(!dport.matches(&[], &no_l4, Origin::Vm));

        let syn_only = rule("hold tcp flags +syn -ack");
        assert!(syn_only.matches(&[], &ip_meta(IPPROTO_TCP, 1, 2, Some(TCP_SYN)), Origin::Vm));
        assert!(!syn_only.matches(
            &[],
            &ip_meta(IPPROTO_TCP, 1, 2, Some(TCP_SYN | TCP_ACK)),
            Origin::Vm
        ));
        assert!(!syn_only.matches(&[], &ip_meta(IPPROTO_TCP, 1, 2, None), Origin::Vm));
    }

    #[test]
    fn payload_matching() {
        let (frame, len) = frame_with_payload(b"INVITE sip:bob SIP/2.0");
        let mut m = ip_meta(IPPROTO_UDP, 5060, 5060, None);
        m.payload_len = len;
        assert!(rule("hold udp payload 0:\"INVITE \"").matches(&frame, &m, Origin::Vm));
        assert!(rule("hold payload 7:\"sip:\"").matches(&frame, &m, Origin::Vm));
        assert!(!rule("hold payload 7:\"SIP:\"").matches(&frame, &m, Origin::Vm));
        // Past the declared payload end: not a match even though bytes exist.
        let mut short = m.clone();
        short.payload_len = 3;
        assert!(!rule("hold payload 0:\"INVITE\"").matches(&frame, &short, Origin::Vm));
        // Metadata claiming more than the frame holds is clipped, not trusted.
        let mut lying = m.clone();
        lying.payload_len = usize::MAX;
        lying.payload_offset = usize::MAX - 1;
        assert!(!rule("hold payload 0:0x00").matches(&frame, &lying, Origin::Vm));
        // A UDP payload rule does not look into a later fragment's bytes.
        let mut frag = m.clone();
        frag.ip.as_mut().unwrap().later_fragment = true;
        assert!(!rule("hold udp payload 0:\"INVITE\"").matches(&frame, &frag, Origin::Vm));
        assert!(rule("hold payload 0:\"INVITE\"").matches(&frame, &frag, Origin::Vm));
    }

    #[test]
    fn origin_and_ethertype() {
        let r = rule("pass from vm ethertype 0x88b5");
        let m = PacketMeta {
            ethertype: 0x88b5,
            ..PacketMeta::default()
        };
        assert!(r.matches(&[], &m, Origin::Vm));
        assert!(!r.matches(&[], &m, Origin::Forwarded));
        assert!(!r.matches(&[], &arp_meta(), Origin::Vm));
    }

    #[test]
    fn metadata_classifier_prefers_hint() {
        let c = MetadataClassifier::new(RuleSet::default());
        let m = ip_meta(IPPROTO_TCP, 1, 2, Some(TCP_ACK));
        let pass = FrameHint {
            class: Some(Class::Pass),
            protocol: Some("quic".into()),
        };
        let none = FrameHint {
            class: None,
            protocol: Some("quic".into()),
        };
        assert_eq!(c.classify(&[], &m, Origin::Vm, Some(&pass)), Class::Pass);
        assert_eq!(c.classify(&[], &m, Origin::Vm, Some(&none)), Class::Hold);
        assert_eq!(c.classify(&[], &m, Origin::Vm, None), Class::Hold);
        // The rule set itself ignores hints.
        assert_eq!(
            RuleSet::default().classify(&[], &m, Origin::Vm, Some(&pass)),
            Class::Hold
        );
        let boxed: std::sync::Arc<dyn Classifier> = std::sync::Arc::new(c);
        assert_eq!(
            boxed.classify(&[], &m, Origin::Vm, Some(&pass)),
            Class::Pass
        );
    }

    // ---- profiles ---------------------------------------------------

    #[test]
    fn profiles_parse_and_name() {
        for p in Profile::all() {
            assert_eq!(p.name().parse::<Profile>().unwrap(), *p);
            assert_eq!(p.to_string(), p.name());
            assert!(!p.description().is_empty());
            let rules = p.rules();
            assert_eq!(RuleSet::from_texts(&rules.to_texts()).unwrap(), rules);
        }
        assert_eq!("SIP-RTP".parse::<Profile>().unwrap(), Profile::SipRtp);
        let e = "voip".parse::<Profile>().unwrap_err().to_string();
        assert!(
            e.contains("voip") && e.contains("conservative, sip-rtp, bulk-tcp"),
            "{e}"
        );
        assert!(Profile::BulkTcp.description().contains("SYN"));
    }

    #[test]
    fn conservative_profile_is_defaults() {
        assert!(Profile::Conservative.rules().is_empty());
    }

    #[test]
    fn sip_rtp_profile() {
        let set = Profile::SipRtp.rules();
        let c = |m: &PacketMeta| set.classify_frame(&[], m, Origin::Vm);
        assert_eq!(c(&ip_meta(IPPROTO_UDP, 5060, 40000, None)), Class::Hold);
        assert_eq!(c(&ip_meta(IPPROTO_UDP, 40000, 5061, None)), Class::Hold);
        assert_eq!(
            c(&ip_meta(IPPROTO_TCP, 5061, 40000, Some(TCP_ACK))),
            Class::Hold
        );
        assert_eq!(
            c(&ip_meta(IPPROTO_TCP, 40000, 5060, Some(TCP_ACK))),
            Class::Hold
        );
        // SIP to a peer port inside the RTP range is still signalling.
        assert_eq!(c(&ip_meta(IPPROTO_UDP, 5060, 15000, None)), Class::Hold);
        assert_eq!(c(&ip_meta(IPPROTO_UDP, 10000, 40000, None)), Class::Pass);
        assert_eq!(c(&ip_meta(IPPROTO_UDP, 40000, 20000, None)), Class::Pass);
        assert_eq!(c(&ip_meta(IPPROTO_UDP, 40000, 20001, None)), Class::Hold);
        // RTP over TCP is not a thing the profile trusts.
        assert_eq!(
            c(&ip_meta(IPPROTO_TCP, 15000, 15000, Some(TCP_ACK))),
            Class::Hold
        );
        assert_eq!(c(&arp_meta()), Class::Pass);
    }

    #[test]
    fn bulk_tcp_profile() {
        let set = Profile::BulkTcp.rules();
        assert_eq!(set.to_texts(), vec!["pass tcp"]);
        let c = |m: &PacketMeta| set.classify_frame(&[], m, Origin::Vm);
        assert_eq!(c(&ip_meta(IPPROTO_TCP, 1, 2, Some(TCP_ACK))), Class::Pass);
        assert_eq!(c(&ip_meta(IPPROTO_UDP, 1, 2, None)), Class::Hold);
    }

    // ---- editing ----------------------------------------------------

    #[test]
    fn insert_and_remove() {
        let mut set = RuleSet::from_texts(&["pass arp", "hold tcp"]).unwrap();
        set.insert(1, rule("pass udp"));
        set.insert(0, rule("hold ipv6"));
        set.insert(99, rule("hold"));
        assert_eq!(
            set.to_texts(),
            vec!["hold ipv6", "pass arp", "pass udp", "hold tcp", "hold"]
        );
        assert_eq!(set.remove(2).unwrap(), rule("pass udp"));
        assert_eq!(set.remove(3).unwrap(), rule("hold"));
        assert_eq!(
            set.remove(3),
            Err(RuleError::IndexOutOfRange { index: 3, len: 3 })
        );
        assert_eq!(set.to_texts(), vec!["hold ipv6", "pass arp", "hold tcp"]);
        assert_eq!(set.len(), 3);
        let mut empty = RuleSet::default();
        assert!(empty.remove(0).is_err());
        empty.insert(5, rule("hold"));
        assert_eq!(empty.rules(), &[rule("hold")]);
    }

    // ---- property tests ----------------------------------------------

    const INTERESTING_ETHERTYPES: [u16; 5] = [
        ETHERTYPE_IPV4,
        ETHERTYPE_IPV6,
        ETHERTYPE_ARP,
        0x88b5,
        0x0600,
    ];

    /// Ports drawn mostly from a small pool so that generated rules and
    /// frames actually meet.
    fn port() -> impl Strategy<Value = u16> {
        prop_oneof![
            4 => prop::sample::select(vec![0u16, 53, 80, 5060, 10000, 65535]),
            1 => any::<u16>(),
        ]
    }

    fn port_range() -> impl Strategy<Value = PortRange> {
        (port(), prop_oneof![Just(0u16), 0u16..4, any::<u16>()]).prop_map(|(lo, width)| PortRange {
            lo,
            hi: lo.saturating_add(width),
        })
    }

    fn payload_byte() -> impl Strategy<Value = u8> {
        prop_oneof![4 => prop::sample::select(vec![0u8, b'A', b'"', b'\\', b' ']), 1 => any::<u8>()]
    }

    /// The raw parts of a rule as generated, before [`repair`] makes them a
    /// rule the parser would accept.
    type RuleParts = (
        Class,
        Option<Origin>,
        Option<u16>,
        Option<u8>,
        Option<PortRange>,
        Option<PortRange>,
        Option<(u8, u8)>,
        Option<(usize, Vec<u8>)>,
    );

    /// Drops or adjusts combinations the parser rejects, so every generated
    /// rule is one a user could write.
    fn repair(parts: RuleParts) -> Rule {
        let (class, origin, mut ethertype, proto, sport, dport, flags, payload) = parts;
        if proto.is_some() && !matches!(ethertype, Some(ETHERTYPE_IPV4 | ETHERTYPE_IPV6)) {
            ethertype = None;
        }
        let l4 = matches!(proto, Some(IPPROTO_TCP | IPPROTO_UDP));
        let flags = flags
            .filter(|_| proto == Some(IPPROTO_TCP))
            .map(|(set, clear)| FlagMatch {
                set,
                clear: clear & !set,
            })
            .filter(|f| f.set | f.clear != 0);
        Rule {
            class,
            origin,
            ethertype,
            proto,
            sport: sport.filter(|_| l4),
            dport: dport.filter(|_| l4),
            flags,
            payload: payload.map(|(offset, bytes)| PayloadMatch { offset, bytes }),
        }
    }

    fn class() -> impl Strategy<Value = Class> {
        prop_oneof![Just(Class::Hold), Just(Class::Pass)]
    }

    fn origin() -> impl Strategy<Value = Origin> {
        prop_oneof![Just(Origin::Vm), Just(Origin::Forwarded)]
    }

    fn common_proto() -> impl Strategy<Value = u8> {
        prop_oneof![
            3 => prop::sample::select(vec![IPPROTO_TCP, IPPROTO_UDP, 1]),
            1 => any::<u8>(),
        ]
    }

    /// Any rule the syntax can express, with every clause equally likely:
    /// for the text round trip.
    fn arb_rule() -> impl Strategy<Value = Rule> {
        let ethertype = prop_oneof![
            3 => prop::sample::select(INTERESTING_ETHERTYPES.to_vec()),
            1 => (MIN_ETHERTYPE..=u16::MAX).prop_filter("vlan", |e| *e != ETHERTYPE_VLAN),
        ];
        let payload = (
            prop_oneof![3 => 0usize..6, 1 => 0..=MAX_PAYLOAD_OFFSET],
            prop::collection::vec(payload_byte(), 1..=MAX_PAYLOAD_LEN),
        );
        (
            class(),
            prop::option::of(origin()),
            prop::option::of(ethertype),
            prop::option::of(common_proto()),
            prop::option::of(port_range()),
            prop::option::of(port_range()),
            prop::option::of((any::<u8>(), any::<u8>())),
            prop::option::of(payload),
        )
            .prop_map(repair)
    }

    /// Rules for the matcher comparison: few clauses each, drawn from the
    /// same small pools as [`arb_meta_and_frame`], so that a good share of
    /// rules match, including ones with port, flag and payload clauses.
    fn matching_rule() -> impl Strategy<Value = Rule> {
        let flag_bits = || prop::sample::select(vec![0u8, TCP_SYN, TCP_ACK, TCP_SYN | TCP_ACK]);
        let rule_ports = || {
            (
                prop_oneof![3 => prop::sample::select(vec![53u16, 5060]), 1 => port()],
                prop_oneof![Just(0u16), 0u16..4, any::<u16>()],
            )
                .prop_map(|(lo, width)| PortRange {
                    lo,
                    hi: lo.saturating_add(width),
                })
        };
        let payload = (0usize..3, prop::collection::vec(matching_byte(), 1..3));
        (
            class(),
            prop::option::weighted(0.2, origin()),
            prop::option::weighted(0.2, prop::sample::select(INTERESTING_ETHERTYPES.to_vec())),
            prop::option::weighted(
                0.7,
                prop::sample::select(vec![IPPROTO_TCP, IPPROTO_TCP, IPPROTO_UDP, 1]),
            ),
            prop::option::weighted(0.3, rule_ports()),
            prop::option::weighted(0.3, rule_ports()),
            prop::option::weighted(0.3, (flag_bits(), flag_bits())),
            prop::option::weighted(0.3, payload),
        )
            .prop_map(repair)
    }

    /// A two-letter alphabet for payload bytes in the matcher comparison,
    /// so short prefixes often occur in the generated frames.
    fn matching_byte() -> impl Strategy<Value = u8> {
        prop_oneof![4 => prop::sample::select(vec![0u8, b'A']), 1 => any::<u8>()]
    }

    /// Metadata that is often self-consistent and sometimes nonsense:
    /// offsets past the frame, huge lengths, ports on a later fragment.
    fn arb_meta_and_frame() -> impl Strategy<Value = (PacketMeta, Vec<u8>)> {
        // Biased towards TCP/UDP over IP with a couple of well-known ports,
        // since only such frames can satisfy port and flag clauses.
        let ethertype = prop_oneof![
            3 => prop::sample::select(vec![ETHERTYPE_IPV4, ETHERTYPE_IPV6]),
            1 => prop::sample::select(INTERESTING_ETHERTYPES.to_vec()),
            1 => any::<u16>(),
        ];
        let proto = prop_oneof![
            4 => prop::sample::select(vec![IPPROTO_TCP, IPPROTO_UDP]),
            1 => common_proto(),
        ];
        let ip = prop::option::weighted(0.9, (proto, any::<bool>(), prop::bool::weighted(0.1)));
        let meta_port = || prop_oneof![4 => prop::sample::select(vec![53u16, 5060]), 1 => port()];
        let flags = prop_oneof![
            3 => prop::sample::select(vec![TCP_SYN, TCP_ACK, TCP_SYN | TCP_ACK, 0]),
            1 => any::<u8>(),
        ];
        let l4 = prop::option::weighted(
            0.9,
            (
                meta_port(),
                meta_port(),
                any::<usize>(),
                prop::option::weighted(0.8, flags),
            ),
        );
        let offset = prop_oneof![4 => 0usize..8, 1 => 0usize..60, 1 => any::<usize>()];
        let len = prop_oneof![4 => 0usize..40, 1 => any::<usize>()];
        let frame = prop::collection::vec(matching_byte(), 0..48);
        (ethertype, ip, l4, offset, len, frame).prop_map(
            |(ethertype, ip, l4, payload_offset, payload_len, frame)| {
                let meta = PacketMeta {
                    ethertype,
                    l3_offset: 14,
                    ip: ip.map(|(proto, v6, later_fragment)| IpMeta {
                        proto,
                        addrs: if v6 {
                            IpAddrs::V6 {
                                src: [1; 16],
                                dst: [2; 16],
                            }
                        } else {
                            IpAddrs::V4 {
                                src: [1; 4],
                                dst: [2; 4],
                            }
                        },
                        later_fragment,
                    }),
                    l4: l4.map(|(src_port, dst_port, offset, tcp)| L4Meta {
                        src_port,
                        dst_port,
                        offset,
                        tcp: tcp.map(|flags| TcpMeta {
                            seq: 0,
                            ack: 0,
                            flags,
                            window: 0,
                            header_len: 20,
                        }),
                    }),
                    payload_offset,
                    payload_len,
                    ..PacketMeta::default()
                };
                (meta, frame)
            },
        )
    }

    /// The specification restated as plainly as possible, one field at a
    /// time, to check the real matcher against.
    fn reference_matches(r: &Rule, frame: &[u8], meta: &PacketMeta, origin: Origin) -> bool {
        if let Some(o) = r.origin {
            if o != origin {
                return false;
            }
        }
        if let Some(e) = r.ethertype {
            if meta.ethertype != e {
                return false;
            }
        }
        if let Some(p) = r.proto {
            if meta.ethertype != 0x0800 && meta.ethertype != 0x86dd {
                return false;
            }
            match meta.ip {
                Some(ip) if ip.proto == p => {}
                _ => return false,
            }
        }
        let has_l4 = match meta.ip {
            Some(ip) => !ip.later_fragment && meta.l4.is_some(),
            None => false,
        };
        if let Some(range) = r.sport {
            if !has_l4 {
                return false;
            }
            let p = meta.l4.unwrap().src_port;
            if p < range.lo || p > range.hi {
                return false;
            }
        }
        if let Some(range) = r.dport {
            if !has_l4 {
                return false;
            }
            let p = meta.l4.unwrap().dst_port;
            if p < range.lo || p > range.hi {
                return false;
            }
        }
        if let Some(f) = r.flags {
            if !has_l4 {
                return false;
            }
            let Some(tcp) = meta.l4.unwrap().tcp else {
                return false;
            };
            for (_, bit) in TCP_FLAGS {
                if f.set & bit != 0 && tcp.flags & bit == 0 {
                    return false;
                }
                if f.clear & bit != 0 && tcp.flags & bit != 0 {
                    return false;
                }
            }
        }
        if let Some(p) = &r.payload {
            if (r.proto == Some(6) || r.proto == Some(17)) && !has_l4 {
                return false;
            }
            for (i, want) in p.bytes.iter().enumerate() {
                let within = p.offset + i;
                if within >= meta.payload_len {
                    return false;
                }
                let Some(at) = meta.payload_offset.checked_add(within) else {
                    return false;
                };
                if at >= frame.len() || frame[at] != *want {
                    return false;
                }
            }
        }
        true
    }

    fn reference_classify(
        rules: &[Rule],
        frame: &[u8],
        meta: &PacketMeta,
        origin: Origin,
    ) -> Class {
        for r in rules {
            if reference_matches(r, frame, meta, origin) {
                return r.class;
            }
        }
        if origin == Origin::Forwarded || meta.ethertype == 0x0806 {
            Class::Pass
        } else {
            Class::Hold
        }
    }

    /// Words the parser knows, plus near misses, so random token strings
    /// reach deep into the parser rather than failing on the first word.
    fn token_soup() -> impl Strategy<Value = String> {
        let word = prop_oneof![
            prop::sample::select(vec![
                "hold",
                "pass",
                "from",
                "vm",
                "forwarded",
                "any",
                "arp",
                "ipv4",
                "ipv6",
                "ethertype",
                "0x0800",
                "0x8100",
                "0x05ff",
                "tcp",
                "udp",
                "proto",
                "256",
                "6",
                "sport",
                "dport",
                "1-2",
                "2-1",
                "65536",
                "flags",
                "+syn",
                "-ack",
                "+",
                "-",
                "payload",
                "0:\"a b\"",
                "0:0x",
                "0:0xab",
                "1501:0x00",
                "0:\"\\q\"",
                "\"",
                "\\",
                ":",
                "-0",
                "0x",
            ])
            .prop_map(str::to_string),
            "\\PC{0,6}",
        ];
        prop::collection::vec(word, 0..10).prop_map(|w| w.join(" "))
    }

    proptest! {
        #[test]
        fn display_round_trips(r in arb_rule()) {
            let text = r.to_string();
            let back: Rule = text.parse().map_err(|e| TestCaseError::fail(format!("`{text}`: {e}")))?;
            prop_assert_eq!(&back, &r);
            prop_assert_eq!(back.to_string(), text);
        }

        #[test]
        fn parser_never_panics(text in "\\PC*") {
            let _ = text.parse::<Rule>();
        }

        #[test]
        fn parser_never_panics_on_near_rules(text in token_soup()) {
            // Whatever parses must also print and parse back to itself.
            if let Ok(r) = text.parse::<Rule>() {
                prop_assert_eq!(r.to_string().parse::<Rule>(), Ok(r));
            }
        }
    }

    proptest! {
        // Cheap cases; more of them reach the rarer port/flag/payload matches.
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn matcher_agrees_with_reference(
            rules in prop::collection::vec(matching_rule(), 0..5),
            (meta, frame) in arb_meta_and_frame(),
            forwarded in any::<bool>(),
        ) {
            let origin = if forwarded { Origin::Forwarded } else { Origin::Vm };
            let set = RuleSet::new(rules.clone());
            prop_assert_eq!(
                set.classify_frame(&frame, &meta, origin),
                reference_classify(&rules, &frame, &meta, origin)
            );
            for r in &rules {
                prop_assert_eq!(
                    r.matches(&frame, &meta, origin),
                    reference_matches(r, &frame, &meta, origin),
                    "rule `{}`", r
                );
            }
        }
    }
}
