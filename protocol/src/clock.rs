//! The replay clock: how the MSNBC dataset (which has no timestamps) becomes a timed stream.
//!
//! This is a contract: the replayer follows it, and tests and benchmarks of other components
//! compute expected values from it.
//!
//! - Users are the data lines after the `% Sequences:` line and its blank line, numbered
//!   u = 0, 1, 2, … in file order. Visitor id = u. Tenant = `tenants[u % tenants.len()]`.
//! - View j (0-based) of user u happens at
//!   `t0 + 87·u ms + 10 000·j ms + 2 400 000·floor(j / 25) ms`, with the default
//!   `t0 = 1999-09-28T00:00:00Z` (938 476 800 000 ms).
//!   Users arrive over about one day, views are 10 s apart, and after every 25 views a 40-minute
//!   pause starts a new session under a 30-minute inactivity timeout.
//! - Events are replayed in ascending event time; ties go to the smaller u, then the smaller j.
//!
//! ```
//! use clickpulse_protocol::clock::{event_time_ms, DEFAULT_T0_MS};
//! assert_eq!(event_time_ms(DEFAULT_T0_MS, 0, 0), 938_476_800_000);
//! assert_eq!(event_time_ms(DEFAULT_T0_MS, 1, 0), 938_476_800_087);
//! // view 25 comes 10 s plus a 40-minute pause after view 24
//! assert_eq!(event_time_ms(0, 0, 25) - event_time_ms(0, 0, 24), 10_000 + 2_400_000);
//! ```

/// Default start of the replay: 1999-09-28T00:00:00Z, the day the data was collected.
pub const DEFAULT_T0_MS: i64 = 938_476_800_000;
/// Gap between the arrival of consecutive users.
pub const USER_SPACING_MS: i64 = 87;
/// Gap between consecutive views of one user within a burst.
pub const VIEW_SPACING_MS: i64 = 10_000;
/// Views per burst before a pause.
pub const VIEWS_PER_BURST: u32 = 25;
/// Extra pause after every burst; longer than the 30-minute session gap.
pub const BURST_PAUSE_MS: i64 = 2_400_000;

/// Event time of view `j` of user `u`.
pub fn event_time_ms(t0_ms: i64, u: u64, j: u32) -> i64 {
    // u < 2^40 and j < 2^32 keep every product far inside i64.
    t0_ms
        + USER_SPACING_MS * u as i64
        + VIEW_SPACING_MS * i64::from(j)
        + BURST_PAUSE_MS * i64::from(j / VIEWS_PER_BURST)
}

/// Index into the tenant list of user `u`'s tenant.
pub fn tenant_index(u: u64, tenants: usize) -> usize {
    assert!(tenants > 0, "the replay clock needs at least one tenant");
    (u % tenants as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_views_follow_user_spacing() {
        assert_eq!(event_time_ms(DEFAULT_T0_MS, 0, 0), DEFAULT_T0_MS);
        assert_eq!(
            event_time_ms(DEFAULT_T0_MS, 989_817, 0),
            DEFAULT_T0_MS + 87 * 989_817
        );
    }

    #[test]
    fn bursts_of_25_then_a_pause_longer_than_the_session_gap() {
        let gaps: Vec<i64> = (1..60)
            .map(|j| event_time_ms(0, 3, j) - event_time_ms(0, 3, j - 1))
            .collect();
        for (i, gap) in gaps.iter().enumerate() {
            let j = i as u32 + 1;
            if j.is_multiple_of(25) {
                assert_eq!(*gap, 2_410_000, "gap before view {j}");
                assert!(*gap > 30 * 60 * 1000);
            } else {
                assert_eq!(*gap, 10_000, "gap before view {j}");
            }
        }
    }

    #[test]
    fn tenants_round_robin_over_users() {
        let split: Vec<usize> = (0..6).map(|u| tenant_index(u, 3)).collect();
        assert_eq!(split, vec![0, 1, 2, 0, 1, 2]);
    }
}
