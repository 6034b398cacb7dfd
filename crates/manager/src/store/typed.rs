//! Typed records above the byte store: JSON in a versioned envelope, and
//! read-modify-write on compare-and-swap.
//!
//! Every record is stored as `{"kind": K, "schema": N, "data": {...}}`.
//! A reader refuses a record of another kind (a key holding the wrong
//! thing) or of a newer schema than it knows (written by a newer manager),
//! instead of silently dropping fields it does not understand. Older
//! schemas are read with serde defaults for fields added since.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{CasOutcome, Expect, Revision, Store, StoreError};

/// A type kept in the store.
pub trait Record: Serialize + DeserializeOwned + Send + Sync {
    /// The envelope's `kind`.
    const KIND: &'static str;
    /// The newest schema this code writes and reads.
    const SCHEMA: u32;
}

/// A record and the revision it was read at.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    pub value: T,
    pub revision: Revision,
}

#[derive(Serialize)]
struct EnvelopeOut<'a, T> {
    kind: &'a str,
    schema: u32,
    data: &'a T,
}

#[derive(Deserialize)]
struct EnvelopeIn {
    kind: String,
    schema: u32,
    data: serde_json::Value,
}

pub fn encode<T: Record>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(&EnvelopeOut {
        kind: T::KIND,
        schema: T::SCHEMA,
        data: value,
    })
    .map_err(|e| StoreError::Backend(format!("encoding a {} record: {e}", T::KIND)))
}

pub fn decode<T: Record>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    let bad = |detail: String| StoreError::Decode {
        key: key.to_string(),
        detail,
    };
    let env: EnvelopeIn = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    if env.kind != T::KIND {
        return Err(bad(format!(
            "holds a {:?} record, not {:?}",
            env.kind,
            T::KIND
        )));
    }
    if env.schema > T::SCHEMA {
        return Err(StoreError::Schema {
            key: key.to_string(),
            found: env.schema,
            known: T::SCHEMA,
        });
    }
    serde_json::from_value(env.data).map_err(|e| bad(e.to_string()))
}

pub async fn get<T: Record>(
    store: &dyn Store,
    key: &str,
) -> Result<Option<Versioned<T>>, StoreError> {
    match store.get(key).await? {
        None => Ok(None),
        Some(e) => Ok(Some(Versioned {
            value: decode(&e.key, &e.value)?,
            revision: e.revision,
        })),
    }
}

/// Every record under `prefix`, in key order. One undecodable record fails
/// the whole list: it means damage or a newer manager, not something to skip.
pub async fn list<T: Record>(
    store: &dyn Store,
    prefix: &str,
) -> Result<Vec<Versioned<T>>, StoreError> {
    store
        .list(prefix)
        .await?
        .into_iter()
        .map(|e| {
            Ok(Versioned {
                value: decode(&e.key, &e.value)?,
                revision: e.revision,
            })
        })
        .collect()
}

/// Writes `value` at `key` only if the key is absent. `None` if it exists.
pub async fn create<T: Record>(
    store: &dyn Store,
    key: &str,
    value: &T,
) -> Result<Option<Revision>, StoreError> {
    match store
        .compare_and_swap(key, Expect::Absent, Some(encode(value)?))
        .await?
    {
        CasOutcome::Swapped { revision } => Ok(Some(revision)),
        CasOutcome::Conflict { .. } => Ok(None),
    }
}

pub async fn put<T: Record>(
    store: &dyn Store,
    key: &str,
    value: &T,
) -> Result<Revision, StoreError> {
    store.put(key, encode(value)?).await
}

/// What an [`update`] step decided.
#[derive(Debug)]
pub enum Change<T> {
    /// Write this value.
    Put(T),
    /// Delete the key.
    Delete,
    /// Leave it as it is.
    Keep,
}

/// How many times [`update`] re-reads after losing a race.
pub const UPDATE_TRIES: u32 = 32;

/// Read-modify-write: reads `key`, asks `step` what to do with it, and
/// writes that with compare-and-swap on the revision read. If another
/// writer got in between, reads again and asks again (up to
/// [`UPDATE_TRIES`] times). `step` may refuse with an error, which is
/// returned as is. Returns the record as it is afterwards (`None`: absent).
pub async fn update<T, E, F>(
    store: &dyn Store,
    key: &str,
    mut step: F,
) -> Result<Option<Versioned<T>>, E>
where
    T: Record + Clone,
    E: From<StoreError>,
    F: FnMut(Option<T>) -> Result<Change<T>, E>,
{
    let mut current = get::<T>(store, key).await?;
    for _ in 0..UPDATE_TRIES {
        let expect = match &current {
            Some(v) => Expect::Revision(v.revision),
            None => Expect::Absent,
        };
        let (bytes, after) = match step(current.as_ref().map(|v| v.value.clone()))? {
            Change::Keep => return Ok(current),
            Change::Delete if current.is_none() => return Ok(None),
            Change::Delete => (None, None),
            Change::Put(v) => (Some(encode(&v)?), Some(v)),
        };
        match store.compare_and_swap(key, expect, bytes).await? {
            CasOutcome::Swapped { revision } => {
                return Ok(after.map(|value| Versioned { value, revision }))
            }
            CasOutcome::Conflict { current: now } => {
                current = match now {
                    Some(e) => Some(Versioned {
                        value: decode(&e.key, &e.value)?,
                        revision: e.revision,
                    }),
                    None => None,
                };
            }
        }
    }
    Err(StoreError::Contended {
        key: key.to_string(),
        tries: UPDATE_TRIES,
    }
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Counter {
        n: u64,
        #[serde(default)]
        note: String,
    }
    impl Record for Counter {
        const KIND: &'static str = "counter";
        const SCHEMA: u32 = 2;
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    struct Other {}
    impl Record for Other {
        const KIND: &'static str = "other";
        const SCHEMA: u32 = 1;
    }

    #[test]
    fn envelope_checks_kind_and_schema() {
        let bytes = encode(&Counter {
            n: 1,
            note: "x".into(),
        })
        .unwrap();
        assert_eq!(decode::<Counter>("k", &bytes).unwrap().n, 1);
        assert!(matches!(
            decode::<Other>("k", &bytes),
            Err(StoreError::Decode { .. })
        ));
        let newer = br#"{"kind":"counter","schema":3,"data":{"n":1}}"#;
        assert!(matches!(
            decode::<Counter>("k", newer),
            Err(StoreError::Schema {
                found: 3,
                known: 2,
                ..
            })
        ));
        // An older schema without the later field reads with its default.
        let older = br#"{"kind":"counter","schema":1,"data":{"n":7}}"#;
        assert_eq!(
            decode::<Counter>("k", older).unwrap(),
            Counter {
                n: 7,
                note: String::new()
            }
        );
        assert!(decode::<Counter>("k", b"not json").is_err());
    }

    #[tokio::test]
    async fn update_retries_on_conflict_and_step_sees_the_winner() {
        let d = tempfile::tempdir().unwrap();
        let s = RedbStore::open(&d.path().join("db")).unwrap();
        put(
            &s,
            "c",
            &Counter {
                n: 0,
                note: "".into(),
            },
        )
        .await
        .unwrap();
        let mut first = true;
        let store = s.clone();
        let out = update::<Counter, StoreError, _>(&s, "c", |cur| {
            let cur = cur.unwrap();
            if first {
                // Another writer gets in between our read and our swap.
                first = false;
                store
                    .put_sync(
                        "c",
                        encode(&Counter {
                            n: 10,
                            note: "".into(),
                        })
                        .unwrap(),
                    )
                    .unwrap();
            }
            Ok(Change::Put(Counter {
                n: cur.n + 1,
                note: "".into(),
            }))
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(out.value.n, 11);
        assert_eq!(get::<Counter>(&s, "c").await.unwrap().unwrap(), out);

        // Keep, delete, and create-if-absent.
        let kept = update::<Counter, StoreError, _>(&s, "c", |_| Ok(Change::Keep))
            .await
            .unwrap();
        assert_eq!(kept.unwrap().value.n, 11);
        assert!(
            update::<Counter, StoreError, _>(&s, "c", |_| Ok(Change::Delete))
                .await
                .unwrap()
                .is_none()
        );
        let c = Counter {
            n: 1,
            note: "".into(),
        };
        assert!(create(&s, "c", &c).await.unwrap().is_some());
        assert!(create(&s, "c", &c).await.unwrap().is_none());
        assert_eq!(list::<Counter>(&s, "").await.unwrap().len(), 1);
    }
}
