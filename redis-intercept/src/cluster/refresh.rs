//! When to refresh the topology besides the periodic refresh.

/// When to refresh the topology besides the periodic refresh: after `threshold` redirects or
/// upstream failures, but not more often than `min_interval` (Envoy's
/// `redirect_refresh_threshold` / `redirect_refresh_interval`). Times are passed in, so the
/// rule is tested without clocks.
#[derive(Debug, Clone)]
pub struct RefreshTrigger {
    /// Events that ask for a refresh.
    pub threshold: u32,
    /// Shortest time between two refreshes.
    pub min_interval: std::time::Duration,
    /// Events since the last refresh.
    events: u32,
    /// When the last refresh started.
    last: Option<std::time::Instant>,
}

impl RefreshTrigger {
    /// A trigger with nothing counted yet.
    pub fn new(threshold: u32, min_interval: std::time::Duration) -> RefreshTrigger {
        RefreshTrigger {
            threshold: threshold.max(1),
            min_interval,
            events: 0,
            last: None,
        }
    }

    /// Counts a redirect or failure; true when enough have been seen to ask for a refresh.
    pub fn note(&mut self) -> bool {
        self.events = self.events.saturating_add(1);
        self.events >= self.threshold
    }

    /// When a refresh may start, if one is wanted: now, or when the minimum interval ends.
    pub fn due(&self, now: std::time::Instant) -> Option<std::time::Instant> {
        if self.events < self.threshold {
            return None;
        }
        Some(match self.last {
            Some(last) if now < last + self.min_interval => last + self.min_interval,
            _ => now,
        })
    }

    /// Records that a refresh started at `now`.
    pub fn refreshed(&mut self, now: std::time::Instant) {
        self.events = 0;
        self.last = Some(now);
    }
}
