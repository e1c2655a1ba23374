//! Process hardening for the serving process and every admin command: no core dumps (a core
//! file would hold keys and PANs in clear) and, on request, memory locked so secrets are never
//! swapped to disk.

/// Sets RLIMIT_CORE to 0 and marks the process not dumpable (which also keeps other
/// unprivileged processes from ptrace-attaching). Returns what could not be done.
pub fn disable_core_dumps() -> Vec<String> {
    let mut problems = Vec::new();
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads a valid, initialised struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) } != 0 {
        problems.push(format!(
            "setrlimit(RLIMIT_CORE, 0): {}",
            std::io::Error::last_os_error()
        ));
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_DUMPABLE takes plain integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
            problems.push(format!(
                "prctl(PR_SET_DUMPABLE, 0): {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    problems
}

/// [`disable_core_dumps`] for a command that may hold a master key or card numbers (every
/// command that opens the vault calls it before reading the key); problems are warnings.
/// Idempotent.
pub fn harden_process() {
    for problem in disable_core_dumps() {
        tracing::warn!(problem = %problem, "could not fully disable core dumps");
    }
}

/// Whether the kernel would write a core file for this process or let an unprivileged
/// process of the same user attach to it (`PR_GET_DUMPABLE`); None where unknown.
pub fn dumpable() -> Option<bool> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_GET_DUMPABLE takes no pointer arguments.
        let r = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
        if r >= 0 {
            return Some(r != 0);
        }
    }
    None
}

/// Locks current and future memory (`--mlock`). Fails without CAP_IPC_LOCK or a high enough
/// RLIMIT_MEMLOCK; the caller warns and goes on.
pub fn lock_memory() -> Result<(), String> {
    // SAFETY: mlockall takes flags only.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } != 0 {
        return Err(format!("mlockall: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Core-file size limit of this process, as the kernel reports it (for tests and `health`).
pub fn core_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a valid struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut lim) } != 0 {
        return None;
    }
    Some(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    #[test]
    fn core_dumps_are_disabled_in_this_process() {
        let problems = super::disable_core_dumps();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(super::core_limit(), Some(0));
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max core file size"))
            .unwrap();
        assert!(line.split_whitespace().nth(4) == Some("0"), "{line}");
    }
}
