//! Property tests: parsing of roles, names, serials and PEM never panics,
//! whatever the input, and damaged certificates are refused.

mod common;

use std::sync::OnceLock;

use proptest::prelude::*;
use tandem_pki::{normalize_serial, server_name, validate_name, Identity, Role, MAX_NAME_LEN};

/// One real identity, made once: its PEM pieces.
fn sample() -> &'static (String, String, String, Vec<u8>) {
    static S: OnceLock<(String, String, String, Vec<u8>)> = OnceLock::new();
    S.get_or_init(|| {
        let c = common::Cluster::new("prop");
        let id = c.identity("host-a", Role::Host);
        let der = id.cert_chain()[0].to_vec();
        // Keep the CA directory alive for the process: leak the tempdir.
        std::mem::forget(c.dir);
        (id.cert_pem(), id.key_pem(), id.ca_pem(), der)
    })
}

fn pem_of(tag: &str, bytes: &[u8]) -> String {
    pem::encode(&pem::Pem::new(tag, bytes.to_vec()))
}

proptest! {
    #[test]
    fn role_parsing_never_panics(s in any::<String>()) {
        let parsed = s.parse::<Role>();
        prop_assert_eq!(parsed.is_ok(), ["host", "manager", "operator"].contains(&s.as_str()));
        if let Ok(r) = parsed {
            prop_assert_eq!(r.to_string(), s);
        }
    }

    #[test]
    fn name_validation_never_panics(s in any::<String>()) {
        if validate_name(&s).is_ok() {
            prop_assert!(!s.is_empty() && s.len() <= MAX_NAME_LEN);
            prop_assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
            prop_assert!(server_name(&s).is_ok());
        } else {
            prop_assert!(server_name(&s).is_err());
        }
    }

    #[test]
    fn host_like_names_are_accepted(s in "[a-z][a-z0-9-]{0,61}[a-z0-9]") {
        prop_assert!(validate_name(&s).is_ok(), "{}", s);
    }

    #[test]
    fn serial_normalisation_never_panics_and_is_idempotent(s in any::<String>()) {
        if let Some(n) = normalize_serial(&s) {
            prop_assert_eq!(normalize_serial(&n), Some(n.clone()));
            prop_assert!(n.len() % 2 == 0);
        }
    }

    #[test]
    fn revocation_list_files_never_panic(text in any::<String>(), lines in proptest::collection::vec("(generation|serial|#)? ?[0-9a-fA-F:x ]{0,12}", 0..6)) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("revoked");
        for t in [text, lines.join("\n")] {
            std::fs::write(&p, &t).unwrap();
            if let Ok(l) = tandem_pki::RevocationList::open(&p) {
                // What loads renders back to an equivalent list.
                std::fs::write(&p, l.to_text()).unwrap();
                let again = tandem_pki::RevocationList::open(&p).unwrap();
                prop_assert_eq!(again.serials(), l.serials());
                prop_assert_eq!(again.generation(), l.generation());
            }
        }
    }

    #[test]
    fn pem_loaders_refuse_arbitrary_text(a in any::<String>(), which in 0usize..3) {
        let (cert, key, ca, _) = sample();
        let r = match which {
            0 => Identity::from_pem(&a, key, ca),
            1 => Identity::from_pem(cert, &a, ca),
            _ => Identity::from_pem(cert, key, &a),
        };
        prop_assert!(r.is_err());
    }

    #[test]
    fn pem_loaders_refuse_arbitrary_der(bytes in proptest::collection::vec(any::<u8>(), 0..600), which in 0usize..3) {
        let (cert, key, ca, _) = sample();
        let r = match which {
            0 => Identity::from_pem(&pem_of("CERTIFICATE", &bytes), key, ca),
            1 => Identity::from_pem(cert, &pem_of("PRIVATE KEY", &bytes), ca),
            _ => Identity::from_pem(cert, key, &pem_of("CERTIFICATE", &bytes)),
        };
        prop_assert!(r.is_err());
    }

    #[test]
    fn damaged_certificates_are_refused(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let (_, key, ca, der) = sample();
        let mut bad = der.clone();
        for (at, x) in &flips {
            let i = at.index(bad.len());
            bad[i] ^= x;
        }
        if let Some(c) = cut {
            bad.truncate(c.index(bad.len()));
        }
        // Two flips of one byte by the same value undo each other.
        prop_assume!(bad != *der);
        prop_assert!(Identity::from_pem(&pem_of("CERTIFICATE", &bad), key, ca).is_err());
    }
}

/// Every single byte of a real certificate, changed several ways: none of the
/// damaged certificates loads. Found by the property test above in CI: the
/// outer SEQUENCE tag and the tags of the signature algorithm lie outside the
/// signed bytes, and a lenient parser read past them.
#[test]
fn every_single_byte_change_is_refused() {
    let (_, key, ca, der) = sample();
    let mut accepted = Vec::new();
    for i in 0..der.len() {
        for x in [0x01u8, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x60, 0x80, 0xff] {
            let mut bad = der.clone();
            bad[i] ^= x;
            if Identity::from_pem(&pem_of("CERTIFICATE", &bad), key, ca).is_ok() {
                accepted.push((i, bad[i]));
            }
        }
    }
    assert!(
        accepted.is_empty(),
        "damaged certificates accepted (offset, byte): {accepted:?}"
    );
}
