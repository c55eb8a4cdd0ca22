//! What the sidecar takes from its pod: file descriptors and traffic threads.

use std::path::Path;

/// Traffic threads when the container has no CPU limit. Without a quota, the core count is the
/// node's (96 on a 96-core node), not this container's share of it: as Istio does for its
/// proxies, a sidecar then starts two, and follows the quota when there is one.
pub const UNLIMITED_WORKERS: usize = 2;

/// Raises the soft open-file limit to the hard one, as Go's runtime and nginx's
/// `worker_rlimit_nofile` do: container runtimes often leave the soft limit at 1024, which a
/// proxy holding two descriptors per client connection reaches at 512 clients. Returns the
/// limit in force.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// The traffic threads to start: `configured` when set, otherwise one per core of the
/// container's CPU quota (std reads the cgroup), or `UNLIMITED_WORKERS` without a quota.
pub fn traffic_threads(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    match cpu_quota(Path::new(CGROUP_ROOT)) {
        Some(_) => available,
        None => available.min(UNLIMITED_WORKERS),
    }
}

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The container's CPU quota in cores, rounded up, if it has one: cgroup v2's `cpu.max`
/// ("max 100000" when unlimited), else v1's `cpu.cfs_quota_us` (-1 when unlimited).
fn cpu_quota(root: &Path) -> Option<usize> {
    let read = |file: &str| std::fs::read_to_string(root.join(file)).ok();
    let (quota, period) = match read("cpu.max") {
        Some(max) => {
            let mut fields = max.split_whitespace();
            (fields.next()?.to_owned(), fields.next()?.to_owned())
        }
        None => (
            read("cpu/cpu.cfs_quota_us")?.trim().to_owned(),
            read("cpu/cpu.cfs_period_us")?.trim().to_owned(),
        ),
    };
    let quota: i64 = quota.parse().ok()?;
    let period: i64 = period.parse().ok()?;
    (quota > 0 && period > 0).then(|| (quota as usize).div_ceil(period as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A made-up cgroup directory holding `files`.
    fn cgroup(files: &[(&str, &str)]) -> std::path::PathBuf {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("graceful-cgroup-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, content) in files {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        dir
    }

    #[test]
    fn a_quota_is_read_from_cgroup_v2_then_v1_and_rounded_up() {
        let v2 = cgroup(&[("cpu.max", "150000 100000\n")]);
        assert_eq!(cpu_quota(&v2), Some(2));
        let unlimited = cgroup(&[("cpu.max", "max 100000\n")]);
        assert_eq!(cpu_quota(&unlimited), None);
        let v1 = cgroup(&[
            ("cpu/cpu.cfs_quota_us", "50000\n"),
            ("cpu/cpu.cfs_period_us", "100000\n"),
        ]);
        assert_eq!(cpu_quota(&v1), Some(1));
        let v1_unlimited = cgroup(&[
            ("cpu/cpu.cfs_quota_us", "-1\n"),
            ("cpu/cpu.cfs_period_us", "100000\n"),
        ]);
        assert_eq!(cpu_quota(&v1_unlimited), None);
        assert_eq!(cpu_quota(&cgroup(&[])), None);
    }

    #[test]
    fn a_configured_thread_count_wins() {
        assert_eq!(traffic_threads(7), 7);
        assert!(traffic_threads(0) >= 1);
    }
}
