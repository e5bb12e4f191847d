//! What `cargo cloudpipe` says on stderr: the status lines of [`Ui`] (shared with the
//! `cloudpipe` binary), and errors explained with what to do about them.

pub use cloudpipe_cli::Ui;

/// Prints an error for people: what went wrong and, when known, what to do.
pub fn report(err: &anyhow::Error, url: &str, has_key: bool) {
    let mut msg = format!("error: {err}");
    let mut last = err.to_string();
    for cause in err.chain().skip(1) {
        // Errors that repeat their source's text add nothing.
        let text = cause.to_string();
        if !last.contains(&text) {
            msg.push_str(&format!("\n  caused by: {text}"));
        }
        last = text;
    }
    if let Some(e) = err.chain().find_map(|c| c.downcast_ref::<cloudpipe::Error>()) {
        if e.is_unreachable() {
            msg.push_str(&format!(
                "\n\nIs the server running? Start one with `cloudpipe serve`, or point at \
                 another with --url or CLOUDPIPE_URL (now {url})."
            ));
        } else if e.is_auth() {
            let what = if has_key { "refused the API key" } else { "needs an API key" };
            msg.push_str(&format!(
                "\n\nThe server at {url} {what}. Log in with `cargo cloudpipe login`, or set \
                 CLOUDPIPE_API_KEY."
            ));
        }
    }
    eprintln!("{msg}");
}

/// Bytes as KiB or MiB for people.
pub fn size(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}
