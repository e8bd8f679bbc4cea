//! Page counts per tick and per sliding window, and top-N.
//!
//! The sliding window is a ring of panes (one per slide) and a running sum: an event adds to
//! its pane and to the sum; when a window closes, the oldest pane is subtracted from the sum
//! (an inverse reduce) and its slot reused. Each event costs two increments, each slide one
//! pass over the pages — never a recount of raw events.

use clickpulse_protocol::PageId;
use clickpulse_protocol::pages::{PAGE_COUNT, page_name};
use clickpulse_protocol::results::PageCount;
use serde::{Deserialize, Serialize};

/// Views per page, index 0 = page 1.
pub type PageCounts = [u64; PAGE_COUNT];

/// Index of a page in [`PageCounts`], or `None` outside the catalogue.
pub fn page_index(page: PageId) -> Option<usize> {
    let i = usize::from(page.0).checked_sub(1)?;
    (i < PAGE_COUNT).then_some(i)
}

/// Pages with views, in page order, named.
pub fn to_page_counts(counts: &PageCounts) -> Vec<PageCount> {
    counts
        .iter()
        .enumerate()
        .filter(|(_, v)| **v > 0)
        .map(|(i, v)| PageCount {
            page: page_name(PageId(i as u16 + 1)).unwrap_or("?").into(),
            views: *v,
        })
        .collect()
}

/// The `n` pages with most views; ties go to the page whose name sorts first. Pages without
/// views are never listed.
pub fn top_n(counts: &PageCounts, n: usize) -> Vec<PageCount> {
    let mut pages = to_page_counts(counts);
    pages.sort_by(|a, b| b.views.cmp(&a.views).then_with(|| a.page.cmp(&b.page)));
    pages.truncate(n);
    pages
}

/// Page views in the current tick.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticks {
    tick_ms: i64,
    /// Start of the tick being counted, if any event fell in it.
    current: Option<i64>,
    counts: PageCounts,
}

impl Ticks {
    pub fn new(tick_ms: i64) -> Self {
        Ticks {
            tick_ms,
            current: None,
            counts: [0; PAGE_COUNT],
        }
    }

    /// Counts an event. The caller closes the previous tick first (events arrive in order).
    pub fn add(&mut self, time_ms: i64, page: usize) {
        self.current = Some(time_ms.div_euclid(self.tick_ms) * self.tick_ms);
        self.counts[page] += 1;
    }

    /// End of the open tick: when it is due.
    pub fn next_boundary(&self) -> Option<i64> {
        self.current.map(|start| start + self.tick_ms)
    }

    /// Closes the open tick: `(start, end, counts)`.
    pub fn close(&mut self) -> Option<(i64, i64, PageCounts)> {
        let start = self.current.take()?;
        let counts = std::mem::replace(&mut self.counts, [0; PAGE_COUNT]);
        Some((start, start + self.tick_ms, counts))
    }
}

/// Page views in a window of `panes × slide`, sliding every `slide`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlidingWindow {
    slide_ms: i64,
    window_ms: i64,
    ring: Vec<PageCounts>,
    ring_totals: Vec<u64>,
    sum: PageCounts,
    total: u64,
}

impl SlidingWindow {
    pub fn new(window_ms: i64, slide_ms: i64) -> Self {
        let panes = (window_ms / slide_ms) as usize;
        SlidingWindow {
            slide_ms,
            window_ms,
            ring: vec![[0; PAGE_COUNT]; panes],
            ring_totals: vec![0; panes],
            sum: [0; PAGE_COUNT],
            total: 0,
        }
    }

    fn slot(&self, time_ms: i64) -> usize {
        time_ms
            .div_euclid(self.slide_ms)
            .rem_euclid(self.ring.len() as i64) as usize
    }

    pub fn add(&mut self, time_ms: i64, page: usize) {
        let slot = self.slot(time_ms);
        self.ring[slot][page] += 1;
        self.ring_totals[slot] += 1;
        self.sum[page] += 1;
        self.total += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Closes the window `[end − window, end)` (`end` a multiple of the slide): returns its
    /// counts if it has any, then drops its oldest pane.
    pub fn close(&mut self, end_ms: i64) -> Option<PageCounts> {
        let out = (self.total > 0).then_some(self.sum);
        let slot = self.slot(end_ms - self.window_ms);
        if self.ring_totals[slot] > 0 {
            for (s, p) in self.sum.iter_mut().zip(&self.ring[slot]) {
                *s -= p;
            }
            self.total -= self.ring_totals[slot];
            self.ring[slot] = [0; PAGE_COUNT];
            self.ring_totals[slot] = 0;
        }
        out
    }

    pub fn window_ms(&self) -> i64 {
        self.window_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_n_orders_by_views_then_name_and_skips_empty_pages() {
        let mut c = [0; PAGE_COUNT];
        c[0] = 5; // frontpage
        c[1] = 7; // news
        c[2] = 5; // tech
        c[13] = 5; // sports
        let top: Vec<(String, u64)> = top_n(&c, 3)
            .into_iter()
            .map(|p| (p.page.into_owned(), p.views))
            .collect();
        assert_eq!(
            top,
            vec![
                ("news".into(), 7),
                ("frontpage".into(), 5),
                ("sports".into(), 5)
            ]
        );
        assert_eq!(top_n(&c, 10).len(), 4);
    }

    #[test]
    fn window_slides_by_subtracting_its_oldest_pane() {
        let mut w = SlidingWindow::new(30, 10);
        w.add(0, 0);
        w.add(15, 0);
        w.add(25, 1);
        assert_eq!(w.close(30).map(|c| (c[0], c[1])), Some((2, 1))); // [0,30)
        w.add(31, 1);
        assert_eq!(w.close(40).map(|c| (c[0], c[1])), Some((1, 2))); // [10,40)
        assert_eq!(w.close(50).map(|c| (c[0], c[1])), Some((0, 2))); // [20,50)
        assert_eq!(w.close(60).map(|c| (c[0], c[1])), Some((0, 1))); // [30,60)
        assert_eq!(w.close(70), None);
        assert!(w.is_empty());
    }
}
