//! Seeded mutation test over the headers of a tiny valid GGUF and a tiny valid safetensors model: every mutant
//! must load to `Ok` or `Err` — no panic, no abort — and no single allocation may exceed a bound tied to the file
//! size. The allocation bound is enforced by a counting global allocator, so this file holds one test only (other
//! tests in the same binary would allocate concurrently).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use candle_core::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use slm_model::Model;

/// Records the largest single allocation while `TRACKING`; refuses (→ abort, failing the test) any allocation
/// above `HARD_LIMIT`, so a runaway size shows up here rather than as the machine swapping.
struct Counting;

static TRACKING: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
const HARD_LIMIT: usize = 1 << 30;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if TRACKING.load(Ordering::Relaxed) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
            if layout.size() > HARD_LIMIT {
                return std::ptr::null_mut();
            }
        }
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if TRACKING.load(Ordering::Relaxed) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
            if layout.size() > HARD_LIMIT {
                return std::ptr::null_mut();
            }
        }
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if TRACKING.load(Ordering::Relaxed) {
            LARGEST.fetch_max(new_size, Ordering::Relaxed);
            if new_size > HARD_LIMIT {
                return std::ptr::null_mut();
            }
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const MUTANTS: usize = 2500;
const EXTREMES: [u64; 9] = [0, 1, 7, 1 << 31, 1 << 32, 1 << 40, 1 << 63, u64::MAX - 1, u64::MAX];

/// Loads `target` once; returns (ok, largest allocation). A panic fails the test with the mutant's description.
fn load_once(target: &Path, what: &str) -> (bool, usize) {
    LARGEST.store(0, Ordering::Relaxed);
    TRACKING.store(true, Ordering::Relaxed);
    let r = catch_unwind(AssertUnwindSafe(|| Model::load(target, &Device::Cpu).is_ok()));
    TRACKING.store(false, Ordering::Relaxed);
    match r {
        Ok(ok) => (ok, LARGEST.load(Ordering::Relaxed)),
        Err(_) => panic!("loading a mutant panicked: {what}"),
    }
}

fn put(b: &mut [u8], pos: usize, width: usize, x: u64) {
    let bytes = x.to_le_bytes();
    let end = (pos + width).min(b.len());
    b[pos..end].copy_from_slice(&bytes[..end - pos]);
}

/// A random mutant of `orig`: 1-3 edits among bit flips and byte sets in the header, extreme values written over
/// a known length field or any header position, and truncation.
fn mutate(rng: &mut ChaCha8Rng, orig: &[u8], header_len: usize, fields: &[(usize, usize)]) -> (Vec<u8>, String) {
    let mut b = orig.to_vec();
    let mut what = Vec::new();
    for _ in 0..rng.random_range(1..=3) {
        match rng.random_range(0..10) {
            0..=2 => {
                let i = rng.random_range(0..header_len);
                let bit = rng.random_range(0..8);
                b[i] ^= 1 << bit;
                what.push(format!("flip bit {bit} of byte {i}"));
            }
            3 => {
                let i = rng.random_range(0..header_len);
                b[i] = rng.random();
                what.push(format!("set byte {i}"));
            }
            4..=6 if !fields.is_empty() => {
                let (pos, w) = fields[rng.random_range(0..fields.len())];
                let x = EXTREMES[rng.random_range(0..EXTREMES.len())];
                put(&mut b, pos, w, x);
                what.push(format!("field at {pos} = {x}"));
            }
            4..=7 => {
                let pos = rng.random_range(0..header_len);
                let x = EXTREMES[rng.random_range(0..EXTREMES.len())];
                put(&mut b, pos, 8, x);
                what.push(format!("u64 at {pos} = {x}"));
            }
            _ => {
                let n = rng.random_range(0..b.len());
                b.truncate(n);
                what.push(format!("truncate to {n}"));
                break;
            }
        }
    }
    (b, what.join(", "))
}

/// The positions of every JSON number in a safetensors header (shapes and data offsets): the length fields of
/// this format, overwritten digit by digit.
fn json_number_fields(bytes: &[u8], header_len: usize) -> Vec<(usize, usize)> {
    let mut out = vec![(0, 8)];
    let mut i = 8;
    while i < header_len {
        if bytes[i].is_ascii_digit() {
            let start = i;
            while i < header_len && bytes[i].is_ascii_digit() {
                i += 1;
            }
            out.push((start, i - start));
        }
        i += 1;
    }
    out
}

/// Writes a JSON-number mutant: the digits at (pos, width) replaced by an extreme number, the header length fixed
/// up so the header still parses as far as the numbers.
fn splice_number(orig: &[u8], pos: usize, width: usize, x: u64) -> Vec<u8> {
    let mut b = orig[..pos].to_vec();
    b.extend_from_slice(x.to_string().as_bytes());
    b.extend_from_slice(&orig[pos + width..]);
    let n = u64::from_le_bytes(orig[..8].try_into().unwrap()) as i64 + x.to_string().len() as i64 - width as i64;
    b[..8].copy_from_slice(&(n as u64).to_le_bytes());
    b
}

#[test]
fn mutated_headers_never_panic_or_allocate_unboundedly() {
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();

    // GGUF.
    let enc = common::tiny_llama_gguf(2).encode();
    let gguf = dir.path().join("m.gguf");
    std::fs::write(&gguf, &enc.bytes).unwrap();
    assert!(load_once(&gguf, "the valid file").0, "the unmutated GGUF must load");
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let (mut ok, mut largest) = (0, 0);
    for k in 0..MUTANTS {
        let (b, what) = mutate(&mut rng, &enc.bytes, enc.header_len, &enc.fields);
        std::fs::write(&gguf, &b).unwrap();
        let (loaded, big) = load_once(&gguf, &format!("GGUF mutant {k}: {what}"));
        let bound = 64 * b.len() + (1 << 20);
        assert!(big <= bound, "GGUF mutant {k} ({what}): one allocation of {big} bytes > {bound}");
        ok += loaded as usize;
        largest = largest.max(big);
    }
    eprintln!(
        "GGUF: {MUTANTS} mutants of a {}-byte file ({} header bytes), {ok} loaded, largest allocation {largest} bytes, {:.1?}",
        enc.bytes.len(),
        enc.header_len,
        start.elapsed()
    );

    // Safetensors in an HF directory.
    let t0 = Instant::now();
    let model = dir.path().join("hf");
    common::write_tiny_hf(&model, 1);
    let st = model.join("model.safetensors");
    let orig = std::fs::read(&st).unwrap();
    let header_len = 8 + u64::from_le_bytes(orig[..8].try_into().unwrap()) as usize;
    let fields = json_number_fields(&orig, header_len);
    assert!(load_once(&model, "the valid directory").0, "the unmutated HF directory must load");
    let mut rng = ChaCha8Rng::seed_from_u64(1313);
    let (mut ok, mut largest) = (0, 0);
    for k in 0..MUTANTS {
        let (b, what) = if rng.random_bool(0.4) {
            let (pos, w) = fields[rng.random_range(1..fields.len())];
            let x = EXTREMES[rng.random_range(0..EXTREMES.len())];
            (splice_number(&orig, pos, w, x), format!("number at {pos} = {x}"))
        } else {
            mutate(&mut rng, &orig, header_len, &fields[..1])
        };
        std::fs::write(&st, &b).unwrap();
        let (loaded, big) = load_once(&model, &format!("safetensors mutant {k}: {what}"));
        let bound = 64 * b.len() + (1 << 20);
        assert!(big <= bound, "safetensors mutant {k} ({what}): one allocation of {big} bytes > {bound}");
        ok += loaded as usize;
        largest = largest.max(big);
    }
    eprintln!(
        "safetensors: {MUTANTS} mutants of a {}-byte file ({header_len} header bytes), {ok} loaded, largest \
         allocation {largest} bytes, {:.1?}",
        orig.len(),
        t0.elapsed()
    );
}
