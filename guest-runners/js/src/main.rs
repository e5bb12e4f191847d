//! The JS guest runner: a `wasi:cli/command` component that runs a JavaScript function
//! shipped as data, on QuickJS (through rquickjs).
//!
//! Contract (see `README.md`):
//! - stdin: `{"source": "<function expression>", "args": [...]}`;
//! - the source is evaluated to a function and called with `args`; a returned promise
//!   is awaited (the job queue and timers run until it settles);
//! - stdout: `JSON.stringify(result)` and a newline (`undefined` gives `null`);
//! - `console.*` writes to stderr;
//! - a thrown error or a rejection: `Uncaught` with its message and stack on stderr,
//!   exit code 1; input that is not such a function: a message on stderr, exit code 2.
//!
//! # Layout
//! - `Engine`: the QuickJS runtime and context and the kit of `bootstrap.js`, made by
//!   [`Engine::new`] in `wizer-initialize` (so a pre-initialised component starts
//!   with it in its memory image) or at the start of `main` otherwise.
//! - `run`: one job, from stdin to an exit code.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::time::Duration;

use rquickjs::context::EvalOptions;
use rquickjs::promise::PromiseState;
use rquickjs::{Array, Context, Ctx, Function, Object, Persistent, Promise, Runtime, Value};

mod bindings {
    // The export that wizer calls before taking the snapshot.
    wit_bindgen::generate!({
        inline: "
            package cloudpipe:runner-js;
            world init { export wizer-initialize: func(); }
        ",
        world: "cloudpipe:runner-js/init",
    });

    // Rust's std exits through `wasi:cli/exit.exit`, which carries only ok/err: the
    // runner keeps its codes (1 for a thrown error, 2 for bad input) through
    // `exit-with-code`.
    pub mod cli {
        wit_bindgen::generate!({
            inline: "
                package wasi:cli@0.2.12;
                interface exit {
                    exit: func(status: result);
                    exit-with-code: func(status-code: u8);
                }
                world exit-guest { import exit; }
            ",
            world: "wasi:cli/exit-guest",
        });
    }

    // Read at the start of every run: a snapshot taken at build time must not fix
    // Math.random's sequence.
    pub mod random {
        wit_bindgen::generate!({
            inline: "
                package wasi:random@0.2.0;
                interface random {
                    get-random-u64: func() -> u64;
                }
                world random-guest { import random; }
            ",
            world: "wasi:random/random-guest",
        });
    }
}

/// The JS source name in stack traces of the submitted function.
const SOURCE_NAME: &str = "function.js";

/// Exit codes beyond 0.
const EXIT_THROWN: u8 = 1;
const EXIT_BAD_INPUT: u8 = 2;

struct Engine {
    // Field order is drop order: the kit before the context before the runtime.
    kit: Persistent<Object<'static>>,
    context: Context,
    // Held so that it outlives the context; only the context is used after start.
    _runtime: Runtime,
}

thread_local! {
    // The component has one thread; a thread-local is a plain static there, and
    // wizer's snapshot keeps it.
    static ENGINE: RefCell<Option<Engine>> = const { RefCell::new(None) };
}

impl Engine {
    /// Starts QuickJS, evaluates `bootstrap.js` and warms the paths a run takes.
    /// Called once per component build when pre-initialised; it does no I/O, since
    /// the snapshot keeps no host resources.
    fn new() -> Engine {
        let runtime = Runtime::new().expect("QuickJS runtime");
        let context = Context::full(&runtime).expect("QuickJS context");
        let kit = context.with(|ctx| {
            let write_stderr = Function::new(ctx.clone(), |text: String| {
                let _ = std::io::stderr().write_all(text.as_bytes());
            })
            .expect("stderr writer");
            let factory: Function = ctx
                .eval_with_options(include_str!("bootstrap.js"), options("bootstrap.js"))
                .expect("bootstrap.js evaluates");
            let kit: Object = factory.call((write_stderr,)).expect("bootstrap.js runs");
            warm_up(&ctx, &kit);
            Persistent::save(&ctx, kit)
        });
        runtime.run_gc();
        Engine { kit, context, _runtime: runtime }
    }
}

/// Runs a job without I/O through the same calls as a real one, so that what QuickJS
/// and Rust set up lazily on first use is in the snapshot already.
fn warm_up<'js>(ctx: &Ctx<'js>, kit: &Object<'js>) {
    let parse: Function = kit.get("parse").expect("kit.parse");
    let parsed: Value =
        parse.call((r#"{"source": "async (a, b) => [a + b]", "args": [1, 2]}"#,)).unwrap();
    let (source, args) = source_and_args(parsed);
    let f: Function = ctx.eval_with_options(wrap(&source), options(SOURCE_NAME)).unwrap();
    let start: Function = kit.get("start").unwrap();
    let promise: Promise = start.call((f, args)).unwrap();
    while ctx.execute_pending_job() {}
    assert_eq!(promise.state(), PromiseState::Resolved, "warm-up job settles");
}

/// The function that `source` evaluates to: a function expression (arrow, `function`,
/// `async`, a class), or a method written in shorthand (`name(a) {…}`, what
/// `toString()` gives for an object's method), taken from an object literal.
fn evaluate<'js>(
    ctx: &Ctx<'js>,
    kit: &Object<'js>,
    source: &str,
) -> Result<Function<'js>, Failure> {
    let value: Value = match ctx.eval_with_options(wrap(source), options(SOURCE_NAME)) {
        Ok(v) => v,
        Err(_) => {
            let error = thrown(ctx, kit);
            match method(ctx, source) {
                Some(f) => return Ok(f),
                None => {
                    return Err(Failure::BadInput(format!(
                        "`source` is not a function expression: {error}"
                    )));
                }
            }
        }
    };
    value.into_function().ok_or_else(|| {
        Failure::BadInput("`source` evaluated to something other than a function".into())
    })
}

/// `source` as the one method of an object literal, if it is one.
fn method<'js>(ctx: &Ctx<'js>, source: &str) -> Option<Function<'js>> {
    let object: Object =
        match ctx.eval_with_options(format!("({{{source}\n}})"), options(SOURCE_NAME)) {
            Ok(o) => o,
            Err(_) => {
                let _ = ctx.catch();
                return None;
            }
        };
    let mut values = object.values::<Value>();
    let only = values.next()?.ok()?;
    if values.next().is_some() {
        return None;
    }
    only.into_function()
}

/// The `[source, args]` pair that `parse` gives for good input.
fn source_and_args(parsed: Value<'_>) -> (String, Value<'_>) {
    let pair: Array = parsed.get().expect("parse gives [source, args]");
    (pair.get(0).expect("source"), pair.get(1).expect("args"))
}

fn options(filename: &str) -> EvalOptions {
    let mut o = EvalOptions::default();
    o.filename = Some(filename.to_owned());
    o.backtrace_barrier = true;
    o
}

/// A function expression as a script: parenthesised, so that `function (a) {…}` is an
/// expression, not a declaration. The closing parenthesis goes on its own line so that
/// a trailing `//` comment cannot swallow it.
fn wrap(source: &str) -> String {
    format!("({source}\n)")
}

/// The component's exports beyond `wasi:cli/run`.
struct Component;

impl bindings::Guest for Component {
    fn wizer_initialize() {
        ENGINE.with_borrow_mut(|e| {
            e.get_or_insert_with(Engine::new);
        });
    }
}
bindings::export!(Component with_types_in bindings);

fn main() {
    let code = ENGINE.with_borrow_mut(|e| run(e.get_or_insert_with(Engine::new)));
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    if code != 0 {
        bindings::cli::wasi::cli::exit::exit_with_code(code);
    }
}

/// What ended a run other than a result.
enum Failure {
    BadInput(String),
    Thrown(String),
}

fn run(engine: &mut Engine) -> u8 {
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("runner-js: cannot read stdin as UTF-8 text: {e}");
        return EXIT_BAD_INPUT;
    }
    let outcome = engine.context.with(|ctx| {
        let kit = engine.kit.clone().restore(&ctx).expect("kit belongs to this runtime");
        call(&ctx, &kit, &input)
    });
    match outcome {
        Ok(json) => {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(json.as_bytes()).and_then(|()| out.write_all(b"\n"));
            0
        }
        Err(Failure::BadInput(msg)) => {
            eprintln!("runner-js: {msg}");
            EXIT_BAD_INPUT
        }
        Err(Failure::Thrown(text)) => {
            eprintln!("Uncaught {text}");
            EXIT_THROWN
        }
    }
}

/// The exception pending in `ctx`, as `describe` in bootstrap.js words it.
fn thrown<'js>(ctx: &Ctx<'js>, kit: &Object<'js>) -> String {
    let error = ctx.catch();
    let describe: Function = kit.get("describe").expect("kit.describe");
    describe.call((error,)).unwrap_or_else(|_| {
        let _ = ctx.catch();
        "(an error that could not be described)".to_owned()
    })
}

fn call<'js>(ctx: &Ctx<'js>, kit: &Object<'js>, input: &str) -> Result<String, Failure> {
    let random = || bindings::random::wasi::random::random::get_random_u64();
    let (a, b) = (random(), random());
    let seed: Function = kit.get("seed").expect("kit.seed");
    seed.call::<_, ()>((a as u32, (a >> 32) as u32, b as u32, (b >> 32) as u32))
        .expect("seed Math.random");

    let parse: Function = kit.get("parse").expect("kit.parse");
    let parsed: Value = parse.call((input,)).map_err(|_| Failure::Thrown(thrown(ctx, kit)))?;
    if let Some(problem) = parsed.as_string() {
        return Err(Failure::BadInput(problem.to_string().unwrap_or_default()));
    }
    let (source, args) = source_and_args(parsed);

    let f = evaluate(ctx, kit, &source)?;
    let start: Function = kit.get("start").expect("kit.start");
    let promise: Promise = start.call((f, args)).map_err(|_| Failure::Thrown(thrown(ctx, kit)))?;
    let next_timer: Function = kit.get("nextTimer").expect("kit.nextTimer");
    let fire_timers: Function = kit.get("fireTimers").expect("kit.fireTimers");
    loop {
        // Jobs first (promise reactions), then timers once no job is left.
        while promise.state() == PromiseState::Pending && ctx.execute_pending_job() {}
        if promise.state() != PromiseState::Pending {
            break;
        }
        let wait: f64 = next_timer.call(()).expect("kit.nextTimer");
        if wait < 0.0 {
            return Err(Failure::Thrown(
                "Error: the function's promise never settled (nothing left to run: no pending \
                 job or timer)"
                    .into(),
            ));
        }
        if wait > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(wait / 1000.0));
        }
        fire_timers.call::<_, ()>(()).map_err(|_| Failure::Thrown(thrown(ctx, kit)))?;
    }
    match promise.state() {
        PromiseState::Resolved => Ok(promise.result::<String>().expect("settled").expect("text")),
        _ => {
            let reason: Value = match promise.result::<Value>() {
                Some(Err(_)) => ctx.catch(),
                Some(Ok(v)) => v,
                None => unreachable!("settled"),
            };
            let describe: Function = kit.get("describe").expect("kit.describe");
            Err(Failure::Thrown(describe.call((reason,)).unwrap_or_else(|_| thrown(ctx, kit))))
        }
    }
}
