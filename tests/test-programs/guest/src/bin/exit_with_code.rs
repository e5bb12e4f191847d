//! Exits with code 3 through `wasi:cli/exit.exit-with-code`.
//!
//! The interface is declared inline: the WASI version that Rust's linker knows has
//! `exit-with-code` behind a feature gate.
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

fn main() {
    println!("exiting with 3");
    wasi::cli::exit::exit_with_code(3);
}
