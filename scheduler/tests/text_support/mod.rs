//! Finds the model directory for the text tests: `MINISGL_MODEL`, else `models/Qwen2.5-Coder-0.5B-Instruct` in
//! the workspace. Without it a test says so and passes, unless `MINISGL_REQUIRE_MODEL=1`.

use std::path::PathBuf;
pub fn model_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("MINISGL_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/Qwen2.5-Coder-0.5B-Instruct"));
    if dir.join("tokenizer.json").is_file() {
        return Some(dir);
    }
    if std::env::var("MINISGL_REQUIRE_MODEL").as_deref() == Ok("1") {
        panic!("no tokenizer.json in {} and MINISGL_REQUIRE_MODEL=1: run scripts/setup", dir.display());
    }
    eprintln!("skipped: no model directory at {} (set MINISGL_MODEL or run scripts/setup)", dir.display());
    None
}
