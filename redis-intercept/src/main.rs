//! The `redis-intercept` binary.
fn main() {}
