//! One database connection with its prepared-statement cache, connection set-up from a URL, and the
//! mapping of driver errors to [`StoreError`].
//!
//! Every statement goes through [`Conn::statement`], so each distinct SQL text is parsed and planned by the
//! server once per connection (an unprepared query costs an extra round trip for Parse/Describe).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Mutex;

use store::{Result, StoreError};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Config, NoTls, Row, Statement};

/// Most distinct statements kept per connection; past it the cache starts again (search SQL is built from
/// the query's shape, so the number of shapes is bounded in practice, but not by construction).
const STATEMENT_CACHE: usize = 512;

/// A parameter list as the driver takes it.
pub(crate) type Params<'a> = [&'a (dyn ToSql + Sync)];

/// A driver error as a [`StoreError`] (the text is for logs): a lost connection is `Unavailable`.
pub(crate) fn db(e: tokio_postgres::Error) -> StoreError {
    if e.is_closed() {
        StoreError::Unavailable(format!("the database connection is closed: {e}"))
    } else {
        StoreError::Backend(e.to_string())
    }
}

/// Parse a connection string: key-value (`host=/run/pg port=5432 user=u dbname=d`) or URL
/// (`postgres://u@/d?host=/run/pg`, `postgres://u:p@127.0.0.1:5432/d`). A `host` that is a directory path
/// means the Unix socket in that directory.
pub(crate) fn parse_url(url: &str) -> Result<Config> {
    let mut config = Config::from_str(url).map_err(|e| {
        StoreError::Unavailable(format!("invalid PostgreSQL connection string: {e}"))
    })?;
    if config.get_application_name().is_none() {
        config.application_name("carebridge");
    }
    Ok(config)
}

/// A connection and the statements prepared on it.
pub(crate) struct Conn {
    pub(crate) client: Client,
    cache: Mutex<HashMap<String, Statement>>,
}

impl Conn {
    /// Connect; the returned connection future must be driven (spawned) by the caller's runtime.
    pub(crate) async fn open(
        config: &Config,
    ) -> Result<(
        Conn,
        tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
    )> {
        let (client, connection) = config
            .connect(NoTls)
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot connect to PostgreSQL: {e}")))?;
        Ok((
            Conn {
                client,
                cache: Mutex::new(HashMap::new()),
            },
            connection,
        ))
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// The prepared statement for `sql` (prepared on first use).
    pub(crate) async fn statement(&self, sql: &str) -> Result<Statement> {
        if let Some(s) = self.lock().get(sql) {
            return Ok(s.clone());
        }
        let prepared = self.client.prepare(sql).await.map_err(db)?;
        let mut cache = self.lock();
        if cache.len() >= STATEMENT_CACHE {
            cache.clear();
        }
        cache.insert(sql.to_string(), prepared.clone());
        Ok(prepared)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Statement>> {
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) async fn query(&self, sql: &str, params: &Params<'_>) -> Result<Vec<Row>> {
        let s = self.statement(sql).await?;
        self.client.query(&s, params).await.map_err(db)
    }

    pub(crate) async fn query_opt(&self, sql: &str, params: &Params<'_>) -> Result<Option<Row>> {
        let s = self.statement(sql).await?;
        self.client.query_opt(&s, params).await.map_err(db)
    }

    pub(crate) async fn query_one(&self, sql: &str, params: &Params<'_>) -> Result<Row> {
        let s = self.statement(sql).await?;
        self.client.query_one(&s, params).await.map_err(db)
    }

    pub(crate) async fn execute(&self, sql: &str, params: &Params<'_>) -> Result<u64> {
        let s = self.statement(sql).await?;
        self.client.execute(&s, params).await.map_err(db)
    }

    /// Rows of `sql` sent unprepared (an unnamed statement, in one round trip), so PostgreSQL plans it for
    /// these values every time.
    pub(crate) async fn query_typed(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>> {
        self.client.query_typed(sql, params).await.map_err(db)
    }

    /// Run one or more statements with the simple query protocol (no parameters): one round trip.
    pub(crate) async fn batch(&self, sql: &str) -> Result<()> {
        self.client.batch_execute(sql).await.map_err(db)
    }
}

/// Run `futures` together and return their outputs in order. Each is first polled in order, so requests
/// they send on one connection reach the server in that order, in one round trip (tokio-postgres sends a
/// query's messages when its future is first polled).
pub(crate) async fn join_in_order<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    /// A future and, once it is ready, its output.
    type Slot<F> = (
        std::pin::Pin<Box<F>>,
        Option<<F as std::future::Future>::Output>,
    );
    let mut slots: Vec<Slot<F>> = futures.into_iter().map(|f| (Box::pin(f), None)).collect();
    std::future::poll_fn(|cx| {
        let mut waiting = false;
        for (future, output) in slots.iter_mut() {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *output = Some(v),
                    std::task::Poll::Pending => waiting = true,
                }
            }
        }
        if waiting {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    slots.into_iter().filter_map(|(_, output)| output).collect()
}
