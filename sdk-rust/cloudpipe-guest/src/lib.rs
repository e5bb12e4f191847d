//! Write Cloudpipe functions in Rust.
//!
//! A Cloudpipe function is a program compiled to WASI (`wasm32-wasip1` for jobs, which
//! is what `cargo cloudpipe submit` builds, or `wasm32-wasip2`): argv is the function
//! name then the job's arguments, stdin the job's input, stdout the result, stderr the
//! log, and the exit code decides `succeeded` or `failed` ([`exit`] ends with any code,
//! on either target). This crate adds two styles on top of that contract:
//!
//! - **Typed functions**: [`#[function]`](macro@function) on a plain Rust function. Its
//!   arguments arrive as a JSON array on stdin and its return value leaves as JSON on
//!   stdout, so `submit(add, 3, 4)` returns `7`. The crate needs no `main`: the
//!   attribute supplies one that picks the function by name (see [`run`]).
//! - **HTTP functions** in the CGI style ([`http`]): a function deployed at
//!   `/fn/{name}` reads the request from its environment and stdin and writes the
//!   response to stdout.
//!
//! # Layout
//! - [`function`]: the attribute; [`run`]: the dispatcher behind the `main` it supplies.
//! - [`http`]: [`http::Request`], [`http::Response`] and [`http::serve`] for CGI.
//! - [`Error`]: what a typed call fails with (bad arguments, an `Err` returned).
//! - [`exit`]: ends the process with an exit code that reaches the job record.
//!
//! # Example
//!
//! A whole `src/main.rs`:
//!
//! ```
//! #[cloudpipe_guest::function]
//! fn add(a: i64, b: i64) -> i64 {
//!     a + b
//! }
//!
//! #[cloudpipe_guest::function]
//! fn divide(a: f64, b: f64) -> Result<f64, String> {
//!     if b == 0.0 { Err("division by zero".into()) } else { Ok(a / b) }
//! }
//! # // Doctests wrap the example in a `main` of their own; call the dispatcher's
//! # // logic directly to show what a job running `add` with stdin `[3, 4]` prints.
//! # assert_eq!(cloudpipe_guest::call("add", "[3, 4]").unwrap(), "7");
//! # assert!(cloudpipe_guest::call("divide", "[1, 0]").unwrap_err().to_string().contains("division by zero"));
//! ```
//!
//! Built with `cargo build --release --target wasm32-wasip1` (or simply
//! `cargo cloudpipe submit --fn add 3 4`), the job's stdout is `7`.

use std::fmt;
use std::io::{Read, Write};
use std::process::ExitCode;

pub mod http;

// Lets the expansion of `#[function]` name `::cloudpipe_guest` inside this crate too.
extern crate self as cloudpipe_guest;

/// Makes a plain Rust function a typed Cloudpipe function.
///
/// - Each argument must implement `serde::de::DeserializeOwned` and arrives, in
///   order, from the JSON array on stdin (`[3, 4]` for `add(a, b)`).
/// - The return value must implement `serde::Serialize` and is written to stdout as
///   JSON followed by a newline. A return type spelled `Result<T, E>` (`E:
///   Display`) turns `Err(e)` into `error: e` on stderr and a failed job.
/// - Wrong arguments (count or types) are reported on stderr and fail the job.
///
/// The attribute registers the function and brings a `main` into the module it is
/// used in (a glob import of [`run`]'s entry point, which an explicit `fn main` of
/// the crate shadows). So a `src/main.rs` holding only typed functions at its top
/// level is a complete program; a crate that keeps them in submodules, or wants to do
/// something before dispatching, writes `fn main() -> ExitCode { cloudpipe_guest::run() }`.
pub use cloudpipe_guest_macros::function;

/// Why a typed call failed. Its message goes to stderr, prefixed with `error: `.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    message: String,
}

impl Error {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Error {
        Error { message: message.into() }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// Ends the process at once with `code` as the job's exit code, after flushing stdout
/// and stderr.
///
/// On `wasm32-wasip1` (and natively) this is `std::process::exit`: preview1's
/// `proc_exit` carries the code. On `wasm32-wasip2` Rust's std can only say ok or
/// error (WASI 0.2's `exit`), so any non-zero code would arrive as 1; this calls
/// `wasi:cli/exit.exit-with-code` instead, which Cloudpipe's server provides.
pub fn exit(code: u8) -> ! {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    #[cfg(all(target_os = "wasi", target_env = "p2"))]
    {
        wasi_exit::wasi::cli::exit::exit_with_code(code);
        unreachable!("wasi:cli/exit.exit-with-code returned");
    }
    #[cfg(not(all(target_os = "wasi", target_env = "p2")))]
    std::process::exit(i32::from(code))
}

#[cfg(all(target_os = "wasi", target_env = "p2"))]
mod wasi_exit {
    // Declared inline: the interface as the server's WASI implements it.
    wit_bindgen::generate!({
        inline: "
            package wasi:cli@0.2.12;
            interface exit {
                exit: func(status: result);
                exit-with-code: func(status-code: u8);
            }
            world exit-with-code-guest { import exit; }
        ",
        world: "wasi:cli/exit-with-code-guest",
    });
}

/// Runs the typed function this process was started for and returns the exit code;
/// the `main` that [`#[function]`](macro@function) supplies is exactly this.
///
/// The function is chosen, in order, by:
/// 1. `argv[1]`, when it names a registered function (what `cargo cloudpipe submit
///    --fn NAME` sends); the arguments then follow in argv or on stdin;
/// 2. `argv[0]`, the name the job was submitted under, when it names one (upload the
///    crate under the function's name and submit that name);
/// 3. the only registered function, when there is just one.
///
/// Arguments come from stdin as a JSON array. When stdin is empty, the remaining argv
/// entries are the arguments, each read as JSON when it parses as JSON and as a string
/// otherwise (so `add 3 4` and `greet world` both work from a command line).
pub fn run() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let mut stdin = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut stdin) {
        eprintln!("error: reading stdin: {e}");
        return ExitCode::FAILURE;
    }
    match dispatch(&argv, &stdin) {
        Ok(out) => {
            let mut stdout = std::io::stdout().lock();
            match writeln!(stdout, "{out}").and_then(|_| stdout.flush()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: writing the result: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Calls the registered function `name` with a JSON array of arguments and returns
/// its JSON result as text: what a job running it would print, without a process.
/// Useful in tests of the functions themselves.
pub fn call(name: &str, json_args: &str) -> Result<String, Error> {
    let f = registered().find(|f| f.name == name).ok_or_else(|| unknown(name))?;
    invoke(f, parse_args(json_args)?)
}

fn registered() -> impl Iterator<Item = &'static __private::Registered> {
    inventory::iter::<__private::Registered>.into_iter()
}

fn names() -> String {
    let mut names: Vec<&str> = registered().map(|f| f.name).collect();
    names.sort_unstable();
    names.join(", ")
}

fn unknown(name: &str) -> Error {
    Error::new(format!("no function {name:?} here (functions: {})", names()))
}

fn dispatch(argv: &[String], stdin: &str) -> Result<String, Error> {
    let find = |name: &str| registered().find(|f| f.name == name);
    let (f, rest) = if let Some(f) = argv.get(1).and_then(|a| find(a)) {
        (f, &argv[2.min(argv.len())..])
    } else if let Some(f) = argv.first().and_then(|a| find(a)) {
        (f, &argv[1.min(argv.len())..])
    } else {
        let mut all = registered();
        match (all.next(), all.next()) {
            (Some(f), None) => (f, &argv[1.min(argv.len())..]),
            (None, _) => return Err(Error::new("this program registers no functions")),
            (Some(_), Some(_)) => {
                return Err(Error::new(format!(
                    "which function? give its name as the first argument: one of {}",
                    names()
                )));
            }
        }
    };
    let args = if stdin.trim().is_empty() {
        rest.iter()
            .map(|a| {
                serde_json::from_str(a).unwrap_or_else(|_| serde_json::Value::String(a.clone()))
            })
            .collect()
    } else {
        parse_args(stdin)?
    };
    invoke(f, args)
}

fn parse_args(json: &str) -> Result<Vec<serde_json::Value>, Error> {
    match serde_json::from_str::<serde_json::Value>(json) {
        Ok(serde_json::Value::Array(args)) => Ok(args),
        Ok(other) => Err(Error::new(format!(
            "the arguments must be a JSON array (like [3, 4]), got {}",
            kind_of(&other)
        ))),
        Err(e) => Err(Error::new(format!("the arguments are not valid JSON: {e}"))),
    }
}

fn kind_of(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn invoke(
    f: &'static __private::Registered,
    args: Vec<serde_json::Value>,
) -> Result<String, Error> {
    if args.len() != f.arity {
        let sig: Vec<String> = f.params.iter().map(|(n, t)| format!("{n}: {t}")).collect();
        return Err(Error::new(format!(
            "{}({}) takes {} argument{}, got {}",
            f.name,
            sig.join(", "),
            f.arity,
            if f.arity == 1 { "" } else { "s" },
            args.len()
        )));
    }
    let out =
        (f.call)(__private::Args { function: f, values: args.into_iter().map(Some).collect() })?;
    serde_json::to_string(&out).map_err(|e| Error::new(format!("encoding the result: {e}")))
}

/// The `main` that [`#[function]`](macro@function) brings into scope.
#[doc(hidden)]
pub mod __entry {
    /// Dispatches to the typed function named by argv (see [`crate::run`]).
    pub fn main() -> std::process::ExitCode {
        crate::run()
    }
}

/// What the expansion of [`#[function]`](macro@function) uses; not a stable API.
#[doc(hidden)]
pub mod __private {
    pub use inventory;
    pub use serde_json::Value;

    use crate::Error;

    /// One typed function, registered at start-up.
    pub struct Registered {
        pub name: &'static str,
        /// Each parameter's name and type as written.
        pub params: &'static [(&'static str, &'static str)],
        pub arity: usize,
        pub call: fn(Args) -> Result<Value, Error>,
    }

    inventory::collect!(Registered);

    /// The arguments of one call, already counted against the function's arity.
    pub struct Args {
        pub(crate) function: &'static Registered,
        pub(crate) values: Vec<Option<Value>>,
    }

    impl Args {
        /// Argument `i` as a `T`.
        pub fn take<T: serde::de::DeserializeOwned>(&mut self, i: usize) -> Result<T, Error> {
            let (name, ty) = self.function.params[i];
            let v = self.values[i].take().unwrap_or(Value::Null);
            serde_json::from_value(v).map_err(|e| {
                Error::new(format!(
                    "{}: argument {} (`{name}: {ty}`): {e}",
                    self.function.name,
                    i + 1
                ))
            })
        }
    }

    /// The JSON of a plain return value.
    pub fn output<T: serde::Serialize>(v: T) -> Result<Value, Error> {
        serde_json::to_value(v).map_err(|e| Error::new(format!("encoding the result: {e}")))
    }

    /// The JSON of `Ok`, or the `Err` as the call's error.
    pub fn result_output<T: serde::Serialize, E: std::fmt::Display>(
        r: Result<T, E>,
    ) -> Result<Value, Error> {
        match r {
            Ok(v) => output(v),
            Err(e) => Err(Error::new(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[function]
    fn add(a: i64, b: i64) -> i64 {
        a + b
    }

    #[function]
    fn greet(name: String) -> Result<String, String> {
        if name.is_empty() { Err("no name".into()) } else { Ok(format!("hello, {name}")) }
    }

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn stdin_array_is_the_arguments() {
        assert_eq!(dispatch(&argv(&["calc", "add"]), "[3, 4]").unwrap(), "7");
    }

    #[test]
    fn argv_zero_names_the_function_when_argv_one_does_not() {
        assert_eq!(dispatch(&argv(&["greet"]), r#"["you"]"#).unwrap(), r#""hello, you""#);
    }

    #[test]
    fn argv_arguments_are_json_or_strings_when_stdin_is_empty() {
        assert_eq!(dispatch(&argv(&["calc", "add", "3", "4"]), "").unwrap(), "7");
        assert_eq!(dispatch(&argv(&["calc", "greet", "bob"]), "\n").unwrap(), r#""hello, bob""#);
    }

    #[test]
    fn several_functions_and_no_name_is_an_error_listing_them() {
        let e = dispatch(&argv(&["calc"]), "[]").unwrap_err().to_string();
        assert!(e.contains("add") && e.contains("greet"), "{e}");
    }

    #[test]
    fn wrong_arity_names_the_signature() {
        let e = dispatch(&argv(&["calc", "add"]), "[1]").unwrap_err().to_string();
        assert_eq!(e, "add(a: i64, b: i64) takes 2 arguments, got 1");
    }

    #[test]
    fn wrong_type_names_the_argument() {
        let e = call("add", r#"[1, "x"]"#).unwrap_err().to_string();
        assert!(e.starts_with("add: argument 2 (`b: i64`)"), "{e}");
    }

    #[test]
    fn returned_err_is_the_error() {
        assert_eq!(call("greet", r#"[""]"#).unwrap_err().to_string(), "no name");
    }

    #[test]
    fn arguments_must_be_an_array() {
        let e = call("add", r#"{"a": 1}"#).unwrap_err().to_string();
        assert!(e.contains("JSON array") && e.contains("an object"), "{e}");
    }
}
