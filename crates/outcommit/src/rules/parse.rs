//! Rule text to [`Rule`]: the tokenizer, the clause parser and the checks
//! that keep every accepted rule meaningful.

use std::str::FromStr;

use super::error::{Position, RuleError};
use super::rule::{EthertypeName, FlagMatch, PayloadMatch, PortRange, ProtoName, TCP_FLAGS};
use super::{Class, Rule};
use crate::packet::{
    Origin, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_VLAN, IPPROTO_TCP, IPPROTO_UDP,
};

/// Longest byte prefix a `payload` clause may compare: rules run on every
/// frame, so the cost of one must stay small and predictable.
pub const MAX_PAYLOAD_LEN: usize = 64;
/// Largest `payload` offset: beyond one standard MTU no frame can match, so
/// a larger value is certainly a mistake.
pub const MAX_PAYLOAD_OFFSET: usize = 1500;
/// Values below this are IEEE 802.3 length fields, not ethertypes.
pub(super) const MIN_ETHERTYPE: u16 = 0x0600;

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

impl FromStr for Rule {
    type Err = RuleError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Parser::new(tokenize(text)?).parse()
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
