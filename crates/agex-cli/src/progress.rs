//! Progress bars on a terminal: one per repository and service, with bytes, files and
//! rate. When stderr is not a TTY, one plain line per start instead (logs stay clean).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use agex_backup::progress::Progress;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Bars for a backup run on a terminal; one log line per service and repository as it
/// starts otherwise (the journal of a timer unit); nothing with `--json`.
pub fn bars(json: bool) -> Option<Arc<dyn Progress>> {
    if json {
        return None;
    }
    if !std::io::stderr().is_terminal() {
        return Some(Arc::new(Lines));
    }
    Some(Arc::new(Bars {
        multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
        bars: Mutex::new(HashMap::new()),
    }))
}

/// Plain progress for logs: a line when a repository starts on a service; the result
/// line comes with the summary.
#[derive(Debug)]
struct Lines;

impl Progress for Lines {
    fn start(&self, service: &str, repo: &str) {
        tracing::info!("{service} → {repo}: started");
    }
    fn total(&self, _: &str, _: &str, _: u64, _: u64) {}
    fn update(&self, _: &str, _: &str, _: u64, _: u64) {}
    fn finish(&self, _: &str, _: &str, _: bool) {}
}

#[derive(Debug)]
struct Bars {
    multi: MultiProgress,
    /// Each bar and its service's file count (0 until the walk has counted).
    bars: Mutex<HashMap<(String, String), (ProgressBar, u64)>>,
}

impl Bars {
    fn with(&self, service: &str, repo: &str, f: impl FnOnce(&ProgressBar, &mut u64)) {
        let mut bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((bar, files)) = bars.get_mut(&(service.to_string(), repo.to_string())) {
            f(bar, files);
        }
    }
}

impl Progress for Bars {
    fn start(&self, service: &str, repo: &str) {
        let style = ProgressStyle::with_template(
            "{prefix:.bold} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let bar = self.multi.add(ProgressBar::new(0));
        bar.set_style(style);
        bar.set_prefix(format!("{service} → {repo}"));
        bar.set_message("counting files");
        self.bars
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((service.to_string(), repo.to_string()), (bar, 0));
    }

    fn total(&self, service: &str, repo: &str, bytes: u64, files: u64) {
        self.with(service, repo, |bar, total| {
            *total = files;
            bar.set_length(bytes.max(bar.position()));
        });
    }

    fn update(&self, service: &str, repo: &str, bytes: u64, files: u64) {
        self.with(service, repo, |bar, total| {
            if bytes > bar.length().unwrap_or(0) {
                bar.set_length(bytes);
            }
            bar.set_position(bytes);
            bar.set_message(if *total > 0 {
                format!("{}/{total} files", files.min(*total))
            } else {
                format!("{files} files")
            });
        });
    }

    fn finish(&self, service: &str, repo: &str, ok: bool) {
        self.with(service, repo, |bar, &mut total| {
            if ok {
                bar.set_position(bar.length().unwrap_or(0));
                bar.finish_with_message(format!("{total}/{total} files, done"));
            } else {
                bar.abandon_with_message("FAILED");
            }
        });
    }
}
