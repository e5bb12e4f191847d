//! `cloudpipe-runner-js-preinit IN.wasm OUT.wasm`: pre-initialises a component.
//!
//! Instantiates `IN.wasm` with WASI (no arguments, no environment, empty stdin, stderr
//! inherited so that a failing initialiser can say why), calls its
//! `wizer-initialize` export and writes a snapshot of the initialised instance —
//! memory and globals — as `OUT.wasm`, which starts where the initialiser left off.
//! What `wasmtime wizer -S cli=y --keep-init-func=true IN -o OUT` does, as a library
//! call, so that the build needs no wasmtime CLI.
//!
//! The initialiser must leave no host resource behind (an open stream, a file): a
//! snapshot keeps memory, not the host's tables. So the output is checked before it
//! is written: run as a command, with `--check STDIN EXPECTED_STDOUT`, it must print
//! what is expected (the build passes a JS job and its result).

use anyhow::{Context as _, bail};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store};
use wasmtime_wasi::p2::bindings::Command;
use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wizer::Wizer;

struct State {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (input, output, check) = match args.as_slice() {
        [i, o] => (i, o, None),
        [i, o, flag, stdin, expected] if flag == "--check" => (i, o, Some((stdin, expected))),
        _ => bail!(
            "usage: cloudpipe-runner-js-preinit IN.wasm OUT.wasm [--check STDIN EXPECTED_STDOUT]"
        ),
    };
    let wasm = std::fs::read(input).with_context(|| format!("reading {input}"))?;

    let mut config = Config::new();
    config.wasm_component_model(true);
    let engine = Engine::new(&config)?;
    let mut linker = Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    let wasi = WasiCtx::builder().inherit_stderr().build();
    let mut store = Store::new(&engine, State { wasi, table: ResourceTable::new() });

    let mut wizer = Wizer::new();
    // Keep the export: without it wasmtime 48 refuses the output (its component type
    // still names the function; upstream wasmtime#13168).
    wizer.keep_init_func(true);
    let (snapshot, _) = wizer
        .run_component(&mut store, &wasm, async |store, component| {
            linker.instantiate_async(store, component).await
        })
        .await
        .map_err(anyhow::Error::from)
        .with_context(|| format!("pre-initialising {input}"))?;

    if let Some((stdin, expected)) = check {
        let (ok, stdout, stderr) = run_command(&engine, &linker, &snapshot, stdin).await?;
        if !ok || stdout != *expected {
            bail!(
                "the pre-initialised component does not run: given {stdin:?} it printed \
                 {stdout:?} (expected {expected:?}), exit {}, stderr {stderr:?}",
                if ok { "ok" } else { "error" }
            );
        }
    }

    std::fs::write(output, &snapshot).with_context(|| format!("writing {output}"))?;
    eprintln!(
        "pre-initialised {input} ({} bytes) into {output} ({} bytes)",
        wasm.len(),
        snapshot.len()
    );
    Ok(())
}

/// Runs `wasm` as a `wasi:cli/command` with `stdin`: whether it exited ok, its stdout
/// and its stderr.
async fn run_command(
    engine: &Engine,
    linker: &Linker<State>,
    wasm: &[u8],
    stdin: &str,
) -> anyhow::Result<(bool, String, String)> {
    let component = Component::new(engine, wasm)?;
    let stdout = MemoryOutputPipe::new(1 << 20);
    let stderr = MemoryOutputPipe::new(1 << 20);
    let wasi = WasiCtx::builder()
        .stdin(MemoryInputPipe::new(stdin.as_bytes().to_vec()))
        .stdout(stdout.clone())
        .stderr(stderr.clone())
        .build();
    let mut store = Store::new(engine, State { wasi, table: ResourceTable::new() });
    let command = Command::instantiate_async(&mut store, &component, linker).await?;
    let ok = command.wasi_cli_run().call_run(&mut store).await.is_ok_and(|r| r.is_ok());
    let text = |p: &MemoryOutputPipe| String::from_utf8_lossy(&p.contents()).into_owned();
    Ok((ok, text(&stdout), text(&stderr)))
}
