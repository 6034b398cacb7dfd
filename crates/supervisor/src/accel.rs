//! Choosing the accelerator for `auto`.
//!
//! `/dev/kvm` existing, `KVM_CREATE_VM` working and `query-kvm` saying
//! "enabled" prove nothing: under the PVM module normal guests crawl and die
//! with an emulation failure. So `auto` picks KVM only when the CPU has
//! vmx/svm, a hardware KVM module (`kvm_intel`/`kvm_amd`) is loaded and no
//! `kvm_pvm`, and a bounded probe boot of the guest image reaches userspace.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tandem_api::AccelProbe;
use tandem_vmspec::Accel;

use crate::util::{atomic_write_json, now_unix};

/// What the host says about virtualisation support, read from /proc and /sys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostVirtFacts {
    pub cpu_virt_flag: bool,
    pub kvm_modules: Vec<String>,
    pub dev_kvm: bool,
}

impl HostVirtFacts {
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_virt_flag = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        let kvm_modules = ["kvm", "kvm_intel", "kvm_amd", "kvm_pvm"]
            .iter()
            .filter(|m| Path::new("/sys/module").join(m).exists())
            .map(|m| m.to_string())
            .collect();
        HostVirtFacts {
            cpu_virt_flag,
            kvm_modules,
            dev_kvm: Path::new("/dev/kvm").exists(),
        }
    }
}

/// Why KVM is ruled out without a probe boot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvmRuledOut {
    #[error("no /dev/kvm")]
    NoDevKvm,
    #[error("KVM is the PVM module (kvm_pvm), which cannot run normal guests at usable speed")]
    Pvm,
    #[error("the CPU has no vmx/svm flag")]
    NoCpuFlag,
    #[error("neither kvm_intel nor kvm_amd is loaded")]
    NoHardwareModule,
}

/// The static half of the decision: `Err(reason)` rules KVM out without a
/// probe boot; `Ok(())` means a probe boot must decide.
pub fn static_verdict(f: &HostVirtFacts) -> Result<(), KvmRuledOut> {
    let has = |m: &str| f.kvm_modules.iter().any(|x| x == m);
    if !f.dev_kvm {
        return Err(KvmRuledOut::NoDevKvm);
    }
    if has("kvm_pvm") {
        return Err(KvmRuledOut::Pvm);
    }
    if !f.cpu_virt_flag {
        return Err(KvmRuledOut::NoCpuFlag);
    }
    if !has("kvm_intel") && !has("kvm_amd") {
        return Err(KvmRuledOut::NoHardwareModule);
    }
    Ok(())
}

/// Inputs to a probe boot: the guest image and the bound.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    pub qemu_binary: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub qboot_rom: PathBuf,
    pub timeout: Duration,
    pub work_dir: PathBuf,
}

/// The line the guest prints once its userspace is up.
pub const READY_LINE: &str = "TANDEM-GUEST-READY";

/// Why a probe boot did not show KVM working.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("guest image missing ({}); build it with images/build.sh", kernel.display())]
    NoImage { kernel: PathBuf },
    #[error("{0}")]
    WorkDir(#[source] std::io::Error),
    #[error("cannot start {}: {source}", qemu.display())]
    Spawn {
        qemu: PathBuf,
        source: std::io::Error,
    },
    #[error("probe QEMU exited early ({0}) before userspace")]
    ExitedEarly(std::process::ExitStatus),
    #[error("probe boot did not reach userspace within {0:?}")]
    Timeout(Duration),
}

/// Boots the guest image under KVM and reports whether it reached userspace
/// within the bound. Always kills the QEMU it started.
pub fn probe_boot(cfg: &ProbeConfig) -> Result<Duration, ProbeError> {
    if !cfg.kernel.is_file() || !cfg.initrd.is_file() {
        return Err(ProbeError::NoImage {
            kernel: cfg.kernel.clone(),
        });
    }
    std::fs::create_dir_all(&cfg.work_dir).map_err(ProbeError::WorkDir)?;
    let serial = cfg.work_dir.join("accel-probe.serial");
    let _ = std::fs::remove_file(&serial);
    let start = Instant::now();
    let mut child = std::process::Command::new(&cfg.qemu_binary)
        .args([
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "128",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-display", "none", "-machine", "pc", "-bios"])
        .arg(&cfg.qboot_rom)
        .arg("-kernel")
        .arg(&cfg.kernel)
        .arg("-initrd")
        .arg(&cfg.initrd)
        .args(["-append", "console=ttyS0 loglevel=1 tandem.probe=1"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|source| ProbeError::Spawn {
            qemu: cfg.qemu_binary.clone(),
            source,
        })?;
    let result = loop {
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        if text.contains(READY_LINE) {
            break Ok(start.elapsed());
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Err(ProbeError::ExitedEarly(status));
        }
        if start.elapsed() >= cfg.timeout {
            break Err(ProbeError::Timeout(cfg.timeout));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&serial);
    result
}

/// Identifies the host configuration a cached probe result belongs to.
pub fn cache_key(qemu_version: &str) -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_string();
    let facts = HostVirtFacts::read();
    format!(
        "kernel={} qemu={} cpu={} modules={}",
        release.trim(),
        qemu_version,
        model,
        facts.kvm_modules.join(",")
    )
}

/// Resolves `auto` for this host, reusing the cached result at `cache_file`
/// when the host has not changed.
pub fn resolve_auto(cache_file: &Path, qemu_version: &str, cfg: &ProbeConfig) -> AccelProbe {
    let key = cache_key(qemu_version);
    if let Ok(text) = std::fs::read_to_string(cache_file) {
        if let Ok(cached) = serde_json::from_str::<AccelProbe>(&text) {
            if cached.cache_key == key && cached.probe_timeout_ms == cfg.timeout.as_millis() as u64
            {
                return cached;
            }
        }
    }
    let facts = HostVirtFacts::read();
    let (chosen, reason, probe_boot_outcome) = match static_verdict(&facts) {
        Err(reason) => (Accel::Tcg, reason.to_string(), None),
        Ok(()) => match probe_boot(cfg) {
            Ok(took) => (
                Accel::Kvm,
                format!("hardware KVM; probe boot reached userspace in {took:?}"),
                Some(format!("reached userspace in {} ms", took.as_millis())),
            ),
            Err(why) => (
                Accel::Tcg,
                format!("KVM probe boot failed: {why}"),
                Some(why.to_string()),
            ),
        },
    };
    let probe = AccelProbe {
        chosen: chosen.as_str().to_string(),
        reason,
        cpu_virt_flag: facts.cpu_virt_flag,
        kvm_modules: facts.kvm_modules,
        dev_kvm: facts.dev_kvm,
        probe_boot: probe_boot_outcome,
        probe_timeout_ms: cfg.timeout.as_millis() as u64,
        probed_at: now_unix(),
        cache_key: key,
    };
    if let Err(e) = atomic_write_json(cache_file, &probe) {
        tracing::warn!(
            "cannot cache accelerator probe at {}: {e}",
            cache_file.display()
        );
    }
    probe
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(flag: bool, mods: &[&str], dev: bool) -> HostVirtFacts {
        HostVirtFacts {
            cpu_virt_flag: flag,
            kvm_modules: mods.iter().map(|s| s.to_string()).collect(),
            dev_kvm: dev,
        }
    }

    #[test]
    fn pvm_is_never_trusted() {
        let v = static_verdict(&facts(true, &["kvm", "kvm_intel", "kvm_pvm"], true));
        assert!(v.unwrap_err().to_string().contains("kvm_pvm"));
    }

    #[test]
    fn needs_flag_module_and_device() {
        assert!(static_verdict(&facts(false, &["kvm", "kvm_intel"], true)).is_err());
        assert!(static_verdict(&facts(true, &["kvm"], true)).is_err());
        assert!(static_verdict(&facts(true, &["kvm", "kvm_amd"], false)).is_err());
        assert!(static_verdict(&facts(true, &["kvm", "kvm_amd"], true)).is_ok());
    }
}
