//! The distributed switch's records: the current document and its
//! revision counter (`dvs`), every revision ever applied
//! (`dvs/revisions/<revision, 20 digits>`, so key order is revision
//! order), and each host's switch state (`dvs/hosts/<name>`).

use serde::{Deserialize, Serialize};
use tandem_dvs::HostSwitch;

use crate::store::typed::Record;

pub const DVS_KEY: &str = "dvs";
pub const DVS_REVISIONS_PREFIX: &str = "dvs/revisions/";
pub const DVS_HOSTS_PREFIX: &str = "dvs/hosts/";

pub fn dvs_revision_key(revision: u64) -> String {
    format!("{DVS_REVISIONS_PREFIX}{revision:020}")
}

pub fn dvs_host_key(host: &str) -> String {
    format!("{DVS_HOSTS_PREFIX}{host}")
}

/// `dvs`: what the distributed switch is now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DvsRecord {
    /// The revision every host should run (0: none yet). Moves only when a
    /// rollout completes.
    pub revision: u64,
    /// The highest revision ever given out, completed or not: revisions
    /// only grow.
    pub last_issued: u64,
    #[serde(default)]
    pub document_toml: Option<String>,
    #[serde(default)]
    pub updated_at: Option<u64>,
    #[serde(default)]
    pub updated_by: Option<String>,
}

impl Record for DvsRecord {
    const KIND: &'static str = "dvs";
    const SCHEMA: u32 = 1;
}

/// One host's result in a revision's rollout, as history keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DvsRevisionHost {
    pub host: String,
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert: Option<String>,
}

/// `dvs/revisions/<n>`: a document that was applied, by whom, when, and
/// how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DvsRevision {
    pub revision: u64,
    /// The operator certificate's name.
    pub author: String,
    /// Unix seconds.
    pub at: u64,
    /// `in-progress` while it rolls out (and for ever if the manager died
    /// meanwhile), then `completed`, `rolled-back` or `revert-incomplete`.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
    /// Set by `dvs rollback`: the revision whose document this is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<u64>,
    #[serde(default)]
    pub hosts: Vec<DvsRevisionHost>,
    /// Left out of history listings.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub document_toml: String,
}

impl Record for DvsRevision {
    const KIND: &'static str = "dvs-revision";
    const SCHEMA: u32 = 1;
}

/// `dvs/hosts/<name>`: the manager's view of one host's switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HostSwitchRecord(pub HostSwitch);

impl Record for HostSwitchRecord {
    const KIND: &'static str = "dvs-host";
    const SCHEMA: u32 = 1;
}
