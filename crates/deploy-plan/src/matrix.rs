//! The deployment-time matrix (seed 002, FIG 3B) and the preferred paths
//! read from it.
//!
//! One row per directed direct link, numbered as the seed numbers them:
//! first the source's links to each target, then each target's links to
//! the other targets, in host order (for S, H1, H2, H3: S→H1, S→H2, S→H3,
//! H1→H2, H1→H3, H2→H1, H2→H3, H3→H1, H3→H2). A removed link keeps the
//! numbers of the others, as the struck-through rows 4 and 6 of FIG 12B do.
//! Nothing is ever copied to the source, so there are no links into it.
//!
//! A link's time is the time one whole image takes over that link alone:
//! the seed's model, where parallel sends do not share bandwidth. Real
//! hosts share one NIC; [`HostSpec::egress_slots`] bounds how many copies a
//! host sends at once (the schedule queues the rest), and is off by
//! default so that the seed's examples come out as the seed computes them.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::PlanError;

/// The time one image of `image_bytes` takes at `bytes_per_second`:
/// `image / rate`, the formula the seed's background example implies
/// (50 GB at 20 MB/s is 2500 s).
pub fn transfer_time(image_bytes: u64, bytes_per_second: f64) -> Result<f64, PlanError> {
    if !(bytes_per_second.is_finite() && bytes_per_second > 0.0) {
        return Err(PlanError::BadRate(bytes_per_second));
    }
    let time = image_bytes as f64 / bytes_per_second;
    if time.is_finite() {
        Ok(time)
    } else {
        Err(PlanError::BadRate(bytes_per_second))
    }
}

/// One host of the matrix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostSpec {
    /// The host's name in the cluster inventory.
    pub name: String,
    /// How many network copies this host may send at once at its links'
    /// full speed; more wait their turn. `None`: every link is independent
    /// (the seed's model). On one shared NIC, sending in turn is never
    /// slower for the last copy and faster for the first, which then
    /// becomes a source sooner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_slots: Option<u32>,
}

/// One directed link and its deployment time, as stored and shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkTime {
    /// The sending host.
    pub from: String,
    /// The receiving host.
    pub to: String,
    /// The time one whole image takes over this link alone.
    pub time: f64,
}

/// The serialised form: hosts (the source first) and the links present.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct MatrixRepr {
    hosts: Vec<HostSpec>,
    links: Vec<LinkTime>,
}

/// Hosts (index 0 the source) and the measured time of each direct link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "MatrixRepr", into = "MatrixRepr")]
pub struct Matrix {
    hosts: Vec<HostSpec>,
    /// `times[from * n + to]`; `None` where there is no (working) link.
    times: Vec<Option<f64>>,
}

impl TryFrom<MatrixRepr> for Matrix {
    type Error = PlanError;

    fn try_from(repr: MatrixRepr) -> Result<Self, PlanError> {
        let mut hosts = repr.hosts.into_iter();
        let source = hosts.next().ok_or(PlanError::NoTargets)?;
        let rest: Vec<HostSpec> = hosts.collect();
        let mut m = Matrix::new(source.name.clone(), rest.iter().map(|h| h.name.clone()))?;
        for h in std::iter::once(&source).chain(&rest) {
            m.set_egress_slots(&h.name, h.egress_slots)?;
        }
        for l in repr.links {
            m.set_time(&l.from, &l.to, l.time)?;
        }
        Ok(m)
    }
}

impl From<Matrix> for MatrixRepr {
    fn from(m: Matrix) -> Self {
        MatrixRepr {
            links: m.links(),
            hosts: m.hosts,
        }
    }
}

impl Matrix {
    /// A matrix without links: add them with [`Matrix::set_time`] or
    /// [`Matrix::set_rate`].
    pub fn new<S: Into<String>>(
        source: impl Into<String>,
        targets: impl IntoIterator<Item = S>,
    ) -> Result<Matrix, PlanError> {
        let mut hosts = vec![HostSpec {
            name: source.into(),
            egress_slots: None,
        }];
        for t in targets {
            hosts.push(HostSpec {
                name: t.into(),
                egress_slots: None,
            });
        }
        for (i, h) in hosts.iter().enumerate() {
            if h.name.is_empty() {
                return Err(PlanError::EmptyHostName);
            }
            if hosts[..i].iter().any(|o| o.name == h.name) {
                return Err(PlanError::DuplicateHost(h.name.clone()));
            }
        }
        if hosts.len() < 2 {
            return Err(PlanError::NoTargets);
        }
        let n = hosts.len();
        Ok(Matrix {
            hosts,
            times: vec![None; n * n],
        })
    }

    /// The host holding the image at the start.
    pub fn source(&self) -> &str {
        &self.hosts[0].name
    }

    /// The target hosts, in the order given.
    pub fn targets(&self) -> impl Iterator<Item = &str> {
        self.hosts[1..].iter().map(|h| h.name.as_str())
    }

    /// Every host, the source first.
    pub fn hosts(&self) -> &[HostSpec] {
        &self.hosts
    }

    /// The number of hosts, the source included.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Never true: a matrix has a source and at least one target.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// The host's position (0 for the source).
    pub fn index(&self, host: &str) -> Result<usize, PlanError> {
        self.hosts
            .iter()
            .position(|h| h.name == host)
            .ok_or_else(|| PlanError::UnknownHost(host.to_string()))
    }

    pub(crate) fn name(&self, index: usize) -> &str {
        &self.hosts[index].name
    }

    pub(crate) fn time_at(&self, from: usize, to: usize) -> Option<f64> {
        self.times[from * self.hosts.len() + to]
    }

    pub(crate) fn slots_at(&self, host: usize) -> Option<u32> {
        self.hosts[host].egress_slots
    }

    /// The deployment time of the direct link, if there is one.
    pub fn time(&self, from: &str, to: &str) -> Result<Option<f64>, PlanError> {
        Ok(self.time_at(self.index(from)?, self.index(to)?))
    }

    fn link_index(&self, from: &str, to: &str) -> Result<usize, PlanError> {
        let (f, t) = (self.index(from)?, self.index(to)?);
        if f == t {
            return Err(PlanError::SelfLink(from.to_string()));
        }
        if t == 0 {
            return Err(PlanError::LinkIntoSource {
                from: from.to_string(),
                to: to.to_string(),
            });
        }
        Ok(f * self.hosts.len() + t)
    }

    /// Sets (or changes: the seed's event 610) a link's deployment time.
    pub fn set_time(&mut self, from: &str, to: &str, time: f64) -> Result<(), PlanError> {
        let i = self.link_index(from, to)?;
        if !(time.is_finite() && time >= 0.0) {
            return Err(PlanError::BadTime {
                from: from.to_string(),
                to: to.to_string(),
                time,
            });
        }
        self.times[i] = Some(time);
        Ok(())
    }

    /// Sets a link's time from a measured rate: `image / rate`.
    pub fn set_rate(
        &mut self,
        from: &str,
        to: &str,
        image_bytes: u64,
        bytes_per_second: f64,
    ) -> Result<(), PlanError> {
        let time = transfer_time(image_bytes, bytes_per_second)?;
        self.set_time(from, to, time)
    }

    /// Takes a directed link out (a failure); `false` if it was not there.
    pub fn remove_link(&mut self, from: &str, to: &str) -> Result<bool, PlanError> {
        let i = self.link_index(from, to)?;
        Ok(self.times[i].take().is_some())
    }

    /// Limits how many copies `host` sends at once (`None`: no limit, the
    /// seed's independent links). Zero would stop the host for good, so it
    /// is refused.
    pub fn set_egress_slots(&mut self, host: &str, slots: Option<u32>) -> Result<(), PlanError> {
        let i = self.index(host)?;
        if slots == Some(0) {
            return Err(PlanError::ZeroEgress(host.to_string()));
        }
        self.hosts[i].egress_slots = slots;
        Ok(())
    }

    /// The links present, in row order.
    pub fn links(&self) -> Vec<LinkTime> {
        self.row_order()
            .filter_map(|(f, t)| {
                self.time_at(f, t).map(|time| LinkTime {
                    from: self.name(f).to_string(),
                    to: self.name(t).to_string(),
                    time,
                })
            })
            .collect()
    }

    /// Every possible link `(from, to)` in the seed's row order.
    fn row_order(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let n = self.hosts.len();
        (0..n).flat_map(move |f| (1..n).filter(move |t| *t != f).map(move |t| (f, t)))
    }

    /// Shortest paths from `roots` (all at distance 0) over the live hosts.
    pub(crate) fn shortest(&self, roots: &[usize], alive: &[bool]) -> ShortestPaths {
        let n = self.hosts.len();
        let mut label: Vec<Option<(f64, u32)>> = vec![None; n];
        let mut pred: Vec<Option<usize>> = vec![None; n];
        let mut done = vec![false; n];
        for &r in roots {
            if alive[r] {
                label[r] = Some((0.0, 0));
            }
        }
        // O(n²) Dijkstra: host counts are small and it needs no heap of
        // floats. The label is (time, hops), compared in that order, and a
        // predecessor is replaced only by a strictly better label or an
        // equal one from a lower index: ties go to fewer hops, then to the
        // lowest host index (reference §2.7), so the result is the same
        // whatever order links were entered in.
        loop {
            let next = (0..n)
                .filter(|&v| !done[v])
                .filter_map(|v| label[v].map(|l| (l, v)))
                .min_by(|(a, ai), (b, bi)| {
                    a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(ai.cmp(bi))
                });
            let Some(((d, h), u)) = next else { break };
            done[u] = true;
            for v in 1..n {
                if done[v] || !alive[v] || v == u {
                    continue;
                }
                let Some(t) = self.time_at(u, v) else {
                    continue;
                };
                let cand = (d + t, h + 1);
                let better = match label[v] {
                    None => true,
                    Some(old) => match cand.0.total_cmp(&old.0).then(cand.1.cmp(&old.1)) {
                        std::cmp::Ordering::Less => true,
                        std::cmp::Ordering::Equal => pred[v].is_some_and(|p| u < p),
                        std::cmp::Ordering::Greater => false,
                    },
                };
                if better {
                    label[v] = Some(cand);
                    pred[v] = Some(u);
                }
            }
        }
        ShortestPaths { label, pred }
    }

    /// The matrix with its Preferred and Precondition columns, rooted at
    /// the source (FIG 3B).
    pub fn routes(&self) -> RouteTable {
        let alive = vec![true; self.hosts.len()];
        self.route_table(&[0], &alive)
    }

    /// The same, rooted at `roots` (the hosts that hold a complete copy
    /// when the source is gone) over the live hosts only.
    pub(crate) fn route_table(&self, roots: &[usize], alive: &[bool]) -> RouteTable {
        let sp = self.shortest(roots, alive);
        let dist = |h: usize| sp.label[h].map(|l| l.0);
        let rows = self
            .row_order()
            .enumerate()
            .filter_map(|(row, (f, t))| {
                let time = self.time_at(f, t)?;
                if !alive[f] || !alive[t] {
                    return None;
                }
                // "Preferred": on *some* shortest path from the root to a
                // target (every one of a tie, as rows 5 and 7 of FIG 3B).
                let preferred = !roots.contains(&t)
                    && match (dist(f), dist(t)) {
                        (Some(df), Some(dt)) => same_time(df + time, dt),
                        _ => false,
                    };
                let precondition =
                    (preferred && !roots.contains(&f)).then(|| self.name(f).to_string());
                Some(RouteRow {
                    row: row + 1,
                    from: self.name(f).to_string(),
                    to: self.name(t).to_string(),
                    time,
                    preferred,
                    precondition,
                })
            })
            .collect();
        let paths = (0..self.hosts.len())
            .filter(|h| !roots.contains(h) && alive[*h])
            .map(|h| sp.route(self, h))
            .collect();
        RouteTable {
            roots: roots.iter().map(|r| self.name(*r).to_string()).collect(),
            rows,
            paths,
        }
    }

    /// Step 210: the preferred path from every host (the source and each
    /// target) to every other target: n² paths for n targets.
    pub fn all_pairs(&self) -> Vec<Route> {
        let alive = vec![true; self.hosts.len()];
        let n = self.hosts.len();
        let mut out = Vec::with_capacity(n * n);
        for from in 0..n {
            let sp = self.shortest(&[from], &alive);
            for to in (1..n).filter(|t| *t != from) {
                out.push(sp.route(self, to));
            }
        }
        out
    }
}

/// Equal within rounding: times computed from rates are not exact sums.
pub(crate) fn same_time(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

pub(crate) struct ShortestPaths {
    pub(crate) label: Vec<Option<(f64, u32)>>,
    pub(crate) pred: Vec<Option<usize>>,
}

impl ShortestPaths {
    fn route(&self, m: &Matrix, to: usize) -> Route {
        let mut hops = Vec::new();
        if self.label[to].is_some() {
            let mut at = Some(to);
            while let Some(h) = at {
                hops.push(m.name(h).to_string());
                at = self.pred[h];
                if hops.len() > m.len() {
                    break; // cannot happen: predecessors form a tree
                }
            }
            hops.reverse();
        }
        Route {
            from: hops.first().cloned().unwrap_or_default(),
            to: m.name(to).to_string(),
            time: self.label[to].map(|l| l.0),
            hops,
        }
    }
}

/// One row of the matrix as FIG 3B shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteRow {
    /// The seed's row number (1-based, stable when links are removed).
    pub row: usize,
    /// The sending host.
    pub from: String,
    /// The receiving host.
    pub to: String,
    /// The link's deployment time.
    pub time: f64,
    /// On some shortest path from the root to some target.
    pub preferred: bool,
    /// The host that must hold a complete copy before this link is used
    /// ("VM deployed on …"); `None` for the root's links and for links
    /// that are not preferred.
    pub precondition: Option<String>,
}

/// The chosen path to one host and its total time; `time` is `None` (and
/// `hops` empty) when the host cannot be reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Route {
    /// Where the path starts (a root, or the host asked about).
    pub from: String,
    /// The host the path leads to.
    pub to: String,
    /// The path's total deployment time.
    pub time: Option<f64>,
    /// Every host on the path, both ends included.
    pub hops: Vec<String>,
}

/// The matrix with its Preferred and Precondition columns, and the chosen
/// path to each host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteTable {
    /// Where paths start: the source, or, once it is gone, the hosts that
    /// hold a complete copy.
    pub roots: Vec<String>,
    /// One row per live direct link, in the seed's row order.
    pub rows: Vec<RouteRow>,
    /// The chosen path to each live host that is not a root.
    pub paths: Vec<Route>,
}

impl RouteTable {
    /// The row of the link `from → to`, if the link is there.
    pub fn row(&self, from: &str, to: &str) -> Option<&RouteRow> {
        self.rows.iter().find(|r| r.from == from && r.to == to)
    }

    /// The shortest total time from the roots to `to`.
    pub fn distance(&self, to: &str) -> Option<f64> {
        self.paths.iter().find(|p| p.to == to).and_then(|p| p.time)
    }

    /// The chosen path to `to`.
    pub fn path(&self, to: &str) -> Option<&Route> {
        self.paths.iter().find(|p| p.to == to)
    }
}

impl fmt::Display for RouteTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:>4}  {:<24} {:>10}  {:<9}  precondition",
            "row", "link", "time", "preferred"
        )?;
        for r in &self.rows {
            let link = format!("{} -> {}", r.from, r.to);
            let pre = match &r.precondition {
                Some(h) => format!("copy complete on {h}"),
                None => "-".to_string(),
            };
            let yes = if r.preferred { "yes" } else { "no" };
            writeln!(
                f,
                "{:>4}  {:<24} {:>10}  {:<9}  {}",
                r.row,
                link,
                fmt_time(r.time),
                yes,
                pre
            )?;
        }
        writeln!(f)?;
        writeln!(f, "{:<16} {:>10}  route", "host", "time")?;
        for p in &self.paths {
            match p.time {
                Some(t) => writeln!(
                    f,
                    "{:<16} {:>10}  {}",
                    p.to,
                    fmt_time(t),
                    p.hops.join(" -> ")
                )?,
                None => writeln!(f, "{:<16} {:>10}  no route", p.to, "-")?,
            }
        }
        Ok(())
    }
}

impl fmt::Display for Matrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.routes().fmt(f)
    }
}

/// Times as the operator reads them: integers without decimals.
pub(crate) fn fmt_time(t: f64) -> String {
    if t.fract() == 0.0 && t.abs() < 1e15 {
        format!("{t:.0}")
    } else {
        format!("{t:.3}")
    }
}
