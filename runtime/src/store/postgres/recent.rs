//! Reads that every submit makes (its function by name, its account), kept for a
//! moment so that a burst of submits does not ask the database the same thing a
//! thousand times.
//!
//! Only what exists is kept (a name that is missing is asked again: one created on
//! another node a moment ago must be found). Kept values go when this node changes
//! them, when any node's change is heard (`NOTIFY`), when the listener reconnects
//! (notifications may have been lost) and, whatever happens, after [`KEEP`]. A read
//! that raced with a change is not kept (a generation counter says so).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a value is used without asking again, at most.
pub(crate) const KEEP: Duration = Duration::from_secs(1);

/// Values kept at most; past that the lot is dropped (a burst refills what it needs).
const MAX: usize = 4096;

pub(crate) struct Recent<V> {
    inner: Mutex<Inner<V>>,
}

struct Inner<V> {
    generation: u64,
    values: HashMap<String, (Instant, V)>,
}

impl<V: Clone> Default for Recent<V> {
    fn default() -> Self {
        Recent { inner: Mutex::new(Inner { generation: 0, values: HashMap::new() }) }
    }
}

impl<V: Clone> Recent<V> {
    /// The value of `key` if one was kept less than [`KEEP`] ago, else the generation
    /// to hand to [`Recent::keep`] after reading it.
    pub(crate) fn get(&self, key: &str) -> Result<V, u64> {
        let inner = self.inner.lock().unwrap();
        match inner.values.get(key) {
            Some((at, v)) if at.elapsed() < KEEP => Ok(v.clone()),
            _ => Err(inner.generation),
        }
    }

    /// Keeps `value`, read for `key` in `generation`, unless something changed since.
    pub(crate) fn keep(&self, generation: u64, key: String, value: V) {
        let mut inner = self.inner.lock().unwrap();
        if inner.generation != generation {
            return;
        }
        if inner.values.len() >= MAX {
            inner.values.clear();
        }
        inner.values.insert(key, (Instant::now(), value));
    }

    /// Forgets everything kept, and any read under way.
    pub(crate) fn clear(&self) {
        let mut inner = self.inner.lock().unwrap();
        inner.generation += 1;
        inner.values.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_that_raced_with_a_change_is_not_kept() {
        let r: Recent<u32> = Recent::default();
        let generation = r.get("f").unwrap_err();
        r.clear(); // changed while the read was under way
        r.keep(generation, "f".into(), 1);
        let generation = r.get("f").unwrap_err();
        r.keep(generation, "f".into(), 2);
        assert_eq!(r.get("f"), Ok(2));
        r.clear();
        assert!(r.get("f").is_err());
    }

    #[test]
    fn values_expire_and_the_map_stays_bounded() {
        let r: Recent<u32> = Recent::default();
        for i in 0..(MAX + 10) {
            let g = r.get(&i.to_string()).unwrap_err();
            r.keep(g, i.to_string(), i as u32);
        }
        assert!(r.inner.lock().unwrap().values.len() <= MAX);
        let mut inner = r.inner.lock().unwrap();
        let old = Instant::now() - KEEP - Duration::from_millis(1);
        inner.values.insert("old".into(), (old, 7));
        drop(inner);
        assert!(r.get("old").is_err(), "expired");
    }
}
