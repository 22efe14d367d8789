//! Progress of a long transfer: a bar on a terminal (bytes, rate, ETA), plain log lines otherwise.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    what: &'static str,
    total: u64,
    state: Mutex<(u64, Instant)>,
    started: Instant,
}

const LOG_EVERY: Duration = Duration::from_secs(10);

impl Progress {
    pub fn new(what: &'static str, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_message(what);
            bar
        });
        Self {
            bar,
            what,
            total,
            state: Mutex::new((0, Instant::now())),
            started: Instant::now(),
        }
    }

    pub fn inc(&self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
            return;
        }
        let mut s = self.state.lock().expect("progress lock");
        s.0 += n;
        if s.1.elapsed() >= LOG_EVERY {
            s.1 = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            tracing::info!(
                "{}: {} of {} ({:.0}%), {}/s",
                self.what,
                HumanBytes(s.0),
                HumanBytes(self.total),
                s.0 as f64 * 100.0 / self.total.max(1) as f64,
                HumanBytes((s.0 as f64 / secs) as u64)
            );
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
