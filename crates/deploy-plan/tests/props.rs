//! Properties of the planner on random matrices and random event
//! sequences, checked against a small executor that does what each plan
//! says (starts what is due, completes what finishes) while links change
//! and fail and hosts die.

use std::collections::BTreeMap;

use proptest::prelude::*;
use tandem_deploy_plan::{
    Action, Datastore, Deployment, Event, Matrix, PerHost, Plan, PlanError, Request, Via,
};

const GIB: u64 = 1 << 30;

fn host(i: usize) -> String {
    if i == 0 {
        "S".to_string()
    } else {
        format!("H{i}")
    }
}

/// A random network: 2 to 5 hosts (the source first), each directed link
/// present with a time of 1 to 30 or missing, maybe an egress limit per
/// host, and 1 or 2 local datastores per target.
#[derive(Debug, Clone)]
struct Net {
    n: usize,
    links: Vec<Option<u8>>,
    slots: Vec<Option<u32>>,
    two_datastores: Vec<bool>,
    per_host: u32,
    local_time: u8,
    cross_time: u8,
}

fn net(with_slots: bool) -> impl Strategy<Value = Net> {
    (2usize..=5).prop_flat_map(move |n| {
        let link = prop_oneof![1 => Just(None), 4 => (1u8..=30).prop_map(Some)];
        let slot = if with_slots {
            prop_oneof![Just(None), (1u32..=2).prop_map(Some)].boxed()
        } else {
            Just(None).boxed()
        };
        (
            proptest::collection::vec(link, n * n),
            proptest::collection::vec(slot, n),
            proptest::collection::vec(any::<bool>(), n),
            1u32..=3,
            0u8..=3,
            0u8..=3,
        )
            .prop_map(
                move |(links, slots, two_datastores, per_host, local_time, cross_time)| Net {
                    n,
                    links,
                    slots,
                    two_datastores,
                    per_host,
                    local_time,
                    cross_time,
                },
            )
    })
}

impl Net {
    fn matrix(&self) -> Matrix {
        let mut m = Matrix::new("S", (1..self.n).map(host)).unwrap();
        for f in 0..self.n {
            for t in 1..self.n {
                if f != t {
                    if let Some(time) = self.links[f * self.n + t] {
                        m.set_time(&host(f), &host(t), f64::from(time)).unwrap();
                    }
                }
            }
            m.set_egress_slots(&host(f), self.slots[f]).unwrap();
        }
        m
    }

    fn request(&self) -> Request {
        let mut datastores = vec![Datastore::local("S-ds", "S", 100 * GIB)];
        for h in 1..self.n {
            datastores.push(Datastore::local(
                format!("{}-a", host(h)),
                host(h),
                100 * GIB,
            ));
            if self.two_datastores[h] {
                datastores.push(Datastore::local(
                    format!("{}-b", host(h)),
                    host(h),
                    100 * GIB,
                ));
            }
        }
        Request {
            image_bytes: GIB,
            source_datastore: "S-ds".into(),
            datastores,
            per_host: PerHost::Count(self.per_host),
            local_copy_time: f64::from(self.local_time),
            cross_datastore_time: f64::from(self.cross_time),
        }
    }
}

/// Shortest times from the hosts in `roots` over the links present among
/// live hosts: a plain Bellman–Ford, written apart from the crate's own
/// Dijkstra so that it can check it.
fn distances(m: &Matrix, roots: &[usize], alive: &[bool]) -> Vec<Option<f64>> {
    let n = m.len();
    let mut d: Vec<Option<f64>> = (0..n)
        .map(|h| (roots.contains(&h) && alive[h]).then_some(0.0))
        .collect();
    for _ in 0..n {
        for f in 0..n {
            for t in 0..n {
                if f == t || !alive[f] || !alive[t] {
                    continue;
                }
                let (Some(df), Ok(Some(time))) = (d[f], m.time(&host(f), &host(t))) else {
                    continue;
                };
                if d[t].is_none_or(|dt| df + time < dt) {
                    d[t] = Some(df + time);
                }
            }
        }
    }
    d
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
}

/// Invariants every plan keeps, whatever happened before it.
fn check_plan(d: &Deployment, plan: &Plan) -> Result<(), TestCaseError> {
    let n = d.matrix.len();
    let alive: Vec<bool> = (0..n)
        .map(|h| !d.progress.failed_hosts.contains(&host(h)))
        .collect();
    // Hosts holding a complete copy now: the live source and live hosts
    // with a finished copy.
    let held: Vec<usize> = (0..n)
        .filter(|&h| {
            alive[h]
                && (h == 0
                    || d.progress
                        .copies
                        .iter()
                        .any(|c| c.host == host(h) && c.complete > 0))
        })
        .collect();
    let reach = distances(&d.matrix, &held, &alive);

    if plan.abort.is_some() {
        prop_assert!(
            held.is_empty(),
            "aborted while {held:?} hold copies\n{plan}"
        );
        let copies = plan.steps.iter().any(|s| {
            matches!(
                s.action,
                Action::NetworkCopy { .. } | Action::LocalCopy { .. }
            )
        });
        prop_assert!(!copies, "copies planned in an abort\n{}", plan);
        return Ok(());
    }
    prop_assert!(!held.is_empty(), "no copy anywhere, yet no abort\n{plan}");

    for s in &plan.steps {
        prop_assert!(s.start.is_finite() && s.finish >= s.start, "{plan}");
        prop_assert!(plan.makespan >= s.finish, "{plan}");
        if !s.running {
            prop_assert!(s.start >= plan.now, "a step in the past\n{plan}");
        }
        // What a step may start from now: a complete copy, on the live
        // source's datastore or reported complete by the executor.
        let complete = |h: &str, ds: &str| {
            (h == "S" && ds == "S-ds" && !d.progress.failed_hosts.contains(&host(0)))
                || d.progress
                    .copies
                    .iter()
                    .any(|c| c.host == h && c.datastore == ds && c.complete > 0)
        };
        let copies_from = match &s.action {
            Action::NetworkCopy {
                from,
                from_datastore,
                ..
            } => Some((from, from_datastore)),
            Action::LocalCopy { host: h, datastore } => Some((h, datastore)),
            Action::CrossDatastoreCopy {
                host: h,
                from_datastore,
                ..
            } => Some((h, from_datastore)),
            _ => None,
        };
        if let Some((h, ds)) = copies_from {
            match &s.waits_for {
                None => prop_assert!(
                    complete(h, ds),
                    "{} starts from {h}:{ds}, which holds no complete copy\n{plan}",
                    s.action
                ),
                Some(w) => {
                    prop_assert!(!s.running);
                    prop_assert!(w.host == *h && w.datastore == *ds);
                    prop_assert!(!complete(h, ds), "waits for a copy it has\n{plan}");
                }
            }
        }
        match &s.action {
            // Never through a host before it holds a complete copy.
            Action::NetworkCopy { from, to, .. } => {
                let ready = plan.ready_at(from);
                let held_now = plan
                    .ready
                    .iter()
                    .any(|r| r.host == *from && r.via == Via::Held);
                // A transfer under way started in the past, from a host
                // that holds its copy now ("ready" is then `now`).
                prop_assert!(
                    if s.running {
                        held_now
                    } else {
                        ready.is_some_and(|r| r <= s.start + 1e-9)
                    },
                    "{from} sends at {} but is ready at {ready:?}\n{plan}",
                    s.start
                );
                prop_assert!(
                    d.matrix.time(from, to).unwrap().is_some(),
                    "no link\n{plan}"
                );
                prop_assert!(!d.progress.failed_hosts.contains(from));
                prop_assert!(!d.progress.failed_hosts.contains(to));
            }
            Action::LocalCopy { host: h, .. } | Action::CrossDatastoreCopy { host: h, .. } => {
                let ready = plan.ready_at(h);
                prop_assert!(ready.is_some_and(|r| r <= s.start + 1e-9), "{plan}");
            }
            _ => {}
        }
    }

    // Every live target is held, planned for, or reported unreachable —
    // exactly one of these, and unreachable exactly when no live route
    // leads to it from a host holding a copy.
    for h in 1..n {
        let name = host(h);
        let nets = plan
            .network_copies()
            .filter(|(_, to, _)| *to == name)
            .count();
        let unreachable = plan.unreachable.contains(&name);
        if !alive[h] {
            prop_assert!(
                plan.failed.contains(&name),
                "{name} dead, not reported\n{plan}"
            );
            prop_assert_eq!(nets, 0);
            prop_assert!(plan.ready_at(&name).is_none());
            continue;
        }
        if held.contains(&h) {
            prop_assert_eq!(nets, 0, "{} holds a copy and gets another\n{}", name, plan);
            prop_assert!(!unreachable);
            continue;
        }
        if reach[h].is_some() {
            prop_assert!(!unreachable, "{name} reachable, reported not\n{plan}");
            prop_assert_eq!(nets, 1, "{} gets {} network copies\n{}", name, nets, plan);
            let via = plan.ready.iter().find(|r| r.host == name).map(|r| &r.via);
            prop_assert!(matches!(via, Some(Via::Network { .. })), "{plan}");
            // No earlier than any route allows (transfers in flight may
            // bring it sooner).
            let at = plan.ready_at(&name).unwrap();
            prop_assert!(at >= plan.now);
            if d.progress.transfers.is_empty() {
                prop_assert!(at + 1e-6 >= plan.now + reach[h].unwrap(), "{plan}");
            }
        } else {
            prop_assert!(
                unreachable,
                "{name} cannot be reached, not reported\n{plan}"
            );
            prop_assert_eq!(nets, 0);
        }
    }
    // Partial files on live hosts are deleted.
    for p in &d.progress.partials {
        if !d.progress.failed_hosts.contains(&p.host) {
            prop_assert!(
                plan.steps.iter().any(|s| matches!(&s.action,
                    Action::DeletePartial { host: h, datastore } if *h == p.host && *datastore == p.datastore)),
                "partial on {} kept\n{}",
                p.host,
                plan
            );
        }
    }
    Ok(())
}

/// The executor's side: local copies it is making, and when they end.
struct Sim {
    d: Deployment,
    locals: Vec<(String, String, f64)>,
    last: Plan,
    aborted: bool,
}

impl Sim {
    fn new(d: Deployment) -> Result<Sim, TestCaseError> {
        let last = d.plan().unwrap();
        check_plan(&d, &last)?;
        Ok(Sim {
            d,
            locals: Vec::new(),
            last,
            aborted: false,
        })
    }

    fn apply(&mut self, at: f64, e: &Event) -> Result<bool, TestCaseError> {
        match self.d.apply(at, e) {
            Ok(plan) => {
                check_plan(&self.d, &plan)?;
                self.aborted = plan.abort.is_some();
                self.last = plan;
                Ok(true)
            }
            Err(err) => {
                // Refusals leave the deployment as it was.
                let again = self.d.plan().unwrap();
                prop_assert_eq!(&again, &self.last, "changed by a refused {:?}: {}", e, err);
                Ok(false)
            }
        }
    }

    /// Does everything the plan says may start now, one step at a time
    /// (each re-plans), as the executor would.
    fn start_due(&mut self) -> Result<(), TestCaseError> {
        for _ in 0..500 {
            if self.aborted {
                return Ok(());
            }
            let now = self.last.now;
            let Some(step) = self.last.due().next().cloned() else {
                return Ok(());
            };
            let e = match &step.action {
                Action::NetworkCopy {
                    from,
                    to,
                    to_datastore,
                    ..
                } => Event::TransferStarted {
                    from: from.clone(),
                    to: to.clone(),
                    datastore: to_datastore.clone(),
                },
                Action::LocalCopy { host, datastore }
                | Action::CrossDatastoreCopy {
                    host,
                    to_datastore: datastore,
                    ..
                } => {
                    self.locals
                        .push((host.clone(), datastore.clone(), step.finish));
                    Event::LocalCopyStarted {
                        host: host.clone(),
                        datastore: datastore.clone(),
                    }
                }
                Action::CancelTransfer { from, to } => Event::TransferFailed {
                    from: from.clone(),
                    to: to.clone(),
                },
                Action::DeletePartial { host, datastore } => Event::PartialDeleted {
                    host: host.clone(),
                    datastore: datastore.clone(),
                },
                Action::Abort { .. } => {
                    self.aborted = true;
                    return Ok(());
                }
            };
            prop_assert!(self.apply(now, &e)?, "the plan's own step {e:?} refused");
        }
        prop_assert!(
            false,
            "the plan never stops asking for steps\n{}\n{:#?}",
            self.last,
            self.d.progress
        );
        Ok(())
    }

    /// Moves time to the next finish and reports it; `false` when nothing
    /// is running.
    fn advance(&mut self, observed: bool) -> Result<bool, TestCaseError> {
        let net = self
            .last
            .steps
            .iter()
            .filter(|s| s.running)
            .map(|s| s.finish)
            .fold(f64::INFINITY, f64::min);
        let local = self
            .locals
            .iter()
            .map(|l| l.2)
            .fold(f64::INFINITY, f64::min);
        let at = net.min(local);
        if !at.is_finite() {
            // Nothing runs; maybe a send is queued on the clock.
            let queued = self
                .last
                .steps
                .iter()
                .filter(|s| !s.running && s.waits_for.is_none())
                .map(|s| s.start)
                .fold(f64::INFINITY, f64::min);
            if queued.is_finite() && queued > self.last.now {
                prop_assert!(self.apply(queued, &Event::Tick)?);
                return Ok(true);
            }
            return Ok(false);
        }
        let at = at.max(self.last.now);
        if local <= net {
            let i = self.locals.iter().position(|l| l.2 == local).unwrap();
            let (h, ds, _) = self.locals.remove(i);
            if !self.d.progress.failed_hosts.contains(&h) {
                let e = Event::LocalCopyCompleted {
                    host: h,
                    datastore: ds,
                };
                prop_assert!(self.apply(at, &e)?);
            }
        } else {
            let step = self
                .last
                .steps
                .iter()
                .find(|s| s.running && s.finish == net)
                .cloned()
                .unwrap();
            let Action::NetworkCopy { from, to, .. } = step.action else {
                unreachable!("only network copies run");
            };
            let e = Event::TransferCompleted {
                observed: observed.then_some(at - step.start),
                from,
                to,
            };
            prop_assert!(self.apply(at, &e)?, "completion refused");
        }
        Ok(true)
    }

    fn run_to_end(&mut self) -> Result<(), TestCaseError> {
        for i in 0..2000 {
            self.start_due()?;
            if self.aborted || !self.advance(i % 2 == 0)? {
                return Ok(());
            }
        }
        prop_assert!(false, "the deployment never ends");
        Ok(())
    }
}

/// A random event, by host numbers taken modulo the host count.
#[derive(Debug, Clone)]
enum Ev {
    Advance(u8),
    LinkTime(usize, usize, u8),
    LinkFailed(usize, usize),
    LinkDown(usize, usize),
    HostFailed(usize),
    Progress(usize, u8),
    TransferFailed(usize),
}

fn ev() -> impl Strategy<Value = Ev> {
    prop_oneof![
        4 => (1u8..=3).prop_map(Ev::Advance),
        2 => (0usize..5, 0usize..5, 0u8..=40).prop_map(|(a, b, t)| Ev::LinkTime(a, b, t)),
        1 => (0usize..5, 0usize..5).prop_map(|(a, b)| Ev::LinkFailed(a, b)),
        1 => (0usize..5, 0usize..5).prop_map(|(a, b)| Ev::LinkDown(a, b)),
        1 => (0usize..5).prop_map(Ev::HostFailed),
        1 => (0usize..5, 0u8..=100).prop_map(|(i, p)| Ev::Progress(i, p)),
        1 => (0usize..5).prop_map(Ev::TransferFailed),
    ]
}

fn to_event(sim: &Sim, ev: &Ev) -> Option<Event> {
    let n = sim.d.matrix.len();
    let transfer = |i: usize| {
        let ts = &sim.d.progress.transfers;
        (!ts.is_empty()).then(|| ts[i % ts.len()].clone())
    };
    Some(match *ev {
        Ev::Advance(_) => return None,
        Ev::LinkTime(a, b, t) => Event::LinkTime {
            from: host(a % n),
            to: host(b % n),
            time: f64::from(t),
        },
        Ev::LinkFailed(a, b) => Event::LinkFailed {
            a: host(a % n),
            b: host(b % n),
        },
        Ev::LinkDown(a, b) => Event::LinkDown {
            from: host(a % n),
            to: host(b % n),
        },
        Ev::HostFailed(h) => Event::HostFailed { host: host(h % n) },
        Ev::Progress(i, p) => {
            let t = transfer(i)?;
            Event::TransferProgress {
                from: t.from,
                to: t.to,
                done_fraction: f64::from(p) / 100.0,
            }
        }
        Ev::TransferFailed(i) => {
            let t = transfer(i)?;
            Event::TransferFailed {
                from: t.from,
                to: t.to,
            }
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// On the seed's model (independent links) every host gets its copy at
    /// its shortest-path time from the source, over exactly one network
    /// copy, and the makespan is no less than the farthest host plus one
    /// local copy where more copies are wanted.
    #[test]
    fn fresh_plan_is_shortest_paths(net in net(false)) {
        let m = net.matrix();
        let Ok(d) = Deployment::new(m.clone(), net.request(), 0.0) else {
            // Refused only when some host has no route.
            let alive = vec![true; net.n];
            prop_assert!(distances(&m, &[0], &alive).iter().any(Option::is_none));
            return Ok(());
        };
        let plan = d.plan().unwrap();
        check_plan(&d, &plan)?;
        let dist = distances(&m, &[0], &vec![true; net.n]);
        let mut bound = 0.0f64;
        for (h, dh) in dist.iter().enumerate().skip(1) {
            let dh = dh.unwrap();
            let at = plan.ready_at(&host(h)).unwrap();
            prop_assert!(close(at, dh), "{} at {at}, shortest {dh}\n{plan}", host(h));
            let extra = if net.per_host > 1 {
                f64::from(net.local_time.min(net.cross_time))
            } else {
                0.0
            };
            bound = bound.max(dh + extra);
        }
        prop_assert!(plan.makespan + 1e-9 >= bound, "makespan {} < bound {bound}\n{plan}", plan.makespan);
        // The Preferred column: a link is preferred exactly when it lies
        // on some shortest path from the source.
        for r in &plan.routes.rows {
            let (f, t) = (d.matrix.index(&r.from).unwrap(), d.matrix.index(&r.to).unwrap());
            let on = dist[f].is_some_and(|df| close(df + r.time, dist[t].unwrap()));
            prop_assert_eq!(r.preferred, on, "row {:?}", r);
            prop_assert_eq!(r.precondition.is_some(), on && f != 0);
        }
        // Stored and read back, the deployment plans the same.
        let json = serde_json::to_string(&d).unwrap();
        let back: Deployment = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back.plan().unwrap(), plan);
    }

    /// With egress limits a host never sends more copies at once than it
    /// may, and the makespan still respects the shortest-path bound.
    #[test]
    fn egress_limits_are_kept(net in net(true)) {
        let m = net.matrix();
        let Ok(d) = Deployment::new(m.clone(), net.request(), 0.0) else { return Ok(()) };
        let plan = d.plan().unwrap();
        check_plan(&d, &plan)?;
        for h in 0..net.n {
            let Some(slots) = net.slots[h] else { continue };
            let sends: Vec<(f64, f64)> = plan
                .network_copies()
                .filter(|(f, _, _)| *f == host(h))
                .map(|(_, _, s)| (s.start, s.finish))
                .collect();
            for &(at, _) in &sends {
                let busy = sends.iter().filter(|(s, f)| *s <= at && at < *f).count();
                prop_assert!(busy <= slots as usize, "{} sends {busy} at {at}\n{plan}", host(h));
            }
        }
        let dist = distances(&m, &[0], &vec![true; net.n]);
        let far = dist.iter().flatten().fold(0.0f64, |a, b| a.max(*b));
        prop_assert!(plan.makespan + 1e-9 >= far);
    }

    /// Random events (link times change, links and hosts fail, transfers
    /// break, progress is reported) while an executor follows each plan:
    /// every plan keeps the invariants, and once the events stop the
    /// deployment finishes every live host a route reaches and leaves no
    /// partial file on a live host.
    #[test]
    fn replanning_reaches_every_live_host(
        net in net(true),
        events in proptest::collection::vec(ev(), 0..12),
    ) {
        let Ok(d) = Deployment::new(net.matrix(), net.request(), 0.0) else { return Ok(()) };
        let mut sim = Sim::new(d)?;
        for ev in &events {
            sim.start_due()?;
            if sim.aborted {
                break;
            }
            if let Ev::Advance(k) = ev {
                for _ in 0..*k {
                    sim.advance(*k == 2)?;
                }
                continue;
            }
            if let Some(e) = to_event(&sim, ev) {
                let now = sim.last.now;
                sim.apply(now, &e)?;
            }
        }
        // Who can still be reached once the events stop.
        let d = &sim.d;
        let n = d.matrix.len();
        let alive: Vec<bool> = (0..n).map(|h| !d.progress.failed_hosts.contains(&host(h))).collect();
        let held: Vec<usize> = (0..n)
            .filter(|&h| alive[h] && (h == 0 || d.progress.copies.iter().any(|c| c.host == host(h) && c.complete > 0)))
            .collect();
        let reach = distances(&d.matrix, &held, &alive);
        let unreachable = sim.last.unreachable.clone();

        sim.start_due()?;
        sim.run_to_end()?;
        let d = &sim.d;
        let mut complete: BTreeMap<(String, String), u32> = BTreeMap::new();
        for c in &d.progress.copies {
            *complete.entry((c.host.clone(), c.datastore.clone())).or_default() += c.complete;
        }
        for h in 1..n {
            let name = host(h);
            if !alive[h] {
                continue;
            }
            if reach[h].is_some() {
                let hp = d.placement.host(&name).unwrap();
                for dc in &hp.datastores {
                    let got = complete.get(&(name.clone(), dc.datastore.clone())).copied().unwrap_or(0);
                    prop_assert_eq!(got, dc.copies, "{}:{} has {} of {}\n{}", name, dc.datastore, got, dc.copies, sim.last);
                }
            } else {
                prop_assert!(unreachable.contains(&name), "{name} unreachable, not reported");
            }
        }
        prop_assert!(d.progress.partials.iter().all(|p| d.progress.failed_hosts.contains(&p.host)),
            "partials left: {:?}", d.progress.partials);
        prop_assert!(d.progress.transfers.iter().all(|t|
            d.progress.failed_hosts.contains(&t.from) || d.progress.failed_hosts.contains(&t.to)),
            "transfers left: {:?}", d.progress.transfers);
    }

    /// Nonsense numbers are refused with an error, never a panic, and
    /// never stored.
    #[test]
    fn bad_numbers_are_refused(
        time in prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(f64::NEG_INFINITY), -1e9f64..-1e-9],
        which in 0usize..6,
    ) {
        let net = Net {
            n: 3,
            links: vec![Some(5); 9],
            slots: vec![None; 3],
            two_datastores: vec![false; 3],
            per_host: 2,
            local_time: 1,
            cross_time: 1,
        };
        let mut d = Deployment::new(net.matrix(), net.request(), 0.0).unwrap();
        d.apply(0.0, &Event::TransferStarted { from: "S".into(), to: "H1".into(), datastore: "H1-a".into() }).unwrap();
        let before = d.clone();
        let r = match which {
            0 => d.apply(1.0, &Event::LinkTime { from: "S".into(), to: "H1".into(), time }),
            1 => d.apply(time, &Event::HostFailed { host: "H2".into() }),
            2 => d.apply(1.0, &Event::TransferProgress { from: "S".into(), to: "H1".into(), done_fraction: time }),
            3 => d.apply(1.0, &Event::TransferCompleted { from: "S".into(), to: "H1".into(), observed: Some(time) }),
            4 => {
                let mut req = net.request();
                req.local_copy_time = time;
                Deployment::new(net.matrix(), req, 0.0).map(|_| unreachable!())
            }
            _ => Deployment::new(net.matrix(), net.request(), time).map(|_| unreachable!()),
        };
        prop_assert!(r.is_err());
        prop_assert_eq!(d, before);
        let mut m = net.matrix();
        prop_assert!(m.set_time("S", "H1", time).is_err());
        prop_assert!(m.set_rate("S", "H1", GIB, time).is_err());
    }
}

#[test]
fn unknown_names_and_zero_counts_are_errors() {
    let mut m = Matrix::new("S", ["H1"]).unwrap();
    m.set_time("S", "H1", 1.0).unwrap();
    let req = Request {
        image_bytes: GIB,
        source_datastore: "S-ds".into(),
        datastores: vec![
            Datastore::local("S-ds", "S", GIB),
            Datastore::local("H1-a", "H1", 3 * GIB),
        ],
        per_host: PerHost::Count(2),
        local_copy_time: 0.0,
        cross_datastore_time: 0.0,
    };
    let mut d = Deployment::new(m.clone(), req.clone(), 0.0).unwrap();
    assert_eq!(
        d.apply(1.0, &Event::HostFailed { host: "H9".into() }),
        Err(PlanError::UnknownHost("H9".into()))
    );
    assert_eq!(
        d.apply(0.5, &Event::HostFailed { host: "H1".into() })
            .map(|p| p.failed),
        Ok(vec!["H1".to_string()])
    );
    assert!(matches!(
        d.apply(0.1, &Event::HostFailed { host: "S".into() }),
        Err(PlanError::TimeBackwards { .. })
    ));

    let zero = Request {
        per_host: PerHost::Count(0),
        ..req.clone()
    };
    assert_eq!(
        Deployment::new(m.clone(), zero, 0.0),
        Err(PlanError::ZeroCount)
    );
    let full = Request {
        per_host: PerHost::Count(4),
        ..req.clone()
    };
    assert!(matches!(
        Deployment::new(m.clone(), full, 0.0),
        Err(PlanError::NoRoom { .. })
    ));
    let mut cut = m.clone();
    cut.remove_link("S", "H1").unwrap();
    assert_eq!(
        Deployment::new(cut, req.clone(), 0.0),
        Err(PlanError::NoRoute("H1".into()))
    );
    assert!(matches!(
        Matrix::new("S", Vec::<String>::new()),
        Err(PlanError::NoTargets)
    ));
    assert!(matches!(
        Matrix::new("S", ["H1", "H1"]),
        Err(PlanError::DuplicateHost(_))
    ));
}
