//! One progress line per build step: a spinner with the elapsed time on a terminal, plain
//! `[n/N] step ... done in X s` lines otherwise (CI logs).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub struct Steps {
    total: usize,
    n: usize,
    quiet: bool,
    current: Option<(String, Instant, Option<ProgressBar>)>,
    /// (step, seconds) of every finished step.
    pub timings: Vec<(String, f64)>,
}

impl Steps {
    pub fn new(total: usize, quiet: bool) -> Self {
        Self {
            total,
            n: 0,
            quiet,
            current: None,
            timings: Vec::new(),
        }
    }

    /// Finishes the running step (if any) and starts the next.
    pub fn start(&mut self, what: &str) {
        self.finish();
        self.n += 1;
        let label = format!("[{}/{}] {what}", self.n, self.total);
        let bar = if !self.quiet && std::io::stderr().is_terminal() {
            let b = ProgressBar::new_spinner();
            b.set_style(
                ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b.set_message(label.clone());
            b.enable_steady_tick(Duration::from_millis(200));
            Some(b)
        } else {
            if !self.quiet {
                eprintln!("{label} ...");
            }
            None
        };
        self.current = Some((label, Instant::now(), bar));
    }

    /// Adds a remark to the running step (shown on a terminal; printed otherwise).
    pub fn note(&self, text: &str) {
        match &self.current {
            Some((label, _, Some(bar))) => bar.set_message(format!("{label}: {text}")),
            _ if !self.quiet => eprintln!("      {text}"),
            _ => {}
        }
    }

    pub fn finish(&mut self) {
        if let Some((label, started, bar)) = self.current.take() {
            let secs = started.elapsed().as_secs_f64();
            let line = format!("{label}: done in {secs:.1} s");
            match bar {
                Some(b) => b.finish_with_message(line),
                None if !self.quiet => eprintln!("{line}"),
                None => {}
            }
            let name = label.split_once("] ").map_or(label.as_str(), |x| x.1);
            self.timings.push((name.to_owned(), secs));
        }
    }

    /// Abandons the running step (on an error).
    pub fn fail(&mut self) {
        if let Some((label, started, bar)) = self.current.take() {
            let line = format!(
                "{label}: FAILED after {:.1} s",
                started.elapsed().as_secs_f64()
            );
            match bar {
                Some(b) => b.abandon_with_message(line),
                None => eprintln!("{line}"),
            }
        }
    }
}

impl Drop for Steps {
    fn drop(&mut self) {
        if self.current.is_some() {
            self.fail();
        }
    }
}
