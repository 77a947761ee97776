//! What one daemon hands its successor of a volume's Vault session and leased values: the
//! records a `SessionStore` keeps (in the keeper, in memory only), as JSON whose field names
//! stay the same across versions, so that an upgraded daemon takes over from an older one.
//! Times are on the node's clock (`NodeTime`), in milliseconds. Tokens and values are read
//! into zeroizing types, and the JSON text of a record is wiped by its holder.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

use super::{Fetched, HandedLease, Lease, NodeTime, Session, SessionStep, Version};
use crate::secret::{to_vec_exact, wipe_json, SecretData, Token};
use crate::spec::SecretPath;

/// A session as recorded.
#[derive(Serialize, Deserialize)]
struct SessionRecord {
    #[serde(serialize_with = "expose_token", deserialize_with = "token")]
    token: Token,
    expires_at_node_ms: Option<u64>,
    full_ttl_ms: u64,
    next: Step,
    next_at_node_ms: Option<u64>,
}

/// `SessionStep` without its time (`next_at_node_ms`).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Step {
    LookUp,
    Renew,
    Replace,
    Idle,
}

/// A leased value as recorded, with its lease.
#[derive(Serialize, Deserialize)]
struct LeaseRecord {
    #[serde(serialize_with = "display", deserialize_with = "secret_path")]
    path: SecretPath,
    lease_id: String,
    duration_ms: u64,
    renewable: bool,
    period_ms: u64,
    ends_at_node_ms: u64,
    next_at_node_ms: Option<u64>,
    changed_at_ms: u64,
    version: Option<u64>,
    #[serde(serialize_with = "data_object", deserialize_with = "secret_data")]
    data: SecretData,
}

/// `session` as a record (JSON text, wiped when dropped).
pub fn session_record(session: &Session) -> Zeroizing<String> {
    let (next, at) = match session.next {
        SessionStep::LookUp(at) => (Step::LookUp, Some(at)),
        SessionStep::Renew(at) => (Step::Renew, Some(at)),
        SessionStep::Replace(at) => (Step::Replace, Some(at)),
        SessionStep::Idle => (Step::Idle, None),
    };
    text(&SessionRecord {
        token: session.token.clone(),
        expires_at_node_ms: session.expires_at.map(node_ms),
        full_ttl_ms: millis(session.full_ttl),
        next,
        next_at_node_ms: at.map(node_ms),
    })
}

/// The session `record` holds, if it is one.
pub fn session_from_record(record: &str) -> Option<Session> {
    let record: SessionRecord = serde_json::from_str(record).ok()?;
    let at = record.next_at_node_ms.map(from_node_ms);
    Some(Session {
        expires_at: record.expires_at_node_ms.map(from_node_ms),
        full_ttl: Duration::from_millis(record.full_ttl_ms),
        next: match record.next {
            Step::LookUp => SessionStep::LookUp(at?),
            Step::Renew => SessionStep::Renew(at?),
            Step::Replace => SessionStep::Replace(at?),
            Step::Idle => SessionStep::Idle,
        },
        token: record.token,
    })
}

/// `leases` as a record (JSON text, wiped when dropped); values without a lease are left out.
pub fn leases_record(leases: &[HandedLease]) -> Zeroizing<String> {
    let records: Vec<LeaseRecord> = leases
        .iter()
        .filter_map(|l| {
            let lease = l.fetched.lease.as_ref()?;
            Some(LeaseRecord {
                path: l.path.clone(),
                lease_id: lease.id.clone(),
                duration_ms: millis(lease.duration),
                renewable: lease.renewable,
                period_ms: millis(l.period),
                ends_at_node_ms: node_ms(l.ends_at),
                next_at_node_ms: l.next_at.map(node_ms),
                changed_at_ms: unix_ms(l.changed_at),
                version: l.fetched.version.map(|v| v.0),
                data: l.fetched.data.clone(),
            })
        })
        .collect();
    text(&records)
}

/// The leased values `record` holds, if it is a list of them.
pub fn leases_from_record(record: &str) -> Option<Vec<HandedLease>> {
    let records: Vec<LeaseRecord> = serde_json::from_str(record).ok()?;
    records
        .into_iter()
        .map(|r| {
            Some(HandedLease {
                path: r.path,
                period: Duration::from_millis(r.period_ms),
                ends_at: from_node_ms(r.ends_at_node_ms),
                next_at: r.next_at_node_ms.map(from_node_ms),
                changed_at: UNIX_EPOCH.checked_add(Duration::from_millis(r.changed_at_ms))?,
                fetched: Fetched {
                    version: r.version.map(Version),
                    data: r.data,
                    lease: Some(Lease {
                        id: r.lease_id,
                        duration: Duration::from_millis(r.duration_ms),
                        renewable: r.renewable,
                    }),
                },
            })
        })
        .collect()
}

/// `record` as JSON text, written once at its exact size (no copy left behind by growing).
fn text(record: &impl Serialize) -> Zeroizing<String> {
    let bytes = to_vec_exact(record);
    Zeroizing::new(String::from_utf8(bytes).expect("serde_json writes UTF-8"))
}

fn expose_token<S: Serializer>(token: &Token, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(token.expose())
}

fn token<'de, D: Deserializer<'de>>(d: D) -> Result<Token, D::Error> {
    String::deserialize(d).map(Token::new)
}

fn display<S: Serializer>(path: &SecretPath, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(path)
}

fn secret_path<'de, D: Deserializer<'de>>(d: D) -> Result<SecretPath, D::Error> {
    let text = String::deserialize(d)?;
    // A certificate's path comes back without its request; the volume's spec supplies it.
    SecretPath::recorded(&text).map_err(serde::de::Error::custom)
}

/// The value as the JSON object Vault returned (parsed from its rendering, then wiped).
fn data_object<S: Serializer>(data: &SecretData, s: S) -> Result<S::Ok, S::Error> {
    let json = data.render(None).map(|b| b.expose()).unwrap_or(b"{}");
    let mut value: serde_json::Value =
        serde_json::from_slice(json).map_err(serde::ser::Error::custom)?;
    let written = value.serialize(s);
    wipe_json(&mut value);
    written
}

fn secret_data<'de, D: Deserializer<'de>>(d: D) -> Result<SecretData, D::Error> {
    // `from_json` wipes the map it is given.
    serde_json::Map::deserialize(d).map(SecretData::from_json)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn node_ms(at: NodeTime) -> u64 {
    millis(at.as_duration())
}

fn from_node_ms(ms: u64) -> NodeTime {
    NodeTime::from_duration(Duration::from_millis(ms))
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, millis)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn at(ms: u64) -> NodeTime {
        NodeTime::from_duration(Duration::from_millis(ms))
    }

    /// A renewable database credential with `password`, as a volume hands it over.
    pub(crate) fn lease(password: &str) -> HandedLease {
        HandedLease {
            path: SecretPath::parse("database/creds/app").unwrap(),
            fetched: Fetched {
                version: Some(Version(3)),
                data: SecretData::from_pairs([("username", "v-app-1"), ("password", password)]),
                lease: Some(Lease {
                    id: "database/creds/app/abc".into(),
                    duration: Duration::from_secs(60),
                    renewable: true,
                }),
            },
            period: Duration::from_secs(45),
            ends_at: at(1_700_000_045_000),
            next_at: Some(at(1_700_000_030_000)),
            changed_at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
        }
    }

    fn same_lease(a: &HandedLease, b: &HandedLease) {
        assert_eq!(
            (&a.path, a.period, a.ends_at, a.next_at, a.changed_at),
            (&b.path, b.period, b.ends_at, b.next_at, b.changed_at)
        );
        assert_eq!(a.fetched.version, b.fetched.version);
        assert_eq!(a.fetched.lease, b.fetched.lease);
        assert_eq!(a.fetched.data, b.fetched.data);
    }

    #[test]
    fn a_session_survives_its_record_to_the_millisecond() {
        for next in [
            SessionStep::LookUp(at(1_700_000_000_001)),
            SessionStep::Renew(at(1_700_000_000_002)),
            SessionStep::Replace(at(1_700_000_000_003)),
            SessionStep::Idle,
        ] {
            for expires_at in [None, Some(at(1_700_000_003_600))] {
                let session = Session {
                    token: Token::new("s.handed-over".into()),
                    expires_at,
                    full_ttl: Duration::from_secs(3600),
                    next,
                };
                let record = session_record(&session);
                assert_eq!(session_from_record(&record), Some(session));
            }
        }
    }

    #[test]
    fn leased_values_survive_their_record() {
        let record = leases_record(&[lease("p@ss\"w\nord")]);
        let back = leases_from_record(&record).expect("a list of leases");
        assert_eq!(back.len(), 1);
        same_lease(&back[0], &lease("p@ss\"w\nord"));
    }

    /// Records as daemons before these record types wrote them (keys in JSON object order):
    /// a successor of such a daemon must take them over.
    #[test]
    fn records_of_earlier_daemons_are_read() {
        let session = r#"{"expires_at_node_ms":1700000003600,"full_ttl_ms":3600000,"next":"renew","next_at_node_ms":1700000000002,"token":"s.handed-over"}"#;
        assert_eq!(
            session_from_record(session),
            Some(Session {
                token: Token::new("s.handed-over".into()),
                expires_at: Some(at(1_700_000_003_600)),
                full_ttl: Duration::from_secs(3600),
                next: SessionStep::Renew(at(1_700_000_000_002)),
            })
        );
        let leases = r#"[{"changed_at_ms":1700000000123,"data":{"password":"pw","username":"v-app-1"},"duration_ms":60000,"ends_at_node_ms":1700000045000,"lease_id":"database/creds/app/abc","next_at_node_ms":1700000030000,"path":"database/creds/app","period_ms":45000,"renewable":true,"version":3}]"#;
        let back = leases_from_record(leases).expect("a list of leases");
        same_lease(&back[0], &lease("pw"));
    }

    #[test]
    fn records_that_are_no_session_are_refused() {
        for text in [
            "not json",
            "{}",
            r#"{"token":"s.x","expires_at_ms":null,"full_ttl_ms":1,"next":"renew"}"#,
            r#"{"token":"s.x","expires_at_ms":null,"full_ttl_ms":1,"next":"dance","next_at_ms":1}"#,
            r#"{"token":7,"expires_at_ms":null,"full_ttl_ms":1,"next":"idle"}"#,
        ] {
            assert_eq!(session_from_record(text), None, "{text}");
        }
    }
}
