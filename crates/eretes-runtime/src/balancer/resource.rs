//! Shed load while the machine is short of memory or CPU.
//!
//! The readings come from Linux's `/proc` through a [`ResourceSampler`], so the
//! policy can be tested with scripted samples and the parsing can be tested on
//! sample texts.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use eretes_protocol::{GroupName, TaskId};

use super::fair::newest_first;
use super::{Balancer, ClaimDecision, ClusterView};

/// One reading of the machine's load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResourceSample {
    /// Share of memory in use, 0.0–1.0 (memory the kernel could not hand out
    /// without swapping).
    pub memory_used_fraction: f64,
    /// Share of CPU time spent busy since the previous reading, 0.0–1.0, over
    /// all CPUs; `None` until two readings far enough apart exist.
    pub cpu_busy_fraction: Option<f64>,
}

/// A source of [`ResourceSample`]s.
pub trait ResourceSampler: Send {
    /// Read the current load. Called at most once per balancer call.
    fn sample(&mut self) -> io::Result<ResourceSample>;
}

/// Settings of a [`ResourceBalancer`].
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceConfig {
    /// Above this share of memory in use (0.0–1.0), stop claiming and shed
    /// tasks. Default: 0.9.
    pub memory_limit: f64,
    /// Above this share of CPU busy (0.0–1.0), stop claiming and shed tasks.
    /// Default: 0.95.
    pub cpu_limit: f64,
    /// How long the group waits after a task was declined because of load
    /// ([`ClaimDecision::RetryAfter`]), unless its counts change first.
    /// Default: 5 s (load changes slowly; asking often costs samples).
    pub claim_retry: Duration,
}

impl Default for ResourceConfig {
    fn default() -> Self {
        ResourceConfig {
            memory_limit: 0.9,
            cpu_limit: 0.95,
            claim_retry: Duration::from_secs(5),
        }
    }
}

/// Stops claiming while memory or CPU use is above its limit, and then releases
/// one task per [`Balancer::balance`] call, the most recently claimed (it has
/// done the least work), until the load is back under the limits.
///
/// One task per call, because shedding takes time to show in the readings:
/// releasing several at once on one sample would overshoot. A sampler that
/// fails does not stop the node: the failure is logged and the node behaves as
/// if it were not loaded.
pub struct ResourceBalancer {
    config: ResourceConfig,
    sampler: Box<dyn ResourceSampler>,
    /// Whether the last sample failed, so a lasting failure warns once, not on
    /// every call.
    sampler_failing: bool,
}

impl fmt::Debug for ResourceBalancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResourceBalancer")
            .field("config", &self.config)
            .field("sampler_failing", &self.sampler_failing)
            .finish_non_exhaustive()
    }
}

impl ResourceBalancer {
    /// A resource balancer reading its samples from `sampler`.
    pub fn new(config: ResourceConfig, sampler: Box<dyn ResourceSampler>) -> Self {
        ResourceBalancer {
            config,
            sampler,
            sampler_failing: false,
        }
    }

    /// A resource balancer reading this machine's `/proc`.
    pub fn from_proc(config: ResourceConfig) -> Self {
        Self::new(config, Box::new(ProcSampler::new()))
    }

    /// Its settings.
    pub fn config(&self) -> &ResourceConfig {
        &self.config
    }

    /// Takes one sample and says which limit, if any, it exceeds.
    fn over_limit(&mut self) -> Option<String> {
        let sample = match self.sampler.sample() {
            Ok(sample) => {
                if self.sampler_failing {
                    tracing::info!("resource balancer: sampling works again");
                    self.sampler_failing = false;
                }
                sample
            }
            Err(error) => {
                if self.sampler_failing {
                    tracing::debug!(%error, "resource balancer: sampling still fails");
                } else {
                    tracing::warn!(
                        %error,
                        "resource balancer: cannot sample load; claiming as if unloaded"
                    );
                    self.sampler_failing = true;
                }
                return None;
            }
        };
        if sample.memory_used_fraction > self.config.memory_limit {
            return Some(format!(
                "memory {:.3} above limit {:.3}",
                sample.memory_used_fraction, self.config.memory_limit
            ));
        }
        match sample.cpu_busy_fraction {
            Some(cpu) if cpu > self.config.cpu_limit => Some(format!(
                "cpu {:.3} above limit {:.3}",
                cpu, self.config.cpu_limit
            )),
            _ => None,
        }
    }
}

impl Balancer for ResourceBalancer {
    fn can_claim(
        &mut self,
        task: &TaskId,
        _group: &GroupName,
        _view: &ClusterView,
    ) -> ClaimDecision {
        match self.over_limit() {
            Some(reason) => {
                tracing::debug!(task = %task, %reason, "resource balancer: not claiming");
                ClaimDecision::RetryAfter(self.config.claim_retry)
            }
            None => ClaimDecision::Claim,
        }
    }

    fn balance(&mut self, view: &ClusterView) -> Vec<TaskId> {
        let Some(reason) = self.over_limit() else {
            return Vec::new();
        };
        let released: Vec<TaskId> = newest_first(view, |_| true).into_iter().take(1).collect();
        if let Some(task) = released.first() {
            tracing::info!(task = %task, %reason, "resource balancer: releasing the newest task");
        }
        released
    }
}

/// Memory figures from `/proc/meminfo`, in kB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    /// `MemTotal`: usable RAM.
    pub total_kb: u64,
    /// `MemAvailable`: what could be given to new work without swapping
    /// (free memory plus reclaimable caches; `MemFree` alone would count the
    /// page cache as used and make every busy machine look full).
    pub available_kb: u64,
}

impl MemInfo {
    /// `1 − available / total`, within 0.0–1.0.
    pub fn used_fraction(&self) -> f64 {
        if self.total_kb == 0 {
            return 0.0;
        }
        (1.0 - self.available_kb as f64 / self.total_kb as f64).clamp(0.0, 1.0)
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Parses the text of `/proc/meminfo` (lines like `MemTotal:  16310360 kB`).
///
/// Errors (never panics) when `MemTotal` or `MemAvailable` is missing (kernels
/// before 3.14 lack the latter), not a number, not in kB, or when `MemTotal`
/// is 0. Other lines are ignored.
pub fn parse_meminfo(text: &str) -> io::Result<MemInfo> {
    let mut total = None;
    let mut available = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let slot = match key.trim() {
            "MemTotal" => &mut total,
            "MemAvailable" => &mut available,
            _ => continue,
        };
        if slot.is_some() {
            continue; // the kernel prints each once; keep the first
        }
        let mut parts = value.split_whitespace();
        let number = parts.next().unwrap_or("");
        let kb: u64 = number.parse().map_err(|_| {
            invalid(format!(
                "/proc/meminfo: {} is not a number: {:?}",
                key.trim(),
                number
            ))
        })?;
        match parts.next() {
            None | Some("kB") => {}
            Some(unit) => {
                return Err(invalid(format!(
                    "/proc/meminfo: {} has unit {unit:?}, expected kB",
                    key.trim()
                )))
            }
        }
        *slot = Some(kb);
    }
    let total_kb = total.ok_or_else(|| invalid("/proc/meminfo: no MemTotal line".into()))?;
    let available_kb = available.ok_or_else(|| {
        invalid("/proc/meminfo: no MemAvailable line (Linux 3.14 or later is needed)".into())
    })?;
    if total_kb == 0 {
        return Err(invalid("/proc/meminfo: MemTotal is 0".into()));
    }
    Ok(MemInfo {
        total_kb,
        available_kb,
    })
}

/// Cumulative CPU time of all CPUs from the aggregate `cpu` line of
/// `/proc/stat`, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    /// user + nice + system + idle + iowait + irq + softirq + steal. Guest time
    /// is already part of user and nice, so it is not added again.
    pub total: u64,
    /// idle + iowait: time the CPUs had nothing to run.
    pub idle: u64,
}

impl CpuTimes {
    /// Share of the time between `earlier` and `self` the CPUs were busy, or
    /// `None` when no time passed or the counters went backwards (a reset).
    pub fn busy_fraction_since(&self, earlier: &CpuTimes) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total).filter(|&t| t > 0)?;
        // iowait may decrease slightly between reads on some kernels: clamp.
        let idle = self.idle.saturating_sub(earlier.idle).min(total);
        Some((total - idle) as f64 / total as f64)
    }
}

/// Parses the aggregate `cpu` line of the text of `/proc/stat`
/// (`cpu  user nice system idle iowait irq softirq steal guest guest_nice`).
///
/// Kernels older than 2.6.33 print fewer columns; missing ones count as 0, but
/// at least user, nice, system and idle must be there. Errors (never panics) if
/// the line is missing, too short, or not numbers.
pub fn parse_proc_stat_cpu(text: &str) -> io::Result<CpuTimes> {
    let line = text
        .lines()
        .find(|line| line.split_whitespace().next() == Some("cpu"))
        .ok_or_else(|| invalid("/proc/stat: no aggregate \"cpu\" line".into()))?;
    // user nice system idle iowait irq softirq steal; guest and guest_nice
    // (columns 9 and 10) are included in user and nice already.
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|field| {
            field
                .parse::<u64>()
                .map_err(|_| invalid(format!("/proc/stat: bad cpu field {field:?} in {line:?}")))
        })
        .collect::<io::Result<_>>()?;
    if fields.len() < 4 {
        return Err(invalid(format!(
            "/proc/stat: cpu line has {} fields, expected at least 4: {line:?}",
            fields.len()
        )));
    }
    let overflow = || invalid("/proc/stat: cpu times overflow".into());
    let total = fields
        .iter()
        .try_fold(0u64, |sum, &field| sum.checked_add(field))
        .ok_or_else(overflow)?;
    let idle = fields[3]
        .checked_add(fields.get(4).copied().unwrap_or(0))
        .ok_or_else(overflow)?;
    Ok(CpuTimes { total, idle })
}

/// Fewest clock ticks (summed over all CPUs; usually 100 per second per CPU)
/// between two `/proc/stat` readings for a CPU figure. Readings closer together
/// than that, as happens when many claims are asked about in a burst, would
/// give noisy figures, so the earlier figure is kept until this much has passed.
const MIN_CPU_WINDOW_TICKS: u64 = 100;

/// Samples memory from `/proc/meminfo` and CPU from `/proc/stat` (Linux).
///
/// Memory used is `1 − MemAvailable / MemTotal`. CPU busy is measured between
/// consecutive readings, so the first sample has no CPU figure.
#[derive(Debug, Clone)]
pub struct ProcSampler {
    meminfo_path: PathBuf,
    stat_path: PathBuf,
    /// The reading the next CPU figure is measured from.
    baseline: Option<CpuTimes>,
    /// The latest CPU figure, reported until a newer one is measured.
    last_cpu: Option<f64>,
}

impl Default for ProcSampler {
    fn default() -> Self {
        Self::new()
    }
}

impl ProcSampler {
    /// Reads `/proc/meminfo` and `/proc/stat`.
    pub fn new() -> Self {
        Self::with_paths("/proc/meminfo", "/proc/stat")
    }

    /// Reads files in the formats of `/proc/meminfo` and `/proc/stat` from
    /// other paths (for example a container's view, or test fixtures).
    pub fn with_paths(meminfo: impl Into<PathBuf>, stat: impl Into<PathBuf>) -> Self {
        ProcSampler {
            meminfo_path: meminfo.into(),
            stat_path: stat.into(),
            baseline: None,
            last_cpu: None,
        }
    }

    fn read(path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path).map_err(|error| {
            io::Error::new(error.kind(), format!("reading {}: {error}", path.display()))
        })
    }
}

impl ResourceSampler for ProcSampler {
    fn sample(&mut self) -> io::Result<ResourceSample> {
        let memory = parse_meminfo(&Self::read(&self.meminfo_path)?)?;
        let now = parse_proc_stat_cpu(&Self::read(&self.stat_path)?)?;
        match self.baseline {
            // Counters went backwards: start measuring afresh.
            Some(base) if now.total < base.total => self.baseline = Some(now),
            Some(base) => {
                if now.total - base.total >= MIN_CPU_WINDOW_TICKS {
                    self.last_cpu = now.busy_fraction_since(&base);
                    self.baseline = Some(now);
                }
            }
            None => self.baseline = Some(now),
        }
        Ok(ResourceSample {
            memory_used_fraction: memory.used_fraction(),
            cpu_busy_fraction: self.last_cpu,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use eretes_protocol::NodeName;
    use tokio::time::Instant;

    use super::*;
    use crate::balancer::RunningTask;

    const MEMINFO: &str = "\
MemTotal:       16000000 kB
MemFree:          500000 kB
MemAvailable:    4000000 kB
Buffers:          100000 kB
Cached:          3000000 kB
HugePages_Total:       0
";

    const STAT: &str = "\
cpu  100 20 30 800 50 5 5 10 40 2
cpu0 50 10 15 400 25 2 3 5 20 1
cpu1 50 10 15 400 25 3 2 5 20 1
intr 12345 0 0
ctxt 999
";

    #[test]
    fn meminfo_uses_available_not_free() {
        let info = parse_meminfo(MEMINFO).unwrap();
        assert_eq!(
            info,
            MemInfo {
                total_kb: 16_000_000,
                available_kb: 4_000_000
            }
        );
        assert!((info.used_fraction() - 0.75).abs() < 1e-12);
    }

    #[test]
    fn meminfo_errors_clearly_on_bad_input() {
        let missing = parse_meminfo("MemTotal: 100 kB\nMemFree: 50 kB\n").unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::InvalidData);
        assert!(missing.to_string().contains("MemAvailable"), "{missing}");
        let missing = parse_meminfo("MemAvailable: 100 kB\n").unwrap_err();
        assert!(missing.to_string().contains("MemTotal"), "{missing}");
        for bad in [
            "MemTotal: lots kB\nMemAvailable: 1 kB\n",
            "MemTotal: -5 kB\nMemAvailable: 1 kB\n",
            "MemTotal:\nMemAvailable: 1 kB\n",
            "MemTotal: 10 MB\nMemAvailable: 1 kB\n",
            "MemTotal: 0 kB\nMemAvailable: 0 kB\n",
            "MemTotal: 99999999999999999999999 kB\nMemAvailable: 1 kB\n",
            "",
            "\u{0}\u{fffd}garbage:::\n",
        ] {
            assert!(parse_meminfo(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn meminfo_clamps_odd_values() {
        let info = parse_meminfo("MemTotal: 10 kB\nMemAvailable: 20 kB\n").unwrap();
        assert_eq!(info.used_fraction(), 0.0);
    }

    #[test]
    fn proc_stat_sums_the_right_columns() {
        let cpu = parse_proc_stat_cpu(STAT).unwrap();
        // 100+20+30+800+50+5+5+10: guest (40) and guest_nice (2) excluded.
        assert_eq!(
            cpu,
            CpuTimes {
                total: 1020,
                idle: 850
            }
        );
        // Old kernels: four columns.
        assert_eq!(
            parse_proc_stat_cpu("cpu 1 2 3 4\n").unwrap(),
            CpuTimes { total: 10, idle: 4 }
        );
    }

    #[test]
    fn proc_stat_errors_on_bad_input() {
        for bad in [
            "",
            "cpu0 1 2 3 4 5 6 7 8\n",
            "cpu 1 2 3\n",
            "cpu 1 2 x 4 5\n",
            "cpu -1 2 3 4\n",
            "cpu 18446744073709551615 1 0 0\n",
            "intr 1 2 3\n",
        ] {
            let err = parse_proc_stat_cpu(bad).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{bad:?}");
        }
    }

    #[test]
    fn busy_fraction_excludes_idle_and_iowait() {
        let a = CpuTimes {
            total: 1000,
            idle: 800,
        };
        // 100 ticks passed, 25 of them idle or iowait.
        let b = CpuTimes {
            total: 1100,
            idle: 825,
        };
        assert_eq!(b.busy_fraction_since(&a), Some(0.75));
        assert_eq!(a.busy_fraction_since(&a), None);
        assert_eq!(a.busy_fraction_since(&b), None);
        // Idle going backwards (iowait quirk) reads as fully busy, not as > 1.
        let c = CpuTimes {
            total: 1100,
            idle: 700,
        };
        assert_eq!(c.busy_fraction_since(&a), Some(1.0));
    }

    #[test]
    fn proc_sampler_measures_cpu_between_reads_of_files() {
        let dir = std::env::temp_dir().join(format!("eretes-proc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (meminfo, stat) = (dir.join("meminfo"), dir.join("stat"));
        std::fs::write(&meminfo, MEMINFO).unwrap();
        std::fs::write(&stat, "cpu 100 0 0 900 0 0 0 0\n").unwrap();
        let mut sampler = ProcSampler::with_paths(&meminfo, &stat);
        let first = sampler.sample().unwrap();
        assert_eq!(first.cpu_busy_fraction, None);
        assert!((first.memory_used_fraction - 0.75).abs() < 1e-12);
        // Too little time for a figure: still none.
        std::fs::write(&stat, "cpu 110 0 0 910 0 0 0 0\n").unwrap();
        assert_eq!(sampler.sample().unwrap().cpu_busy_fraction, None);
        // 200 ticks since the baseline, 150 busy.
        std::fs::write(&stat, "cpu 250 0 0 950 0 0 0 0\n").unwrap();
        assert_eq!(sampler.sample().unwrap().cpu_busy_fraction, Some(0.75));
        // A short window keeps the last figure.
        std::fs::write(&stat, "cpu 251 0 0 950 0 0 0 0\n").unwrap();
        assert_eq!(sampler.sample().unwrap().cpu_busy_fraction, Some(0.75));
        // Broken file: an error, not a panic.
        std::fs::write(&stat, "cpu nonsense\n").unwrap();
        assert!(sampler.sample().is_err());
        std::fs::remove_file(&stat).unwrap();
        let err = sampler.sample().unwrap_err();
        assert!(err.to_string().contains("stat"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn proc_sampler_reads_this_machine() {
        let mut sampler = ProcSampler::new();
        let first = sampler.sample().unwrap();
        assert!((0.0..=1.0).contains(&first.memory_used_fraction));
        assert!(
            first.memory_used_fraction > 0.0,
            "a running machine uses some memory"
        );
        assert_eq!(first.cpu_busy_fraction, None);
        // Wait (up to 5 s) for enough ticks to pass for a CPU figure.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let cpu = loop {
            std::thread::sleep(Duration::from_millis(50));
            if let Some(cpu) = sampler.sample().unwrap().cpu_busy_fraction {
                break cpu;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no CPU figure after 5 s"
            );
        };
        assert!((0.0..=1.0).contains(&cpu), "{cpu}");
    }

    /// Plays back scripted samples and counts calls.
    struct Script {
        samples: VecDeque<io::Result<ResourceSample>>,
        calls: Arc<Mutex<usize>>,
    }

    impl ResourceSampler for Script {
        fn sample(&mut self) -> io::Result<ResourceSample> {
            *self.calls.lock().unwrap() += 1;
            self.samples.pop_front().expect("script ran out")
        }
    }

    fn ok(memory: f64, cpu: Option<f64>) -> io::Result<ResourceSample> {
        Ok(ResourceSample {
            memory_used_fraction: memory,
            cpu_busy_fraction: cpu,
        })
    }

    fn balancer(samples: Vec<io::Result<ResourceSample>>) -> (ResourceBalancer, Arc<Mutex<usize>>) {
        let calls = Arc::new(Mutex::new(0));
        let script = Script {
            samples: samples.into(),
            calls: calls.clone(),
        };
        (
            ResourceBalancer::new(ResourceConfig::default(), Box::new(script)),
            calls,
        )
    }

    fn view() -> ClusterView {
        let mut view = ClusterView::new(NodeName::new("n").unwrap());
        let start = Instant::now();
        for (i, group) in ["g", "h", "g"].into_iter().enumerate() {
            view.running.insert(
                TaskId::new(format!("t{i}")).unwrap(),
                RunningTask {
                    group: GroupName::new(group).unwrap(),
                    epoch: i as i64,
                    claimed_at: start + Duration::from_secs(i as u64),
                },
            );
        }
        view
    }

    #[test]
    fn defaults_are_documented_values() {
        let config = ResourceConfig::default();
        assert_eq!(config.memory_limit, 0.9);
        assert_eq!(config.cpu_limit, 0.95);
        assert_eq!(config.claim_retry, Duration::from_secs(5));
    }

    #[test]
    fn refuses_claims_while_over_a_limit() {
        let (mut b, calls) = balancer(vec![
            ok(0.5, None),
            ok(0.95, Some(0.1)),
            ok(0.5, Some(0.99)),
            ok(0.9, Some(0.95)), // exactly at the limits is not over
            Err(io::Error::other("boom")),
            Err(io::Error::other("boom again")),
        ]);
        let (task, group, view) = (TaskId::new("x").unwrap(), GroupName::default(), view());
        let retry = ClaimDecision::RetryAfter(Duration::from_secs(5));
        let decisions: Vec<_> = (0..6).map(|_| b.can_claim(&task, &group, &view)).collect();
        use ClaimDecision::Claim;
        assert_eq!(decisions, vec![Claim, retry, retry, Claim, Claim, Claim]);
        assert_eq!(*calls.lock().unwrap(), 6, "one sample per call");
    }

    #[test]
    fn sheds_one_newest_task_per_call_while_over() {
        let (mut b, calls) = balancer(vec![
            ok(0.95, None),
            ok(0.1, Some(0.99)),
            ok(0.1, Some(0.1)),
            Err(io::Error::other("boom")),
        ]);
        let mut view = view();
        let first = b.balance(&view);
        assert_eq!(first, vec![TaskId::new("t2").unwrap()]);
        view.running.remove(&first[0]);
        assert_eq!(b.balance(&view), vec![TaskId::new("t1").unwrap()]);
        assert!(b.balance(&view).is_empty(), "under the limits");
        assert!(b.balance(&view).is_empty(), "sampler errors never shed");
        assert_eq!(*calls.lock().unwrap(), 4);
    }

    #[test]
    fn over_limit_with_nothing_running_releases_nothing() {
        let (mut b, _) = balancer(vec![ok(1.0, Some(1.0))]);
        assert!(b
            .balance(&ClusterView::new(NodeName::new("n").unwrap()))
            .is_empty());
    }
}
