//! What the keeper holds and stashes, and who owns it: a pure state machine over requests,
//! hang-ups and an injected clock (`now`), with no I/O. The server feeds it what it reads and
//! sends what it answers; the tests drive it directly.
//!
//! A client that puts a connection owns it; a client that takes the connections becomes their
//! owner, and their previous owners still connected become its predecessors (superseded: they
//! may no longer stash). A `wait_predecessor` is answered once every predecessor hung up.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use super::protocol::{
    check_connection, check_name, ConnectionInfo, KeeperError, Reply, Request, Sealed, MAX_HELD,
    MAX_RECORD_BYTES, MAX_STASHED, MAX_STASHED_BYTES,
};

/// A connected client, numbered by the server from 1 up.
pub(super) type ClientId = u64;

/// A connection the keeper holds: its descriptor, as put, and who serves it now.
pub(super) struct HeldConnection {
    init: Vec<u8>,
    fd: OwnedFd,
    /// The client that put or last took it, while connected.
    owner: Option<ClientId>,
    /// When the owner hung up, while there is none.
    unowned_since: Option<Instant>,
}

/// A client that took the connections, and whom it waits for.
#[derive(Default)]
struct Successor {
    /// Owners, still connected at the take, of what was taken.
    predecessors: BTreeSet<ClientId>,
    /// How long the taken connections had no owner before the take.
    unserved: Duration,
    /// A `wait_predecessor` is waiting for its reply.
    waiting: bool,
}

/// The keeper's state: held connections by name, successors waiting, stashed records.
#[derive(Default)]
pub(super) struct State {
    held: BTreeMap<String, HeldConnection>,
    successors: BTreeMap<ClientId, Successor>,
    /// Clients whose connections a later client took: their stashes would overwrite the
    /// records of the daemon that now serves.
    superseded: BTreeSet<ClientId>,
    stashed: BTreeMap<String, Sealed>,
    /// Bytes of the records in `stashed`.
    stashed_bytes: usize,
}

impl State {
    /// Carries out `request` from `client`; `None` when the reply comes later (from
    /// [`State::hung_up`]). A `held` reply goes with [`State::descriptors`].
    pub(super) fn handle(
        &mut self,
        client: ClientId,
        request: Request,
        mut fds: Vec<OwnedFd>,
        now: Instant,
    ) -> Result<Option<Reply>, KeeperError> {
        if self.successors.get(&client).is_some_and(|s| s.waiting) {
            return Err(KeeperError::Pending);
        }
        let expected = usize::from(matches!(request, Request::Put { .. }));
        if fds.len() != expected {
            return Err(KeeperError::Descriptors {
                request: request.kind(),
                expected,
                got: fds.len(),
            });
        }
        match request {
            Request::Put { name, init } => {
                check_connection(&name, &init)?;
                if !self.held.contains_key(&name) && self.held.len() >= MAX_HELD {
                    return Err(KeeperError::Full);
                }
                let fd = fds.pop().expect("exactly one descriptor, checked above");
                let replaced = self.held.insert(
                    name.clone(),
                    HeldConnection {
                        init,
                        fd,
                        owner: Some(client),
                        unowned_since: None,
                    },
                );
                tracing::info!(
                    name,
                    client,
                    replaced = replaced.is_some(),
                    held = self.held.len(),
                    "holding a connection"
                );
                Ok(Some(Reply::Done))
            }
            Request::Take => {
                let mut taken = Successor::default();
                for held in self.held.values_mut() {
                    match (held.owner, held.unowned_since) {
                        (Some(owner), _) if owner != client => {
                            taken.predecessors.insert(owner);
                            self.superseded.insert(owner);
                        }
                        (None, Some(since)) => {
                            taken.unserved =
                                taken.unserved.max(now.saturating_duration_since(since));
                        }
                        _ => {}
                    }
                    held.owner = Some(client);
                    held.unowned_since = None;
                }
                tracing::info!(
                    client,
                    connections = self.held.len(),
                    predecessors = taken.predecessors.len(),
                    unserved_ms = taken.unserved.as_millis() as u64,
                    "connections taken"
                );
                self.successors.insert(client, taken);
                Ok(Some(Reply::Held {
                    connections: self
                        .held
                        .iter()
                        .map(|(name, held)| ConnectionInfo {
                            name: name.clone(),
                            init: held.init.clone(),
                        })
                        .collect(),
                }))
            }
            Request::WaitPredecessor => match self.successors.get_mut(&client) {
                Some(s) if !s.predecessors.is_empty() => {
                    s.waiting = true;
                    Ok(None)
                }
                s => Ok(Some(Reply::PredecessorGone {
                    unserved_ms: s.map_or(0, |s| s.unserved.as_millis() as u64),
                })),
            },
            Request::Release { name } => {
                let released = self.held.remove(&name).is_some();
                tracing::info!(
                    name,
                    client,
                    released,
                    held = self.held.len(),
                    "connection released"
                );
                Ok(Some(Reply::Done))
            }
            Request::Stash { .. } | Request::Forget { .. } if self.superseded.contains(&client) => {
                Err(KeeperError::Superseded)
            }
            Request::Stash { name, record } => {
                check_name(&name)?;
                if record.expose().len() > MAX_RECORD_BYTES {
                    return Err(KeeperError::RecordTooLarge(record.expose().len()));
                }
                let replaced = self.stashed.get(&name).map_or(0, |r| r.expose().len());
                let bytes = self.stashed_bytes - replaced + record.expose().len();
                let count = self.stashed.len() + usize::from(!self.stashed.contains_key(&name));
                if count > MAX_STASHED || bytes > MAX_STASHED_BYTES {
                    return Err(KeeperError::StashFull);
                }
                self.stashed_bytes = bytes;
                self.stashed.insert(name, record);
                Ok(Some(Reply::Done))
            }
            Request::Unstash { name } => Ok(Some(Reply::Stashed {
                record: self.stashed.get(&name).cloned(),
            })),
            Request::Forget { name } => {
                if let Some(record) = self.stashed.remove(&name) {
                    self.stashed_bytes -= record.expose().len();
                }
                Ok(Some(Reply::Done))
            }
        }
    }

    /// How many connections are held, and how many of them have no owner connected.
    pub(super) fn held_and_unowned(&self) -> (usize, usize) {
        let unowned = self.held.values().filter(|h| h.owner.is_none()).count();
        (self.held.len(), unowned)
    }

    /// The held descriptors, in the order of a `held` reply.
    pub(super) fn descriptors(&self) -> Vec<BorrowedFd<'_>> {
        self.held.values().map(|h| h.fd.as_fd()).collect()
    }

    /// `client` is gone: what it owned is unowned from `now`. Returns the deferred replies now
    /// due to successors whose last predecessor it was.
    pub(super) fn hung_up(&mut self, client: ClientId, now: Instant) -> Vec<(ClientId, Reply)> {
        for (name, held) in &mut self.held {
            if held.owner == Some(client) {
                tracing::warn!(
                    name,
                    client,
                    "the owner of a held connection hung up; nobody serves it until a daemon takes it"
                );
                held.owner = None;
                held.unowned_since = Some(now);
            }
        }
        self.successors.remove(&client);
        self.superseded.remove(&client);
        let mut due = Vec::new();
        for (id, s) in &mut self.successors {
            if s.predecessors.remove(&client) && s.predecessors.is_empty() && s.waiting {
                s.waiting = false;
                due.push((
                    *id,
                    Reply::PredecessorGone {
                        unserved_ms: s.unserved.as_millis() as u64,
                    },
                ));
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe() -> (OwnedFd, OwnedFd) {
        let (r, w) = std::io::pipe().expect("pipe");
        (r.into(), w.into())
    }
    #[test]
    fn a_put_needs_exactly_one_descriptor_and_a_take_none() {
        let mut state = State::default();
        let now = Instant::now();
        let put = || Request::Put {
            name: "node".into(),
            init: vec![1],
        };
        assert!(matches!(
            state.handle(1, put(), vec![], now),
            Err(KeeperError::Descriptors {
                expected: 1,
                got: 0,
                ..
            })
        ));
        let (r, _w) = pipe();
        assert!(matches!(
            state.handle(1, Request::Take, vec![r], now),
            Err(KeeperError::Descriptors {
                expected: 0,
                got: 1,
                ..
            })
        ));
        assert!(state.held.is_empty());
    }
    #[test]
    fn records_are_stashed_outlive_their_client_and_are_forgotten_on_request() {
        let mut state = State::default();
        let now = Instant::now();
        let record = Sealed::new(r#"{"token":"s.kept-in-memory"}"#.into());
        let stash = Request::Stash {
            name: "v-7".into(),
            record: record.clone(),
        };
        assert_eq!(state.handle(1, stash, vec![], now), Ok(Some(Reply::Done)));
        let unstash = || Request::Unstash { name: "v-7".into() };
        assert!(state.hung_up(1, now).is_empty());
        assert_eq!(
            state.handle(2, unstash(), vec![], now),
            Ok(Some(Reply::Stashed {
                record: Some(record.clone())
            })),
            "a record outlives the daemon that stashed it"
        );
        assert_eq!(
            state.handle(2, unstash(), vec![], now),
            Ok(Some(Reply::Stashed {
                record: Some(record)
            })),
            "reading a record keeps it"
        );
        let forget = Request::Forget { name: "v-7".into() };
        assert_eq!(state.handle(2, forget, vec![], now), Ok(Some(Reply::Done)));
        assert_eq!(
            state.handle(2, unstash(), vec![], now),
            Ok(Some(Reply::Stashed { record: None }))
        );
    }
    #[test]
    fn a_daemon_whose_connections_were_taken_may_no_longer_stash() {
        let mut state = State::default();
        let now = Instant::now();
        let (r, _w) = pipe();
        let put = Request::Put {
            name: "node".into(),
            init: vec![1],
        };
        assert_eq!(state.handle(1, put, vec![r], now), Ok(Some(Reply::Done)));
        let stash = || Request::Stash {
            name: "volume-1".into(),
            record: Sealed::new("r".into()),
        };
        assert_eq!(state.handle(1, stash(), vec![], now), Ok(Some(Reply::Done)));
        assert!(matches!(
            state.handle(2, Request::Take, vec![], now),
            Ok(Some(Reply::Held { .. }))
        ));
        assert_eq!(
            state.handle(1, stash(), vec![], now),
            Err(KeeperError::Superseded),
            "the predecessor's later records would overwrite the successor's"
        );
        let forget = Request::Forget {
            name: "volume-1".into(),
        };
        assert_eq!(
            state.handle(1, forget, vec![], now),
            Err(KeeperError::Superseded)
        );
        assert_eq!(state.handle(2, stash(), vec![], now), Ok(Some(Reply::Done)));
    }
    #[test]
    fn stashed_records_are_bounded() {
        let mut state = State::default();
        let now = Instant::now();
        let stash = |name: &str, len: usize| Request::Stash {
            name: name.into(),
            record: Sealed::new("t".repeat(len)),
        };
        assert_eq!(
            state.handle(1, stash("v-1", MAX_RECORD_BYTES + 1), vec![], now),
            Err(KeeperError::RecordTooLarge(MAX_RECORD_BYTES + 1))
        );
        assert!(matches!(
            state.handle(1, stash("../v", 10), vec![], now),
            Err(KeeperError::Name(_))
        ));
        for i in 0..MAX_STASHED {
            state
                .handle(1, stash(&format!("v-{i}"), 1), vec![], now)
                .unwrap();
        }
        assert_eq!(
            state.handle(1, stash("one-more", 1), vec![], now),
            Err(KeeperError::StashFull)
        );
        assert_eq!(
            state.handle(1, stash("v-0", 2), vec![], now),
            Ok(Some(Reply::Done)),
            "a name kept can always be replaced"
        );
    }
    #[test]
    fn a_take_makes_the_owner_a_predecessor_and_its_hang_up_answers_the_wait() {
        let mut state = State::default();
        let t0 = Instant::now();
        let (r, _w) = pipe();
        let put = Request::Put {
            name: "node".into(),
            init: vec![7],
        };
        assert_eq!(state.handle(1, put, vec![r], t0), Ok(Some(Reply::Done)));
        let Ok(Some(Reply::Held { connections })) = state.handle(2, Request::Take, vec![], t0)
        else {
            panic!("take answers held");
        };
        assert_eq!(connections.len(), 1);
        assert_eq!(state.descriptors().len(), 1);
        assert_eq!(
            state.handle(2, Request::WaitPredecessor, vec![], t0),
            Ok(None)
        );
        assert_eq!(
            state.handle(2, Request::Take, vec![], t0),
            Err(KeeperError::Pending)
        );
        assert_eq!(
            state.hung_up(1, t0 + Duration::from_secs(1)),
            vec![(2, Reply::PredecessorGone { unserved_ms: 0 })]
        );
    }
    #[test]
    fn unserved_time_runs_from_the_owner_hanging_up_to_the_take() {
        let mut state = State::default();
        let t0 = Instant::now();
        let (r, _w) = pipe();
        let put = Request::Put {
            name: "node".into(),
            init: vec![],
        };
        state.handle(1, put, vec![r], t0).unwrap();
        assert!(state.hung_up(1, t0).is_empty());
        state
            .handle(2, Request::Take, vec![], t0 + Duration::from_millis(1500))
            .unwrap();
        assert_eq!(
            state.handle(
                2,
                Request::WaitPredecessor,
                vec![],
                t0 + Duration::from_secs(9)
            ),
            Ok(Some(Reply::PredecessorGone { unserved_ms: 1500 }))
        );
        assert_eq!(
            state.handle(3, Request::WaitPredecessor, vec![], t0),
            Ok(Some(Reply::PredecessorGone { unserved_ms: 0 })),
            "no take: no predecessor"
        );
    }
    #[test]
    fn at_most_max_held_connections_are_held_but_a_name_can_always_be_replaced() {
        let mut state = State::default();
        let now = Instant::now();
        let mut keep = Vec::new();
        for i in 0..=MAX_HELD {
            let (r, w) = pipe();
            keep.push(w);
            let put = Request::Put {
                name: format!("c{}", i.min(MAX_HELD - 1)),
                init: vec![],
            };
            assert_eq!(state.handle(1, put, vec![r], now), Ok(Some(Reply::Done)));
        }
        let (r, _w) = pipe();
        let put = Request::Put {
            name: "one-more".into(),
            init: vec![],
        };
        assert_eq!(state.handle(1, put, vec![r], now), Err(KeeperError::Full));
    }
}
