//! Throwaway databases for tests and benchmarks: each [`TestDatabase`] is a fresh database
//! (`cb_test_<tag>_<unique>`, UTF8, `"C"` collation) created on the server named by
//! `CAREBRIDGE_TEST_DATABASE_URL` and dropped (with its connections) when the value is dropped, so tests
//! never see each other's data and leave nothing behind.
//!
//! Why it is public: every crate that wants to run its tests against PostgreSQL (this one, the API, the
//! binary) needs the same few steps, and the tooling that starts a test cluster exports the variable.

use std::sync::atomic::{AtomicU64, Ordering};

use store::{Result, StoreError};

/// The environment variable naming the test server (any database on it; the user must be allowed to
/// create databases).
pub const TEST_DATABASE_ENV: &str = "CAREBRIDGE_TEST_DATABASE_URL";

/// The transaction advisory lock every write batch takes (a test holds it to line writes up).
pub const WRITE_LOCK: i64 = crate::writer::WRITE_LOCK;

/// `url` with its database replaced by `dbname` (key-value and URL forms alike).
pub fn database_url(url: &str, dbname: &str) -> String {
    let url = url.trim();
    for scheme in ["postgres://", "postgresql://"] {
        if let Some(rest) = url.strip_prefix(scheme) {
            let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(authority_end);
            let query = tail.find('?').map_or("", |i| &tail[i..]);
            return format!("{scheme}{authority}/{}{query}", percent_encode(dbname));
        }
    }
    let quoted = dbname.replace('\\', "\\\\").replace('\'', "\\'");
    format!("{url} dbname='{quoted}'")
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A fresh database on the test server, dropped on drop.
#[derive(Debug)]
pub struct TestDatabase {
    server_url: String,
    name: String,
    url: String,
}

impl TestDatabase {
    /// A fresh database on the server of `CAREBRIDGE_TEST_DATABASE_URL`, or `None` (after printing
    /// `skipped: CAREBRIDGE_TEST_DATABASE_URL not set`) when the variable is absent or empty.
    pub fn from_env(tag: &str) -> Result<Option<TestDatabase>> {
        match std::env::var(TEST_DATABASE_ENV) {
            Ok(url) if !url.trim().is_empty() => TestDatabase::create(&url, tag).map(Some),
            _ => {
                println!("skipped: {TEST_DATABASE_ENV} not set");
                Ok(None)
            }
        }
    }

    /// Create a fresh, empty database (no schema) on the server of `server_url`.
    pub fn create(server_url: &str, tag: &str) -> Result<TestDatabase> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .map(|c| c.to_ascii_lowercase())
            .take(24)
            .collect();
        let name = format!(
            "cb_test_{tag}_{}_{:x}_{n}",
            std::process::id(),
            nanos % 0xFFFF_FFFF_FFFF
        );
        admin(
            server_url,
            &format!(
                "CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"
            ),
        )?;
        Ok(TestDatabase {
            server_url: server_url.to_string(),
            url: database_url(server_url, &name),
            name,
        })
    }

    /// Connection string of this database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let _ = admin(
            &self.server_url,
            &format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name),
        );
    }
}

/// Run one statement (no parameters) on the server of `url`.
fn admin(url: &str, sql: &str) -> Result<()> {
    crate::on_own_runtime(|rt| {
        rt.block_on(async {
            let c = crate::open_once(url).await?;
            c.batch(sql)
                .await
                .map_err(|e| StoreError::Unavailable(format!("{sql}: {e}")))
        })
    })
}

/// The SQL of schema migration `n` (1-based), for tests that build a database as an older binary left it.
pub fn migration_sql(n: usize) -> Option<&'static str> {
    crate::schema::MIGRATIONS.get(n.checked_sub(1)?).copied()
}

#[cfg(test)]
mod tests {
    use super::database_url;

    #[test]
    fn database_url_replaces_the_database() {
        assert_eq!(
            database_url("postgres://u@/postgres?host=/tmp/x&port=5", "db1"),
            "postgres://u@/db1?host=/tmp/x&port=5"
        );
        assert_eq!(
            database_url("postgresql://u:p@127.0.0.1:5432", "db1"),
            "postgresql://u:p@127.0.0.1:5432/db1"
        );
        assert_eq!(
            database_url("postgres://u@h?sslmode=disable", "a b"),
            "postgres://u@h/a%20b?sslmode=disable"
        );
        assert_eq!(
            database_url("host=/run/pg user=u dbname=postgres", "x'y"),
            "host=/run/pg user=u dbname=postgres dbname='x\\'y'"
        );
    }
}
