//! One store type for the binary: the embedded SQLite store or PostgreSQL, chosen at start-up
//! (`--database-url` / `CAREBRIDGE_DATABASE_URL` selects PostgreSQL). Every `store::Store` call is delegated.

use std::future::Future;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use store::{
    Delivery, DeliveryCounts, DeliveryQuery, Event, HistoryQuery, ResourceType, SearchQuery,
    SearchResult, Store, Stored, Tx,
};
use store_postgres::{PgOptions, PgStore};
use store_sqlite::{SqliteOptions, SqliteStore};

pub enum AnyStore {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

impl AnyStore {
    /// PostgreSQL when `database_url` is set (the schema must be migrated), else the embedded store in
    /// `data_dir`.
    pub fn open(
        data_dir: &Path,
        database_url: Option<&str>,
        sqlite: SqliteOptions,
    ) -> Result<AnyStore> {
        match database_url {
            Some(url) => PgStore::connect(url, PgOptions::default())
                .map(AnyStore::Postgres)
                .map_err(|e| anyhow!("{e}"))
                .with_context(|| format!("opening the PostgreSQL store at {}", redact(url))),
            None => SqliteStore::open(data_dir, sqlite)
                .map(AnyStore::Sqlite)
                .map_err(|e| anyhow!("{e}"))
                .with_context(|| format!("opening the embedded store in {}", data_dir.display())),
        }
    }

    /// What to print as "store ...".
    pub fn describe(data_dir: &Path, database_url: Option<&str>) -> String {
        match database_url {
            Some(url) => format!("PostgreSQL {}", redact(url)),
            None => data_dir.display().to_string(),
        }
    }

    /// True when several hub processes may share this store (delivery work must then be claimed).
    pub fn is_shared(&self) -> bool {
        matches!(self, AnyStore::Postgres(_))
    }
}

/// A database URL without its password.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Sqlite($s) => $e,
            AnyStore::Postgres($s) => $e,
        }
    };
}

#[allow(
    clippy::manual_async_fn,
    reason = "each method repeats the trait's signature, which promises a Send future"
)]
impl Store for AnyStore {
    fn reads_ahead(&self) -> bool {
        delegate!(self, s => s.reads_ahead())
    }

    fn write<T, F>(&self, f: F) -> impl Future<Output = store::Result<T>> + Send
    where
        F: FnOnce(&mut dyn Tx) -> store::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        async move { delegate!(self, s => s.write(f).await) }
    }

    fn write_reading<T, F>(
        &self,
        ahead: store::ReadAhead,
        f: F,
    ) -> impl Future<Output = store::Result<T>> + Send
    where
        F: FnOnce(&mut dyn Tx) -> store::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        async move { delegate!(self, s => s.write_reading(ahead, f).await) }
    }

    fn read(
        &self,
        rtype: ResourceType,
        id: &str,
    ) -> impl Future<Output = store::Result<Option<Stored>>> + Send {
        async move { delegate!(self, s => s.read(rtype, id).await) }
    }

    fn vread(
        &self,
        rtype: ResourceType,
        id: &str,
        version: u64,
    ) -> impl Future<Output = store::Result<Option<Stored>>> + Send {
        async move { delegate!(self, s => s.vread(rtype, id, version).await) }
    }

    fn history(
        &self,
        query: &HistoryQuery,
    ) -> impl Future<Output = store::Result<SearchResult>> + Send {
        async move { delegate!(self, s => s.history(query).await) }
    }

    fn search(
        &self,
        query: &SearchQuery,
    ) -> impl Future<Output = store::Result<SearchResult>> + Send {
        async move { delegate!(self, s => s.search(query).await) }
    }

    fn events_after(
        &self,
        after: i64,
        limit: usize,
    ) -> impl Future<Output = store::Result<Vec<Event>>> + Send {
        async move { delegate!(self, s => s.events_after(after, limit).await) }
    }

    fn watch_events(&self) -> tokio::sync::watch::Receiver<i64> {
        delegate!(self, s => s.watch_events())
    }

    fn kv_get(
        &self,
        namespace: &str,
        key: &str,
    ) -> impl Future<Output = store::Result<Option<String>>> + Send {
        async move { delegate!(self, s => s.kv_get(namespace, key).await) }
    }

    fn due_deliveries(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> impl Future<Output = store::Result<Vec<Delivery>>> + Send {
        async move { delegate!(self, s => s.due_deliveries(now_ms, limit).await) }
    }

    fn due_deliveries_for(
        &self,
        subscription: &str,
        now_ms: i64,
        limit: usize,
    ) -> impl Future<Output = store::Result<Vec<Delivery>>> + Send {
        async move { delegate!(self, s => s.due_deliveries_for(subscription, now_ms, limit).await) }
    }

    fn next_due_ms(&self) -> impl Future<Output = store::Result<Option<i64>>> + Send {
        async move { delegate!(self, s => s.next_due_ms().await) }
    }

    fn deliveries(
        &self,
        query: &DeliveryQuery,
    ) -> impl Future<Output = store::Result<Vec<Delivery>>> + Send {
        async move { delegate!(self, s => s.deliveries(query).await) }
    }

    fn delivery_counts(
        &self,
        subscription: &str,
    ) -> impl Future<Output = store::Result<DeliveryCounts>> + Send {
        async move { delegate!(self, s => s.delivery_counts(subscription).await) }
    }
}
