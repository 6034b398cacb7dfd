//! Unit and property tests of the protocol layer.

use super::*;
use proptest::prelude::*;

const EXPORT: ExportInfo<'static> = ExportInfo {
    name: "disk",
    size: 1 << 20,
    flags: TRANSMISSION_FLAGS,
};

fn client() -> ClientFlags {
    ClientFlags {
        fixed_newstyle: true,
        no_zeroes: true,
    }
}

/// Splits a buffer of option replies into (reply type, data) pairs.
fn replies(mut b: &[u8], option: u32) -> Vec<(u32, Vec<u8>)> {
    let mut v = Vec::new();
    while !b.is_empty() {
        let h = OptionReplyHeader::parse(b[..20].try_into().unwrap()).unwrap();
        assert_eq!(h.option, option);
        let len = h.len as usize;
        v.push((h.reply, b[20..20 + len].to_vec()));
        b = &b[20 + len..];
    }
    v
}

#[test]
fn greeting_layout() {
    let g = server_greeting();
    assert_eq!(&g[0..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(u16::from_be_bytes([g[16], g[17]]), 0b11);
}

#[test]
fn client_flags() {
    assert_eq!(ClientFlags::parse([0, 0, 0, 3]).unwrap(), client());
    assert_eq!(
        ClientFlags::parse([0, 0, 0, 1]).unwrap(),
        ClientFlags {
            fixed_newstyle: true,
            no_zeroes: false
        }
    );
    assert_eq!(
        ClientFlags::parse([0, 0, 0, 4]),
        Err(ProtoError::ClientFlags(4))
    );
    assert_eq!(ClientFlags::parse(client().encode()).unwrap(), client());
}

#[test]
fn option_header_limits() {
    let h = OptionHeader {
        option: OPT_GO,
        len: 10,
    };
    assert_eq!(OptionHeader::parse(&h.encode()).unwrap(), h);
    let big = OptionHeader {
        option: OPT_GO,
        len: MAX_OPTION_LEN + 1,
    };
    assert!(matches!(
        OptionHeader::parse(&big.encode()),
        Err(ProtoError::OptionTooLong { .. })
    ));
    let mut bad = h.encode();
    bad[0] ^= 1;
    assert!(matches!(
        OptionHeader::parse(&bad),
        Err(ProtoError::BadMagic { .. })
    ));
}

#[test]
fn go_known_export_enters_transmission() {
    let req = InfoRequest {
        name: b"disk".to_vec(),
        requests: vec![INFO_BLOCK_SIZE, INFO_NAME],
    };
    let mut out = Vec::new();
    let o = handle_option(OPT_GO, &req.encode(), &EXPORT, client(), &mut out);
    assert_eq!(o, OptionOutcome::Transmission);
    let r = replies(&out, OPT_GO);
    assert_eq!(r.len(), 4);
    assert_eq!(
        r[0],
        (REP_INFO, info_export(1 << 20, TRANSMISSION_FLAGS).to_vec())
    );
    assert_eq!(
        r[1],
        (REP_INFO, info_block_size(1, 4096, 32 << 20).to_vec())
    );
    assert_eq!(r[2].1, [&[0u8, 1][..], b"disk"].concat());
    assert_eq!(r[3], (REP_ACK, vec![]));
}

#[test]
fn info_does_not_end_haggling_and_default_name_matches() {
    let req = InfoRequest {
        name: vec![],
        requests: vec![],
    };
    let mut out = Vec::new();
    let o = handle_option(OPT_INFO, &req.encode(), &EXPORT, client(), &mut out);
    assert_eq!(o, OptionOutcome::Continue);
    assert_eq!(replies(&out, OPT_INFO).last().unwrap().0, REP_ACK);
}

#[test]
fn go_unknown_export_or_garbage() {
    let req = InfoRequest {
        name: b"other".to_vec(),
        requests: vec![],
    };
    let mut out = Vec::new();
    let o = handle_option(OPT_GO, &req.encode(), &EXPORT, client(), &mut out);
    assert_eq!(o, OptionOutcome::Continue);
    assert_eq!(replies(&out, OPT_GO)[0].0, REP_ERR_UNKNOWN);

    out.clear();
    let o = handle_option(OPT_GO, &[0, 0, 0, 9, 1], &EXPORT, client(), &mut out);
    assert_eq!(o, OptionOutcome::Continue);
    assert_eq!(replies(&out, OPT_GO)[0].0, REP_ERR_INVALID);
}

#[test]
fn export_name_with_and_without_zeroes() {
    let mut out = Vec::new();
    let o = handle_option(OPT_EXPORT_NAME, b"disk", &EXPORT, client(), &mut out);
    assert_eq!(o, OptionOutcome::Transmission);
    assert_eq!(out.len(), 10);
    assert_eq!(&out[0..8], &(1u64 << 20).to_be_bytes());

    out.clear();
    let old = ClientFlags {
        fixed_newstyle: true,
        no_zeroes: false,
    };
    handle_option(OPT_EXPORT_NAME, b"", &EXPORT, old, &mut out);
    assert_eq!(out.len(), 134);

    out.clear();
    let o = handle_option(OPT_EXPORT_NAME, b"nope", &EXPORT, client(), &mut out);
    assert!(matches!(o, OptionOutcome::Reject(_)));
    assert!(out.is_empty());
}

#[test]
fn list_abort_and_unsupported() {
    let mut out = Vec::new();
    handle_option(OPT_LIST, &[], &EXPORT, client(), &mut out);
    let r = replies(&out, OPT_LIST);
    assert_eq!(r[0], (REP_SERVER, [&[0u8, 0, 0, 4][..], b"disk"].concat()));
    assert_eq!(r[1].0, REP_ACK);

    out.clear();
    handle_option(OPT_LIST, &[1], &EXPORT, client(), &mut out);
    assert_eq!(replies(&out, OPT_LIST)[0].0, REP_ERR_INVALID);

    out.clear();
    let o = handle_option(OPT_ABORT, &[], &EXPORT, client(), &mut out);
    assert_eq!(o, OptionOutcome::Abort);
    assert_eq!(replies(&out, OPT_ABORT), vec![(REP_ACK, vec![])]);

    for opt in [
        OPT_STRUCTURED_REPLY,
        OPT_LIST_META_CONTEXT,
        OPT_SET_META_CONTEXT,
        OPT_EXTENDED_HEADERS,
        OPT_STARTTLS,
        OPT_PEEK_EXPORT,
        0xdead_beef,
    ] {
        out.clear();
        let o = handle_option(opt, &[1, 2, 3], &EXPORT, client(), &mut out);
        assert_eq!(o, OptionOutcome::Continue);
        assert_eq!(replies(&out, opt)[0].0, REP_ERR_UNSUP, "option {opt}");
    }
}

fn req(command: Command, offset: u64, length: u32, flags: u16) -> Request {
    Request {
        flags,
        command,
        cookie: 7,
        offset,
        length,
    }
}

#[test]
fn request_checks() {
    let size = 1 << 20;
    let f = TRANSMISSION_FLAGS;
    let ok = |r| check_request(&r, size, f);
    assert_eq!(ok(req(Command::Read, 0, 4096, 0)), Verdict::Serve);
    assert_eq!(
        ok(req(Command::Write, size - 1, 1, CMD_FLAG_FUA)),
        Verdict::Serve
    );
    assert_eq!(
        ok(req(Command::Write, size - 1, 2, 0)),
        Verdict::Fail(ENOSPC)
    );
    assert_eq!(ok(req(Command::Read, size, 1, 0)), Verdict::Fail(EINVAL));
    assert_eq!(
        ok(req(Command::Trim, u64::MAX, 1, 0)),
        Verdict::Fail(EINVAL)
    );
    assert_eq!(
        ok(req(Command::WriteZeroes, 0, u32::MAX, 0)),
        Verdict::Fail(ENOSPC)
    );
    assert_eq!(
        ok(req(Command::WriteZeroes, 0, 4096, CMD_FLAG_NO_HOLE)),
        Verdict::Serve
    );
    assert_eq!(
        ok(req(Command::Write, 0, 4096, CMD_FLAG_NO_HOLE)),
        Verdict::Fail(EINVAL)
    );
    assert_eq!(
        ok(req(Command::WriteZeroes, 0, 4096, CMD_FLAG_FAST_ZERO)),
        Verdict::Fail(EINVAL)
    );
    assert_eq!(
        check_request(&req(Command::Write, 0, MAX_PAYLOAD + 1, 0), u64::MAX, f),
        Verdict::Fail(EINVAL)
    );
    assert_eq!(
        check_request(&req(Command::Write, 0, MAX_PAYLOAD, 0), u64::MAX, f),
        Verdict::Serve
    );
    assert_eq!(ok(req(Command::Flush, 5, 5, 0)), Verdict::Serve);
    assert_eq!(ok(req(Command::Disc, 0, 0, 0xffff)), Verdict::Disconnect);
    assert_eq!(
        ok(req(Command::BlockStatus, 0, 1, 0)),
        Verdict::Fail(EINVAL)
    );
    assert_eq!(
        ok(req(Command::Unknown(99), 0, 1, 0)),
        Verdict::Fail(EINVAL)
    );
    assert_eq!(ok(req(Command::Read, 0, 0, 0)), Verdict::Serve);
    assert_eq!(
        check_request(&req(Command::Flush, 0, 0, 0), size, FLAG_HAS_FLAGS),
        Verdict::Fail(EINVAL)
    );
}

#[test]
fn request_bad_magic() {
    let mut b = req(Command::Read, 0, 1, 0).encode();
    b[3] = 0;
    assert!(matches!(
        Request::parse(&b),
        Err(ProtoError::BadMagic { .. })
    ));
}

#[test]
fn simple_reply_round_trip() {
    let r = SimpleReply {
        error: EINVAL,
        cookie: 0x0102_0304_0506_0708,
    };
    let b = r.encode();
    assert_eq!(&b[0..4], &[0x67, 0x44, 0x66, 0x98]);
    assert_eq!(SimpleReply::parse(&b).unwrap(), r);
}

fn any_command() -> impl Strategy<Value = Command> {
    any::<u16>().prop_map(Command::from_u16)
}

proptest! {
    #[test]
    fn request_round_trips(
        flags in any::<u16>(),
        command in any_command(),
        cookie in any::<u64>(),
        offset in any::<u64>(),
        length in any::<u32>(),
    ) {
        let r = Request { flags, command, cookie, offset, length };
        prop_assert_eq!(Request::parse(&r.encode()).unwrap(), r);
        prop_assert_eq!(Command::from_u16(command.as_u16()), command);
    }

    #[test]
    fn random_request_bytes_never_panic(b in any::<[u8; REQUEST_LEN]>(), size in any::<u64>()) {
        if let Ok(r) = Request::parse(&b) {
            let _ = check_request(&r, size, TRANSMISSION_FLAGS);
            prop_assert_eq!(r.encode(), b);
        }
    }

    #[test]
    fn random_options_never_panic(
        option in prop_oneof![0u32..16, any::<u32>()],
        data in proptest::collection::vec(any::<u8>(), 0..64),
        no_zeroes in any::<bool>(),
    ) {
        let c = ClientFlags { fixed_newstyle: true, no_zeroes };
        let mut out = Vec::new();
        let o = handle_option(option, &data, &EXPORT, c, &mut out);
        // Everything but EXPORT_NAME answers in framed replies.
        if option != OPT_EXPORT_NAME {
            let r = replies(&out, option);
            prop_assert!(!r.is_empty());
            if o == OptionOutcome::Transmission {
                prop_assert_eq!(r.last().unwrap().0, REP_ACK);
            }
        }
    }

    #[test]
    fn info_request_round_trips(
        name in proptest::collection::vec(any::<u8>(), 0..64),
        requests in proptest::collection::vec(any::<u16>(), 0..8),
    ) {
        let r = InfoRequest { name, requests };
        prop_assert_eq!(InfoRequest::parse(&r.encode()), Some(r));
    }

    #[test]
    fn random_info_request_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = InfoRequest::parse(&data);
    }

    #[test]
    fn random_headers_never_panic(
        a in any::<[u8; OPTION_HEADER_LEN]>(),
        b in any::<[u8; OPTION_REPLY_HEADER_LEN]>(),
        c in any::<[u8; SIMPLE_REPLY_LEN]>(),
        d in any::<[u8; 4]>(),
    ) {
        let _ = OptionHeader::parse(&a);
        let _ = OptionReplyHeader::parse(&b);
        let _ = SimpleReply::parse(&c);
        let _ = ClientFlags::parse(d);
    }
}
