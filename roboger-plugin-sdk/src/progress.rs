//! What a plugin remembers of deliveries part-way through, so that a
//! retry does only what is left: the email plugin mails only the
//! recipients not yet mailed, the telegram plugin sends only the media
//! after a text already sent. It lives in this process's memory, for at
//! most [`Progress::CAPACITY`] deliveries, the least recently touched
//! forgotten first: a retry on another node of a cluster, or after the
//! plugin was restarted, starts over, so each step is done at least once,
//! as every delivery is.

use std::sync::Mutex;

use hashlink::LruCache;

/// Each delivery's progress (`V`), by a key the plugin makes of the
/// event id and what tells its endpoints apart (the recipients, the
/// chat).
pub struct Progress<V> {
    deliveries: Mutex<LruCache<String, V>>,
}

impl<V: Clone + Default> Progress<V> {
    /// How many deliveries part-way through are remembered.
    pub const CAPACITY: usize = 10_000;

    /// Remembers up to [`Progress::CAPACITY`] deliveries.
    pub fn new() -> Progress<V> {
        Progress::with_capacity(Self::CAPACITY)
    }

    /// Remembers up to `capacity` deliveries.
    pub fn with_capacity(capacity: usize) -> Progress<V> {
        Progress {
            deliveries: Mutex::new(LruCache::new(capacity)),
        }
    }

    /// What was remembered of `delivery` (the default when nothing was).
    pub fn get(&self, delivery: &str) -> V {
        self.deliveries
            .lock()
            .ok()
            .and_then(|mut d| d.get(delivery).cloned())
            .unwrap_or_default()
    }

    /// Changes what is remembered of `delivery` (from the default when
    /// nothing was), forgetting the least recently touched delivery past
    /// the capacity.
    pub fn update(&self, delivery: &str, change: impl FnOnce(&mut V)) {
        let Ok(mut d) = self.deliveries.lock() else {
            return;
        };
        if d.get_mut(delivery).is_none() {
            d.insert(delivery.to_string(), V::default());
        }
        if let Some(v) = d.get_mut(delivery) {
            change(v);
        }
    }

    /// Forgets `delivery`, its outcome final.
    pub fn forget(&self, delivery: &str) {
        if let Ok(mut d) = self.deliveries.lock() {
            d.remove(delivery);
        }
    }

    /// How many deliveries are remembered.
    pub fn len(&self) -> usize {
        self.deliveries.lock().map(|d| d.len()).unwrap_or(0)
    }

    /// Whether no delivery is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<V: Clone + Default> Default for Progress<V> {
    fn default() -> Self {
        Progress::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_until_forgotten_and_forgets_the_least_recently_touched_past_capacity() {
        let p: Progress<Vec<&str>> = Progress::with_capacity(3);
        assert!(p.get("e1").is_empty() && p.is_empty());
        p.update("e1", |v| v.push("text"));
        p.update("e1", |v| v.push("media"));
        assert_eq!(p.get("e1"), ["text", "media"]);
        p.update("e2", |v| v.push("a"));
        p.update("e3", |v| v.push("b"));
        p.get("e1");
        p.update("e4", |v| v.push("c"));
        assert_eq!(p.len(), 3);
        assert!(p.get("e2").is_empty(), "the least recently touched goes");
        assert_eq!(p.get("e1"), ["text", "media"]);
        p.forget("e1");
        assert!(p.get("e1").is_empty());
        assert_eq!(p.len(), 2);
    }
}
