//! `cluster`: which cluster this database belongs to.

use serde::{Deserialize, Serialize};

use crate::store::typed::Record;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    /// The CA's cluster id (`tandem_pki::ClusterCa::cluster_id`). The
    /// manager refuses to start on a database of another cluster.
    pub cluster_id: String,
    pub cluster_name: String,
    /// Unix seconds.
    pub created_at: u64,
}

impl Record for ClusterRecord {
    const KIND: &'static str = "cluster";
    const SCHEMA: u32 = 1;
}
