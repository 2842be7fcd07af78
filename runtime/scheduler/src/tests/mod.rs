//! Multi-node tests: several schedulers driven through a deterministic in-test router.

mod forgery;
mod harness;
mod interleavings;
mod properties;
mod proptests;
