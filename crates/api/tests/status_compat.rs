//! The v1 HTTP API is a contract with scripts and with older CLIs: a
//! status document recorded from the first release must decode, and
//! encode again byte for byte.

use tandem_api::{FtRole, FtState, FtStatus};

const RECORDED: &str = include_str!("fixtures/ft-status-v1.json");

#[test]
fn a_recorded_v1_ft_status_round_trips_byte_for_byte() {
    let st: FtStatus = serde_json::from_str(RECORDED).expect("decodes");
    assert_eq!(st.state, FtState::Protected);
    assert_eq!(st.role, Some(FtRole::Primary));
    assert_eq!(st.output.as_ref().map(|o| o.hold_p99_us), Some(512));
    let again = serde_json::to_string_pretty(&st).unwrap();
    assert_eq!(again, RECORDED.trim_end());
}

#[test]
fn every_ft_state_keeps_its_v1_word() {
    let words: Vec<String> = FtState::ALL
        .iter()
        .map(|s| {
            serde_json::to_value(s)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        words,
        [
            "connecting",
            "syncing",
            "protected",
            "degraded",
            "fenced",
            "standby",
            "taking-over",
            "failed-over",
            "stopped"
        ]
    );
    for s in FtState::ALL {
        assert_eq!(s.to_string(), s.as_str());
        let back: FtState = serde_json::from_value(serde_json::json!(s.as_str())).unwrap();
        assert_eq!(back, s);
    }
}
