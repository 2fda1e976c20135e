//! Leases for work that one process of a hub must do at a time when several `serve` processes share a
//! PostgreSQL store (the outbox dispatcher, a MESH mailbox's poller).
//!
//! A lease is a key-value entry `lease/<name>` = `<owner>|<expiry ms>` taken or renewed inside a store write,
//! so (writes being serialised by the store) two processes can never both hold it. A holder that dies stops
//! renewing and another process takes over once the lease expires.

use std::sync::OnceLock;

use store::Store;

const NS: &str = "lease";

/// This process's owner id (pid and start time).
pub fn owner() -> &'static str {
    static OWNER: OnceLock<String> = OnceLock::new();
    OWNER.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("pid{}-{nanos}", std::process::id())
    })
}

/// Take or renew lease `name` for `ttl_ms`; true when this process holds it afterwards.
pub async fn hold<S: Store>(store: &S, name: &str, ttl_ms: i64) -> bool {
    let (name, me) = (name.to_string(), owner().to_string());
    store
        .write(move |tx| {
            let now = tx.now_ms();
            let current = tx.kv_get(NS, &name)?;
            let free = match current.as_deref().and_then(|v| v.rsplit_once('|')) {
                None => true,
                Some((holder, until)) => {
                    holder == me || until.parse::<i64>().map_or(true, |u| u < now)
                }
            };
            if free {
                tx.kv_put(NS, &name, Some(&format!("{me}|{}", now + ttl_ms)))?;
            }
            Ok(free)
        })
        .await
        .unwrap_or(false)
}
