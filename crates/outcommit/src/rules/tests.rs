//! The rule table's tests: parsing, errors, display, matching, profiles
//! and editing, with property tests against a reference matcher.

use super::*;
use crate::packet::{
    IpAddrs, IpMeta, L4Meta, TcpMeta, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6,
    ETHERTYPE_VLAN, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_SYN,
};
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
    let r =
        rule(r#"pass from vm ipv4 tcp sport 1000-2000 dport 80 flags +syn -ack payload 0:"GET ""#);
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
    let set = RuleSet::from_texts(&["hold arp", "pass arp", "pass from forwarded udp"]).unwrap();
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

fn reference_classify(rules: &[Rule], frame: &[u8], meta: &PacketMeta, origin: Origin) -> Class {
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
