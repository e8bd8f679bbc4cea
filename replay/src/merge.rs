//! The k-way merge that turns users (in file order) into page views in event-time order.
//!
//! Each user is a sorted run of views on the replay clock ([`clickpulse_protocol::clock`]).
//! Users arrive 87 ms apart, so a user is read from the source only when the merge reaches its
//! first view's time: the heap holds the users active at the current event time (about a
//! thousand on the MSNBC data), never the whole dataset.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use clickpulse_protocol::PageId;
use clickpulse_protocol::clock::event_time_ms;

use crate::dataset::{DatasetError, UserSeq};

/// One page view with its replay-clock time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub time_ms: i64,
    pub user: u64,
    pub index: u32,
    pub page: PageId,
}

/// A user's remaining views; ordered by (next view time, user) so ties go to the smaller user
/// (a user's own views never tie: they are at least 10 s apart).
#[derive(Debug)]
struct Cursor {
    time_ms: i64,
    user: u64,
    index: u32,
    pages: Box<[PageId]>,
}

impl PartialEq for Cursor {
    fn eq(&self, other: &Self) -> bool {
        (self.time_ms, self.user) == (other.time_ms, other.user)
    }
}
impl Eq for Cursor {}
impl PartialOrd for Cursor {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Cursor {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.time_ms, self.user).cmp(&(other.time_ms, other.user))
    }
}

/// Merges users into views in ascending (time, user, view index) order.
pub struct Merge<I> {
    users: I,
    t0_ms: i64,
    heap: BinaryHeap<Reverse<Cursor>>,
    /// The next user from the source, not yet in the heap.
    pending: Option<Cursor>,
    exhausted: bool,
}

impl<I: Iterator<Item = Result<UserSeq, DatasetError>>> Merge<I> {
    pub fn new(users: I, t0_ms: i64) -> Self {
        Merge {
            users,
            t0_ms,
            heap: BinaryHeap::new(),
            pending: None,
            exhausted: false,
        }
    }

    /// Users currently holding unsent views (the merge's memory is proportional to this).
    pub fn active_users(&self) -> usize {
        self.heap.len()
    }

    pub fn into_users(self) -> I {
        self.users
    }

    fn fill_pending(&mut self) -> Result<(), DatasetError> {
        if self.pending.is_none() && !self.exhausted {
            match self.users.next() {
                None => self.exhausted = true,
                Some(user) => {
                    let user = user?;
                    self.pending = Some(Cursor {
                        time_ms: event_time_ms(self.t0_ms, user.user, 0),
                        user: user.user,
                        index: 0,
                        pages: user.pages.into_boxed_slice(),
                    });
                }
            }
        }
        Ok(())
    }
}

impl<I: Iterator<Item = Result<UserSeq, DatasetError>>> Iterator for Merge<I> {
    type Item = Result<View, DatasetError>;

    fn next(&mut self) -> Option<Self::Item> {
        // Admit every user whose first view is not after the earliest view in the heap: users
        // come in ascending order of first-view time, so the rest cannot come earlier.
        loop {
            if let Err(e) = self.fill_pending() {
                return Some(Err(e));
            }
            let Some(pending) = self.pending.take() else {
                break;
            };
            match self.heap.peek() {
                Some(Reverse(top)) if top < &pending => {
                    self.pending = Some(pending);
                    break;
                }
                _ => self.heap.push(Reverse(pending)),
            }
        }
        let Reverse(mut cursor) = self.heap.pop()?;
        let view = View {
            time_ms: cursor.time_ms,
            user: cursor.user,
            index: cursor.index,
            page: cursor.pages[cursor.index as usize],
        };
        cursor.index += 1;
        if (cursor.index as usize) < cursor.pages.len() {
            cursor.time_ms = event_time_ms(self.t0_ms, cursor.user, cursor.index);
            self.heap.push(Reverse(cursor));
        }
        Some(Ok(view))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn users(lens: &[usize]) -> Vec<Result<UserSeq, DatasetError>> {
        lens.iter()
            .enumerate()
            .map(|(u, &n)| {
                Ok(UserSeq {
                    user: u as u64,
                    pages: (0..n).map(|j| PageId((j % 17) as u16 + 1)).collect(),
                })
            })
            .collect()
    }

    /// The naive oracle: every view of every user, fully sorted.
    fn sorted(lens: &[usize], t0: i64) -> Vec<(i64, u64, u32)> {
        let mut all: Vec<(i64, u64, u32)> = lens
            .iter()
            .enumerate()
            .flat_map(|(u, &n)| {
                (0..n as u32).map(move |j| (event_time_ms(t0, u as u64, j), u as u64, j))
            })
            .collect();
        all.sort();
        all
    }

    #[test]
    fn long_sessions_interleave_with_later_users() {
        let merged: Vec<View> = Merge::new(users(&[3, 1]).into_iter(), 0)
            .map(Result::unwrap)
            .collect();
        let order: Vec<(u64, u32)> = merged.iter().map(|v| (v.user, v.index)).collect();
        // user 1 arrives at 87 ms, between user 0's views at 0 and 10 000 ms
        assert_eq!(order, vec![(0, 0), (1, 0), (0, 1), (0, 2)]);
    }

    proptest! {
        #[test]
        fn matches_a_full_sort(lens in proptest::collection::vec(1usize..60, 0..200), t0 in -1_000_000i64..1_000_000) {
            let merged: Vec<(i64, u64, u32)> = Merge::new(users(&lens).into_iter(), t0)
                .map(|v| { let v = v.unwrap(); (v.time_ms, v.user, v.index) })
                .collect();
            prop_assert_eq!(merged, sorted(&lens, t0));
        }
    }

    #[test]
    fn ties_go_to_the_smaller_user() {
        // View 423 of user 0 and view 0 of user 490 000 both fall at 49 170 000 ms.
        assert_eq!(event_time_ms(0, 0, 423), event_time_ms(0, 490_000, 0));
        let source = vec![
            Ok(UserSeq {
                user: 0,
                pages: vec![PageId(1); 424],
            }),
            Ok(UserSeq {
                user: 490_000,
                pages: vec![PageId(2)],
            }),
        ];
        let tail: Vec<(u64, u32)> = Merge::new(source.into_iter(), 0)
            .map(Result::unwrap)
            .skip(423)
            .map(|v| (v.user, v.index))
            .collect();
        assert_eq!(tail, vec![(0, 423), (490_000, 0)]);
    }
}
