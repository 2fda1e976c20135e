//! Conformance suite every backend must pass (TODO).
