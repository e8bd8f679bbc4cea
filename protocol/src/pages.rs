//! Pages.
//!
//! A page is a small number on the wire ([`PageId`]) and a name in results shown to people. The
//! MSNBC dataset has 17 page categories, numbered 1 to 17 in the order of [`MSNBC_PAGES`];
//! 0 is never a valid page.
//!
//! ```
//! use clickpulse_protocol::pages::{PageId, page_name};
//! assert_eq!(page_name(PageId(1)), Some("frontpage"));
//! assert_eq!(page_name(PageId(17)), Some("travel"));
//! assert_eq!(page_name(PageId(18)), None);
//! ```

use serde::{Deserialize, Serialize};

/// A page (category) id as carried in the click record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PageId(pub u16);

/// The MSNBC categories, in category-number order (index 0 is category 1).
pub const MSNBC_PAGES: [&str; 17] = [
    "frontpage",
    "news",
    "tech",
    "local",
    "opinion",
    "on-air",
    "misc",
    "weather",
    "msn-news",
    "health",
    "living",
    "business",
    "msn-sports",
    "sports",
    "summary",
    "bbs",
    "travel",
];

/// Number of pages in the catalogue; valid ids are `1..=PAGE_COUNT`.
pub const PAGE_COUNT: usize = MSNBC_PAGES.len();

/// The name of a page, or `None` for an id outside the catalogue.
pub fn page_name(id: PageId) -> Option<&'static str> {
    let index = usize::from(id.0).checked_sub(1)?;
    MSNBC_PAGES.get(index).copied()
}

/// The id of a page name, or `None` for an unknown name.
pub fn page_id(name: &str) -> Option<PageId> {
    MSNBC_PAGES
        .iter()
        .position(|p| *p == name)
        .and_then(|i| u16::try_from(i + 1).ok())
        .map(PageId)
}

impl PageId {
    /// True when the id names a page of the catalogue.
    pub fn is_known(self) -> bool {
        page_name(self).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ids_round_trip() {
        for (i, name) in MSNBC_PAGES.iter().enumerate() {
            let id = PageId(u16::try_from(i + 1).unwrap());
            assert_eq!(page_name(id), Some(*name));
            assert_eq!(page_id(name), Some(id));
        }
        assert_eq!(page_name(PageId(0)), None);
        assert_eq!(page_id("nope"), None);
    }
}
