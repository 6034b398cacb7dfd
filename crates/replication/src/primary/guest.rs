//! What the primary's epoch loop needs from the guest it protects.
//!
//! The loop never talks to QEMU directly: it goes through [`Guest`], which
//! the supervisor's [`GuestPort`] implements for a real VM, and which the
//! unit tests implement with a fake (a RAM file, a device-state blob and a
//! record of every stop, resume, fence and lease), so the fencing rules are
//! checked without QEMU.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use tandem_supervisor::{GuestPort, SupervisorError};

/// How the guest's QEMU ended, as far as the backup must know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    /// It exited unexpectedly (or a host signal killed it): nothing runs
    /// the guest here, so the backup may take over at once.
    Crashed,
    /// The guest powered off, or someone asked it to stop: the backup must
    /// not take over.
    ShutDown,
}

/// A failure talking to the guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    /// Anything else an implementation reports (a test's fake guest).
    #[error("{0}")]
    Other(String),
}

/// The device-state save of one checkpoint, running beside the caller.
pub type DeviceStateSave = Pin<Box<dyn Future<Output = Result<Vec<u8>, GuestError>> + Send>>;

/// The guest, stopped for a checkpoint. Other lifecycle operations (a
/// user's pause or stop) wait until [`CheckpointWindow::resume`].
pub trait CheckpointWindow: Send {
    /// Starts saving QEMU's device state and returns at once, so the caller
    /// can collect dirty pages meanwhile. The save must be awaited before
    /// the window is resumed.
    fn spawn_device_state(&self, timeout: Duration) -> DeviceStateSave;
    /// Resumes the guest if the window stopped it.
    fn resume(self) -> impl Future<Output = Result<(), GuestError>> + Send;
}

/// One protected guest, as the epoch loop sees it.
pub trait Guest: Clone + Send + Sync + 'static {
    type Window<'a>: CheckpointWindow + 'a
    where
        Self: 'a;

    fn name(&self) -> &str;
    /// The VM's identity (its UUID, as text): a replica belongs to one.
    fn uuid(&self) -> String;
    /// The shared-memory file QEMU's RAM lives in.
    fn ram_file(&self) -> &Path;
    fn ram_size(&self) -> u64;
    /// QEMU's pid while it runs (page-table trackers read its pagemap).
    fn qemu_pid(&self) -> Option<u32>;
    /// Where QEMU's uffd preload listens, if this guest has one.
    fn uffd_socket(&self) -> Option<std::path::PathBuf> {
        None
    }
    /// The spec as the user wrote it, for defining the VM on the backup.
    fn spec_toml(&self) -> String;
    /// QEMU's monitor connection is gone.
    fn is_closed(&self) -> bool;
    /// How QEMU ended, once that is recorded; `None` while it runs.
    fn exit(&self) -> Option<GuestExit>;

    /// Stops the guest (if it runs) for a checkpoint.
    fn stop_for_checkpoint(
        &self,
    ) -> impl Future<Output = Result<Self::Window<'_>, GuestError>> + Send;

    /// Sets the shim's fence lease: unless renewed, QEMU is frozen at
    /// `deadline_lease_ms` even if tandemd is gone.
    fn renew_lease(&self, deadline_lease_ms: u64) -> std::io::Result<()>;
    /// Ends the lease (nothing to fence, or protection ended).
    fn clear_lease(&self);
    /// Pauses the guest because the backup went silent. Returns whether it
    /// paused a running guest (`false`: it was paused already, and
    /// [`Guest::unfence`] must leave it so).
    fn fence(&self, why: &str) -> impl Future<Output = Result<bool, GuestError>> + Send;
    /// Resumes a guest its fence paused, once the backup has granted it.
    fn unfence(&self) -> impl Future<Output = Result<(), GuestError>> + Send;
}

impl CheckpointWindow for tandem_supervisor::CheckpointWindow<'_> {
    fn spawn_device_state(&self, timeout: Duration) -> DeviceStateSave {
        let job = tandem_supervisor::CheckpointWindow::spawn_device_state(self, timeout);
        Box::pin(async move { job.finish().await.map_err(GuestError::from) })
    }

    async fn resume(self) -> Result<(), GuestError> {
        tandem_supervisor::CheckpointWindow::resume(self)
            .await
            .map_err(GuestError::from)
    }
}

impl Guest for GuestPort {
    type Window<'a> = tandem_supervisor::CheckpointWindow<'a>;

    fn name(&self) -> &str {
        GuestPort::name(self)
    }
    fn uuid(&self) -> String {
        GuestPort::uuid(self).to_string()
    }
    fn ram_file(&self) -> &Path {
        GuestPort::ram_file(self)
    }
    fn ram_size(&self) -> u64 {
        GuestPort::ram_size(self)
    }
    fn qemu_pid(&self) -> Option<u32> {
        GuestPort::qemu_pid(self)
    }
    fn uffd_socket(&self) -> Option<std::path::PathBuf> {
        Some(GuestPort::uffd_socket(self))
    }
    fn spec_toml(&self) -> String {
        GuestPort::spec_toml(self)
    }
    fn is_closed(&self) -> bool {
        GuestPort::is_closed(self)
    }
    fn exit(&self) -> Option<GuestExit> {
        GuestPort::exit_cause(self).map(|cause| {
            if cause.is_crash() {
                GuestExit::Crashed
            } else {
                GuestExit::ShutDown
            }
        })
    }
    async fn stop_for_checkpoint(&self) -> Result<Self::Window<'_>, GuestError> {
        Ok(GuestPort::stop_for_checkpoint(self).await?)
    }
    fn renew_lease(&self, deadline_lease_ms: u64) -> std::io::Result<()> {
        GuestPort::renew_lease(self, deadline_lease_ms)
    }
    fn clear_lease(&self) {
        GuestPort::clear_lease(self)
    }
    async fn fence(&self, why: &str) -> Result<bool, GuestError> {
        Ok(GuestPort::fence(self, why).await?)
    }
    async fn unfence(&self) -> Result<(), GuestError> {
        Ok(GuestPort::unfence(self).await?)
    }
}
