//! Test-only faults that belong to no one subsystem, armed from the
//! command line; a build without the `fault-injection` feature refuses
//! them (it starts with an error, never silently ignores one).

use std::sync::atomic::{AtomicU8, Ordering};

/// `--fault-association`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AssociationFault {
    /// VMs arriving from another host are pre-associated as new ones
    /// (the migrated flag forced to 0).
    New,
    /// VMs arriving from another host come without the source's network
    /// state (the handover is dropped).
    NoHandover,
}

static ASSOCIATION: AtomicU8 = AtomicU8::new(0);

pub fn set_association(f: AssociationFault) -> anyhow::Result<()> {
    // The feature reaches tandemd through output commit's (the tests unify
    // it there): one switch for every test-only hook.
    if !tandem_outcommit::FAULT_INJECTION {
        anyhow::bail!(
            "--fault-association: this tandemd was built without the fault-injection feature"
        );
    }
    tracing::warn!(?f, "FAULT INJECTION: VM port associations altered");
    let v = match f {
        AssociationFault::New => 1,
        AssociationFault::NoHandover => 2,
    };
    ASSOCIATION.store(v, Ordering::Relaxed);
    Ok(())
}

/// Whether migrated VMs are to be associated as new ones.
pub fn associate_as_new() -> bool {
    ASSOCIATION.load(Ordering::Relaxed) == 1
}

/// Whether the source's network state is to be dropped.
pub fn drop_handover() -> bool {
    ASSOCIATION.load(Ordering::Relaxed) == 2
}
