//! Progress output: a bar with rate and ETA on a terminal, plain periodic lines otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, lines otherwise.
    #[default]
    Auto,
    /// A log line every few seconds.
    Lines,
    /// Nothing until the summary.
    Quiet,
}

impl std::str::FromStr for ProgressMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(ProgressMode::Auto),
            "lines" => Ok(ProgressMode::Lines),
            "quiet" => Ok(ProgressMode::Quiet),
            _ => Err(format!("progress must be auto, lines or quiet, not {s:?}")),
        }
    }
}

const LINE_EVERY: Duration = Duration::from_secs(5);
/// Updating the bar costs atomics; once per this many events is smooth enough.
const BAR_BATCH: u64 = 8192;

pub(crate) struct Progress {
    mode: Mode,
    total: u64,
    started: Instant,
}

enum Mode {
    Bar(ProgressBar),
    Lines { last: Instant },
    Quiet,
}

impl Progress {
    pub(crate) fn new(mode: ProgressMode, total: u64) -> Self {
        let mode = match mode {
            ProgressMode::Auto if std::io::stderr().is_terminal() => {
                let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
                // Fits 80 columns: a wrapped line breaks the redraw.
                let style = ProgressStyle::with_template(
                    "{spinner} [{bar:20}] {human_pos}/{human_len} ETA {eta} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar());
                bar.set_style(style.progress_chars("=> "));
                Mode::Bar(bar)
            }
            ProgressMode::Auto | ProgressMode::Lines => Mode::Lines {
                last: Instant::now(),
            },
            ProgressMode::Quiet => Mode::Quiet,
        };
        Progress {
            mode,
            total,
            started: Instant::now(),
        }
    }

    pub(crate) fn update(&mut self, done: u64, event_time_ms: i64) {
        match &mut self.mode {
            Mode::Bar(bar) => {
                if done.is_multiple_of(BAR_BATCH) {
                    bar.set_position(done);
                    let rate = done as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
                    let time = chrono::DateTime::from_timestamp_millis(event_time_ms)
                        .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
                        .unwrap_or_default();
                    bar.set_message(format!("{:.0}k/s @ {time}", rate / 1000.0));
                }
            }
            Mode::Lines { last } => {
                if done.is_multiple_of(1024) && last.elapsed() >= LINE_EVERY {
                    *last = Instant::now();
                    let elapsed = self.started.elapsed().as_secs_f64();
                    let rate = done as f64 / elapsed.max(1e-9);
                    let eta_s = (self.total.saturating_sub(done)) as f64 / rate.max(1e-9);
                    tracing::info!(
                        events = done,
                        total = self.total,
                        percent = format!("{:.1}", 100.0 * done as f64 / self.total.max(1) as f64),
                        events_per_sec = rate as u64,
                        eta_s = eta_s as u64,
                        event_time = %format_time(Some(event_time_ms)),
                        "replay progress"
                    );
                }
            }
            Mode::Quiet => {}
        }
    }

    pub(crate) fn finish(&mut self, done: u64) {
        if let Mode::Bar(bar) = &self.mode {
            bar.set_position(done);
            bar.finish_and_clear();
        }
    }
}

/// RFC 3339 with milliseconds, or "-" when there is no time.
pub(crate) fn format_time(ms: Option<i64>) -> String {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| "-".into())
}
