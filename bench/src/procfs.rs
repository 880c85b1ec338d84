//! CPU time and RSS from /proc for the server process(es) and ourselves.

use std::time::Instant;

/// Clock ticks per second for /proc/*/stat times, and whether it was assumed.
pub fn clk_tck() -> (u64, bool) {
    #[cfg(target_os = "linux")]
    {
        use std::ffi::{c_int, c_long};
        extern "C" {
            fn sysconf(name: c_int) -> c_long;
        }
        // _SC_CLK_TCK is 2 on Linux (glibc and musl).
        const SC_CLK_TCK: c_int = 2;
        // SAFETY: sysconf has no preconditions; it only reads a constant.
        let v = unsafe { sysconf(SC_CLK_TCK) };
        if v > 0 {
            return (v as u64, false);
        }
    }
    (100, true)
}

/// utime + stime in clock ticks for `pid` ("self" allowed).
pub fn cpu_ticks(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_ticks(&s)
}

/// Parses utime+stime (fields 14 and 15) out of a /proc/PID/stat line. The
/// command name (field 2) may contain spaces and parentheses, so fields are
/// counted from the last ')'.
pub fn parse_stat_ticks(s: &str) -> Option<u64> {
    let after = &s[s.rfind(')')? + 1..];
    let mut it = after.split_whitespace();
    // after ')' the first field is field 3 (state); utime is field 14.
    let utime: u64 = it.nth(11)?.parse().ok()?;
    let stime: u64 = it.next()?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS in kB for `pid` ("self" allowed).
pub fn rss_kb(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vmrss(&s)
}

pub fn parse_vmrss(s: &str) -> Option<u64> {
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Sum of VmRSS over several pids; None if no pids or any is unreadable.
pub fn total_rss_kb(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| rss_kb(&p.to_string())).sum()
}

/// A CPU snapshot of the server pids and of this process.
#[derive(Debug, Clone)]
pub struct CpuSample {
    at: Instant,
    server_ticks: Option<u64>,
    self_ticks: Option<u64>,
}

impl CpuSample {
    pub fn take(pids: &[u32]) -> Self {
        let server_ticks = if pids.is_empty() {
            None
        } else {
            pids.iter().map(|p| cpu_ticks(&p.to_string())).sum()
        };
        CpuSample {
            at: Instant::now(),
            server_ticks,
            self_ticks: cpu_ticks("self"),
        }
    }
}

/// CPU use between two samples.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuDelta {
    /// Total server CPU in µs (all pids), None without pids.
    pub server_us: Option<f64>,
    /// Server CPU as % of one core.
    pub server_percent: Option<f64>,
    /// Generator CPU as % of one core.
    pub generator_percent: Option<f64>,
}

pub fn cpu_delta(a: &CpuSample, b: &CpuSample) -> CpuDelta {
    let (tck, _) = clk_tck();
    let wall_us = b.at.duration_since(a.at).as_secs_f64() * 1e6;
    let to_us = |t0: Option<u64>, t1: Option<u64>| -> Option<f64> {
        Some(t1?.saturating_sub(t0?) as f64 * 1e6 / tck as f64)
    };
    let server_us = to_us(a.server_ticks, b.server_ticks);
    let gen_us = to_us(a.self_ticks, b.self_ticks);
    let pct = |us: Option<f64>| us.filter(|_| wall_us > 0.0).map(|u| u * 100.0 / wall_us);
    CpuDelta {
        server_us,
        server_percent: pct(server_us),
        generator_percent: pct(gen_us),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_weird_comm() {
        let line = "1234 (my (weird) proc) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 4 0 100 1000 50 18446744073709551615";
        assert_eq!(parse_stat_ticks(line), Some(325));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn parses_vmrss() {
        let s = "Name:\tx\nVmPeak:\t  1000 kB\nVmRSS:\t  4321 kB\nThreads:\t1\n";
        assert_eq!(parse_vmrss(s), Some(4321));
        assert_eq!(parse_vmrss("Name: x\n"), None);
    }

    #[test]
    fn reads_self() {
        assert!(cpu_ticks("self").is_some());
        assert!(rss_kb("self").unwrap() > 0);
        let (tck, _) = clk_tck();
        assert!(tck > 0);
        let a = CpuSample::take(&[]);
        let b = CpuSample::take(&[]);
        let d = cpu_delta(&a, &b);
        assert!(d.server_us.is_none() && d.server_percent.is_none());
        assert!(total_rss_kb(&[]).is_none());
        assert!(total_rss_kb(&[std::process::id()]).unwrap() > 0);
    }
}
