//! How the agent gives free heap pages back to the system, with glibc's
//! malloc (the binary's allocator). [`super::memory`] decides *when*; this
//! module is *how*, and why glibc needs more than one `malloc_trim` for it.
//!
//! After a burst of tasks ends, four things keep freed pages resident:
//!
//! 1. **The per-thread caches.** glibc keeps up to seven freed chunks of each
//!    small size (up to 1,032 bytes) per thread, its *tcache*; to the arena
//!    they are in use. After a burst they lie scattered over the pages the
//!    burst used, each pinning its page against `malloc_trim`. In an agent
//!    40 s after 2,000 tasks were removed, 600 of the 980 pages left in its
//!    arenas were held only by the two runtime workers' caches. glibc has no
//!    call that empties a live thread's cache, so [`flush_thread_cache`]
//!    takes every cached chunk out and lets a short-lived thread free them:
//!    glibc empties an exiting thread's cache into the arenas. Each runtime
//!    worker does this when it next parks after [`return_free_pages`] asked
//!    for it ([`flush_thread_cache_if_asked`] is the runtime's park hook).
//! 2. **Dynamic thresholds.** Once a large block (say a 1 MiB listing) has
//!    been freed, glibc raises its mmap threshold to that size and its trim
//!    threshold to twice that, so arenas keep megabytes of free space at
//!    their top, which `malloc_trim` does not return for the arenas of other
//!    threads than the main one. [`tune`] fixes both at glibc's initial
//!    128 KiB.
//! 3. **Threads that outlive the trim.** A thread of tokio's blocking pool
//!    lives on 10 s after its last job and returns its cache when it exits;
//!    if the trim itself ran there, what that thread held came back after
//!    the last trim. The trim runs on a thread of its own, which exits as
//!    soon as it is done.
//! 4. **Arenas of short-lived threads.** glibc gives a new thread an arena of
//!    its own while there are fewer than eight per core; the top of an arena
//!    other than the main one is never trimmed below 128 KiB, so each arena
//!    a passing thread created keeps up to that resident, and the more
//!    arenas, the more pages a burst's leftovers spread over. The agent's
//!    work runs on its runtime's workers (one per core) and a few blocking
//!    threads, each with its own cache in front of the arena's lock:
//!    [`tune`] allows one arena per core, at least two.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// glibc's initial mmap and trim thresholds, which [`tune`] keeps fixed.
const FIXED_THRESHOLD: libc::c_int = 128 * 1024;

/// The fewest arenas [`tune`] allows (glibc's default is eight per core).
const MIN_ARENAS: usize = 2;

/// Tune the allocator for a long-lived agent, before its threads start:
/// fixed mmap and trim thresholds (see the module's page, point 2; setting
/// the trim threshold turns glibc's dynamic adjustment off for both,
/// leaving the mmap threshold at its initial 128 KiB), and one arena per
/// core, at least [`MIN_ARENAS`] (point 4).
/// A parameter the operator set in the environment (`MALLOC_ARENA_MAX`,
/// say, or through `GLIBC_TUNABLES`) is theirs, and left alone.
pub fn tune() {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let arenas = libc::c_int::try_from(cores.max(MIN_ARENAS)).unwrap_or(libc::c_int::MAX);
    let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    for (parameter, value, what, variable, tunable) in [
        (
            libc::M_TRIM_THRESHOLD,
            FIXED_THRESHOLD,
            "a fixed trim threshold",
            "MALLOC_TRIM_THRESHOLD_",
            "glibc.malloc.trim_threshold",
        ),
        (
            libc::M_ARENA_MAX,
            arenas,
            "an arena limit",
            "MALLOC_ARENA_MAX",
            "glibc.malloc.arena_max",
        ),
    ] {
        if set_by_operator(std::env::var_os(variable).is_some(), &tunables, tunable) {
            continue;
        }
        // SAFETY: mallopt takes two integers and only sets the allocator's
        // own parameters, under its own lock.
        if unsafe { libc::mallopt(parameter, value) } != 1 {
            tracing::warn!("the allocator refused {what}");
        }
    }
}

/// Whether the operator set a malloc parameter: its environment variable
/// is set, or `tunables` (the value of `GLIBC_TUNABLES`, colon-separated
/// `name=value` pairs) names `tunable`.
fn set_by_operator(variable_set: bool, tunables: &str, tunable: &str) -> bool {
    variable_set
        || tunables
            .split(':')
            .any(|pair| pair.split('=').next() == Some(tunable))
}

/// How long [`return_free_pages`] waits for the runtime's workers to flush
/// their caches: each does when it next parks, which an idle worker does at
/// once.
const FLUSH_WAIT: Duration = Duration::from_millis(50);

/// Flush every runtime worker's thread cache, then return the free pages of
/// every arena to the system (`malloc_trim`, on a thread of its own: it
/// walks the heap, and the thread is gone before anything it held could
/// outlive the trim).
pub async fn return_free_pages() {
    FLUSHES_ASKED.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(FLUSH_WAIT).await;
    let (done, trimmed) = tokio::sync::oneshot::channel();
    let trim = move || {
        // SAFETY: malloc_trim takes a plain integer and only touches the
        // allocator's own free lists, under its own locks.
        unsafe { libc::malloc_trim(0) };
        let _ = done.send(());
    };
    match short_lived_thread("eretes-trim").spawn(trim) {
        Ok(_) => {
            let _ = trimmed.await;
        }
        Err(error) => tracing::debug!(%error, "cannot start a thread to trim the heap"),
    }
}

/// Flushes asked for so far; a worker that has done fewer flushes its
/// thread cache when it next parks.
static FLUSHES_ASKED: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// How many of [`FLUSHES_ASKED`] this thread has done.
    static FLUSHES_DONE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The runtime's park hook (`on_thread_park`): flush this thread's cache if
/// a flush was asked for since its last one, and say whether it did.
/// Otherwise it costs one atomic load.
pub fn flush_thread_cache_if_asked() -> bool {
    let asked = FLUSHES_ASKED.load(Ordering::Relaxed);
    FLUSHES_DONE.with(|done| {
        if done.get() == asked {
            return false;
        }
        done.set(asked);
        flush_thread_cache();
        true
    })
}

/// Sizes of chunk glibc's thread cache holds: 32 to 1,040 bytes, by 16.
const THREAD_CACHE_BINS: usize = 64;

/// Chunks of each size the thread cache holds (glibc's default
/// `glibc.malloc.tcache_count`). A larger tunable leaves the rest cached:
/// the flush then does less, never harm.
const THREAD_CACHE_DEPTH: usize = 7;

/// Take every chunk out of this thread's malloc cache and have a thread of
/// their own free them (see the module's page, point 1). Returns that
/// thread, or `None` if it could not start (the chunks were then freed
/// here, back into this cache: nothing gained, nothing lost).
fn flush_thread_cache() -> Option<std::thread::JoinHandle<()>> {
    // A request of `16 + 16 * bin` bytes gets a chunk of `32 + 16 * bin`
    // (8 bytes of header, rounded up to 16): the cache's bin `bin`. The
    // cache answers first, newest chunk first, so the first
    // THREAD_CACHE_DEPTH requests of a size empty its bin.
    let taken = TakenChunks(
        (0..THREAD_CACHE_BINS)
            .flat_map(|bin| std::iter::repeat_n(16 + 16 * bin, THREAD_CACHE_DEPTH))
            // SAFETY: malloc has no preconditions; a null result is freed as
            // null, which free ignores.
            .map(|request| unsafe { libc::malloc(request) } as usize)
            .collect(),
    );
    // Freed on the new thread, into its own cache, which glibc empties into
    // the arenas when the thread exits.
    match short_lived_thread("eretes-free").spawn(move || drop(taken)) {
        Ok(thread) => Some(thread),
        Err(error) => {
            tracing::debug!(%error, "cannot start a thread to flush the malloc cache");
            None
        }
    }
}

/// Chunks from `malloc`, freed when this is dropped, on the dropping thread.
struct TakenChunks(Vec<usize>);

impl Drop for TakenChunks {
    fn drop(&mut self) {
        for &chunk in &self.0 {
            // SAFETY: each address came from malloc and is freed once, here.
            unsafe { libc::free(chunk as *mut libc::c_void) };
        }
    }
}

/// A thread that runs one short job: a small stack is enough.
fn short_lived_thread(name: &str) -> std::thread::Builder {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(64 * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether this process runs [`thread_cache_probe`] (in a child of
    /// [`a_flush_hands_the_cached_chunks_back_to_the_arena`]).
    const PROBE_ENV: &str = "ERETES_THREAD_CACHE_PROBE";

    /// Bytes in use by the allocator's count (cached chunks included).
    fn in_use() -> usize {
        // SAFETY: mallinfo2 only reads the allocator's counters.
        unsafe { libc::mallinfo2() }.uordblks
    }

    /// Run in a process of its own (the test binary, started again by the
    /// test below), so that no other test allocates meanwhile: fill this
    /// thread's cache, flush it, and print what the arenas count in use
    /// before and after.
    #[test]
    #[ignore = "run by a_flush_hands_the_cached_chunks_back_to_the_arena"]
    fn thread_cache_probe() {
        if std::env::var_os(PROBE_ENV).is_none() {
            return;
        }
        // Every bin's seven chunks: allocated, then freed into the cache.
        let filled: Vec<usize> = (0..THREAD_CACHE_BINS)
            .flat_map(|bin| std::iter::repeat_n(16 + 16 * bin, THREAD_CACHE_DEPTH))
            // SAFETY: as in flush_thread_cache.
            .map(|request| unsafe { libc::malloc(request) } as usize)
            .collect();
        drop(TakenChunks(filled));
        let cached = in_use();
        let freer = flush_thread_cache().expect("the freeing thread starts");
        freer.join().expect("the freeing thread ends");
        println!(
            "probe: in use {cached} before the flush, {} after",
            in_use()
        );
    }

    #[test]
    fn a_flush_hands_the_cached_chunks_back_to_the_arena() {
        let probe = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "agent::allocator::tests::thread_cache_probe"])
            .args(["--ignored", "--nocapture", "--test-threads=1"])
            .env(PROBE_ENV, "1")
            .output()
            .expect("the test binary runs again");
        let stdout = String::from_utf8_lossy(&probe.stdout);
        assert!(probe.status.success(), "the probe failed: {stdout}");
        // The harness may print the test's name on the same line.
        let line = stdout
            .lines()
            .find_map(|line| line.find("probe:").map(|at| &line[at..]))
            .unwrap_or_else(|| panic!("no probe line in {stdout}"));
        let numbers: Vec<usize> = line
            .split_whitespace()
            .filter_map(|word| word.trim_end_matches(',').parse().ok())
            .collect();
        let [before, after] = numbers[..] else {
            panic!("two counts expected in {line:?}");
        };
        // Seven chunks of each of the 64 sizes: 7 × (32 + 48 + … + 1,040).
        let cached_bytes: usize = (0..THREAD_CACHE_BINS).map(|bin| 7 * (32 + 16 * bin)).sum();
        assert!(
            before - after.min(before) >= cached_bytes * 9 / 10,
            "the flush returned {} of {cached_bytes} cached bytes ({line})",
            before - after.min(before)
        );
    }

    #[test]
    fn parameters_the_operator_set_are_left_alone() {
        let arena_max = "glibc.malloc.arena_max";
        assert!(!set_by_operator(false, "", arena_max));
        assert!(set_by_operator(true, "", arena_max), "MALLOC_ARENA_MAX");
        assert!(set_by_operator(
            false,
            "glibc.malloc.tcache_count=0:glibc.malloc.arena_max=4",
            arena_max
        ));
        // Another tunable, or one whose name only starts the same, is not it.
        assert!(!set_by_operator(
            false,
            "glibc.malloc.tcache_count=0",
            arena_max
        ));
        assert!(!set_by_operator(
            false,
            "glibc.malloc.arena_max_x=1",
            arena_max
        ));
    }

    #[test]
    fn a_worker_flushes_once_per_request() {
        // A thread of its own: the count is per thread.
        std::thread::spawn(|| {
            // What earlier requests (of other tests) asked is done first.
            flush_thread_cache_if_asked();
            assert!(!flush_thread_cache_if_asked(), "nothing asked");
            FLUSHES_ASKED.fetch_add(1, Ordering::Relaxed);
            assert!(flush_thread_cache_if_asked(), "asked once");
            assert!(!flush_thread_cache_if_asked(), "done already");
        })
        .join()
        .unwrap();
    }
}
