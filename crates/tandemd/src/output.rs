//! Output commit in tandemd: joins a protected VM's switch ports, its
//! gate, and its replication engine.
//!
//! The switch asks the gate about every frame the VM sends (the gate is
//! the ports' [`FrameGate`]); the engine tells the gate when epochs open
//! and commit ([`EpochObserver`]); committed frames go back into the switch
//! through [`Switch::release`], in the order the VM sent them.

use parking_lot::Mutex;
use std::sync::Arc;

use tandem_api::{OutputCounters, OutputRules, RulesChange};
use tandem_outcommit::{Gate, GateConfig, GateMode, Profile, Rule, RuleSet};
use tandem_replication::EpochObserver;
use tandem_switch::port::PortId;
use tandem_switch::switch::{FrameGate, Switch};
use tracing::{info, warn};

pub struct VmOutput {
    vm: String,
    gate: Arc<Gate>,
    switch: Arc<Switch>,
    ports: Vec<PortId>,
    table: Mutex<Table>,
}

struct Table {
    profile: Option<String>,
    rules: RuleSet,
}

/// What a protect request asks of output commit, checked before anything
/// is installed.
pub struct OutputPlan {
    pub config: GateConfig,
    pub profile: Option<String>,
    pub rules: RuleSet,
}

impl OutputPlan {
    pub fn from_request(req: &tandem_api::ProtectRequest) -> Result<OutputPlan, String> {
        let mut config = GateConfig::default();
        if let Some(m) = &req.output_mode {
            config.mode = m.parse()?;
        }
        if let Some(n) = req.hold_max_frames {
            if n == 0 {
                return Err("hold_max_frames must be at least 1".into());
            }
            config.max_frames = n;
        }
        if let Some(n) = req.hold_max_bytes {
            if n < 2048 {
                return Err("hold_max_bytes must be at least 2048 (one frame)".into());
            }
            config.max_bytes = n;
        }
        if req.unsafe_no_clamp {
            // Test-only: honoured when tandem-outcommit is built with the
            // `fault-injection` feature (tandemd's feature of that name, or
            // a workspace test build); refused, never ignored, otherwise.
            config.skip_clamp().map_err(|_| {
                "unsafe_no_clamp: this tandemd was built without the fault-injection feature"
                    .to_string()
            })?;
        }
        let (profile, rules) = table_for(req.profile.as_deref(), req.rules.as_deref())?;
        Ok(OutputPlan {
            config,
            profile,
            rules,
        })
    }
}

/// The rule table a profile and explicit rules make: the explicit rules,
/// then the profile's. Without either, the default profile
/// (`conservative`).
fn table_for(
    profile: Option<&str>,
    rules: Option<&[String]>,
) -> Result<(Option<String>, RuleSet), String> {
    let explicit = match rules {
        Some(r) => Some(RuleSet::from_texts(r).map_err(|e| e.to_string())?),
        None => None,
    };
    let base = match (profile, &explicit) {
        (Some(p), _) => Some(p.parse::<Profile>().map_err(|e| e.to_string())?),
        (None, None) => Some(Profile::Conservative),
        (None, Some(_)) => None,
    };
    // Explicit rules go first: they are the exceptions to the profile
    // (first match wins).
    let mut table = explicit.unwrap_or_default();
    for r in base.map(|p| p.rules().rules().to_vec()).unwrap_or_default() {
        let n = table.rules().len();
        table.insert(n, r);
    }
    Ok((base.map(|p| p.name().to_string()), table))
}

impl VmOutput {
    /// Installs a gate on every switch port of `vm`. None when the VM has
    /// no switch NIC here (its output then is not under output commit).
    pub fn install(
        vm: &str,
        host: &tandem_switch::host::SwitchHost,
        plan: OutputPlan,
    ) -> Option<Arc<VmOutput>> {
        let ports = host.vm_ports(vm);
        if ports.is_empty() {
            return None;
        }
        let macs = ports.iter().map(|(_, mac)| mac.0).collect();
        let gate = Arc::new(Gate::new(
            plan.config.clone(),
            Arc::new(plan.rules.clone()),
            macs,
        ));
        let out = Arc::new(VmOutput {
            vm: vm.to_string(),
            gate,
            switch: host.switch().clone(),
            ports: ports.iter().map(|(id, _)| *id).collect(),
            table: Mutex::new(Table {
                profile: plan.profile,
                rules: plan.rules,
            }),
        });
        for id in &out.ports {
            out.switch
                .set_gate(*id, Some(out.gate.clone() as Arc<dyn FrameGate>));
        }
        if plan.config.mode == GateMode::Off {
            warn!(
                vm,
                "output commit is OFF: clients can see output a failover will contradict"
            );
        }
        if plan.config.skips_clamp() {
            warn!(vm, "TEST ONLY: TCP acknowledgements are not clamped");
        }
        info!(vm, mode = %plan.config.mode, ports = out.ports.len(), "output commit gate installed");
        Some(out)
    }

    fn send(&self, frames: Vec<(PortId, Vec<u8>)>) {
        for (port, frame) in frames {
            self.switch.release(port, &frame);
        }
    }

    /// Whether this gate sits on the ports `vm` has on `host` now (a VM
    /// destroyed and made again has new ports, which this gate never saw).
    pub fn is_current(&self, host: &tandem_switch::host::SwitchHost) -> bool {
        let now: Vec<PortId> = host.vm_ports(&self.vm).iter().map(|(id, _)| *id).collect();
        !now.is_empty() && now == self.ports
    }

    /// Takes the gate off the VM's ports (the VM's output is no longer
    /// under output commit).
    pub fn uninstall(&self) {
        for id in &self.ports {
            self.switch.set_gate(*id, None);
        }
    }

    pub fn rules(&self) -> OutputRules {
        let t = self.table.lock();
        OutputRules {
            vm: self.vm.clone(),
            mode: self.gate.config().mode.to_string(),
            profile: t.profile.clone(),
            rules: t.rules.to_texts(),
        }
    }

    /// Applies one change to the rule table; nothing changes on error.
    pub fn change(&self, change: RulesChange) -> Result<OutputRules, String> {
        let mut t = self.table.lock();
        let mut mode = None;
        let (profile, rules) = match change {
            RulesChange::Set {
                profile,
                rules,
                mode: m,
            } => {
                if let Some(m) = m {
                    mode = Some(m.parse::<GateMode>()?);
                }
                let explicit = (!rules.is_empty()).then_some(rules.as_slice());
                if profile.is_none() && explicit.is_none() {
                    // Only a mode change.
                    (t.profile.clone(), t.rules.clone())
                } else {
                    table_for(profile.as_deref(), explicit)?
                }
            }
            RulesChange::Add { rule, position } => {
                let r: Rule = rule.parse().map_err(|e| format!("{e}"))?;
                let mut rules = t.rules.clone();
                let n = rules.rules().len();
                let at = match position {
                    None => n,
                    Some(p) if (1..=n + 1).contains(&p) => p - 1,
                    Some(p) => return Err(format!("position {p} is outside 1..={}", n + 1)),
                };
                rules.insert(at, r);
                (None, rules)
            }
            RulesChange::Del { position } => {
                let mut rules = t.rules.clone();
                let n = rules.rules().len();
                if !(1..=n).contains(&position) {
                    return Err(format!(
                        "no rule at position {position} (the table has {n})"
                    ));
                }
                rules.remove(position - 1).map_err(|e| e.to_string())?;
                (None, rules)
            }
        };
        if let Some(m) = mode {
            let mut cfg = self.gate.config();
            cfg.mode = m;
            self.gate.set_config(cfg);
            if m == GateMode::Off {
                warn!(vm = %self.vm, "output commit turned OFF");
            }
        }
        self.gate.set_classifier(Arc::new(rules.clone()));
        t.profile = profile;
        t.rules = rules;
        drop(t);
        Ok(self.rules())
    }

    /// The gate's counters, with the rule table it classifies with.
    pub fn counters(&self) -> OutputCounters {
        let mut c = self.gate.counters();
        let t = self.table.lock();
        c.profile = t.profile.clone();
        c.rules = t.rules.len();
        c
    }
}

impl EpochObserver for VmOutput {
    fn epoch_opened(&self, epoch: u64) {
        self.gate.epoch_opened(epoch);
    }

    fn session_started(&self, base: u64, first: u64) {
        self.gate.session_started(base, first);
    }

    fn committed(&self, epoch: u64) {
        let frames = self.gate.commit(epoch);
        self.send(frames);
    }

    fn abandoned(&self) {
        let n = self.gate.discard_uncommitted();
        info!(vm = %self.vm, frames = n, "held output of uncommitted epochs discarded");
    }

    fn ended(&self) {
        let frames = self.gate.release_all();
        self.send(frames);
        self.uninstall();
    }

    fn unprotected(&self) {
        let frames = self.gate.unprotected();
        info!(vm = %self.vm, frames = frames.len(), "protection degraded: held output released, output passes unheld until protection is back");
        self.send(frames);
    }
}
