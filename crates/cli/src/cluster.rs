//! The cluster: `tandem cluster …`, `tandem token …`, and the manager-side
//! `tandem host join|list|show|remove` (see docs/cluster.md, "Manager").
//!
//! Operator commands talk to `tandem-manager` over mutual TLS with an
//! operator certificate: `--identity DIR` (default: the one `cluster init`
//! made for the local administrator), and the manager at `--manager
//! HOST:PORT` (default: `manager.json` beside that identity).
//!
//! Exit status, for scripts (every `tandem` command):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | any other error |
//! | 2 | usage (bad arguments) |
//! | 3 | not found (no such host, token or VM) |
//! | 4 | refused: not allowed (wrong role, revoked, expired or foreign certificate, bad join token) |
//! | 5 | conflict (exists already, generation moved on) |
//! | 6 | the manager cannot be reached or did not answer in time |
//! | 7 | a distributed switch change did not complete: rolled back, or hosts out of sync (`tandem dvs`) |
//! | 8 | the manager refused the request as invalid (a document's problems are listed by field) |

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use tandem_manager::agent::{has_identity, save_joined, HOST_IDENTITY_DIR};
use tandem_manager::api::{
    ClusterStatus, CreateTokenRequest, CreatedToken, Dump, ErrorKind, HandoverRequest, HostView,
    RemovedHost, TokenInfo,
};
use tandem_manager::client::{join, ClientError, ManagerClient, ManagerEndpoint};
use tandem_manager::clock::rfc3339;
use tandem_manager::model::{AuthorityRecord, JoinToken};
use tandem_manager::state::{self, InitOptions, StateDir, DEFAULT_STATE_DIR, MANAGER_FILE};
use tandem_manager::store::StoreError;
use tandem_pki::{Identity, NoRevocations};

use crate::print_json;

pub const EXIT_NOT_FOUND: i32 = 3;
pub const EXIT_REFUSED: i32 = 4;
pub const EXIT_CONFLICT: i32 = 5;
pub const EXIT_UNREACHABLE: i32 = 6;
pub const EXIT_NOT_SYNCHRONIZED: i32 = 7;
pub const EXIT_INVALID: i32 = 8;

/// The exit status for an error (see the module's table).
pub fn exit_code(e: &anyhow::Error) -> i32 {
    if e.chain()
        .any(|c| c.downcast_ref::<crate::dvs::NotSynchronized>().is_some())
    {
        return EXIT_NOT_SYNCHRONIZED;
    }
    let Some(c) = e.chain().find_map(|c| c.downcast_ref::<ClientError>()) else {
        return 1;
    };
    match c {
        ClientError::Server { .. } => match c.kind() {
            Some(ErrorKind::NotFound) => EXIT_NOT_FOUND,
            Some(ErrorKind::Forbidden | ErrorKind::Unauthorized) => EXIT_REFUSED,
            Some(ErrorKind::Conflict) => EXIT_CONFLICT,
            Some(ErrorKind::Invalid) => EXIT_INVALID,
            _ => 1,
        },
        ClientError::Tls { .. } => EXIT_REFUSED,
        ClientError::Connect { .. } | ClientError::Timeout { .. } => EXIT_UNREACHABLE,
        _ => 1,
    }
}

/// How to reach the manager as an operator.
#[derive(Args, Debug, Clone)]
pub struct ManagerOpts {
    /// The manager, HOST:PORT (default: manager.json beside the identity).
    #[arg(long, env = "TANDEM_MANAGER")]
    pub(crate) manager: Option<String>,
    /// The manager's certificate name (default: manager.json's).
    #[arg(long, env = "TANDEM_MANAGER_NAME")]
    pub(crate) manager_name: Option<String>,
    /// The operator identity directory (identity.pem, manager.json).
    #[arg(long, env = "TANDEM_IDENTITY", default_value_t = format!("{DEFAULT_STATE_DIR}/operator"))]
    pub(crate) identity: String,
    /// Give up on a request after this long.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub(crate) timeout: Duration,
}

impl ManagerOpts {
    /// The defaults, with the identity in `identity` (its `manager.json`
    /// says where the manager is).
    pub(crate) fn with_identity(identity: &str) -> Self {
        ManagerOpts {
            manager: std::env::var("TANDEM_MANAGER").ok(),
            manager_name: std::env::var("TANDEM_MANAGER_NAME").ok(),
            identity: identity.to_string(),
            timeout: Duration::from_secs(30),
        }
    }

    pub(crate) fn client(&self) -> anyhow::Result<ManagerClient> {
        let dir = Path::new(&self.identity);
        let id = Identity::load(dir).with_context(|| {
            format!(
                "loading the operator identity from {} (made by `tandem cluster init`; --identity names another)",
                dir.display()
            )
        })?;
        let saved: Option<ManagerEndpoint> = state::read_json(&dir.join(MANAGER_FILE)).ok();
        let address = match (&self.manager, &saved) {
            (Some(a), _) => a.clone(),
            (None, Some(s)) => s.address.clone(),
            (None, None) => bail!(
                "where is the manager? give --manager HOST:PORT (no {} in {})",
                MANAGER_FILE,
                dir.display()
            ),
        };
        let name = self
            .manager_name
            .clone()
            .or_else(|| saved.as_ref().map(|s| s.name.clone()))
            .unwrap_or_else(|| "manager".into());
        let endpoint = ManagerEndpoint {
            address,
            name,
            cluster_id: id.cluster_id().to_string(),
        };
        Ok(ManagerClient::new(endpoint, &id, Arc::new(NoRevocations))?.with_timeout(self.timeout))
    }
}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Make a new cluster here: its CA, the manager's certificate, an
    /// operator certificate for you, and the manager's store. Then run
    /// `tandem-manager --state-dir DIR`.
    Init {
        #[arg(long, env = "TANDEM_MANAGER_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// The cluster's name (one DNS label).
        #[arg(long, default_value = "tandem")]
        name: String,
        /// The manager's certificate name: hosts check it.
        #[arg(long, default_value = "manager")]
        manager_name: String,
        /// Where tandem-manager will listen.
        #[arg(long, default_value = "0.0.0.0:7443")]
        listen: String,
        /// Where this machine's CLI reaches it.
        #[arg(long, default_value = "127.0.0.1:7443")]
        advertise: String,
        /// Your operator certificate's name.
        #[arg(long, default_value = "admin")]
        operator_name: String,
        /// Your operator certificate's lifetime.
        #[arg(long, default_value = "365days", value_parser = humantime::parse_duration)]
        operator_validity: Duration,
        /// No manager: a standalone pair of hosts A and B. Makes an offline
        /// CA in STATE_DIR/ca and both hosts' identities (valid one year) in
        /// STATE_DIR/hosts/A and STATE_DIR/hosts/B, to copy to each host's
        /// identity directory.
        #[arg(long, num_args = 2, value_names = ["A", "B"])]
        standalone: Option<Vec<String>>,
    },
    /// Standalone pairs: new certificates (another year) for every host
    /// under STATE_DIR/hosts. A managed cluster's hosts renew by themselves.
    Renew {
        #[arg(long, required = true)]
        standalone: bool,
        #[arg(long, env = "TANDEM_MANAGER_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// The cluster as the manager sees it.
    Status {
        #[command(flatten)]
        m: ManagerOpts,
    },
    /// Save the CA and every record to a new directory OUT. Run it on the
    /// manager's machine; with the manager running, the records come over
    /// its API.
    Backup {
        out: PathBuf,
        #[arg(long, env = "TANDEM_MANAGER_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Encrypt the CA's key with the passphrase in this file (`-`: standard input).
        #[arg(long, conflicts_with = "unencrypted")]
        passphrase_file: Option<PathBuf>,
        /// Write the CA's key in the clear (keep the backup offline).
        #[arg(long)]
        unencrypted: bool,
        #[command(flatten)]
        m: ManagerOpts,
    },
    /// Make a new state directory from a backup (the manager stopped).
    Restore {
        from: PathBuf,
        #[arg(long, env = "TANDEM_MANAGER_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// The passphrase of an encrypted backup, in this file (`-`: standard input).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// Where this machine's CLI reaches the manager.
        #[arg(long, default_value = "127.0.0.1:7443")]
        advertise: String,
        /// A new operator certificate for you, with this name.
        #[arg(long, default_value = "admin")]
        operator_name: String,
    },
    /// VM authority records: who runs each VM and who keeps its replica.
    Vms {
        /// One VM, by UUID.
        uuid: Option<String>,
        #[command(flatten)]
        m: ManagerOpts,
    },
    /// Change one VM authority record (a protecting host records its own
    /// VMs; these are the operator's corrections).
    #[command(subcommand)]
    Vm(VmCmd),
}

#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// Record a VM's primary (and backup) at generation 1.
    Create {
        uuid: String,
        /// The VM's name (informative).
        #[arg(long)]
        name: String,
        /// The host that runs it (certificate name).
        #[arg(long)]
        primary: String,
        /// The host that keeps its replica.
        #[arg(long)]
        backup: Option<String>,
        #[command(flatten)]
        m: ManagerOpts,
    },
    /// Move a VM's primary and/or backup, if its record is still at
    /// --expected-generation (exit 5 otherwise); the generation goes up.
    Handover {
        uuid: String,
        #[arg(long)]
        expected_generation: u64,
        #[arg(long)]
        primary: String,
        /// The new backup (none if omitted).
        #[arg(long)]
        backup: Option<String>,
        #[command(flatten)]
        m: ManagerOpts,
    },
    /// Delete a VM's record, if it is still at --generation.
    Delete {
        uuid: String,
        #[arg(long)]
        generation: u64,
        #[command(flatten)]
        m: ManagerOpts,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// A single-use join token for `tandem host join`.
    Create {
        /// Its lifetime.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Only a host of this name may use it.
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        description: Option<String>,
        #[command(flatten)]
        m: ManagerOpts,
    },
    /// Unused tokens (never their secrets).
    List {
        #[command(flatten)]
        m: ManagerOpts,
    },
    /// Delete an unused token.
    Delete {
        id: String,
        #[command(flatten)]
        m: ManagerOpts,
    },
}

/// The manager-side `tandem host …` commands.
#[derive(Subcommand, Debug)]
pub enum MemberCmd {
    /// Run on a host: join the manager's cluster with a token and keep the
    /// host's certificate in tandemd's state directory.
    Join {
        /// The manager, HOST:PORT.
        manager: String,
        /// The token from `tandem token create`.
        #[arg(
            long,
            env = "TANDEM_JOIN_TOKEN",
            required_unless_present = "token_file"
        )]
        token: Option<String>,
        /// Read the token from this file (`-`: standard input).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// This host's name (default: its hostname).
        #[arg(long)]
        name: Option<String>,
        /// tandemd's state directory; the identity goes in its `identity/`.
        #[arg(long, env = "TANDEM_STATE_DIR", default_value = "/var/lib/tandem")]
        state_dir: PathBuf,
        /// Replace an identity the host already has.
        #[arg(long)]
        force: bool,
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// The cluster's hosts.
    List {
        #[command(flatten)]
        m: ManagerOpts,
    },
    /// One host: certificates, health, inventory.
    Show {
        name: String,
        #[command(flatten)]
        m: ManagerOpts,
    },
    /// Remove a host: its certificates are revoked at once.
    Remove {
        name: String,
        #[command(flatten)]
        m: ManagerOpts,
    },
}

fn read_secret(path: &Path, what: &str) -> anyhow::Result<String> {
    let mut s = String::new();
    if path == Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut s)
            .with_context(|| format!("reading the {what} from standard input"))?;
    } else {
        s = std::fs::read_to_string(path)
            .with_context(|| format!("reading the {what} from {}", path.display()))?;
    }
    let s = s.trim_end_matches(['\n', '\r']).to_string();
    if s.is_empty() {
        bail!("the {what} is empty");
    }
    Ok(s)
}

pub async fn run_cluster(cmd: ClusterCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        ClusterCmd::Init {
            state_dir,
            name,
            manager_name,
            listen,
            advertise,
            operator_name,
            operator_validity,
            standalone,
        } => {
            if let Some(pair) = standalone {
                let [a, b] = <[String; 2]>::try_from(pair)
                    .map_err(|_| anyhow::anyhow!("--standalone takes two host names"))?;
                let p = tandem_pki::standalone_pair(&state_dir, &a, &b)?;
                return print_standalone(&p, json);
            }
            let report = state::init(
                &StateDir::new(&state_dir),
                &InitOptions {
                    cluster_name: name,
                    manager_name,
                    listen,
                    advertise,
                    operator_name,
                    operator_validity,
                },
            )?;
            if json {
                return print_json(&report);
            }
            println!(
                "cluster {} ({}) made in {}",
                report.cluster_name,
                report.cluster_id,
                report.state_dir.display()
            );
            println!(
                "  CA:         {} (back it up: `tandem cluster backup`)",
                report.ca_dir.display()
            );
            println!(
                "  operator:   {} in {} (until {})",
                report.operator_name,
                report.operator_identity.display(),
                rfc3339(report.operator_not_after)
            );
            println!("next:");
            println!(
                "  tandem-manager --state-dir {}      # serves on {}",
                report.state_dir.display(),
                report.listen
            );
            println!("  tandem token create                  # then on each host: tandem host join MANAGER --token …");
            Ok(())
        }
        ClusterCmd::Renew {
            standalone,
            state_dir,
        } => {
            if !standalone {
                bail!("only standalone pairs are renewed by hand (--standalone)");
            }
            let p = tandem_pki::standalone_renew(&state_dir)?;
            print_standalone(&p, json)
        }
        ClusterCmd::Status { m } => {
            let s: ClusterStatus = m.client()?.get("/v1/cluster").await?;
            if json {
                return print_json(&s);
            }
            println!("cluster:      {} ({})", s.cluster_name, s.cluster_id);
            println!(
                "manager:      {} {} (certificate until {})",
                s.manager_name,
                s.manager_version,
                rfc3339(s.manager_cert_not_after)
            );
            println!("  up since:   {}", rfc3339(s.manager_started_at));
            println!("  store:      {} (revision {})", s.store, s.store_revision);
            println!("hosts:        {} ({} online)", s.hosts, s.hosts_online);
            println!("vms:          {}", s.vms);
            println!("join tokens:  {} unused", s.tokens);
            println!(
                "revoked:      {} (list generation {})",
                s.revoked, s.revocation_generation
            );
            println!(
                "host certs:   valid {}",
                humantime::format_duration(Duration::from_secs(s.host_cert_validity_secs))
            );
            Ok(())
        }
        ClusterCmd::Backup {
            out,
            state_dir,
            passphrase_file,
            unencrypted,
            m,
        } => {
            let pass = match (&passphrase_file, unencrypted) {
                (Some(p), _) => Some(read_secret(p, "passphrase")?),
                (None, true) => None,
                (None, false) => bail!(
                    "give --passphrase-file FILE to encrypt the CA's key, or --unencrypted to write it in the clear"
                ),
            };
            let dir = StateDir::new(&state_dir);
            // The store first: if the manager is running and unreachable,
            // nothing is written.
            let dump = match state::dump_offline(&dir).await {
                Ok(d) => d,
                Err(state::StateError::Store(StoreError::Locked { .. })) => {
                    let d: Dump = m
                        .client()?
                        .get("/v1/cluster/dump")
                        .await
                        .context("the manager is running: its records are read over its API")?;
                    d
                }
                Err(e) => return Err(e.into()),
            };
            let info = state::backup_ca(&dir, &out, pass.as_deref())?;
            state::write_store_backup(&out, &dump)?;
            if json {
                return print_json(&serde_json::json!({
                    "out": out,
                    "encrypted": info.encrypted,
                    "cluster_id": info.cluster_id,
                    "records": dump.entries.len(),
                    "warning": info.warning(),
                }));
            }
            println!(
                "backup of cluster {} in {}: the CA ({}) and {} records",
                info.cluster_id,
                out.display(),
                if info.encrypted {
                    "encrypted"
                } else {
                    "NOT encrypted"
                },
                dump.entries.len()
            );
            if let Some(w) = info.warning() {
                eprintln!("{w}");
            }
            Ok(())
        }
        ClusterCmd::Restore {
            from,
            state_dir,
            passphrase_file,
            advertise,
            operator_name,
        } => {
            let pass = match &passphrase_file {
                Some(p) => Some(read_secret(p, "passphrase")?),
                None => None,
            };
            let report = state::restore(
                &StateDir::new(&state_dir),
                &from,
                pass.as_deref(),
                &advertise,
                &operator_name,
            )
            .await?;
            if json {
                return print_json(&report);
            }
            println!(
                "cluster {} restored into {}: {} records; a new operator certificate in {}",
                report.cluster_id,
                report.state_dir.display(),
                report.records,
                report.operator_identity.display()
            );
            Ok(())
        }
        ClusterCmd::Vms { uuid, m } => {
            let c = m.client()?;
            let vms: Vec<AuthorityRecord> = match uuid {
                Some(u) => vec![c.get(&format!("/v1/vms/{}", path_segment(&u)?)).await?],
                None => c.get("/v1/vms").await?,
            };
            if json {
                return print_json(&vms);
            }
            print_vms(&vms);
            Ok(())
        }
        ClusterCmd::Vm(cmd) => run_vm(cmd, json).await,
    }
}

fn print_vms(vms: &[AuthorityRecord]) {
    println!(
        "{:<36}  {:<16}  {:<16}  {:<16}  {:>4}",
        "UUID", "NAME", "PRIMARY", "BACKUP", "GEN"
    );
    for v in vms {
        println!(
            "{:<36}  {:<16}  {:<16}  {:<16}  {:>4}",
            v.uuid,
            v.name,
            v.primary,
            v.backup.as_deref().unwrap_or("-"),
            v.generation
        );
    }
}

/// A VM UUID as typed: hex digits and dashes only (the manager parses it).
fn vm_uuid(s: &str) -> anyhow::Result<&str> {
    if s.len() != 36 || !s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        bail!("{s:?} is not a VM UUID");
    }
    Ok(s)
}

async fn run_vm(cmd: VmCmd, json: bool) -> anyhow::Result<()> {
    let (rec, verb): (AuthorityRecord, &str) = match cmd {
        VmCmd::Create {
            uuid,
            name,
            primary,
            backup,
            m,
        } => {
            // As JSON: the manager parses the UUID (this crate has no
            // UUID type of its own).
            let req = serde_json::json!({
                "uuid": vm_uuid(&uuid)?,
                "name": name,
                "primary": primary,
                "backup": backup,
            });
            (m.client()?.post("/v1/vms", &req).await?, "created")
        }
        VmCmd::Handover {
            uuid,
            expected_generation,
            primary,
            backup,
            m,
        } => {
            let uuid = vm_uuid(&uuid)?;
            let req = HandoverRequest {
                expected_generation,
                primary,
                backup,
            };
            (
                m.client()?
                    .post(&format!("/v1/vms/{uuid}/handover"), &req)
                    .await?,
                "handed over",
            )
        }
        VmCmd::Delete {
            uuid,
            generation,
            m,
        } => {
            let uuid = vm_uuid(&uuid)?;
            let _: tandem_manager::api::Ack = m
                .client()?
                .delete(&format!("/v1/vms/{uuid}?generation={generation}"))
                .await?;
            if json {
                return print_json(
                    &serde_json::json!({ "deleted": uuid, "generation": generation }),
                );
            }
            println!("VM {uuid}: authority record deleted (it was at generation {generation})");
            return Ok(());
        }
    };
    if json {
        return print_json(&rec);
    }
    println!("VM {} {verb}: generation {}", rec.uuid, rec.generation);
    print_vms(std::slice::from_ref(&rec));
    Ok(())
}

fn print_standalone(p: &tandem_pki::StandalonePair, json: bool) -> anyhow::Result<()> {
    let not_after = tandem_manager::clock::unix(p.not_after);
    if json {
        return print_json(&serde_json::json!({
            "cluster_id": p.cluster_id,
            "ca_dir": p.ca_dir,
            "hosts": p.hosts.iter().map(|(n, d)| serde_json::json!({"name": n, "identity": d})).collect::<Vec<_>>(),
            "not_after": not_after,
        }));
    }
    println!(
        "standalone pair, cluster {} (CA in {}: keep it offline)",
        p.cluster_id,
        p.ca_dir.display()
    );
    for (n, d) in &p.hosts {
        println!("  {n}: {} (copy to its identity directory)", d.display());
    }
    println!("certificates valid until {}", rfc3339(not_after));
    Ok(())
}

/// A path segment the user typed: only characters that need no escaping.
fn path_segment(s: &str) -> anyhow::Result<&str> {
    if s.is_empty()
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        bail!("{s:?} is not a valid name or id");
    }
    Ok(s)
}

pub async fn run_token(cmd: TokenCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        TokenCmd::Create {
            ttl,
            host,
            description,
            m,
        } => {
            let c = m.client()?;
            let t: CreatedToken = c
                .post(
                    "/v1/tokens",
                    &CreateTokenRequest {
                        ttl_secs: Some(ttl.as_secs()),
                        host,
                        description,
                    },
                )
                .await?;
            if json {
                return print_json(&t);
            }
            println!("{}", t.token);
            eprintln!(
                "single use, until {}{}; on the host: tandem host join {} --token {}",
                rfc3339(t.expires_at),
                t.host
                    .as_deref()
                    .map(|h| format!(", only for host {h}"))
                    .unwrap_or_default(),
                c.endpoint().address,
                t.token
            );
            Ok(())
        }
        TokenCmd::List { m } => {
            let tokens: Vec<TokenInfo> = m.client()?.get("/v1/tokens").await?;
            if json {
                return print_json(&tokens);
            }
            println!(
                "{:<16}  {:<20}  {:<12}  {:<12}  DESCRIPTION",
                "ID", "EXPIRES", "HOST", "BY"
            );
            for t in tokens {
                println!(
                    "{:<16}  {:<20}  {:<12}  {:<12}  {}",
                    t.id,
                    if t.expired {
                        "expired".to_string()
                    } else {
                        rfc3339(t.expires_at)
                    },
                    t.host.as_deref().unwrap_or("any"),
                    t.created_by,
                    t.description
                );
            }
            Ok(())
        }
        TokenCmd::Delete { id, m } => {
            let _: tandem_manager::api::Ack = m
                .client()?
                .delete(&format!("/v1/tokens/{}", path_segment(&id)?))
                .await?;
            if json {
                return print_json(&serde_json::json!({ "deleted": id }));
            }
            println!("token {id} deleted");
            Ok(())
        }
    }
}

fn hostname() -> anyhow::Result<String> {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading the hostname (give --name)")?;
    let name = raw
        .trim()
        .split('.')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    tandem_pki::validate_name(&name)
        .with_context(|| format!("the hostname {raw:?} is not a valid host name; give --name"))?;
    Ok(name)
}

pub async fn run_member(cmd: MemberCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        MemberCmd::Join {
            manager,
            token,
            token_file,
            name,
            state_dir,
            force,
            timeout,
        } => {
            let token = match (token, token_file) {
                (_, Some(f)) => read_secret(&f, "join token")?,
                (Some(t), None) => t,
                (None, None) => bail!("give --token or --token-file"),
            };
            let token: JoinToken = token.parse()?;
            let name = match name {
                Some(n) => n,
                None => hostname()?,
            };
            tandem_pki::validate_name(&name)?;
            let dir = state_dir.join(HOST_IDENTITY_DIR);
            if has_identity(&dir) && !force {
                bail!(
                    "{} already holds this host's identity; --force replaces it (remove the host from its old cluster first)",
                    dir.display()
                );
            }
            let joined = join(&manager, &token, &name, timeout).await?;
            save_joined(&dir, &joined)?;
            if json {
                return print_json(&serde_json::json!({
                    "name": joined.identity.name(),
                    "cluster_id": joined.identity.cluster_id(),
                    "cluster_name": joined.identity.cluster_name(),
                    "serial": joined.identity.serial(),
                    "not_after": joined.credentials.not_after,
                    "manager": joined.endpoint,
                    "identity": dir,
                }));
            }
            println!(
                "host {} joined cluster {} ({}) at manager {} ({})",
                joined.identity.name(),
                joined.identity.cluster_name(),
                joined.identity.cluster_id(),
                joined.endpoint.name,
                joined.endpoint.address
            );
            println!(
                "  certificate {} until {} (renewed automatically by tandemd); kept in {}",
                joined.identity.serial(),
                rfc3339(joined.credentials.not_after),
                dir.display()
            );
            Ok(())
        }
        MemberCmd::List { m } => {
            let hosts: Vec<HostView> = m.client()?.get("/v1/hosts").await?;
            if json {
                return print_json(&hosts);
            }
            println!(
                "{:<16}  {:<10}  {:<9}  {:<20}  {:<15}  CERT UNTIL",
                "NAME", "CONNECTION", "HEALTH", "LAST SEEN", "ADDRESS"
            );
            for h in hosts {
                let r = &h.record;
                println!(
                    "{:<16}  {:<10}  {:<9}  {:<20}  {:<15}  {}",
                    r.name,
                    h.connection.as_str(),
                    r.health.state.as_str(),
                    r.last_seen.map(rfc3339).unwrap_or_else(|| "-".into()),
                    r.address.as_deref().unwrap_or("-"),
                    rfc3339(r.cert.not_after)
                );
            }
            Ok(())
        }
        MemberCmd::Show { name, m } => {
            let h: HostView = m
                .client()?
                .get(&format!("/v1/hosts/{}", path_segment(&name)?))
                .await?;
            if json {
                return print_json(&h);
            }
            print_host(&h);
            Ok(())
        }
        MemberCmd::Remove { name, m } => {
            let r: RemovedHost = m
                .client()?
                .delete(&format!("/v1/hosts/{}", path_segment(&name)?))
                .await?;
            if json {
                return print_json(&r);
            }
            println!(
                "host {} removed; revoked {} certificate(s) (revocation list generation {})",
                r.name,
                r.revoked.len(),
                r.revocation_generation
            );
            for s in &r.revoked {
                println!("  revoked {s}");
            }
            if !r.vms.is_empty() {
                eprintln!(
                    "warning: {} VM(s) still name {} as primary or backup; hand them over:",
                    r.vms.len(),
                    r.name
                );
                for v in &r.vms {
                    eprintln!("  {v}");
                }
            }
            Ok(())
        }
    }
}

fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
}

fn print_host(h: &HostView) {
    let r = &h.record;
    println!("host:         {}", r.name);
    println!(
        "connection:   {}{}",
        h.connection.as_str(),
        r.address
            .as_deref()
            .map(|a| format!(" (from {a})"))
            .unwrap_or_default()
    );
    println!(
        "host API:     {}",
        r.host_api.as_deref().unwrap_or("- (not reported)")
    );
    println!(
        "last seen:    {}",
        r.last_seen.map(rfc3339).unwrap_or_else(|| "never".into())
    );
    println!("health:       {}", r.health.state.as_str());
    for p in &r.health.problems {
        println!("  - {p}");
    }
    println!("joined:       {}", rfc3339(r.joined_at));
    println!(
        "certificate:  {} until {}",
        r.cert.serial,
        rfc3339(r.cert.not_after)
    );
    for c in &r.previous_certs {
        println!("  earlier:    {} until {}", c.serial, rfc3339(c.not_after));
    }
    let Some(inv) = &r.inventory else {
        println!("inventory:    none reported yet");
        return;
    };
    println!(
        "inventory:    reported {}",
        r.inventory_at.map(rfc3339).unwrap_or_else(|| "-".into())
    );
    if !inv.tandem_version.is_empty() {
        println!("  tandem:     {}", inv.tandem_version);
    }
    println!(
        "  qemu:       {} ({})",
        if inv.qemu.version.is_empty() {
            "?"
        } else {
            &inv.qemu.version
        },
        inv.qemu.machine_types.join(", ")
    );
    println!(
        "  memory:     {} free of {}",
        gib(inv.memory.free_bytes),
        gib(inv.memory.total_bytes)
    );
    for d in &inv.datastores {
        println!(
            "  datastore:  {} {:?} {} free of {}",
            d.path,
            d.kind,
            gib(d.free_bytes),
            gib(d.total_bytes)
        );
    }
    for p in &inv.port_groups {
        let vlan = match (p.vlan, p.trunk.is_empty()) {
            (Some(v), _) => format!("vlan {v}"),
            (None, false) => format!(
                "trunk {}",
                p.trunk
                    .iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            (None, true) => "untagged".into(),
        };
        println!("  port group: {} ({vlan})", p.name);
    }
    for u in &inv.uplinks {
        let n = |x: &Option<tandem_manager::model::Neighbour>| {
            x.as_ref()
                .map(|n| match &n.port {
                    Some(p) => format!("{} {p}", n.chassis),
                    None => n.chassis.clone(),
                })
                .unwrap_or_else(|| "-".into())
        };
        let check = match u.neighbour_matches() {
            Some(true) => "",
            Some(false) => "  MISMATCH",
            None => "",
        };
        println!(
            "  uplink:     {} declared {} lldp {}{check}",
            u.name,
            n(&u.declared_neighbour),
            n(&u.lldp_neighbour)
        );
    }
}
