//! The client must stay light: nothing of the server's runtime in its dependency tree.

use std::process::Command;

#[test]
fn client_tree_has_no_wasmtime_store_or_axum() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "-p", "cloudpipe", "-e", "normal", "--prefix", "none"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo tree");
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "cargo tree failed:\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(tree.lines().any(|l| l.starts_with("cloudpipe-types ")), "unexpected tree:\n{tree}");
    let crates: Vec<&str> = tree.lines().filter_map(|l| l.split_whitespace().next()).collect();
    for banned in ["wasmtime", "axum", "redb", "sled", "cloudpipe-runtime", "cloudpipe-api"] {
        let found: Vec<&&str> = crates.iter().filter(|c| c.starts_with(banned)).collect();
        assert!(found.is_empty(), "{banned} is in the client's tree: {found:?}");
    }
}
