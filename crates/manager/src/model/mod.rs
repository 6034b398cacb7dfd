//! What the manager stores, and under which keys.
//!
//! | key | record |
//! |---|---|
//! | `cluster` | [`ClusterRecord`]: the cluster this database belongs to |
//! | `hosts/<name>` | [`HostRecord`]: a member host, its certificates, health and inventory |
//! | `tokens/<id>` | [`TokenRecord`]: an unused join token (hashed) |
//! | `vms/<uuid>` | [`AuthorityRecord`]: primary, backup and generation of a VM |
//! | `revocations` | [`RevocationRecord`]: revoked serials and the list's generation |
//! | `dvs` | [`dvs::DvsRecord`]: the distributed switch's current document and revision |
//! | `dvs/revisions/<n>` | [`dvs::DvsRevision`]: every revision applied, its author, time and outcome |
//! | `dvs/hosts/<name>` | [`dvs::HostSwitchRecord`]: what the manager knows a host's switch runs |
//!
//! Every value is JSON in the versioned envelope of [`crate::store::typed`].

pub mod authority;
pub mod cluster;
pub mod dvs;
pub mod host;
pub mod revocation;
pub mod token;

pub use authority::AuthorityRecord;
pub use cluster::ClusterRecord;
pub use host::{
    CertRef, Datastore, DatastoreKind, Health, HealthState, HostRecord, Inventory, MemoryInfo,
    Neighbour, PortGroupInfo, QemuInfo, Uplink,
};
pub use revocation::{RevocationRecord, RevokedCert};
pub use token::{JoinToken, TokenError, TokenRecord};

pub const CLUSTER_KEY: &str = "cluster";
pub const REVOCATIONS_KEY: &str = "revocations";
pub const HOSTS_PREFIX: &str = "hosts/";
pub const TOKENS_PREFIX: &str = "tokens/";
pub const VMS_PREFIX: &str = "vms/";

pub fn host_key(name: &str) -> String {
    format!("{HOSTS_PREFIX}{name}")
}

pub fn token_key(id: &str) -> String {
    format!("{TOKENS_PREFIX}{id}")
}

pub fn vm_key(uuid: &uuid::Uuid) -> String {
    format!("{VMS_PREFIX}{}", uuid.hyphenated())
}
