//! Named MESH environments and their base URLs (the internet-facing hosts; the older HSCN hosts are deprecated).

use crate::error::{Error, Result};

/// A MESH environment a mailbox belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    /// Integration (path-to-live testing).
    Int,
    /// Deployment (pre-production).
    Dep,
    /// Production.
    Live,
}

impl Environment {
    /// `int`, `dep` or `live` (case-insensitive; `integration`, `deployment` and `production` too).
    pub fn parse(s: &str) -> Result<Environment> {
        match s.trim().to_ascii_lowercase().as_str() {
            "int" | "integration" => Ok(Environment::Int),
            "dep" | "deployment" => Ok(Environment::Dep),
            "live" | "production" | "prod" => Ok(Environment::Live),
            other => Err(Error::Config(format!(
                "environment must be int, dep or live, not '{other}'"
            ))),
        }
    }

    /// The environment's base URL (no trailing slash; paths start with `/messageexchange`).
    pub fn base_url(self) -> &'static str {
        match self {
            Environment::Int => "https://msg.intspineservices.nhs.uk",
            Environment::Dep => "https://msg.depspineservices.nhs.uk",
            Environment::Live => "https://mesh-sync.spineservices.nhs.uk",
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn names_and_urls() {
        assert_eq!(Environment::parse("INT").unwrap(), Environment::Int);
        assert_eq!(Environment::parse(" dep ").unwrap(), Environment::Dep);
        assert_eq!(
            Environment::parse("live").unwrap().base_url(),
            "https://mesh-sync.spineservices.nhs.uk"
        );
        assert!(
            Environment::Int
                .base_url()
                .starts_with("https://msg.intspine")
        );
        assert!(matches!(Environment::parse("ref"), Err(Error::Config(_))));
    }
}
