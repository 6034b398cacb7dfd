//! tandemd's HTTP/JSON API: the request and response types shared by the
//! daemon and the CLI, and a small client that speaks HTTP/1.1 over a unix
//! socket.
//!
//! Every route lives under `/v1`. Errors come back as a non-2xx status with
//! an [`ErrorBody`].

mod client;
pub mod deploy;
mod error;

pub use client::{ApiError, Client, Connecting, Connector, Stream};
pub use error::{ErrorKind, UnknownErrorKind};

use serde::{Deserialize, Serialize};

/// Default path of tandemd's API socket.
pub const DEFAULT_SOCKET: &str = "/run/tandem/tandemd.sock";

/// Lifecycle state of a VM as tandemd sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// Defined, QEMU not running.
    Defined,
    /// QEMU is being started.
    Starting,
    Running,
    Paused,
    /// A graceful stop is under way.
    Stopping,
    /// QEMU exited cleanly (guest power-off or a requested stop).
    Shutoff,
    /// QEMU exited unexpectedly, or the accelerator failed.
    Crashed,
}

impl VmState {
    pub fn as_str(&self) -> &'static str {
        match self {
            VmState::Defined => "defined",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Shutoff => "shutoff",
            VmState::Crashed => "crashed",
        }
    }

    /// Whether a QEMU process is expected to exist in this state.
    pub fn is_active(&self) -> bool {
        matches!(
            self,
            VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping
        )
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the last QEMU process of a VM ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Exit code, when QEMU exited by itself.
    pub code: Option<i32>,
    /// Signal number, when QEMU was killed.
    pub signal: Option<i32>,
    /// Unix time (seconds) the exit was recorded.
    pub at: u64,
    /// Why tandem thinks it ended, in words.
    pub reason: String,
    /// The last lines of the guest's serial console.
    pub serial_tail: Vec<String>,
    /// The last lines QEMU printed on stderr.
    pub qemu_log_tail: Vec<String>,
}

impl ExitInfo {
    pub fn describe_status(&self) -> String {
        match (self.code, self.signal) {
            (_, Some(sig)) => format!("killed by signal {sig}"),
            (Some(code), None) => format!("exit code {code}"),
            (None, None) => "exit status unknown".to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSummary {
    pub name: String,
    pub state: VmState,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub accel: Option<String>,
    pub pid: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    /// The VM's identity (hyphenated UUID), kept by a backup that takes it
    /// over; empty from a tandemd that did not report one.
    #[serde(default)]
    pub uuid: String,
    pub state: VmState,
    /// QEMU's own run state from `query-status` (e.g. `running`, `paused`,
    /// `internal-error`), when QEMU is up and answering.
    pub qmp_status: Option<String>,
    pub accel: Option<String>,
    pub pid: Option<u32>,
    pub started_at: Option<u64>,
    pub qmp_socket: String,
    pub serial_log: String,
    pub ram_file: String,
    pub last_exit: Option<ExitInfo>,
    /// The spec as stored, in TOML.
    pub spec_toml: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateVmRequest {
    /// The VM spec document (TOML).
    pub spec_toml: String,
    /// The VM's UUID when the caller allocates it (a deployment's clones,
    /// unique across the cluster); a new one otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StopRequest {
    /// Overrides the spec's `shutdown_timeout_s`.
    pub timeout_s: Option<u64>,
    /// Skip the ACPI power-down and kill QEMU at once.
    #[serde(default)]
    pub force: bool,
}

/// Body of `checkpoint` (the directory to create) and `restore` (the
/// directory to start from). Paths are on the daemon's host, under its
/// checkpoint root (`tandemd --checkpoint-root`); a relative path is taken
/// from there, and one leading outside it is refused (`invalid`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointRequest {
    pub dir: std::path::PathBuf,
}

/// A slice of the serial console log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConsoleChunk {
    /// Offset of `data` in the log.
    pub offset: u64,
    /// Offset to ask for next.
    pub next_offset: u64,
    /// Log bytes, lossily decoded as UTF-8.
    pub data: String,
    /// Whether the VM's QEMU is still running (more output may come).
    pub active: bool,
}

/// The accelerator decision for this host, with its evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelProbe {
    /// `kvm` or `tcg`: what `auto` resolves to on this host.
    pub chosen: String,
    /// Why, in words.
    pub reason: String,
    pub cpu_virt_flag: bool,
    /// Loaded KVM modules (`kvm_intel`, `kvm_amd`, `kvm_pvm`, ...).
    pub kvm_modules: Vec<String>,
    pub dev_kvm: bool,
    /// Outcome of the probe boot, if one ran.
    pub probe_boot: Option<String>,
    pub probe_timeout_ms: u64,
    /// Unix time of the probe.
    pub probed_at: u64,
    /// What the cached result is keyed on (host kernel, QEMU version, CPU).
    pub cache_key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostInfo {
    pub hostname: String,
    pub tandem_version: String,
    pub qemu_binary: String,
    pub qemu_version: String,
    pub state_dir: String,
    pub accel: AccelProbe,
    pub vms: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable machine-readable kind: one of [`ErrorKind`]'s words. Kept a
    /// string so a client reads kinds a newer tandemd may add.
    pub kind: String,
    pub message: String,
    /// Per-field problems, for `invalid-spec` and `invalid-document`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldProblem>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FieldProblem {
    pub field: String,
    pub message: String,
}

/// Body of `POST /v1/vms/{name}/protect`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProtectRequest {
    /// The backup's replication endpoint: `HOST:PORT` (TCP) or `unix:PATH`.
    pub backup: String,
    /// Epoch length in milliseconds (10–1000; default 50).
    #[serde(default)]
    pub epoch_ms: Option<u64>,
    /// Output commit for the VM's switch NICs: `classified` (default),
    /// `all-hold` or `off`.
    #[serde(default)]
    pub output_mode: Option<String>,
    /// The rule profile to start from (default `conservative`).
    #[serde(default)]
    pub profile: Option<String>,
    /// Rules in rule syntax, placed before the profile's (or used alone
    /// when no profile is named).
    #[serde(default)]
    pub rules: Option<Vec<String>>,
    /// Bounds on held output (defaults 8192 frames, 16 MiB).
    #[serde(default)]
    pub hold_max_frames: Option<usize>,
    #[serde(default)]
    pub hold_max_bytes: Option<usize>,
    /// Dirty-page tracker: `auto` (default of tandemd's `--ft-tracker`),
    /// `scan` or `soft-dirty`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracker: Option<String>,
    /// TEST ONLY: let pass TCP segments carry unclamped acknowledgements,
    /// so a drill can prove its checker catches it. Honoured only by a
    /// tandemd built with the `fault-injection` feature; any other refuses
    /// the request.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unsafe_no_clamp: bool,
    /// The least generation this protection runs under: a migration's
    /// destination protects under the source's generation + 1, so the
    /// backup lets it supersede the source and never takes the source
    /// back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

/// `GET /v1/vms/{name}/migration/protection` on a migration's source: how
/// the VM is protected, for its destination to protect it the same way.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationProtection {
    /// The request the protection was started with.
    pub request: ProtectRequest,
    /// The generation the source protects under.
    pub generation: u64,
    /// The cluster manager's record of the VM is at this generation (the
    /// VM is recorded there): the migration hands the record over to the
    /// destination before it protects.
    #[serde(default)]
    pub record_generation: Option<u64>,
    /// The backup host's certificate name (`NAME@…` backups), so the CLI
    /// can refuse a migration onto the VM's own backup host.
    #[serde(default)]
    pub backup_host: Option<String>,
}

/// The output-commit rule table of a protected VM
/// (`GET /v1/ft/{vm}/rules`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OutputRules {
    pub vm: String,
    pub mode: String,
    /// The profile the table was last loaded from, if any.
    pub profile: Option<String>,
    /// First match wins; unmatched frames: forwarded and ARP pass, the
    /// rest of the VM's own output is held. SYN/FIN/RST are always held.
    pub rules: Vec<String>,
}

/// `POST /v1/ft/{vm}/rules`: one change to the table, validated before it
/// is applied to the next frame.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum RulesChange {
    /// Replace the table: with a profile's rules, with the given rules, or
    /// with the given rules followed by the profile's (exceptions first:
    /// the first match wins).
    Set {
        #[serde(default)]
        profile: Option<String>,
        #[serde(default)]
        rules: Vec<String>,
        #[serde(default)]
        mode: Option<String>,
    },
    /// Insert a rule at a 1-based position (default: the end).
    Add {
        rule: String,
        #[serde(default)]
        position: Option<usize>,
    },
    /// Delete the rule at a 1-based position.
    Del { position: usize },
}

/// Replication role of this host for a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FtRole {
    Primary,
    Backup,
}

/// Timings of a failover, as the backup measured them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FailoverReport {
    /// Last sign of life from the primary → failure detected: a silence
    /// reaching the suspicion timeout (the primary's fencing timeout), or
    /// the primary's report that its QEMU died, or an operator's command.
    pub detection_ms: f64,
    /// Detected → takeover decision: the margin in which a primary cut off
    /// from its backup certainly fences itself (0 when the primary reported
    /// the crash, or the operator asked).
    #[serde(default)]
    pub fence_wait_ms: f64,
    /// Takeover decision → guest running on this host.
    pub restore_ms: f64,
    pub total_ms: f64,
    /// The committed epoch the guest resumed from.
    pub epoch: u64,
    pub reason: String,
}

/// Where one VM's protection stands on one host. Serialised as the
/// kebab-case words the v1 API has always used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FtState {
    /// Primary: reaching the backup (or the backup's first answer).
    #[default]
    Connecting,
    /// Primary: the initial copy or a resync is under way.
    Syncing,
    /// Primary: the backup holds a committed, resumable checkpoint.
    Protected,
    /// Primary: the backup is unreachable or failing; the guest runs on.
    Degraded,
    /// Primary: paused (or frozen) because the backup went silent.
    Fenced,
    /// Backup: holding the replica, ready to take over.
    Standby,
    /// Backup: resuming the guest from the replica.
    TakingOver,
    /// Backup: the guest runs here now.
    FailedOver,
    /// Protection ended (on purpose, or because the guest is gone).
    Stopped,
}

impl FtState {
    pub const ALL: [FtState; 9] = [
        FtState::Connecting,
        FtState::Syncing,
        FtState::Protected,
        FtState::Degraded,
        FtState::Fenced,
        FtState::Standby,
        FtState::TakingOver,
        FtState::FailedOver,
        FtState::Stopped,
    ];

    /// The word the API and `ft status` use.
    pub fn as_str(self) -> &'static str {
        match self {
            FtState::Connecting => "connecting",
            FtState::Syncing => "syncing",
            FtState::Protected => "protected",
            FtState::Degraded => "degraded",
            FtState::Fenced => "fenced",
            FtState::Standby => "standby",
            FtState::TakingOver => "taking-over",
            FtState::FailedOver => "failed-over",
            FtState::Stopped => "stopped",
        }
    }

    /// The backup has resumed (or is resuming) the guest: the replica is
    /// no longer a replica.
    pub fn is_taken_over(self) -> bool {
        matches!(self, FtState::TakingOver | FtState::FailedOver)
    }
}

/// Scripts and tests compare with the API's words.
impl PartialEq<&str> for FtState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::fmt::Display for FtState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `tandem ft status`: one protected VM as seen by one host.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FtStatus {
    pub vm: String,
    pub role: Option<FtRole>,
    pub state: FtState,
    /// Why the state is what it is, when it is not `protected`/`standby`.
    pub detail: String,
    pub peer: String,
    pub epoch_ms: u64,
    pub tracker: String,
    pub last_committed: u64,
    pub last_sent: u64,
    /// The epoch that will capture what the guest does from now on. Output
    /// observed now belongs to this epoch or an earlier one, so holding it
    /// until `last_committed >= open_epoch` is safe (all-hold gating).
    pub open_epoch: u64,
    pub epochs_per_s: f64,
    pub pause_p50_ms: f64,
    pub pause_p99_ms: f64,
    pub bytes_per_epoch: u64,
    pub dirty_pages_last: u64,
    /// Epochs sent but not yet committed.
    pub lag_epochs: u64,
    pub failover: Option<FailoverReport>,
    /// Output commit on the primary (absent without switch NICs).
    #[serde(default)]
    pub output: Option<OutputCounters>,
}

/// The output-commit gate's counters for one protected VM, with the rule
/// table it classifies with: output commit's own type, so the gate and the
/// API cannot drift apart. Its fields are the JSON object's, in order.
pub use tandem_outcommit::GateCounters as OutputCounters;

/// The bodies of `GET /v1/switch/stats` and `POST /v1/switch/apply` are the
/// switch core's own types (pure data; the core has no I/O).
pub use tandem_switch_core::fdb::FdbEntry;
pub use tandem_switch_core::port::{CounterSnapshot, DropSnapshot};
pub use tandem_switch_core::switch::{ApplyReport, PortStats, SwitchStats};

/// Body of `POST /v1/switch/apply`, and part of `GET /v1/switch`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SwitchDocumentBody {
    /// The whole switch configuration document, TOML.
    pub document_toml: String,
}

/// The shortest, default and longest time a switch transaction may wait
/// for its commit (seed 000: about 30 s, 5 to 60 s allowed).
pub const TXN_TIMEOUT_MIN_S: u32 = 5;
pub const TXN_TIMEOUT_DEFAULT_S: u32 = 30;
pub const TXN_TIMEOUT_MAX_S: u32 = 60;

/// Body of `POST /v1/switch/txn`: apply `document_toml` provisionally;
/// unless `POST /v1/switch/commit` names `txid` within `timeout_s`, the
/// host restores the configuration it ran before, by itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchTxnRequest {
    /// Chosen by the caller (the manager), unique per transaction.
    pub txid: String,
    pub document_toml: String,
    /// Default [`TXN_TIMEOUT_DEFAULT_S`]; outside
    /// [`TXN_TIMEOUT_MIN_S`]..=[`TXN_TIMEOUT_MAX_S`] it is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u32>,
}

/// The answer to `POST /v1/switch/txn` (the seed's "return" message).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchTxnApplied {
    pub txid: String,
    /// [`tandem_switch_core::config::SwitchDocument::digest`] of the
    /// configuration now running.
    pub digest: String,
    /// Milliseconds left until the host rolls back by itself.
    pub deadline_in_ms: u64,
}

/// Body of `POST /v1/switch/commit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchCommitRequest {
    pub txid: String,
}

/// The answer to `POST /v1/switch/commit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchCommitted {
    pub txid: String,
    pub digest: String,
}

/// How a switch transaction ended on a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TxnOutcome {
    Committed,
    /// No commit by the deadline: the saved configuration runs again.
    RolledBack,
    /// Restored at start: tandemd found the transaction pending when it
    /// started (it had been killed), and restored before serving.
    RestoredAtStart,
    /// The saved configuration could not be applied either: the host runs
    /// its built-in management-only configuration, and raises an alarm.
    Fallback,
}

/// Where a transaction came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TxnOrigin {
    /// `POST /v1/switch/txn` (the manager, or an operator over the host API).
    Manager,
    /// `tandem switch apply` on a managed host, confirmed by `tandem switch
    /// confirm`.
    Local,
}

/// A pending transaction, as `GET /v1/switch/txn` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingTxn {
    pub txid: String,
    pub origin: TxnOrigin,
    pub deadline_in_ms: u64,
    /// Digest of the configuration it restores at the deadline.
    pub saved_digest: String,
}

/// The last transaction that ended on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndedTxn {
    pub txid: String,
    pub outcome: TxnOutcome,
    /// What ran after it ended.
    pub digest: String,
    /// Unix milliseconds.
    pub at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `GET /v1/switch/txn`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchTxnStatus {
    pub running_digest: String,
    pub pending: Option<PendingTxn>,
    pub last: Option<EndedTxn>,
    /// Set while the host runs its fallback configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alarm: Option<String>,
}

/// Body of `POST /v1/migrations/incoming` on the destination: define the
/// VM (with the source's identity) and start a QEMU that waits for its
/// migration stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncomingMigrationRequest {
    /// The VM's spec as the source has it (`VmInfo::spec_toml`).
    pub spec_toml: String,
    /// The source's UUID for the VM: a migrated VM keeps its identity.
    pub uuid: String,
    /// `HOST:PORT` the destination's QEMU listens on (port 0: any free).
    pub listen: String,
    /// Must match the source's `allow_postcopy` (QEMU needs the capability
    /// on both ends before the stream starts).
    #[serde(default)]
    pub allow_postcopy: bool,
    /// Seconds to wait for the source to connect before giving up and
    /// removing the VM (default 60).
    #[serde(default)]
    pub accept_timeout_s: Option<u64>,
    /// Must match the source's `multifd_channels` (the capability is set
    /// on both ends before the stream starts).
    #[serde(default)]
    pub multifd_channels: Option<u8>,
    /// The VM's disks as the source describes them
    /// (`POST /v1/vms/{name}/migration/disks`). Empty: every disk is on
    /// storage both hosts share at the same path (the destination checks
    /// nothing). Otherwise the destination uses a disk in place only where
    /// it finds the source's probe file, and makes and exports a disk of
    /// its own for every other one.
    #[serde(default)]
    pub disks: Vec<MigrationDisk>,
    /// [`MigrationSource::tls_name`]: when set, only that host's
    /// certificate may connect to the destination's QEMU.
    #[serde(default)]
    pub source_tls_name: Option<String>,
    /// The VM is protected on the source, like this: the destination
    /// gates the VM's switch ports from the start (all output held until
    /// its own first commit), and refuses if it holds the VM's replica
    /// itself (it is the VM's backup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protection: Option<ProtectRequest>,
    /// The network state of the VM's switch NICs on the source (`GET
    /// /v1/vms/{name}/network`): the destination's switch installs it
    /// when the VM first runs there (DHCP bindings, multicast groups), so
    /// nothing waits for a lease renewal or the next IGMP query.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network: Vec<NicHandover>,
}

/// One switch NIC's network state, handed from host to host with its VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicHandover {
    pub nic: String,
    #[serde(flatten)]
    pub state: tandem_switch_core::switch::NicNetState,
}

/// One disk of a VM about to migrate, as its source sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationDisk {
    pub name: String,
    /// `qcow2` or `raw`: the destination's own copy has the same format.
    pub format: String,
    /// The guest-visible size in bytes.
    pub virtual_size: u64,
    /// Bytes the image takes on the source's storage: what a copy needs
    /// free on the destination.
    pub allocated: u64,
    /// A file the source wrote beside the disk, holding `nonce`: a
    /// destination that reads it there sees the same storage. Absent when
    /// the disk is this host's alone (it lives in tandemd's own directory
    /// for the VM) or a copy was asked for.
    #[serde(default)]
    pub probe: Option<StorageProbe>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageProbe {
    pub path: String,
    pub nonce: String,
}

/// `POST /v1/vms/{name}/migration/disks`: what the destination needs to
/// know of the source before it prepares.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationSource {
    /// The source's certificate name when it has a cluster identity: the
    /// destination lets only this host's certificate feed its QEMU
    /// (QEMU's `tls-authz` on the stream and on the NBD server).
    #[serde(default)]
    pub tls_name: Option<String>,
    pub disks: Vec<MigrationDisk>,
}

/// Body of `POST /v1/vms/{name}/migration/disks` on the source.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MigrationDisksRequest {
    /// Copy every disk, even one the destination could share.
    #[serde(default)]
    pub copy_all: bool,
}

/// Where the source mirrors the disks the destination does not share:
/// the destination QEMU's NBD server and its export names (the disks'
/// names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageCopyTarget {
    /// `HOST:PORT` of the destination QEMU's NBD server.
    pub nbd: String,
    pub disks: Vec<String>,
}

/// The destination is ready: the source migrates to `uri`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncomingMigrationReply {
    pub vm: String,
    /// QEMU's migration URI, e.g. `tcp:127.0.0.1:40123`.
    pub uri: String,
    /// The destination's certificate name when its QEMU listens with TLS
    /// (it has a cluster identity): the source's `tls_hostname`.
    #[serde(default)]
    pub tls_hostname: Option<String>,
    /// The disks the source must copy, and where to.
    #[serde(default)]
    pub copy_storage: Option<StorageCopyTarget>,
}

/// Body of `POST /v1/vms/{name}/migrate` on the source.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// Where the destination's QEMU listens ([`IncomingMigrationReply::uri`]).
    pub uri: String,
    /// The destination's certificate name ([`IncomingMigrationReply::tls_hostname`]):
    /// required when this host has a cluster identity, whose stream then
    /// runs over TLS and checks the destination by this name.
    #[serde(default)]
    pub tls_hostname: Option<String>,
    /// The downtime limit precopy starts with (default 300 ms, QEMU's).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// The most downtime the convergence ladder may raise the limit to
    /// (default 2000 ms; equal to `downtime_ms` to disable that rung).
    #[serde(default)]
    pub max_downtime_ms: Option<u64>,
    /// Bytes per second (default: QEMU's 128 MiB/s).
    #[serde(default)]
    pub bandwidth_bps: Option<u64>,
    #[serde(default)]
    pub allow_postcopy: bool,
    /// Whether the throttle rung may slow the guest (default true).
    #[serde(default)]
    pub allow_throttle: Option<bool>,
    /// No progress for this long is a stall (default 10 s).
    #[serde(default)]
    pub stall_s: Option<u64>,
    /// Nothing sent for this long is a dead link: abort at once (default
    /// three stall windows).
    #[serde(default)]
    pub link_timeout_s: Option<u64>,
    /// Parallel streams for memory (QEMU's multifd); not with postcopy.
    #[serde(default)]
    pub multifd_channels: Option<u8>,
    /// The destination's answer for storage it does not share
    /// ([`IncomingMigrationReply::copy_storage`]): mirrored first, and the
    /// memory stream starts once every copy has caught up.
    #[serde(default)]
    pub copy_storage: Option<StorageCopyTarget>,
}

/// Where an outgoing migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationPhase {
    /// Copying disks the destination does not share, then sending RAM
    /// (precopy or postcopy); `rung` says which (`storage` first).
    Running,
    /// QEMU finished: the source is paused and waits to be confirmed
    /// (the destination runs: the source goes) or resumed.
    AwaitingConfirm,
    /// Confirmed: the VM now lives on the destination only.
    Done,
    /// The source resumed after a completed stream (the destination did
    /// not take over).
    Resumed,
    Failed,
    Cancelled,
    /// The convergence ladder gave up.
    Aborted,
}

impl MigrationPhase {
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            MigrationPhase::Running | MigrationPhase::AwaitingConfirm
        )
    }
}

/// `GET /v1/vms/{name}/migration`: the latest reading of a migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationReport {
    pub vm: String,
    pub phase: MigrationPhase,
    /// The convergence ladder's rung (`precopy`, `downtime 565 ms`,
    /// `throttle`, `postcopy`).
    pub rung: String,
    pub elapsed_ms: u64,
    pub transferred: u64,
    pub remaining: u64,
    pub total: u64,
    pub dirty_rate_bps: u64,
    pub bandwidth_bps: u64,
    pub iteration: u64,
    pub expected_downtime_ms: Option<u64>,
    pub cpu_throttle_pct: u64,
    /// QEMU's measured downtime, once completed.
    pub downtime_ms: Option<u64>,
    /// Why it failed or was aborted.
    pub message: Option<String>,
    /// Bytes of disk the source mirrored to the destination (disks the two
    /// hosts do not share), and how long the copies took to catch up.
    #[serde(default)]
    pub storage_bytes: u64,
    #[serde(default)]
    pub storage_ms: Option<u64>,
    /// Of `transferred`, the bytes sent over multifd streams.
    #[serde(default)]
    pub multifd_bytes: u64,
    /// A protected VM: from the end of the stream to the destination's
    /// first commit to the backup (its output is held until then). Set by
    /// the CLI that drove the migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_commit_ms: Option<u64>,
}

impl MigrationReport {
    /// A migration of `vm` that has just started on `rung`: nothing sent,
    /// nothing measured yet.
    pub fn starting(vm: &str, phase: MigrationPhase, rung: &str) -> MigrationReport {
        MigrationReport {
            vm: vm.to_string(),
            phase,
            rung: rung.to_string(),
            elapsed_ms: 0,
            transferred: 0,
            remaining: 0,
            total: 0,
            dirty_rate_bps: 0,
            bandwidth_bps: 0,
            iteration: 0,
            expected_downtime_ms: None,
            cpu_throttle_pct: 0,
            downtime_ms: None,
            message: None,
            storage_bytes: 0,
            storage_ms: None,
            multifd_bytes: 0,
            first_commit_ms: None,
        }
    }
}

/// Body of `POST /v1/vms/{name}/migration/confirm`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationConfirm {
    /// true: the destination runs the VM, so the source's copy goes.
    /// false: it does not, so the source resumes.
    pub destination_running: bool,
    /// A protected VM: the destination's protection has committed its
    /// first epoch to the backup, so the output the source held since its
    /// last commit is covered there and goes out. Otherwise it is dropped.
    #[serde(default)]
    pub destination_committed: bool,
}
