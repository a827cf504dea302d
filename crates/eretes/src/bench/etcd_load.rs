//! What etcd itself spent during a benchmark's window, so that a claim rate
//! can be read against the store's limits: the CPU time of the etcd server
//! (from `/proc`, when the benchmark is given its process id) and the watch
//! events it sent (its Prometheus metrics, served on its client URL).
//!
//! Both are optional: an etcd on another machine has no `/proc` entry here,
//! and one whose client URL needs TLS is not scraped. What is missing is
//! reported as `null`, never guessed.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// etcd's counter of the events its watchers were sent (etcd 3.4 and later).
const EVENTS_SENT: &str = "etcd_debugging_mvcc_events_total";

/// How long a scrape of etcd's metrics may take before it is left out.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where to read etcd's load from.
#[derive(Debug, Clone, Default)]
pub(super) struct EtcdProbe {
    /// The etcd server's process id, checked to exist.
    pid: Option<i32>,
    /// `<first client URL>/metrics`, when that URL is plain http.
    metrics_url: Option<String>,
}

/// One reading of the probe.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct EtcdReading {
    cpu_s: Option<f64>,
    events_sent: Option<f64>,
}

impl EtcdProbe {
    /// A probe of the etcd at `urls` (comma-separated client URLs, as given
    /// to `--etcd`) whose server runs as `pid`. A pid that names no process
    /// is an error, so that a typo does not silently drop the figure.
    pub(super) fn new(urls: Option<&str>, pid: Option<u32>) -> Result<Self> {
        let pid = match pid {
            Some(pid) => {
                let pid = i32::try_from(pid).context("--etcd-pid is out of range")?;
                if let Err(error) = super::idle::cpu_seconds(pid) {
                    bail!("--etcd-pid {pid}: cannot read the process's CPU time: {error}");
                }
                Some(pid)
            }
            None => None,
        };
        let metrics_url = urls
            .and_then(|urls| urls.split(',').next())
            .map(str::trim)
            .filter(|url| url.starts_with("http://"))
            .map(|url| format!("{}/metrics", url.trim_end_matches('/')));
        Ok(EtcdProbe { pid, metrics_url })
    }

    /// Read etcd's counters now.
    pub(super) async fn read(&self) -> EtcdReading {
        let cpu_s = self.pid.and_then(|pid| super::idle::cpu_seconds(pid).ok());
        let events_sent = match &self.metrics_url {
            Some(url) => scrape(url, EVENTS_SENT).await,
            None => None,
        };
        EtcdReading { cpu_s, events_sent }
    }
}

impl EtcdReading {
    /// What etcd spent between `self` and `later`, over a window of
    /// `seconds` in which `claims` tasks were claimed, as JSON fields.
    pub(super) fn report(&self, later: &EtcdReading, seconds: f64, claims: usize) -> Value {
        let cpu = self.cpu_s.zip(later.cpu_s).map(|(a, b)| b - a);
        let events = self.events_sent.zip(later.events_sent).map(|(a, b)| b - a);
        let round = |value: f64, places: i32| {
            let scale = 10f64.powi(places);
            (value * scale).round() / scale
        };
        json!({
            "etcd_cpu_cores": cpu.map(|cpu| round(cpu / seconds, 2)),
            "etcd_cpu_us_per_claim": cpu.map(|cpu| round(cpu * 1e6 / claims as f64, 1)),
            "etcd_watch_events_per_claim": events.map(|events| round(events / claims as f64, 2)),
        })
    }
}

/// The value of the unlabelled sample `name` in the Prometheus text at
/// `url`; `None` if it cannot be read.
async fn scrape(url: &str, name: &str) -> Option<f64> {
    let client = reqwest::Client::builder()
        .timeout(SCRAPE_TIMEOUT)
        .build()
        .ok()?;
    let text = client.get(url).send().await.ok()?.text().await.ok()?;
    sample(&text, name)
}

/// The value of the unlabelled sample `name` in Prometheus text.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (metric, value) = line.split_once(' ')?;
            (metric == name).then(|| value.trim().parse().ok())?
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_is_found_by_its_exact_name() {
        let text = "# HELP etcd_debugging_mvcc_events_total Total events.\n\
                    # TYPE etcd_debugging_mvcc_events_total counter\n\
                    etcd_debugging_mvcc_events_total_extra 9\n\
                    etcd_debugging_mvcc_events_total 165749\n";
        assert_eq!(sample(text, EVENTS_SENT), Some(165_749.0));
        assert_eq!(sample(text, "etcd_missing"), None);
        assert_eq!(
            sample("etcd_debugging_mvcc_events_total x\n", EVENTS_SENT),
            None
        );
    }

    #[test]
    fn only_a_plain_http_url_is_scraped_and_a_missing_pid_is_refused() {
        let probe = EtcdProbe::new(Some("http://127.0.0.1:2379/,http://b:2379"), None).unwrap();
        assert_eq!(
            probe.metrics_url.as_deref(),
            Some("http://127.0.0.1:2379/metrics")
        );
        let tls = EtcdProbe::new(Some("https://127.0.0.1:2379"), None).unwrap();
        assert_eq!(tls.metrics_url, None);
        // No process has pid i32::MAX (pid_max is at most 2^22).
        let error = EtcdProbe::new(None, Some(i32::MAX as u32)).unwrap_err();
        assert!(error.to_string().contains("--etcd-pid"), "{error}");
    }

    #[test]
    fn what_was_not_read_is_reported_as_null() {
        let before = EtcdReading {
            cpu_s: Some(10.0),
            events_sent: None,
        };
        let after = EtcdReading {
            cpu_s: Some(12.0),
            events_sent: Some(5.0),
        };
        let report = before.report(&after, 4.0, 1000);
        assert_eq!(report["etcd_cpu_cores"], json!(0.5));
        assert_eq!(report["etcd_cpu_us_per_claim"], json!(2000.0));
        assert_eq!(report["etcd_watch_events_per_claim"], Value::Null);
    }
}
