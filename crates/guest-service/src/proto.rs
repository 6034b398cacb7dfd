//! The guest service's line protocol and its on-disk record log, kept free
//! of I/O so both can be tested on the host.
//!
//! Requests are single lines; every reply is a single line:
//!
//! | request        | reply                                   |
//! |----------------|-----------------------------------------|
//! | `PING`         | `PONG`                                  |
//! | `PUT <text>`   | `OK <seq>` once the record is fsync'd   |
//! | `GET <seq>`    | `REC <seq> <text>` or `NONE <seq>`      |
//! | `LAST`         | `LAST <seq>` (0 when empty)             |
//! | `CHURN <n>`    | `CHURNING <n>`: rewrite n pages forever |
//! | `VERIFY`       | `VERIFIED <n> <writes>` or `CORRUPT …`  |
//! | `SPIN <n>`     | `SPUN <n> <checksum>` (CPU-bound work)  |
//! | `DIRTY <n>`    | `DIRTIED <n>` (writes n pages)          |
//! | `SOFTDIRTY <n>` | `SOFTDIRTY ok …`, `… unsupported <why>` or `… fail <why>`: n epochs of the soft-dirty tracker check |
//! | `TRACKBENCH <mib> <pages> <epochs>` | `TRACKBENCH ok …` (collect p50/p99 µs, scan and soft-dirty), `… unsupported <why>` or `… fail <why>` |
//! | `DIAL <ip:port> <line>` | `DIALED <reply>` or `DIALFAIL <why>`: one request to another service (2 s bound) |
//! | `BLAST <ip:port> <ms>`  | `BLASTED <bytes> <ms>`: bulk TCP send for that long |
//! | `MJOIN <group> <port>` | `MJOINED <group> <port>`: join an IPv4 multicast group and count the UDP datagrams sent to it |
//! | `MSTAT` | `MSTAT <datagrams> <last> <missing> <disordered>`: datagrams received on the joined group, the highest leading number (0 if none), numbers skipped between datagrams, and datagrams that came at or below the highest number seen |
//! | `UCOUNT <port>` | `UCOUNTING <port>`: count the numbered UDP datagrams sent to this port (unicast) |
//! | `USTAT` | `USTAT <datagrams> <last> <missing> <disordered>`: as `MSTAT`, for the `UCOUNT` port |
//! | anything else  | `ERR <reason>`                          |
//!
//! The record log is `<seq> <text>\n` per record. A crash can leave a torn
//! last line; recovery keeps the longest prefix of whole, well-numbered
//! records and reports where to truncate.

/// Longest request line accepted; longer lines are refused, not buffered.
pub const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Ping,
    Put(String),
    Get(u64),
    Last,
    /// Start the memory churn over this many pages (see `churn`).
    Churn(usize),
    /// Stop the churn and check its memory.
    Verify,
    /// CPU-bound work: this many iterations of arithmetic.
    Spin(u64),
    /// Memory-dirtying work: write this many 4 KiB pages of a 32 MiB buffer.
    Dirty(u64),
    /// Check the soft-dirty tracker against this kernel for n epochs.
    SoftDirty(u32),
    /// Time both trackers' collects: MiB of memory, pages written per
    /// epoch, epochs.
    TrackBench {
        mib: usize,
        pages: usize,
        epochs: u32,
    },
    /// Send one line to another service and return its reply line.
    Dial(std::net::SocketAddr, String),
    /// Send bulk data over TCP for this many milliseconds (≤ 60 s).
    Blast(std::net::SocketAddr, u64),
    /// How much of the most recent upload stream arrived intact.
    UpStat,
    /// Send this many numbered UDP datagrams, one every so many ms: a
    /// media-like stream that output commit may let through at once.
    Media(std::net::SocketAddr, u32, u64),
    /// Join this multicast group and count datagrams to it on this port.
    MulticastJoin(std::net::Ipv4Addr, u16),
    /// What the joined group delivered so far.
    MulticastStat,
    /// Count numbered unicast datagrams to this UDP port.
    UnicastCount(u16),
    /// What the unicast counter received so far.
    UnicastStat,
}

/// The upload stream's content: byte `i` of a connection is `i mod 251`,
/// so a lost or repeated stretch shows up as a mismatch.
pub fn upload_byte(offset: u64) -> u8 {
    (offset % 251) as u8
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    Empty,
    Unknown(String),
    BadArgument(&'static str),
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::Empty => write!(f, "empty request"),
            ParseError::Unknown(v) => write!(f, "unknown verb {v:?}"),
            ParseError::BadArgument(why) => write!(f, "{why}"),
        }
    }
}

pub fn parse_request(line: &str) -> Result<Request, ParseError> {
    let line = line.trim_end_matches(['\r', '\n']);
    let (verb, rest) = match line.split_once(' ') {
        Some((v, r)) => (v, Some(r)),
        None => (line, None),
    };
    match verb {
        "" => Err(ParseError::Empty),
        "PING" => Ok(Request::Ping),
        "VERIFY" => Ok(Request::Verify),
        "SPIN" => rest
            .and_then(|r| r.trim().parse::<u64>().ok())
            .map(Request::Spin)
            .ok_or(ParseError::BadArgument("SPIN needs an iteration count")),
        "DIRTY" => rest
            .and_then(|r| r.trim().parse::<u64>().ok())
            .map(Request::Dirty)
            .ok_or(ParseError::BadArgument("DIRTY needs a page count")),
        "SOFTDIRTY" => rest
            .and_then(|r| r.trim().parse::<u32>().ok())
            .filter(|&n| (1..=1000).contains(&n))
            .map(Request::SoftDirty)
            .ok_or(ParseError::BadArgument(
                "SOFTDIRTY needs an epoch count (1-1000)",
            )),
        "TRACKBENCH" => {
            let n: Vec<u64> = rest
                .unwrap_or("")
                .split_whitespace()
                .map(|x| x.parse::<u64>().ok())
                .collect::<Option<_>>()
                .unwrap_or_default();
            match n[..] {
                [mib @ 1..=256, pages @ 0..=65536, epochs @ 1..=1000] => Ok(Request::TrackBench {
                    mib: mib as usize,
                    pages: pages as usize,
                    epochs: epochs as u32,
                }),
                _ => Err(ParseError::BadArgument(
                    "TRACKBENCH needs MiB (1-256), pages per epoch (0-65536) and epochs (1-1000)",
                )),
            }
        }
        "CHURN" => rest
            .and_then(|r| r.trim().parse::<usize>().ok())
            .filter(|&n| (1..=65536).contains(&n))
            .map(Request::Churn)
            .ok_or(ParseError::BadArgument(
                "CHURN needs a page count (1-65536)",
            )),
        "LAST" => Ok(Request::Last),
        "UPSTAT" => Ok(Request::UpStat),
        "MSTAT" => Ok(Request::MulticastStat),
        "USTAT" => Ok(Request::UnicastStat),
        "UCOUNT" => {
            let bad = ParseError::BadArgument("UCOUNT needs a UDP port");
            match rest.map(str::trim).and_then(|p| p.parse::<u16>().ok()) {
                Some(port) if port != 0 => Ok(Request::UnicastCount(port)),
                _ => Err(bad),
            }
        }
        "MJOIN" => {
            let bad = ParseError::BadArgument("MJOIN needs a multicast group and a UDP port");
            let mut it = rest.unwrap_or("").split_whitespace();
            let group = it
                .next()
                .and_then(|g| g.parse::<std::net::Ipv4Addr>().ok())
                .filter(|g| g.is_multicast())
                .ok_or(bad.clone())?;
            let port = it
                .next()
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|&p| p != 0)
                .ok_or(bad.clone())?;
            if it.next().is_some() {
                return Err(bad);
            }
            Ok(Request::MulticastJoin(group, port))
        }
        "MEDIA" => {
            let mut it = rest.unwrap_or("").split_whitespace();
            let bad = ParseError::BadArgument(
                "MEDIA needs IP:port, a count (1-100000) and an interval in ms (1-1000)",
            );
            let addr = it.next().and_then(|a| a.parse().ok()).ok_or(bad.clone())?;
            let count = it
                .next()
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|n| (1..=100_000).contains(n))
                .ok_or(bad.clone())?;
            let every = it
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .filter(|n| (1..=1000).contains(n))
                .ok_or(bad.clone())?;
            if it.next().is_some() {
                return Err(bad);
            }
            Ok(Request::Media(addr, count, every))
        }
        "DIAL" => {
            let (addr, line) = rest
                .and_then(|r| r.split_once(' '))
                .ok_or(ParseError::BadArgument("DIAL needs an address and a line"))?;
            let addr = addr
                .parse()
                .map_err(|_| ParseError::BadArgument("DIAL needs an IP:port address"))?;
            if line.is_empty() {
                return Err(ParseError::BadArgument("DIAL needs a line to send"));
            }
            Ok(Request::Dial(addr, line.to_string()))
        }
        "BLAST" => {
            let (addr, ms) =
                rest.and_then(|r| r.split_once(' '))
                    .ok_or(ParseError::BadArgument(
                        "BLAST needs an address and milliseconds",
                    ))?;
            let addr = addr
                .parse()
                .map_err(|_| ParseError::BadArgument("BLAST needs an IP:port address"))?;
            let ms = ms
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|&m| (1..=60_000).contains(&m))
                .ok_or(ParseError::BadArgument("BLAST runs 1..=60000 ms"))?;
            Ok(Request::Blast(addr, ms))
        }
        "PUT" => {
            let text = rest.unwrap_or("");
            if text.is_empty() {
                return Err(ParseError::BadArgument("PUT needs text"));
            }
            if text.contains(['\n', '\r']) {
                return Err(ParseError::BadArgument("PUT text must be one line"));
            }
            Ok(Request::Put(text.to_string()))
        }
        "GET" => rest
            .and_then(|r| r.trim().parse::<u64>().ok())
            .map(Request::Get)
            .ok_or(ParseError::BadArgument("GET needs a record number")),
        other => Err(ParseError::Unknown(other.chars().take(32).collect())),
    }
}

/// Encodes one record as it is stored in the log.
pub fn encode_record(seq: u64, text: &str) -> String {
    format!("{seq} {text}\n")
}

/// What recovery found in a record log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// The records, in order; record `i` has sequence number `i + 1`.
    pub records: Vec<String>,
    /// Length of the valid prefix: the file should be truncated to this.
    pub valid_len: usize,
}

/// Reads a record log, stopping at the first line that is torn (no newline),
/// not UTF-8, or out of sequence. Everything before it is kept.
pub fn recover(log: &[u8]) -> Recovered {
    let mut records = Vec::new();
    let mut valid_len = 0;
    let mut rest = log;
    while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
        let Ok(line) = std::str::from_utf8(&rest[..nl]) else {
            break;
        };
        let Some((seq, text)) = line.split_once(' ') else {
            break;
        };
        if seq.parse::<u64>().ok() != Some(records.len() as u64 + 1) {
            break;
        }
        records.push(text.to_string());
        valid_len += nl + 1;
        rest = &rest[nl + 1..];
    }
    Recovered { records, valid_len }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_network_verbs() {
        let a: std::net::SocketAddr = "10.1.2.3:7070".parse().unwrap();
        assert_eq!(
            parse_request("DIAL 10.1.2.3:7070 PING"),
            Ok(Request::Dial(a, "PING".into()))
        );
        assert_eq!(
            parse_request("DIAL 10.1.2.3:7070 PUT two words"),
            Ok(Request::Dial(a, "PUT two words".into()))
        );
        assert_eq!(
            parse_request("BLAST 10.1.2.3:7070 500"),
            Ok(Request::Blast(a, 500))
        );
        assert!(parse_request("DIAL nowhere PING").is_err());
        assert!(parse_request("DIAL 10.1.2.3:7070").is_err());
        assert!(parse_request("BLAST 10.1.2.3:7070 0").is_err());
        assert!(parse_request("BLAST 10.1.2.3:7070 999999").is_err());
        assert_eq!(
            parse_request("MJOIN 239.1.2.3 5000"),
            Ok(Request::MulticastJoin([239, 1, 2, 3].into(), 5000))
        );
        assert_eq!(parse_request("MSTAT"), Ok(Request::MulticastStat));
        assert_eq!(
            parse_request("UCOUNT 5001"),
            Ok(Request::UnicastCount(5001))
        );
        assert_eq!(parse_request("USTAT"), Ok(Request::UnicastStat));
        assert!(parse_request("UCOUNT 0").is_err());
        assert!(parse_request("UCOUNT").is_err());
        assert!(parse_request("UCOUNT x").is_err());
        assert!(parse_request("MJOIN 10.1.2.3 5000").is_err(), "not a group");
        assert!(parse_request("MJOIN 239.1.2.3 0").is_err());
        assert!(parse_request("MJOIN 239.1.2.3").is_err());
        assert!(parse_request("MJOIN 239.1.2.3 5000 x").is_err());
    }

    #[test]
    fn parses_every_verb() {
        assert_eq!(parse_request("PING\r\n"), Ok(Request::Ping));
        assert_eq!(parse_request("LAST"), Ok(Request::Last));
        assert_eq!(
            parse_request("PUT a b c\n"),
            Ok(Request::Put("a b c".into()))
        );
        assert_eq!(parse_request("GET 17"), Ok(Request::Get(17)));
        assert_eq!(parse_request("CHURN 4096"), Ok(Request::Churn(4096)));
        assert_eq!(parse_request("VERIFY"), Ok(Request::Verify));
        assert!(parse_request("CHURN 0").is_err());
        assert_eq!(parse_request("SOFTDIRTY 30"), Ok(Request::SoftDirty(30)));
        assert!(parse_request("SOFTDIRTY 0").is_err());
        assert!(parse_request("SOFTDIRTY").is_err());
        assert_eq!(
            parse_request("TRACKBENCH 32 100 20"),
            Ok(Request::TrackBench {
                mib: 32,
                pages: 100,
                epochs: 20
            })
        );
        for bad in [
            "TRACKBENCH",
            "TRACKBENCH 32 100",
            "TRACKBENCH 0 100 20",
            "TRACKBENCH 300 1 1",
            "TRACKBENCH 32 100 20 1",
            "TRACKBENCH 32 -1 20",
            "TRACKBENCH 32 x 20",
        ] {
            assert!(parse_request(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rejects_bad_requests() {
        assert_eq!(parse_request(""), Err(ParseError::Empty));
        assert!(matches!(
            parse_request("PUT"),
            Err(ParseError::BadArgument(_))
        ));
        assert!(matches!(
            parse_request("GET x"),
            Err(ParseError::BadArgument(_))
        ));
        assert!(matches!(parse_request("DROP TABLE"), Err(ParseError::Unknown(v)) if v == "DROP"));
    }

    #[test]
    fn recovery_drops_torn_tail() {
        let mut log = encode_record(1, "a") + &encode_record(2, "b c");
        let whole = log.len();
        log.push_str("3 tor");
        let r = recover(log.as_bytes());
        assert_eq!(r.records, ["a", "b c"]);
        assert_eq!(r.valid_len, whole);
    }

    #[test]
    fn recovery_stops_at_a_gap() {
        let log = encode_record(1, "a") + &encode_record(3, "c");
        let r = recover(log.as_bytes());
        assert_eq!(r.records, ["a"]);
        assert_eq!(r.valid_len, 4);
    }

    proptest! {
        #[test]
        fn recovery_keeps_every_whole_record(
            texts in proptest::collection::vec("[ -~]{1,40}", 0..20),
            cut in 0usize..2000,
        ) {
            let log: String = texts.iter().enumerate()
                .map(|(i, t)| encode_record(i as u64 + 1, t)).collect();
            let cut = cut.min(log.len());
            let r = recover(&log.as_bytes()[..cut]);
            // Whatever was cut, what survives is a prefix of what was written.
            prop_assert!(r.records.len() <= texts.len());
            prop_assert_eq!(&r.records[..], &texts[..r.records.len()]);
            prop_assert!(r.valid_len <= cut);
            if cut == log.len() {
                prop_assert_eq!(r.records.len(), texts.len());
            }
        }

        #[test]
        fn parser_never_panics(line in "\\PC{0,200}") {
            let _ = parse_request(&line);
        }
    }
}
