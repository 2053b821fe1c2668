//! Builds the workspace's WebAssembly plugins for tests, once per test binary. Shared by the plugin-host tests and
//! the end-to-end tests with `#[path]`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root, from any member's manifest directory.
pub fn workspace_root() -> PathBuf {
    let mut dir = Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf();
    while !dir.join("sdk").join("wit").is_dir() {
        if !dir.pop() {
            panic!("workspace root not found above {}", env!("CARGO_MANIFEST_DIR"));
        }
    }
    dir
}

/// Path of `<package>.wasm` (release, wasm32-wasip2), building every plugin package on first use.
pub fn wasm_plugin(package: &str) -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let root = workspace_root();
    let target_dir = BUILT
        .get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
            let output = Command::new(cargo)
                .current_dir(&root)
                .args(["build", "--release", "--target", "wasm32-wasip2", "-p", "testkit-wasm", "-p", "auth-wasm", "-p", "vin-acl", "-p", "msg-auth"])
                .output()
                .map_err(|error| format!("cannot run cargo: {error}"))?;
            if !output.status.success() {
                return Err(format!(
                    "building the test plugins failed (is the wasm32-wasip2 target installed? `rustup target add wasm32-wasip2`):\n{}",
                    String::from_utf8_lossy(&output.stderr)
                ));
            }
            let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target"));
            Ok(target.join("wasm32-wasip2").join("release"))
        })
        .as_ref()
        .unwrap_or_else(|error| panic!("{error}"));
    target_dir.join(format!("{}.wasm", package.replace('-', "_")))
}
