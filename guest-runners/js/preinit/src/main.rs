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
//! snapshot keeps memory, not the host's tables.

use anyhow::{Context as _, bail};
use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{Config, Engine, Store};
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
    let [input, output] = args.as_slice() else {
        bail!("usage: cloudpipe-runner-js-preinit IN.wasm OUT.wasm");
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

    std::fs::write(output, &snapshot).with_context(|| format!("writing {output}"))?;
    eprintln!(
        "pre-initialised {input} ({} bytes) into {output} ({} bytes)",
        wasm.len(),
        snapshot.len()
    );
    Ok(())
}
