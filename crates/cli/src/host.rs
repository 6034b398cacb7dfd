//! `tandem host …`: this host as tandemd sees it.

use clap::Subcommand;
use tandem_api::HostInfo;

use crate::print_json;

#[derive(Subcommand, Debug)]
pub enum HostCmd {
    /// QEMU version, accelerator decision and its evidence.
    Info,
    /// The cluster's hosts, through the manager: join, list, show, remove.
    #[command(flatten)]
    Member(crate::cluster::MemberCmd),
}

pub async fn run(client: &tandem_api::Client, cmd: HostCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        HostCmd::Info => {
            let h: HostInfo = client.get("/v1/host").await?;
            if json {
                return print_json(&h);
            }
            print_host(&h);
            Ok(())
        }
        HostCmd::Member(c) => crate::cluster::run_member(c, json).await,
    }
}

fn print_host(h: &HostInfo) {
    println!("host:          {}", h.hostname);
    println!("tandem:        {}", h.tandem_version);
    println!("qemu:          {} ({})", h.qemu_version, h.qemu_binary);
    println!("state dir:     {}", h.state_dir);
    println!("vms:           {}", h.vms);
    println!("accelerator:   auto = {}", h.accel.chosen);
    println!("  reason:      {}", h.accel.reason);
    println!("  cpu vmx/svm: {}", yes_no(h.accel.cpu_virt_flag));
    println!("  /dev/kvm:    {}", yes_no(h.accel.dev_kvm));
    println!(
        "  modules:     {}",
        if h.accel.kvm_modules.is_empty() {
            "none".to_string()
        } else {
            h.accel.kvm_modules.join(", ")
        }
    );
    println!(
        "  probe boot:  {} (bound {} ms)",
        h.accel.probe_boot.as_deref().unwrap_or("not needed"),
        h.accel.probe_timeout_ms
    );
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}
