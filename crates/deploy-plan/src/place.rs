//! What the operator asks for, and where the copies go (step 200 of the
//! seed: hosts, copies per host, datastores).
//!
//! Room is checked here, before a byte is copied: a host without room is
//! an error up front, not a failure half-way.

use serde::{Deserialize, Serialize};

use crate::error::{non_negative, PlanError};
use crate::matrix::Matrix;

/// A place to keep copies: a directory on one host, or a store several
/// hosts mount (then a copy on it is readable by all of them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Datastore {
    /// Its name in the cluster inventory (`--datastore` picks by it).
    pub id: String,
    /// Room left before this deployment, as the inventory reports it.
    pub free_bytes: u64,
    /// The hosts that mount it; more than one makes it shared.
    pub hosts: Vec<String>,
}

impl Datastore {
    /// A datastore only `host` mounts.
    pub fn local(id: impl Into<String>, host: impl Into<String>, free_bytes: u64) -> Datastore {
        Datastore {
            id: id.into(),
            free_bytes,
            hosts: vec![host.into()],
        }
    }

    /// A datastore several hosts mount: one copy on it serves them all.
    pub fn shared<S: Into<String>>(
        id: impl Into<String>,
        hosts: impl IntoIterator<Item = S>,
        free_bytes: u64,
    ) -> Datastore {
        Datastore {
            id: id.into(),
            free_bytes,
            hosts: hosts.into_iter().map(Into::into).collect(),
        }
    }

    /// Whether more than one host mounts it.
    pub fn is_shared(&self) -> bool {
        self.hosts.len() > 1
    }

    pub(crate) fn attached(&self, host: &str) -> bool {
        self.hosts.iter().any(|h| h == host)
    }
}

/// How many copies each host gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PerHost {
    /// `K` copies on every target host (`--per-host K`).
    Count(u32),
    /// `total` copies spread by free room (`--per-host auto`): each copy
    /// goes to the datastore with the most room left, so hosts get copies
    /// in proportion to their free capacity (the seed lets the engine
    /// choose the count "from each host's free capacity" without a
    /// formula).
    Auto {
        /// The number of copies in all.
        total: u32,
    },
}

/// A deployment request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// The image's size: what each copy needs on a datastore.
    pub image_bytes: u64,
    /// Where the image is, on the source host.
    pub source_datastore: String,
    /// The datastores copies may go to (`--datastore` chooses), and the
    /// source's.
    pub datastores: Vec<Datastore>,
    /// How many copies go to each host.
    pub per_host: PerHost,
    /// One copy within a datastore (a reflink or an overlay makes it
    /// near 0). The seed gives no number.
    pub local_copy_time: f64,
    /// One copy from one datastore of a host to another of the same host.
    pub cross_datastore_time: f64,
}

impl Request {
    pub(crate) fn datastore(&self, id: &str) -> Result<&Datastore, PlanError> {
        self.datastores
            .iter()
            .find(|d| d.id == id)
            .ok_or_else(|| PlanError::UnknownDatastore(id.to_string()))
    }

    /// Checks the request against the matrix's hosts.
    pub fn validate(&self, matrix: &Matrix) -> Result<(), PlanError> {
        if self.image_bytes == 0 {
            return Err(PlanError::EmptyImage);
        }
        non_negative("the local copy time", self.local_copy_time)?;
        non_negative("the cross-datastore copy time", self.cross_datastore_time)?;
        for (i, d) in self.datastores.iter().enumerate() {
            if self.datastores[..i].iter().any(|o| o.id == d.id) {
                return Err(PlanError::DuplicateDatastore(d.id.clone()));
            }
            if d.hosts.is_empty() {
                return Err(PlanError::DetachedDatastore(d.id.clone()));
            }
            for h in &d.hosts {
                matrix.index(h)?;
            }
        }
        let src = self.datastore(&self.source_datastore)?;
        if !src.attached(matrix.source()) {
            return Err(PlanError::NotAttached {
                datastore: src.id.clone(),
                host: matrix.source().to_string(),
            });
        }
        match self.per_host {
            PerHost::Count(0) | PerHost::Auto { total: 0 } => Err(PlanError::ZeroCount),
            _ => Ok(()),
        }
    }
}

/// The copies one host gets on one datastore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatastoreCopies {
    /// The datastore's id.
    pub datastore: String,
    /// How many copies it gets.
    pub copies: u32,
}

/// Where one target host's copies go; only hosts with copies appear.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPlacement {
    /// The target host.
    pub host: String,
    /// Its datastores that get copies, in the request's order.
    pub datastores: Vec<DatastoreCopies>,
}

impl HostPlacement {
    /// The host's copies on all its datastores.
    pub fn copies(&self) -> u32 {
        self.datastores.iter().map(|d| d.copies).sum()
    }

    /// The copies placed on one datastore.
    pub fn on(&self, datastore: &str) -> u32 {
        self.datastores
            .iter()
            .find(|d| d.datastore == datastore)
            .map_or(0, |d| d.copies)
    }
}

/// Where every copy goes: decided once, before anything is copied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The target hosts that get copies, in the matrix's order.
    pub hosts: Vec<HostPlacement>,
}

impl Placement {
    /// Checks a placement against the matrix and the request: a stored or
    /// hand-made placement is input like any other, and the schedule
    /// relies on every datastore named being attached to its host.
    pub fn validate(&self, matrix: &Matrix, request: &Request) -> Result<(), PlanError> {
        let mut total: u64 = 0;
        for (i, hp) in self.hosts.iter().enumerate() {
            matrix.index(&hp.host)?;
            if self.hosts[..i].iter().any(|o| o.host == hp.host) {
                return Err(PlanError::DuplicateHost(hp.host.clone()));
            }
            if hp.datastores.is_empty() {
                return Err(PlanError::NoDatastore(hp.host.clone()));
            }
            for (j, d) in hp.datastores.iter().enumerate() {
                if hp.datastores[..j]
                    .iter()
                    .any(|o| o.datastore == d.datastore)
                {
                    return Err(PlanError::DuplicateDatastore(d.datastore.clone()));
                }
                let ds = request.datastore(&d.datastore)?;
                if !ds.attached(&hp.host) {
                    return Err(PlanError::NotAttached {
                        datastore: d.datastore.clone(),
                        host: hp.host.clone(),
                    });
                }
                total = total.saturating_add(u64::from(d.copies));
            }
        }
        if total > MAX_COPIES {
            return Err(PlanError::TooManyCopies {
                requested: total,
                limit: MAX_COPIES,
            });
        }
        Ok(())
    }

    /// One host's share, if it gets copies.
    pub fn host(&self, host: &str) -> Option<&HostPlacement> {
        self.hosts.iter().find(|h| h.host == host)
    }

    /// The number of copies in all.
    pub fn total(&self) -> u32 {
        self.hosts.iter().map(HostPlacement::copies).sum()
    }
}

/// More copies than this in one deployment is a typing error, not a
/// plan (and would make a schedule of millions of steps).
pub const MAX_COPIES: u64 = 100_000;

/// Decides how many copies go on which datastore of which target host, and
/// refuses when a datastore lacks room (a shared datastore's room is
/// counted once for all the hosts that use it).
///
/// Within a host each copy goes to the datastore with the most room left
/// (ties: the order given), which splits equal datastores evenly: FIG 4's
/// six copies on two datastores become 3 + 3.
pub fn place(matrix: &Matrix, request: &Request) -> Result<Placement, PlanError> {
    request.validate(matrix)?;
    let image = request.image_bytes;
    let mut room: Vec<u64> = request.datastores.iter().map(|d| d.free_bytes).collect();
    let targets: Vec<&str> = matrix.targets().collect();
    // counts[target][datastore]
    let mut counts = vec![vec![0u32; request.datastores.len()]; targets.len()];
    let attached = |t: &str| -> Vec<usize> {
        (0..request.datastores.len())
            .filter(|&d| request.datastores[d].attached(t))
            .collect()
    };
    let requested = match request.per_host {
        PerHost::Count(k) => u64::from(k) * targets.len() as u64,
        PerHost::Auto { total } => u64::from(total),
    };
    if requested > MAX_COPIES {
        return Err(PlanError::TooManyCopies {
            requested,
            limit: MAX_COPIES,
        });
    }
    match request.per_host {
        PerHost::Count(k) => {
            for (ti, t) in targets.iter().enumerate() {
                let mine = attached(t);
                if mine.is_empty() {
                    return Err(PlanError::NoDatastore(t.to_string()));
                }
                for _ in 0..k {
                    // The most room left; the first on a tie.
                    let best = mine
                        .iter()
                        .copied()
                        .reduce(|a, b| if room[b] > room[a] { b } else { a })
                        .unwrap_or(mine[0]);
                    if room[best] < image {
                        return Err(PlanError::NoRoom {
                            host: t.to_string(),
                            datastore: request.datastores[best].id.clone(),
                            free_bytes: room[best],
                            image_bytes: image,
                        });
                    }
                    room[best] -= image;
                    counts[ti][best] += 1;
                }
            }
        }
        PerHost::Auto { total } => {
            let pairs: Vec<(usize, usize)> = (0..targets.len())
                .flat_map(|t| attached(targets[t]).into_iter().map(move |d| (t, d)))
                .collect();
            for placed in 0..total {
                // The datastore with the most room left; on a tie the host
                // with fewer copies so far, then the order given.
                let host_copies = |t: usize| counts[t].iter().sum::<u32>();
                let best = pairs
                    .iter()
                    .copied()
                    .filter(|&(_, d)| room[d] >= image)
                    .min_by(|&(ta, da), &(tb, db)| {
                        room[db]
                            .cmp(&room[da])
                            .then(host_copies(ta).cmp(&host_copies(tb)))
                            .then(ta.cmp(&tb))
                            .then(da.cmp(&db))
                    });
                let Some((t, d)) = best else {
                    return Err(PlanError::NotEnoughRoom {
                        placed,
                        requested: total,
                    });
                };
                room[d] -= image;
                counts[t][d] += 1;
            }
        }
    }
    let hosts = targets
        .iter()
        .zip(&counts)
        .filter(|(_, c)| c.iter().any(|n| *n > 0))
        .map(|(t, c)| HostPlacement {
            host: t.to_string(),
            datastores: c
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(d, n)| DatastoreCopies {
                    datastore: request.datastores[d].id.clone(),
                    copies: *n,
                })
                .collect(),
        })
        .collect();
    Ok(Placement { hosts })
}
