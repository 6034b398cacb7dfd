//! What the export has seen of the client its owner expects, so the owner
//! can tell, without asking the client, whether every write the client
//! sent since it attached is in the log.
//!
//! The owner calls [`Export::expect_client`] before it makes the client
//! connect (tandemd: before `blockdev-add` of QEMU's NBD node) and gets a
//! [`ClientToken`]. The first connection to reach the transmission phase
//! after that is *the* client. From then on the export records, once, the
//! first thing that means a write may have been lost on the way: the
//! client's connection ending, a write-type request (WRITE, WRITE_ZEROES,
//! TRIM, FLUSH) answered with an error, or a second client reaching
//! transmission. [`Export::client_check`] reads that without any I/O.
//!
//! [`Export::expect_client`]: crate::Export::expect_client
//! [`Export::client_check`]: crate::Export::client_check

/// Names the client an owner expects; see [`crate::Export::expect_client`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientToken(u64);

/// Why the expected client can no longer vouch for its writes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientFault {
    /// Nobody has connected since the token was handed out.
    #[error("no NBD client has connected to the export")]
    NotConnected,
    /// The client's connection ended.
    #[error("the NBD connection (#{conn}) to the export closed: {why}")]
    Disconnected { conn: u64, why: String },
    /// The export answered one of the client's writes with an error, so
    /// the client's job saw it fail.
    #[error("the export refused a write on connection #{conn}: {what}")]
    Refused { conn: u64, what: String },
    /// Another connection reached transmission while the client was
    /// attached: writes may now arrive on a connection nobody watches.
    #[error("a second NBD client (connection #{conn}) attached to the export")]
    SecondClient { conn: u64 },
    /// A newer [`crate::Export::expect_client`] replaced this token.
    #[error("a newer client is expected on the export")]
    Superseded,
}

/// The export's side of the watch, under its own lock.
#[derive(Debug, Default)]
pub(crate) struct Clients {
    generation: u64,
    /// The connection that is the expected client, once one attached.
    bound: Option<u64>,
    /// The first fault since it attached.
    fault: Option<ClientFault>,
}

impl Clients {
    /// Forgets the previous client: the next connection to attach is the
    /// one watched.
    pub(crate) fn expect(&mut self) -> ClientToken {
        self.generation += 1;
        self.bound = None;
        self.fault = None;
        ClientToken(self.generation)
    }

    /// Connection `conn` entered the transmission phase.
    pub(crate) fn attached(&mut self, conn: u64) {
        match self.bound {
            None => self.bound = Some(conn),
            Some(b) if b == conn => {}
            Some(_) => self.note(ClientFault::SecondClient { conn }),
        }
    }

    /// Connection `conn`, which had attached, ended; every request it read
    /// has been served.
    pub(crate) fn detached(&mut self, conn: u64, why: impl FnOnce() -> String) {
        if self.bound == Some(conn) {
            self.note(ClientFault::Disconnected { conn, why: why() });
        }
    }

    /// A write-type request on `conn` was answered with an error.
    pub(crate) fn refused(&mut self, conn: u64, what: impl FnOnce() -> String) {
        if self.bound == Some(conn) {
            self.note(ClientFault::Refused { conn, what: what() });
        }
    }

    fn note(&mut self, f: ClientFault) {
        self.fault.get_or_insert(f);
    }

    /// `Ok` while the token's client is attached and nothing went wrong.
    pub(crate) fn check(&self, t: ClientToken) -> Result<(), ClientFault> {
        if t.0 != self.generation {
            return Err(ClientFault::Superseded);
        }
        if let Some(f) = &self.fault {
            return Err(f.clone());
        }
        match self.bound {
            Some(_) => Ok(()),
            None => Err(ClientFault::NotConnected),
        }
    }

    /// The connection currently watched, if one attached.
    #[cfg(test)]
    pub(crate) fn bound(&self) -> Option<u64> {
        self.bound
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_connection_after_expect_is_the_client() {
        let mut c = Clients::default();
        // An older connection, attached before the owner asked.
        c.attached(1);
        let t = c.expect();
        assert_eq!(c.check(t), Err(ClientFault::NotConnected));
        c.attached(2);
        assert_eq!(c.check(t), Ok(()));
        assert_eq!(c.bound(), Some(2));
        // The old connection going away is not the client's business.
        c.detached(1, || "old".into());
        c.refused(1, || "old write".into());
        assert_eq!(c.check(t), Ok(()));
    }

    #[test]
    fn a_refused_write_disconnect_or_second_client_fails_the_check_for_good() {
        for hit in 0..3 {
            let mut c = Clients::default();
            let t = c.expect();
            c.attached(7);
            match hit {
                0 => c.refused(7, || "WRITE at 0: ENOSPC".into()),
                1 => c.detached(7, || "EOF".into()),
                _ => c.attached(8),
            }
            let f = c.check(t).unwrap_err();
            // The first fault sticks, whatever follows.
            c.detached(7, || "later".into());
            assert_eq!(c.check(t), Err(f.clone()));
            let text = f.to_string();
            match hit {
                0 => assert!(text.contains("refused a write") && text.contains("ENOSPC")),
                1 => assert!(text.contains("#7") && text.contains("closed")),
                _ => assert!(text.contains("second NBD client")),
            }
        }
    }

    #[test]
    fn a_new_expect_supersedes_the_old_token_and_clears_faults() {
        let mut c = Clients::default();
        let old = c.expect();
        c.attached(1);
        c.detached(1, || "gone".into());
        let new = c.expect();
        assert_eq!(c.check(old), Err(ClientFault::Superseded));
        assert_eq!(c.check(new), Err(ClientFault::NotConnected));
        c.attached(2);
        assert_eq!(c.check(new), Ok(()));
    }
}
