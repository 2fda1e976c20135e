//! The in-process hub shared by the API test files: the router over a fresh embedded store in a temporary
//! directory (removed on drop), driven without sockets.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]
#![allow(dead_code)]

use std::sync::Arc;
use store_sqlite::{SqliteOptions, SqliteStore};

pub struct Hub {
    pub app: axum::Router,
    pub store: Arc<SqliteStore>,
    dir: std::path::PathBuf,
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A hub whose public URL is `http://hub.test`.
pub fn hub(label: &str) -> Hub {
    let dir = std::env::temp_dir().join(format!("cb-{label}-{}", uuid::Uuid::new_v4()));
    let store = Arc::new(SqliteStore::open(&dir, SqliteOptions::default()).expect("open store"));
    let app = api::router(store.clone(), api::ApiConfig::new("http://hub.test"));
    Hub { app, store, dir }
}
