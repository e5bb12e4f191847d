//! The frame protocol between the host and the guest agent on the first serial port:
//! a kind byte, a little-endian `u32` length, the payload.
//!
//! Host to guest: `J` a job ([`JobFrame::encode`]), `W` warm up (entropy), `G` go
//! (the barrier of a fan-out). Guest to host: `R` ready (the agent's version), `w`
//! warmed, `A` armed behind a barrier, `O` stdout, `E` stderr, `X` the exit (an `i32`
//! code, negative for a signal, then one byte: killed by the memory limit).

use crate::executor::RunRequest;

/// Largest frame accepted from a guest (its job can write to the serial port itself).
pub(super) const MAX_FRAME: usize = 4 << 20;

/// The 5-byte head of a frame.
pub(super) fn head(kind: u8, len: usize) -> [u8; 5] {
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&(len as u32).to_le_bytes());
    head
}

/// A frame's kind and payload length from its head; `Err` for a frame over
/// [`MAX_FRAME`].
pub(super) fn parse_head(head: [u8; 5]) -> std::io::Result<(u8, usize)> {
    let len = u32::from_le_bytes(head[1..5].try_into().unwrap()) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the guest sent a frame of {len} bytes"),
        ));
    }
    Ok((head[0], len))
}

/// An `X` frame's payload: the exit code and whether the memory limit killed the job.
pub(super) fn parse_exit(payload: &[u8]) -> Option<(i32, bool)> {
    (payload.len() >= 5)
        .then(|| (i32::from_le_bytes(payload[..4].try_into().unwrap()), payload[4] != 0))
}

/// What one clone is to run.
#[derive(Debug, Clone, Default)]
pub(super) struct JobFrame {
    pub clone_id: u32,
    pub clones: u32,
    pub barrier: bool,
    pub memory_bytes: u64,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub stdin: Vec<u8>,
}

impl JobFrame {
    pub fn from_request(req: &RunRequest) -> JobFrame {
        let mut argv = req.container.as_ref().map(|c| c.command.clone()).unwrap_or_default();
        argv.extend(req.args.iter().cloned());
        let mut env = req.env.clone();
        env.push(("CLOUDPIPE_JOB_ID".into(), req.job_id.clone()));
        env.push(("CLOUDPIPE_FUNCTION".into(), req.function.clone()));
        env.push(("CLOUDPIPE_ATTEMPT".into(), req.attempt.to_string()));
        JobFrame {
            clone_id: 0,
            clones: 1,
            barrier: false,
            memory_bytes: req.memory_bytes,
            argv,
            env,
            stdin: req.stdin.to_vec(),
        }
    }

    /// The payload of a `J` frame, as the agent parses it, with fresh entropy and the
    /// host's clock.
    pub fn encode(&self) -> Vec<u8> {
        let mut entropy = [0u8; 64];
        fill_random(&mut entropy);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        self.encode_with(&entropy, now)
    }

    /// The payload with the given entropy and clock (nanoseconds since the epoch).
    fn encode_with(&self, entropy: &[u8], now: u64) -> Vec<u8> {
        fn bytes(out: &mut Vec<u8>, b: &[u8]) {
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        }
        let mut out = Vec::with_capacity(256 + self.stdin.len());
        out.extend_from_slice(&self.clone_id.to_le_bytes());
        out.extend_from_slice(&self.clones.to_le_bytes());
        out.extend_from_slice(&now.to_le_bytes());
        out.extend_from_slice(&self.memory_bytes.to_le_bytes());
        out.push(self.barrier as u8);
        bytes(&mut out, entropy);
        out.extend_from_slice(&(self.argv.len() as u32).to_le_bytes());
        for a in &self.argv {
            bytes(&mut out, a.as_bytes());
        }
        out.extend_from_slice(&(self.env.len() as u32).to_le_bytes());
        for (k, v) in &self.env {
            bytes(&mut out, format!("{k}={v}").as_bytes());
        }
        bytes(&mut out, &self.stdin);
        out
    }
}

/// Fresh entropy from the host kernel.
pub(super) fn fill_random(buf: &mut [u8]) {
    use std::io::Read;
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_frame_is_laid_out_as_the_agent_reads_it() {
        let job = JobFrame {
            clone_id: 2,
            clones: 8,
            barrier: true,
            memory_bytes: 64 << 20,
            argv: vec!["sh".into(), "-c".into()],
            env: vec![("A".into(), "1".into())],
            stdin: b"in".to_vec(),
        };
        let p = job.encode_with(&[7; 4], 99);
        let u32_at = |i: usize| u32::from_le_bytes(p[i..i + 4].try_into().unwrap());
        assert_eq!((u32_at(0), u32_at(4)), (2, 8));
        assert_eq!(u64::from_le_bytes(p[8..16].try_into().unwrap()), 99);
        assert_eq!(u64::from_le_bytes(p[16..24].try_into().unwrap()), 64 << 20);
        assert_eq!(p[24], 1, "barrier");
        assert_eq!((u32_at(25), &p[29..33]), (4, &[7u8; 4][..]), "entropy");
        assert_eq!(u32_at(33), 2, "argc");
        assert_eq!((u32_at(37), &p[41..43]), (2, &b"sh"[..]));
        assert_eq!((u32_at(43), &p[47..49]), (2, &b"-c"[..]));
        assert_eq!(u32_at(49), 1, "envc");
        assert_eq!((u32_at(53), &p[57..60]), (3, &b"A=1"[..]));
        assert_eq!((u32_at(60), &p[64..]), (2, &b"in"[..]));
    }

    #[test]
    fn heads_round_trip_and_oversize_frames_are_refused() {
        assert_eq!(parse_head(head(b'O', 300)).unwrap(), (b'O', 300));
        assert_eq!(head(b'J', 1), [b'J', 1, 0, 0, 0]);
        let err = parse_head(head(b'O', MAX_FRAME + 1)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn exit_frames_carry_the_code_and_the_memory_flag() {
        let mut p = (-9i32).to_le_bytes().to_vec();
        p.push(1);
        assert_eq!(parse_exit(&p), Some((-9, true)));
        assert_eq!(parse_exit(&p[..4]), None, "too short");
    }

    #[test]
    fn entropy_is_fresh_each_time() {
        let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
        fill_random(&mut a);
        fill_random(&mut b);
        assert_ne!(a, b);
    }
}
