//! `tandem-manager`: the cluster's control plane.
//!
//! It keeps the cluster's state in a [`store::Store`] (by default one redb
//! file, [`store::RedbStore`]) and serves an HTTP/JSON API over mutual TLS
//! ([`server`]): hosts join with a single-use token and get a short-lived
//! certificate from the cluster CA (`tandem-pki`), report inventory and
//! heartbeats, renew their certificates and fetch the revocation list and
//! their VMs' authority records; operators create tokens, list, show and
//! remove hosts (which revokes their certificates at once) and query and
//! hand over VM authority.
//!
//! - [`api`]: paths, request and response types (shared with the CLI and
//!   the host agent);
//! - [`model`]: the records and their keys;
//! - [`store`]: the store trait, the redb backend, typed helpers;
//! - [`service`]: the logic ([`service::Manager`]), no HTTP;
//! - [`http`]: routes and per-role authorisation;
//! - [`server`]: TLS listener (mutual TLS, plus the join connection);
//! - [`client`]: the mTLS client and the pinned-CA join client;
//! - [`dvs`]: the distributed switch: revisions, history, rollouts to the
//!   hosts' APIs, and each host's switch state;
//! - [`agent`]: the loop a host runs (heartbeat, inventory, revocations,
//!   authority cache, renewal at 2/3 of the certificate's life);
//! - [`state`]: the manager's state directory and `cluster init`.
//!
//! See docs/cluster.md, "Manager".

pub mod agent;
pub mod api;
pub mod client;
pub mod clock;
pub mod deploy;
pub mod dvs;
pub mod http;
pub mod model;
pub mod server;
pub mod service;
pub mod state;
pub mod store;

pub use service::{Manager, ManagerError, Settings};
