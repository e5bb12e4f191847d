//! [`Qmp`]: a client of QEMU's monitor protocol (JSON lines over a unix socket).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::Child;

/// A QMP connection.
pub(super) struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    /// Connects to QEMU's QMP socket (retrying while QEMU starts) and negotiates.
    pub async fn connect(path: &Path, child: &mut Child, deadline: Instant) -> anyhow::Result<Qmp> {
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) => {
                    if let Some(status) = child.try_wait()? {
                        bail!("QEMU exited ({status}) before its monitor came up");
                    }
                    if Instant::now() > deadline {
                        bail!("QEMU's monitor did not come up: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        };
        let (r, writer) = stream.into_split();
        let mut qmp = Qmp { reader: BufReader::new(r), writer };
        let mut greeting = String::new();
        qmp.reader.read_line(&mut greeting).await?;
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value (events are skipped).
    pub async fn execute(&mut self, command: &str, arguments: Value) -> anyhow::Result<Value> {
        let mut line = serde_json::to_string(&json!({"execute": command, "arguments": arguments}))?;
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await?;
        loop {
            let mut answer = String::new();
            if self.reader.read_line(&mut answer).await? == 0 {
                bail!("QEMU closed its monitor");
            }
            let v: Value = serde_json::from_str(&answer)?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!("QEMU refused {command}: {}", e["desc"]);
            }
        }
    }

    pub async fn status(&mut self) -> anyhow::Result<String> {
        let s = self.execute("query-status", json!({})).await?;
        Ok(s["status"].as_str().unwrap_or_default().to_string())
    }
}
