//! Reading users from the MSNBC sequence file, or generating a stream of the same shape.
//!
//! The file is read as a stream (gzip or plain): one user at a time, never the whole dataset.
//! Users are numbered by their data line (u = 0 for the first line after `% Sequences:` and its
//! blank line), so a malformed line is skipped without shifting the visitor id and tenant of
//! every user after it.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use clickpulse_protocol::PageId;
use clickpulse_protocol::pages::PAGE_COUNT;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How many bad lines are remembered with their line numbers (all are counted).
pub const BAD_LINE_EXAMPLES: usize = 5;

/// One user's page views, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSeq {
    pub user: u64,
    pub pages: Vec<PageId>,
}

/// A skipped line: its 1-based line number in the file and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    pub line: u64,
    pub reason: String,
}

/// Bad lines seen so far: a count and the first few.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BadLines {
    pub count: u64,
    pub examples: Vec<BadLine>,
}

impl BadLines {
    fn record(&mut self, line: u64, reason: String) {
        self.count += 1;
        if self.examples.len() < BAD_LINE_EXAMPLES {
            self.examples.push(BadLine { line, reason });
        }
    }
}

/// Why the dataset cannot be read. None of these get better by retrying.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("cannot open data file {path}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot read data file {path} near line {line}")]
    Read {
        path: PathBuf,
        line: u64,
        source: io::Error,
    },
    #[error("{path} is not an MSNBC sequence file: no \"% Sequences:\" line found")]
    NoSequences { path: PathBuf },
}

/// Where users come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// The MSNBC sequence file (gzip-compressed or plain).
    File(PathBuf),
    /// A generated stream with the dataset's shape, for when there is no file.
    Synthetic { users: u64, seed: u64 },
}

impl Source {
    /// Opens the source, reading at most `limit` users.
    pub fn open(&self, limit: Option<u64>) -> Result<Users, DatasetError> {
        let inner = match self {
            Source::File(path) => Inner::File(FileUsers::open(path)?),
            Source::Synthetic { users, seed } => {
                Inner::Synthetic(Box::new(Synthetic::new(*users, *seed)))
            }
        };
        Ok(Users {
            inner,
            limit: limit.unwrap_or(u64::MAX),
            yielded: 0,
        })
    }

    pub fn describe(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Synthetic { users, seed } => format!("synthetic ({users} users, seed {seed})"),
        }
    }
}

/// Users of a source, in user order.
pub struct Users {
    inner: Inner,
    limit: u64,
    yielded: u64,
}

enum Inner {
    File(FileUsers),
    // Boxed: the generator's RNG state dwarfs the file reader.
    Synthetic(Box<Synthetic>),
}

impl Users {
    /// Bad lines skipped so far (always empty for a synthetic source).
    pub fn bad_lines(&self) -> BadLines {
        match &self.inner {
            Inner::File(f) => f.bad.clone(),
            Inner::Synthetic(_) => BadLines::default(),
        }
    }
}

impl Iterator for Users {
    type Item = Result<UserSeq, DatasetError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.yielded >= self.limit {
            return None;
        }
        let item = match &mut self.inner {
            Inner::File(f) => f.next_user(),
            Inner::Synthetic(s) => s.next().map(Ok),
        };
        if matches!(item, Some(Ok(_))) {
            self.yielded += 1;
        }
        item
    }
}

struct FileUsers {
    path: PathBuf,
    reader: Box<dyn BufRead + Send>,
    line_no: u64,
    next_user: u64,
    buf: String,
    /// `buf` holds a data line read while skipping the header.
    held: bool,
    bad: BadLines,
}

impl FileUsers {
    fn open(path: &Path) -> Result<Self, DatasetError> {
        let open_err = |source| DatasetError::Open {
            path: path.to_owned(),
            source,
        };
        let mut file = BufReader::with_capacity(1 << 16, File::open(path).map_err(open_err)?);
        let gz = file
            .fill_buf()
            .map_err(open_err)?
            .starts_with(&[0x1f, 0x8b]);
        let reader: Box<dyn BufRead + Send> = if gz {
            Box::new(BufReader::with_capacity(
                1 << 16,
                flate2::bufread::MultiGzDecoder::new(file),
            ))
        } else {
            Box::new(file)
        };
        let mut users = FileUsers {
            path: path.to_owned(),
            reader,
            line_no: 0,
            next_user: 0,
            buf: String::new(),
            held: false,
            bad: BadLines::default(),
        };
        users.skip_header()?;
        Ok(users)
    }

    fn read_line(&mut self) -> Result<bool, DatasetError> {
        self.buf.clear();
        let n = self
            .reader
            .read_line(&mut self.buf)
            .map_err(|source| DatasetError::Read {
                path: self.path.clone(),
                line: self.line_no + 1,
                source,
            })?;
        if n > 0 {
            self.line_no += 1;
        }
        Ok(n > 0)
    }

    fn skip_header(&mut self) -> Result<(), DatasetError> {
        while self.read_line()? {
            if self.buf.trim_end() == "% Sequences:" {
                // The blank line after the marker belongs to the header; anything else is data.
                if self.read_line()? && !self.buf.trim().is_empty() {
                    self.held = true;
                }
                return Ok(());
            }
        }
        Err(DatasetError::NoSequences {
            path: self.path.clone(),
        })
    }

    fn next_user(&mut self) -> Option<Result<UserSeq, DatasetError>> {
        loop {
            let line = if std::mem::take(&mut self.held) {
                Ok(true)
            } else {
                self.read_line()
            };
            match line {
                Err(e) => return Some(Err(e)),
                Ok(false) => return None,
                Ok(true) => {}
            }
            let user = self.next_user;
            self.next_user += 1;
            match parse_line(&self.buf) {
                Ok(pages) => return Some(Ok(UserSeq { user, pages })),
                Err(reason) => self.bad.record(self.line_no, reason),
            }
        }
    }
}

/// Parses one data line: space-separated category numbers 1..=17 (a trailing space and CRLF
/// are normal).
pub fn parse_line(line: &str) -> Result<Vec<PageId>, String> {
    let mut pages = Vec::new();
    for token in line.split_ascii_whitespace() {
        let n: u16 = token
            .parse()
            .map_err(|_| format!("{token:?} is not a page number"))?;
        if n == 0 || usize::from(n) > PAGE_COUNT {
            return Err(format!("page {n} is outside 1..={PAGE_COUNT}"));
        }
        pages.push(PageId(n));
    }
    if pages.is_empty() {
        return Err("no page views on the line".into());
    }
    Ok(pages)
}

/// Page views per MSNBC category in the real data (category 1 first), used as the synthetic
/// stream's page distribution.
const MSNBC_VIEWS: [u32; PAGE_COUNT] = [
    940_469, 452_387, 207_479, 386_217, 151_409, 414_928, 305_615, 439_398, 196_614, 131_760,
    96_817, 264_899, 216_125, 395_880, 56_576, 25_249, 16_972,
];

/// Generates users with the dataset's shape: 37 % single-view visits, a long tail of long ones
/// (mean about 4.7 views), pages drawn from the real category mix with the real data's habit of
/// staying on a page for several views.
struct Synthetic {
    rng: ChaCha8Rng,
    users: u64,
    next_user: u64,
    cumulative: [u32; PAGE_COUNT],
}

impl Synthetic {
    fn new(users: u64, seed: u64) -> Self {
        let mut cumulative = [0u32; PAGE_COUNT];
        let mut sum = 0;
        for (c, v) in cumulative.iter_mut().zip(MSNBC_VIEWS) {
            sum += v;
            *c = sum;
        }
        Synthetic {
            rng: ChaCha8Rng::seed_from_u64(seed),
            users,
            next_user: 0,
            cumulative,
        }
    }

    fn page(&mut self) -> PageId {
        let total = self.cumulative[PAGE_COUNT - 1];
        let x = self.rng.gen_range(0..total);
        let index = self.cumulative.partition_point(|c| *c <= x);
        PageId(index as u16 + 1)
    }

    fn length(&mut self) -> usize {
        if self.rng.gen_bool(0.369) {
            return 1;
        }
        // Exponential body with a heavy (Pareto) tail, capped like the real maximum.
        let u: f64 = self.rng.gen_range(f64::EPSILON..1.0);
        let body = 2.0 + (-u.ln() * 4.2).floor();
        let len = if self.rng.gen_bool(0.01) {
            body / u.sqrt()
        } else {
            body
        };
        (len as usize).min(14_795)
    }
}

impl Iterator for Synthetic {
    type Item = UserSeq;

    fn next(&mut self) -> Option<UserSeq> {
        if self.next_user >= self.users {
            return None;
        }
        let user = self.next_user;
        self.next_user += 1;
        let len = self.length();
        let mut pages = Vec::with_capacity(len);
        for _ in 0..len {
            let page = match pages.last() {
                Some(&last) if self.rng.gen_bool(0.45) => last,
                _ => self.page(),
            };
            pages.push(page);
        }
        Some(UserSeq { user, pages })
    }
}

/// Reads a whole source to count users, views and bad lines (used for progress and ETA).
pub fn scan(source: &Source, limit: Option<u64>) -> Result<(u64, u64, BadLines), DatasetError> {
    let mut users = source.open(limit)?;
    let (mut n_users, mut n_views) = (0u64, 0u64);
    for user in users.by_ref() {
        n_users += 1;
        n_views += user?.pages.len() as u64;
    }
    Ok((n_users, n_views, users.bad_lines()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_file(contents: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(contents.as_bytes()).unwrap();
        f
    }

    const HEADER: &str = "% Different categories found in input file:\r\n\r\nfrontpage news tech local opinion on-air misc weather msn-news health living business msn-sports sports summary bbs travel\r\n\r\n\r\n% Sequences:\r\n\r\n";

    #[test]
    fn reads_users_after_the_header_with_crlf_and_trailing_spaces() {
        let f = write_file(&format!("{HEADER}1 1 \r\n2 \r\n3 2 17 \r\n6 "));
        let users: Vec<UserSeq> = Source::File(f.path().into())
            .open(None)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(users.len(), 4);
        assert_eq!(
            users[0],
            UserSeq {
                user: 0,
                pages: vec![PageId(1), PageId(1)]
            }
        );
        assert_eq!(users[2].pages, vec![PageId(3), PageId(2), PageId(17)]);
        assert_eq!(
            users[3],
            UserSeq {
                user: 3,
                pages: vec![PageId(6)]
            }
        );
    }

    #[test]
    fn bad_lines_are_skipped_counted_and_keep_later_user_numbers() {
        let f = write_file(&format!("{HEADER}1 \r\n1 x 2\r\n18\r\n0 1\r\n\r\n4 4\r\n"));
        let mut users = Source::File(f.path().into()).open(None).unwrap();
        let got: Vec<UserSeq> = users.by_ref().map(Result::unwrap).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[1].user, 5,
            "user numbers follow data lines, bad ones included"
        );
        let bad = users.bad_lines();
        assert_eq!(bad.count, 4);
        let lines: Vec<u64> = bad.examples.iter().map(|b| b.line).collect();
        assert_eq!(lines, vec![9, 10, 11, 12]);
        assert!(bad.examples[0].reason.contains("\"x\""));
        assert!(bad.examples[1].reason.contains("18"));
    }

    #[test]
    fn reads_gzip_and_honours_the_limit() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(format!("{HEADER}1\r\n2\r\n3\r\n").as_bytes())
            .unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&gz.finish().unwrap()).unwrap();
        let got: Vec<u64> = Source::File(f.path().into())
            .open(Some(2))
            .unwrap()
            .map(|u| u.unwrap().user)
            .collect();
        assert_eq!(got, vec![0, 1]);
    }

    #[test]
    fn missing_file_and_wrong_format_are_clear_errors() {
        let err = Source::File("/nonexistent/msnbc.seq".into())
            .open(None)
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "cannot open data file /nonexistent/msnbc.seq"
        );
        let f = write_file("just some text\n1 2 3\n");
        let err = Source::File(f.path().into()).open(None).err().unwrap();
        assert!(matches!(err, DatasetError::NoSequences { .. }), "{err}");
    }

    #[test]
    fn synthetic_stream_has_the_datasets_shape_and_is_deterministic() {
        let a: Vec<UserSeq> = Source::Synthetic {
            users: 50_000,
            seed: 7,
        }
        .open(None)
        .unwrap()
        .map(Result::unwrap)
        .collect();
        let b: Vec<UserSeq> = Source::Synthetic {
            users: 50_000,
            seed: 7,
        }
        .open(None)
        .unwrap()
        .map(Result::unwrap)
        .collect();
        assert_eq!(a, b);
        let views: usize = a.iter().map(|u| u.pages.len()).sum();
        let mean = views as f64 / a.len() as f64;
        assert!((3.8..5.8).contains(&mean), "mean length {mean}");
        let singles = a.iter().filter(|u| u.pages.len() == 1).count() as f64 / a.len() as f64;
        assert!(
            (0.33..0.41).contains(&singles),
            "single-view share {singles}"
        );
        let front = a.iter().flat_map(|u| &u.pages).filter(|p| p.0 == 1).count() as f64;
        assert!(
            (0.14..0.26).contains(&(front / views as f64)),
            "frontpage share"
        );
        assert!(a.iter().flat_map(|u| &u.pages).all(|p| p.is_known()));
    }
}
