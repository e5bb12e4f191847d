//! Reaping at start: every QEMU process carrying this server's label (left by an
//! earlier life killed with `kill -9`) is killed and the files of its VMs removed.

use super::VmExecutor;

impl VmExecutor {
    /// Kills every QEMU process labelled as this server's (left by an earlier life
    /// killed with `kill -9`) and removes their files; how many were killed.
    pub fn reap(&self) -> usize {
        let label = self.inner.config.label();
        let mut killed = 0;
        for pid in labelled_processes(&label) {
            #[allow(unsafe_code)]
            // SAFETY: kill(2) with a pid read from /proc; no memory is involved.
            let r = unsafe { libc::kill(pid, libc::SIGKILL) };
            if r == 0 {
                killed += 1;
            }
        }
        if let Ok(entries) = std::fs::read_dir(self.inner.config.clones_dir()) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        killed
    }
}

/// Pids of processes with `label` among their arguments.
fn labelled_processes(label: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|&b| b == 0).any(|arg| arg == label.as_bytes()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_process_by_a_whole_argument_only() {
        let label = format!("cloudpipe-vm-reaper-test-{}", std::process::id());
        // The label is the shell's `$0`; the trailing `:` keeps the shell from
        // exec'ing `sleep` in its place. `spawn` returns after the exec.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30; :", &label])
            .spawn()
            .expect("sh runs");
        let found = labelled_processes(&label);
        let partial = labelled_processes(&label[..label.len() - 1]);
        let _ = child.kill();
        let _ = child.wait();
        assert!(found.contains(&(child.id() as i32)), "{found:?}");
        assert!(!partial.contains(&(child.id() as i32)), "a prefix is not the label");
    }
}
