//! Fan-out deployment on a host (`/v1/deploy/…` on tandemd's API): the
//! images a host offers, the copies it pulls from another host's image
//! service, local copies, and link probes. The manager drives these; the
//! plan itself is `tandem-deploy-plan`'s.
//!
//! Every file named here is a plain name inside the host's image
//! directory ([`valid_image_name`]): no path, nothing hidden, so a request
//! can never reach outside it.

use serde::{Deserialize, Serialize};

/// The longest image name a host accepts.
pub const MAX_IMAGE_NAME: usize = 200;

/// Where a copy is written until it is complete and verified.
pub const PARTIAL_SUFFIX: &str = ".partial";

/// Why `name` cannot name a file of the image directory, if it cannot.
pub fn valid_image_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("an image name is empty".into());
    }
    if name.len() > MAX_IMAGE_NAME {
        return Err(format!(
            "an image name is longer than {MAX_IMAGE_NAME} bytes"
        ));
    }
    if name.starts_with('.') {
        return Err(format!("{name:?}: an image name may not start with '.'"));
    }
    if name.ends_with(PARTIAL_SUFFIX) {
        return Err(format!(
            "{name:?}: {PARTIAL_SUFFIX} files are copies in progress"
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'))
    {
        return Err(format!(
            "{name:?}: an image name has only letters, digits and - _ . +"
        ));
    }
    Ok(())
}

/// `GET /v1/deploy/images/{name}`: an image the host holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub name: String,
    /// Its path on the host.
    pub path: String,
    pub bytes: u64,
    /// Hex SHA-256 of the content (cached beside it while size and
    /// modification time stay the same).
    pub sha256: String,
    /// Room left on the image directory's filesystem.
    pub free_bytes: u64,
}

/// `POST /v1/deploy/copies`: pull `image` from another host's image
/// service into `dest` here (through `dest.partial`, fsynced, its SHA-256
/// checked, then renamed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyRequest {
    /// The caller's name for it; unique among this host's copies.
    pub id: String,
    /// The sending host's certificate name (its server identity is
    /// checked against it).
    pub from_host: String,
    /// The sending host's image service, `IP:PORT`.
    pub from_address: String,
    /// The file there.
    pub image: String,
    pub bytes: u64,
    pub sha256: String,
    /// The file here.
    pub dest: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyState {
    Running,
    /// Verified and renamed into place.
    Done,
    /// Broke off; its partial file is removed.
    Failed,
    /// Stopped on request; its partial file is removed.
    Cancelled,
}

/// `GET /v1/deploy/copies/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CopyStatus {
    pub id: String,
    pub from_host: String,
    pub dest: String,
    pub state: CopyState,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Since the copy started (to the end, once it ended).
    pub elapsed_ms: u64,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `POST /v1/deploy/local-copies`: another copy of an image this host
/// holds, in the same directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalCopyRequest {
    pub source: String,
    pub dest: String,
}

/// How a local copy was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LocalCopyMethod {
    /// The filesystem shares the blocks (`FICLONE`): instant, no room used.
    Reflink,
    /// A full byte copy (the filesystem cannot share blocks).
    Copy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalCopyDone {
    pub dest: String,
    pub method: LocalCopyMethod,
    pub bytes: u64,
    pub elapsed_ms: u64,
}

/// `POST /v1/deploy/probe`: time `bytes` of filler from another host's
/// image service to this one, to fill the deployment matrix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeRequest {
    pub from_host: String,
    pub from_address: String,
    pub bytes: u64,
}

/// The largest probe a host sends.
pub const MAX_PROBE_BYTES: u64 = 256 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    pub bytes: u64,
    pub elapsed_ms: f64,
    pub bytes_per_s: f64,
}

/// What a client asks the image service, as one JSON line after the TLS
/// handshake. The answer is one JSON line ([`ServiceAnswer`]) and, when it
/// is not an error, exactly that many bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "ask")]
pub enum ServiceAsk {
    /// The whole content of an image.
    Image { name: String },
    /// `bytes` of filler.
    Probe { bytes: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAnswer {
    #[serde(default)]
    pub bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The longest line either side of the image service sends before the
/// bytes.
pub const MAX_SERVICE_LINE: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_stay_inside_the_directory() {
        for ok in ["tmpl.img", "web-01.qcow2", "a_b+c.raw"] {
            assert!(valid_image_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "../etc/passwd",
            "a/b",
            ".hidden",
            "x.img.partial",
            "sp ace",
            "nul\0",
            "é.img",
        ] {
            assert!(valid_image_name(bad).is_err(), "{bad:?}");
        }
        assert!(valid_image_name(&"a".repeat(MAX_IMAGE_NAME + 1)).is_err());
    }
}
