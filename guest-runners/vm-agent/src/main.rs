//! The guest agent of Cloudpipe's `vm` executor: `/init` of the microVM's initramfs.
//!
//! It sets up a minimal system (proc, sys, dev, a tmpfs `/tmp`, busybox's applets in
//! `/bin`), puts the first serial port in raw mode, says it is ready and waits for one
//! job. The host snapshots the VM at that point; every clone restored from the snapshot
//! wakes up here, in the middle of that wait, and gets its own job.
//!
//! # Protocol (the serial port, both ways)
//! Frames: a kind byte, a little-endian `u32` length, then that many bytes.
//! - guest → host: `R` ready (a version string), `A` armed (job received, waiting
//!   for `G`), `O` stdout bytes, `E` stderr bytes, `X` exit (`i32` status: the exit
//!   code, or minus the signal; then one byte: 1 if the guest's OOM killer ran).
//! - host → guest: `J` the job (see [`Job::parse`]), `G` go (after an armed job),
//!   `W` warm up (its payload is entropy; run a shell once, then answer `w` and keep
//!   waiting for the job).
//!
//! Per job the agent sets the clock from the host, mixes the host's entropy into the
//! kernel's pool and reseeds the CRNG (every clone of one snapshot starts with the
//! same RNG state), then runs the command in its own session with `RLIMIT_AS` set to
//! the job's memory limit, streaming its output back as it comes.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

const SERIAL: &str = "/dev/ttyS0";
const VERSION: &str = "cloudpipe-vm-agent 1";

fn main() {
    if std::process::id() == 1 {
        setup_system();
    }
    let path = std::env::args().nth(1).unwrap_or_else(|| SERIAL.to_string());
    if let Err(e) = serve(&path) {
        eprintln!("cloudpipe-vm-agent: {e}");
    }
    // PID 1 must not exit (the kernel would panic); the host destroys the VM.
    loop {
        unsafe { libc::pause() };
    }
}

/// Mounts the pseudo filesystems and installs busybox's applets.
fn setup_system() {
    for (src, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
        ("tmpfs", "/tmp", "tmpfs"),
    ] {
        let _ = std::fs::create_dir_all(target);
        let c = |s: &str| CString::new(s).unwrap();
        unsafe {
            libc::mount(
                c(src).as_ptr(),
                c(target).as_ptr(),
                c(fstype).as_ptr(),
                0,
                std::ptr::null(),
            );
        }
    }
    let _ = Command::new("/bin/busybox").args(["--install", "-s", "/bin"]).status();
    unsafe { std::env::set_var("PATH", "/bin:/sbin:/usr/bin:/usr/sbin") };
    unsafe { std::env::set_var("HOME", "/tmp") };
    let _ = std::env::set_current_dir("/tmp");
}

/// One job, as the host sends it in a `J` frame.
struct Job {
    clone_id: u32,
    clones: u32,
    unix_nanos: u64,
    memory_bytes: u64,
    barrier: bool,
    entropy: Vec<u8>,
    argv: Vec<Vec<u8>>,
    env: Vec<Vec<u8>>,
    stdin: Vec<u8>,
}

impl Job {
    /// `u32 clone_id, u32 clones, u64 unix_nanos, u64 memory_bytes, u8 barrier,
    /// bytes entropy, u32 argc, argc × bytes, u32 envc, envc × bytes ("K=V"),
    /// bytes stdin`; `bytes` is a `u32` length and the bytes.
    fn parse(mut b: &[u8]) -> io::Result<Job> {
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed job frame");
        fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            if b.len() < n {
                return None;
            }
            let (head, tail) = b.split_at(n);
            *b = tail;
            Some(head)
        }
        let u32_ = |b: &mut &[u8]| take(b, 4).map(|s| u32::from_le_bytes(s.try_into().unwrap()));
        let u64_ = |b: &mut &[u8]| take(b, 8).map(|s| u64::from_le_bytes(s.try_into().unwrap()));
        let bytes = |b: &mut &[u8]| {
            let n = u32_(b)? as usize;
            take(b, n).map(<[u8]>::to_vec)
        };
        let clone_id = u32_(&mut b).ok_or_else(bad)?;
        let clones = u32_(&mut b).ok_or_else(bad)?;
        let unix_nanos = u64_(&mut b).ok_or_else(bad)?;
        let memory_bytes = u64_(&mut b).ok_or_else(bad)?;
        let barrier = take(&mut b, 1).ok_or_else(bad)?[0] != 0;
        let entropy = bytes(&mut b).ok_or_else(bad)?;
        let argc = u32_(&mut b).ok_or_else(bad)?;
        let argv = (0..argc).map(|_| bytes(&mut b)).collect::<Option<Vec<_>>>().ok_or_else(bad)?;
        let envc = u32_(&mut b).ok_or_else(bad)?;
        let env = (0..envc).map(|_| bytes(&mut b)).collect::<Option<Vec<_>>>().ok_or_else(bad)?;
        let stdin = bytes(&mut b).ok_or_else(bad)?;
        Ok(Job { clone_id, clones, unix_nanos, memory_bytes, barrier, entropy, argv, env, stdin })
    }
}

/// The host side of the serial port: frames out, shared by the output threads.
#[derive(Clone)]
struct Link(Arc<Mutex<File>>);

impl Link {
    fn send(&self, kind: u8, payload: &[u8]) -> io::Result<()> {
        let mut frame = Vec::with_capacity(5 + payload.len());
        frame.push(kind);
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(payload);
        let mut port = self.0.lock().unwrap();
        port.write_all(&frame)?;
        port.flush()
    }
}

fn read_frame(port: &mut File) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    port.read_exact(&mut head)?;
    let len = u32::from_le_bytes(head[1..5].try_into().unwrap()) as usize;
    let mut payload = vec![0u8; len];
    port.read_exact(&mut payload)?;
    Ok((head[0], payload))
}

fn open_raw(path: &str) -> io::Result<File> {
    let port = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(port.as_raw_fd(), &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            t.c_cflag |= libc::CLOCAL;
            libc::tcsetattr(port.as_raw_fd(), libc::TCSANOW, &t);
        }
    }
    Ok(port)
}

fn serve(path: &str) -> io::Result<()> {
    let mut port = open_raw(path)?;
    let link = Link(Arc::new(Mutex::new(port.try_clone()?)));
    link.send(b'R', VERSION.as_bytes())?;
    // The snapshot is taken here: each clone continues from this read.
    let job = loop {
        match read_frame(&mut port)? {
            (b'J', payload) => break Job::parse(&payload)?,
            (b'W', entropy) => {
                add_entropy(&entropy);
                warm();
                link.send(b'w', &[])?;
            }
            _ => {}
        }
    };
    prepare(&job);
    if job.barrier {
        link.send(b'A', &[])?;
        while read_frame(&mut port)?.0 != b'G' {}
    }
    let (status, oom) = run(&job, &link);
    let mut exit = status.to_le_bytes().to_vec();
    exit.push(oom as u8);
    link.send(b'X', &exit)
}

/// Runs a shell and a few applets once, so that their code is translated (under TCG)
/// and their pages are in place before a job needs them.
fn warm() {
    let _ = Command::new("/bin/sh")
        .args(["-c", "echo warm | cat >/dev/null; od -An -N8 -tx8 /dev/urandom >/dev/null; true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Makes this clone distinct: the host's clock and fresh entropy, the CRNG reseeded.
fn prepare(job: &Job) {
    let ts = libc::timespec {
        tv_sec: (job.unix_nanos / 1_000_000_000) as _,
        tv_nsec: (job.unix_nanos % 1_000_000_000) as libc::c_long,
    };
    unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
    add_entropy(&job.entropy);
}

/// Mixes the host's `entropy` into the kernel's pool, credited (so that a CRNG not yet
/// initialised, as in a template booted without an entropy source, becomes ready
/// instead of running its jitter dance for a second), and reseeds the CRNG.
fn add_entropy(entropy: &[u8]) {
    if entropy.is_empty() {
        return;
    }
    if let Ok(random) = File::options().write(true).open("/dev/urandom") {
        // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
        let mut info = Vec::with_capacity(8 + entropy.len());
        info.extend_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
        info.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
        info.extend_from_slice(entropy);
        info.resize(info.len().next_multiple_of(4), 0);
        const RNDADDENTROPY: libc::Ioctl = 0x4008_5203_u32 as libc::Ioctl;
        const RNDRESEEDCRNG: libc::Ioctl = 0x5207;
        unsafe {
            if libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) != 0 {
                let _ = (&random).write_all(entropy);
            }
            libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG);
        }
    }
}

/// The guest kernel's count of OOM kills so far.
fn oom_kills() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("oom_kill ").and_then(|n| n.trim().parse().ok()))
        })
        .unwrap_or(0)
}

/// Runs the job's command; its wait status (exit code, or minus the signal) and
/// whether the OOM killer ran meanwhile.
fn run(job: &Job, link: &Link) -> (i32, bool) {
    use std::os::unix::ffi::OsStrExt;
    let os = |b: &Vec<u8>| std::ffi::OsStr::from_bytes(b).to_os_string();
    let Some(program) = job.argv.first() else {
        let _ = link.send(b'E', b"cloudpipe-vm-agent: the job has no command\n");
        return (127, false);
    };
    let mut cmd = Command::new(os(program));
    cmd.args(job.argv[1..].iter().map(os))
        .env_clear()
        .env("PATH", "/bin:/sbin:/usr/bin:/usr/sbin")
        .env("HOME", "/tmp")
        .env("CLOUDPIPE_CLONE_ID", job.clone_id.to_string())
        .env("CLOUDPIPE_CLONES", job.clones.to_string())
        .current_dir("/tmp")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for kv in &job.env {
        if let Some(eq) = kv.iter().position(|&c| c == b'=') {
            cmd.env(os(&kv[..eq].to_vec()), os(&kv[eq + 1..].to_vec()));
        }
    }
    let limit = job.memory_bytes;
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if limit > 0 {
                let r = libc::rlimit { rlim_cur: limit, rlim_max: limit };
                libc::setrlimit(libc::RLIMIT_AS, &r);
            }
            Ok(())
        });
    }
    let ooms = oom_kills();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("cloudpipe-vm-agent: cannot run {:?}: {e}\n", os(program));
            let _ = link.send(b'E', msg.as_bytes());
            return (if e.kind() == io::ErrorKind::NotFound { 127 } else { 126 }, false);
        }
    };
    let pgid = child.id() as i32;
    let stdin = job.stdin.clone();
    let mut input = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let pump = |mut from: File, kind: u8, link: Link| {
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 16 << 10];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if link.send(kind, &buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        })
    };
    let out = child.stdout.take().map(|o| unsafe { File::from_raw_fd(into_fd(o)) }).unwrap();
    let err = child.stderr.take().map(|e| unsafe { File::from_raw_fd(into_fd(e)) }).unwrap();
    let out = pump(out, b'O', link.clone());
    let err = pump(err, b'E', link.clone());
    let status = child.wait();
    // Whatever the command left running (holding the pipes open) goes with it.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let _ = out.join();
    let _ = err.join();
    let _ = writer.join();
    let code = match status {
        Ok(s) => s.code().unwrap_or_else(|| -s.signal().unwrap_or(libc::SIGKILL)),
        Err(_) => -libc::SIGKILL,
    };
    (code, oom_kills() > ooms)
}

fn into_fd(f: impl std::os::unix::io::IntoRawFd) -> i32 {
    f.into_raw_fd()
}
