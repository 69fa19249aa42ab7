//! Helpers for the integration tests: build fixtures, run memleak, read its JSON.
