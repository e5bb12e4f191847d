//! Idempotency keys held in memory while their job is being submitted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Idempotency keys whose job is being submitted in this process, from the lookup
/// to the write. A second submit of a key waits until the first one's job is
/// written and then finds it in the store: a keyed job may thus run before it is
/// written (the waiting client's fast path) and still run once. In a cluster keyed
/// jobs are written before they run, since another node may hold the same key.
#[derive(Default)]
pub(super) struct KeysInFlight(Mutex<HashMap<(String, String), watch::Receiver<()>>>);

/// One key held in [`KeysInFlight`]; released when dropped (after the job's write).
pub(super) struct KeyHold {
    keys: Arc<KeysInFlight>,
    key: (String, String),
    /// Dropped after the entry is removed: wakes the submits waiting for the key.
    _done: watch::Sender<()>,
}

impl KeysInFlight {
    /// Holds `key` of `account`, waiting while another submit holds it.
    pub(super) async fn hold(self: &Arc<Self>, account: &str, key: &str) -> KeyHold {
        let key = (account.to_string(), key.to_string());
        loop {
            let mut held = {
                let mut map = self.0.lock().unwrap();
                match map.entry(key.clone()) {
                    std::collections::hash_map::Entry::Occupied(e) => e.get().clone(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        let (done, rx) = watch::channel(());
                        e.insert(rx);
                        return KeyHold { keys: self.clone(), key, _done: done };
                    }
                }
            };
            // Ends (with an error) once the holder is dropped, even if it already was.
            let _ = held.changed().await;
        }
    }
}

impl Drop for KeyHold {
    fn drop(&mut self) {
        self.keys.0.lock().unwrap().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_second_submit_of_a_key_waits_until_the_first_lets_go() {
        let keys = Arc::new(KeysInFlight::default());
        let first = keys.hold("acme", "k").await;
        let other_account = tokio::time::timeout(Duration::from_secs(1), keys.hold("other", "k"));
        drop(other_account.await.expect("keys are per account"));
        let second = tokio::spawn({
            let keys = keys.clone();
            async move { drop(keys.hold("acme", "k").await) }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!second.is_finished(), "the key is held");
        drop(first);
        tokio::time::timeout(Duration::from_secs(1), second).await.unwrap().unwrap();
        assert!(keys.0.lock().unwrap().is_empty(), "nothing held once both let go");
    }
}
