//! `cargo cloudpipe new`: a function crate, ready for `cargo cloudpipe submit`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// What kind of function to scaffold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// A plain command: argv in, stdout out, the exit code decides.
    Command,
    /// Typed functions with `#[cloudpipe_guest::function]`: JSON in, JSON out.
    Typed,
    /// A CGI-style HTTP handler for `cargo cloudpipe deploy`.
    Http,
}

/// Where the scaffold's `cloudpipe-guest` dependency comes from: a path given with
/// `--guest-path` or `CLOUDPIPE_GUEST_PATH`, else the checkout this tool was built
/// from when it is still there (`cargo install --path sdk-rust/cargo-cloudpipe`), else
/// crates.io.
fn guest_dependency(guest_path: Option<&Path>) -> anyhow::Result<String> {
    let path = match guest_path {
        Some(p) => Some(p.to_path_buf()),
        None => {
            let beside = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cloudpipe-guest");
            beside.join("Cargo.toml").is_file().then_some(beside)
        }
    };
    match path {
        Some(p) => {
            let p = p
                .canonicalize()
                .with_context(|| format!("the cloudpipe-guest crate at {}", p.display()))?;
            if !p.join("Cargo.toml").is_file() {
                bail!(
                    "{} holds no Cargo.toml: give the cloudpipe-guest crate's directory",
                    p.display()
                );
            }
            let text = p.to_str().context("the cloudpipe-guest path is not UTF-8")?;
            Ok(format!("cloudpipe-guest = {{ path = {} }}", toml_string(text)))
        }
        None => Ok(format!("cloudpipe-guest = \"{}\"", env!("CARGO_PKG_VERSION"))),
    }
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Creates the crate `name` in a new directory `dir`.
pub fn create(
    dir: &Path,
    name: &str,
    style: Style,
    guest_path: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    crate::build::function_name(name).ok().filter(|n| n == name).with_context(|| {
        format!("{name:?} is not a usable name: use a-z, 0-9, `_` and `-` (at most 63)")
    })?;
    if dir.exists() {
        bail!("{} already exists", dir.display());
    }
    let dependency = match style {
        Style::Command => String::new(),
        Style::Typed | Style::Http => guest_dependency(guest_path)?,
    };
    let manifest = format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"

[dependencies]
{dependency}

# Smaller binaries upload faster.
[profile.release]
opt-level = "s"
strip = "debuginfo"

# A workspace of its own: the function builds for WASI with the profile
# above, even when created inside another workspace.
[workspace]
"#
    );
    let main = match style {
        Style::Command => COMMAND.replace("@NAME@", name),
        Style::Typed => TYPED.to_string(),
        Style::Http => HTTP.replace("@NAME@", name),
    };
    std::fs::create_dir_all(dir.join("src"))
        .with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("Cargo.toml"), manifest)?;
    std::fs::write(dir.join("src/main.rs"), main)?;
    std::fs::write(dir.join(".gitignore"), "/target\n")?;
    Ok(dir.to_path_buf())
}

const COMMAND: &str = r#"//! A Cloudpipe function: argv is the function name then the job's arguments, stdin
//! the job's input, stdout the result and stderr the log; the exit code decides
//! whether the job succeeded.
//!
//!     cargo cloudpipe submit -- world      # prints "hello, world!"

use std::process::ExitCode;

fn main() -> ExitCode {
    let names: Vec<String> = std::env::args().skip(1).collect();
    if names.is_empty() {
        eprintln!("usage: @NAME@ NAME...   (cargo cloudpipe submit -- NAME...)");
        return ExitCode::FAILURE;
    }
    for name in names {
        println!("hello, {name}!");
    }
    ExitCode::SUCCESS
}
"#;

const TYPED: &str = r#"//! Typed Cloudpipe functions: the arguments arrive as a JSON array on stdin and the
//! result leaves as JSON on stdout.
//!
//!     cargo cloudpipe submit --fn add 3 4        # prints 7
//!     cargo cloudpipe submit --fn greet '""'     # fails: "error: greet needs a name"
//!
//! There is no `main`: `#[cloudpipe_guest::function]` supplies one that runs the
//! function named by the job's first argument.

/// Adds two integers.
#[cloudpipe_guest::function]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

/// Greets someone; an `Err` fails the job with its message on stderr.
#[cloudpipe_guest::function]
fn greet(name: String) -> Result<String, String> {
    if name.is_empty() {
        return Err("greet needs a name".into());
    }
    Ok(format!("hello, {name}!"))
}
"#;

const HTTP: &str = r#"//! A Cloudpipe HTTP function in the CGI style: the request arrives in environment
//! variables and on stdin, the response leaves on stdout.
//!
//!     cargo cloudpipe deploy                          # prints the URL
//!     curl "$(cargo cloudpipe deploy)/hello?name=you"

use cloudpipe_guest::http::{self, Request, Response};

fn main() -> std::process::ExitCode {
    http::serve(handle)
}

fn handle(req: Request) -> Response {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "" | "/") => Response::text(200, "hello from @NAME@!\n"),
        ("GET", "/hello") => {
            let who = req.query("name").unwrap_or_else(|| "world".into());
            Response::text(200, format!("hello, {who}!\n"))
        }
        ("POST", "/echo") => {
            let kind = req.header("content-type").unwrap_or("text/plain").to_string();
            Response::new(200).header("Content-Type", &kind).body(req.body)
        }
        _ => Response::text(404, "not found\n"),
    }
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_string(r#"C:\a "b""#), r#""C:\\a \"b\"""#);
    }

    #[test]
    fn bad_names_and_existing_directories_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(create(&tmp.path().join("x"), "Bad Name", Style::Command, None).is_err());
        let e = create(tmp.path(), "x", Style::Command, None).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
    }
}
