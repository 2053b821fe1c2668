//! Every end-to-end test in one binary: a real broker on `127.0.0.1:0` driven by real clients, one module per
//! subject. One binary links wasmtime, cranelift and mlua once instead of twelve times, which is most of the
//! workspace's link time and disk (each test binary is ~90 MB), and builds the WebAssembly test plugins once.
//! Run one subject with `cargo test -p tollgate-integration-tests --test e2e -- vin_acl::`.

#[path = "../../support/wasm_build.rs"]
mod wasm_build;

mod bridge;
mod cli;
mod malformed;
mod mosquitto_clients;
mod msg_auth;
mod paho_python;
mod persistence;
mod plugins;
mod protocol;
mod rumqttc_v4;
mod rumqttc_v5;
mod timers;
mod transports;
mod vin_acl;
