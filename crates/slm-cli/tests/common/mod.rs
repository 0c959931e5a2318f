//! Helpers shared by the CLI test files: the `slm` binary and running it expecting success or failure.
#![allow(dead_code)] // each test file uses its own subset

use std::process::Command;

pub fn slm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_slm"))
}

/// Runs `cmd`, asserts success, returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `cmd`, asserts failure, returns stderr.
pub fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "expected failure, got: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8(out.stderr).unwrap()
}

/// `slm lora` flags of a short run on a plain-text file: windows of 32 tokens, optimiser steps of two sequences
/// (one per micro-batch).
pub const TEXT_PAIRS: &[&str] = &["--format", "text", "--cutoff", "32", "--batch-size", "2", "--micro-batch-size", "1"];

/// With [`TEXT_PAIRS`]: one optimiser step, with two validation windows.
pub const ONE_STEP_TEXT: &[&str] = &["--max-steps", "1", "--val-size", "2"];
